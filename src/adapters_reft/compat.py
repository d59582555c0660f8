"""What this torch can compute natively, per orthogonal map, dtype and device type.

PyTorch has no half-precision LAPACK kernels (``orgqr``, ``geqrf``, ``linalg.solve``) on most builds, while
other maps (``matrix_exp`` on CPU) do run in bf16. Rather than hard-coding a table that a future torch
release would make wrong, each (map, dtype, device type, operation) is probed once on a tiny tensor and the
verdict is cached. ``ADAPTERS_REFT_UPCAST`` overrides the resulting cast policy:

* ``auto`` (default): compute in float32 only where the native kernel is missing or gives wrong results;
* ``always``: compute every orthogonal map in float32 (float64 stays float64);
* ``never``: always use the storage dtype (torch raises where a kernel is missing).
"""

from __future__ import annotations

import os
import threading
from typing import Literal

import torch

__all__ = [
    "DTYPES",
    "ENV_VAR",
    "MAPS",
    "OPERATIONS",
    "POLICIES",
    "clear_cache",
    "compute_dtype",
    "native_accurate",
    "native_support",
    "needs_upcast",
    "support_table",
    "upcast_policy",
]

ENV_VAR = "ADAPTERS_REFT_UPCAST"
POLICIES = ("auto", "always", "never")
MAPS = ("householder", "matrix_exp", "cayley")
OPERATIONS = ("forward", "inverse")
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

Operation = Literal["forward", "inverse"]

# (map, dtype, device type, operation) -> (kernel runs, result accurate)
_verdicts: dict[tuple[str, torch.dtype, str, str], tuple[bool, bool]] = {}
_lock = threading.Lock()


def upcast_policy() -> str:
    """The cast policy in force, read from ``ADAPTERS_REFT_UPCAST`` on every call so it can change at run time."""
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in POLICIES:
        raise ValueError(
            f"{ENV_VAR}={os.environ.get(ENV_VAR)!r} is not a valid cast policy; use one of {', '.join(POLICIES)}"
        )
    return value


def _check_map(orthogonal_map: str) -> None:
    if orthogonal_map not in MAPS:
        raise ValueError(f"orthogonal_map has to be one of {', '.join(MAPS)}; got {orthogonal_map!r}")


_is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None) or getattr(
    getattr(torch, "_dynamo", None), "is_compiling", lambda: False
)  # torch.compiler.is_compiling exists from torch 2.3


def is_compiling() -> bool:
    """Whether dynamo is tracing (cheap: called on every eval forward by the weight cache)."""
    return bool(_is_compiling())


def _is_tracing() -> bool:
    """True while torch.compile/export traces or a CUDA graph captures: probing (or caching) then would put
    tracing placeholders where real tensors belong."""
    if is_compiling():
        return True
    # AOT tracing on torch 2.2 runs user code with fake/functional tensors outside dynamo's "compiling" flag
    detect_fake_mode = getattr(getattr(torch, "_guards", None), "detect_fake_mode", None)
    if detect_fake_mode is not None and detect_fake_mode() is not None:
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def is_plain_tensor(x: torch.Tensor) -> bool:
    """A real tensor or parameter, not a fake/functional/proxy stand-in that a tracer passes through user code."""
    return type(x) in (torch.Tensor, torch.nn.Parameter)


