"""Shared fixtures: hypothesis profiles, the patch applied per test, tiny models built from configs."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch
from hypothesis import HealthCheck, settings

import adapters_reft

settings.register_profile(
    "ci",
    derandomize=True,
    max_examples=25,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_configure(config: pytest.Config) -> None:
    import transformers

    transformers.logging.set_verbosity_error()


@pytest.fixture
def patched() -> Iterator[None]:
    """adapters with the patch installed for this test only."""
    adapters_reft.patch()
    try:
        yield
    finally:
        adapters_reft.unpatch()


@pytest.fixture
def stock() -> Iterator[None]:
    """Stock adapters, whatever an earlier test did."""
    adapters_reft.unpatch()
    yield


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
