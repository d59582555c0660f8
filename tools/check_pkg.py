"""Packaging check for adapters-reft, run by `tox -e pkg`.

1. `uv build` the sdist and, from it, the wheel.
2. Install the wheel, with its dependencies resolved, into a fresh venv and smoke-test it.
3. `pip install "adapters-reft @ git+file://<repo>@<HEAD sha>"` into another fresh venv and
   smoke-test that: the pinned-git-dependency path downstream projects use.

No CUDA torch is downloaded again: step 2 pins every dependency to the version the running (tox)
environment has, so uv links them from its cache; step 3's venv sees the running environment's
site-packages through a .pth file, so pip finds the dependencies already satisfied and installs
only adapters-reft itself.

The git install builds the committed HEAD, not uncommitted changes in the working tree.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

SMOKE = r"""
import sys
import torch, adapters, adapters_reft
from transformers import LlamaConfig, LlamaForCausalLM

print("adapters_reft", getattr(adapters_reft, "__version__", "?"), "from", adapters_reft.__file__)
print("torch", torch.__version__, "adapters", adapters.__version__)
where = sys.argv[1]
assert adapters_reft.__file__.startswith(where), (adapters_reft.__file__, where)

cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=100)
if hasattr(adapters_reft, "patch"):
    adapters_reft.patch()
    dtype = torch.bfloat16
else:  # the package API is not there yet: stock adapters only works in fp32
    print("adapters_reft.patch() missing: fp32 smoke test only")
    dtype = torch.float32
torch.manual_seed(0)
m = LlamaForCausalLM(cfg).to(dtype)
adapters.init(m)
m.add_adapter("r", config=adapters.LoReftConfig())
m.set_active_adapters("r")
out = m(torch.randint(0, 100, (2, 8))).logits
assert out.dtype == dtype and torch.isfinite(out).all(), (out.dtype, out)
print("smoke test ok:", dtype)
"""


def log(msg: str) -> None:
    print(f"[check_pkg] {msg}", flush=True)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    log("$ " + " ".join(str(c) for c in cmd))
    t = time.monotonic()
    out = subprocess.run([str(c) for c in cmd], check=True, **kw)
    log(f"  ({time.monotonic() - t:.1f} s)")
    return out


def find_uv() -> list[str]:
    for cand in (os.environ.get("TOX_UV_PATH"), shutil.which("uv")):
        if cand and shutil.which(cand):
            return [shutil.which(cand)]
    try:  # the `uv` PyPI package (pulled in by tox-uv) ships the binary
        from uv import find_uv_bin

        return [find_uv_bin()]
    except (ImportError, FileNotFoundError):
        sys.exit("check_pkg: uv not found (install tox-uv, or put uv on PATH)")


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def venv_purelib(python: Path) -> Path:
    out = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    )
    return Path(out.stdout.strip())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", type=Path, required=True, help="git checkout of adapters-reft")
    ap.add_argument("--work", type=Path, required=True, help="scratch directory (emptied first)")
    args = ap.parse_args()
    repo, work = args.repo.resolve(), args.work.resolve()
    uv = find_uv()
    t0 = time.monotonic()

    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    # the dependencies the running env has (tox deps), as exact pins
    frozen = work / "frozen.txt"
    freeze = subprocess.run(
        [*uv, "pip", "freeze", "--python", sys.executable], check=True, capture_output=True, text=True
    ).stdout
    frozen.write_text(freeze)
    smoke = work / "smoke.py"
    smoke.write_text(SMOKE)
    log(f"pinned {len(freeze.splitlines())} dependencies from {sys.prefix}")

    # 1. sdist, then the wheel built from the sdist
    dist = work / "dist"
    run([*uv, "build", "--out-dir", dist, repo])
    sdists, wheels = sorted(dist.glob("*.tar.gz")), sorted(dist.glob("*.whl"))
    assert len(sdists) == 1 and len(wheels) == 1, (sdists, wheels)
    wheel = wheels[0]
    names = zipfile.ZipFile(wheel).namelist()
    assert "adapters_reft/__init__.py" in names, names
    assert not [n for n in names if n.startswith(("tests/", "src/"))], names
    log(f"built {sdists[0].name} and {wheel.name} ({len(names)} files in the wheel)")

    # 2. the wheel in a fresh venv, dependencies resolved by uv (pinned to the cache's versions)
    venv_w = work / "venv-wheel"
    run([*uv, "venv", "--quiet", "--python", sys.executable, venv_w])
    run([*uv, "pip", "install", "--quiet", "--python", venv_python(venv_w), "--constraint", frozen, wheel])
    run([venv_python(venv_w), smoke, venv_purelib(venv_python(venv_w))], cwd=work)

    # 3. pip install "adapters-reft @ git+file://<repo>@<sha>" in another fresh venv
    sha = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    if dirty:
        log(f"note: uncommitted changes are not part of the git install of {sha}")
    venv_g = work / "venv-git"
    run([*uv, "venv", "--quiet", "--seed", "--python", sys.executable, venv_g])
    py_g = venv_python(venv_g)
    purelib_g = venv_purelib(py_g)
    # dependencies come from the running env; adapters-reft itself is not installed there
    here = Path(sysconfig.get_paths()["purelib"])
    (purelib_g / "zz_tox_env_deps.pth").write_text(f"{here}\n")
    spec = f"adapters-reft @ git+file://{repo}@{sha}"
    env = dict(os.environ)
    # replaces any constraint file from pip.conf: pin to what is installed, so pip downloads nothing but
    # the build backend
    env["PIP_CONSTRAINT"] = str(frozen)
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env.setdefault("PIP_ROOT_USER_ACTION", "ignore")
    run([py_g, "-m", "pip", "install", "--quiet", spec], env=env)
    run([py_g, "-m", "pip", "check"], env=env)
    direct = next(purelib_g.glob("adapters_reft-*.dist-info")) / "direct_url.json"
    info = json.loads(direct.read_text())
    assert info.get("vcs_info", {}).get("commit_id") == sha, info
    log(f"git install recorded {info['url']} @ {info['vcs_info']['commit_id']}")
    run([py_g, smoke, purelib_g], cwd=work)

    log(f"all packaging checks passed in {time.monotonic() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
