"""``python -m adapters_reft doctor``: what it prints, and that it fails loudly where the patch cannot work."""

from __future__ import annotations

import json
import platform

import pytest
import torch

import adapters_reft
from adapters_reft import doctor
from adapters_reft.__main__ import main as cli
from adapters_reft.versions import adapters_version


def test_report_names_versions_devices_policy_and_table(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("ADAPTERS_REFT_UPCAST", raising=False)
    assert cli(["doctor"]) == 0
    out = capsys.readouterr().out
    for expected in (
        platform.python_version(),
        torch.__version__,
        adapters_version(),
        adapters_reft.__version__,
        "transformers",
        f"adapters {adapters_version()}: supported",
        "ADAPTERS_REFT_UPCAST=auto",
        "status: ok",
    ):
        assert expected in out, expected
    assert "cpu" in out and "cuda" in out
    rows = [
        line.split() for line in out.splitlines() if line.strip().startswith(("householder", "matrix_exp", "cayley"))
    ]
    assert len(rows) == len(adapters_reft.compat.support_table())
    assert {(r[0], r[1], r[2]) for r in rows} >= {
        ("householder", "bfloat16", "cpu"),
        ("householder", "float32", "cpu"),
    }
    fp32_householder = next(r for r in rows if r[:3] == ["householder", "float32", "cpu"])
    assert fp32_householder[3:] == ["yes", "yes", "no"]  # native, accurate, no cast in fp32


def test_policy_in_force_is_reported(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("ADAPTERS_REFT_UPCAST", "always")
    assert cli(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "ADAPTERS_REFT_UPCAST=always" in out
    assert "bfloat16  cpu     " in out


def test_unsupported_adapters_exits_non_zero(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    message = "adapters 9.9.9 is newer than this adapters-reft was tested with"

    def refuse(version: str | None = None) -> str:
        raise adapters_reft.UnsupportedVersionError(message)

    monkeypatch.setattr(adapters_reft, "check_adapters_version", refuse)
    assert cli(["doctor"]) == 1
    out = capsys.readouterr().out
    assert f"NOT SUPPORTED: {message}" in out
    assert "status: PROBLEMS" in out


def test_real_version_check_drives_the_exit_status(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Not only a mocked refusal: the library's own range check, fed an out-of-range release."""
    import adapters_reft.versions as versions

    monkeypatch.setattr(versions, "adapters_version", lambda: "0.9.0")
    assert cli(["doctor"]) == 1
    assert "adapters 0.9.0 is not supported" in capsys.readouterr().out


def test_invalid_policy_exits_non_zero(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("ADAPTERS_REFT_UPCAST", "sometimes")
    assert cli(["doctor"]) == 1
    out = capsys.readouterr().out
    assert "INVALID" in out and "'sometimes'" in out


def test_json_report(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("ADAPTERS_REFT_UPCAST", raising=False)
    assert cli(["doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["versions"]["torch"] == torch.__version__
    assert report["adapters_support"]["supported"] is True
    assert report["cast_policy"]["policy"] == "auto"
    assert report["problems"] == []
    assert {"map", "dtype", "device_type", "native", "upcast"} <= set(report["compat_table"][0])


def test_cpu_bf16_hardware_is_reported_without_proc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(doctor, "cpu_flags", lambda: None)
    assert doctor.devices()["cpu"]["bf16_hardware"] is None
    monkeypatch.setattr(doctor, "cpu_flags", lambda: {"avx2", "fma"})
    lines = doctor._render_devices(doctor.devices())
    assert "bf16 is emulated" in lines[0]
