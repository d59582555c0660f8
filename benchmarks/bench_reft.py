r"""Stock adapters vs adapters_reft, side by side in one run: speed, memory, checkpoint size, orthonormality.

    python benchmarks/bench_reft.py                 # full run (a few minutes on 2 CPU cores)
    python benchmarks/bench_reft.py --quick         # smoke run: small sizes, 2 repetitions
    python benchmarks/bench_reft.py --json out.json # also write every measurement

Stock and patched each live in their own worker process (the parent only orchestrates), so the two can never
mix in one interpreter. Workers run one command at a time and the parent alternates between them, so no two
measurements overlap and slow phases of a noisy machine hit both sides alike. Rows:

(a) training step / frozen step: a 4-layer Llama (hidden 1024) with LoReFT on all layers; one AdamW step on
    the adapter (forward, backward, step) over the same step of the frozen model whose backward reaches the
    same depth (the output of layer 0 requires grad; nothing is trained). Ratio of medians, per side.
(b) greedy generation of 32 new tokens with the adapter active / with it inactive (same model).
(c) state bytes and creation time of one layer's ``ReftModule`` at hidden 4096 (LoReFT r = 1, two units).
(d) checkpoint size of LoReFT r = 1 on a Llama-3.1-8B-shaped model (32 layers, hidden 4096): from tensor
    shapes (checked against (c)); the compact one is also written to disk. The 8B model is never built.
(e) max |R Rᵀ − I| of the projection computed in fp32 from weights stored in bf16 / fp16 / fp32, before the
    cast back to the storage dtype; the unit is first moved off the identity point as training does.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

SIDES = ("stock", "patched")
TARGETS = {
    "train": 1.10,
    "generate": 1.05,
    "state": 1024**2,
    "creation": 0.2,
    "checkpoint": 4 * 1024**2,
    "orthonormality": 1e-5,
}
LLAMA_8B = {"layers": 32, "hidden": 4096}


# -- sizes ---------------------------------------------------------------------------------------------------
def sizes(quick: bool) -> dict[str, Any]:
    if quick:
        return {
            "hidden": 256, "intermediate": 704, "layers": 2, "heads": 4, "vocab": 1024,
            "batch": 2, "seq": 32, "prompt": 16, "new_tokens": 8,
            "unit_hidden": 1024, "ortho_hidden": 1024, "ortho_r": 4, "r": 1,
            "warmup": 1, "runs": 2, "creation_runs": 1,
        }  # fmt: skip
    return {
        # vocab 4096: the head is ~7 % of the weights, as in Llama-3.1-8B (a 32k head would dilute ratios)
        "hidden": 1024, "intermediate": 2816, "layers": 4, "heads": 16, "vocab": 4096,
        "batch": 4, "seq": 64, "prompt": 32, "new_tokens": 32,
        "unit_hidden": 4096, "ortho_hidden": 4096, "ortho_r": 4, "r": 1,
        "warmup": 2, "runs": 11, "creation_runs": 3,
    }  # fmt: skip


def llama_with_loreft(c: dict[str, Any]) -> Any:
    """The benchmark model (seed 0) with LoReFT "reft" added on all layers (2 units each), not yet active."""
    import adapters
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=c["hidden"],
        intermediate_size=c["intermediate"],
        num_hidden_layers=c["layers"],
        num_attention_heads=c["heads"],
        num_key_value_heads=c["heads"],
        vocab_size=c["vocab"],
        max_position_embeddings=max(c["seq"], c["prompt"] + c["new_tokens"]),
    )
    model = LlamaForCausalLM(config)
    adapters.init(model)
    model.add_adapter("reft", config=adapters.LoReftConfig(r=c["r"]))
    return model


def token_inputs(c: dict[str, Any]) -> tuple[Any, Any]:
    """(training ids ``batch × seq``, generation prompt ``1 × prompt``), from one seeded generator."""
    import torch

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, c["vocab"], (c["batch"], c["seq"]), generator=g)
    return ids, torch.randint(3, c["vocab"], (1, c["prompt"]), generator=g)


# == worker ==================================================================================================
class Worker:
    """One side (stock or patched); holds the model between commands."""

    def __init__(self, side: str, cfg: dict[str, Any], threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        import transformers

        transformers.logging.set_verbosity_error()
        # adapters warns "adapters available but none are activated" on every frozen forward: that logging
        # (and the stderr write) would count against the frozen baseline, so it is silenced on both sides
        logging.getLogger("adapters").setLevel(logging.ERROR)
        import adapters_reft

        if side == "patched":
            adapters_reft.patch()
        else:
            adapters_reft.unpatch()
        self.side, self.cfg, self.torch = side, cfg, torch
        self.model: Any = None

    # (a), (b) ----------------------------------------------------------------------------------------------
    def _build(self) -> None:
        torch, c = self.torch, self.cfg
        model = llama_with_loreft(c)
        model.train_adapter("reft")
        # frozen baseline: make layer 0's output a leaf that requires grad, so backward reaches the same depth
        model.model.layers[0].register_forward_hook(
            lambda module, args, out: (
                out.requires_grad_(True) if torch.is_grad_enabled() and not out.requires_grad else out
            )
        )
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4, weight_decay=0.0)
        self.ids, self.prompt = token_inputs(c)

    def _active(self, adapter: bool) -> None:
        self.model.set_active_adapters("reft" if adapter else None)

    def cmd_train(self, adapter: bool) -> tuple[float, float]:
        if self.model is None:
            self._build()
        model = self.model
        self._active(adapter)
        model.train()
        start, cpu = time.perf_counter(), time.process_time()
        self.optimizer.zero_grad(set_to_none=True)
        loss = model(self.ids, labels=self.ids).loss
        loss.backward()
        if adapter:
            self.optimizer.step()
        elapsed = (time.perf_counter() - start, time.process_time() - cpu)
        if not self.torch.isfinite(loss):
            raise FloatingPointError("non-finite loss")
        return elapsed

    def cmd_generate(self, adapter: bool) -> tuple[float, float]:
        if self.model is None:
            self._build()
        model, n = self.model, self.cfg["new_tokens"]
        self._active(adapter)
        model.eval()
        with self.torch.no_grad():
            start, cpu = time.perf_counter(), time.process_time()
            out = model.generate(
                self.prompt,
                attention_mask=self.torch.ones_like(self.prompt),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
            )
            elapsed = (time.perf_counter() - start, time.process_time() - cpu)
        if out.shape[-1] != self.prompt.shape[-1] + n:
            raise AssertionError(f"generated {out.shape[-1] - self.prompt.shape[-1]} tokens, expected {n}")
        return elapsed

    # (c) ---------------------------------------------------------------------------------------------------
    def _reft_module(self, hidden: int, r: int) -> Any:
        import adapters
        from adapters.methods.reft import ReftModule

        return ReftModule(hidden, adapters.LoReftConfig(r=r))

    def cmd_unit(self, hidden: int, r: int, runs: int) -> dict[str, Any]:
        torch = self.torch
        times = []
        for i in range(runs):
            torch.manual_seed(i)
            start = time.perf_counter()
            module = self._reft_module(hidden, r)
            times.append(time.perf_counter() - start)
        state = module.state_dict()
        return {
            "times": times,
            "state_bytes": sum(t.numel() * t.element_size() for t in state.values()),
            "shapes": {k: list(t.shape) for k, t in state.items()},
        }

    def cmd_profile_unit(self, hidden: int, r: int) -> str:
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        profiler.enable()
        self._reft_module(hidden, r)
        profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(8)
        return text.getvalue()

    # (d) ---------------------------------------------------------------------------------------------------
    def cmd_checkpoint(self, layers: int, hidden: int, r: int) -> dict[str, Any]:
        """Write an 8B-shaped compact checkpoint from the shapes of a small module (never the 8B model)."""
        torch = self.torch
        small = self._reft_module(16, r).state_dict()

        def scaled(shape: torch.Size) -> list[int]:
            return [hidden if d == 16 else d for d in shape]

        shapes = {
            f"model.layers.{i}.reft_layer.refts.reft.{k}": (scaled(t.shape), t.dtype)
            for i in range(layers)
            for k, t in small.items()
        }
        shape_bytes = sum(
            math.prod(shape) * torch.empty((), dtype=dtype).element_size() for shape, dtype in shapes.values()
        )
        result: dict[str, Any] = {"shape_bytes": shape_bytes, "file_bytes": None, "safetensors_bytes": None}
        if shape_bytes <= 64 * 1024**2:  # write only what is small (the compact layout)
            state = {k: torch.zeros(shape, dtype=dtype) for k, (shape, dtype) in shapes.items()}
            with tempfile.TemporaryDirectory() as folder:
                torch.save(state, os.path.join(folder, "pytorch_adapter.bin"))
                result["file_bytes"] = os.path.getsize(os.path.join(folder, "pytorch_adapter.bin"))
                try:
                    from safetensors.torch import save_file

                    save_file(state, os.path.join(folder, "adapter.safetensors"))
                    result["safetensors_bytes"] = os.path.getsize(os.path.join(folder, "adapter.safetensors"))
                except ImportError:
                    pass
        return result

    # (e) ---------------------------------------------------------------------------------------------------
    def cmd_ortho(self, hidden: int, r: int) -> dict[str, Any]:
        torch = self.torch
        results: dict[str, Any] = {}
        import copy

        torch.manual_seed(0)
        trained = self._reft_module(hidden, r).units[0]
        with torch.no_grad():  # move off the identity point as training does (the ±1 diagonal gets no gradient)
            plist = trained.projection.parametrizations.weight
            plist.original.add_(0.05 * torch.randn_like(plist.original).triu(1))
        for name in ("bfloat16", "float16", "float32"):
            dtype = getattr(torch, name)
            unit = copy.deepcopy(trained).to(dtype)  # the storage dtype
            entry: dict[str, Any] = {}
            entry["fp32_compute"] = self._error(self._weight_in_fp32(unit))
            try:
                with torch.no_grad():
                    native = unit.projection.weight
                entry["stored_dtype"] = self._error(native)
            except (RuntimeError, NotImplementedError) as exc:
                entry["stored_dtype"] = f"fails: {type(exc).__name__}: {str(exc).splitlines()[0][:60]}"
            results[name] = entry
        return results

    def _weight_in_fp32(self, unit: Any) -> Any:
        import copy

        torch = self.torch
        plist = unit.projection.parametrizations.weight
        with torch.no_grad():
            if self.side == "patched":
                from adapters_reft.orthogonal import _weight

                return _weight(plist.original.float(), plist[0].base, plist[0].orthogonal_map, torch.float32)
            # stock: torch's own parametrization on an fp32 copy of the stored (rounded) tensors
            return copy.deepcopy(unit).float().projection.weight

    def _error(self, weight: Any) -> float:
        torch = self.torch
        w = weight.detach().double()
        return (w @ w.T - torch.eye(w.size(0), dtype=torch.float64)).abs().max().item()

    # (profile) ---------------------------------------------------------------------------------------------
    def cmd_profile(self, what: str) -> str:
        if self.model is None:
            self._build()
        from torch.profiler import ProfilerActivity, profile

        run = {"train": lambda: self.cmd_train(True), "generate": lambda: self.cmd_generate(True)}[what]
        run()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run()
        return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=48)


def worker_main(side: str, quick: bool, threads: int) -> None:
    # results go to the real stdout; anything libraries print goes to stderr
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    worker = Worker(side, sizes(quick), threads)
    channel.write(json.dumps({"ready": side}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        try:
            value = getattr(worker, f"cmd_{request['cmd']}")(**request.get("args", {}))
            channel.write(json.dumps({"ok": True, "value": value}) + "\n")
        except Exception as exc:
            channel.write(json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"}) + "\n")


# == parent ==================================================================================================
class Client:
    def __init__(self, side: str, quick: bool, threads: int) -> None:
        command = [sys.executable, os.path.abspath(__file__), "--worker", side, "--threads", str(threads)]
        if quick:
            command.append("--quick")
        self.side = side
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self._read()

    def _read(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.side} worker exited (status {self.proc.wait()})")
        return json.loads(line)

    def __call__(self, cmd: str, **args: Any) -> Any:
        self.proc.stdin.write(json.dumps({"cmd": cmd, "args": args}) + "\n")
        reply = self._read()
        if not reply["ok"]:
            raise RuntimeError(f"{self.side} {cmd}: {reply['error']}")
        return reply["value"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def interleaved(clients: dict[str, Client], cmd: str, warmup: int, runs: int, log: Callable[[str], None]) -> dict:
    """Median time of ``cmd`` with and without the adapter, per side; rounds rotate the order."""
    variants = [(side, adapter) for side in clients for adapter in (False, True)]
    times: dict[str, dict[str, list[list[float]]]] = {s: {"frozen": [], "adapter": []} for s in clients}
    for i in range(warmup + runs):
        order = variants[i % len(variants) :] + variants[: i % len(variants)]
        for side, adapter in order:
            t = clients[side](cmd, adapter=adapter)
            if i >= warmup:
                times[side]["adapter" if adapter else "frozen"].append(t)
        log(f"  {cmd} round {i + 1}/{warmup + runs}" + (" (warm-up)" if i < warmup else ""))
    result = {}
    for side, t in times.items():
        wall = {k: statistics.median(x[0] for x in v) for k, v in t.items()}
        cpu = {k: statistics.median(x[1] for x in v) for k, v in t.items()}
        result[side] = {
            "frozen": wall["frozen"],
            "adapter": wall["adapter"],
            "ratio": wall["adapter"] / wall["frozen"],
            "cpu_frozen": cpu["frozen"],
            "cpu_adapter": cpu["adapter"],
            "cpu_ratio": cpu["adapter"] / cpu["frozen"],
            # second estimator: each round's adapter and frozen runs are close in time, so their ratio shares
            # that round's machine speed; its median is steadier when the speed drifts between rounds
            "paired_ratio": statistics.median(a[0] / f[0] for a, f in zip(t["adapter"], t["frozen"], strict=True)),
            "times": t,
        }
    return result


def _spread(side: dict[str, Any]) -> float:
    """max / min of the frozen runs' wall times: near 1 on a quiet machine; far above it, ratios are noise."""
    walls = [t[0] for t in side["times"]["frozen"]]
    return max(walls) / min(walls)


