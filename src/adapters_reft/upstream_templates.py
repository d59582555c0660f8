"""Texts ``export-upstream`` writes that have no counterpart in this package: the upstream-style test module
and the pull-request description."""

from __future__ import annotations

import platform
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["PRECISION_TEST_PATH", "PullRequestFacts", "precision_test_module", "pull_request_markdown"]

# Where upstream keeps method tests (tests/test_methods/...); the sdists of adapters >= 1.1 ship no tests, so the
# module is self-contained: unittest + transformers.testing_utils, no import of upstream's test helpers.
PRECISION_TEST_PATH = "tests/test_methods/test_reft_precision.py"

_PRECISION_TESTS = '''\
import dataclasses
import tempfile
import unittest

import torch

import adapters
from adapters import DiReftConfig, LoReftConfig, NoReftConfig
from adapters.methods.reft import ReftUnit
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM
from transformers.testing_utils import require_torch


def _cpu_runs_layer_norm(dtype):
    # torch < 2.3 has no float16 LayerNorm kernel on CPU; BERT cannot run in float16 there at all
    try:
        torch.nn.functional.layer_norm(torch.ones(2, 2, dtype=dtype), (2,))
    except RuntimeError:
        return False
    return True


HALF_DTYPES = tuple(dtype for dtype in (torch.bfloat16, torch.float16) if _cpu_runs_layer_norm(dtype))
CONFIG_HAS_DTYPE = "dtype" in {f.name for f in dataclasses.fields(LoReftConfig)}


def dtype_name(dtype):
    return str(dtype).replace("torch.", "")


class ReftPrecisionTestMixin:
    """ReFT (LoReFT, NoReFT, DiReFT) in bf16 and fp16: half-precision models, adapters created in another dtype,
    models converted after adding the adapter, a training step, save/load, and the orthogonal projection."""

    reft_configs_to_test = [
        LoReftConfig(),
        NoReftConfig(prefix_positions=2, suffix_positions=2),
        DiReftConfig(tied_weights=True),
    ]
    hidden_size = 32
    vocab_size = 99

    def get_model(self):
        """A freshly initialised float32 model with adapters support."""
        raise NotImplementedError

    def get_input(self):
        return torch.randint(1, self.vocab_size, (2, 8), generator=torch.Generator().manual_seed(1))

    def run_model(self, model):
        # the last hidden state: some transformers releases return causal-LM logits upcast to float32
        return model(self.get_input(), output_hidden_states=True).hidden_states[-1]

    def add_reft(self, model, config, name="reft"):
        model.add_adapter(name, config=config)
        model.set_active_adapters(name)
        return model

    def assert_half_output(self, output, dtype):
        self.assertEqual(output.dtype, dtype)
        self.assertTrue(torch.isfinite(output).all())

    def test_reft_half_precision_model(self):
        # the adapter is created in the default dtype (float32) inside a half-precision model
        for dtype in HALF_DTYPES:
            for config in self.reft_configs_to_test:
                with self.subTest(dtype=dtype_name(dtype), config=config.__class__.__name__):
                    model = self.add_reft(self.get_model().to(dtype), config).eval()
                    with torch.no_grad():
                        self.assert_half_output(self.run_model(model), dtype)

    @unittest.skipUnless(CONFIG_HAS_DTYPE, "ReftConfig has no dtype in this release")
    def test_reft_half_precision_config_dtype(self):
        for dtype in HALF_DTYPES:
            for config in self.reft_configs_to_test:
                with self.subTest(dtype=dtype_name(dtype), config=config.__class__.__name__):
                    config = config.replace(dtype=dtype_name(dtype))
                    model = self.add_reft(self.get_model().to(dtype), config).eval()
                    with torch.no_grad():
                        self.assert_half_output(self.run_model(model), dtype)
                    for name, param in model.named_parameters():
                        if "refts" in name:
                            self.assertEqual(param.dtype, dtype, name)

    def test_reft_model_converted_after_adding(self):
        for dtype in HALF_DTYPES:
            for config in self.reft_configs_to_test:
                with self.subTest(dtype=dtype_name(dtype), config=config.__class__.__name__):
                    model = self.add_reft(self.get_model(), config).to(dtype).eval()
                    with torch.no_grad():
                        self.assert_half_output(self.run_model(model), dtype)

    def test_reft_half_precision_training_step(self):
        dtype = torch.bfloat16
        config = LoReftConfig(dtype=dtype_name(dtype)) if CONFIG_HAS_DTYPE else LoReftConfig()
        model = self.add_reft(self.get_model().to(dtype), config)
        model.train_adapter("reft")
        params = [p for p in model.parameters() if p.requires_grad]
        self.assertGreater(len(params), 0)
        before = [p.detach().clone() for p in params]
        loss = self.run_model(model).float().pow(2).mean()
        loss.backward()
        self.assertTrue(torch.isfinite(loss))
        for param in params:
            self.assertIsNotNone(param.grad)
            self.assertTrue(torch.isfinite(param.grad).all())
        torch.optim.AdamW(params, lr=1e-2).step()
        self.assertTrue(any(not torch.equal(a, p) for a, p in zip(before, params)))

    def test_reft_half_precision_save_load(self):
        dtype = torch.bfloat16
        config = LoReftConfig(dtype=dtype_name(dtype)) if CONFIG_HAS_DTYPE else LoReftConfig()
        model = self.add_reft(self.get_model().to(dtype), config).eval()
        with torch.no_grad():
            expected = self.run_model(model)
        with tempfile.TemporaryDirectory() as folder:
            model.save_adapter(folder, "reft")
            fresh = self.get_model().to(dtype)
            fresh.load_adapter(folder, load_as="reft")
            fresh.set_active_adapters("reft")
            fresh.eval()
            with torch.no_grad():
                self.assertTrue(torch.equal(self.run_model(fresh), expected))

    def test_reft_orthogonal_projection_half_precision(self):
        for dtype in HALF_DTYPES:
            with self.subTest(dtype=dtype_name(dtype)):
                unit = ReftUnit(self.hidden_size, 4, True).to(dtype)
                weight = unit.projection.weight
                self.assertEqual(weight.dtype, dtype)
                gram = weight.float() @ weight.float().T
                torch.testing.assert_close(gram, torch.eye(4), atol=2e-2, rtol=0)

    def test_reft_loads_torch_orthogonal_state(self):
        # state dicts written with torch's own orthogonal parametrization (stock adapters checkpoints)
        stock = torch.nn.utils.parametrizations.orthogonal(torch.nn.Linear(self.hidden_size, 4, bias=False))
        unit = ReftUnit(self.hidden_size, 4, True)
        unit.projection.load_state_dict(stock.state_dict())
        torch.testing.assert_close(unit.projection.weight, stock.weight, atol=1e-5, rtol=0)


@require_torch
class LlamaReftPrecisionTest(ReftPrecisionTestMixin, unittest.TestCase):
    def get_model(self):
        torch.manual_seed(0)
        config = LlamaConfig(
            hidden_size=self.hidden_size,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            intermediate_size=37,
            vocab_size=self.vocab_size,
            pad_token_id=0,
        )
        model = LlamaForCausalLM(config)
        adapters.init(model)
        return model


@require_torch
class BertReftPrecisionTest(ReftPrecisionTestMixin, unittest.TestCase):
    def get_model(self):
        torch.manual_seed(0)
        config = BertConfig(
            hidden_size=self.hidden_size,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=37,
            vocab_size=self.vocab_size,
        )
        model = BertModel(config)
        adapters.init(model)
        return model
'''


