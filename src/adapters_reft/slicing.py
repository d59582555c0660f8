"""A no-grad ``ReftModule.forward`` that slices instead of gathering and scattering.

Why: generating a token runs every layer's ReftModule on a one-position slice. Stock builds index tensors,
gathers, concatenates and scatters: about eight small tensor operations per layer, which right after the
model's large matmuls cost more than the intervention itself. When no row of the batch is padded, stock's
positions are the plain ranges ``[0, p)`` and ``[seq - s, seq)`` (clipped to a shorter sequence where the
installed adapters clips them, 1.1 and later); slicing them and concatenating the pieces gives the same tensors
bit for bit, in two or three operations.

Everything else runs stock's code unchanged: grad enabled (training, where DDP expects the units to run even on
empty slices), tracing, padding, prefix and suffix overlapping (stock's scatter order decides there), and a
forward context whose first ReftModule did not qualify. Stock caches its indices on the forward context from
the first ReftModule call and reuses them in later layers; when a later call differs from the first one
(encoder and decoder share a context), stock's indices are rebuilt as the first call would have left them and
stock's code takes over for the rest of that forward.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from . import compat

__all__ = ["sliced_forward"]

_PLAN = "_adapters_reft_slices"  # attribute on adapters' ForwardContext, one per model forward


def sliced_forward(stock_forward: Callable[[nn.Module, Tensor], Tensor]) -> Callable[[nn.Module, Tensor], Tensor]:
    """Wrap ``ReftModule.forward``: slice where that is exactly stock's result, else call ``stock_forward``."""

    @functools.wraps(stock_forward)
    def forward(self: nn.Module, hidden_states: Tensor) -> Tensor:
        if torch.is_grad_enabled() or compat.is_compiling() or not compat.is_plain_tensor(hidden_states):
            return stock_forward(self, hidden_states)
        spans = _spans(self, hidden_states)
        if spans is None:
            return stock_forward(self, hidden_states)
        return _forward_slices(self, hidden_states, *spans)

    forward.__adapters_reft_original__ = stock_forward  # type: ignore[attr-defined]
    return forward


@functools.cache
def _forward_context() -> Any:
    from adapters.context import ForwardContext  # imported on first use: adapters_reft imports without adapters

    return ForwardContext


def _spans(module: nn.Module, hidden_states: Tensor) -> tuple[int, int] | None:
    """(prefix length, suffix length) to slice, or None where stock's code must run."""
    context = _forward_context().get_context()
    if context is None or hidden_states.dim() != 3 or hidden_states.stride() != _dense_strides(hidden_states.shape):
        return None  # stock's scatter keeps odd strides of its input; slices + cat would not
    key = (hidden_states.shape, module.prefix_positions, module.suffix_positions, module.tied_weights)
    plan = getattr(context, _PLAN, None)
    if plan is None:
        if hasattr(context, "pref_idx") or hasattr(context, "suff_idx"):
            return None  # stock's indices are already cached here: keep using them
        plan = [key, _unpadded_spans(context, module, hidden_states), module]
        setattr(context, _PLAN, plan)
    first_key, spans, first_module = plan
    if spans is not None and key != first_key:
        # stock would reuse the indices of the first call in this context: rebuild them from its shape
        empty = hidden_states.new_empty(first_key[0])
        type(first_module)._gather_adapted_states(first_module, empty)
        plan[1] = spans = None
    return spans


def _unpadded_spans(context: Any, module: nn.Module, hidden_states: Tensor) -> tuple[int, int] | None:
    bsz, seq, _ = hidden_states.shape
    prefix = min(module.prefix_positions, seq) if module.prefix_positions > 0 else 0
    suffix = min(module.suffix_positions, seq) if module.suffix_positions > 0 else 0
    if seq == 0 or prefix + suffix > seq:
        return None
    if (prefix < module.prefix_positions or suffix < module.suffix_positions) and not _stock_clips_positions():
        return None  # adapters 1.0.x gathers exactly p / s positions and fails on a shorter sequence
    if hasattr(context, "seqlens"):  # read from the attention mask: rows start at offsets, hold seqlens tokens
        offsets, seqlens = context.offsets, context.seqlens
        if offsets.numel() not in (1, bsz) or seqlens.numel() not in (1, bsz):
            return None  # stock's broadcasting decides (or fails)
        # plain lists: one host copy each instead of three tensor operations per check
        starts, lengths = _as_list(offsets, bsz), _as_list(seqlens, bsz)
        if starts is None or lengths is None:
            return None
        if prefix and any(start != 0 for start in starts):
            return None
        if suffix and any(start + length != seq for start, length in zip(starts, lengths, strict=True)):
            return None
    return prefix, suffix


@functools.cache
def _stock_clips_positions() -> bool:
    """Whether stock intervenes on ``min(p, seq)`` positions of a sequence shorter than ``p`` (adapters >= 1.1;
    e.g. each generated token with LoReFT's 3 prefix positions) instead of failing with an index error."""
    from packaging.version import Version

    from .versions import adapters_version

    return Version(Version(adapters_version()).base_version) >= Version("1.1")


def _as_list(t: Tensor, bsz: int) -> list[int] | None:
    """One value per row, broadcast like stock's index arithmetic (a single value serves every row)."""
    if t.dim() > 1:
        return None
    values = t.tolist()
    if not isinstance(values, list):
        values = [values]
    return values * bsz if len(values) == 1 else values


def _forward_slices(module: nn.Module, hidden_states: Tensor, prefix: int, suffix: int) -> Tensor:
    if prefix == 0 and suffix == 0:
        return hidden_states  # stock scatters nothing and returns its input
    seq = hidden_states.size(1)
    # slices are taken only where needed: on a generated token the prefix is the whole (one-position) input and
    # there is no suffix
    head = _positions(hidden_states, 0, prefix) if prefix else None
    tail = _positions(hidden_states, seq - suffix, seq) if suffix else None
    if module.tied_weights:
        states = torch.cat([head, tail], dim=1) if prefix and suffix else _dense(head if prefix else tail)
        adapted = module.units[0](states).to(hidden_states.dtype)
        head, tail = adapted[:, :prefix], adapted[:, prefix:]
    else:
        if prefix:
            head = module.units[0](_dense(head)).to(hidden_states.dtype)
        if suffix:
            tail = module.units[1](_dense(tail)).to(hidden_states.dtype)
    pieces = [head] if prefix else []
    if prefix + suffix < seq:
        pieces.append(_positions(hidden_states, prefix, seq - suffix))
    if suffix:
        pieces.append(tail)
    return pieces[0].contiguous() if len(pieces) == 1 else torch.cat(pieces, dim=1)


def _dense_strides(shape: torch.Size) -> tuple[int, ...]:
    _, seq, hidden = shape
    return (seq * hidden, hidden, 1)


def _dense(states: Tensor) -> Tensor:
    """``states`` with the strides of a fresh tensor, as stock's gather returns them.

    Same values are not enough: ``torch.matmul`` picks its kernel by strides, so a one-row slice of a longer
    sequence (strides ``(seq·h, h, 1)`` instead of ``(n·h, h, 1)``) rounds differently. A contiguous slice is
    re-strided as a view; anything else is copied.
    """
    if not states.is_contiguous():
        return states.contiguous()
    dense = _dense_strides(states.shape)
    return states if states.stride() == dense else states.as_strided(states.shape, dense)


def _positions(hidden_states: Tensor, start: int, stop: int) -> Tensor:
    if start == 0 and stop == hidden_states.size(1):
        return hidden_states
    return hidden_states[:, start:stop]
