"""``python -m adapters_reft export-upstream``: write this fix into an adapters source tree, as a pull request.

::

    python -m adapters_reft export-upstream --adapters-version 1.3.0 --out out/upstream
    python -m adapters_reft export-upstream --source ~/src/adapters --out out/upstream   # a git checkout

The release's source distribution is fetched from the package registry (``pip download --no-deps
--no-binary :all: adapters==X``) unless ``--source`` names a tree. ``OUT`` receives:

* ``adapters-X/``: the pristine tree, and ``adapters-X-patched/``: the same tree with the fix written in natively
  (``src/adapters/methods/orthogonal.py`` generated from :mod:`adapters_reft.compat` and
  :mod:`adapters_reft.orthogonal`; ``src/adapters/methods/reft.py`` edited, with ``ReftUnit.forward`` generated
  from :mod:`adapters_reft.reft`; ``tests/test_methods/test_reft_precision.py``), formatted with black (line
  length 119) and isort as upstream is (see :mod:`adapters_reft.upstream_codegen`);
* ``reft-dtype-safe.patch``: a git-style unified diff of the two trees, checked with ``git apply --check`` on a
  copy of the pristine tree (and applied, and compared with the patched tree) before the command succeeds;
* ``PULL_REQUEST.md``: problem, change, a before/after table measured by running
  ``python -m adapters_reft.scenarios --json`` with each tree first on ``PYTHONPATH`` (no ``patch()`` call), the
  new upstream tests on both trees, float32 parity, compatibility notes;
* ``scenarios-stock.json``, ``scenarios-patched.json`` and ``export.json`` (what was written where).

``python -m adapters_reft.upstream check-patch OUT`` re-runs the ``git apply --check``;
``python -m adapters_reft.upstream check-installed OUT`` checks that the installed ``adapters`` is the patched
tree's and works without adapters_reft (the ``upstream`` tox environment uses both).
"""

from __future__ import annotations

import argparse
import difflib
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from .upstream_codegen import ExportError, orthogonal_module_source, patch_reft_source
from .upstream_templates import PRECISION_TEST_PATH, PullRequestFacts, precision_test_module, pull_request_markdown

__all__ = [
    "ExportError",
    "ExportResult",
    "add_arguments",
    "check_installed",
    "check_patch",
    "export",
    "run",
    "tree_diff",
]

PATCH_NAME = "reft-dtype-safe.patch"
PR_NAME = "PULL_REQUEST.md"
MANIFEST_NAME = "export.json"
REFT_PATH = "src/adapters/methods/reft.py"
ORTHOGONAL_PATH = "src/adapters/methods/orthogonal.py"
IGNORED = (
    ".git",
    "__pycache__",
    "*.pyc",
    ".tox",
    ".venv",
    ".pytest_cache",
    ".mypy_cache",
    ".ruff_cache",
    "*.egg-info",
)
FORMATTERS = ("black", "isort")
BLACK_LINE_LENGTH = "119"

# Imports adapters with adapters_reft made unimportable, then runs bf16 LoReFT/NoReFT forwards and a bf16 LoReFT
# training step on a tiny Llama; prints a JSON line. Used by check-installed and by the tests.
STANDALONE_CHECK = r"""
import importlib.abc, json, sys

class _NoAdaptersReft(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "adapters_reft" or name.startswith("adapters_reft."):
            raise ImportError("adapters_reft is blocked: the exported tree must work without it")
        return None

sys.meta_path.insert(0, _NoAdaptersReft())
import torch
import adapters
import adapters.methods.reft as reft
try:
    import adapters.methods.orthogonal as orthogonal
except ImportError:  # a stock tree
    orthogonal = None
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging

logging.set_verbosity_error()
report = {"reft": reft.__file__, "orthogonal": getattr(orthogonal, "__file__", None), "checks": {}}

def llama(dtype):
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=96, max_position_embeddings=64)
    model = LlamaForCausalLM(config).to(dtype)
    adapters.init(model)
    return model

ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(1))
for name, config in (("loreft", adapters.LoReftConfig()), ("noreft", adapters.NoReftConfig())):
    model = llama(torch.bfloat16)
    model.add_adapter("reft", config=config)
    model.set_active_adapters("reft")
    try:
        with torch.no_grad():
            hidden = model(ids, output_hidden_states=True).hidden_states[-1]  # logits may be upcast to fp32
        ok = hidden.dtype == torch.bfloat16 and bool(torch.isfinite(hidden).all())
        report["checks"][name + "-bf16-forward"] = "ok" if ok else f"bad hidden states ({hidden.dtype})"
    except Exception as exc:
        report["checks"][name + "-bf16-forward"] = f"{type(exc).__name__}: {exc}"
model = llama(torch.bfloat16)
model.add_adapter("reft", config=adapters.LoReftConfig())
model.train_adapter("reft")
try:
    loss = model(ids, labels=ids).loss
    loss.backward()
    parametrization = type(model.model.layers[0].reft_layer.refts["reft"].units[0].projection.parametrizations.weight[0])
    ok = bool(torch.isfinite(loss)) and parametrization.__module__ == getattr(orthogonal, "__name__", None)
    report["checks"]["loreft-bf16-backward"] = "ok" if ok else f"loss {loss}, parametrization {parametrization}"
except Exception as exc:
    report["checks"]["loreft-bf16-backward"] = f"{type(exc).__name__}: {exc}"
report["adapters_reft_imported"] = any(m.split(".")[0] == "adapters_reft" for m in sys.modules)
print(json.dumps(report))
"""

