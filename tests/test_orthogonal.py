"""Properties of adapters_reft.orthogonal over dtype × map × shape × policy × layout."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrizations

from adapters_reft import compat, orthogonal
from adapters_reft.orthogonal import _map, _weight
from conftest import CallCounter

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
MAPS = list(compat.MAPS)
# (rows, cols) of the weight: wide (ReFT's r × n), tall, square
SHAPES = [(1, 8), (3, 12), (2, 5), (9, 3), (6, 6), (4, 4)]


def _layer(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    layer = nn.Module()
    layer.weight = nn.Parameter(torch.randn(*shape, dtype=torch.float64).to(dtype))
    return layer


def _gram_error(w: torch.Tensor) -> float:
    w = w.to(torch.float64)
    small = w @ w.mT if w.size(-2) <= w.size(-1) else w.mT @ w
    eye = torch.eye(small.size(-1), dtype=torch.float64)
    return (small - eye).abs().max().item()


cases = st.tuples(
    st.sampled_from(DTYPES),
    st.sampled_from(MAPS),
    st.sampled_from(SHAPES),
    st.sampled_from(["auto", "always"]),
    st.booleans(),
    st.integers(0, 2**16),
)


def _tolerance(dtype: torch.dtype, n: int) -> float:
    """Rounding of the final cast to ``dtype`` (the map itself is computed in float32 or float64)."""
    return 2 * torch.finfo(dtype).eps * max(1.0, n**0.5) + (1e-5 if dtype != torch.float64 else 1e-12)


@given(cases)
def test_weight_is_orthonormal_in_its_dtype(case: tuple) -> None:
    dtype, orthogonal_map, shape, policy, compact, seed = case
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(compat.ENV_VAR, policy)
        layer = orthogonal(_layer(shape, dtype, seed), orthogonal_map=orthogonal_map, compact=compact)
        w = layer.weight
    assert w.dtype == dtype and w.shape == torch.Size(shape)
    assert layer.parametrizations.weight.original.dtype == dtype
    assert layer.parametrizations.weight[0].base.dtype == dtype
    assert _gram_error(w) <= _tolerance(dtype, max(shape))


@given(cases)
def test_fp32_compute_is_orthonormal_before_the_final_cast(case: tuple) -> None:
    """With an upcast, the float32 result is orthonormal to 1e-5 although the stored tensors are half."""
    dtype, orthogonal_map, shape, _, compact, seed = case
    # A dense n×n base (compact=False, or any square weight, as in torch) stored in half precision is itself
    # only half-precision orthogonal; the compact base is exactly orthogonal whatever its storage.
    assume(dtype not in (torch.float16, torch.bfloat16) or (compact and shape[0] != shape[1]))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(compat.ENV_VAR, "always")
        layer = orthogonal(_layer(shape, dtype, seed), orthogonal_map=orthogonal_map, compact=compact)
        p = layer.parametrizations.weight
        with torch.no_grad():
            p.original.add_(0.1 * torch.randn(shape, dtype=torch.float64).to(dtype).tril(-1))
        w32 = _weight(p.original, p[0].base, orthogonal_map, torch.promote_types(dtype, torch.float32))
    assert _gram_error(w32) <= 1e-5


@given(cases)
def test_agrees_with_float64_reference(case: tuple) -> None:
    dtype, orthogonal_map, shape, policy, compact, seed = case
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(compat.ENV_VAR, policy)
        layer = orthogonal(_layer(shape, dtype, seed), orthogonal_map=orthogonal_map, compact=compact)
        p = layer.parametrizations.weight
        # move the original away from the identity point so the map really does something
        with torch.no_grad():
            p.original.add_(0.1 * torch.randn(shape, dtype=torch.float64).to(dtype))
        w = layer.weight
        reference = _weight(p.original.to(torch.float64), p[0].base.to(torch.float64), orthogonal_map, torch.float64)
    assert (w.to(torch.float64) - reference).abs().max().item() <= _tolerance(dtype, max(shape))
    assert _gram_error(w) <= _tolerance(dtype, max(shape))


@given(cases)
def test_gradients_reach_the_stored_parameter_in_its_dtype(case: tuple) -> None:
    dtype, orthogonal_map, shape, policy, compact, seed = case
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(compat.ENV_VAR, policy)
        layer = orthogonal(_layer(shape, dtype, seed), orthogonal_map=orthogonal_map, compact=compact)
        target = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
        (layer.weight * target).sum().backward()
    grad = layer.parametrizations.weight.original.grad
    assert grad is not None and grad.dtype == dtype and grad.shape == torch.Size(shape)
    assert torch.isfinite(grad).all()
    assert grad.abs().sum() > 0


@given(cases)
def test_right_inverse_round_trip(case: tuple) -> None:
    """Assigning an orthonormal weight gives back that weight; a non-orthogonal one gets orthonormalized."""
    dtype, orthogonal_map, shape, policy, compact, seed = case
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(compat.ENV_VAR, policy)
        layer = orthogonal(_layer(shape, dtype, seed), orthogonal_map=orthogonal_map, compact=compact)
        q = torch.linalg.qr(torch.randn(max(shape), min(shape), dtype=torch.float64))[0]
        q = (q if shape[0] >= shape[1] else q.mT).to(dtype)
        with torch.no_grad():
            layer.weight = q
        w = layer.weight
    assert w.dtype == dtype
    expected = q.to(torch.float64)
    assert (w.to(torch.float64) - expected).abs().max().item() <= _tolerance(dtype, max(shape))


@pytest.mark.parametrize("orthogonal_map", MAPS)
@pytest.mark.parametrize("shape", [(3, 7), (7, 3), (5, 5), (2, 3, 6)], ids=str)
def test_float32_equals_torch_in_dense_layout(orthogonal_map: str, shape: tuple[int, ...]) -> None:
    """compact=False reproduces torch's parametrization exactly: same weight, same state-dict layout."""
    torch.manual_seed(0)
    ours = orthogonal(nn.Linear(shape[-1], shape[-2]), orthogonal_map=orthogonal_map, compact=False)
    torch.manual_seed(0)
    ref = parametrizations.orthogonal(nn.Linear(shape[-1], shape[-2]), orthogonal_map=orthogonal_map)
    if len(shape) == 3:  # batched matrices
        torch.manual_seed(0)
        ours = orthogonal(_batched(shape), orthogonal_map=orthogonal_map, compact=False)
        torch.manual_seed(0)
        ref = parametrizations.orthogonal(_batched(shape), orthogonal_map=orthogonal_map)
    assert torch.equal(ours.weight, ref.weight)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}


