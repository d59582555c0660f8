"""Checkpoints across stock adapters and the patched library: loading, layout, size, averaging, patch(model)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import adapters_reft
from adapters_reft.orthogonal import DtypeSafeOrthogonal
from adapters_reft.scenarios import _inputs, tiny_llama
from conftest import patched_adapters

HIDDEN = 64
FP32 = {"atol": 1e-5, "rtol": 1e-5}
BASE = "parametrizations.weight.0.base"


def _config(**kwargs: object) -> object:
    import adapters

    return adapters.LoReftConfig(**{"r": 2, "prefix_positions": 2, "suffix_positions": 2, **kwargs})


def _train(model: nn.Module, name: str = "reft", steps: int = 3, lr: float = 0.5, seed: int = 1) -> nn.Module:
    """A few SGD steps on ``name`` (no weight decay), so ``original`` leaves the identity point."""
    model.train_adapter(name)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr)
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(seed))
    for _ in range(steps):
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def _with_adapter(dtype: torch.dtype = torch.float32, **config: object) -> nn.Module:
    model = tiny_llama(dtype)
    model.add_adapter("reft", config=_config(**config))
    model.set_active_adapters("reft")
    return model


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(_inputs()).logits


def _load(folder: Path, dtype: torch.dtype = torch.float32, safetensors: bool = False) -> nn.Module:
    model = tiny_llama(dtype)
    model.load_adapter(str(folder), load_as="reft", use_safetensors=safetensors)
    model.set_active_adapters("reft")
    return model.eval()


def _parametrizations(model: nn.Module, name: str = "reft") -> list[nn.Module]:
    """The ParametrizationList of every orthogonal ReFT projection of adapter ``name``."""
    return [
        unit.projection.parametrizations.weight
        for layer in model.model.layers
        for unit in layer.reft_layer.refts[name].units
        if unit.orthogonal
    ]


def _projection_weights(model: nn.Module, name: str = "reft") -> list[torch.Tensor]:
    return [
        unit.projection.weight.detach().clone()
        for layer in model.model.layers
        for unit in layer.reft_layer.refts[name].units
    ]


def _saved_bases(folder: Path) -> list[torch.Tensor]:
    state = torch.load(folder / "pytorch_adapter.bin", weights_only=True)
    return [t for k, t in state.items() if k.endswith(BASE)]


def _orthonormality_error(weight: torch.Tensor) -> float:
    w = weight.detach().double()
    return (w @ w.T - torch.eye(w.size(0), dtype=w.dtype)).abs().max().item()


# -- stock checkpoints into the patched library ---------------------------------------------------------------
@pytest.mark.parametrize("safetensors", [False, True], ids=["bin", "safetensors"])
def test_stock_checkpoint_loads_into_patched_with_identical_outputs(
    stock: None, tmp_path: Path, safetensors: bool
) -> None:
    model = _train(_with_adapter())
    originals = [p.original.detach() for p in _parametrizations(model)]
    assert all(not torch.equal(o, _identity(o)) for o in originals), "training left original at the identity"
    expected = _logits(model)
    model.save_adapter(str(tmp_path), "reft", use_safetensors=safetensors)
    assert all(b.shape == (HIDDEN, HIDDEN) for b in _stock_bases(tmp_path, safetensors))

    with patched_adapters():
        loaded = _load(tmp_path, safetensors=safetensors)
    torch.testing.assert_close(_logits(loaded), expected, **FP32)
    for plist in _parametrizations(loaded):
        assert isinstance(plist[0], DtypeSafeOrthogonal)
        assert plist[0].base.shape == (HIDDEN, 2)  # converted to compact on load
        assert torch.equal(plist.original, _identity(plist.original))


def _identity(like: torch.Tensor) -> torch.Tensor:
    point = torch.zeros_like(like)
    point.diagonal().fill_(-1.0)
    return point


def _stock_bases(folder: Path, safetensors: bool) -> list[torch.Tensor]:
    if not safetensors:
        return _saved_bases(folder)
    from safetensors.torch import load_file

    return [t for k, t in load_file(str(folder / "adapter.safetensors")).items() if k.endswith(BASE)]


def test_stock_checkpoint_of_a_model_with_patched_units_keeps_training(stock: None, tmp_path: Path) -> None:
    _train(_with_adapter()).save_adapter(str(tmp_path), "reft")
    with patched_adapters():
        loaded = _load(tmp_path)
        before = _logits(loaded)
        _train(loaded)
        after = _logits(loaded)
    assert torch.isfinite(after).all() and not torch.equal(before, after)
    assert all(_orthonormality_error(w) < 1e-5 for w in _projection_weights(loaded))


# -- patched checkpoints -------------------------------------------------------------------------------------
def test_patched_saves_compact_bases(patched: None, tmp_path: Path) -> None:
    model = _train(_with_adapter())
    expected = _logits(model)
    model.save_adapter(str(tmp_path), "reft")
    bases = _saved_bases(tmp_path)
    assert len(bases) == 4 and all(b.shape == (HIDDEN, 2) for b in bases)
    torch.testing.assert_close(_logits(_load(tmp_path)), expected, atol=0, rtol=0)


def _adapter_file_bytes(tmp_path: Path, name: str) -> int:
    import adapters

    model = tiny_llama(layers=1, hidden=1024, intermediate=256)
    model.add_adapter("reft", config=adapters.LoReftConfig(r=1))  # 2 units (prefix, suffix) per layer
    model.save_adapter(str(tmp_path / name), "reft")
    return (tmp_path / name / "pytorch_adapter.bin").stat().st_size


# One hidden-1024 layer, r = 1: two units of (learned_source 1024 + 1, original 1024, base 1024) floats are
# 24 KiB plus the pickle's overhead; stock's two dense 1024 × 1024 bases alone are 8 MiB.
SIZE_BOUND = 64 * 1024


def test_hidden_1024_checkpoint_is_o_n_r(stock: None, tmp_path: Path) -> None:
    with patched_adapters():
        compact = _adapter_file_bytes(tmp_path, "compact")
    stock_bytes = _adapter_file_bytes(tmp_path, "stock")
    assert compact < SIZE_BOUND
    assert stock_bytes > 10 * SIZE_BOUND
    assert stock_bytes > 100 * compact


@pytest.mark.parametrize("safetensors", [False, True], ids=["bin", "safetensors"])
def test_stock_adapters_refuse_a_compact_checkpoint(stock: None, tmp_path: Path, safetensors: bool) -> None:
    with patched_adapters():
        _train(_with_adapter()).save_adapter(str(tmp_path), "reft", use_safetensors=safetensors)
    model = tiny_llama()
    with pytest.raises(RuntimeError, match=r"size mismatch.*parametrizations\.weight\.0\.base"):
        model.load_adapter(str(tmp_path), load_as="reft", use_safetensors=safetensors)


# -- average_adapter -----------------------------------------------------------------------------------------
def _two_adapters(related: bool) -> nn.Module:
    """Adapters ``a`` and ``b`` trained differently; ``related``: ``b`` starts as a copy of ``a``."""
    model = tiny_llama()
    for name in ("a", "b"):
        model.add_adapter(name, config=_config())
    if related:
        state = {
            k.replace(".refts.a.", ".refts.b."): v.clone() for k, v in model.state_dict().items() if ".refts.a." in k
        }
        model.load_state_dict(state, strict=False)
    _train(model, "a", seed=1)
    _train(model, "b", seed=2)
    return model


def _average(model: nn.Module) -> nn.Module:
    model.average_adapter("avg", ["a", "b"])
    model.set_active_adapters("avg")
    return model.eval()


def test_average_of_related_patched_adapters_is_orthogonal(patched: None) -> None:
    """Adapters that share their compact bases' sign diagonals average (tensor by tensor) to valid reflectors."""
    model = _average(_two_adapters(related=True))
    assert torch.isfinite(_logits(model)).all()
    errors = [_orthonormality_error(w) for w in _projection_weights(model, "avg")]
    assert max(errors) < 1e-5


