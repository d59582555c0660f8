"""Gradient checkpointing (non-reentrant, the only kind adapters supports) with patched ReFT in half precision.

The ReFT unit runs in a forward hook of each decoder layer, so it sits inside the checkpointed region: its
orthogonal parametrization is recomputed in backward. Checkpointing must not change the loss, the gradients
or the training trajectory (the dropout RNG state is restored for the recompute).
"""

from __future__ import annotations

import adapters
import pytest
import torch
from torch import nn

from adapters_reft import DtypeSafeOrthogonal
from adapters_reft.scenarios import VOCAB, tiny_llama


def _adapters_supports_checkpointing() -> bool:
    """adapters >= 1.1 overrides gradient_checkpointing_enable to restore its ForwardContext in the recompute;
    1.0 has no such override and ReFT fails there in backward (stock adapters too, in any dtype)."""
    from adapters.model_mixin import ModelAdaptersMixin

    return "gradient_checkpointing_enable" in vars(ModelAdaptersMixin)


pytestmark = [
    pytest.mark.usefixtures("patched"),
    pytest.mark.skipif(
        not _adapters_supports_checkpointing(),
        reason=f"adapters {adapters.__version__} does not support gradient checkpointing (added in 1.1)",
    ),
]

CHECKPOINTING = {"use_reentrant": False}
CONFIGS = {
    "loreft": lambda dropout: adapters.LoReftConfig(r=4, dropout=dropout),
    "noreft": lambda dropout: adapters.NoReftConfig(r=4, dropout=dropout),
    "direft": lambda dropout: adapters.DiReftConfig(r=4, dropout=dropout),
}
# Below one bf16/fp16 ulp (2^-8 / 2^-11 relative): on CPU the recompute gives the same numbers.
TOLERANCE = {"rtol": 1e-4, "atol": 1e-7}


def _build(dtype: torch.dtype, config: str = "loreft", dropout: float = 0.0, checkpointing: bool = False) -> nn.Module:
    """Tiny Llama + ReFT built in fp32 and cast with .to(dtype) (same seed, so the same weights every call)."""
    model = tiny_llama(torch.float32)
    model.add_adapter("reft", config=CONFIGS[config](dropout))
    model.train_adapter("reft")
    model = model.to(dtype)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=CHECKPOINTING)
        assert model.is_gradient_checkpointing
    assert model.training
    return model


def _ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(seed))


def _loss_and_grads(model: nn.Module, seed: int = 1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    ids = _ids(seed)
    torch.manual_seed(1234)  # dropout draws the same masks in both runs
    loss = model(ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _trained_unit_params(grads: dict[str, torch.Tensor]) -> list[str]:
    # prefix_positions=3, suffix_positions=0: unit 0 of each layer trains, unit 1 acts on an empty slice
    return [n for n in grads if ".units.0." in n]


@pytest.mark.parametrize(
    ("dtype", "config", "dropout"),
    [
        (torch.bfloat16, "loreft", 0.0),
        (torch.bfloat16, "loreft", 0.05),  # dropout masks: the recompute must restore the RNG state
        (torch.bfloat16, "noreft", 0.0),
        (torch.bfloat16, "direft", 0.0),
        (torch.float16, "loreft", 0.05),
        (torch.float32, "loreft", 0.0),
    ],
    ids=lambda v: str(v).removeprefix("torch."),
)
def test_checkpointed_gradients_equal_plain_gradients(dtype: torch.dtype, dropout: float, config: str) -> None:
    plain_loss, plain = _loss_and_grads(_build(dtype, config, dropout))
    ckpt_loss, ckpt = _loss_and_grads(_build(dtype, config, dropout, checkpointing=True))

    assert torch.isfinite(plain_loss) and 3.5 < plain_loss.item() < 6.0
    torch.testing.assert_close(ckpt_loss, plain_loss, **TOLERANCE)
    assert plain.keys() == ckpt.keys()
    assert len(plain) == 2 * 2 * 3  # layers x units x (learned_source weight and bias, projection)
    for name, grad in plain.items():
        assert ckpt[name] is not None, f"{name}: no gradient with checkpointing"
        assert ckpt[name].dtype == dtype
        assert torch.isfinite(ckpt[name]).all()
        torch.testing.assert_close(ckpt[name], grad, **TOLERANCE, msg=lambda m, name=name: f"{name}: {m}")
    for name in _trained_unit_params(plain):
        assert plain[name].abs().max() > 0, f"{name}: zero gradient, the test would prove nothing"


def test_orthogonal_map_is_recomputed_in_backward() -> None:
    """The parametrization runs inside the checkpoint: once per unit in forward and once more in backward."""
    calls: list[torch.dtype] = []

    def count(model: nn.Module) -> None:
        calls.clear()
        for module in model.modules():
            if isinstance(module, DtypeSafeOrthogonal):
                module.register_forward_hook(lambda _m, _a, out: calls.append(out.dtype))

    plain = _build(torch.bfloat16)
    count(plain)
    _loss_and_grads(plain)
    assert len(calls) == 4  # 2 layers x 2 units
    ckpt = _build(torch.bfloat16, checkpointing=True)
    count(ckpt)
    ids = _ids()
    loss = ckpt(ids, labels=ids).loss
    assert len(calls) == 4
    loss.backward()
    assert len(calls) == 8
    assert set(calls) == {torch.bfloat16}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=lambda d: str(d).removeprefix("torch."))
def test_checkpointed_training_follows_the_same_trajectory(dtype: torch.dtype) -> None:
    def train(model: nn.Module) -> tuple[list[float], dict[str, torch.Tensor]]:
        params = [p for p in model.parameters() if p.requires_grad]
        # AdamW's default eps=1e-8 is 0 in fp16: the all-zero gradient of the unused unit would give 0/0
        optimizer = torch.optim.AdamW(params, lr=1e-2, eps=1e-8 if dtype == torch.bfloat16 else 1e-4)
        losses = []
        for step in range(3):
            optimizer.zero_grad()
            loss, _ = _loss_and_grads(model, seed=step)
            optimizer.step()
            losses.append(loss.item())
        return losses, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    initial = {n: p.detach().clone() for n, p in _build(dtype).named_parameters() if p.requires_grad}
    plain_losses, plain = train(_build(dtype))
    ckpt_model = _build(dtype, checkpointing=True)
    ckpt_losses, ckpt = train(ckpt_model)

    assert all(torch.isfinite(torch.tensor(plain_losses)))
    assert plain_losses == pytest.approx(ckpt_losses, rel=1e-4)
    for name, tensor in plain.items():
        torch.testing.assert_close(ckpt[name], tensor, **TOLERANCE, msg=lambda m, name=name: f"{name}: {m}")
    for name in _trained_unit_params(plain):
        assert not torch.equal(plain[name], initial[name]), f"{name} did not train"

    # the projections stayed orthonormal through the checkpointed updates (checked in fp32)
    projections = [m.weight for m in ckpt_model.modules() if hasattr(m, "parametrizations")]
    assert len(projections) == 4
    for weight in projections:
        assert weight.dtype == dtype
        r = weight.detach().float()
        assert (r @ r.T - torch.eye(4)).abs().max() < 2e-2
