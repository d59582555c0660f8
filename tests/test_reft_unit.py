"""The patched ReftUnit against stock: constructor layouts, float32 parity, dtype handling, one weight per forward."""

from __future__ import annotations

import inspect

import adapters.methods.reft as stock_reft
import pytest
import torch

import adapters_reft
import adapters_reft.orthogonal
from adapters_reft.reft import ReftUnit, unit_class_for

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _stock_unit_class() -> type:
    adapters_reft.unpatch()
    return stock_reft.ReftUnit


def _args(stock_class: type, **values: object) -> list[object]:
    names = [p for p in inspect.signature(stock_class.__init__).parameters if p != "self"]
    defaults = {"orthogonal": True, "subtract_projection": True, "non_linearity": None, "dropout": 0.0}
    defaults.update(values)
    return [defaults.get(n) for n in names]


@pytest.mark.parametrize("orthogonal", [True, False])
def test_float32_matches_stock_weights_outputs_and_rng(orthogonal: bool) -> None:
    stock_class = _stock_unit_class()
    args = _args(stock_class, in_dim=32, r_dim=2, orthogonal=orthogonal, non_linearity="tanh")
    torch.manual_seed(0)
    stock = stock_class(*args)
    stock_next = torch.rand(4)
    torch.manual_seed(0)
    ours = unit_class_for(stock_class)(*args)
    ours_next = torch.rand(4)
    assert torch.equal(stock_next, ours_next), "the RNG stream must be where stock leaves it"
    assert torch.equal(ours.learned_source.weight, stock.learned_source.weight)
    assert torch.allclose(ours.projection.weight, stock.projection.weight, atol=1e-6)
    x = torch.randn(3, 5, 32)
    assert torch.allclose(ours(x), stock(x), atol=1e-6)
    assert {k for k in ours.state_dict()} == {k for k in stock.state_dict()}


def test_dense_layout_is_bit_identical_to_stock_in_float32() -> None:
    stock_class = _stock_unit_class()
    args = _args(stock_class, in_dim=16, r_dim=3)
    torch.manual_seed(1)
    stock = stock_class(*args)
    torch.manual_seed(1)
    ours = unit_class_for(stock_class, compact=False)(*args)
    x = torch.randn(2, 4, 16)
    assert torch.equal(ours.projection.weight, stock.projection.weight)
    assert torch.equal(ours(x), stock(x))
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in stock.state_dict().items()}


def test_first_sgd_step_matches_stock_in_float32() -> None:
    """The compact base spans the same complement as stock's dense one, so an SGD step moves the weight
    identically to first order (exactly, up to float32 rounding, for this small step)."""
    stock_class = _stock_unit_class()
    args = _args(stock_class, in_dim=24, r_dim=2)
    x = torch.randn(4, 3, 24)
    weights = []
    for cls in (stock_class, unit_class_for(stock_class)):
        torch.manual_seed(2)
        unit = cls(*args)
        opt = torch.optim.SGD(unit.parameters(), lr=1e-3)
        unit(x).square().mean().backward()
        opt.step()
        weights.append(unit.projection.weight.detach())
    assert torch.allclose(weights[0], weights[1], atol=1e-6)


@pytest.mark.parametrize(
    ("release", "names"),
    [
        ("1.0.x", ("in_dim", "r_dim", "orthogonal", "subtract_projection", "non_linearity", "dropout")),
        ("1.1.x", ("in_dim", "r_dim", "orthogonal", "subtract_projection", "non_linearity", "dropout", "dtype")),
        (
            "1.2+",
            (
                "in_dim",
                "r_dim",
                "orthogonal",
                "subtract_projection",
                "non_linearity",
                "dropout",
                "init_weights_seed",
                "dtype",
            ),
        ),
    ],
)
def test_positional_layout_follows_the_release(release: str, names: tuple[str, ...]) -> None:
    fake = type("StockReftUnit", (), {"__init__": _fake_init(names)})
    cls = unit_class_for(fake)
    values = {"in_dim": 8, "r_dim": 2, "orthogonal": True, "subtract_projection": False, "dropout": 0.0}
    values.update({"dtype": torch.bfloat16, "init_weights_seed": 7, "non_linearity": "relu"})
    unit = cls(*[values[n] for n in names])
    expected_dtype = torch.bfloat16 if "dtype" in names else torch.float32
    assert unit.learned_source.weight.dtype == expected_dtype
    assert unit.subtract_projection is False
    assert type(unit.non_linearity.f).__name__.lower().startswith("relu")
    if "init_weights_seed" in names:  # the seed resets the generator: two units are identical
        again = cls(*[values[n] for n in names])
        assert torch.equal(unit.learned_source.weight, again.learned_source.weight)


