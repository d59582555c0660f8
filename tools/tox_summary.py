"""Summarise a tox run: per-env status, setup/test seconds and pytest counts, then the totals.

    python3 tools/tox_summary.py --log tox.log --junit-dir .tox/junit [--tox-exit N]

Reads tox's closing report ("  <env>: OK (12.3=setup[10.1]+cmd[2.2] seconds)") from the captured
output and the JUnit XML files the test envs write (`pytest --junitxml={work_dir}/junit/<env>.xml`).
The last line printed is always the plain totals line `N passed, N failed, N skipped`
(errors count as failed).  Exits 1 when tox failed, an env failed, a test env left no JUnit file,
any test failed, or no test ran at all.  Standard library only.
"""

from __future__ import annotations

import argparse
import re
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

# "  py310-x: OK (52.71=setup[42.15]+cmd[10.56] seconds)", "  lint: OK (0.5=setup[0.46]+cmd[0.01,0.02] seconds)",
# "  lint: FAIL code 1 (0.47 seconds)",
# "  pkg: SKIP (0.01 seconds)"; colours, if any, are stripped first.
REPORT = re.compile(
    r"^  (?P<env>[^\s:]+): (?P<status>OK|FAIL code -?\d+|SKIP|IGNORED FAIL code -?\d+)"
    r"(?: ✔| ✖)? \((?P<total>[\d.]+)(?:=setup\[(?P<setup>[\d.]+)\]\+cmd\[(?P<cmd>[\d.,]+)\])? seconds\)"
)
ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass
class Env:
    name: str
    status: str = "?"
    total: float | None = None
    setup: float | None = None
    cmd: float | None = None
    tests: int | None = None
    failures: int = 0
    errors: int = 0
    skipped: int = 0

    @property
    def passed(self) -> int:
        return (self.tests or 0) - self.failures - self.errors - self.skipped


def read_report(log: Path) -> dict[str, Env]:
    envs: dict[str, Env] = {}
    for line in log.read_text(errors="replace").splitlines():
        m = REPORT.match(ANSI.sub("", line))
        if m:  # tox repeats the report at the very end: the last line per env wins
            # one number per command: "cmd[0.01,0.02]"
            t = {k: sum(map(float, m[k].split(","))) if m[k] else None for k in ("total", "setup", "cmd")}
            envs[m["env"]] = Env(m["env"], m["status"], t["total"], t["setup"], t["cmd"])
    return envs


def read_junit(path: Path, env: Env) -> None:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.iter("testsuite")
    env.tests = 0
    for s in suites:
        env.tests += int(s.get("tests", 0))
        env.failures += int(s.get("failures", 0))
        env.errors += int(s.get("errors", 0))
        env.skipped += int(s.get("skipped", 0))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--log", type=Path, help="captured tox output (for env status and timings)")
    ap.add_argument("--junit-dir", type=Path, default=Path(".tox/junit"))
    ap.add_argument("--tox-exit", type=int, help="tox's exit code, if known")
    ap.add_argument(
        "--test-envs", default=r"^py\d", help="regex: envs that must leave a JUnit file (default: %(default)s)"
    )
    args = ap.parse_args()

    envs = read_report(args.log) if args.log and args.log.is_file() else {}
    junits = sorted(args.junit_dir.glob("*.xml")) if args.junit_dir.is_dir() else []
    problems: list[str] = []
    for path in junits:
        env = envs.setdefault(path.stem, Env(path.stem))
        try:
            read_junit(path, env)
        except (ET.ParseError, ValueError) as exc:
            problems.append(f"{path}: unreadable JUnit file ({exc})")

    test_env = re.compile(args.test_envs)
    rows = [("env", "status", "setup s", "tests s", "passed", "failed", "skipped")]
    for env in envs.values():
        if env.status != "OK":
            problems.append(f"{env.name}: {env.status}")
        if env.tests is None and test_env.search(env.name) and env.status == "OK":
            problems.append(f"{env.name}: no JUnit file in {args.junit_dir}")
        rows.append(
            (
                env.name,
                env.status,
                "-" if env.setup is None else f"{env.setup:.1f}",
                "-" if env.cmd is None else f"{env.cmd:.1f}",
                "-" if env.tests is None else str(env.passed),
                "-" if env.tests is None else str(env.failures + env.errors),
                "-" if env.tests is None else str(env.skipped),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print()
    print("=" * 30, "tox summary", "=" * 30)
    for r in rows:
        print("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))))

    passed = sum(e.passed for e in envs.values() if e.tests is not None)
    failed = sum(e.failures + e.errors for e in envs.values())
    skipped = sum(e.skipped for e in envs.values())
    if args.tox_exit not in (None, 0):
        problems.append(f"tox exited with {args.tox_exit}")
    if not envs:
        problems.append("no tox env reported")
    elif passed + failed == 0:
        problems.append("no test ran")
    for p in problems:
        print(f"problem: {p}")
    print(f"{passed} passed, {failed} failed, {skipped} skipped")
    return 1 if problems or failed else 0


if __name__ == "__main__":
    sys.exit(main())
