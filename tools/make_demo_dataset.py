#!/usr/bin/env python3
"""Generate the synthetic product-review topic dataset shipped with ``adapters_reft`` for the demo.

Every sentence is composed from the hand-written templates and vocabulary below with a seeded
``random.Random``, so the shipped files are reproducible byte for byte::

    python tools/make_demo_dataset.py            # rewrite src/adapters_reft/data/product_topics/
    python tools/make_demo_dataset.py --check    # exit 1 if the shipped files differ from a fresh run

The task: say which product category (electronics, kitchen, books, clothing) a short review is about.
The held-out split is built from vocabulary the training split never sees: every test sentence contains a
held-out product noun or a held-out category phrase (often both), and some use held-out sentence templates,
so no test sentence, and no (noun, phrase) pair, occurs in training. See docs/dataset.md for the data card.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

SEED = 20240613
N_TRAIN_PER_CLASS = 120
N_TEST_PER_CLASS = 60
OUT_DIR = Path(__file__).resolve().parent.parent / "src" / "adapters_reft" / "data" / "product_topics"
LABELS = ("electronics", "kitchen", "books", "clothing")

# Product nouns per category: (seen in training, held out for test only).
ITEMS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "electronics": (
        ("headset", "phone charger", "tablet", "bluetooth speaker", "webcam", "keyboard", "smartwatch"),
        ("wireless mouse", "e-reader", "power bank"),
    ),
    "kitchen": (
        ("kettle", "blender", "frying pan", "toaster", "knife set", "rice cooker", "coffee grinder"),
        ("saucepan", "cutting board", "stand mixer"),
    ),
    "books": (
        ("novel", "biography", "paperback", "thriller", "poetry collection", "history book", "memoir"),
        ("short story collection", "fantasy saga", "graphic novel"),
    ),
    "clothing": (
        ("jacket", "sweater", "pair of jeans", "summer dress", "wool scarf", "hoodie", "raincoat"),
        ("pair of socks", "linen shirt", "winter coat"),
    ),
}

# Category phrases that complete "the <item> ..." or "it ...": (seen in training, held out for test only).
PHRASES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "electronics": (
        (
            "drains its battery overnight",
            "pairs with my phone in seconds",
            "charges over usb-c",
            "keeps dropping the wifi connection",
            "has a bright, sharp screen",
            "needed a firmware update out of the box",
            "gets warm while charging",
            "has crackling audio at high volume",
            "runs for two days on one charge",
            "came with a flimsy cable",
            "has laggy touch controls",
        ),
        (
            "lost its bluetooth signal across the room",
            "shows a dead pixel in the corner",
            "needs a driver install on windows",
            "holds a charge for a full week",
            "has a loud fan and buzzing speakers",
        ),
    ),
    "kitchen": (
        (
            "boils water in two minutes",
            "has a non-stick coating that peeled",
            "is easy to clean in the dishwasher",
            "heats evenly on a gas stove",
            "crushes ice without struggling",
            "rusted after a few washes",
            "has a blade that stays sharp",
            "leaves a plastic taste in the food",
            "cooks the rice perfectly every time",
            "has a handle that gets too hot to hold",
            "grinds the beans finely",
        ),
        (
            "makes the pancakes stick to the bottom",
            "whips cream in under a minute",
            "warped on the first high-heat sear",
            "kneads bread dough without stalling",
            "stains easily from tomato sauce",
        ),
    ),
    "books": (
        (
            "has a plot that drags in the middle",
            "has characters I cared about",
            "is printed in a tiny font",
            "kept me reading until two in the morning",
            "has a twist I never saw coming",
            "reads like a dry textbook",
            "has beautiful prose on every page",
            "ends on a frustrating cliffhanger",
            "needed a better editor",
            "has chapters that are far too long",
            "is a story my book club loved",
        ),
        (
            "has a narrator I could not trust",
            "sagged in the second act",
            "has dialogue that feels wooden",
            "made me cry on the last page",
            "has a map and an index at the back",
        ),
    ),
    "clothing": (
        (
            "runs a size small",
            "has a soft, breathable fabric",
            "shrank after the first wash",
            "has stitching that came loose",
            "keeps me warm on cold mornings",
            "faded after a few washes",
            "fits perfectly around the waist",
            "has sleeves that are too long",
            "pills after a week of wear",
            "has a zipper that keeps sticking",
            "looks great with sneakers",
        ),
        (
            "is itchy around the collar",
            "has buttons that fell off",
            "stretched out at the knees",
            "kept me dry in a downpour",
            "is too tight across the shoulders",
        ),
    ),
}

# Category-neutral fillers: shared by every class and by both splits, so they carry no label signal.
OPENERS = (
    "bought this last month",
    "ordered it on sale",
    "got it as a birthday gift",
    "two weeks in",
    "honest review",
    "after a month of daily use",
    "quick update",
    "first impressions",
)
CLOSERS = (
    "would buy again",
    "returning it tomorrow",
    "five stars from me",
    "not worth the money",
    "pretty happy overall",
    "a total disappointment",
    "decent for the price",
    "I expected more",
)

# Sentence shapes. ``{item}``/``{phrase}`` describe the reviewed product (the label); ``{o_item}``/``{o_phrase}``
# describe a distractor from another category (a product the reviewer replaced, returned or compares with),
# so counting category words is not enough: the model has to tell which product the review is about. The
# TEST_* shapes are used only in the test split.
TEMPLATES = (
    "the {item} {phrase}.",
    "{opener}: the {item} {phrase}.",
    "this {item} {phrase}, {closer}.",
    "{opener}. it {phrase}. {closer}.",
    "{closer} - the {item} {phrase}.",
    "my new {item} {phrase}.",
)
TEST_TEMPLATES = (
    "{opener}, and honestly the {item} {phrase}.",
    "so the {item} {phrase}? {closer}.",
)
DISTRACTOR_TEMPLATES = (
    "my old {o_item} {o_phrase}, but this {item} {phrase}.",
    "this {item} {phrase}, unlike my old {o_item}, which {o_phrase}.",
    "{opener}: I returned the {o_item} because it {o_phrase}; the {item} I kept {phrase}.",
    "the {item} {phrase}. my previous {o_item} {o_phrase}.",
    "{closer}. the {o_item} I replaced {o_phrase}, and the new {item} {phrase}.",
)
TEST_DISTRACTOR_TEMPLATES = (
    "unlike the {o_item} I had before, which {o_phrase}, this {item} {phrase}.",
    "my sister's {o_item} {o_phrase}; this {item} {phrase}. {closer}.",
)
DISTRACTOR_SHARE = 0.35


@dataclass(frozen=True)
class Example:
    """One labelled sentence."""

    text: str
    label: int


def _pools(category: str, test: bool) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Nouns and phrases a split may use for ``category``; test may also draw the held-out ones."""
    items, phrases = ITEMS[category], PHRASES[category]
    if not test:
        return items[0], phrases[0]
    return items[0] + items[1], phrases[0] + phrases[1]