def _fake_init(names: tuple[str, ...]):
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    params += [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names]

    def __init__(self, *args, **kwargs):
        pass

    __init__.__signature__ = inspect.Signature(params)
    return __init__


def test_unknown_constructor_argument_is_refused() -> None:
    fake = type("StockReftUnit", (), {"__init__": _fake_init(("in_dim", "r_dim", "rank_dropout"))})
    with pytest.raises(TypeError, match=r"does not know: \['rank_dropout'\]"):
        unit_class_for(fake)


def test_too_many_and_duplicate_arguments() -> None:
    cls = unit_class_for(_stock_unit_class())
    count = len(cls.stock_arguments)
    with pytest.raises(TypeError, match=f"at most {count} positional"):
        cls(*range(count + 1))
    with pytest.raises(TypeError, match=r"multiple values for \['r_dim'\]"):
        cls(8, 2, r_dim=2)


@pytest.mark.parametrize("activation_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("param_dtype", DTYPES, ids=str)
def test_returns_the_input_dtype_and_computes_in_the_wider_one(
    activation_dtype: torch.dtype, param_dtype: torch.dtype
) -> None:
    torch.manual_seed(0)
    unit = ReftUnit(16, 2, orthogonal=True, dtype=param_dtype)
    x = torch.randn(2, 3, 16, dtype=torch.float64)
    out = unit(x.to(activation_dtype))
    assert out.dtype == activation_dtype
    reference = ReftUnit(16, 2, orthogonal=True, dtype=torch.float64)
    reference.load_state_dict({k: v.to(torch.float64) for k, v in unit.state_dict().items()})
    expected = reference(x.to(activation_dtype).to(torch.float64))
    # rounding of: the weight to its storage dtype, the computation, the result to the activation dtype
    compute = torch.promote_types(activation_dtype, param_dtype)
    eps = sum(torch.finfo(d).eps for d in (param_dtype, compute, activation_dtype))
    tolerance = 16 * eps * x.abs().max().item()
    assert (out.to(torch.float64) - expected).abs().max().item() <= tolerance


def test_fp32_adapter_in_bf16_activations_is_more_precise_than_bf16_adapter() -> None:
    torch.manual_seed(0)
    fp32 = ReftUnit(64, 4, orthogonal=True)
    bf16 = ReftUnit(64, 4, orthogonal=True)
    bf16.load_state_dict(fp32.state_dict())
    bf16.to(torch.bfloat16)
    x = torch.randn(4, 3, 64).to(torch.bfloat16)
    exact = fp32.double()(x.double())
    fp32.float()
    err32 = (fp32(x).double() - exact).abs().max()
    err16 = (bf16(x).double() - exact).abs().max()
    assert err32 <= err16


def test_follows_autocast() -> None:
    torch.manual_seed(0)
    unit = ReftUnit(16, 2, orthogonal=True)
    x = torch.randn(2, 3, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = unit(x)
        source = unit.learned_source(x)
    assert out.dtype == torch.float32  # the input's dtype
    assert source.dtype == torch.bfloat16  # autocast did run the linear layers in bf16
    assert torch.allclose(out, unit(x), atol=5e-2)


def test_projection_weight_is_computed_once_per_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    module = __import__("sys").modules["adapters_reft.orthogonal"]
    real = module._map
    monkeypatch.setattr(module, "_map", lambda *a: calls.append(1) or real(*a))
    unit = ReftUnit(16, 2, orthogonal=True)
    calls.clear()
    unit(torch.randn(2, 3, 16)).sum().backward()
    assert len(calls) == 1


def test_empty_slice_without_grad_is_returned_unchanged_with_grad_gets_zero_grads() -> None:
    unit = ReftUnit(16, 2, orthogonal=True)
    empty = torch.randn(2, 0, 16)
    with torch.no_grad():
        assert unit(empty) is empty
    unit(empty.requires_grad_(True)).sum().backward()
    grads = [p.grad for p in unit.parameters()]
    assert all(g is not None and torch.count_nonzero(g) == 0 for g in grads)