FP32_LOGITS = r"""
import sys, torch, adapters
from adapters_reft.scenarios import tiny_llama
from transformers.utils import logging

logging.set_verbosity_error()
model = tiny_llama(torch.float32)
model.add_adapter("reft", config=adapters.LoReftConfig())
model.set_active_adapters("reft")
model.eval()
ids = torch.randint(0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    torch.save(model(ids).logits, sys.argv[1])
"""


# -- command line ------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--adapters-version", metavar="X", help="adapters release, e.g. 1.3.0 (default with --source: the tree's)"
    )
    parser.add_argument(
        "--source", metavar="DIR", type=Path, help="an adapters source tree instead of the registry sdist"
    )
    parser.add_argument("--out", metavar="DIR", type=Path, required=True, help="where the trees, patch and PR go")
    parser.add_argument("--force", action="store_true", help="replace trees a previous export left in OUT")
    parser.add_argument("--skip-measure", action="store_true", help="do not run the before/after scenarios and tests")
    parser.add_argument("--scenarios", nargs="+", metavar="NAME", help="measure only these scenarios (default: all)")
    parser.add_argument("--no-format", action="store_true", help="do not run black and isort on the changed files")
    parser.add_argument("--python", default=sys.executable, help="interpreter for the measurements (default: this)")


def run(args: argparse.Namespace) -> int:
    try:
        result = export(
            out=args.out,
            version=args.adapters_version,
            source=args.source,
            force=args.force,
            measure=not args.skip_measure,
            scenarios=args.scenarios,
            format_code=not args.no_format,
            python=args.python,
            command=_command_line(args),
        )
    except ExportError as exc:
        print(f"export-upstream: error: {exc}", file=sys.stderr)
        return 1
    print(result.summary())
    return 0 if result.ok else 1


def _command_line(args: argparse.Namespace) -> str:
    parts = ["python", "-m", "adapters_reft", "export-upstream"]
    if args.adapters_version:
        parts += ["--adapters-version", args.adapters_version]
    if args.source:
        parts += ["--source", str(args.source)]
    parts += ["--out", str(args.out)]
    if args.scenarios:
        parts += ["--scenarios", *args.scenarios]
    parts += [flag for flag, on in (("--skip-measure", args.skip_measure), ("--no-format", args.no_format)) if on]
    return shlex.join(parts)


# -- the export --------------------------------------------------------------------------------------------------
@dataclass
class ExportResult:
    version: str
    out: Path
    pristine: Path
    patched: Path
    patch: Path
    pull_request: Path
    changed_files: list[str]
    git_apply_check: str
    scenario_rows: list[dict[str, object]] = field(default_factory=list)
    upstream_tests: dict[str, str] = field(default_factory=dict)
    measured: bool = False
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        lines = [
            f"adapters {self.version}: wrote {self.patched}",
            f"  patch: {self.patch} ({len(self.changed_files)} files; git apply --check: ok)",
            f"  pull request: {self.pull_request}",
        ]
        if self.measured:
            stock = sum(bool(r["stock"]["ok"]) for r in self.scenario_rows)  # type: ignore[index]
            patched = sum(bool(r["patched"]["ok"]) for r in self.scenario_rows)  # type: ignore[index]
            lines.append(
                f"  scenarios: stock {stock}/{len(self.scenario_rows)}, patched {patched}/{len(self.scenario_rows)}"
            )
            lines += [f"  upstream tests, {tree} tree: {summary}" for tree, summary in self.upstream_tests.items()]
        lines += [f"  PROBLEM: {p}" for p in self.problems]
        return "\n".join(lines)


