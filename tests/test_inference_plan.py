"""A unit's eval-mode, no-grad inference plan: same result as the regular forward, rebuilt on every change.

The reference is ``unit.intervene(x)``: the regular forward, computed from the parameters as they are now.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn

import adapters_reft
from adapters_reft import inference
from conftest import CallCounter

N, R = 24, 3
FLOATS = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@pytest.fixture
def plans(monkeypatch: pytest.MonkeyPatch) -> CallCounter:
    """Counts the plans built."""
    return CallCounter(monkeypatch, inference.InferencePlan, "__init__")


def _unit(dtype: torch.dtype = torch.float32, **kwargs: object) -> adapters_reft.ReftUnit:
    torch.manual_seed(0)
    kwargs.setdefault("orthogonal", True)
    unit = adapters_reft.ReftUnit(N, R, dtype=dtype, **kwargs).eval()
    with torch.no_grad():  # off the identity point, non-zero source
        for p in unit.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return unit


def _x(dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.randn(2, 3, N, generator=torch.Generator().manual_seed(3)).to(dtype)


def _same_as_regular(unit: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        out, reference = unit(x), unit.intervene(x)
    assert out.dtype == reference.dtype == x.dtype
    assert torch.equal(out, reference)
    return out


def _same_under_one_seed(unit: nn.Module, x: Tensor) -> Tensor:
    """Like ``_same_as_regular`` for a unit whose dropout draws: both calls start from the same seed."""
    with torch.no_grad():
        torch.manual_seed(0)
        out = unit(x)
        torch.manual_seed(0)
        assert torch.equal(out, unit.intervene(x))
    return out


@given(
    unit_dtype=st.sampled_from(FLOATS),
    x_dtype=st.sampled_from(FLOATS),
    orthogonal=st.booleans(),
    non_linearity=st.sampled_from([None, "relu", "tanh"]),
    subtract_projection=st.booleans(),
    dropout=st.sampled_from([0.0, 0.3]),
)
def test_plan_equals_the_regular_forward_bit_for_bit(
    unit_dtype: torch.dtype,
    x_dtype: torch.dtype,
    orthogonal: bool,
    non_linearity: str | None,
    subtract_projection: bool,
    dropout: float,
) -> None:
    unit = _unit(
        unit_dtype,
        orthogonal=orthogonal,
        non_linearity=non_linearity,
        subtract_projection=subtract_projection,
        dropout=dropout,
    )
    x = _x(x_dtype)
    first = _same_as_regular(unit, x)
    assert unit.__dict__["_inference_plan"] is not None
    assert torch.equal(_same_as_regular(unit, x), first)  # second call: the plan is reused


def test_plan_is_built_once_and_reused(plans: CallCounter) -> None:
    unit, x = _unit(), _x()
    for _ in range(3):
        _same_as_regular(unit, x)
    assert plans.calls == 1
    _same_as_regular(unit, x.to(torch.float64))  # another input dtype: another plan
    assert plans.calls == 2


@pytest.mark.parametrize(
    "mode",
    ["train", "grad", "autocast"],
)
def test_no_plan_in_training_with_grad_or_under_autocast(plans: CallCounter, mode: str) -> None:
    unit, x = _unit(), _x()
    if mode == "train":
        unit.train()
        _same_under_one_seed(unit, x)
    elif mode == "grad":
        out = unit(x)
        assert out.requires_grad
        assert torch.equal(out, unit.intervene(x))
    else:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = _same_as_regular(unit, x)
        assert out.dtype == torch.float32
    assert plans.calls == 0


def _change_source_in_place(unit: adapters_reft.ReftUnit) -> None:
    with torch.no_grad():
        unit.learned_source.weight.mul_(1.5)


def _change_bias_in_place(unit: adapters_reft.ReftUnit) -> None:
    with torch.no_grad():
        unit.learned_source.bias.add_(0.5)


def _change_original_in_place(unit: adapters_reft.ReftUnit) -> None:
    with torch.no_grad():
        unit.projection.parametrizations.weight.original.add_(0.2)


def _replace_source_parameter(unit: adapters_reft.ReftUnit) -> None:
    unit.learned_source.weight = nn.Parameter(unit.learned_source.weight.detach() * 2)


def _optimizer_step(unit: adapters_reft.ReftUnit) -> None:
    optimizer = torch.optim.SGD(unit.parameters(), lr=0.5)
    unit.intervene(_x()).square().sum().backward()
    optimizer.step()


def _load_other_state(unit: adapters_reft.ReftUnit) -> None:
    other = _unit()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.3)
    unit.load_state_dict(other.state_dict())


def _to_float64_and_back(unit: adapters_reft.ReftUnit) -> None:
    unit.to(torch.float64)
    with torch.no_grad():
        unit.learned_source.bias.add_(0.5)
    unit.to(torch.float32)


def _no_subtraction(unit: adapters_reft.ReftUnit) -> None:
    unit.subtract_projection = False


def _swap_activation(unit: adapters_reft.ReftUnit) -> None:
    from adapters.methods.modeling import Activation_Function_Class

    unit.non_linearity = Activation_Function_Class("relu")


def _swap_inner_activation(unit: adapters_reft.ReftUnit) -> None:
    unit.non_linearity.f = nn.ReLU()


def _hook_on_activation(unit: adapters_reft.ReftUnit) -> None:
    unit.non_linearity.register_forward_hook(lambda module, args, out: out * 3)


def _hook_on_dropout(unit: adapters_reft.ReftUnit) -> None:
    unit.dropout.register_forward_hook(lambda module, args, out: out + 1)


CHANGES: dict[str, Callable[[adapters_reft.ReftUnit], None]] = {
    "source in place": _change_source_in_place,
    "bias in place": _change_bias_in_place,
    "original in place": _change_original_in_place,
    "parameter replaced": _replace_source_parameter,
    "optimizer step": _optimizer_step,
    "load_state_dict": _load_other_state,
    ".to() and back": _to_float64_and_back,
    "subtract_projection": _no_subtraction,
    "activation swapped": _swap_activation,
    "inner activation swapped": _swap_inner_activation,
    "hook on the activation": _hook_on_activation,
    "hook on the dropout": _hook_on_dropout,
}


@pytest.mark.parametrize("change", list(CHANGES), ids=list(CHANGES))
def test_every_change_reaches_the_output(change: str) -> None:
    unit, x = _unit(), _x()
    before = _same_as_regular(unit, x)
    CHANGES[change](unit)
    unit.eval()
    after = _same_as_regular(unit, x)
    assert not torch.equal(after, before)


def test_dropout_switched_to_training_alone_is_applied() -> None:
    unit, x = _unit(dropout=0.5), _x()
    before = _same_as_regular(unit, x)
    unit.dropout.train()
    assert not torch.equal(_same_under_one_seed(unit, x), before)


def test_clear_cache_after_a_write_through_data() -> None:
    unit, x = _unit(), _x()
    before = _same_as_regular(unit, x)
    unit.projection.parametrizations.weight.original.data.add_(0.2)
    unit.projection.parametrizations.weight[0].clear_cache()
    assert not torch.equal(_same_as_regular(unit, x), before)
