"""The precision setups ReFT users run, as small self-checking scenarios on a tiny Llama built from a config.

Each scenario raises when the setup fails (an exception from torch/adapters, or a wrong dtype or a non-finite
value) and returns a short description when it works. They are written against public adapters APIs only, so
the same functions check stock adapters, the patched library, and an upstream tree with the fix merged:
``python -m adapters_reft.scenarios [--patch] [--json]`` runs them in a fresh process.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch
from torch import nn

__all__ = ["SCENARIOS", "ScenarioResult", "ScenarioUnavailable", "run_scenarios", "tiny_llama"]

VOCAB = 96
Scenario = Callable[[], str]


def tiny_llama(
    dtype: torch.dtype = torch.float32, seed: int = 0, layers: int = 2, hidden: int = 64, intermediate: int = 128
) -> nn.Module:
    """A small Llama (default: 2 layers, hidden 64) with adapters initialised; no download."""
    import adapters
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=VOCAB,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config).to(dtype)
    adapters.init(model)
    return model


def _reft(model: nn.Module, config: object, name: str = "reft") -> nn.Module:
    model.add_adapter(name, config=config)
    model.set_active_adapters(name)
    return model


def _inputs(batch: int = 2, length: int = 8) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(1))


class ScenarioUnavailable(Exception):
    """The setup does not exist in the installed versions (e.g. ``ReftConfig.dtype`` before adapters 1.1)."""


def _logits_upcast() -> bool:
    """transformers < 4.45 returns Llama logits upcast to float32 whatever the model's dtype."""
    import transformers
    from packaging.version import Version

    return Version(transformers.__version__) < Version("4.45")


def _forward(model: nn.Module, dtype: torch.dtype, *, check_hidden: bool = True) -> str:
    with torch.no_grad():
        out = model(_inputs(), output_hidden_states=True)
    # the residual stream tells the model's dtype; logits (checked under autocast) may be upcast
    produced = out.hidden_states[-1].dtype if check_hidden else out.logits.dtype
    if not check_hidden and _logits_upcast():
        produced = dtype if produced == torch.float32 else produced
    if produced != dtype:
        raise TypeError(f"{'hidden states' if check_hidden else 'logits'} came back as {produced}, expected {dtype}")
    if not torch.isfinite(out.logits).all():
        raise FloatingPointError("non-finite logits")
    return f"forward ok ({str(dtype).removeprefix('torch.')})"


def _lo(**kwargs: object) -> object:
    import adapters

    if "dtype" in kwargs and "dtype" not in getattr(adapters.LoReftConfig, "__dataclass_fields__", {}):
        raise ScenarioUnavailable(f"adapters {adapters.__version__} has no ReftConfig.dtype (added in 1.1)")
    return adapters.LoReftConfig(**kwargs)


def _bf16_reft(**kwargs: object) -> nn.Module:
    """A bf16 Llama with a LoReFT adapter stored in bf16 (moved there, so every adapters release has it)."""
    model = _reft(tiny_llama(torch.bfloat16), _lo(**kwargs))
    model.adapter_to("reft", dtype=torch.bfloat16)
    return model


def bf16_default() -> str:
    return _forward(_reft(tiny_llama(torch.bfloat16), _lo()), torch.bfloat16)


def bf16_config_dtype() -> str:
    return _forward(_reft(tiny_llama(torch.bfloat16), _lo(dtype="bfloat16")), torch.bfloat16)


def fp32_then_bf16() -> str:
    return _forward(_reft(tiny_llama(), _lo()).to(torch.bfloat16), torch.bfloat16)


def fp32_then_half() -> str:
    return _forward(_reft(tiny_llama(), _lo()).half(), torch.float16)


def fp16_config_dtype() -> str:
    return _forward(_reft(tiny_llama(torch.float16), _lo(dtype="float16")), torch.float16)


def bf16_model_fp32_adapter() -> str:
    model = _reft(tiny_llama(torch.bfloat16), _lo())
    model.adapter_to("reft", dtype=torch.float32)
    return _forward(model, torch.bfloat16)


def bf16_training_step() -> str:
    model = _bf16_reft()
    model.train_adapter("reft")
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    ids = _inputs()
    loss = model(ids, labels=ids).loss
    loss.backward()
    if not torch.isfinite(loss) or not all(p.grad is not None and torch.isfinite(p.grad).all() for p in params):
        raise FloatingPointError("non-finite loss or gradient")
    optimizer.step()
    changed = sum(not torch.equal(a, p) for a, p in zip(before, params, strict=True))
    if changed == 0:
        raise AssertionError("optimizer step changed no adapter weight")
    return f"loss {loss.item():.3f}, {changed}/{len(params)} tensors updated"


def bf16_generate() -> str:
    import adapters

    if tuple(int(p) for p in adapters.__version__.split(".")[:2]) < (1, 1):
        # ReftModule indexes 3 prefix positions of a 1-token step; clamped from adapters 1.1 on
        raise ScenarioUnavailable(f"adapters {adapters.__version__} ReFT cannot generate (in any dtype)")
    model = _bf16_reft().eval()
    out = model.generate(_inputs(), max_new_tokens=4, do_sample=False, pad_token_id=0)
    if out.shape != (2, 12):
        raise AssertionError(f"generate returned shape {tuple(out.shape)}")
    return "generated 4 tokens"


