"""patch() / unpatch() / is_patched(): idempotent, exact restore, version gate, converting existing units."""

from __future__ import annotations

import logging

import adapters
import adapters.methods.reft as stock_reft
import pytest
import torch

import adapters_reft
from adapters_reft import scenarios
from adapters_reft.reft import ReftUnit
from adapters_reft.scenarios import _inputs, tiny_llama


def test_patch_is_idempotent_and_unpatch_restores_stock_exactly(stock: None) -> None:
    original_unit = stock_reft.ReftUnit
    original_gather = stock_reft.ReftModule.__dict__["_gather_adapted_states"]
    assert not adapters_reft.is_patched()
    adapters_reft.patch()
    first = stock_reft.ReftUnit
    adapters_reft.patch()
    assert adapters_reft.is_patched()
    assert stock_reft.ReftUnit is first and issubclass(first, ReftUnit)
    assert stock_reft.ReftModule.__dict__["_gather_adapted_states"].__adapters_reft_original__ is original_gather
    adapters_reft.unpatch()
    adapters_reft.unpatch()
    assert not adapters_reft.is_patched()
    assert stock_reft.ReftUnit is original_unit
    assert stock_reft.ReftModule.__dict__["_gather_adapted_states"] is original_gather


def test_patch_compact_switch(stock: None) -> None:
    adapters_reft.patch(compact=False)
    model = tiny_llama()
    model.add_adapter("dense", config=adapters.LoReftConfig())
    adapters_reft.patch(compact=True)
    model.add_adapter("compact", config=adapters.LoReftConfig())
    adapters_reft.unpatch()
    shapes = {
        k.split(".refts.")[1].split(".")[0]: v.shape for k, v in model.state_dict().items() if k.endswith("0.base")
    }
    assert shapes == {"dense": (64, 64), "compact": (64, 1)}


@pytest.mark.parametrize(
    ("version", "match"),
    [
        ("0.2.2", r"adapters 0.2.2 is not supported: ReFT needs adapters>=1.0"),
        (
            "1.4.0",
            r"adapters 1.4.0 is newer than this adapters-reft was tested with \(supported: adapters>=1.0,<1.4\)",
        ),
        ("2.0.0.dev0", r"supported: adapters>=1.0,<1.4"),
    ],
)
def test_unsupported_release_is_refused(
    monkeypatch: pytest.MonkeyPatch, stock: None, version: str, match: str
) -> None:
    monkeypatch.setattr("adapters_reft.versions.adapters_version", lambda: version)
    with pytest.raises(adapters_reft.UnsupportedVersionError, match=match):
        adapters_reft.patch()
    assert not adapters_reft.is_patched()


@pytest.mark.parametrize("version", ["1.0.0", "1.1.1", "1.2.0", "1.3.0", "1.3.1.post1"])
def test_supported_releases(version: str) -> None:
    assert adapters_reft.check_adapters_version(version) == version


def test_patch_model_converts_existing_units_bit_for_bit(stock: None) -> None:
    model = tiny_llama()
    model.add_adapter("reft", config=adapters.LoReftConfig())
    model.set_active_adapters("reft")
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = model(_inputs()).logits
    adapters_reft.patch(model)
    try:
        units = [m for m in model.modules() if isinstance(m, stock_reft.ReftModule)]
        assert units and all(isinstance(u, ReftUnit) for m in units for u in m.units)
        after = model.state_dict()
        assert before.keys() == after.keys()
        assert all(torch.equal(before[k], after[k]) for k in before)
        with torch.no_grad():
            assert torch.equal(model(_inputs()).logits, expected)
        model.to(torch.bfloat16)  # stock would now raise orgqr_cpu ... 'BFloat16'
        with torch.no_grad():
            out = model(_inputs(), output_hidden_states=True)
        assert out.hidden_states[-1].dtype == torch.bfloat16 and torch.isfinite(out.logits).all()
        assert adapters_reft.convert_units(model) == 0  # nothing left to convert
    finally:
        adapters_reft.unpatch()


def _bf16_config() -> adapters.LoReftConfig:
    try:
        return scenarios._lo(dtype="bfloat16")
    except scenarios.ScenarioUnavailable as exc:
        pytest.skip(str(exc))


def test_no_broken_half_precision_warning(patched: None, caplog: pytest.LogCaptureFixture) -> None:
    config = _bf16_config()
    with caplog.at_level(logging.WARNING):
        model = tiny_llama(torch.bfloat16)
        model.add_adapter("reft", config=config)
    assert not [r for r in caplog.records if "Orthogonal parametrization is not supported" in r.getMessage()]
    unit = model.model.layers[0].reft_layer.refts["reft"].units[0]
    assert unit.projection.parametrizations.weight.original.dtype == torch.bfloat16  # not moved to fp32


def _formatting_errors(build: object) -> list[str]:
    """Formatting errors of records logged by adapters.methods.reft while ``build()`` runs."""
    errors: list[str] = []

    class Formatting(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            try:
                record.getMessage()
            except TypeError as exc:
                errors.append(str(exc))

    logger = logging.getLogger("adapters.methods.reft")
    handler = Formatting(logging.WARNING)
    logger.addHandler(handler)
    try:
        build()  # type: ignore[operator]
    except TypeError as exc:  # pytest's own log handler re-raises formatting errors
        errors.append(str(exc))
    finally:
        logger.removeHandler(handler)
    return errors


def _bf16_lo_reft() -> None:
    model = tiny_llama(torch.bfloat16)
    model.add_adapter("reft", config=_bf16_config())


def test_stock_warning_call_crashes_inside_logging(stock: None) -> None:
    _bf16_config()  # adapters 1.0.x has no dtype argument and no such warning
    assert any("not all arguments converted" in e for e in _formatting_errors(_bf16_lo_reft))


def test_patched_unit_logs_nothing_broken(patched: None) -> None:
    _bf16_config()
    assert _formatting_errors(_bf16_lo_reft) == []