def test_average_of_one_adapter_is_that_adapter(patched: None) -> None:
    model = _two_adapters(related=False)
    model.average_adapter("avg", ["a"])
    for got, expected in zip(_projection_weights(model, "avg"), _projection_weights(model, "a"), strict=True):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_stock_average_is_not_orthogonal(stock: None) -> None:
    """Stock semantics: linear averages of ``original`` and of the dense bases; the result leaves the manifold."""
    model = _average(_two_adapters(related=False))
    assert torch.isfinite(_logits(model)).all()
    assert min(_orthonormality_error(w) for w in _projection_weights(model, "avg")) > 1e-2


def test_average_of_independent_patched_adapters_is_linear_and_orthogonal(patched: None) -> None:
    """Parameters are averaged linearly exactly as stock does (AdapterHub's own average test checks that);
    the averaged compact base stays orthogonal because its ±1 signs are read as signs (an average of -1 and
    +1 is not a zero column), so the averaged projection has orthonormal rows."""
    model = _two_adapters(related=False)
    expected = {
        k.replace(".refts.a.", ".refts.avg."): 0.5 * v + 0.5 * dict(model.named_parameters())[k.replace(".a.", ".b.")]
        for k, v in model.named_parameters()
        if ".refts.a." in k
    }
    model = _average(model)
    params = {k: v for k, v in model.named_parameters() if ".refts.avg." in k}
    assert params.keys() == expected.keys()
    for k, v in params.items():
        torch.testing.assert_close(v, expected[k], atol=1e-6, rtol=0, msg=k)
    assert torch.isfinite(_logits(model)).all()
    assert max(_orthonormality_error(w) for w in _projection_weights(model, "avg")) < 1e-5


# -- patch(model) on stock units -----------------------------------------------------------------------------
def test_patch_model_keeps_stock_units_bit_for_bit_then_runs_bf16(stock: None) -> None:
    model = _train(_with_adapter())
    expected = _logits(model)
    weights = _projection_weights(model)
    tensors = {k: v.clone() for k, v in model.state_dict().items() if ".refts." in k}
    try:
        adapters_reft.patch(model)
        units = [u for layer in model.model.layers for u in layer.reft_layer.refts["reft"].units]
        assert all(isinstance(u, adapters_reft.ReftUnit) for u in units)
        assert all(isinstance(p[0], DtypeSafeOrthogonal) for p in _parametrizations(model))
        state = {k: v for k, v in model.state_dict().items() if ".refts." in k}
        assert state.keys() == tensors.keys() and all(torch.equal(state[k], v) for k, v in tensors.items())
        assert all(torch.equal(a, b) for a, b in zip(_projection_weights(model), weights, strict=True))
        assert torch.equal(_logits(model), expected)

        model.to(torch.bfloat16)
        with torch.no_grad():
            hidden = model(_inputs(), output_hidden_states=True).hidden_states[-1]  # logits may be upcast
        logits = _logits(model)
        assert hidden.dtype == torch.bfloat16 and torch.isfinite(logits).all()
        torch.testing.assert_close(logits.float(), expected, atol=0.1, rtol=0.05)
        _train(model, steps=1, lr=0.01)  # and trains in bf16
        assert torch.isfinite(_logits(model)).all()
    finally:
        adapters_reft.unpatch()
