"""``python -m adapters_reft check``: every precision setup, stock adapters next to the patched library.

Stock runs in a subprocess so the two can never mix in one interpreter; both run the same scenarios
(:mod:`adapters_reft.scenarios`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from .scenarios import SCENARIOS, ScenarioResult, run_scenarios


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "names", nargs="*", metavar="SCENARIO", help=f"scenarios (default: all): {', '.join(SCENARIOS)}"
    )
    parser.add_argument("--json", action="store_true", help="print the table as JSON")


def _stock_results(names: list[str]) -> dict[str, ScenarioResult]:
    proc = subprocess.run(
        [sys.executable, "-m", "adapters_reft.scenarios", "--json", *names],
        capture_output=True,
        text=True,
        check=False,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("[")]
    if not lines:
        raise RuntimeError(f"the stock run printed no results (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return {r["name"]: ScenarioResult(**r) for r in json.loads(lines[-1])}


def _cell(result: ScenarioResult) -> str:
    if not result.available:
        return result.detail
    return ("ok: " if result.ok else "FAIL: ") + result.detail


def run(args: argparse.Namespace) -> int:
    import adapters_reft

    unknown = [n for n in args.names if n not in SCENARIOS]
    if unknown:
        print(f"unknown scenario(s): {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}", file=sys.stderr)
        return 2
    names = args.names or list(SCENARIOS)
    stock = _stock_results(names)
    adapters_reft.patch()
    patched = {r.name: r for r in run_scenarios(names)}
    if args.json:
        rows = [{"name": n, "stock": stock[n].__dict__, "patched": patched[n].__dict__} for n in names]
        print(json.dumps(rows, indent=2))
    else:
        width = max(len(SCENARIOS[n][0]) for n in names)
        print(f"{'setup':<{width}}  {'stock adapters':<62}  patched")
        print(f"{'-' * width}  {'-' * 62}  {'-' * 40}")
        for n in names:
            stock_text = _cell(stock[n])
            if len(stock_text) > 62:
                stock_text = stock_text[:61] + "…"
            print(f"{SCENARIOS[n][0]:<{width}}  {stock_text:<62}  {_cell(patched[n])}")
        available = [n for n in names if patched[n].available]
        passed = sum(patched[n].ok for n in available)
        stock_passed = sum(stock[n].ok for n in available)
        print(f"\npatched: {passed}/{len(available)} setups pass; stock: {stock_passed}/{len(available)}")
        if len(available) < len(names):
            print(f"({len(names) - len(available)} setup(s) do not exist in the installed versions: n/a)")
    return 0 if all(r.ok for r in patched.values()) else 1