def _batched(shape: tuple[int, ...]) -> nn.Module:
    m = nn.Module()
    m.weight = nn.Parameter(torch.randn(*shape))
    return m


@pytest.mark.parametrize("shape", [(1, 16), (3, 16), (16, 3)], ids=str)
def test_compact_matches_torch_initial_weight_and_rng_stream(shape: tuple[int, int]) -> None:
    torch.manual_seed(3)
    ours = orthogonal(nn.Linear(shape[1], shape[0], bias=False))
    after_ours = torch.rand(3)
    torch.manual_seed(3)
    ref = parametrizations.orthogonal(nn.Linear(shape[1], shape[0], bias=False))
    after_ref = torch.rand(3)
    assert torch.allclose(ours.weight, ref.weight, atol=1e-6)
    assert torch.equal(after_ours, after_ref)
    n, k = max(shape), min(shape)
    assert ours.parametrizations.weight[0].base.shape == (n, k)
    assert ref.parametrizations.weight[0].base.shape == (n, n)


def test_compact_base_stays_orthogonal_when_stored_in_bf16() -> None:
    torch.manual_seed(0)
    layer = orthogonal(nn.Linear(256, 4, bias=False)).to(torch.bfloat16)
    p = layer.parametrizations.weight
    with torch.no_grad():
        p.original.add_(0.05 * torch.randn_like(p.original))
    assert _gram_error(_weight(p.original, p[0].base, "householder", torch.float32)) <= 1e-5


def test_without_trivialization() -> None:
    layer = orthogonal(nn.Linear(6, 3, bias=False).to(torch.bfloat16), use_trivialization=False)
    assert not hasattr(layer.parametrizations.weight[0], "base")
    assert _gram_error(layer.weight) <= _tolerance(torch.bfloat16, 6)
    cayley = orthogonal(nn.Linear(6, 3), orthogonal_map="cayley", use_trivialization=False)
    assert _gram_error(cayley.weight) <= 1e-5
    with pytest.raises(NotImplementedError, match="use_trivialization=False"), torch.no_grad():
        cayley.weight = torch.randn(3, 6)


def test_never_policy_surfaces_the_torch_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(compat.ENV_VAR, "never")
    with pytest.raises((RuntimeError, NotImplementedError), match="not implemented for 'BFloat16'"):
        orthogonal(nn.Linear(6, 3, bias=False).to(torch.bfloat16)).weight  # noqa: B018