def precision_test_module() -> str:
    """The upstream-style unittest module for the half-precision setups (not yet formatted)."""
    return _PRECISION_TESTS


# -- PULL_REQUEST.md -----------------------------------------------------------------------------------------
@dataclass
class PullRequestFacts:
    """Everything the description states, gathered by the export (nothing in it is typed by hand)."""

    adapters_version: str
    changed_files: list[str]
    new_files: list[str]
    diffstat: str
    git_apply_check: str
    command: str
    scenario_rows: list[dict[str, object]] = field(default_factory=list)  # name, description, stock, patched
    upstream_tests: dict[str, str] = field(default_factory=dict)  # "stock"/"patched" -> unittest summary
    fp32_parity: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    measured: bool = True


def _cell(result: dict[str, object]) -> str:
    text = str(result.get("detail", "")).replace("|", "\\|").replace("\n", " ")
    return f"{'✅' if result.get('ok') else '❌'} {text}".strip()


def _table(rows: Sequence[dict[str, object]], version: str) -> str:
    lines = [
        f"| setup | adapters {version} (stock) | with this PR |",
        "|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row['description']} | {_cell(row['stock'])} | {_cell(row['patched'])} |")  # type: ignore[arg-type]
    stock_ok = sum(bool(r["stock"]["ok"]) for r in rows)  # type: ignore[index]
    patched_ok = sum(bool(r["patched"]["ok"]) for r in rows)  # type: ignore[index]
    lines.append(f"| **passing** | **{stock_ok}/{len(rows)}** | **{patched_ok}/{len(rows)}** |")
    return "\n".join(lines)