def export(
    out: Path,
    version: str | None = None,
    source: Path | None = None,
    *,
    force: bool = False,
    measure: bool = True,
    scenarios: list[str] | None = None,
    format_code: bool = True,
    python: str = sys.executable,
    command: str | None = None,
) -> ExportResult:
    """Write the fix into a copy of adapters ``version`` (or of ``source``) under ``out``; see the module doc."""
    if version is None and source is None:
        raise ExportError("give --adapters-version (the release to fetch) or --source (a tree)")
    if format_code:
        missing = [tool for tool in FORMATTERS if importlib.util.find_spec(tool) is None]
        if missing:
            raise ExportError(
                f"{' and '.join(missing)} not installed: pip install 'black~=24.4.0' 'isort>=5.5.4' "
                "(upstream's pins), or pass --no-format"
            )
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if version is not None and not force:  # fail before a download
        _check_free(out / f"adapters-{version}", out / f"adapters-{version}-patched")
    with tempfile.TemporaryDirectory(prefix="adapters-reft-export-") as work:
        if source is None:
            assert version is not None
            tree = download_sdist(version, Path(work))
        else:
            tree = Path(source).resolve()
        if not (tree / REFT_PATH).is_file():
            raise ExportError(f"{tree} is not an adapters source tree: {REFT_PATH} is missing")
        tree_version = read_version(tree)
        if version is None:
            version = tree_version
        elif tree_version and tree_version != version:
            print(f"export-upstream: note: the tree says adapters {tree_version}, named it {version}", file=sys.stderr)
        if not version:
            raise ExportError(f"cannot read __version__ from {tree}/src/adapters/__init__.py; give --adapters-version")
        pristine, patched = out / f"adapters-{version}", out / f"adapters-{version}-patched"
        if not force:
            _check_free(pristine, patched)
        for folder in (pristine, patched):
            if folder.exists():
                shutil.rmtree(folder)
        shutil.copytree(tree, pristine, ignore=shutil.ignore_patterns(*IGNORED))
    shutil.copytree(pristine, patched)

    written = write_fix(patched)
    if format_code:
        format_files(patched, written)
    smoke_test_orthogonal(patched / ORTHOGONAL_PATH)

    diff, changed, new = tree_diff(pristine, patched)
    patch = out / PATCH_NAME
    patch.write_text(diff, encoding="utf-8")
    git_output = check_patch(pristine, patch, patched)
    _write_manifest(out, version, pristine, patched, patch, changed)

    result = ExportResult(version, out, pristine, patched, patch, out / PR_NAME, changed, git_output)
    facts = PullRequestFacts(
        adapters_version=version,
        changed_files=changed,
        new_files=new,
        diffstat=diffstat(diff),
        git_apply_check=git_output,
        command=command or f"python -m adapters_reft export-upstream --adapters-version {version} --out {out}",
        versions=_versions(),
        measured=measure,
    )
    if measure:
        _measure(result, facts, python, scenarios)
    result.pull_request.write_text(pull_request_markdown(facts), encoding="utf-8")
    return result


def _check_free(*folders: Path) -> None:
    for folder in folders:
        if folder.exists():
            raise ExportError(f"{folder} exists (from an earlier export?); pass --force to replace it")


def read_version(tree: Path) -> str | None:
    init = tree / "src" / "adapters" / "__init__.py"
    match = re.search(r"^__version__\s*=\s*[\"']([^\"']+)[\"']", init.read_text(encoding="utf-8"), re.MULTILINE)
    return match.group(1) if match else None


