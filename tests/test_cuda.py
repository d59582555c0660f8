"""The precision setups of the design on a CUDA device (every test is marked ``cuda``; skipped without a GPU).

These mirror :mod:`adapters_reft.scenarios` and ``tests/test_integration.py`` (which run on the CPU) with the
model, the adapter and the inputs on ``cuda``, plus the reported bug itself: stock adapters raises
``"orgqr_cuda" not implemented for 'BFloat16'`` after ``model.to(torch.bfloat16)``.

Run on a GPU machine with ``tools/run_cuda_tests.sh``. ``ADAPTERS_REFT_TEST_DEVICE=cpu`` runs the very same
checks on the CPU (a dry run of this file's logic where no GPU exists; the ``cuda`` mark is then not applied).
"""

from __future__ import annotations

import dataclasses
import os
import re

import adapters
import pytest
import torch
from torch import nn

import adapters_reft
from adapters_reft import compat
from adapters_reft.scenarios import VOCAB, tiny_llama

DEVICE = torch.device(os.environ.get("ADAPTERS_REFT_TEST_DEVICE", "cuda"))
DEVICE_TYPE = DEVICE.type

pytestmark = [pytest.mark.cuda] if DEVICE_TYPE == "cuda" else []

HALF = {"bfloat16": torch.bfloat16, "float16": torch.float16}
# half-precision storage rounds every entry of R (and of a dense base): R Rᵀ = I up to a few units in the last
# place; 8 eps leaves room for a future native half kernel (a broken R, e.g. a zeroed column, is off by 1)
ORTHONORMAL_ATOL = {dtype: 8 * torch.finfo(dtype).eps for dtype in (torch.bfloat16, torch.float16)}
ORTHONORMAL_ATOL[torch.float32] = 1e-5


# -- helpers (the device-aware twins of adapters_reft.scenarios) ---------------------------------------------------
def _model(dtype: torch.dtype) -> nn.Module:
    """Tiny Llama on the device in eval mode (a model built from a config starts in train mode, and the ReFT
    dropout of 0.05 would make every comparison random); training tests call train_adapter, which trains."""
    return tiny_llama(dtype).to(DEVICE).eval()


def _reft(model: nn.Module, config: object, name: str = "reft") -> nn.Module:
    """Add and activate an adapter; add_adapter builds it on the default device, so move it (dtype unchanged)."""
    model.add_adapter(name, config=config)
    model.set_active_adapters(name)
    model.adapter_to(name, device=DEVICE)
    return model


def _inputs(batch: int = 2, length: int = 8) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(1)).to(DEVICE)


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(_inputs()).logits


def _units(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, adapters_reft.ReftUnit)]


def _orthonormality_error(model: nn.Module) -> float:
    worst = 0.0
    for unit in _units(model):
        if unit.orthogonal:
            r = unit.projection.weight.detach().double()
            worst = max(
                worst, (r @ r.T - torch.eye(r.size(0), dtype=torch.float64, device=r.device)).abs().max().item()
            )
    return worst


