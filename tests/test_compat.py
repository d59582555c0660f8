"""The compat probe: verdicts match what the kernels actually do, caching, tracing and the env var."""

from __future__ import annotations

import threading

import pytest
import torch

from adapters_reft import compat
from adapters_reft.orthogonal import _map

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _kernel(orthogonal_map: str, dtype: torch.dtype) -> tuple[bool, bool]:
    """(runs, accurate) measured directly: our map on a small random problem against float64."""
    x = (0.3 * torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))).tril(-1)
    x.diagonal().fill_(-1.0)
    leaf = x.to(dtype).requires_grad_(True)
    try:
        out = _map(leaf, orthogonal_map)
        out.sum().backward()
    except (RuntimeError, NotImplementedError):
        return False, False
    error = (out.detach().double() - _map(leaf.detach().double(), orthogonal_map)).abs().max().item()
    return True, error <= 8 * torch.finfo(dtype).eps


def _qr_runs(dtype: torch.dtype) -> bool:
    try:
        a, tau = torch.geqrf(torch.randn(5, 3, dtype=torch.float64).to(dtype))
        torch.linalg.householder_product(a, tau)
    except (RuntimeError, NotImplementedError):
        return False
    return True


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("orthogonal_map", compat.MAPS)
def test_verdict_equals_kernel_behaviour(orthogonal_map: str, dtype: torch.dtype) -> None:
    runs, accurate = _kernel(orthogonal_map, dtype)
    assert compat.native_support(orthogonal_map, dtype, "cpu", "forward") == runs
    assert compat.native_accurate(orthogonal_map, dtype, "cpu", "forward") == (runs and accurate)
    assert compat.native_support(orthogonal_map, dtype, "cpu", "inverse") == _qr_runs(dtype)
    assert compat.needs_upcast(orthogonal_map, dtype, "cpu") == (
        dtype in (torch.float16, torch.bfloat16) and not accurate
    )


def test_matrix_exp_runs_in_bf16_while_householder_does_not() -> None:
    """torch 2.13 CPU has a bf16 matrix_exp kernel (the probe says so) but its results are wrong, so the
    auto policy still computes it in float32; householder has no bf16 kernel at all."""
    if _kernel("matrix_exp", torch.bfloat16) != (True, False) or _kernel("householder", torch.bfloat16)[0]:
        pytest.skip(f"torch {torch.__version__} has other bf16 kernels than the ones this test documents")
    assert compat.native_support("matrix_exp", torch.bfloat16, "cpu")
    assert not compat.native_accurate("matrix_exp", torch.bfloat16, "cpu")
    assert not compat.native_support("householder", torch.bfloat16, "cpu")
    assert compat.compute_dtype("matrix_exp", torch.bfloat16, "cpu") == torch.float32
    assert compat.compute_dtype("householder", torch.bfloat16, "cpu") == torch.float32


def test_verdict_is_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    compat.clear_cache()
    calls = []
    real = compat._probe
    monkeypatch.setattr(compat, "_probe", lambda *a: calls.append(a) or real(*a))
    for _ in range(3):
        compat.native_support("householder", torch.bfloat16, "cpu")
    assert len(calls) == 1


def test_concurrent_first_calls_probe_once(monkeypatch: pytest.MonkeyPatch) -> None:
    compat.clear_cache()
    calls = []
    real = compat._probe
    monkeypatch.setattr(compat, "_probe", lambda *a: calls.append(a) or real(*a))
    verdicts: list[bool] = []
    threads = [
        threading.Thread(target=lambda: verdicts.append(compat.native_support("cayley", torch.float16, "cpu")))
        for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert len(set(verdicts)) == 1 and len(verdicts) == 8


def test_no_probe_while_tracing(monkeypatch: pytest.MonkeyPatch) -> None:
    compat.clear_cache()
    monkeypatch.setattr(compat, "_is_tracing", lambda: True)
    monkeypatch.setattr(compat, "_probe", lambda *a: pytest.fail("probed while tracing"))
    assert compat.native_support("householder", torch.float32, "cpu") is False
    assert compat.compute_dtype("householder", torch.bfloat16, "cpu") == torch.float32


@pytest.mark.parametrize(
    ("policy", "expected"),
    [("always", torch.float32), ("never", torch.bfloat16), ("auto", torch.float32), ("  AUTO ", torch.float32)],
)
def test_policy_env_var(monkeypatch: pytest.MonkeyPatch, policy: str, expected: torch.dtype) -> None:
    monkeypatch.setenv(compat.ENV_VAR, policy)
    assert compat.compute_dtype("householder", torch.bfloat16, "cpu") == expected
    # float32/float64 are never cast, whatever the policy
    assert compat.compute_dtype("householder", torch.float64, "cpu") == torch.float64


def test_always_casts_even_natively_supported_maps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(compat.ENV_VAR, "always")
    assert compat.compute_dtype("matrix_exp", torch.bfloat16, "cpu") == torch.float32


def test_bad_policy_lists_allowed_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(compat.ENV_VAR, "sometimes")
    with pytest.raises(ValueError, match=r"ADAPTERS_REFT_UPCAST='sometimes'.*auto, always, never"):
        compat.upcast_policy()


def test_bad_map_and_operation_are_named() -> None:
    with pytest.raises(ValueError, match="householder, matrix_exp, cayley; got 'qr'"):
        compat.native_support("qr", torch.float32, "cpu")
    with pytest.raises(ValueError, match="forward, inverse; got 'backward'"):
        compat.native_support("householder", torch.float32, "cpu", "backward")  # type: ignore[arg-type]


def test_support_table_covers_every_map_and_dtype() -> None:
    rows = compat.support_table(("cpu",))
    assert {(r["map"], r["dtype"]) for r in rows} == {
        (m, str(d).removeprefix("torch.")) for m in compat.MAPS for d in DTYPES
    }
    fp32 = [r for r in rows if r["dtype"] == "float32"]
    assert all(r["native"] and r["accurate"] and not r["upcast"] for r in fp32)
