"""The command line: check (stock vs patched table), scenarios, argument errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from adapters_reft.__main__ import main


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "adapters_reft", *args], capture_output=True, text=True, check=False)


def test_check_shows_stock_failing_and_patched_passing() -> None:
    proc = _run("check", "--json", "bf16-default", "fp32-to-half", "bf16-autocast")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["name"]: r for r in json.loads(proc.stdout)}
    assert all(r["patched"]["ok"] and r["patched"]["available"] for r in rows.values())
    assert "dtype" in rows["bf16-default"]["stock"]["detail"] and not rows["bf16-default"]["stock"]["ok"]
    assert "not implemented for 'Half'" in rows["fp32-to-half"]["stock"]["detail"]
    assert rows["bf16-autocast"]["stock"]["ok"]


def test_check_table_text(capsys: pytest.CaptureFixture[str]) -> None:
    try:
        assert main(["check", "noreft-bf16"]) == 0
    finally:
        import adapters_reft

        adapters_reft.unpatch()
    out = capsys.readouterr().out
    assert "NoReFT in bf16" in out
    assert "patched: 1/1 setups pass; stock: 0/1" in out


def test_unknown_scenario_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "bf17"]) == 2
    assert "unknown scenario(s): bf17" in capsys.readouterr().err


def test_no_command_prints_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2 and "COMMAND" in capsys.readouterr().err