@pytest.mark.parametrize(
    ("module", "kwargs", "error", "match"),
    [
        (nn.Linear(4, 2), {"name": "nope"}, ValueError, "no parameter or buffer with name 'nope'"),
        (nn.LayerNorm(4), {}, ValueError, "Got a tensor of 1 dimensions"),
        (nn.Linear(4, 2), {"orthogonal_map": "qr"}, ValueError, "householder, matrix_exp, cayley; got 'qr'"),
    ],
)
def test_bad_input_is_named(module: nn.Module, kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        orthogonal(module, **kwargs)


def test_assigning_a_wrong_shape_names_both_shapes() -> None:
    layer = orthogonal(nn.Linear(6, 2))
    with pytest.raises(ValueError, match=r"shape \(2, 6\); got \(6, 2\)"):
        with torch.no_grad():
            layer.weight = torch.randn(6, 2)


def test_map_matches_torch_private_map_in_float64() -> None:
    from torch.nn.utils.parametrizations import _OrthMaps, _Orthogonal

    x = torch.randn(7, 3, dtype=torch.float64)
    x.diagonal().copy_(torch.tensor([-1.0, 1.0, -1.0]))  # torch's householder keeps ±1 on the diagonal
    for name in MAPS:
        ref = _Orthogonal(x, getattr(_OrthMaps, name), use_trivialization=False)
        assert torch.allclose(_map(x, name), ref(x), atol=1e-12)


def test_adamw_weight_decay_keeps_the_weight_orthonormal() -> None:
    """torch's householder map reads the ±1 diagonal with .int(): AdamW's decay turns -1 into -0.99999,
    .int() makes that 0 and the weight collapses to zero. Ours reads the sign and stays orthonormal."""

    def train(layer: nn.Module) -> torch.Tensor:
        opt = torch.optim.AdamW(layer.parameters(), lr=1e-3, weight_decay=0.01)
        for _ in range(2):
            layer.weight.sum().backward()
            opt.step()
            opt.zero_grad()
        return layer.weight.detach()

    torch.manual_seed(0)
    stock = train(parametrizations.orthogonal(nn.Linear(8, 2, bias=False)))
    torch.manual_seed(0)
    ours = train(orthogonal(nn.Linear(8, 2, bias=False)))
    assert torch.count_nonzero(stock) == 0  # the torch bug this guards against
    assert _gram_error(ours) <= 1e-5


@pytest.mark.parametrize("shape", [(3, 4), (4, 4), (17,), (64, 63), (2, 33, 31)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_rng_advance_matches_randn(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """The compact base skips torch's n × (n - k) filler but must consume the same random numbers."""
    from adapters_reft.orthogonal import _advance_rng_like_randn

    torch.manual_seed(11)
    torch.randn(shape, dtype=dtype)
    expected = torch.rand(5)
    torch.manual_seed(11)
    _advance_rng_like_randn(shape, dtype, torch.device("cpu"))
    assert torch.equal(torch.rand(5), expected)


def test_deepcopy_hooks_the_copy() -> None:
    """Loading a dense (torch-layout) state dict into a deep copy converts the copy and leaves the original."""
    torch.manual_seed(0)
    layer = orthogonal(nn.Linear(8, 2, bias=False))
    clone = copy.deepcopy(layer)
    torch.manual_seed(1)
    dense = parametrizations.orthogonal(nn.Linear(8, 2, bias=False))
    clone.load_state_dict(dense.state_dict())
    assert clone.parametrizations.weight[0].base.shape == (8, 2)  # converted to the compact layout
    assert torch.allclose(clone.weight, dense.weight, atol=1e-6)
    assert not torch.allclose(layer.weight, dense.weight, atol=1e-3)  # the original is untouched


@pytest.mark.parametrize(("n", "k", "batch"), [(7, 1, ()), (9, 2, ()), (12, 3, (2,)), (40, 5, ())])
def test_householder_backward_matches_torch(n: int, k: int, batch: tuple[int, ...]) -> None:
    """The O(n·k²) backward gives torch's O(n²·k) gradients (float64), and its forward is torch's bit for bit."""
    from adapters_reft.orthogonal import _HouseholderProduct

    torch.manual_seed(n)
    lower = torch.randn(*batch, n, k, dtype=torch.float64).tril(-1).requires_grad_()
    tau = (2 / (1 + (lower.detach() ** 2).sum(-2))).requires_grad_()
    grad = torch.randn(*batch, n, k, dtype=torch.float64)
    ours, reference = _HouseholderProduct.apply(lower, tau), torch.linalg.householder_product(lower, tau)
    assert torch.equal(ours, reference)
    for mine, theirs in zip(
        torch.autograd.grad(ours, (lower, tau), grad), torch.autograd.grad(reference, (lower, tau), grad), strict=True
    ):
        torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(_HouseholderProduct.apply, (lower, tau))


def test_householder_backward_is_used_only_with_grad_and_few_reflectors(monkeypatch: pytest.MonkeyPatch) -> None:
    module = importlib.import_module("adapters_reft.orthogonal")  # the package exports a function of that name
    counter = CallCounter(monkeypatch, module._HouseholderProduct, "apply")
    x = torch.randn(16, 2, requires_grad=True)
    _map(x, "householder").sum().backward()
    assert counter.calls == 1 and x.grad is not None and x.grad.abs().sum() > 0
    with torch.no_grad():
        _map(x, "householder")
    _map(torch.randn(6, 3, requires_grad=True), "householder")  # n < 4k: torch's own backward
    assert counter.calls == 1
