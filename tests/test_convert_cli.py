"""``python -m adapters_reft convert``: layout round trips keep outputs; bad input is refused clearly."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import adapters_reft
from adapters_reft import convert
from adapters_reft.__main__ import main
from adapters_reft.scenarios import _inputs, tiny_llama

BASE = "parametrizations.weight.0.base"
HIDDEN = 64
FP32 = {"atol": 1e-5, "rtol": 1e-5}
# a dense bf16 base is orthogonal only to bf16 precision, and the model itself computes in bf16
BF16 = {"atol": 2e-2, "rtol": 2e-2}


@contextlib.contextmanager
def patched(compact: bool = True) -> Iterator[None]:
    adapters_reft.patch(compact=compact)
    try:
        yield
    finally:
        adapters_reft.unpatch()


def _adapter_config(dtype: torch.dtype) -> object:
    import adapters

    del dtype  # ReftConfig.dtype exists only from adapters 1.1: callers move the adapter with adapter_to
    return adapters.LoReftConfig(r=2, prefix_positions=2, suffix_positions=2)


def _trained(dtype: torch.dtype = torch.float32, steps: int = 3) -> torch.nn.Module:
    """A tiny Llama whose LoReFT adapter took a few SGD steps, so ``original`` is off the identity point."""
    model = tiny_llama(dtype)
    model.add_adapter("reft", config=_adapter_config(dtype))
    model.adapter_to("reft", dtype=dtype)
    model.train_adapter("reft")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.5)
    ids = _inputs()
    for _ in range(steps):
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(_inputs()).logits.float()


def _save(model: torch.nn.Module, folder: Path, safetensors: bool = False) -> Path:
    model.save_adapter(str(folder), "reft", use_safetensors=safetensors)
    return folder


def _load(folder: Path, dtype: torch.dtype = torch.float32, safetensors: bool = False) -> torch.nn.Module:
    model = tiny_llama(dtype)
    model.load_adapter(str(folder), load_as="reft", use_safetensors=safetensors)
    model.set_active_adapters("reft")
    return model.eval()


def _without_dtype(folder: Path) -> Path:
    """A copy of an adapter folder whose config builds the adapter in the default dtype."""
    copy = folder.with_name(folder.name + "-default-dtype")
    shutil.copytree(folder, copy)
    config = json.loads((copy / convert.CONFIG_NAME).read_text())
    config["config"]["dtype"] = None
    (copy / convert.CONFIG_NAME).write_text(json.dumps(config))
    return copy


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / convert.SAFE_WEIGHTS_NAME).exists():
        from safetensors.torch import load_file

        return load_file(str(folder / convert.SAFE_WEIGHTS_NAME))
    return torch.load(folder / convert.WEIGHTS_NAME, weights_only=True)


def _bases(folder: Path) -> list[torch.Tensor]:
    bases = [t for k, t in _weights(folder).items() if k.endswith(BASE)]
    assert bases
    return bases


def _cli(*args: object) -> int:
    return main(["convert", *map(str, args)])


def _is_stock(folder: Path) -> bool:
    return all(b.shape == (HIDDEN, HIDDEN) for b in _bases(folder))


def _is_compact(folder: Path) -> bool:
    return all(b.shape == (HIDDEN, 2) for b in _bases(folder))


def _unit_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if "refts.reft" in k}


# -- round trips ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("safetensors", [False, True], ids=["bin", "safetensors"])
def test_stock_to_compact_to_stock(stock: None, tmp_path: Path, safetensors: bool) -> None:
    model = _trained()
    expected = _logits(model)
    src = _save(model, tmp_path / "stock", safetensors)
    assert _is_stock(src)

    assert _cli("--to", "compact", src, tmp_path / "compact") == 0
    assert _cli("--to", "stock", tmp_path / "compact", tmp_path / "stock2") == 0
    assert _is_compact(tmp_path / "compact") and _is_stock(tmp_path / "stock2")
    for folder in ("compact", "stock2"):  # same format as the source, other files unchanged
        names = sorted(p.name for p in (tmp_path / folder).iterdir())
        assert names == sorted(p.name for p in src.iterdir())
        for name in names:
            if name not in convert.WEIGHT_FILES:
                assert (tmp_path / folder / name).read_bytes() == (src / name).read_bytes()

    torch.testing.assert_close(_logits(_load(tmp_path / "stock2", safetensors=safetensors)), expected, **FP32)
    with patched():
        from_compact = _load(tmp_path / "compact", safetensors=safetensors)
        torch.testing.assert_close(_logits(from_compact), expected, **FP32)
        # the converter and the patched library's load hook compute the very same compact tensors
        from_stock = _load(src, safetensors=safetensors)
        for (k, a), b in zip(_unit_tensors(from_stock).items(), _unit_tensors(from_compact).values(), strict=True):
            assert torch.equal(a, b), k


def test_compact_to_stock_to_compact(stock: None, tmp_path: Path) -> None:
    with patched():
        model = _trained()
        expected = _logits(model)
        src = _save(model, tmp_path / "compact")
    assert _is_compact(src)

    assert _cli("--to", "stock", src, tmp_path / "stock") == 0
    assert _cli("--to", "compact", tmp_path / "stock", tmp_path / "compact2") == 0
    assert _is_stock(tmp_path / "stock") and _is_compact(tmp_path / "compact2")

    torch.testing.assert_close(_logits(_load(tmp_path / "stock")), expected, **FP32)  # stock adapters
    with patched():
        torch.testing.assert_close(_logits(_load(tmp_path / "compact2")), expected, **FP32)


def test_compact_to_stock_to_compact_bf16(stock: None, tmp_path: Path) -> None:
    with patched():
        model = _trained(torch.bfloat16)
        expected = _logits(model)
        src = _save(model, tmp_path / "compact")
        reference_fp32 = _logits(_load(src))  # the same adapter, upcast into an fp32 model
    assert _cli("--to", "stock", src, tmp_path / "stock") == 0
    assert _cli("--to", "compact", tmp_path / "stock", tmp_path / "compact2") == 0
    for folder in ("compact", "stock", "compact2"):
        assert all(t.dtype == torch.bfloat16 for t in _weights(tmp_path / folder).values())
    assert _is_stock(tmp_path / "stock") and _is_compact(tmp_path / "compact2")

    # stock adapters cannot build or run bf16 ReFT units at all (its half-precision warning crashes in
    # logging); it loads the bf16 stock-layout tensors into an fp32 adapter
    torch.testing.assert_close(_logits(_load(_without_dtype(tmp_path / "stock"))), reference_fp32, **BF16)
    with patched():
        torch.testing.assert_close(_logits(_load(tmp_path / "compact2", torch.bfloat16)), expected, **BF16)
        torch.testing.assert_close(_logits(_load(tmp_path / "stock", torch.bfloat16)), expected, **BF16)


def test_stock_to_compact_to_stock_bf16(stock: None, tmp_path: Path) -> None:
    # a bf16 checkpoint in the stock layout: stock adapters cannot make one, the dense-layout patch can
    with patched(compact=False):
        model = _trained(torch.bfloat16)
        expected = _logits(model)
        src = _save(model, tmp_path / "stock")
    assert _is_stock(src)
    assert _cli("--to", "compact", src, tmp_path / "compact") == 0
    assert _cli("--to", "stock", tmp_path / "compact", tmp_path / "stock2") == 0
    for folder in ("compact", "stock2"):
        assert all(t.dtype == torch.bfloat16 for t in _weights(tmp_path / folder).values())
    with patched(compact=False):
        torch.testing.assert_close(_logits(_load(tmp_path / "stock2", torch.bfloat16)), expected, **BF16)
    with patched():
        torch.testing.assert_close(_logits(_load(tmp_path / "compact", torch.bfloat16)), expected, **BF16)


def test_seed_changes_the_completion_not_the_outputs(stock: None, tmp_path: Path) -> None:
    with patched():
        src = _save(_trained(), tmp_path / "compact")
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        assert _cli("--to", "stock", "--seed", seed, src, tmp_path / name) == 0
    a, b, c = (_weights(tmp_path / name) for name in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if k.endswith(BASE))
    torch.testing.assert_close(_logits(_load(tmp_path / "a")), _logits(_load(tmp_path / "c")), **FP32)


def test_state_dict_api_batched_and_square() -> None:
    generator = torch.Generator().manual_seed(0)
    original = torch.randn(3, 2, 7, generator=generator)  # a batch of 2 × 7 projections
    original.diagonal(dim1=-2, dim2=-1).fill_(-1.0)
    dense = torch.linalg.qr(torch.randn(3, 7, 7, generator=generator)).Q
    square = torch.eye(4)
    state = {
        "a.parametrizations.weight.original": original,
        "a.parametrizations.weight.0.base": dense,
        "sq.parametrizations.weight.original": torch.zeros(4, 4),
        "sq.parametrizations.weight.0.base": square,
        "other": torch.ones(3),
    }
    compact, report = convert.convert_state_dict(state, "compact")
    assert (report.converted, report.already, report.square) == (1, 0, 1)
    assert compact["a.parametrizations.weight.0.base"].shape == (3, 7, 2)
    assert compact["sq.parametrizations.weight.0.base"] is square and compact["other"] is state["other"]
    back, _ = convert.convert_state_dict(compact, "stock")
    assert back["a.parametrizations.weight.0.base"].shape == (3, 7, 7)

    from adapters_reft.orthogonal import _weight

    def weight(s: dict[str, torch.Tensor]) -> torch.Tensor:
        return _weight(
            s["a.parametrizations.weight.original"],
            s["a.parametrizations.weight.0.base"],
            "householder",
            torch.float64,
        )

    torch.testing.assert_close(weight(compact), weight(state), atol=1e-6, rtol=0)
    torch.testing.assert_close(weight(back), weight(state), atol=1e-6, rtol=0)


def test_file_names_match_adapters() -> None:
    from adapters.utils import CONFIG_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_NAME

    assert (convert.WEIGHTS_NAME, convert.SAFE_WEIGHTS_NAME, convert.CONFIG_NAME) == (
        WEIGHTS_NAME,
        SAFE_WEIGHTS_NAME,
        CONFIG_NAME,
    )


# -- refusals ------------------------------------------------------------------------------------------------
@pytest.fixture
def saved(stock: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("src")
    model = tiny_llama()
    model.add_adapter("reft", config=_adapter_config(torch.float32))
    return _save(model, folder)


def test_refuses_a_non_empty_dst_without_force(
    saved: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    assert _cli("--to", "compact", saved, dst) == 1
    err = capsys.readouterr().err
    assert "not empty" in err and "--force" in err
    assert sorted(p.name for p in dst.iterdir()) == ["keep.txt"]  # nothing written

    (dst / convert.SAFE_WEIGHTS_NAME).write_bytes(b"stale")  # would shadow the new weights for use_safetensors
    assert _cli("--to", "compact", "--force", saved, dst) == 0
    assert not (dst / convert.SAFE_WEIGHTS_NAME).exists() and (dst / "keep.txt").exists()
    assert "removed stale" in capsys.readouterr().out
    assert _is_compact(dst)


def test_empty_existing_dst_is_fine(saved: Path, tmp_path: Path) -> None:
    (tmp_path / "dst").mkdir()
    assert _cli("--to", "compact", saved, tmp_path / "dst") == 0


@pytest.mark.parametrize("missing", ["folder", convert.CONFIG_NAME, convert.WEIGHTS_NAME])
def test_refuses_missing_source_files(
    saved: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], missing: str
) -> None:
    src = tmp_path / "does-not-exist" if missing == "folder" else saved
    if missing != "folder":
        (saved / missing).unlink()
    assert _cli("--to", "compact", src, tmp_path / "dst") == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert {"folder": "not a folder", convert.CONFIG_NAME: convert.CONFIG_NAME}.get(
        missing, "no adapter weights"
    ) in err
    assert not (tmp_path / "dst").exists()


def test_refuses_an_adapter_without_orthogonal_projection(
    stock: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import adapters

    model = tiny_llama()
    model.add_adapter("reft", config=adapters.NoReftConfig())
    src = _save(model, tmp_path / "noreft")
    assert _cli("--to", "compact", src, tmp_path / "dst") == 1
    assert "no orthogonal ReFT projection" in capsys.readouterr().err


def test_refuses_a_corrupt_weights_file(saved: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (saved / convert.WEIGHTS_NAME).write_bytes(b"not a checkpoint")
    assert _cli("--to", "compact", saved, tmp_path / "dst") == 1
    assert "cannot read" in capsys.readouterr().err


def test_refuses_dst_equal_to_src(saved: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli("--to", "compact", "--force", saved, saved) == 1
    assert "DST is SRC" in capsys.readouterr().err


def test_already_in_the_requested_layout_copies(
    saved: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _cli("--to", "stock", saved, tmp_path / "dst") == 0
    assert "already in the stock layout" in capsys.readouterr().out
    for path in saved.iterdir():
        assert (tmp_path / "dst" / path.name).read_bytes() == path.read_bytes()


def test_unknown_layout_is_a_usage_error(saved: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        _cli("--to", "dense", saved, tmp_path / "dst")
    assert exc.value.code == 2


def test_summary_and_entry_point(saved: Path, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "adapters_reft", "convert", "--to", "compact", str(saved), str(tmp_path / "dst")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "converted 4 orthogonal projection(s) to the compact layout" in proc.stdout
    assert "pytorch_adapter.bin: projection tensors" in proc.stdout and "->" in proc.stdout
