"""Where greedy generation's ReFT overhead goes: the ReftModule's share, and the cost of an active adapter.

Stock and patched run in their own subprocess (``bench_reft.py``'s model and prompt: 4-layer Llama, hidden
1024, LoReFT r=1 on all layers, fp32, one thread). Each worker times ``generate`` in rounds that rotate over
three variants of the same model:

* ``frozen``: adapter inactive;
* ``identity``: adapter active, but ``ReftModule.forward`` returns its input (what remains is adapters' own
  cost of having an adapter active: ``get_active_setup`` in every adapter layer, the forward context);
* ``active``: the real thing; also the time spent inside ``ReftModule.forward``, as a share of generation.

Prints medians and ratios to ``frozen``. Usage: ``python benchmarks/generation_breakdown.py [--rounds N]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import time
from typing import Any


def worker(side: str, rounds: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    import transformers
    from adapters.methods import reft
    from bench_reft import llama_with_loreft, sizes, token_inputs  # sibling script (its folder is on sys.path)

    import adapters_reft

    transformers.logging.set_verbosity_error()
    logging.getLogger("adapters").setLevel(logging.ERROR)
    adapters_reft.patch() if side == "patched" else adapters_reft.unpatch()
    cfg = sizes(quick=False)
    model = llama_with_loreft(cfg).eval()  # eval after add_adapter: new adapter modules start in training mode
    _, prompt = token_inputs(cfg)
    new_tokens = cfg["new_tokens"]
    real_forward = reft.ReftModule.forward
    inside = [0.0]

    def timed_forward(module: Any, hidden_states: Any) -> Any:
        start = time.perf_counter()
        out = real_forward(module, hidden_states)
        inside[0] += time.perf_counter() - start
        return out

    variants = {
        "frozen": (None, real_forward),
        "identity": ("reft", lambda module, hidden_states: hidden_states),
        "active": ("reft", timed_forward),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    shares: list[float] = []
    names = list(variants)
    for i in range(rounds + 2):
        for name in names[i % 3 :] + names[: i % 3]:
            active, forward = variants[name]
            model.set_active_adapters(active)
            reft.ReftModule.forward = forward
            inside[0] = 0.0
            with torch.no_grad():
                start = time.perf_counter()
                model.generate(
                    prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                )  # fmt: skip
                elapsed = time.perf_counter() - start
            if i >= 2:  # warm-up rounds
                times[name].append(elapsed)
                if name == "active":
                    shares.append(inside[0] / elapsed)
    reft.ReftModule.forward = real_forward
    return {"times": times, "share": statistics.median(shares)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9, help="timed rounds per worker (after 2 warm-up)")
    parser.add_argument("--worker", choices=("stock", "patched"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.rounds)))
        return 0
    print("side     frozen s  identity/frozen  active/frozen  time inside ReftModule.forward")
    for side in ("stock", "patched"):
        command = [sys.executable, __file__, "--worker", side, "--rounds", str(args.rounds)]
        result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
        medians = {name: statistics.median(values) for name, values in result["times"].items()}
        frozen = medians["frozen"]
        print(
            f"{side:8s} {frozen:8.3f}  {medians['identity'] / frozen:15.3f}x {medians['active'] / frozen:13.3f}x"
            f"  {100 * result['share']:5.2f} %"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