def _subject(rng: random.Random, category: str, test: bool, template: str) -> tuple[str, str]:
    """Pick the reviewed product's noun and phrase; in test the sentence always gets held-out vocabulary."""
    (seen_items, new_items), (seen_phrases, new_phrases) = ITEMS[category], PHRASES[category]
    if not test:
        return rng.choice(seen_items), rng.choice(seen_phrases)
    # a template without the noun ("... it <phrase>") can only carry held-out words in its phrase
    mode = rng.choice(("new_item", "new_phrase", "both") if "{item}" in template else ("new_phrase",))
    items = new_items if mode != "new_phrase" else seen_items
    phrases = new_phrases if mode != "new_item" else seen_phrases
    return rng.choice(items), rng.choice(phrases)


def _sentence(rng: random.Random, category: str, test: bool) -> str:
    """Compose one sentence about ``category``; a share ``DISTRACTOR_SHARE`` of them also mention a distractor."""
    fill = {"opener": rng.choice(OPENERS), "closer": rng.choice(CLOSERS)}
    if rng.random() < DISTRACTOR_SHARE:
        other = rng.choice([c for c in LABELS if c != category])
        o_items, o_phrases = _pools(other, test)
        fill |= {"o_item": rng.choice(o_items), "o_phrase": rng.choice(o_phrases)}
        template = rng.choice(DISTRACTOR_TEMPLATES + (TEST_DISTRACTOR_TEMPLATES if test else ()))
    else:
        template = rng.choice(TEMPLATES + (TEST_TEMPLATES if test else ()))
    fill["item"], fill["phrase"] = _subject(rng, category, test, template)
    return template.format(**fill)


def _sample_class(rng: random.Random, category: str, n: int, test: bool, taken: set[str]) -> list[str]:
    """Draw ``n`` sentences for one class that occur nowhere else in either split."""
    sentences: list[str] = []
    while len(sentences) < n:
        text = _sentence(rng, category, test)
        if text not in taken:
            taken.add(text)
            sentences.append(text)
    return sentences


def build() -> dict[str, list[Example]]:
    """Build both splits, class-balanced and shuffled, from the fixed seed."""
    rng = random.Random(SEED)
    taken: set[str] = set()
    splits: dict[str, list[Example]] = {"train": [], "test": []}
    for split, n, test in (("train", N_TRAIN_PER_CLASS, False), ("test", N_TEST_PER_CLASS, True)):
        for label, category in enumerate(LABELS):
            splits[split] += [Example(t, label) for t in _sample_class(rng, category, n, test, taken)]
        rng.shuffle(splits[split])
    return splits


def _jsonl(examples: list[Example]) -> str:
    rows = ({"text": e.text, "label": e.label, "label_name": LABELS[e.label]} for e in examples)
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def render() -> dict[str, str]:
    """Return file name -> exact file content for the dataset directory."""
    splits = build()
    files = {f"{name}.jsonl": _jsonl(examples) for name, examples in splits.items()}
    meta = {
        "name": "product_topics",
        "description": "Synthetic short product reviews labelled with the product category (see docs/dataset.md).",
        "generator": "tools/make_demo_dataset.py",
        "seed": SEED,
        "labels": list(LABELS),
        "sizes": {name: len(examples) for name, examples in splits.items()},
        "sha256": {name: hashlib.sha256(text.encode()).hexdigest() for name, text in files.items()},
    }
    files["meta.json"] = json.dumps(meta, indent=2) + "\n"
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="output directory (default: the package data dir)")
    parser.add_argument("--check", action="store_true", help="verify the files in --out instead of writing them")
    args = parser.parse_args(argv)
    files = render()
    if args.check:
        stale = [n for n, text in files.items() if not (args.out / n).is_file() or (args.out / n).read_text() != text]
        print("dataset is up to date" if not stale else f"stale or missing: {', '.join(stale)}")
        return 1 if stale else 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (args.out / name).write_text(text, encoding="utf-8")
    print(f"wrote {', '.join(sorted(files))} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
