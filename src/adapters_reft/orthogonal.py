r"""A dtype-safe orthogonal parametrization with an O(n·k) trivialization base.

For a weight :math:`W` of shape ``(..., m, n)`` let :math:`X` be its tall view (``n × k`` after a transpose,
``k = min(m, n)``). The weight is

.. math:: W = B \cdot \phi(X_{\text{orig}}),

where :math:`\phi` is ``householder``, ``matrix_exp`` or ``cayley`` (the same maps as
:func:`torch.nn.utils.parametrizations.orthogonal`) and :math:`B` is the trivialization base: an orthogonal
``n × n`` matrix whose first ``k`` columns are the initial weight, so that :math:`X_{\text{orig}}` starts at
the identity point. Two layouts of :math:`B` exist:

* ``compact`` (default for non-square weights): :math:`B = H_1 \cdots H_k S` stored as ``k`` Householder
  reflectors and signs in one ``n × k`` tensor (strict lower triangle: reflectors with an implicit unit
  diagonal; diagonal: ±1). Each reflector's scale :math:`2 / v^\top v` is recomputed from its vector, so
  :math:`B` is orthogonal to working precision even when the tensor is stored in bf16. Memory O(n·k),
  applying it O(n·k²), instead of torch's dense ``n × n`` base.
* ``dense``: torch's own ``n × n`` base (same layout and values as ``torch.nn.utils.parametrizations``).

The maps and QR factorizations are computed in float32 wherever :mod:`adapters_reft.compat` says the
storage dtype has no native kernel (or the policy says so); results are cast back, and gradients reach the
stored parameter through the casts. Nothing is stored in a dtype other than the weight's.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from . import compat

__all__ = ["DtypeSafeOrthogonal", "adopt_torch_orthogonal", "orthogonal"]

_HALF = (torch.float16, torch.bfloat16)


def _tall(x: Tensor) -> tuple[Tensor, bool]:
    transposed = x.size(-2) < x.size(-1)
    return (x.mT if transposed else x), transposed


def _identity_point(like: Tensor) -> Tensor:
    """The original tensor at which every map gives the first columns of the identity (diagonal of -1)."""
    point = torch.zeros_like(like)
    point.diagonal(dim1=-2, dim2=-1).fill_(-1.0)
    return point


class _HouseholderProduct(torch.autograd.Function):
    """``torch.linalg.householder_product`` (the same forward, bit for bit) with an O(n·k²) backward.

    torch's backward costs O(n²·k) (n × n intermediates), which dominated a LoReFT training step's overhead.
    This one recomputes the inputs of the k reflectors H_i = I - tau_i v_i v_iᵀ and walks them back.
    """

    @staticmethod
    def forward(ctx: Any, lower: Tensor, tau: Tensor) -> Tensor:
        ctx.save_for_backward(lower, tau)
        return torch.linalg.householder_product(lower, tau)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor]:
        lower, tau = ctx.saved_tensors
        n, k = lower.shape[-2:]
        eye = torch.eye(n, k, dtype=lower.dtype, device=lower.device)
        vectors = lower.tril(-1) + eye
        inputs = [eye.expand_as(lower)]  # q_k = I[:, :k]; q_i = H_i q_{i+1}; the output is q_0
        for i in reversed(range(1, k)):
            v, q = vectors[..., :, i : i + 1], inputs[-1]
            inputs.append(q - (tau[..., i, None, None] * v) @ (v.mT @ q))
        grad_vectors, grad_tau = torch.zeros_like(vectors), torch.zeros_like(tau)
        for i in range(k):
            v, t, q = vectors[..., :, i : i + 1], tau[..., i, None, None], inputs[k - 1 - i]
            w, gv = v.mT @ q, v.mT @ grad
            grad_tau[..., i] = -(gv * w).sum((-2, -1))
            grad_vectors[..., :, i : i + 1] = -t * (grad @ w.mT + q @ gv.mT)
            grad = grad - (t * v) @ gv
        return grad_vectors.tril(-1), grad_tau


def _householder_product(lower: Tensor, tau: Tensor) -> Tensor:
    """torch's product of reflectors; with grad and few reflectors, through the O(n·k²) backward above."""
    n, k = lower.shape[-2:]
    if k <= 64 and n >= 4 * k and torch.is_grad_enabled() and not compat._is_tracing():
        return _HouseholderProduct.apply(lower, tau)
    return torch.linalg.householder_product(lower, tau)


