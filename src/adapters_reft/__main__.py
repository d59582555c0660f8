"""Command line: ``python -m adapters_reft {check,doctor,demo,convert,export-upstream} ...``."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, help); each module has add_arguments(parser) and run(args) -> exit status
COMMANDS: dict[str, tuple[str, str]] = {
    "check": ("adapters_reft.check", "run every precision setup with stock adapters and with the patch"),
    "doctor": ("adapters_reft.doctor", "versions, devices, native kernel support and the cast policy"),
    "demo": ("adapters_reft.demo", "fine-tune MiniLM with LoReFT in bf16 and fp32 and compare"),
    "convert": ("adapters_reft.convert", "convert a saved ReFT adapter between stock and compact layouts"),
    "export-upstream": ("adapters_reft.upstream", "write this fix into an adapters source tree as a patch"),
}


def _load(command: str) -> object:
    return importlib.import_module(COMMANDS[command][0])


def _hook(module: object, name: str, command: str) -> object:
    # demo/doctor spell their hooks add_<command>_arguments / run_<command>
    spelled = {"add_arguments": f"add_{command}_arguments", "run": f"run_{command}"}[name]
    return getattr(module, name, None) or getattr(module, spelled)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m adapters_reft", description="Dtype-safe ReFT for adapters")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command, (_, help_text) in COMMANDS.items():
        sub.add_parser(command, help=help_text, description=help_text)
    # Import only the chosen command's module: the demo pulls matplotlib, export pulls the registry client.
    chosen = next((a for a in argv if a in COMMANDS), None)
    if chosen is not None:
        module = _load(chosen)
        _hook(module, "add_arguments", chosen)(sub.choices[chosen])
    args = parser.parse_args(argv)
    return int(_hook(_load(args.command), "run", args.command)(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