def _assert_forward(model: nn.Module, dtype: torch.dtype, adapter_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Hidden states (the ReFT outputs) in the model's dtype, finite logits on the device; the ReFT units are
    the patched ones, on the device, in ``adapter_dtype``; and the adapter really changes the output."""
    with torch.no_grad():
        out = model(_inputs(), output_hidden_states=True)
    logits = out.logits
    assert all(h.dtype == dtype for h in out.hidden_states)
    assert logits.dtype in (dtype, torch.float32)  # transformers < 4.45 upcasts Llama logits to fp32
    assert logits.device.type == DEVICE_TYPE
    assert torch.isfinite(logits).all()
    units = _units(model)
    assert len(units) == 4  # 2 layers x (prefix unit, suffix unit)
    for unit in units:
        for tensor in [*unit.parameters(), *unit.buffers()]:
            assert tensor.device.type == DEVICE_TYPE
            assert tensor.dtype == (adapter_dtype or dtype)
    if any(unit.orthogonal for unit in units):
        assert _orthonormality_error(model) < ORTHONORMAL_ATOL[adapter_dtype or dtype]
    model.set_active_adapters(None)
    try:
        without = _logits(model)
    finally:
        model.set_active_adapters("reft")
    assert not torch.equal(without, logits), "the adapter had no effect: the test would prove nothing"
    return logits


def _config(cls: type, **kwargs: object) -> object:
    """A ReFT config; skips the test where this adapters release has no ``dtype`` field (adapters 1.0)."""
    if kwargs.get("dtype") is None:
        kwargs.pop("dtype", None)
    elif "dtype" not in {f.name for f in dataclasses.fields(cls)}:
        pytest.skip(f"adapters {adapters.__version__} ReFT configs have no dtype field (added in 1.1)")
    return cls(**kwargs)


def _lo(**kwargs: object) -> object:
    return _config(adapters.LoReftConfig, **kwargs)


# -- the precision setups --------------------------------------------------------------------------------------------
@pytest.mark.usefixtures("patched")
def test_bf16_model_default_config() -> None:
    """bf16 model, LoReftConfig(): the adapter stays in the default dtype (fp32) and computes in fp32."""
    model = _reft(_model(torch.bfloat16), _lo())
    _assert_forward(model, torch.bfloat16, adapter_dtype=torch.float32)


@pytest.mark.usefixtures("patched")
@pytest.mark.parametrize("dtype_name", list(HALF))
def test_half_model_config_dtype(dtype_name: str) -> None:
    dtype = HALF[dtype_name]
    model = _reft(_model(dtype), _lo(dtype=dtype_name))
    _assert_forward(model, dtype)


@pytest.mark.usefixtures("patched")
@pytest.mark.parametrize("cast", ["to_bfloat16", "half"])
def test_fp32_model_then_cast(cast: str) -> None:
    """fp32 model + adapter, then model.to(torch.bfloat16) / model.half(): the reported bug's setup."""
    model = _reft(_model(torch.float32), _lo())
    fp32_logits = _logits(model)
    model = model.to(torch.bfloat16) if cast == "to_bfloat16" else model.half()
    dtype = torch.bfloat16 if cast == "to_bfloat16" else torch.float16
    logits = _assert_forward(model, dtype)
    # the cast model computes what the fp32 model computed, up to half-precision rounding (logits are ~0.7;
    # on CPU the differences are 3e-3 for bf16 and 6e-4 for fp16)
    assert (logits.float() - fp32_logits).abs().max() < (0.05 if dtype == torch.bfloat16 else 0.01)


@pytest.mark.usefixtures("patched")
def test_bf16_model_fp32_adapter() -> None:
    model = _reft(_model(torch.bfloat16), _lo(dtype="bfloat16"))
    model.adapter_to("reft", dtype=torch.float32)
    _assert_forward(model, torch.bfloat16, adapter_dtype=torch.float32)


@pytest.mark.usefixtures("patched")
@pytest.mark.parametrize("dtype_name", ["bfloat16", None], ids=["config-bf16", "config-default"])
def test_adapter_built_directly_on_the_device(dtype_name: str | None) -> None:
    """Adapter created on the device (default device set): the right inverse's QR runs there too."""
    model = _model(torch.bfloat16)
    with DEVICE:
        model.add_adapter("reft", config=_lo(dtype=dtype_name))
    model.set_active_adapters("reft")
    _assert_forward(model, torch.bfloat16, adapter_dtype=torch.bfloat16 if dtype_name else torch.float32)


@pytest.mark.usefixtures("patched")
@pytest.mark.parametrize("config", [adapters.NoReftConfig, adapters.DiReftConfig], ids=["noreft", "direft"])
def test_noreft_and_direft_bf16(config: type) -> None:
    model = _reft(_model(torch.bfloat16), _config(config))
    _assert_forward(model, torch.bfloat16, adapter_dtype=torch.float32)
    model = _reft(_model(torch.bfloat16), _config(config, dtype="bfloat16"))
    _assert_forward(model, torch.bfloat16)


@pytest.mark.usefixtures("patched")
def test_fp32_model_under_bf16_autocast() -> None:
    model = _reft(_model(torch.float32), _lo())
    exact = _logits(model)
    with torch.autocast(DEVICE_TYPE, dtype=torch.bfloat16):
        logits = _logits(model)
    assert logits.dtype in (torch.bfloat16, torch.float32)  # the lm_head output is bf16 under autocast
    assert torch.isfinite(logits).all()
    assert (logits.float() - exact).abs().max() < 0.05  # 3e-3 on CPU


@pytest.mark.usefixtures("patched")
@pytest.mark.parametrize("dtype_name", list(HALF))
def test_half_training_steps(dtype_name: str) -> None:
    dtype = HALF[dtype_name]
    model = _reft(_model(dtype), _lo(dtype=dtype_name))
    model.train_adapter("reft")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert len(params) == 12 and all(p.device.type == DEVICE_TYPE and p.dtype == dtype for p in params.values())
    before = {n: p.detach().clone() for n, p in params.items()}
    # fp16 Adam needs an eps fp16 can represent (1e-8 rounds to 0 and 0/0 gives NaN for zero gradients)
    optimizer = torch.optim.AdamW(params.values(), lr=1e-2, eps=1e-4 if dtype == torch.float16 else 1e-8)
    ids = _inputs()
    losses = []
    for _ in range(3):
        loss = model(ids, labels=ids).loss
        loss.backward()
        for name, p in params.items():
            assert p.grad is not None and p.grad.dtype == dtype and torch.isfinite(p.grad).all(), name
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert 3.5 < losses[0] < 6.0
    trained = [n for n in params if ".units.0." in n]  # prefix units; the suffix units see an empty slice
    assert len(trained) == 6
    for name in trained:
        assert not torch.equal(before[name], params[name]), f"{name} did not change"
    assert _orthonormality_error(model) < ORTHONORMAL_ATOL[dtype]


@pytest.mark.usefixtures("patched")
def test_bf16_generate() -> None:
    model = _reft(_model(torch.bfloat16), _lo(dtype="bfloat16")).eval()
    ids = _inputs()
    out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 12)
    assert out.device.type == DEVICE_TYPE
    assert torch.equal(out[:, :8], ids)
    assert int(out.min()) >= 0 and int(out.max()) < VOCAB