def _map(x: Tensor, orthogonal_map: str) -> Tensor:
    """Orthonormal ``n × k`` matrix from a tall ``n × k`` unconstrained tensor."""
    n, k = x.size(-2), x.size(-1)
    if orthogonal_map == "householder":
        lower = x.tril(diagonal=-1)
        tau = 2.0 / (1.0 + (lower * lower).sum(dim=-2))
        q = _householder_product(lower, tau)
        # The diagonal of x holds ±1 and only picks each column's sign; it gets no gradient. torch reads it
        # with .int(), which truncates -0.99999 to 0 once AdamW's weight decay has touched it and zeroes the
        # whole column; _signs gives the same ±1 on untouched values and stays ±1 after decay or averaging.
        return q * _signs(x.diagonal(dim1=-2, dim2=-1)).unsqueeze(-2)
    square = nn.functional.pad(x.tril(), (0, n - k)) if n != k else x.tril()
    skew = square - square.mH
    if orthogonal_map == "matrix_exp":
        q = torch.matrix_exp(skew)
    else:  # cayley: (I + A/2)(I - A/2)^{-1}
        eye = torch.eye(n, dtype=x.dtype, device=x.device)
        q = torch.linalg.solve(torch.add(eye, skew, alpha=-0.5), torch.add(eye, skew, alpha=0.5))
    return q[..., :k] if n != k else q


def _signs(diagonal: Tensor) -> Tensor:
    """±1 (never 0) for each diagonal entry: a sign that was averaged (``average_adapter`` averages every
    tensor linearly) or decayed still selects a column sign, so the weight stays orthonormal."""
    return torch.where(diagonal < 0, -1.0, 1.0).to(diagonal.dtype)


def _apply_compact_base(base: Tensor, y: Tensor) -> Tensor:
    """``H_1 ⋯ H_k S @ y`` for a compact base (reflectors below the diagonal, signs on it)."""
    k = base.size(-1)
    eye = torch.eye(base.size(-2), k, dtype=base.dtype, device=base.device)
    vectors = base.tril(diagonal=-1) + eye
    tau = 2.0 / (vectors * vectors).sum(dim=-2)
    signs = _signs(base.diagonal(dim1=-2, dim2=-1)).to(y.dtype)
    y = torch.cat([y[..., :k, :] * signs.unsqueeze(-1), y[..., k:, :]], dim=-2)
    for i in reversed(range(k)):
        v = vectors[..., :, i : i + 1]
        y = y - (tau[..., i, None, None] * v) @ (v.mT @ y)
    return y


def _weight(original: Tensor, base: Tensor | None, orthogonal_map: str, dtype: torch.dtype) -> Tensor:
    """``base · map(original)`` computed and returned in ``dtype`` (autocast off: orthonormality is numerics)."""
    with torch.autocast(device_type=original.device.type, enabled=False):
        tall, transposed = _tall(original.to(dtype))
        q = _map(tall, orthogonal_map)
        if base is not None:
            base = base.to(dtype)
            q = base @ q if base.size(-1) == base.size(-2) else _apply_compact_base(base, q)
        if transposed:
            q = q.mT
    return q


def stamp(t: Tensor) -> tuple[Tensor, int, int]:
    """What says a stored tensor is unchanged: the object, its version counter (in-place updates) and its storage
    pointer (``.to()``, ``.data =``). Used by the eval-mode weight cache here and by the ReFT units' inference plans."""
    return t, t._version, t.data_ptr()


def unchanged(t: Tensor | None, tensor_stamp: tuple[Tensor, int, int] | None) -> bool:
    """Whether ``t`` is still what ``tensor_stamp`` recorded (both None counts as unchanged)."""
    if t is None or tensor_stamp is None:
        return t is None and tensor_stamp is None
    return t is tensor_stamp[0] and t._version == tensor_stamp[1] and t.data_ptr() == tensor_stamp[2]