def download_sdist(version: str, work: Path) -> Path:
    """Fetch and unpack the sdist of adapters ``version`` from the package registry; returns the tree."""
    if importlib.util.find_spec("pip") is None:
        raise ExportError("pip is needed to fetch the sdist (python -m pip install pip), or pass --source DIR")
    download = work / "download"
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
    command += ["--disable-pip-version-check", f"adapters=={version}", "-d", str(download)]
    print(f"export-upstream: {shlex.join(command)}", file=sys.stderr)
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ExportError(f"pip download failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-2000:]}")
    archives = sorted(download.glob("adapters-*.tar.gz")) + sorted(download.glob("adapters-*.zip"))
    if len(archives) != 1:
        raise ExportError(f"expected one adapters sdist in {download}, found {[a.name for a in archives]}")
    unpacked = work / "unpacked"
    unpacked.mkdir()
    if archives[0].name.endswith(".zip"):
        with zipfile.ZipFile(archives[0]) as archive:
            archive.extractall(unpacked)
    else:
        with tarfile.open(archives[0]) as archive:
            if hasattr(tarfile, "data_filter"):
                archive.extractall(unpacked, filter="data")
            else:  # Python without extraction filters (< 3.10.12 / 3.11.4)
                archive.extractall(unpacked)
    roots = [p for p in unpacked.iterdir() if p.is_dir()]
    if len(roots) != 1:
        raise ExportError(f"the sdist {archives[0].name} does not unpack to one folder")
    return roots[0]


def write_fix(tree: Path) -> list[str]:
    """Write the fix into ``tree``; returns the paths written (relative, posix)."""
    reft = tree / REFT_PATH
    new_reft = patch_reft_source(reft.read_text(encoding="utf-8"))
    for relative in (ORTHOGONAL_PATH, PRECISION_TEST_PATH):
        if (tree / relative).exists():
            raise ExportError(f"{relative} exists in {tree}: the tree looks patched already, or upstream changed")
    reft.write_text(new_reft, encoding="utf-8")
    (tree / ORTHOGONAL_PATH).write_text(orthogonal_module_source(), encoding="utf-8")
    test = tree / PRECISION_TEST_PATH
    test.parent.mkdir(parents=True, exist_ok=True)
    test.write_text(precision_test_module(), encoding="utf-8")
    return [REFT_PATH, ORTHOGONAL_PATH, PRECISION_TEST_PATH]


def _has_isort_config(tree: Path) -> bool:
    for name, marker in (
        (".isort.cfg", ""),
        ("setup.cfg", "[isort]"),
        ("tox.ini", "[isort]"),
        ("pyproject.toml", "[tool.isort]"),
    ):
        path = tree / name
        if path.is_file() and marker in path.read_text(encoding="utf-8", errors="replace"):
            return True
    return False