def pull_request_markdown(facts: PullRequestFacts) -> str:
    v = facts.adapters_version
    env = ", ".join(f"{k} {val}" for k, val in facts.versions.items()) or platform.python_version()
    if facts.measured and facts.scenario_rows:
        table = (
            f"Measured on CPU ({env}) by running the same scenario script against the pristine tree and the "
            "patched tree (each put first on `PYTHONPATH`, so its `adapters` package shadows any installed one; "
            "**no monkey-patching is involved**: the scenario script only uses public `adapters` APIs on a tiny "
            "Llama built from a config):\n\n" + _table(facts.scenario_rows, v)
        )
    else:
        table = "_Not measured in this export (`--skip-measure`); run the export without it to fill this in._"
    tests = ""
    if facts.upstream_tests:
        tests = "\n".join(f"* {tree} tree: `{summary}`" for tree, summary in facts.upstream_tests.items())
        tests = f"\n\nResult of the new test module:\n\n{tests}"
    parity = f"\n* float32 parity: {facts.fp32_parity}." if facts.fp32_parity else ""
    changed = "\n".join(f"* `{path}`" for path in facts.changed_files)
    return f"""\
# ReFT: make LoReFT/NoReFT/DiReFT work in bf16 and fp16

## Problem

ReFT adapters break as soon as the model (or the adapter) is in half precision. The errors users hit:

* `NotImplementedError: "orgqr_cuda" not implemented for 'BFloat16'` (CUDA) and
  `NotImplementedError: "orgqr_cpu" not implemented for 'Half'` / `'BFloat16'` (CPU): the orthogonal
  parametrization of the LoReFT projection (`torch.nn.utils.parametrizations.orthogonal`) runs a QR/Householder
  kernel torch only has for float32/float64. It hits every LoReFT model converted with `model.to(torch.bfloat16)`,
  `model.half()`, FSDP2 `MixedPrecisionPolicy(param_dtype=torch.bfloat16)`, ...
* `RuntimeError: mat1 and mat2 must have the same dtype, but got BFloat16 and Float` (and
  `expected m1 and m2 to have the same dtype, but got: c10::BFloat16 != float`): the projection is kept in float32
  (`LoReftConfig(dtype="bfloat16")` upcasts it on purpose) or the adapter was created in float32 inside a bf16
  model, and `ReftUnit.forward` multiplies bf16 activations with it. NoReFT/DiReFT hit it too: the empty
  prefix/suffix slices in `ReftModule._gather_adapted_states` are created with `torch.zeros(...)` in the default
  dtype (float32) and `torch.cat` promotes the bf16 hidden states.
* the half-precision branch in `ReftUnit.__init__` calls `logger.warning(msg, UserWarning)`, which makes
  `logging` print `--- Logging error ---` / `TypeError: not all arguments converted during string formatting`
  instead of the warning.

## Change

* new `src/adapters/methods/orthogonal.py`: an orthogonal parametrization that is a drop-in for
  `torch.nn.utils.parametrizations.orthogonal` and works for every floating dtype. Each (map, dtype, device type)
  is probed once on a tiny tensor; where torch has no suitable half-precision kernel, the map and the QR
  are computed in float32 and cast back (gradients flow through the casts). Nothing is stored in another dtype. The
  trivialization base of a non-square weight is stored compactly as `r` Householder reflectors (`n × r`, O(n·r))
  instead of a dense `n × n` matrix. With grad, the householder map's backward walks the `r` reflectors back,
  O(n·r²) instead of torch's O(n²·r) (same forward). In eval mode under `no_grad` the computed weight is cached
  until a parameter or buffer changes. `ADAPTERS_REFT_UPCAST=auto|always|never` overrides the cast policy
  (default `auto`).
* `src/adapters/methods/reft.py`:
  * `ReftUnit.__init__` uses that parametrization and no longer upcasts (or warns about) half precision; the
    positional signature is unchanged.
  * `ReftUnit.forward` computes the projection weight once (it was computed twice per call) and handles dtypes:
    without autocast it computes in the wider of the activation and parameter dtypes (a float32 adapter in a bf16
    model computes in float32) and returns the activation dtype; under autocast it follows autocast.
  * `ReftModule._gather_adapted_states` creates the empty prefix/suffix slices with `dtype=hidden_states.dtype`.
* `{PRECISION_TEST_PATH}`: unittest mixin `ReftPrecisionTestMixin` + Llama and BERT test cases covering half-precision
  models, config `dtype`, conversion after `add_adapter`, a training step, save/load, the projection's orthonormality
  in bf16/fp16, and loading a state dict written with torch's parametrization.

Files:

{changed}

```
{facts.diffstat.rstrip()}
```

## Before / after

{table}{tests}

## Compatibility

* **torch**: no version table is hard-coded; kernel support is probed at run time, so a torch that adds
  half-precision QR kernels is used natively. Fallbacks cover APIs that moved (`torch.compiler.is_compiling`
  before torch 2.3, `torch.is_autocast_enabled(device_type)` before 2.4). While `torch.compile` traces nothing is
  probed and unknown cases compute in float32.
* **Checkpoints**: the compact base changes the shape of `parametrizations.weight.0.base` in saved LoReFT adapters
  from `n × n` to `n × r`. Checkpoints saved by earlier releases still load: a load-state-dict pre-hook converts a
  dense base (the weight it stands for is computed in float64 and re-expressed as reflectors: same outputs up to rounding), and
  `test_reft_loads_torch_orthogonal_state` covers it. Adapters saved with this change cannot be loaded by earlier
  adapters releases; `orthogonal(module, compact=False)` keeps torch's dense layout if that is preferred.
* **float32**: same math and order of operations as before, and the base is built from the same random stream
  (torch's completion draws are still drawn, so later layers initialise identically); outputs agree with stock up
  to rounding.{parity}
* The before/after scenarios were run **without any monkey-patching**: the scenario script comes from the
  `adapters-reft` fork (only for its scenario definitions); its `adapters_reft.patch()` is never called, and the
  code in this PR imports nothing from it.

## Reproduce

```
{facts.command}
```

`git apply --check reft-dtype-safe.patch` on a pristine adapters-{v} tree:

```
{facts.git_apply_check.rstrip() or "(no output: the patch applies cleanly)"}
```
"""