def _compact_base(q: Tensor) -> Tensor:
    """Compact base whose first ``k`` columns equal the Q factor of ``q`` (with a non-negative R diagonal)."""
    reflectors, tau = torch.geqrf(q)
    signs = _signs(reflectors.diagonal(dim1=-2, dim2=-1))
    # LAPACK uses tau == 0 for "no reflection"; the recomputed scale reflects there, so flip that sign back.
    signs = torch.where(tau == 0, -signs, signs)
    eye = torch.eye(q.size(-2), q.size(-1), dtype=q.dtype, device=q.device)
    return reflectors.tril(diagonal=-1) + eye * signs.unsqueeze(-2)


def _orthonormalize(a: Tensor) -> Tensor:
    """Q factor of a tall matrix with a non-negative R diagonal."""
    reflectors, tau = torch.geqrf(a)
    q = torch.linalg.householder_product(reflectors, tau)
    return q * reflectors.diagonal(dim1=-2, dim2=-1).sgn().unsqueeze(-2)


_RAW_DRAWS = {torch.float32: torch.int32, torch.float64: torch.int64}


@functools.cache
def _raw_draws_match_randn(dtype: torch.dtype) -> bool:
    """Whether ``_advance_rng_like_randn`` leaves the CPU generator exactly where ``randn`` does (checked on
    this torch build once, on sizes that hit each of randn's code paths, since that is an implementation detail)."""
    for n in (17, 4096, 4099, 65537):
        reference, candidate = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
        torch.randn(n, dtype=dtype, generator=reference)
        torch.empty(_raw_count(n), dtype=_RAW_DRAWS[dtype]).random_(generator=candidate)
        if not torch.equal(reference.get_state(), candidate.get_state()):
            return False
    return True


def _raw_count(n: int) -> int:
    # CPU randn of >= 16 values draws one raw number per value, plus 16 to redo a ragged last block
    return n + (16 if n % 16 else 0)


