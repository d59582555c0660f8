"""Shared fixtures: hypothesis profiles, the patch applied per test, tiny models built from configs."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

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


@contextlib.contextmanager
def patched_adapters() -> Iterator[None]:
    """adapters with the patch installed inside the block: for tests that compare with stock in one test, and
    hypothesis tests (which take no function-scoped fixtures)."""
    adapters_reft.patch()
    try:
        yield
    finally:
        adapters_reft.unpatch()


@pytest.fixture
def patched() -> Iterator[None]:
    """adapters with the patch installed for this test only."""
    with patched_adapters():
        yield


class CallCounter:
    """Counts the calls of ``owner.name`` for one test (through ``monkeypatch``) and passes them on."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, owner: object, name: str) -> None:
        self.calls = 0
        real: Callable[..., Any] = getattr(owner, name)

        def counting(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, counting)


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
