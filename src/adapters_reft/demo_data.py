"""The demo's shipped dataset: synthetic product reviews labelled with the product category.

The files live in ``adapters_reft/data/product_topics/`` and are written by ``tools/make_demo_dataset.py``
(seeded, reproducible); ``docs/dataset.md`` is the data card. Loading goes through ``importlib.resources`` so
it works from a wheel, an sdist install or a source checkout alike.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from typing import Any

__all__ = ["DATASET", "SPLITS", "Example", "label_names", "load_split"]

DATASET = "product_topics"
SPLITS = ("train", "test")


@dataclass(frozen=True)
class Example:
    """One review and its class index into :func:`label_names`."""

    text: str
    label: int


def _data_file(name: str) -> Any:
    # one joinpath per level: Python 3.10's Traversable takes a single child
    return resources.files("adapters_reft").joinpath("data").joinpath(DATASET).joinpath(name)


def label_names() -> list[str]:
    """Class names in label-index order, read from the dataset's ``meta.json``."""
    return list(json.loads(_data_file("meta.json").read_text(encoding="utf-8"))["labels"])


def load_split(split: str, limit: int | None = None) -> list[Example]:
    """Read ``split`` ("train" or "test"); ``limit`` keeps a class-balanced prefix (for quick runs and tests)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    lines = _data_file(f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
    examples = [Example(row["text"], int(row["label"])) for row in map(json.loads, filter(None, lines))]
    return examples if limit is None else _balanced_prefix(examples, limit)


def _balanced_prefix(examples: list[Example], limit: int) -> list[Example]:
    """Take examples in file order, round-robin over classes, so a small subset still covers every class."""
    by_label: dict[int, list[Example]] = {}
    for example in examples:
        by_label.setdefault(example.label, []).append(example)
    queues = [by_label[label] for label in sorted(by_label)]
    picked: list[Example] = []
    for i in range(max(map(len, queues), default=0)):
        picked += [queue[i] for queue in queues if i < len(queue)]
    return picked[: max(limit, 0)]