def bf16_save_load() -> str:
    model = _bf16_reft().eval()
    with torch.no_grad():
        expected = model(_inputs()).logits
    with tempfile.TemporaryDirectory() as folder:
        model.save_adapter(folder, "reft")
        fresh = tiny_llama(torch.bfloat16)
        fresh.load_adapter(folder, load_as="reft")
        fresh.adapter_to("reft", dtype=torch.bfloat16)
        fresh.set_active_adapters("reft")
        fresh.eval()
        with torch.no_grad():
            got = fresh(_inputs()).logits
    if not torch.equal(got, expected):
        raise AssertionError(f"reloaded adapter differs: max |diff| {(got.float() - expected.float()).abs().max()}")
    return "save + load: identical logits"


def noreft_bf16() -> str:
    import adapters

    return _forward(_reft(tiny_llama(torch.bfloat16), adapters.NoReftConfig()), torch.bfloat16)


def direft_bf16() -> str:
    import adapters

    return _forward(_reft(tiny_llama(torch.bfloat16), adapters.DiReftConfig()), torch.bfloat16)


def bf16_autocast() -> str:
    model = _reft(tiny_llama(), _lo())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return _forward(model, torch.bfloat16, check_hidden=False)


@contextlib.contextmanager
def _single_process_group() -> Iterator[None]:
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _fsdp2() -> tuple[Callable[..., nn.Module], type]:
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:
        try:
            from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
        except ImportError as exc:
            raise ScenarioUnavailable(f"torch {torch.__version__} has no FSDP2 (fully_shard)") from exc
    return fully_shard, MixedPrecisionPolicy


def _fsdp2_trains_on_cpu(fully_shard: Callable[..., nn.Module]) -> None:
    """Some torch releases (2.6) ship FSDP2 that cannot train even a plain MLP on CPU: say so, not FAIL."""
    mlp = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    try:
        fully_shard(mlp)
        mlp(torch.randn(2, 4)).sum().backward()
    except Exception as exc:
        raise ScenarioUnavailable(
            f"FSDP2 cannot train on CPU in torch {torch.__version__}: {_short(exc, 60)}"
        ) from exc


def fsdp2_bf16_policy() -> str:
    fully_shard, MixedPrecisionPolicy = _fsdp2()
    with _single_process_group():
        _fsdp2_trains_on_cpu(fully_shard)
        model = _reft(tiny_llama(), _lo())
        model.train_adapter("reft")
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for layer in model.model.layers:
            fully_shard(layer, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        ids = _inputs()
        loss = model(ids, labels=ids).loss
        loss.backward()
        if not torch.isfinite(loss):
            raise FloatingPointError("non-finite loss")
    return f"fully_shard(param_dtype=bf16): loss {loss.item():.3f}"


SCENARIOS: dict[str, tuple[str, Scenario]] = {
    "bf16-default": ("bf16 model, LoReftConfig()", bf16_default),
    "bf16-dtype": ('bf16 model, LoReftConfig(dtype="bfloat16")', bf16_config_dtype),
    "fp32-to-bf16": ("fp32 model + adapter, then model.to(bfloat16)", fp32_then_bf16),
    "fp32-to-half": ("fp32 model + adapter, then model.half()", fp32_then_half),
    "fp16-dtype": ('fp16 model, LoReftConfig(dtype="float16")', fp16_config_dtype),
    "bf16-fp32-adapter": ("bf16 model, adapter_to(float32), no autocast", bf16_model_fp32_adapter),
    "bf16-train": ("bf16 training step (AdamW)", bf16_training_step),
    "bf16-generate": ("bf16 generate()", bf16_generate),
    "bf16-save-load": ("bf16 save_adapter + load_adapter", bf16_save_load),
    "noreft-bf16": ("NoReFT in bf16", noreft_bf16),
    "direft-bf16": ("DiReFT in bf16", direft_bf16),
    "fsdp2-bf16": ("FSDP2 fully_shard, MixedPrecisionPolicy(param_dtype=bf16), gloo", fsdp2_bf16_policy),
    "bf16-autocast": ("fp32 model under torch.autocast(bf16)", bf16_autocast),
}


@dataclass
class ScenarioResult:
    name: str
    description: str
    ok: bool
    detail: str
    available: bool = True


def _short(exc: BaseException, limit: int = 110) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def run_scenarios(names: list[str] | None = None) -> list[ScenarioResult]:
    """Run the named scenarios (all by default); never raises for a failing scenario."""
    import transformers

    transformers.logging.set_verbosity_error()
    results = []
    for name in names or list(SCENARIOS):
        description, scenario = SCENARIOS[name]
        try:
            results.append(ScenarioResult(name, description, True, scenario()))
        except ScenarioUnavailable as exc:
            results.append(ScenarioResult(name, description, True, f"n/a: {exc}", available=False))
        except Exception as exc:
            if os.environ.get("ADAPTERS_REFT_TRACEBACKS"):
                traceback.print_exc()
            results.append(ScenarioResult(name, description, False, _short(exc)))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patch", action="store_true", help="call adapters_reft.patch() first")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("names", nargs="*", choices=[*SCENARIOS, []], help="scenarios to run (default: all)")
    args = parser.parse_args(argv)
    if args.patch:
        import adapters_reft

        adapters_reft.patch()
    results = run_scenarios(args.names or None)
    if args.json:
        print(json.dumps([asdict(r) for r in results]))
    else:
        for r in results:
            print(f"{'PASS' if r.ok else 'FAIL'}  {r.name:<18} {r.detail}")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