def format_files(tree: Path, files: list[str]) -> None:
    """isort then black on ``files`` only, with the tree's own settings (upstream: black -l 119, isort in setup.cfg)."""
    isort = [sys.executable, "-m", "isort", "--quiet"]
    isort += (
        ["--settings-path", str(tree)]
        if _has_isort_config(tree)
        else ["--profile", "black", "--line-length", BLACK_LINE_LENGTH, "--lines-after-imports", "2"]
    )
    black = [sys.executable, "-m", "black", "--quiet", "--line-length", BLACK_LINE_LENGTH]
    for command in (isort, black):
        proc = subprocess.run([*command, *files], cwd=tree, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise ExportError(f"{command[2]} failed on {files} (exit {proc.returncode}):\n{proc.stderr[-2000:]}")


def smoke_test_orthogonal(path: Path) -> None:
    """Run the generated module on its own (no package, no adapters_reft): a bf16 parametrized weight."""
    import torch

    namespace: dict[str, object] = {"__name__": "adapters_methods_orthogonal_smoke_test"}
    try:
        exec(compile(path.read_text(encoding="utf-8"), str(path), "exec"), namespace)
        layer = namespace["orthogonal"](torch.nn.Linear(16, 4, bias=False, dtype=torch.bfloat16))  # type: ignore[operator]
        weight = layer.weight.float()
        error = (weight @ weight.T - torch.eye(4)).abs().max().item()
    except Exception as exc:
        raise ExportError(f"the generated {ORTHOGONAL_PATH} fails on its own: {type(exc).__name__}: {exc}") from exc
    if layer.weight.dtype != torch.bfloat16 or error > 5e-2:
        raise ExportError(f"the generated {ORTHOGONAL_PATH} gives a non-orthonormal bf16 weight (error {error})")


# -- the patch ---------------------------------------------------------------------------------------------------
def _files(tree: Path) -> set[str]:
    return {p.relative_to(tree).as_posix() for p in tree.rglob("*") if p.is_file()}


def _diff_lines(lines: list[str]) -> list[str]:
    out = []
    for line in lines:
        if line.endswith("\n"):
            out.append(line)
        else:
            out.append(line + "\n\\ No newline at end of file\n")
    return out


def tree_diff(pristine: Path, patched: Path) -> tuple[str, list[str], list[str]]:
    """(git-style unified diff with a/ b/ prefixes, changed paths, new paths) from ``pristine`` to ``patched``."""
    chunks: list[str] = []
    changed: list[str] = []
    new: list[str] = []
    for relative in sorted(_files(pristine) | _files(patched)):
        a, b = pristine / relative, patched / relative
        old_bytes = a.read_bytes() if a.is_file() else None
        new_bytes = b.read_bytes() if b.is_file() else None
        if old_bytes == new_bytes:
            continue
        try:
            old_lines = old_bytes.decode("utf-8").splitlines(keepends=True) if old_bytes is not None else []
            new_lines = new_bytes.decode("utf-8").splitlines(keepends=True) if new_bytes is not None else []
        except UnicodeDecodeError as exc:
            raise ExportError(f"{relative} differs and is not UTF-8 text; the export only writes text") from exc
        header = [f"diff --git a/{relative} b/{relative}\n"]
        if old_bytes is None:
            header.append("new file mode 100644\n")
            new.append(relative)
        elif new_bytes is None:
            header.append("deleted file mode 100644\n")
        hunks = list(
            difflib.unified_diff(
                old_lines,
                new_lines,
                "/dev/null" if old_bytes is None else f"a/{relative}",
                "/dev/null" if new_bytes is None else f"b/{relative}",
                n=3,
            )
        )
        body = [hunks[0].rstrip("\n") + "\n", hunks[1].rstrip("\n") + "\n", *_diff_lines(hunks[2:])]
        chunks.append("".join(header + body))
        changed.append(relative)
    if not changed:
        raise ExportError("the patched tree does not differ from the pristine one")
    return "".join(chunks), changed, new


def diffstat(diff: str) -> str:
    stats: dict[str, list[int]] = {}
    current = None
    for line in diff.splitlines():
        if line.startswith("diff --git "):
            current = line.split(" b/", 1)[1]
            stats[current] = [0, 0]
        elif current and line.startswith("+") and not line.startswith("+++"):
            stats[current][0] += 1
        elif current and line.startswith("-") and not line.startswith("---"):
            stats[current][1] += 1
    width = max(len(p) for p in stats)
    scale = min(1.0, 50 / max(a + d for a, d in stats.values()))  # bars at most 50 wide, as git's

    def bar(a: int, d: int) -> str:
        return "+" * max(int(a * scale), a > 0) + "-" * max(int(d * scale), d > 0)

    lines = [f" {p:<{width}} | {a + d:>4} {bar(a, d)}" for p, (a, d) in stats.items()]
    added, deleted = sum(a for a, _ in stats.values()), sum(d for _, d in stats.values())
    lines.append(f" {len(stats)} files changed, {added} insertions(+), {deleted} deletions(-)")
    return "\n".join(lines)


def check_patch(pristine: Path, patch: Path, patched: Path | None = None) -> str:
    """``git apply --check`` of ``patch`` on a copy of ``pristine``; with ``patched``, also apply it and compare.

    The copy lives in a fresh temporary folder with ``GIT_CEILING_DIRECTORIES`` set, so git never treats an
    enclosing repository as the work tree (inside one, ``git apply`` silently skips paths outside the current
    folder). Returns git's output; raises :class:`ExportError` if the patch does not apply or differs.
    """
    git = shutil.which("git")
    if git is None:
        raise ExportError("git is needed to check the patch (git apply --check)")
    with tempfile.TemporaryDirectory(prefix="adapters-reft-apply-") as tmp:
        tree = Path(tmp) / pristine.name
        shutil.copytree(pristine, tree)
        env = {**os.environ, "GIT_CEILING_DIRECTORIES": str(Path(tmp).resolve())}
        env.pop("GIT_DIR", None)
        env.pop("GIT_WORK_TREE", None)
        check = subprocess.run(
            [git, "apply", "--check", "-v", str(patch.resolve())], cwd=tree, env=env, capture_output=True, text=True
        )
        output = (check.stdout + check.stderr).strip()
        if check.returncode != 0:
            raise ExportError(f"git apply --check rejected {patch} on {pristine}:\n{output}")
        if patched is not None:
            apply = subprocess.run(
                [git, "apply", str(patch.resolve())], cwd=tree, env=env, capture_output=True, text=True
            )
            if apply.returncode != 0:
                raise ExportError(f"git apply failed after --check passed:\n{apply.stdout}{apply.stderr}")
            differing = [
                p
                for p in sorted(_files(tree) | _files(patched))
                if not ((tree / p).is_file() and (patched / p).is_file())
                or (tree / p).read_bytes() != (patched / p).read_bytes()
            ]
            if differing:
                raise ExportError(f"the applied patch does not reproduce the patched tree: {differing[:10]}")
    return f"$ git apply --check -v {patch.name}\n{output}"


def _write_manifest(out: Path, version: str, pristine: Path, patched: Path, patch: Path, changed: list[str]) -> None:
    manifest = {
        "adapters_version": version,
        "pristine": str(pristine),
        "patched": str(patched),
        "patch": str(patch),
        "changed_files": changed,
    }
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def _read_manifest(out: Path) -> dict[str, object]:
    path = Path(out) / MANIFEST_NAME
    if not path.is_file():
        raise ExportError(f"{path} is missing: run export-upstream with --out {out} first")
    return json.loads(path.read_text(encoding="utf-8"))


# -- measurements ------------------------------------------------------------------------------------------------
def _versions() -> dict[str, str]:
    versions = {"python": ".".join(map(str, sys.version_info[:3]))}
    for name in ("torch", "transformers"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def tree_env(tree: Path) -> dict[str, str]:
    """The environment that makes ``tree/src`` shadow any installed adapters."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tree / "src"), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    return env


def _run_python(
    python: str, args: list[str], tree: Path, cwd: Path, timeout: float = 1800
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [python, *args], cwd=cwd, env=tree_env(tree), capture_output=True, text=True, timeout=timeout, check=False
    )


def adapters_origin(python: str, tree: Path, cwd: Path) -> str:
    """Where ``import adapters.methods.reft`` comes from with ``tree`` on PYTHONPATH; must be inside the tree."""
    proc = _run_python(python, ["-c", "import adapters.methods.reft as m; print(m.__file__)"], tree, cwd)
    if proc.returncode != 0:
        raise ExportError(f"cannot import adapters from {tree}/src with {python}:\n{proc.stderr[-2000:]}")
    origin = proc.stdout.strip().splitlines()[-1]
    if not Path(origin).resolve().is_relative_to((tree / "src").resolve()):
        raise ExportError(f"with {tree}/src on PYTHONPATH adapters still comes from {origin}")
    return origin


def run_scenarios_in(python: str, tree: Path, cwd: Path, names: list[str] | None) -> list[dict[str, object]]:
    proc = _run_python(python, ["-m", "adapters_reft.scenarios", "--json", *(names or [])], tree, cwd)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("[")]
    if not lines:
        raise ExportError(
            f"the scenarios printed no results for {tree} (exit {proc.returncode}):\n{proc.stderr[-2000:]}"
        )
    return json.loads(lines[-1])


def run_upstream_tests(python: str, tree: Path, tests_from: Path, cwd: Path) -> str:
    """Run the new upstream test module (from ``tests_from``) against ``tree``'s adapters; unittest's verdict."""
    test = tests_from / PRECISION_TEST_PATH
    args = ["-m", "unittest", "discover", "-s", str(test.parent), "-p", test.name]
    proc = _run_python(python, args, tree, cwd)
    ran = re.search(r"^Ran (\d+) tests?", proc.stderr, re.MULTILINE)
    verdict = [line for line in proc.stderr.splitlines() if re.match(r"^(OK|FAILED)\b", line)]
    if not ran or not verdict:
        return f"did not run (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:] or ''}"
    return f"Ran {ran.group(1)} tests: {verdict[-1]}"


def fp32_parity(python: str, pristine: Path, patched: Path, cwd: Path) -> str:
    import torch

    logits = {}
    for label, tree in (("stock", pristine), ("patched", patched)):
        path = cwd / f"logits-{label}.pt"
        proc = _run_python(python, ["-c", FP32_LOGITS, str(path)], tree, cwd)
        if proc.returncode != 0:
            return f"not measured ({label}: {proc.stderr.strip().splitlines()[-1:]})"
        logits[label] = torch.load(path)
    delta = (logits["stock"] - logits["patched"]).abs().max().item()
    return f"LoReFT on a float32 tiny Llama, same seed: max |logits(stock) − logits(this PR)| = {delta:.1e}"


def _measure(result: ExportResult, facts: PullRequestFacts, python: str, names: list[str] | None) -> None:
    with tempfile.TemporaryDirectory(prefix="adapters-reft-measure-") as tmp:
        cwd = Path(tmp)
        for tree in (result.pristine, result.patched):
            origin = adapters_origin(python, tree, cwd)
            print(f"export-upstream: adapters from {origin}", file=sys.stderr)
        stock = run_scenarios_in(python, result.pristine, cwd, names)
        patched = run_scenarios_in(python, result.patched, cwd, names)
        (result.out / "scenarios-stock.json").write_text(json.dumps(stock, indent=2) + "\n", encoding="utf-8")
        (result.out / "scenarios-patched.json").write_text(json.dumps(patched, indent=2) + "\n", encoding="utf-8")
        by_name = {r["name"]: r for r in stock}
        result.scenario_rows = [
            {"name": p["name"], "description": p["description"], "stock": by_name.get(p["name"], {}), "patched": p}
            for p in patched
        ]
        result.upstream_tests = {
            "stock": run_upstream_tests(python, result.pristine, result.patched, cwd),
            "patched": run_upstream_tests(python, result.patched, result.patched, cwd),
        }
        facts.fp32_parity = fp32_parity(python, result.pristine, result.patched, cwd)
    result.measured = True
    facts.scenario_rows = result.scenario_rows
    facts.upstream_tests = result.upstream_tests
    failing = [r["name"] for r in patched if not r["ok"]]
    if failing:
        result.problems.append(f"scenarios failing on the patched tree: {', '.join(map(str, failing))}")
    if not result.upstream_tests["patched"].endswith("OK") and "OK (" not in result.upstream_tests["patched"]:
        result.problems.append(f"upstream tests on the patched tree: {result.upstream_tests['patched']}")


# -- checks used by the tox environment ----------------------------------------------------------------------------
def check_installed(out: Path, python: str = sys.executable) -> list[str]:
    """Problems with the installed adapters: not the patched tree's code, or not working without adapters_reft."""
    manifest = _read_manifest(out)
    patched = Path(str(manifest["patched"]))
    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        proc = subprocess.run(
            [python, "-c", STANDALONE_CHECK], cwd=tmp, env=env, capture_output=True, text=True, check=False
        )
    if proc.returncode != 0:
        return [f"the installed adapters fails without adapters_reft:\n{proc.stderr[-2000:]}"]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    problems = [f"{name}: {verdict}" for name, verdict in report["checks"].items() if verdict != "ok"]
    installed_root = Path(report["reft"]).resolve().parents[2]  # site-packages/adapters/methods/reft.py
    for relative in manifest["changed_files"]:  # type: ignore[union-attr]
        if not str(relative).startswith("src/adapters/"):
            continue
        installed = installed_root / str(relative).removeprefix("src/")
        if not installed.is_file() or installed.read_bytes() != (patched / str(relative)).read_bytes():
            problems.append(f"the installed {installed} is not the patched tree's {relative}")
    print(f"installed adapters.methods.reft: {report['reft']}")
    print(f"installed adapters.methods.orthogonal: {report['orthogonal']}")
    for name, verdict in report["checks"].items():
        print(f"  {name}: {verdict}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adapters_reft.upstream", description="checks of an export")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("check-patch", help="git apply --check the patch on the pristine tree").add_argument(
        "out", type=Path
    )
    sub.add_parser("check-installed", help="the installed adapters is the patched tree").add_argument("out", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "check-patch":
            manifest = _read_manifest(args.out)
            print(check_patch(Path(str(manifest["pristine"])), Path(str(manifest["patch"]))))
            return 0
        problems = check_installed(args.out)
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for problem in problems:
        print(f"PROBLEM: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
