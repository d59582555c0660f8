"""What stock adapters does with the demo's bf16 setup: one LoReFT training step in a clean interpreter.

The step runs in a subprocess that imports only torch, transformers and adapters, never ``adapters_reft``, so
the result is exactly what a user without the patch gets, whatever the calling process has patched.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

__all__ = ["STOCK_SNIPPET", "describe_stock", "one_line", "run_stock"]

MARKER = "ADAPTERS_REFT_STOCK_RESULT "
TIMEOUT_S = 600

# Plain adapters code: load the model in the given dtype, add LoReFT and a classification head, move everything
# to that dtype (as the demo's build_model does), one forward and backward. Reports the exception and the
# deepest adapters frame it went through.
STOCK_SNIPPET = r"""
import json, os, sys, traceback
params = json.loads(sys.argv[1])
result = {"ok": True}
try:
    import adapters, torch
    from transformers import AutoTokenizer
    dtype = getattr(torch, params["dtype"])
    tok = AutoTokenizer.from_pretrained(params["model"], local_files_only=True)
    tok.padding_side = "right"
    tok.pad_token = tok.pad_token or tok.eos_token or tok.unk_token
    model = adapters.AutoAdapterModel.from_pretrained(
        params["model"], local_files_only=True, **{params["dtype_kwarg"]: dtype})
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    model.add_adapter("reft", config=adapters.LoReftConfig(**params["reft"]))
    model.add_classification_head("reft", num_labels=params["num_labels"])
    model.train_adapter("reft")
    model.to(device=params["device"], dtype=dtype)
    inputs = tok(params["texts"], padding=True, return_tensors="pt").to(params["device"])
    loss = model(**inputs, labels=torch.tensor(params["labels"], device=params["device"])).loss
    loss.backward()
except Exception as exc:
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if os.sep + "adapters" + os.sep in f.filename] or frames[-1:]
    where = ours[-1]
    result = {"ok": False, "type": type(exc).__name__, "message": str(exc),
              "where": "%s:%d in %s" % (where.filename.split(os.sep + "site-packages" + os.sep)[-1],
                                        where.lineno, where.name)}
print(MARKER + json.dumps(result))
"""


def one_line(exc: BaseException | str) -> str:
    """First line of an error message: torch and transformers messages can run to a page."""
    text = str(exc).strip().splitlines()
    return text[0] if text else (type(exc).__name__ if isinstance(exc, BaseException) else "")


def _failure(kind: str, message: str) -> dict[str, Any]:
    return {"ok": False, "type": kind, "message": message, "where": ""}


def run_stock(params: dict[str, Any], threads: int | None = None) -> dict[str, Any]:
    """Run :data:`STOCK_SNIPPET` with ``params`` (model, device, dtype, dtype_kwarg, reft, num_labels, texts,
    labels); return ``{"ok": bool, "type", "message", "where"}``."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    command = [sys.executable, "-c", f"MARKER = {MARKER!r}\n{STOCK_SNIPPET}", json.dumps(params)]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        return _failure("TimeoutExpired", f"the stock run took over {TIMEOUT_S} s")
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARKER)]
    if not lines:  # the interpreter died before reporting (a segfault, an import error)
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return _failure("CrashedSubprocess", f"exit {proc.returncode}: {tail[0]}")
    return json.loads(lines[-1].removeprefix(MARKER))


def describe_stock(result: dict[str, Any], limit: int = 140) -> str:
    """``ok ...`` or ``Type: first line of the message  [where]``, shortened for a terminal."""
    if result.get("ok"):
        return "ok: stock adapters trained this setup too"
    text = f"{result.get('type', 'Error')}: {one_line(result.get('message', ''))}"
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return f"{text}  [{result['where']}]" if result.get("where") else text
