"""The eval-mode, no-grad fast path of a ReFT unit.

Why: while generating, every layer runs its unit on one position. The five tensor operations of the
intervention then cost about as much as the Python around them: reading the projection through torch's parametrize
property (two module calls and the cache checks), promoting dtypes, reading the learned source through
``nn.Module.__getattr__`` and calling an identity activation and an inactive dropout as modules. An
:class:`InferencePlan` does that work once and afterwards only checks, cheaply, that nothing it depends on has
changed: the same stored tensors (identity, version counter, storage pointer), the same submodules, no hooks,
no autocast, no tracing. The operations and their order are the unit's own, so results are bit for bit the
same as the regular forward.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from . import compat
from .orthogonal import DtypeSafeOrthogonal, stamp, unchanged

__all__ = ["InferencePlan", "plan_for"]


def _autocast_enabled(device_type: str) -> bool:
    """Autocast state of a device type on every supported torch (2.2 has no device-type argument)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 takes no device type
        if device_type == "cpu":
            return torch.is_autocast_cpu_enabled()
        return device_type == "cuda" and torch.is_autocast_enabled()


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


@functools.cache
def _activation_class() -> type:
    from adapters.methods.modeling import Activation_Function_Class

    return Activation_Function_Class


def _identity_inside(activation: nn.Module) -> nn.Module | None:
    """The ``nn.Identity`` inside adapters' activation wrapper (LoReFT's ``non_linearity=None``), else None."""
    inner = activation._modules.get("f")
    return inner if type(activation) is _activation_class() and type(inner) is nn.Identity else None


def _orthogonal_parts(projection: nn.Module) -> tuple[nn.Module, DtypeSafeOrthogonal] | None:
    """(parametrization list, our parametrization) when ours is the weight's only parametrization."""
    plists = projection._modules.get("parametrizations")
    plist = None if plists is None else plists._modules.get("weight")
    if plist is None or len(plist) != 1 or not isinstance(plist[0], DtypeSafeOrthogonal):
        return None
    return plist, plist[0]


class InferencePlan:
    """Everything a unit's forward derives from its parameters, for one input dtype, plus what to re-check."""

    def __init__(self, unit: nn.Module, x: Tensor) -> None:
        self.x_dtype = x.dtype
        self.device_type = x.device.type
        source = unit._modules["learned_source"]
        projection = unit._modules["projection"]
        self.modules = (source, projection, unit._modules["non_linearity"], unit._modules["dropout"])
        self.source_stamps = (stamp(source._parameters["weight"]), stamp(source._parameters["bias"]))
        parts = _orthogonal_parts(projection)
        # ``applies`` made sure: a plain weight parameter, or our parametrization alone (reading fills its cache)
        self.weight_source = projection.weight
        if parts is None:
            self.parts = None
            self.weight_stamp = stamp(self.weight_source)
        else:
            plist, parametrization = parts
            self.parts = (projection._modules["parametrizations"], plist, parametrization)
        dtype = torch.promote_types(x.dtype, source._parameters["weight"].dtype)
        self.dtype = dtype
        self.w_s = source.weight.to(dtype)
        self.b_s = source.bias.to(dtype)
        self.weight = self.weight_source.to(dtype)
        self.identity = _identity_inside(self.modules[2])
        self.plain_dropout = type(self.modules[3]) is nn.Dropout

    @staticmethod
    def applies(unit: nn.Module, x: Tensor) -> bool:
        """Whether a plan can stand in for the regular forward now (the caller checked eval mode and no grad)."""
        if _autocast_enabled(x.device.type) or compat.is_compiling() or not compat.is_plain_tensor(x):
            return False
        projection = unit._modules["projection"]
        if projection._modules.get("parametrizations") is not None:
            parts = _orthogonal_parts(projection)
            return parts is not None and parts[1]._cacheable(parts[0].original)
        weight = projection._parameters.get("weight")
        return weight is not None and compat.is_plain_tensor(weight)

    def fresh(self, unit: nn.Module, x: Tensor) -> bool:
        """Cheap check that nothing the plan was built from has changed, and that it still applies."""
        if x.dtype is not self.x_dtype or _autocast_enabled(self.device_type) or not compat.is_plain_tensor(x):
            return False  # (dynamo's tracing is checked by plan_for; fake tensors of other tracers here)
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            return False  # a captured graph must recompute the weight on replay, not bake this one in
        source, projection, activation, dropout = self.modules
        modules = unit._modules
        if (
            modules["learned_source"] is not source
            or modules["projection"] is not projection
            or modules["non_linearity"] is not activation
            or modules["dropout"] is not dropout
        ):
            return False
        weight_stamp, bias_stamp = self.source_stamps
        if not unchanged(source._parameters["weight"], weight_stamp) or not unchanged(
            source._parameters["bias"], bias_stamp
        ):
            return False
        if self.parts is None:
            plain = projection._parameters.get("weight")
            return unchanged(plain, self.weight_stamp)
        plists, plist, parametrization = self.parts
        if projection._modules.get("parametrizations") is not plists or plists._modules.get("weight") is not plist:
            return False
        return parametrization.cached_weight(plist._parameters["original"]) is self.weight_source

    def __call__(self, unit: nn.Module, x: Tensor) -> Tensor:
        """The unit's forward: same operations, same order."""
        h = x if x.dtype is self.dtype else x.to(self.dtype)
        weight = self.weight
        source = F.linear(h, self.w_s, self.b_s)
        activation, dropout = self.modules[2], self.modules[3]
        # calling an identity (or an inactive dropout) changes nothing; hooks or a swapped inner module do
        identity = self.identity
        if (
            identity is None
            or activation._modules.get("f") is not identity
            or _has_hooks(activation)
            or _has_hooks(identity)
        ):
            source = activation(source)
        if unit.subtract_projection:
            source = source - F.linear(h, weight)
        out = h + torch.matmul(source, weight)
        if not self.plain_dropout or dropout.training or _has_hooks(dropout):
            out = dropout(out)
        return out if out.dtype is x.dtype else out.to(x.dtype)


def plan_for(unit: Any, x: Tensor) -> InferencePlan | None:
    """The unit's plan for ``x``: reused while fresh, rebuilt when something changed, None where it cannot
    apply (autocast, tracing, another parametrization on the projection)."""
    if compat.is_compiling():
        return None  # dynamo traces the regular forward; no module state is written while it does
    plan = unit.__dict__.get("_inference_plan")
    if plan is not None and plan.fresh(unit, x):
        return plan
    plan = InferencePlan(unit, x) if InferencePlan.applies(unit, x) else None
    unit.__dict__["_inference_plan"] = plan
    return plan
