"""The README's compatibility table says exactly what tox.ini tests."""

from __future__ import annotations

import configparser
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _files() -> tuple[str, configparser.ConfigParser]:
    if not (ROOT / "tox.ini").exists() or not (ROOT / "README.md").exists():
        pytest.skip("runs from a source checkout (tox.ini and README.md beside tests/)")
    config = configparser.ConfigParser(interpolation=None)
    config.read(ROOT / "tox.ini")
    return (ROOT / "README.md").read_text(encoding="utf-8"), config


def _table_rows(readme: str) -> dict[str, tuple[str, str, str]]:
    block = readme.split("<!-- compat-table:start -->")[1].split("<!-- compat-table:end -->")[0]
    rows = {}
    for line in block.strip().splitlines()[2:]:
        env, python, torch, adapters, _ = (c.strip() for c in line.strip("|").split("|"))
        rows[env] = (python, torch, adapters)
    return rows


def _tox_envs(config: configparser.ConfigParser) -> dict[str, tuple[str, str, str]]:
    envs = [e.strip() for e in config["tox"]["env_list"].split() if e.strip().startswith("py")]
    deps = config["testenv"]["deps"]
    pins = {}
    for env in envs:
        factors = env.split("-")
        python = f"{factors[0][2]}.{factors[0][3:]}"
        torch = re.search(rf"^\s*{factors[1]}: torch==(\S+?)\.\*$", deps, re.M)
        adapters = re.search(rf"^\s*{factors[2]}: adapters==(\S+)$", deps, re.M)
        assert torch and adapters, f"tox.ini has no torch/adapters pin for {env}"
        version = adapters.group(1)
        pins[env] = (python, torch.group(1), version.replace(".*", ".x"))
    return pins


def test_readme_table_equals_tox_envs() -> None:
    readme, config = _files()
    assert _table_rows(readme) == _tox_envs(config)


def test_matrix_covers_what_the_policy_promises() -> None:
    _, config = _files()
    envs = _tox_envs(config)
    assert {adapters[:3] for _, _, adapters in envs.values()} >= {"1.0", "1.1", "1.2", "1.3"}
    assert {python for python, _, _ in envs.values()} >= {"3.10", "3.13"}
    torches = {torch for _, torch, _ in envs.values()}
    assert len(torches) >= 4 and "2.2" in torches
