"""``export-upstream`` against a local source tree made from the installed adapters (no network needed)."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import adapters
import pytest

from adapters_reft import upstream
from adapters_reft.__main__ import main as cli
from adapters_reft.upstream_codegen import ExportError, orthogonal_module_source, patch_reft_source

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="the export checks its patch with git")

HAS_FORMATTERS = all(importlib.util.find_spec(tool) is not None for tool in ("black", "isort"))
STOCK_REFT = (Path(adapters.__file__).parent / "methods" / "reft.py").read_text(encoding="utf-8")
EXPECTED_FILES = [upstream.ORTHOGONAL_PATH, upstream.REFT_PATH, "tests/test_methods/test_reft_precision.py"]

# upstream's isort settings (setup.cfg of the adapters sdists), so formatting matches a real tree
ISORT_CFG = """\
[isort]
default_section = FIRSTPARTY
ensure_newline_before_comments = True
force_grid_wrap = 0
include_trailing_comma = True
known_first_party = transformers
known_third_party = torch
line_length = 119
lines_after_imports = 2
multi_line_output = 3
use_parentheses = True
"""


def make_source_tree(root: Path) -> Path:
    """A minimal adapters source tree: the installed package under src/adapters plus setup stubs."""
    tree = root / "adapters-src"
    shutil.copytree(
        Path(adapters.__file__).parent,
        tree / "src" / "adapters",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )
    (tree / "setup.py").write_text(
        "from setuptools import find_packages, setup\n\n"
        f"setup(name='adapters', version='{adapters.__version__}', package_dir={{'': 'src'}}, "
        "packages=find_packages('src'))\n",
        encoding="utf-8",
    )
    (tree / "pyproject.toml").write_text("[tool.black]\nline-length = 119\n", encoding="utf-8")
    (tree / "setup.cfg").write_text(ISORT_CFG, encoding="utf-8")
    return tree


@pytest.fixture(scope="module")
def source_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_source_tree(tmp_path_factory.mktemp("source"))


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, source_tree: Path) -> upstream.ExportResult:
    out = tmp_path_factory.mktemp("export")
    return upstream.export(out, source=source_tree, measure=False, format_code=HAS_FORMATTERS)


def _function(tree: ast.Module, *path: str) -> ast.FunctionDef:
    body = tree.body
    node = None
    for name in path:
        node = next(n for n in body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == name)
        body = node.body
    assert isinstance(node, ast.FunctionDef)
    return node


def _without_docstring(node: ast.FunctionDef) -> str:
    body = node.body
    if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and len(body) > 1:
        body = body[1:]
    return ast.dump(ast.Module(body=body, type_ignores=[]))


def _ours(module: str, *path: str) -> ast.FunctionDef:
    source = inspect.getsource(importlib.import_module(module))
    return _function(ast.parse(source), *path)


def _generated(result: upstream.ExportResult, relative: str) -> str:
    return (result.patched / relative).read_text(encoding="utf-8")


def _tree_env(tree: Path) -> dict[str, str]:
    return upstream.tree_env(tree)


# -- the export's outputs ------------------------------------------------------------------------------------------
def test_outputs(exported: upstream.ExportResult) -> None:
    version = adapters.__version__
    assert exported.version == version
    assert exported.pristine == exported.out / f"adapters-{version}"
    assert exported.patched == exported.out / f"adapters-{version}-patched"
    assert sorted(exported.changed_files) == sorted(EXPECTED_FILES)
    assert (exported.pristine / upstream.REFT_PATH).read_text(encoding="utf-8") == STOCK_REFT
    manifest = json.loads((exported.out / "export.json").read_text(encoding="utf-8"))
    assert manifest["patched"] == str(exported.patched)
    text = exported.pull_request.read_text(encoding="utf-8")
    for message in (
        "\"orgqr_cuda\" not implemented for 'BFloat16'",
        "\"orgqr_cpu\" not implemented for 'Half'",
        "mat1 and mat2 must have the same dtype",
    ):
        assert message in text
    assert "--skip-measure" in text  # no table without a measurement


def test_patch_is_git_style(exported: upstream.ExportResult) -> None:
    diff = exported.patch.read_text(encoding="utf-8")
    headers = re.findall(r"^diff --git a/(\S+) b/(\S+)$", diff, re.MULTILINE)
    assert sorted(a for a, _ in headers) == sorted(EXPECTED_FILES)
    assert all(a == b for a, b in headers)
    assert diff.count("new file mode 100644") == 2
    assert "--- /dev/null\n+++ b/src/adapters/methods/orthogonal.py" in diff
    assert str(exported.out) not in diff


def test_git_apply_check_on_the_pristine_tree(exported: upstream.ExportResult, tmp_path: Path) -> None:
    copy = tmp_path / "pristine"
    shutil.copytree(exported.pristine, copy)
    env = {**os.environ, "GIT_CEILING_DIRECTORIES": str(tmp_path)}
    proc = subprocess.run(
        ["git", "apply", "--check", "-v", str(exported.patch)], cwd=copy, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    for relative in EXPECTED_FILES:
        assert f"Checking patch {relative}..." in proc.stdout + proc.stderr
    assert "Checking patch" in exported.git_apply_check
    assert upstream.main(["check-patch", str(exported.out)]) == 0


def test_check_patch_rejects_a_patch_that_does_not_apply(exported: upstream.ExportResult, tmp_path: Path) -> None:
    broken = tmp_path / "broken.patch"
    broken.write_text(
        exported.patch.read_text(encoding="utf-8").replace("-        source_states = ", "-        src_states = "),
        encoding="utf-8",
    )
    with pytest.raises(ExportError, match="git apply --check rejected"):
        upstream.check_patch(exported.pristine, broken)


# -- generated from our modules, standalone ----------------------------------------------------------------------
def test_generated_module_does_not_need_adapters_reft(exported: upstream.ExportResult) -> None:
    text = _generated(exported, upstream.ORTHOGONAL_PATH)
    tree = ast.parse(text, feature_version=(3, 9))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            assert not any(a.name.split(".")[0] == "adapters_reft" for a in node.names)
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0 and (node.module or "").split(".")[0] != "adapters_reft"
    assert "adapters_reft" not in text
    assert "adapters_reft" not in _generated(exported, upstream.REFT_PATH)
    assert "ADAPTERS_REFT_UPCAST" in text  # the cast-policy switch keeps its name


def test_generated_module_is_our_source(exported: upstream.ExportResult) -> None:
    generated = ast.parse(_generated(exported, upstream.ORTHOGONAL_PATH))
    # sentinel: _map verbatim (modulo formatting), docstring included
    assert ast.dump(_function(generated, "_map")) == ast.dump(_ours("adapters_reft.orthogonal", "_map"))
    # every function of both modules is there, with ``compat.X`` folded to ``X``
    for module in ("adapters_reft.compat", "adapters_reft.orthogonal"):
        ours = ast.parse(inspect.getsource(importlib.import_module(module)))
        for node in ours.body:
            if isinstance(node, ast.FunctionDef):
                folded = ast.parse(re.sub(r"\bcompat\.", "", textwrap.dedent(ast.unparse(node)))).body[0]
                assert _without_docstring(_function(generated, node.name)) == _without_docstring(folded), node.name
    compute = _function(generated, "DtypeSafeOrthogonal", "_compute")
    assert "compute_dtype(self.orthogonal_map" in ast.unparse(compute)


def test_regenerated_not_copied() -> None:
    """The generator reads the installed modules: a change to ours shows up in the generated text."""
    module = importlib.import_module("adapters_reft.orthogonal")
    original = module._map.__doc__
    text = orthogonal_module_source()
    assert original is not None and original in text
    assert inspect.getsource(module._map).strip() in text


def test_reft_forward_is_ours_under_the_release_signature(exported: upstream.ExportResult) -> None:
    patched = ast.parse(_generated(exported, upstream.REFT_PATH))
    stock = ast.parse(STOCK_REFT)
    forward = _function(patched, "ReftUnit", "forward")
    assert ast.dump(forward.args) == ast.dump(_function(stock, "ReftUnit", "forward").args)  # def forward(self, x)
    assert _without_docstring(forward) == _without_docstring(_ours("adapters_reft.reft", "ReftUnit", "intervene"))
    init = _function(patched, "ReftUnit", "__init__")
    assert ast.dump(init.args) == ast.dump(_function(stock, "ReftUnit", "__init__").args)
    init_source = ast.unparse(init)
    assert "dtype_safe_orthogonal(projection)" in init_source
    assert "parametrizations.orthogonal" not in init_source
    assert "float32" not in init_source and "logger" not in init_source
    assert _function(patched, "_autocast_enabled")  # helper the forward uses, copied from ours
    text = _generated(exported, upstream.REFT_PATH)
    assert "from .orthogonal import orthogonal as dtype_safe_orthogonal" in text
    assert "import torch.nn.functional as F" in text


def test_gather_creates_empty_slices_in_the_hidden_dtype(exported: upstream.ExportResult) -> None:
    gather = ast.unparse(
        _function(ast.parse(_generated(exported, upstream.REFT_PATH)), "ReftModule", "_gather_adapted_states")
    )
    assert gather.count("torch.zeros(bsz, 0, ddim, device=hidden_states.device, dtype=hidden_states.dtype)") == 2


@pytest.mark.skipif(not HAS_FORMATTERS, reason="needs black and isort")
def test_changed_files_are_black_and_isort_clean(exported: upstream.ExportResult) -> None:
    files = [str(exported.patched / f) for f in EXPECTED_FILES]
    black = subprocess.run(
        [sys.executable, "-m", "black", "--check", "--line-length", "119", *files], capture_output=True, text=True
    )
    assert black.returncode == 0, black.stderr
    isort = subprocess.run(
        [sys.executable, "-m", "isort", "--check-only", "--settings-path", str(exported.patched), *files],
        capture_output=True,
        text=True,
    )
    assert isort.returncode == 0, isort.stdout + isort.stderr


# -- the patched tree works on its own ---------------------------------------------------------------------------
def _standalone(tree: Path) -> dict[str, object]:
    proc = subprocess.run(
        [sys.executable, "-c", upstream.STANDALONE_CHECK],
        env=_tree_env(tree),
        cwd=tree,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_patched_tree_runs_bf16_loreft_without_adapters_reft(exported: upstream.ExportResult) -> None:
    report = _standalone(exported.patched)
    assert Path(str(report["reft"])).is_relative_to(exported.patched / "src")
    assert Path(str(report["orthogonal"])).is_relative_to(exported.patched / "src")
    assert report["checks"] == {
        "loreft-bf16-forward": "ok",
        "noreft-bf16-forward": "ok",
        "loreft-bf16-backward": "ok",
    }
    assert report["adapters_reft_imported"] is False


def test_pristine_tree_fails_the_same_check(exported: upstream.ExportResult) -> None:
    report = _standalone(exported.pristine)
    assert Path(str(report["reft"])).is_relative_to(exported.pristine / "src")
    assert report["orthogonal"] is None
    assert "must have the same dtype" in str(report["checks"]["loreft-bf16-forward"])
    assert report["checks"]["loreft-bf16-backward"] != "ok"


# -- failing loudly ----------------------------------------------------------------------------------------------
def test_refuses_a_patched_tree(exported: upstream.ExportResult, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="patched already"):
        upstream.export(tmp_path, source=exported.patched, measure=False, format_code=False)


def test_refuses_to_overwrite_without_force(exported: upstream.ExportResult, source_tree: Path) -> None:
    with pytest.raises(ExportError, match="--force"):
        upstream.export(exported.out, source=source_tree, measure=False, format_code=False)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda t: t.replace("device=hidden_states.device)", "device=hidden_states.device, dtype=torch.float32)"),
            "two 'torch.zeros",
        ),
        (
            lambda t: t.replace("def forward(self, x):", "def forward(self, states):"),
            r"ReftUnit.forward takes \(self, states\)",
        ),
        (lambda t: t.replace("class ReftUnit(", "class ReftIntervention("), "exactly one ReftUnit"),
        (
            lambda t: t.replace("nn.utils.parametrizations.orthogonal(projection)", "make_orthogonal(projection)"),
            "expected one call",
        ),
    ],
    ids=["gather", "forward-signature", "no-unit", "no-orthogonal-call"],
)
def test_unexpected_reft_fails_loudly(change, message: str) -> None:  # type: ignore[no-untyped-def]
    changed = change(STOCK_REFT)
    assert changed != STOCK_REFT
    with pytest.raises(ExportError, match=message):
        patch_reft_source(changed)


def test_release_without_the_half_precision_branch() -> None:
    """adapters 1.0.x has no half-precision warning/upcast block: the rest of the edit still applies."""
    without = re.sub(
        r"\n\s*# orthogonal is not implemented for half precision\n\s*if dtype in \[.*?\n(\s*)projection = projection\.to\(dtype=torch\.float32\)",
        "",
        STOCK_REFT,
        flags=re.DOTALL,
    )
    assert "UserWarning" not in without
    patched = patch_reft_source(without)
    assert "dtype_safe_orthogonal(projection)" in patched
    assert patched.count("dtype=hidden_states.dtype") == 2


def test_missing_tree_and_missing_version(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="not an adapters source tree"):
        upstream.export(tmp_path / "out", source=tmp_path, measure=False, format_code=False)
    with pytest.raises(ExportError, match="--adapters-version"):
        upstream.export(tmp_path / "out")


# -- command line --------------------------------------------------------------------------------------------------
def test_cli(source_tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    argv = ["export-upstream", "--source", str(source_tree), "--out", str(out), "--skip-measure", "--no-format"]
    assert cli(argv) == 0
    assert "git apply --check: ok" in capsys.readouterr().out
    assert (out / upstream.PATCH_NAME).is_file()
    assert cli(argv) == 1  # exists now
    assert "--force" in capsys.readouterr().err
    assert cli([*argv, "--force"]) == 0
    with pytest.raises(SystemExit) as exit_info:
        cli(["export-upstream", "--help"])
    assert exit_info.value.code == 0
    assert "--adapters-version" in capsys.readouterr().out


@pytest.mark.slow
def test_measured_table(source_tree: Path, tmp_path: Path) -> None:
    """Stock vs patched through PYTHONPATH, no patch() call: a failing stock setup passes patched."""
    result = upstream.export(
        tmp_path, source=source_tree, scenarios=["bf16-default", "noreft-bf16"], format_code=HAS_FORMATTERS
    )
    assert result.ok, result.problems
    rows = {r["name"]: r for r in result.scenario_rows}
    assert set(rows) == {"bf16-default", "noreft-bf16"}
    for row in rows.values():
        assert row["patched"]["ok"] and not row["stock"]["ok"]  # type: ignore[index]
    assert re.search(r": OK( \(skipped=\d+\))?$", result.upstream_tests["patched"])  # fp16 skipped on torch 2.2 CPU
    assert "FAILED" in result.upstream_tests["stock"]
    text = result.pull_request.read_text(encoding="utf-8")
    assert "| bf16 model, LoReftConfig() | ❌ RuntimeError: mat1 and mat2 must have the same dtype" in text
    assert "| **passing** | **0/2** | **2/2** |" in text
    assert "max |logits(stock) − logits(this PR)| = " in text
