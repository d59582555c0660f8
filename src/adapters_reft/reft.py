"""The ReFT unit that replaces ``adapters.methods.reft.ReftUnit``.

Differences from stock, all of them about precision and cost; in float32 the math and the order of
operations are the same, so outputs and initial weights match stock for the same seed and RNG stream:

* the projection is made orthogonal with :func:`adapters_reft.orthogonal` (dtype-safe, O(n·r) base);
* the projection weight is computed once per forward (stock reads it twice);
* activations of any floating dtype are accepted and the result has the input's dtype; without autocast the
  unit computes in the wider of the activation and parameter dtypes (an fp32 adapter inside a bf16 model
  computes in fp32), under autocast it follows autocast;
* no half-precision warning that upcasts the projection (stock's crashes inside ``logging``).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .inference import _autocast_enabled, plan_for
from .orthogonal import adopt_torch_orthogonal
from .orthogonal import orthogonal as dtype_safe_orthogonal

__all__ = ["ReftUnit", "adopt_stock_unit", "unit_class_for"]

# Constructor arguments of stock ReftUnit in adapters >= 1.2; older releases use a prefix of these names in
# another order (1.0.x: no seed and no dtype; 1.1.x: dtype 7th). ``unit_class_for`` reads the real order.
CANONICAL_ARGUMENTS = (
    "in_dim",
    "r_dim",
    "orthogonal",
    "subtract_projection",
    "non_linearity",
    "dropout",
    "init_weights_seed",
    "dtype",
)


def _activation(name: str | None) -> nn.Module:
    from adapters.methods.modeling import Activation_Function_Class

    return Activation_Function_Class(name)


def _seed(seed: int | None) -> None:
    """Same semantics as adapters' ``fix_seed``: a truthy seed resets the CPU and CUDA generators."""
    if seed:
        torch.manual_seed(seed)
        if torch.cuda.is_available():
            torch.cuda.manual_seed_all(seed)


class ReftUnit(nn.Module):
    """One ReFT intervention: ``x + (act(W_s x + b) - R x) R`` with ``R`` (r × n) optionally orthonormal."""

    def __init__(
        self,
        in_dim: int,
        r_dim: int,
        orthogonal: bool = False,
        subtract_projection: bool = True,
        non_linearity: str | None = None,
        dropout: float = 0.0,
        init_weights_seed: int | None = None,
        dtype: torch.dtype | None = None,
        *,
        compact: bool = True,
    ) -> None:
        super().__init__()
        self.orthogonal = orthogonal
        _seed(init_weights_seed)
        self.learned_source = nn.Linear(in_dim, r_dim, bias=True, dtype=dtype)
        projection = nn.Linear(in_dim, r_dim, bias=False, dtype=dtype)
        if orthogonal:
            if projection.weight.device.type == "meta":
                projection = projection.to_empty(device="cpu")
            projection = dtype_safe_orthogonal(projection, compact=compact)
        self.projection = projection
        self.subtract_projection = subtract_projection
        self.non_linearity = _activation(non_linearity)
        self.dropout = nn.Dropout(dropout)

    def _compute_dtype(self, x: Tensor) -> torch.dtype:
        return torch.promote_types(x.dtype, self.learned_source.weight.dtype)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training and not torch.is_grad_enabled() and x.numel():
            plan = plan_for(self, x)  # eval without grad: weights prepared once (see adapters_reft.inference)
            if plan is not None:
                return plan(self, x)
        return self.intervene(x)

    def intervene(self, x: Tensor) -> Tensor:
        """The intervention computed from the parameters as they are (what ``export-upstream`` writes into
        adapters' ``ReftUnit.forward``); ``forward`` uses it unless an inference plan applies."""
        if x.numel() == 0 and not torch.is_grad_enabled():
            # the unused prefix/suffix slice (e.g. LoReFT's suffix_positions=0) on every generated token; with
            # grad enabled the unit still runs so its parameters get zero (not None) gradients, as DDP expects
            return x
        weight = self.projection.weight  # computed once: the orthogonal map is the unit's main cost
        w_s, b_s = self.learned_source.weight, self.learned_source.bias
        h = x
        if not _autocast_enabled(x.device.type):
            dtype = self._compute_dtype(x)
            if x.dtype != dtype:
                h = x.to(dtype)
            if w_s.dtype != dtype:
                w_s, b_s = w_s.to(dtype), b_s.to(dtype)
            if weight.dtype != dtype:
                weight = weight.to(dtype)
        source = self.non_linearity(F.linear(h, w_s, b_s))
        if self.subtract_projection:
            source = source - F.linear(h, weight)
        out = self.dropout(h + torch.matmul(source, weight))
        return out if out.dtype == x.dtype else out.to(x.dtype)


def unit_class_for(stock_unit: type, *, compact: bool = True) -> type[ReftUnit]:
    """A ``ReftUnit`` subclass whose positional arguments follow ``stock_unit``'s constructor.

    ``compact`` picks the layout of the orthogonal base (see :mod:`adapters_reft.orthogonal`).
    ``ReftModule`` builds units positionally, and the order changed between adapters releases; reading the
    installed signature (instead of guessing from the values) keeps ``dtype`` and the seed apart.
    """
    names = [p for p in inspect.signature(stock_unit.__init__).parameters if p != "self"]
    unknown = [n for n in names if n not in CANONICAL_ARGUMENTS]
    if unknown:
        raise TypeError(
            f"adapters' ReftUnit takes arguments this version of adapters_reft does not know: {unknown}; "
            "upgrade adapters-reft or pin adapters to a supported release"
        )

    class InstalledReftUnit(ReftUnit):
        __doc__ = ReftUnit.__doc__
        stock_arguments = tuple(names)

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            if len(args) > len(names):
                raise TypeError(f"ReftUnit takes at most {len(names)} positional arguments ({len(args)} given)")
            clashes = set(names[: len(args)]) & kwargs.keys()
            if clashes:
                raise TypeError(f"ReftUnit got multiple values for {sorted(clashes)}")
            kwargs.update(zip(names, args, strict=False))
            kwargs.setdefault("compact", compact)
            super().__init__(**kwargs)

    InstalledReftUnit.__name__ = InstalledReftUnit.__qualname__ = "ReftUnit"
    return InstalledReftUnit


def adopt_stock_unit(unit: nn.Module) -> ReftUnit:
    """A patched unit that takes over a stock unit's submodules and tensors as they are (bit for bit).

    The stock orthogonal parametrization is swapped for a dense-layout :class:`DtypeSafeOrthogonal` holding
    the very same ``original`` and ``base`` tensors, so outputs are unchanged and half precision works.
    """
    new = ReftUnit.__new__(ReftUnit)
    nn.Module.__init__(new)
    new.orthogonal = unit.orthogonal
    new.learned_source = unit.learned_source
    if unit.orthogonal:
        adopt_torch_orthogonal(unit.projection)
    new.projection = unit.projection
    new.subtract_projection = unit.subtract_projection
    new.non_linearity = unit.non_linearity
    new.dropout = unit.dropout
    return new.train(unit.training)
