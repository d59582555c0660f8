"""The demo's outputs: per-precision results, the loss-curve PNG, the JSON summary and the terminal table."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .demo_stock import describe_stock

__all__ = ["RunResult", "moving_average", "print_report", "summary", "write_plot"]

COLORS = {"bf16": "tab:blue", "fp16": "tab:green", "fp32": "tab:orange"}


@dataclass
class RunResult:
    """One precision's outcome; ``final_loss`` is the mean training loss over the last tenth of the steps."""

    precision: str
    ok: bool
    error: str | None = None
    optimizer: str | None = None
    accuracy: float | None = None
    test_loss: float | None = None
    final_loss: float | None = None
    train_s: float | None = None
    eval_s: float | None = None
    wall_s: float | None = None
    losses: list[float] = field(default_factory=list)


def moving_average(values: Sequence[float], window: int | None = None) -> list[float]:
    """Trailing mean over ``window`` steps (default: a tenth of the run, at least 1): batch losses are noisy."""
    window = window or max(1, len(values) // 10)
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def write_plot(results: Sequence[RunResult], path: Path, title: str) -> None:
    """Loss curves per precision: raw steps faint, a moving average on top (Agg: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110)
    for r in results:
        if not r.losses:
            continue
        steps = range(1, len(r.losses) + 1)
        color = COLORS.get(r.precision)
        ax.plot(steps, r.losses, color=color, alpha=0.25, linewidth=0.8)
        label = f"{r.precision}: held-out acc {r.accuracy:.1%}" if r.accuracy is not None else r.precision
        ax.plot(steps, moving_average(r.losses), color=color, linewidth=2, label=label)
    ax.set(xlabel="training step", ylabel="cross-entropy (train batch)", title=title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def summary(
    settings: Any, results: Sequence[RunResult], stock: dict[str, Any] | None, extra: dict[str, Any]
) -> dict[str, Any]:
    """Everything the run measured, JSON-ready (``settings`` is the demo's settings dataclass)."""
    settings_json = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items()}
    return {"settings": settings_json, **extra, "runs": {r.precision: asdict(r) for r in results}, "stock_bf16": stock}


def print_report(results: Sequence[RunResult], stock: dict[str, Any] | None, chance: float, total_s: float) -> None:
    """The table a user reads at the end of the run."""
    print()
    print(f"{'precision':<10} {'held-out acc':>12} {'held-out loss':>13} {'final train loss':>16} {'wall time':>10}")
    for r in results:
        if not r.ok:
            print(f"{r.precision:<10} FAILED: {r.error}")
            continue
        print(f"{r.precision:<10} {r.accuracy:>12.1%} {r.test_loss:>13.4f} {r.final_loss:>16.4f} {r.wall_s:>9.1f}s")
    print(f"(chance: {chance:.1%}; final train loss = mean over the last tenth of the steps)")
    by_name = {r.precision: r for r in results if r.ok}
    for half in ("bf16", "fp16"):
        if half in by_name and "fp32" in by_name:
            delta = (by_name[half].accuracy - by_name["fp32"].accuracy) * 100
            print(f"{half} vs fp32 held-out accuracy: {delta:+.1f} points")
    if stock is not None:
        print(f"stock adapters, same bf16 setup, no patch: {describe_stock(stock)}")
    print(f"total wall time: {total_s:.1f}s")
