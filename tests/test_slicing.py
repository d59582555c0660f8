"""The no-grad slicing forward of ReftModule gives stock's tensors bit for bit, and takes over only where it can.

Each call runs in a fresh forward context (stock caches its indices there), the way a model forward does.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn

import adapters_reft
from adapters_reft.scenarios import _inputs, tiny_llama
from conftest import CallCounter, patched_adapters

HIDDEN = 16


@contextmanager
def forward_context(**attributes: Any) -> Iterator[SimpleNamespace]:
    from adapters.context import ForwardContext

    context = SimpleNamespace(**attributes)
    ForwardContext.get_contexts().append(context)
    try:
        yield context
    finally:
        ForwardContext.get_contexts().pop()


def _module(prefix: int, suffix: int, tied: bool, seed: int = 0) -> nn.Module:
    import adapters
    from adapters.methods.reft import ReftModule

    config = adapters.ReftConfig(
        layers="all", prefix_positions=prefix, suffix_positions=suffix, r=2, orthogonality=True, tied_weights=tied
    )
    torch.manual_seed(seed)
    module = ReftModule(HIDDEN, config).eval()
    with torch.no_grad():  # off the identity point and a non-zero source, so every unit changes its positions
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return module


def _stock_forward() -> Any:
    from adapters.methods.reft import ReftModule

    return ReftModule.forward.__adapters_reft_original__


def _mask(bsz: int, seq: int, pads: list[int], left: bool) -> Tensor:
    mask = torch.ones(bsz, seq, dtype=torch.long)
    for row, pad in enumerate(pads):
        if pad:
            if left:
                mask[row, :pad] = 0
            else:
                mask[row, seq - pad :] = 0
    return mask


def _context_from_mask(mask: Tensor | None) -> dict[str, Tensor]:
    if mask is None:
        return {}
    # what adapters' forward_context reads from the attention mask
    return {"seqlens": (mask == 1).sum(dim=-1).squeeze(), "offsets": mask.argmax(1)}


def _run(forward: Any, module: nn.Module, hidden: Tensor, mask: Tensor | None) -> Tensor | type[BaseException]:
    with torch.no_grad(), forward_context(**_context_from_mask(mask)):
        try:
            return forward(module, hidden)
        except (IndexError, RuntimeError) as error:  # stock's own failures must stay failures
            return type(error)


def _gathers(monkeypatch: pytest.MonkeyPatch) -> CallCounter:
    from adapters.methods.reft import ReftModule

    return CallCounter(monkeypatch, ReftModule, "_gather_adapted_states")


@given(
    prefix=st.integers(0, 4),
    suffix=st.integers(0, 4),
    tied=st.booleans(),
    bsz=st.integers(1, 3),
    seq=st.integers(1, 7),
    pads=st.lists(st.integers(0, 3), min_size=3, max_size=3),
    mask_kind=st.sampled_from(["none", "full", "left", "right"]),
)
def test_slices_equal_stock_bit_for_bit(
    prefix: int, suffix: int, tied: bool, bsz: int, seq: int, pads: list[int], mask_kind: str
) -> None:
    with patched_adapters():
        module = _module(prefix, suffix, tied)
        hidden = torch.randn(bsz, seq, HIDDEN, generator=torch.Generator().manual_seed(seq))
        rows = [min(p, seq - 1) for p in pads[:bsz]] if mask_kind in ("left", "right") else [0] * bsz
        mask = None if mask_kind == "none" else _mask(bsz, seq, rows, left=mask_kind == "left")
        expected = _run(_stock_forward(), module, hidden, mask)
        got = _run(type(module).forward, module, hidden, mask)
    if isinstance(expected, type):
        assert got is expected
    else:
        assert isinstance(got, Tensor) and got.dtype == expected.dtype and torch.equal(got, expected)
        assert got.data_ptr() != hidden.data_ptr() or (prefix == 0 and suffix == 0)


@pytest.mark.parametrize(
    ("mask", "gathers"),
    [(None, 0), (torch.ones(2, 6, dtype=torch.long), 0), (_mask(2, 6, [0, 2], left=True), 1)],
    ids=["no-mask", "unpadded", "left-padded"],
)
def test_slicing_replaces_the_gather_only_without_padding(
    patched: None, monkeypatch: pytest.MonkeyPatch, mask: Tensor | None, gathers: int
) -> None:
    module = _module(3, 2, tied=False)
    counter = _gathers(monkeypatch)
    _run(type(module).forward, module, torch.randn(2, 6, HIDDEN), mask)
    assert counter.calls == gathers


def test_grad_enabled_runs_stock_code(patched: None, monkeypatch: pytest.MonkeyPatch) -> None:
    module = _module(3, 0, tied=False).train()
    counter = _gathers(monkeypatch)
    with forward_context():
        out = module(torch.randn(1, 5, HIDDEN))
    out.sum().backward()
    assert counter.calls == 1
    # the empty suffix unit ran too, so DDP sees a (zero) gradient for it
    assert all(p.grad is not None for p in module.units[1].parameters() if p.requires_grad)


def test_a_later_call_of_another_shape_sees_the_first_calls_indices(patched: None) -> None:
    """Stock caches its indices on the context at the first call and reuses them (encoder and decoder share a
    context); after a sliced first call, a differently shaped call must still get those indices."""
    first, second = _module(0, 2, tied=False, seed=1), _module(0, 2, tied=False, seed=2)
    short, long = torch.randn(1, 4, HIDDEN), torch.randn(1, 6, HIDDEN)
    results = []
    for forward in (_stock_forward(), type(first).forward):
        with torch.no_grad(), forward_context():
            results.append((forward(first, short), forward(second, long)))
    (stock_short, stock_long), (ours_short, ours_long) = results
    assert torch.equal(ours_short, stock_short) and torch.equal(ours_long, stock_long)
    # stock intervened on positions 2 and 3 of the long input: the last two of the first (4-position) call
    assert torch.equal(ours_long[:, 4:], long[:, 4:]) and not torch.equal(ours_long[:, 2:4], long[:, 2:4])


@pytest.mark.parametrize("left_padded", [False, True])
def test_generate_and_logits_equal_stock_slicing_off(patched: None, left_padded: bool) -> None:
    import adapters
    from adapters.methods.reft import ReftModule

    model = tiny_llama()
    model.add_adapter("r", config=adapters.LoReftConfig(r=2, suffix_positions=2))
    model.set_active_adapters("r")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    model.eval()
    ids = _inputs(batch=2, length=8)
    mask = _mask(2, 8, [0, 3], left=True) if left_padded else torch.ones_like(ids)
    outputs = []
    for forward in (ReftModule.forward, _stock_forward()):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(ReftModule, "forward", forward)
            with torch.no_grad():
                logits = model(ids, attention_mask=mask).logits
                # suffix_positions > 0 breaks stock's cached generation; without the cache it works
                tokens = model.generate(
                    ids, attention_mask=mask, max_new_tokens=4, do_sample=False, use_cache=False, pad_token_id=0
                )
        outputs.append((logits, tokens))
    (logits, tokens), (stock_logits, stock_tokens) = outputs
    assert torch.equal(logits, stock_logits)
    assert torch.equal(tokens, stock_tokens)


def test_unpatch_restores_stock_forward() -> None:
    from adapters.methods.reft import ReftModule

    adapters_reft.unpatch()
    before = ReftModule.__dict__["forward"]
    adapters_reft.patch()
    assert ReftModule.__dict__["forward"] is not before
    assert ReftModule.__dict__["forward"].__adapters_reft_original__ is before
    adapters_reft.unpatch()
    assert ReftModule.__dict__["forward"] is before


@pytest.mark.parametrize(("clips", "gathers"), [(True, 0), (False, 1)], ids=["adapters>=1.1", "adapters-1.0"])
def test_a_sequence_shorter_than_the_prefix_is_sliced_only_where_stock_clips(
    patched: None, monkeypatch: pytest.MonkeyPatch, clips: bool, gathers: int
) -> None:
    from adapters_reft import slicing

    monkeypatch.setattr(slicing, "_stock_clips_positions", lambda: clips)
    module = _module(3, 0, tied=False)
    counter = _gathers(monkeypatch)
    _run(type(module).forward, module, torch.randn(1, 1, HIDDEN), None)  # a generated token
    assert counter.calls == gathers
