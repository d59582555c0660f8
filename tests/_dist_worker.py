"""One rank of the distributed tests (``tests/test_distributed.py``); not a test module itself.

Launched once per rank as ``python _dist_worker.py MODE DTYPE PATCH OUT_DIR`` with the usual ``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` environment variables (no ``torch.distributed.run``):

* ``MODE``: ``ddp`` (DistributedDataParallel around a model stored in ``DTYPE``) or ``fsdp2`` (fp32 storage,
  ``fully_shard`` with ``MixedPrecisionPolicy(param_dtype=DTYPE, reduce_dtype=float32)``);
* ``PATCH``: ``patched`` calls ``adapters_reft.patch()`` before the adapter is added, ``stock`` does not.

Each rank runs one training step (forward, backward, AdamW step) and a second no-grad forward, then writes
``OUT_DIR/rank{RANK}.pt``: a dict with ``ok`` and, on success, the loss, the trainable tensors before and
after the step (full tensors, also for FSDP2), their gradients, the projection weights ``R`` the model used
in the forward after the step (captured from the orthogonal parametrization, in the dtype the model ran
in), and the inputs; on failure the exception type and message, or ``unsupported`` when FSDP2 cannot train
even a plain MLP on CPU in this torch. The test process makes every assertion.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

import torch

R_DIM = 4  # r > 1 so that R Rᵀ ≈ I is a real orthonormality check, not just a unit norm


def inputs_for(rank: int) -> torch.Tensor:
    """Each rank trains on its own batch, so the gradient all-reduce really averages something."""
    from adapters_reft.scenarios import VOCAB

    return torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(100 + rank))


def build_model(dtype: torch.dtype) -> torch.nn.Module:
    """Tiny Llama + LoReFT(r=4, dropout=0) built in fp32, then ``.to(dtype)`` (the reported bug's path), with the
    adapter in training mode; the same on every rank and in the test process."""
    import adapters

    from adapters_reft.scenarios import tiny_llama

    model = tiny_llama(torch.float32)
    model.add_adapter("reft", config=adapters.LoReftConfig(r=R_DIM, dropout=0.0))
    model.train_adapter("reft")
    return model.to(dtype)


def _strip(name: str) -> str:
    return name.removeprefix("module.")


def _full(t: torch.Tensor) -> torch.Tensor:
    full_tensor = getattr(t, "full_tensor", None)  # DTensor (FSDP2) -> the whole tensor, a collective
    return (full_tensor() if full_tensor is not None else t).detach().clone().cpu()


def _trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {_strip(n): _full(p) for n, p in model.named_parameters() if p.requires_grad}


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {_strip(n): _full(p.grad) for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def _recorder(captured: dict[str, torch.Tensor], name: str):
    def hook(_module, _args, output):
        captured[name] = output.detach().clone().cpu()

    return hook


def _capture_projections(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], list]:
    """Forward hooks on every orthogonal parametrization: record the weight R it returns."""
    captured: dict[str, torch.Tensor] = {}
    handles = [
        module.register_forward_hook(_recorder(captured, _strip(name)))
        for name, module in model.named_modules()
        if type(module).__name__ in ("DtypeSafeOrthogonal", "_Orthogonal")
    ]
    return captured, handles


def _fsdp2_unsupported(fully_shard, policy) -> str | None:
    """Why FSDP2 cannot train even a plain two-layer MLP here (CPU/gloo support came after FSDP2 itself:
    torch 2.6 fails with "'Stream' object has no attribute 'record_event'"), or None when it can."""
    try:
        probe = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
        fully_shard(probe[0], mp_policy=policy)
        fully_shard(probe, mp_policy=policy)
        probe(torch.randn(2, 8)).sum().backward()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def run(mode: str, dtype: torch.dtype, patched: bool, rank: int, world_size: int) -> dict:
    import torch.distributed as dist

    if patched:
        import adapters_reft

        adapters_reft.patch()
    ids = inputs_for(rank)
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        model = build_model(dtype)
        # The suffix unit (suffix_positions=0) runs on an empty slice: used, with an all-zero gradient.
        wrapped = DistributedDataParallel(model)
    else:
        try:
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        except ImportError:
            from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        unsupported = _fsdp2_unsupported(fully_shard, policy)
        if unsupported is not None:
            return {"ok": False, "unsupported": unsupported, "error_type": None, "error": None}
        model = build_model(torch.float32)
        for layer in model.model.layers:
            fully_shard(layer, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        wrapped = model

    before = _trainable(wrapped)
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2)
    loss = wrapped(ids, labels=ids).loss
    loss.backward()
    grads = _grads(wrapped)
    optimizer.step()
    after = _trainable(wrapped)

    captured, handles = _capture_projections(wrapped)
    with torch.no_grad():
        logits = wrapped(ids).logits
    for handle in handles:
        handle.remove()
    dist.barrier()
    return {
        "ok": True,
        "loss": loss.detach().float().item(),
        "loss_dtype": str(loss.dtype),
        "logits_finite": bool(torch.isfinite(logits).all()),
        "before": before,
        "after": after,
        "grads": grads,
        "projections": captured,
        "inputs": ids,
        "world_size": world_size,
    }


def main(argv: list[str]) -> int:
    mode, dtype_name, patch_mode, out_dir = argv
    torch.set_num_threads(1)
    import torch.distributed as dist
    import transformers

    transformers.logging.set_verbosity_error()
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        try:
            result = run(mode, getattr(torch, dtype_name), patch_mode == "patched", rank, world_size)
        except Exception as exc:
            traceback.print_exc()
            result = {"ok": False, "error_type": type(exc).__name__, "error": str(exc)}
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
