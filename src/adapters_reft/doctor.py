"""``python -m adapters_reft doctor``: what this environment can do, in one screen, for bug reports.

Prints the versions that matter, the devices, the native-kernel table the patch decides its casts from
(per orthogonal map x dtype x device type), the cast policy in force, and whether the installed adapters
release is one the patch supports. Exit status 1 when something would stop the patch from working (an
unsupported adapters release, an invalid ``ADAPTERS_REFT_UPCAST``), so scripts and CI can gate on it.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from importlib import metadata
from typing import Any

__all__ = ["add_doctor_arguments", "collect", "run_doctor"]

# CPU flags that give bf16 matmuls native hardware; without them torch emulates bf16 and it is slow on CPU.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def add_doctor_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``python -m adapters_reft doctor``."""
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run_doctor(args: argparse.Namespace) -> int:
    """Entry point: print the report; 0 when the patch can work here, 1 otherwise."""
    report = collect()
    if getattr(args, "json", False):
        print(json.dumps(report, indent=2))
    else:
        print(render(report))
    return 0 if not report["problems"] else 1


# ---------------------------------------------------------------------------------------------------------------
# collection


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    """Versions of the interpreter and the libraries the patch sits between."""
    import torch

    import adapters_reft

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "adapters": _version("adapters"),
        "adapters_reft": adapters_reft.__version__,
    }


def cpu_flags() -> set[str] | None:
    """CPU feature flags from /proc/cpuinfo (Linux); ``None`` where they cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None


def devices() -> dict[str, Any]:
    """CPU threads and bf16 hardware; CUDA devices with their bf16 support."""
    import torch

    capability = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", lambda: None)()
    flags = cpu_flags()
    cuda: list[dict[str, Any]] = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            cuda.append({"index": i, "name": torch.cuda.get_device_name(i), "capability": f"{major}.{minor}"})
    return {
        "cpu": {
            "threads": torch.get_num_threads(),
            "capability": capability,
            "bf16_hardware": None if flags is None else sorted(flags.intersection(BF16_CPU_FLAGS)),
        },
        "cuda": cuda,
        "cuda_bf16": bool(cuda) and torch.cuda.is_bf16_supported(),
    }


def adapters_support() -> dict[str, Any]:
    """Whether the installed adapters release is one the patch supports, with the library's own message."""
    import adapters_reft

    try:
        version = adapters_reft.check_adapters_version()
    except adapters_reft.UnsupportedVersionError as exc:
        return {"supported": False, "version": _version("adapters"), "message": str(exc)}
    except ImportError as exc:
        return {"supported": False, "version": None, "message": f"adapters is not importable: {exc}"}
    return {"supported": True, "version": version, "message": None}


def cast_policy() -> dict[str, Any]:
    """The ``ADAPTERS_REFT_UPCAST`` policy in force, or why it is invalid."""
    from adapters_reft import compat

    env_var = getattr(compat, "ENV_VAR", "ADAPTERS_REFT_UPCAST")
    try:
        return {"env_var": env_var, "policy": compat.upcast_policy(), "error": None}
    except ValueError as exc:
        return {"env_var": env_var, "policy": None, "error": str(exc)}


def compat_rows(device_types: tuple[str, ...]) -> tuple[list[dict[str, Any]], str | None]:
    """The compat table, or the reason it could not be computed (an invalid policy makes ``upcast`` raise)."""
    from adapters_reft import compat

    try:
        return compat.support_table(device_types=device_types), None
    except Exception as exc:  # a broken torch build or policy must not hide the rest of the report
        return [], f"{type(exc).__name__}: {exc}"


def collect() -> dict[str, Any]:
    """Everything the doctor reports, JSON-ready; ``problems`` lists what makes the exit status non-zero."""
    devs = devices()
    support = adapters_support()
    policy = cast_policy()
    rows, table_error = compat_rows(("cpu", "cuda") if devs["cuda"] else ("cpu",))
    problems = [m for m in (support["message"], policy["error"]) if m]
    return {
        "versions": versions(),
        "devices": devs,
        "adapters_support": support,
        "cast_policy": policy,
        "compat_table": rows,
        "compat_table_error": table_error,
        "problems": problems,
    }


# ---------------------------------------------------------------------------------------------------------------
# rendering


def _yes_no(value: object) -> str:
    return "-" if value is None else ("yes" if value else "no")


def _render_devices(devs: dict[str, Any]) -> list[str]:
    cpu = devs["cpu"]
    hardware = cpu["bf16_hardware"]
    if hardware is None:
        bf16 = "unknown"
    elif hardware:
        bf16 = f"yes ({', '.join(hardware)})"
    else:
        bf16 = "no: bf16 is emulated, expect bf16 on this CPU to run several times slower than fp32"
    lines = [
        f"  cpu      {cpu['threads']} torch threads, kernels {cpu['capability'] or 'unknown'}, bf16 hardware: {bf16}"
    ]
    if not devs["cuda"]:
        lines.append("  cuda     none")
    for d in devs["cuda"]:
        lines.append(f"  cuda:{d['index']}   {d['name']} (compute capability {d['capability']})")
    if devs["cuda"]:
        lines.append(f"  cuda bf16 supported: {_yes_no(devs['cuda_bf16'])}")
    return lines


def _render_table(rows: list[dict[str, Any]]) -> list[str]:
    header = ("orthogonal map", "dtype", "device", "native kernel", "accurate", "patch upcasts")
    body = [
        (
            str(r["map"]),
            str(r["dtype"]),
            str(r["device_type"]),
            _yes_no(r.get("native")),
            _yes_no(r.get("accurate")),
            "yes (float32)" if r.get("upcast") else "no",
        )
        for r in rows
    ]
    widths = [max(len(c) for c in column) for column in zip(header, *body, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths)), *(fmt.format(*row) for row in body)]
    return ["  " + line.rstrip() for line in lines]


def render(report: dict[str, Any]) -> str:
    """The human-readable report."""
    v, support, policy = report["versions"], report["adapters_support"], report["cast_policy"]
    lines = ["adapters-reft doctor", "", "versions"]
    lines += [f"  {name:<14}{value or 'not installed'}" for name, value in v.items()]
    lines += ["", "devices", *_render_devices(report["devices"])]
    lines += ["", "adapters release"]
    if support["supported"]:
        lines.append(f"  adapters {support['version']}: supported")
    else:
        lines.append(f"  NOT SUPPORTED: {support['message']}")
    lines += ["", "cast policy"]
    if policy["error"]:
        lines.append(f"  INVALID: {policy['error']}")
    else:
        lines.append(
            f"  {policy['env_var']}={policy['policy']}  (auto: float32 only where the native kernel is missing or inaccurate)"
        )
    lines += ["", "orthogonal map support (probed on this machine)"]
    if report["compat_table_error"]:
        lines.append(f"  could not compute the table: {report['compat_table_error']}")
    else:
        lines += _render_table(report["compat_table"])
    lines += ["", "status: " + ("ok" if not report["problems"] else "PROBLEMS: " + "; ".join(report["problems"]))]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adapters_reft doctor", description=__doc__.splitlines()[0])
    add_doctor_arguments(parser)
    return run_doctor(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