@pytest.mark.usefixtures("patched")
def test_bf16_save_load(tmp_path) -> None:
    model = _reft(_model(torch.bfloat16), _lo(dtype="bfloat16")).eval()
    expected = _logits(model)
    model.save_adapter(str(tmp_path), "reft")
    fresh = _model(torch.bfloat16)
    fresh.load_adapter(str(tmp_path), load_as="reft")
    fresh.set_active_adapters("reft")
    fresh.adapter_to("reft", device=DEVICE)
    fresh.eval()
    saved = {n: t for n, t in model.state_dict().items() if "reft_layer" in n}
    loaded = {n: t for n, t in fresh.state_dict().items() if "reft_layer" in n}
    assert saved.keys() == loaded.keys() and len(saved) == 4 * 4  # units x (weight, bias, original, base)
    for name, tensor in saved.items():
        assert loaded[name].dtype == torch.bfloat16 and loaded[name].device.type == DEVICE_TYPE
        assert torch.equal(loaded[name], tensor), name
    got = _assert_forward(fresh, torch.bfloat16)
    torch.testing.assert_close(got, expected)


def test_fp32_patched_equals_stock() -> None:
    """In fp32 the patch changes nothing: same weights for the same seed, same logits."""
    adapters_reft.unpatch()
    torch.manual_seed(5)
    stock_model = _reft(_model(torch.float32), _lo()).eval()
    adapters_reft.patch()
    try:
        torch.manual_seed(5)
        patched_model = _reft(_model(torch.float32), _lo()).eval()
        torch.testing.assert_close(_logits(patched_model), _logits(stock_model), rtol=1e-5, atol=1e-5)
    finally:
        adapters_reft.unpatch()


# -- the reported bug and the probe ----------------------------------------------------------------------------------
def _householder_runs(dtype: torch.dtype) -> bool:
    """Measured directly: torch.linalg.householder_product forward and backward in ``dtype`` on the device."""
    a = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).tril(-1)
    leaf = a.to(device=DEVICE, dtype=dtype).requires_grad_(True)
    tau = torch.full((3,), 0.5, dtype=torch.float64).to(device=DEVICE, dtype=dtype)
    try:
        torch.linalg.householder_product(leaf, tau).sum().backward()
    except (RuntimeError, NotImplementedError):
        return False
    return True


def _qr_runs(dtype: torch.dtype) -> bool:
    try:
        a, tau = torch.geqrf(torch.randn(5, 3, dtype=torch.float64).to(device=DEVICE, dtype=dtype))
        torch.linalg.householder_product(a, tau)
    except (RuntimeError, NotImplementedError):
        return False
    return True


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_native_support_matches_householder_product(dtype: torch.dtype) -> None:
    runs = _householder_runs(dtype)
    assert compat.native_support("householder", dtype, DEVICE_TYPE) == runs
    assert compat.native_support("householder", dtype, DEVICE_TYPE, "inverse") == _qr_runs(dtype)
    if dtype == torch.float32:
        assert runs
    if not runs and compat.upcast_policy() != "never":  # no kernel: the patch computes the map in float32
        assert compat.compute_dtype("householder", dtype, DEVICE_TYPE) == torch.float32


def test_stock_adapters_fail_after_to_bfloat16(stock: None) -> None:
    """The reported bug: fp32 model + LoReFT, model.to(torch.bfloat16), forward -> no bf16 orgqr kernel."""
    if _householder_runs(torch.bfloat16):
        pytest.skip(f"torch {torch.__version__} has a bf16 householder_product on {DEVICE_TYPE}: the bug is gone")
    model = _reft(_model(torch.float32), _lo()).to(torch.bfloat16)
    message = f"\"orgqr_{DEVICE_TYPE}\" not implemented for 'BFloat16'"
    # NotImplementedError since torch 2.3 (a RuntimeError subclass; torch 2.2 raises a plain RuntimeError)
    with pytest.raises(RuntimeError, match=re.escape(message)):
        _logits(model)


def test_patch_fixes_the_same_model_in_place(stock: None) -> None:
    """A model built on stock (so holding stock units) works after adapters_reft.patch(model)."""
    model = _reft(_model(torch.float32), _lo()).to(torch.bfloat16)
    adapters_reft.patch(model)
    try:
        _assert_forward(model, torch.bfloat16)
    finally:
        adapters_reft.unpatch()
