"""``patch()`` / ``unpatch()`` / ``is_patched()``: install the dtype-safe ReFT unit into the released adapters.

The patch swaps three things in ``adapters.methods.reft`` and remembers the originals so ``unpatch()`` puts
them back exactly:

* the module-level name ``ReftUnit`` (``ReftModule`` looks it up at construction time), for a subclass of
  :class:`adapters_reft.reft.ReftUnit` that takes the installed release's positional arguments;
* ``ReftModule._gather_adapted_states``, wrapped so the empty prefix/suffix slice stock creates in the
  default dtype no longer promotes half-precision hidden states (the NoReFT/DiReFT failure);
* ``ReftModule.forward``, wrapped so that without grad and without padding it slices the intervened positions
  instead of gathering and scattering them (same tensors, fewer operations per generated token; see
  :mod:`adapters_reft.slicing`).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from .reft import ReftUnit, adopt_stock_unit, unit_class_for
from .slicing import sliced_forward
from .versions import check_adapters_version

__all__ = ["is_patched", "patch", "unpatch"]

_lock = threading.RLock()
_originals: dict[str, Any] = {}


def _gather_in_input_dtype(gather: Callable[..., list[Tensor]]) -> Callable[..., list[Tensor]]:
    @functools.wraps(gather)
    def gather_adapted_states(self: nn.Module, hidden_states: Tensor) -> list[Tensor]:
        states = gather(self, hidden_states)
        # Values came from hidden_states, so casting back is exact; only the promotion is undone.
        return [s if s.dtype == hidden_states.dtype else s.to(hidden_states.dtype) for s in states]

    gather_adapted_states.__adapters_reft_original__ = gather  # type: ignore[attr-defined]
    return gather_adapted_states


def is_patched() -> bool:
    """Whether adapters currently builds patched ReFT units."""
    import adapters.methods.reft as stock

    return isinstance(stock.ReftUnit, type) and issubclass(stock.ReftUnit, ReftUnit)


def patch(model: nn.Module | None = None, *, compact: bool = True) -> None:
    """Make adapters' ReFT methods dtype-safe; idempotent.

    Args:
        model: also convert the ReFT units already inside this model (their tensors are kept bit for bit).
        compact: store the orthogonal base of new units as reflectors, O(n·r) (default), instead of torch's
            dense n × n matrix. Calling ``patch`` again with another value changes it for new units.

    Raises:
        UnsupportedVersionError: the installed adapters release is outside the supported range.
    """
    check_adapters_version()
    import adapters.methods.reft as stock

    with _lock:
        if not is_patched():
            _originals["ReftUnit"] = stock.ReftUnit
            _originals["_gather_adapted_states"] = stock.ReftModule.__dict__["_gather_adapted_states"]
            stock.ReftModule._gather_adapted_states = _gather_in_input_dtype(_originals["_gather_adapted_states"])
            _originals["forward"] = stock.ReftModule.__dict__["forward"]
            stock.ReftModule.forward = sliced_forward(_originals["forward"])
        if getattr(stock.ReftUnit, "compact", None) is not compact or not is_patched():
            unit = unit_class_for(_originals["ReftUnit"], compact=compact)
            unit.compact = compact
            stock.ReftUnit = unit
    if model is not None:
        convert_units(model)


def unpatch() -> None:
    """Restore stock adapters exactly. Units already built keep working (they stay patched units)."""
    import adapters.methods.reft as stock

    with _lock:
        if not is_patched():
            return
        stock.ReftUnit = _originals.pop("ReftUnit")
        stock.ReftModule._gather_adapted_states = _originals.pop("_gather_adapted_states")
        stock.ReftModule.forward = _originals.pop("forward")


def convert_units(model: nn.Module) -> int:
    """Replace every stock ReFT unit inside ``model`` by a patched one holding the same tensors.

    Returns the number of units converted.
    """
    import adapters.methods.reft as stock

    module_class = stock.ReftModule
    converted = 0
    for module in model.modules():
        if not isinstance(module, module_class):
            continue
        for i, unit in enumerate(module.units):
            if not isinstance(unit, ReftUnit):
                module.units[i] = adopt_stock_unit(unit)
                converted += 1
    return converted