def _size(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def _sci(x: Any) -> str:
    return f"{x:.1e}" if isinstance(x, float) else str(x)


def table(r: dict[str, Any], cfg: dict[str, Any]) -> str:
    rows: list[tuple[str, str, str, str, str]] = []

    def ok(value: float, target: float) -> str:
        return "yes" if value <= target else "NO"

    for key, label in (("train", "train step / frozen"), ("generate", f"generate {cfg['new_tokens']} tok / frozen")):
        s, p = r[key]["stock"], r[key]["patched"]
        rows.append((f"(a) {label}" if key == "train" else f"(b) {label}", f"{s['ratio']:.3f}x", f"{p['ratio']:.3f}x",
                     f"<= {TARGETS[key]:.2f}x", ok(p["ratio"], TARGETS[key])))  # fmt: skip
        rows.append(("    medians adapter | frozen (s)", f"{s['adapter']:.3f} | {s['frozen']:.3f}",
                     f"{p['adapter']:.3f} | {p['frozen']:.3f}", "", ""))  # fmt: skip
        rows.append(("    same ratio in CPU time", f"{s['cpu_ratio']:.3f}x", f"{p['cpu_ratio']:.3f}x", "", ""))
        rows.append(
            ("    median of per-round ratios", f"{s['paired_ratio']:.3f}x", f"{p['paired_ratio']:.3f}x", "", "")
        )
        rows.append(("    noise: max/min of frozen wall times", f"{_spread(s):.2f}", f"{_spread(p):.2f}", "", ""))
    h = cfg["unit_hidden"]
    s, p = r["unit"]["stock"], r["unit"]["patched"]
    rows.append((f"(c) adapter state / layer (h={h})", _size(s["state_bytes"]), _size(p["state_bytes"]),
                 f"<= {_size(TARGETS['state'])}", ok(p["state_bytes"], TARGETS["state"])))  # fmt: skip
    sc, pc = statistics.median(s["times"]), statistics.median(p["times"])
    rows.append((f"(c) creation / layer (h={h})", f"{sc:.3f} s", f"{pc:.3f} s", f"<= {TARGETS['creation']} s",
                 ok(pc, TARGETS["creation"])))  # fmt: skip
    s, p = r["checkpoint"]["stock"], r["checkpoint"]["patched"]
    rows.append(("(d) checkpoint 8B-shaped, r=1 (shapes)", _size(s["shape_bytes"]), _size(p["shape_bytes"]),
                 f"<= {_size(TARGETS['checkpoint'])}", ok(p["shape_bytes"], TARGETS["checkpoint"])))  # fmt: skip
    rows.append(("    written .bin | .safetensors", "not written",
                 f"{_size(p['file_bytes'])} | {_size(p['safetensors_bytes'])}", "",
                 ok(p["file_bytes"], TARGETS["checkpoint"]) if p["file_bytes"] else ""))  # fmt: skip
    for name in ("bfloat16", "float16", "float32"):
        s, p = r["ortho"]["stock"][name], r["ortho"]["patched"][name]
        rows.append((f"(e) |RR^T-I|max {name} storage, fp32", _sci(s["fp32_compute"]), _sci(p["fp32_compute"]),
                     f"<= {TARGETS['orthonormality']:.0e}", ok(p["fp32_compute"], TARGETS["orthonormality"])))  # fmt: skip
        stock_native = s["stored_dtype"] if isinstance(s["stored_dtype"], float) else "fails"
        rows.append((f"    computed in {name} (returned)", _sci(stock_native), _sci(p["stored_dtype"]), "", ""))
    headers = ("metric", "stock", "patched", "target", "ok")
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes and 2 repetitions (smoke run)")
    parser.add_argument("--json", metavar="OUT", help="write every measurement and the table to OUT")
    parser.add_argument("--runs", type=int, help="timed repetitions per variant (after warm-up)")
    parser.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 8), help="torch threads per worker")
    parser.add_argument("--profile", action="store_true", help="also print torch.profiler / cProfile tables")
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker_main(args.worker, args.quick, args.threads)
        return 0

    cfg = sizes(args.quick)
    if args.runs:
        cfg["runs"] = args.runs

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    started = time.perf_counter()
    clients = {side: Client(side, args.quick, args.threads) for side in SIDES}
    try:
        results: dict[str, Any] = {}
        log("(a) training steps")
        results["train"] = interleaved(clients, "train", cfg["warmup"], cfg["runs"], log)
        log("(b) generation")
        results["generate"] = interleaved(clients, "generate", cfg["warmup"], cfg["runs"], log)
        log("(c) one layer's ReftModule")
        results["unit"] = {}
        for side in SIDES:  # creation alternates too: stock, patched, stock, ...
            results["unit"][side] = {"times": []}
        for i in range(cfg["creation_runs"]):
            for side in SIDES if i % 2 == 0 else SIDES[::-1]:
                one = clients[side]("unit", hidden=cfg["unit_hidden"], r=cfg["r"], runs=1)
                results["unit"][side]["times"] += one["times"]
                results["unit"][side]["state_bytes"] = one["state_bytes"]
                results["unit"][side]["shapes"] = one["shapes"]
        log("(d) checkpoint size")
        results["checkpoint"] = {
            side: clients[side]("checkpoint", layers=LLAMA_8B["layers"], hidden=LLAMA_8B["hidden"], r=cfg["r"])
            for side in SIDES
        }
        if cfg["unit_hidden"] == LLAMA_8B["hidden"]:  # the shape formula agrees with the module built in (c)
            for side in SIDES:
                per_layer = results["checkpoint"][side]["shape_bytes"] / LLAMA_8B["layers"]
                assert per_layer == results["unit"][side]["state_bytes"], (side, per_layer)
        log("(e) orthonormality")
        results["ortho"] = {
            side: clients[side]("ortho", hidden=cfg["ortho_hidden"], r=cfg["ortho_r"]) for side in SIDES
        }
        if args.profile:
            for side in SIDES:
                for what in ("train", "generate"):
                    log(
                        f"--- torch.profiler: {side} {what} (self CPU time) ---\n{clients[side]('profile', what=what)}"
                    )
                log(
                    f"--- cProfile: {side} ReftModule creation ---\n{clients[side]('profile_unit', hidden=cfg['unit_hidden'], r=cfg['r'])}"
                )
    finally:
        for client in clients.values():
            with contextlib.suppress(Exception):
                client.close()

    text = table(results, cfg)
    import torch

    header = (
        f"adapters_reft benchmark ({'quick' if args.quick else 'full'}): Llama {cfg['layers']} layers, hidden "
        f"{cfg['hidden']}, vocab {cfg['vocab']}, LoReFT r={cfg['r']} on all layers, fp32; train batch "
        f"{cfg['batch']}x{cfg['seq']}, generate {cfg['new_tokens']} tokens from {cfg['prompt']}; median of "
        f"{cfg['runs']} after {cfg['warmup']} warm-up; orthonormality at hidden {cfg['ortho_hidden']}, "
        f"r={cfg['ortho_r']}; torch {torch.__version__}, {args.threads} threads; "
        f"{time.perf_counter() - started:.0f} s"
    )
    print(header)
    print(text)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"config": cfg, "threads": args.threads, "results": results, "table": text}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