def _reference_and_result(
    orthogonal_map: str, dtype: torch.dtype, device: torch.device, operation: Operation
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the kernels an operation needs on a tiny problem (raises where torch has none); return
    (float64 reference, result in ``dtype``) so the caller can also judge the result's accuracy."""
    tall = torch.tensor([[1.0, 0.5], [0.25, -1.0], [0.5, 0.75]], dtype=torch.float64)

    def run(dt: torch.dtype) -> torch.Tensor:
        if operation == "inverse":  # QR: used at registration, on assignment and for checkpoint conversion
            reflectors, tau = torch.geqrf(tall.to(device=device, dtype=dt))
            return torch.linalg.householder_product(reflectors, tau)
        if orthogonal_map == "householder":
            leaf = (0.5 * tall).to(device=device, dtype=dt).requires_grad_(True)
            lower = leaf.tril(-1)
            tau = 2.0 / (1.0 + (lower * lower).sum(dim=-2))
            out = torch.linalg.householder_product(lower, tau)
        else:
            leaf = (0.5 * tall @ tall.T).to(device=device, dtype=dt).requires_grad_(True)
            skew = leaf.tril() - leaf.tril().mT
            if orthogonal_map == "matrix_exp":
                out = torch.matrix_exp(skew)
            else:
                eye = torch.eye(3, dtype=dt, device=device)
                out = torch.linalg.solve(eye - 0.5 * skew, eye + 0.5 * skew)
        out.sum().backward()
        return out.detach()

    return run(torch.float64).cpu(), run(dtype).cpu().to(torch.float64)


def _probe(orthogonal_map: str, dtype: torch.dtype, device_type: str, operation: Operation) -> tuple[bool, bool]:
    """(kernel runs, and its result agrees with float64 to a few units in the last place of ``dtype``)."""
    if device_type == "meta":
        return True, True  # meta tensors carry no data; every kernel "runs"
    try:
        device = torch.device(device_type)
        with torch.enable_grad(), torch.autocast(device_type=device_type, enabled=False):
            reference, result = _reference_and_result(orthogonal_map, dtype, device, operation)
    except (RuntimeError, NotImplementedError, TypeError):
        return False, False
    accurate = (
        bool(torch.isfinite(result).all()) and (result - reference).abs().max().item() <= 8 * torch.finfo(dtype).eps
    )
    return True, accurate


def _verdict(orthogonal_map: str, dtype: torch.dtype, device_type: str, operation: Operation) -> tuple[bool, bool]:
    _check_map(orthogonal_map)
    if operation not in OPERATIONS:
        raise ValueError(f"operation has to be one of {', '.join(OPERATIONS)}; got {operation!r}")
    key = (orthogonal_map, dtype, device_type, operation)
    verdict = _verdicts.get(key)
    if verdict is not None:
        return verdict
    if _is_tracing():
        return False, False
    with _lock:
        verdict = _verdicts.get(key)
        if verdict is None:
            verdict = _probe(orthogonal_map, dtype, device_type, operation)
            _verdicts[key] = verdict
    return verdict


def native_support(
    orthogonal_map: str, dtype: torch.dtype, device_type: str, operation: Operation = "forward"
) -> bool:
    """Whether torch has a kernel for ``operation`` of ``orthogonal_map`` in ``dtype`` on ``device_type``.

    ``operation="forward"`` covers the map and its backward; ``"inverse"`` the QR used by the right inverse.
    The first call per key probes (thread-safe); later calls read the cache. While torch.compile traces or a
    CUDA graph captures, nothing is probed: an unknown key answers ``False`` (compute in float32, always safe).
    """
    return _verdict(orthogonal_map, dtype, device_type, operation)[0]


def native_accurate(
    orthogonal_map: str, dtype: torch.dtype, device_type: str, operation: Operation = "forward"
) -> bool:
    """Whether that kernel exists *and* its result agrees with float64 on the probe problem.

    Some kernels run but are wrong: on torch 2.13 CPU ``matrix_exp`` in bf16/fp16 returns values around
    1e30 for a rotation by 0.5 rad. The ``auto`` policy treats such a kernel as missing.
    """
    runs, accurate = _verdict(orthogonal_map, dtype, device_type, operation)
    return runs and accurate


def needs_upcast(orthogonal_map: str, dtype: torch.dtype, device_type: str, operation: Operation = "forward") -> bool:
    """Whether the patch computes this operation in float32 instead of ``dtype``, under the policy in force."""
    if dtype in (torch.float32, torch.float64):
        return False
    policy = upcast_policy()
    if policy == "always":
        return True
    if policy == "never":
        return False
    return not native_accurate(orthogonal_map, dtype, device_type, operation)


def compute_dtype(
    orthogonal_map: str, dtype: torch.dtype, device_type: str, operation: Operation = "forward"
) -> torch.dtype:
    """The dtype the orthogonal map is computed in for a tensor stored in ``dtype``."""
    return torch.float32 if needs_upcast(orthogonal_map, dtype, device_type, operation) else dtype


def clear_cache() -> None:
    """Forget every probe verdict (for tests, or after loading a torch extension that adds kernels)."""
    with _lock:
        _verdicts.clear()


def support_table(device_types: tuple[str, ...] = ("cpu",)) -> list[dict[str, object]]:
    """One row per (map, dtype, device type): native support of forward and inverse, and the cast in force."""
    rows: list[dict[str, object]] = []
    for device_type in device_types:
        for orthogonal_map in MAPS:
            for dtype in DTYPES:
                forward = native_support(orthogonal_map, dtype, device_type, "forward")
                inverse = native_support(orthogonal_map, dtype, device_type, "inverse")
                rows.append(
                    {
                        "map": orthogonal_map,
                        "dtype": str(dtype).removeprefix("torch."),
                        "device_type": device_type,
                        "native": forward and inverse,
                        "native_forward": forward,
                        "native_inverse": inverse,
                        "accurate": native_accurate(orthogonal_map, dtype, device_type, "forward")
                        and native_accurate(orthogonal_map, dtype, device_type, "inverse"),
                        "upcast": needs_upcast(orthogonal_map, dtype, device_type, "forward")
                        or needs_upcast(orthogonal_map, dtype, device_type, "inverse"),
                    }
                )
    return rows