def _advance_rng_like_randn(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
    """Consume the random numbers ``torch.randn(shape)`` would, about twice as fast on CPU (no Box-Muller)."""
    n = math.prod(shape)
    if device.type == "cpu" and n >= 16 and dtype in _RAW_DRAWS and _raw_draws_match_randn(dtype):
        torch.empty(_raw_count(n), dtype=_RAW_DRAWS[dtype]).random_()
    else:
        torch.randn(shape, dtype=dtype, device=device)


def _is_orthogonal(q: Tensor) -> bool:
    n, k = q.size(-2), q.size(-1)
    eye = torch.eye(k, dtype=q.dtype, device=q.device)
    return torch.allclose(q.mH @ q, eye, atol=10.0 * n * torch.finfo(q.dtype).eps)


class DtypeSafeOrthogonal(nn.Module):
    """Orthogonal parametrization that works for every floating storage dtype (see the module docstring).

    ``base`` is a buffer in the weight's dtype: ``n × k`` (compact) or ``n × n`` (dense), or absent without
    trivialization. In eval mode under ``no_grad`` the computed weight is cached until a parameter or
    buffer changes (in-place update, ``load_state_dict``, ``.to()``) or ``train()`` is called.
    """

    base: Tensor | None

    def __init__(
        self, weight: Tensor, orthogonal_map: str, *, use_trivialization: bool = True, compact: bool = True
    ) -> None:
        super().__init__()
        if weight.is_complex():
            raise ValueError("adapters_reft.orthogonal supports real weights only; use torch's for complex ones")
        compat._check_map(orthogonal_map)
        self.shape = weight.shape
        self.orthogonal_map = orthogonal_map
        self.compact = compact
        # (stamp of original, its dtype, stamp of base or None, weight)
        self._cache: tuple[Any, ...] | None = None
        if use_trivialization:
            self.register_buffer("base", None)

    @property
    def use_trivialization(self) -> bool:
        return hasattr(self, "base")

    # -- forward ---------------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        cacheable = self._cacheable(x)
        if cacheable:
            cached = self.cached_weight(x)
            if cached is not None:
                return cached
        out = self._compute(x)
        self._cache = None
        if cacheable:
            base = self._buffers.get("base")
            self._cache = (stamp(x), x.dtype, None if base is None else stamp(base), out)
        return out

    def _compute(self, x: Tensor) -> Tensor:
        dtype = compat.compute_dtype(self.orthogonal_map, x.dtype, x.device.type, "forward")
        return _weight(x, getattr(self, "base", None), self.orthogonal_map, dtype).to(x.dtype)

    def _cacheable(self, x: Tensor) -> bool:
        if self.training or torch.is_grad_enabled() or x.device.type == "meta" or compat.is_compiling():
            return False
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            return False
        # fake/functional tensors of a tracer outside dynamo's flag (torch 2.2's AOT tracing) are subclasses
        base = self._buffers.get("base")
        return compat.is_plain_tensor(x) and (base is None or compat.is_plain_tensor(base))

    def cached_weight(self, x: Tensor) -> Tensor | None:
        """The cached weight for ``x`` (the ``original`` tensor) if nothing changed since it was computed.

        Cheap on purpose (identity, version counter and storage pointer of ``original`` and ``base``): ReFT units
        call it directly for every generated token. Callers make sure caching applies (eval mode, no grad).
        """
        cache = self._cache
        if cache is None:
            return None
        original_stamp, dtype, base_stamp, out = cache
        if (
            not unchanged(x, original_stamp)
            or x.dtype != dtype
            or not unchanged(self._buffers.get("base"), base_stamp)
        ):
            return None
        return out

    def clear_cache(self) -> None:
        """Forget the cached eval-mode weight: needed only after writing through ``.data``, which torch does not
        count as a change (every other in-place update, ``load_state_dict`` and ``.to()`` are noticed)."""
        self._cache = None

    def train(self, mode: bool = True) -> DtypeSafeOrthogonal:
        self._cache = None
        return super().train(mode)

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> DtypeSafeOrthogonal:
        self._cache = None
        return super()._apply(fn, *args, **kwargs)

    def convert_layout_on_load(self, state_dict: dict[str, Tensor], prefix: str, *_: Any) -> None:
        """Load pre-hook registered on the owning ParametrizationList (see ``_convert_layout_on_load``)."""
        _convert_layout_on_load(self, state_dict, prefix)

    # -- right inverse ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def right_inverse(self, q: Tensor) -> Tensor:
        """Original tensor for a requested weight ``q`` (orthonormalized first if it is not orthogonal)."""
        if q.shape != self.shape:
            raise ValueError(
                f"Expected a matrix or batch of matrices of shape {tuple(self.shape)}; got {tuple(q.shape)}"
            )
        self._cache = None
        dtype = compat.compute_dtype("householder", q.dtype, q.device.type, "inverse")
        with torch.autocast(device_type=q.device.type, enabled=False):
            tall, transposed = _tall(q.to(dtype))
            if not self.use_trivialization:
                return self._inverse_without_base(tall, transposed).to(q.dtype)
            self.base = self._new_base(tall, rng_dtype=torch.float32 if q.dtype in _HALF else q.dtype).to(q.dtype)
        return _identity_point(q)

    def _inverse_without_base(self, tall: Tensor, transposed: bool) -> Tensor:
        if self.orthogonal_map != "householder":
            raise NotImplementedError(
                "It is not possible to assign to the matrix_exp or cayley parametrizations when use_trivialization=False."
            )
        reflectors, tau = torch.geqrf(tall)
        diagonal = reflectors.diagonal(dim1=-2, dim2=-1)
        diagonal.copy_(torch.where(tau == 0, -_signs(diagonal), _signs(diagonal)))
        return reflectors.mT if transposed else reflectors

    def _new_base(self, tall: Tensor, rng_dtype: torch.dtype) -> Tensor:
        n, k = tall.size(-2), tall.size(-1)
        if n == k:
            return tall.clone() if _is_orthogonal(tall) else _orthonormalize(tall)
        # torch completes the base with n × (n - k) normal samples: the compact base does not need them, but
        # the RNG stream (and with it every later layer's initialization) must stay where stock leaves it.
        shape = (*tall.shape[:-2], n, n - k)
        if self.compact:
            _advance_rng_like_randn(shape, rng_dtype, tall.device)
            return _compact_base(tall)
        filler = torch.randn(shape, dtype=rng_dtype, device=tall.device)
        return _orthonormalize(torch.cat([tall, filler.to(tall.dtype)], dim=-1))


def _convert_layout_on_load(parametrization: DtypeSafeOrthogonal, state_dict: dict[str, Tensor], prefix: str) -> None:
    """Load pre-hook of the ParametrizationList: accept a checkpoint whose base has the other layout.

    A dense (stock) base loaded into a compact parametrization is converted: the weight it stands for is
    computed in float64 and re-expressed as a compact base with the original at the identity point, so the
    outputs stay the same. A compact base loaded into a dense parametrization is adopted as it is.
    """
    base_key, original_key = f"{prefix}0.base", f"{prefix}original"
    current = getattr(parametrization, "base", None)
    incoming = state_dict.get(base_key)
    if current is None or incoming is None or incoming.shape == current.shape:
        return
    n = current.size(-2)
    if incoming.size(-2) != n or incoming.size(-1) not in (n, min(parametrization.shape[-2:])):
        return  # let torch report the shape mismatch
    if incoming.size(-1) == n and current.size(-1) != n and original_key in state_dict:
        original = state_dict[original_key]
        weight = _weight(original.to(torch.float64), incoming, parametrization.orthogonal_map, torch.float64)
        tall, _ = _tall(weight)
        state_dict[base_key] = _compact_base(tall).to(current.dtype)
        state_dict[original_key] = _identity_point(original)
    else:
        parametrization.base = torch.empty_like(incoming, dtype=current.dtype, device=current.device)


def orthogonal(
    module: nn.Module,
    name: str = "weight",
    orthogonal_map: str | None = None,
    *,
    use_trivialization: bool = True,
    compact: bool = True,
) -> nn.Module:
    """Drop-in for :func:`torch.nn.utils.parametrizations.orthogonal` that works in every floating dtype.

    ``compact=False`` keeps torch's dense ``n × n`` base (same state-dict layout as torch's); the default
    stores it as ``k`` reflectors (O(n·k)). The map defaults as in torch: ``matrix_exp`` for square weights,
    ``householder`` otherwise.
    """
    weight = getattr(module, name, None)
    if not isinstance(weight, Tensor):
        raise ValueError(f"Module '{module}' has no parameter or buffer with name '{name}'")
    if weight.ndim < 2:
        raise ValueError(f"Expected a matrix or batch of matrices. Got a tensor of {weight.ndim} dimensions.")
    if not weight.is_floating_point():
        raise TypeError(f"orthogonal needs a floating-point weight; '{name}' has dtype {weight.dtype}")
    if orthogonal_map is None:
        orthogonal_map = "matrix_exp" if weight.size(-2) == weight.size(-1) else "householder"
    parametrization = DtypeSafeOrthogonal(
        weight, orthogonal_map, use_trivialization=use_trivialization, compact=compact
    )
    parametrize.register_parametrization(module, name, parametrization, unsafe=True)
    _hook_layout_conversion(module.parametrizations[name], parametrization)
    return module


def _hook_layout_conversion(plist: nn.Module, parametrization: DtypeSafeOrthogonal) -> None:
    # a bound method, not a closure: copy.deepcopy(model) then hooks the copy's parametrization, not ours
    plist._register_load_state_dict_pre_hook(parametrization.convert_layout_on_load)


def adopt_torch_orthogonal(module: nn.Module, name: str = "weight") -> DtypeSafeOrthogonal:
    """Replace torch's orthogonal parametrization on ``module.name`` by ours, keeping its tensors as they are.

    The dense layout reads torch's ``original`` and ``base`` unchanged, so the weight is bit for bit the same
    in float32 and every dtype now works.
    """
    plist = module.parametrizations[name]
    stock = plist[0]
    ours = DtypeSafeOrthogonal(
        plist.original, stock.orthogonal_map.name, use_trivialization=hasattr(stock, "base"), compact=False
    )
    ours.shape = stock.shape
    if ours.use_trivialization:
        ours.base = stock.base
    ours.train(stock.training)
    plist[0] = ours
    _hook_layout_conversion(plist, ours)
    return ours
