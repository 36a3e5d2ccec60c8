"""Mixture-of-experts gating, dispatch and combine (Shazeer et al. 2017; Switch Transformer; ST-MoE).

The maths, the reference and the kernel contracts are in :mod:`ovseg_fast.ops.moe_reference`; this
module is the public API: input checks, the ``torch.library`` registrations (forward, backward, fake
tensors, autograd, FLOP formulas), backend dispatch to the C++ kernels (``csrc/moe.cpp``), the
Triton kernels (``kernels/moe.py``) or the reference, and the :class:`MixtureOfExperts` module.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Sequence
from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import register_flop_formula

from ovseg_fast.backends import KernelSupport, direct_cpu, dispatch, register_op
from ovseg_fast.ops._checks import check_int, check_same_device, check_shape, check_tensor, value_range
from ovseg_fast.ops.moe_reference import (
    combine_inverse_reference,
    compute_dtype,
    gating_backward_reference,
    gating_forward_reference,
    moe_combine_backward_reference,
    moe_combine_reference,
    moe_dispatch_backward_reference,
    moe_dispatch_reference,
)

__all__ = [
    "GatingOutput",
    "MixtureOfExperts",
    "moe_combine",
    "moe_combine_flops",
    "moe_dispatch",
    "topk_gating",
    "topk_gating_flops",
]

_CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
register_op(
    "topk_gating",
    KernelSupport(
        cpu_dtypes=_CPU_DTYPES,
        triton_dtypes=(torch.float32, torch.float16, torch.bfloat16),
        cpu_ops=("topk_gating_cpu_forward", "topk_gating_cpu_backward"),
    ),
)
register_op(
    "moe_dispatch",
    KernelSupport(
        cpu_dtypes=_CPU_DTYPES,
        triton_dtypes=(torch.float32, torch.float16, torch.bfloat16),
        cpu_ops=("moe_dispatch_cpu_forward", "moe_dispatch_cpu_backward"),
    ),
)
register_op(
    "moe_combine",
    KernelSupport(
        cpu_dtypes=_CPU_DTYPES,
        triton_dtypes=(torch.float32, torch.float16, torch.bfloat16),
        cpu_ops=("moe_combine_cpu_forward", "moe_combine_cpu_backward"),
    ),
)

_INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)


def _triton():
    return importlib.import_module("ovseg_fast.kernels.moe")


def _direct_function(name: str, kernel: str, setup_context, backward) -> type[torch.autograd.Function]:
    """An ``autograd.Function`` with a registered op's autograd (``setup_context``, ``backward``)
    around a direct call of its C++ kernel ``torch.ops.ovseg_fast.<kernel>``.

    ``forward`` takes ``ctx`` and calls ``setup_context`` itself: with a separate ``setup_context``
    every ``apply`` binds the arguments through ``inspect.signature``, as costly as the kernel at
    RPN sizes.
    """

    def forward(ctx, *args):
        output = getattr(torch.ops.ovseg_fast, kernel).default(*args)
        setup_context(ctx, args, output)
        return output

    return type(
        name, (torch.autograd.Function,), {"forward": staticmethod(forward), "backward": staticmethod(backward)}
    )


def _run(op: str, registered, function: type[torch.autograd.Function], kernel: str, args: tuple, inputs: tuple):
    """``registered(*args)``, or its C++ kernel ``kernel`` called directly when
    :func:`~ovseg_fast.backends.direct_cpu` allows (through ``function``, the op's autograd, when one
    of the tensors ``inputs`` needs a gradient)."""
    if not direct_cpu(op, *inputs):
        return registered(*args)
    if torch.is_grad_enabled():
        for t in inputs:
            if t is not None and t.requires_grad:
                return function.apply(*args)
    return getattr(torch.ops.ovseg_fast, kernel).default(*args)


def _run_backward(op: str, registered, kernel: str, args: tuple, like: Tensor):
    """``registered(*args)`` (a backward op), or its C++ kernel directly (see
    :func:`~ovseg_fast.backends.direct_cpu`)."""
    if direct_cpu(op, like):
        return getattr(torch.ops.ovseg_fast, kernel).default(*args)
    return registered(*args)


class GatingOutput(NamedTuple):
    """What :func:`topk_gating` returns (a ``NamedTuple``: unpacks, indexes, and traces under
    ``torch.compile``). Losses are 0-dim tensors in float32 (float64 for float64 logits)."""

    weights: Tensor  #: (T, k) gate weights of the chosen experts, logits' dtype
    indices: Tensor  #: (T, k) int64 chosen experts, in decreasing order of weight
    expert_counts: Tensor  #: (E,) int64 number of (token, slot) assignments per expert
    load_balancing_loss: Tensor  #: Switch Transformer's E sum_e f_e P_e (1 when balanced)
    importance_loss: Tensor  #: Shazeer's CV^2 of the per-expert sums of gate weights
    load_loss: Tensor  #: Shazeer's CV^2 of the (smooth, when noisy) per-expert load
    z_loss: Tensor  #: ST-MoE's mean of logsumexp(logits)^2


# ---------------------------------------------------------------------------------------------
# Gating


def _check_finite(name: str, t: Optional[Tensor]) -> None:
    if t is not None and t.numel() and not all(math.isfinite(v) for v in value_range(t)):
        raise ValueError(f"topk_gating: {name} must be finite (got inf or NaN)")


@torch.library.custom_op("ovseg_fast::topk_gating", mutates_args=())
def _gating_op(
    logits: Tensor, noise: Optional[Tensor], noise_logits: Optional[Tensor], k: int, normalize: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Forward of the gating contract (see :mod:`ovseg_fast.ops.moe_reference`)."""
    args = (logits, noise, noise_logits, k, normalize)

    def checked(fn):
        def run():
            _check_finite("logits", logits)
            _check_finite("noise_logits", noise_logits)
            return fn()

        return run

    return dispatch(
        "topk_gating",
        logits,
        {
            "reference": checked(lambda: gating_forward_reference(*args)),
            # The C++ kernel checks finiteness in its single pass.
            "cpu": lambda: tuple(torch.ops.ovseg_fast.topk_gating_cpu_forward(*args)),
            "triton": checked(lambda: _triton().gating_forward(*args)),
        },
    )


@_gating_op.register_fake
def _gating_fake(logits, noise, noise_logits, k, normalize):
    t, e = logits.shape
    ct = compute_dtype(logits.dtype)
    return (
        logits.new_empty((t, k)),
        logits.new_empty((t, k), dtype=torch.int64),
        logits.new_empty((e,), dtype=torch.int64),
        logits.new_empty((4,), dtype=ct),
        logits.new_empty((t, 2), dtype=ct),
        logits.new_empty((3, e), dtype=ct),
        logits.new_empty((t,), dtype=torch.int64),
    )


@torch.library.custom_op("ovseg_fast::topk_gating_backward", mutates_args=())
def _gating_backward_op(
    grad_weights: Tensor,
    grad_losses: Tensor,
    logits: Tensor,
    noise: Optional[Tensor],
    noise_logits: Optional[Tensor],
    weights: Tensor,
    indices: Tensor,
    counts: Tensor,
    row_lse: Tensor,
    expert_stats: Tensor,
    next_index: Tensor,
    k: int,
    normalize: bool,
) -> tuple[Tensor, Tensor]:
    """Gradients w.r.t. ``logits`` and ``noise_logits`` ((0, E) when there is no noise)."""
    args = (
        grad_weights,
        grad_losses,
        logits,
        noise,
        noise_logits,
        weights,
        indices,
        counts,
        row_lse,
        expert_stats,
        next_index,
        k,
        normalize,
    )
    return dispatch(
        "topk_gating",
        logits,
        {
            "reference": lambda: gating_backward_reference(*args),
            "cpu": lambda: tuple(torch.ops.ovseg_fast.topk_gating_cpu_backward(*args)),
            "triton": lambda: _triton().gating_backward(*args),
        },
    )


@_gating_backward_op.register_fake
def _gating_backward_fake(grad_weights, grad_losses, logits, noise, noise_logits, *rest):
    t, e = logits.shape
    dn = logits.new_empty((t, e)) if noise is not None else logits.new_empty((0, e))
    return torch.empty_like(logits, memory_format=torch.contiguous_format), dn


def _gating_setup_context(ctx, inputs, output):
    logits, noise, noise_logits, k, normalize = inputs
    weights, indices, counts, _, row_lse, stats, next_index = output
    ctx.save_for_backward(logits, noise, noise_logits, weights, indices, counts, row_lse, stats, next_index)
    ctx.hyper = (k, normalize)
    ctx.mark_non_differentiable(indices, counts, row_lse, stats, next_index)


def _gating_backward(ctx, grad_weights, _gi, _gc, grad_losses, _gr, _gs, _gn):
    logits, noise, noise_logits, weights, indices, counts, row_lse, stats, next_index = ctx.saved_tensors
    ct = compute_dtype(logits.dtype)
    if grad_weights is None:
        grad_weights = torch.zeros_like(weights)
    if grad_losses is None:
        grad_losses = logits.new_zeros((4,), dtype=ct)
    args = (
        grad_weights.contiguous(),
        grad_losses.contiguous(),
        logits,
        noise,
        noise_logits,
        weights,
        indices,
        counts,
        row_lse,
        stats,
        next_index,
        *ctx.hyper,
    )
    dl, dn = _run_backward("topk_gating", _gating_backward_op, "topk_gating_cpu_backward", args, logits)
    return dl, None, (dn if noise is not None else None), None, None


_gating_op.register_autograd(_gating_backward, setup_context=_gating_setup_context)
_GatingFunction = _direct_function(
    "_GatingFunction", "topk_gating_cpu_forward", _gating_setup_context, _gating_backward
)


def topk_gating_flops(tokens: int, experts: int, k: int, *, noisy: bool = False, backward: bool = False) -> int:
    """FLOPs of the gating op (2 per multiply-add; ``exp``, ``log``, ``erfc``, a compare count as 1).

    Forward, per logit: max, subtract, exp, sum of the softmax (4), the z-loss's second logsumexp
    when noisy (4), the running top-(k+1) compares (k + 1) and the probability sum for P_e (1); per
    row the k weights (2 k). Noisy: noise scale and noisy logit (softplus: 4, multiply-add: 2) and
    the load's CDF (4). Backward, per logit: the softmax gradient (6), the z-loss term (4), and
    when noisy the load term and the chain rule to ``noise_logits`` (12).
    """
    if backward:
        per = 10 + (12 if noisy else 0)
        return tokens * experts * per + tokens * k * 4
    per = 4 + (k + 1) + 1 + (14 if noisy else 0)
    return tokens * experts * per + tokens * k * 2


@register_flop_formula(torch.ops.ovseg_fast.topk_gating)
def _gating_flop_formula(logits_shape, noise_shape, noise_logits_shape, k, normalize, *args, out_shape=None, **kw):
    t, e = logits_shape
    return topk_gating_flops(t, e, k, noisy=noise_shape is not None)


@register_flop_formula(torch.ops.ovseg_fast.topk_gating_backward)
def _gating_backward_flop_formula(gw_shape, gl_shape, logits_shape, noise_shape, *args, out_shape=None, **kw):
    t, e = logits_shape
    return topk_gating_flops(t, e, gw_shape[1], noisy=noise_shape is not None, backward=True)


def topk_gating(
    logits: Tensor,
    k: int,
    *,
    noise_logits: Optional[Tensor] = None,
    normalize: bool = True,
    training: Optional[bool] = None,
    generator: Optional[torch.Generator] = None,
) -> GatingOutput:
    r"""Top-k softmax gating of T tokens over E experts, with noisy gating and the auxiliary losses.

    Weights: ``softmax`` over the E experts, the ``k`` largest kept per row (ties to the lower
    expert index), rescaled to sum to 1 with ``normalize=True`` (Mixtral / vLLM ``topk_softmax``,
    Shazeer et al. 2017 eq. (3)-(5)).

    Noisy top-k gating (Shazeer et al. 2017): when ``noise_logits`` is given and training is on,
    the experts are chosen and weighted from ``h = logits + randn * (softplus(noise_logits) + 0.01)``
    (``randn`` drawn from ``generator`` on the logits' device, in float32), and the load is
    Shazeer's smooth estimate ``sum_t Phi((logits - threshold) / scale)`` with the k-th / (k+1)-th
    largest ``h`` as threshold; otherwise ``noise_logits`` is ignored and the load is the expert
    counts. The 0.01 floor on the noise scale is the ``noise_epsilon`` of Shazeer et al.'s code.

    Args:
        logits: (T, E) gate logits, finite, float32/float64/bfloat16/float16 (accumulation in
            float32, float64 for float64).
        k: experts per token, 1 <= k <= E.
        noise_logits: (T, E) raw noise scales (same dtype and device as ``logits``), or None.
        normalize: rescale the k kept weights to sum to 1.
        training: whether noise is applied; None means ``torch.is_grad_enabled()``.
        generator: the ``torch.Generator`` the noise is drawn from (same device as ``logits``).

    Returns:
        :class:`GatingOutput` (a ``NamedTuple``): ``weights`` (T, k) in the logits' dtype,
        ``indices`` (T, k) int64 in decreasing order of weight, ``expert_counts`` (E,) int64, and the
        losses as float32 (float64) scalars: ``load_balancing_loss`` (Switch Transformer,
        generalised to top-k: ``E sum_e f_e P_e`` with ``f_e = count_e / (T k)`` and ``P_e`` the
        mean softmax probability of expert e; 1 at perfect balance), ``importance_loss`` and
        ``load_loss`` (Shazeer et al.: ``var / (mean^2 + 1e-10)``, population variance, of the
        per-expert sums of gate weights and of the load), ``z_loss`` (ST-MoE: mean of
        ``logsumexp(logits)^2``, on the clean logits). With T = 0 every loss is 0.

    Gradients flow to ``logits`` and ``noise_logits`` through the weights and every loss (the
    counts and ``f_e`` are piecewise constant, as in the papers). Equations in
    :mod:`ovseg_fast.ops.moe_reference`.

    Backends: one fused pass over the logits in C++ (CPU) or Triton (CUDA), else the reference.
    """
    check_tensor("logits", logits, ndim=(2,))
    t, e = logits.shape
    if e < 1:
        raise ValueError(f"logits must have at least one expert (shape (T, E) with E >= 1), got {tuple(logits.shape)}")
    k = check_int("k", k, minimum=1)
    if k > e:
        raise ValueError(f"k must be <= the number of experts E={e}, got {k}")
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
    if training is not None and not isinstance(training, bool):
        raise TypeError(f"training must be a bool or None, got {type(training).__name__}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if noise_logits is not None:
        check_tensor("noise_logits", noise_logits, dtypes=(logits.dtype,))
        check_shape("noise_logits", noise_logits, (t, e), "(the shape of logits)")
        check_same_device("logits", logits, noise_logits=noise_logits)
    if generator is not None and torch.device(generator.device).type != logits.device.type:
        raise ValueError(f"generator is on {generator.device} but logits is on {logits.device}")
    if training is None:
        training = torch.is_grad_enabled()
    noise = None
    if noise_logits is not None and training:
        noise = torch.randn((t, e), generator=generator, device=logits.device, dtype=compute_dtype(logits.dtype))
        noise_logits = noise_logits.contiguous()
    else:
        noise_logits = None
    logits = logits.contiguous()
    args = (logits, noise, noise_logits, k, normalize)
    weights, indices, counts, losses, _, _, _ = _run(
        "topk_gating", _gating_op, _GatingFunction, "topk_gating_cpu_forward", args, args[:3]
    )
    # One unbind (one autograd node) rather than four selects.
    return GatingOutput(weights, indices, counts, *losses.unbind())


# ---------------------------------------------------------------------------------------------
# Dispatch


@torch.library.custom_op("ovseg_fast::moe_dispatch", mutates_args=())
def _dispatch_op(x: Tensor, indices: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x_sorted, offsets, order, inverse)`` on canonical inputs: x (T, D), indices (T, k) int64."""

    def checked(fn):
        def run():
            if indices.numel():
                lo, hi = int(indices.min()), int(indices.max())
                if lo < 0 or hi >= num_experts:
                    raise ValueError(
                        f"moe_dispatch: indices must lie in [0, {num_experts}), got values in [{lo}, {hi}]"
                    )
            return fn()

        return run

    args = (x, indices, num_experts)
    return dispatch(
        "moe_dispatch",
        x,
        {
            "reference": checked(lambda: moe_dispatch_reference(*args)),
            "cpu": lambda: tuple(torch.ops.ovseg_fast.moe_dispatch_cpu_forward(*args)),  # checks in-kernel
            "triton": checked(lambda: _triton().dispatch_forward(*args)),
        },
    )


@_dispatch_op.register_fake
def _dispatch_fake(x, indices, num_experts):
    n = indices.shape[0] * indices.shape[1]
    return (
        x.new_empty((n, x.shape[1])),
        x.new_empty((num_experts + 1,), dtype=torch.int64),
        x.new_empty((n,), dtype=torch.int64),
        x.new_empty((n,), dtype=torch.int64),
    )


@torch.library.custom_op("ovseg_fast::moe_dispatch_backward", mutates_args=())
def _dispatch_backward_op(grad_sorted: Tensor, inverse: Tensor, tokens: int, k: int) -> Tensor:
    """``grad_x[t] = sum_j grad_sorted[inverse[t k + j]]``."""
    args = (grad_sorted, inverse, tokens, k)
    return dispatch(
        "moe_dispatch",
        grad_sorted,
        {
            "reference": lambda: moe_dispatch_backward_reference(*args),
            "cpu": lambda: torch.ops.ovseg_fast.moe_dispatch_cpu_backward(*args),
            "triton": lambda: _triton().dispatch_backward(*args),
        },
    )


@_dispatch_backward_op.register_fake
def _dispatch_backward_fake(grad_sorted, inverse, tokens, k):
    return grad_sorted.new_empty((tokens, grad_sorted.shape[1]))


def _dispatch_setup_context(ctx, inputs, output):
    x, indices, _ = inputs
    _, offsets, order, inverse = output
    ctx.save_for_backward(inverse)
    ctx.shape = (x.shape[0], indices.shape[1])
    ctx.mark_non_differentiable(offsets, order, inverse)


def _dispatch_backward(ctx, grad_sorted, _go, _gorder, _ginv):
    (inverse,) = ctx.saved_tensors
    args = (grad_sorted.contiguous(), inverse, *ctx.shape)
    return (
        _run_backward("moe_dispatch", _dispatch_backward_op, "moe_dispatch_cpu_backward", args, grad_sorted),
        None,
        None,
    )


_dispatch_op.register_autograd(_dispatch_backward, setup_context=_dispatch_setup_context)
_DispatchFunction = _direct_function(
    "_DispatchFunction", "moe_dispatch_cpu_forward", _dispatch_setup_context, _dispatch_backward
)


@register_flop_formula(torch.ops.ovseg_fast.moe_dispatch)
def _dispatch_flop_formula(*args, out_shape=None, **kwargs) -> int:
    return 0  # a copy: no arithmetic


@register_flop_formula(torch.ops.ovseg_fast.moe_dispatch_backward)
def _dispatch_backward_flop_formula(grad_shape, inverse_shape, tokens, k, *args, out_shape=None, **kwargs) -> int:
    return tokens * max(k - 1, 0) * grad_shape[1]  # k rows summed per token


def _index_tensor(name: str, value: object) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in _INDEX_DTYPES:
        raise TypeError(
            f"{name} must have an integer dtype (int64, int32, ...), got {str(value.dtype).replace('torch.', '')}"
        )
    return value


def moe_dispatch(x: Tensor, indices: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """Groups the rows of ``x`` by expert, one copy per chosen (token, slot), without padding.

    A stable counting sort of the ``T * k`` (token, slot) pairs by expert id: a histogram of
    ``indices``, its prefix sum (the offsets) and a scatter of the pairs to their places, then a
    gather of the rows of ``x``. Within an expert the rows keep token order (then slot order).

    Args:
        x: (T, *F) features of T tokens (any float dtype; trailing dims are flattened internally).
        indices: (T, k) integer expert ids in ``[0, num_experts)`` (e.g. ``topk_gating(...).indices``).
        num_experts: E >= 1.

    Returns:
        ``(x_sorted, expert_offsets, order)``: ``x_sorted`` (T*k, *F) in x's dtype, the rows of
        expert ``e`` being ``x_sorted[expert_offsets[e]:expert_offsets[e + 1]]``;
        ``expert_offsets`` (E + 1,) int64; ``order`` (T*k,) int64, for each row of ``x_sorted`` its
        flat (token, slot) position ``t * k + j`` (what :func:`moe_combine` takes).

    Differentiable w.r.t. ``x`` (the backward sums the k copies of each token: a gather through
    the inverse permutation, no scatter).
    """
    check_tensor("x", x)
    if x.dim() < 1:
        raise ValueError(f"x must have at least 1 dimension (T, *F), got shape {tuple(x.shape)}")
    _index_tensor("indices", indices)
    if indices.dim() != 2:
        raise ValueError(f"indices must have 2 dimensions (T, k), got shape {tuple(indices.shape)}")
    if indices.shape[0] != x.shape[0]:
        raise ValueError(
            f"indices must have shape (T, k) with T={x.shape[0]} (the rows of x), got {tuple(indices.shape)}"
        )
    num_experts = check_int("num_experts", num_experts, minimum=1)
    check_same_device("x", x, indices=indices)
    # The no-op conversions and reshapes are skipped: at RPN sizes each costs a few % of the call.
    two_d = x.dim() == 2
    x2 = (x if two_d else x.reshape(x.shape[0], math.prod(x.shape[1:]))).contiguous()
    if indices.dtype != torch.int64:
        indices = indices.to(torch.int64)
    args = (x2, indices.contiguous(), num_experts)
    x_sorted, offsets, order, _ = _run(
        "moe_dispatch", _dispatch_op, _DispatchFunction, "moe_dispatch_cpu_forward", args, args[:2]
    )
    if not two_d:
        x_sorted = x_sorted.reshape(x_sorted.shape[0], *x.shape[1:])
    return x_sorted, offsets, order


# ---------------------------------------------------------------------------------------------
# Combine


def _checked_inverse(order: Tensor, build) -> Tensor:
    """The inverse permutation of ``order`` from ``build(order)`` (which fills unwritten slots with -1),
    after checking that ``order`` is a permutation of range(N): in range, and, N writes landing in N
    slots, without a hole (a hole means a repeated value)."""
    n = order.numel()
    if n == 0:
        return torch.empty_like(order)
    lo, hi = int(order.min()), int(order.max())
    if lo < 0 or hi >= n:
        raise ValueError(f"moe_combine: order must be a permutation of range({n}), got values in [{lo}, {hi}]")
    inverse = build(order)
    if bool((inverse < 0).any()):
        raise ValueError(f"moe_combine: order must be a permutation of range({n}) (it repeats a value)")
    return inverse


@torch.library.custom_op("ovseg_fast::moe_combine", mutates_args=())
def _combine_op(y_sorted: Tensor, weights: Tensor, order: Tensor) -> tuple[Tensor, Tensor]:
    """``(out, inverse)`` on canonical inputs: y_sorted (T*k, D), weights (T, k), order (T*k,) int64."""

    def reference():
        inverse = _checked_inverse(order, combine_inverse_reference)
        return moe_combine_reference(y_sorted, weights, inverse), inverse

    def triton():
        inverse = _checked_inverse(order, _triton().combine_inverse)
        return _triton().combine_forward(y_sorted, weights, inverse), inverse

    return dispatch(
        "moe_combine",
        y_sorted,
        {
            "reference": reference,
            # The C++ kernel builds the inverse and checks the permutation in the same pass.
            "cpu": lambda: tuple(torch.ops.ovseg_fast.moe_combine_cpu_forward(y_sorted, weights, order)),
            "triton": triton,
        },
    )


@_combine_op.register_fake
def _combine_fake(y_sorted, weights, order):
    return y_sorted.new_empty((weights.shape[0], y_sorted.shape[1])), torch.empty_like(order)


@torch.library.custom_op("ovseg_fast::moe_combine_backward", mutates_args=())
def _combine_backward_op(
    grad_out: Tensor, y_sorted: Tensor, weights: Tensor, order: Tensor, inverse: Tensor
) -> tuple[Tensor, Tensor]:
    """``(grad_y_sorted, grad_weights)``, both gathers."""
    args = (grad_out, y_sorted, weights, order, inverse)
    return dispatch(
        "moe_combine",
        y_sorted,
        {
            "reference": lambda: moe_combine_backward_reference(*args),
            "cpu": lambda: tuple(torch.ops.ovseg_fast.moe_combine_cpu_backward(*args)),
            "triton": lambda: _triton().combine_backward(*args),
        },
    )


@_combine_backward_op.register_fake
def _combine_backward_fake(grad_out, y_sorted, weights, order, inverse):
    return torch.empty_like(y_sorted), torch.empty_like(weights)


def _combine_setup_context(ctx, inputs, output):
    y_sorted, weights, order = inputs
    _, inverse = output
    ctx.save_for_backward(y_sorted, weights, order, inverse)
    ctx.mark_non_differentiable(inverse)


def _combine_backward(ctx, grad_out, _ginv):
    y_sorted, weights, order, inverse = ctx.saved_tensors
    args = (grad_out.contiguous(), y_sorted, weights, order, inverse)
    gy, gw = _run_backward("moe_combine", _combine_backward_op, "moe_combine_cpu_backward", args, y_sorted)
    return gy, gw, None


_combine_op.register_autograd(_combine_backward, setup_context=_combine_setup_context)
_CombineFunction = _direct_function(
    "_CombineFunction", "moe_combine_cpu_forward", _combine_setup_context, _combine_backward
)


def moe_combine_flops(tokens: int, k: int, dim: int, *, backward: bool = False) -> int:
    """Forward: one multiply-add per (token, slot, feature): ``2 T k D``. Backward: the weighted
    copy back (1 multiply) and the weight gradient's dot products (1 multiply-add): ``3 T k D``."""
    return (3 if backward else 2) * tokens * k * dim


@register_flop_formula(torch.ops.ovseg_fast.moe_combine)
def _combine_flop_formula(y_shape, w_shape, order_shape, *args, out_shape=None, **kwargs) -> int:
    return moe_combine_flops(w_shape[0], w_shape[1], y_shape[1])


@register_flop_formula(torch.ops.ovseg_fast.moe_combine_backward)
def _combine_backward_flop_formula(g_shape, y_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return moe_combine_flops(w_shape[0], w_shape[1], y_shape[1], backward=True)


def moe_combine(y_sorted: Tensor, weights: Tensor, order: Tensor, T: int) -> Tensor:
    """Weighted sum of the expert outputs back per token: ``out[t] = sum_j weights[t, j] y_sorted[r]``
    with ``order[r] = t * k + j`` (the inverse of :func:`moe_dispatch`).

    Computed as a gather per token through the inverse permutation of ``order`` (scatter-free: no
    atomics, deterministic), accumulating in float32 (float64 for float64 ``y_sorted``).

    Args:
        y_sorted: (T*k, *F) expert outputs, in ``moe_dispatch``'s row order.
        weights: (T, k) gate weights (any float dtype; used in float32/float64).
        order: (T*k,) integer permutation of ``range(T*k)``, as returned by :func:`moe_dispatch`.
        T: number of tokens (must equal ``weights.shape[0]``).

    Returns:
        (T, *F) in ``y_sorted``'s dtype. Differentiable w.r.t. ``y_sorted`` and ``weights``.
    """
    check_tensor("y_sorted", y_sorted)
    if y_sorted.dim() < 1:
        raise ValueError(f"y_sorted must have at least 1 dimension (T*k, *F), got shape {tuple(y_sorted.shape)}")
    check_tensor("weights", weights, ndim=(2,))
    _index_tensor("order", order)
    T = check_int("T", T, minimum=0)
    if weights.shape[0] != T:
        raise ValueError(f"weights must have shape (T, k) with T={T}, got {tuple(weights.shape)}")
    n = weights.shape[0] * weights.shape[1]
    check_shape("order", order, (n,), "(T * k, from weights' shape)")
    if torch.compiler.is_compiling():
        # Under torch.compile the row count of y_sorted is data-dependent (the sum of the experts'
        # group sizes): a runtime assert instead of a guard.
        torch._check(y_sorted.shape[0] == n)
    elif y_sorted.shape[0] != n:
        raise ValueError(
            f"y_sorted must have T * k = {n} rows (weights is {tuple(weights.shape)}), got {tuple(y_sorted.shape)}"
        )
    check_same_device("y_sorted", y_sorted, weights=weights, order=order)
    two_d = y_sorted.dim() == 2
    y2 = (y_sorted if two_d else y_sorted.reshape(n, math.prod(y_sorted.shape[1:]))).contiguous()
    ct = compute_dtype(y_sorted.dtype)
    if weights.dtype != ct:
        weights = weights.to(ct)
    if order.dtype != torch.int64:
        order = order.to(torch.int64)
    args = (y2, weights.contiguous(), order.contiguous())
    out, _ = _run("moe_combine", _combine_op, _CombineFunction, "moe_combine_cpu_forward", args, args)
    return out if two_d else out.reshape(T, *y_sorted.shape[1:])


# ---------------------------------------------------------------------------------------------
# Module


class MixtureOfExperts(nn.Module):
    """Sparse mixture of experts: a linear gate (and noise gate), top-k gating, dispatch, each
    expert on its own group of tokens, weighted combine (Shazeer et al. 2017).

    ``forward(x)`` takes (..., in_dim) features (leading dims are the tokens) and returns
    ``(out, gating)``: ``out`` (..., out_dim) the combined expert outputs and ``gating`` the
    :class:`GatingOutput` with the auxiliary losses (add e.g. ``1e-2 * gating.load_balancing_loss``
    to the training loss). Every expert maps (n, in_dim) -> (n, out_dim), the same out_dim for all.

    The gate is ``nn.Linear(in_dim, E, bias=False)`` with PyTorch's default init; the noise gate
    (``noisy=True``) is a zero-initialised ``nn.Linear(in_dim, E, bias=False)``, as in Shazeer et al.,
    so training starts with noise scale ``softplus(0) + 0.01``. Noise is on in ``train()`` mode only.

    Under ``torch.compile(fullgraph=True)`` the per-expert group sizes are data-dependent: set
    ``torch._dynamo.config.capture_scalar_outputs = True`` so they are traced as unbacked sizes.
    """

    def __init__(self, experts: Sequence[nn.Module], in_dim: int, k: int, noisy: bool = True, normalize: bool = True):
        super().__init__()
        if isinstance(experts, nn.Module) and not isinstance(experts, nn.ModuleList):
            raise TypeError("experts must be a sequence of nn.Module (e.g. a list or nn.ModuleList)")
        experts = list(experts)
        if not experts or not all(isinstance(m, nn.Module) for m in experts):
            raise TypeError("experts must be a non-empty sequence of nn.Module")
        self.in_dim = check_int("in_dim", in_dim, minimum=1)
        self.k = check_int("k", k, minimum=1)
        if self.k > len(experts):
            raise ValueError(f"k must be <= the number of experts ({len(experts)}), got {k}")
        self.experts = nn.ModuleList(experts)
        self.noisy = bool(noisy)
        self.normalize = bool(normalize)
        self.gate = nn.Linear(in_dim, len(experts), bias=False)
        self.noise_gate = nn.Linear(in_dim, len(experts), bias=False) if noisy else None
        if self.noise_gate is not None:
            nn.init.zeros_(self.noise_gate.weight)

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def forward(self, x: Tensor, generator: Optional[torch.Generator] = None) -> tuple[Tensor, GatingOutput]:
        check_tensor("x", x)
        if x.dim() < 1 or x.shape[-1] != self.in_dim:
            raise ValueError(f"x must have shape (..., {self.in_dim}), got {tuple(x.shape)}")
        lead = x.shape[:-1]
        tokens = x.reshape(-1, self.in_dim)
        logits = self.gate(tokens)
        noise_logits = self.noise_gate(tokens) if self.noise_gate is not None else None
        gating = topk_gating(
            logits,
            self.k,
            noise_logits=noise_logits,
            normalize=self.normalize,
            training=self.training,
            generator=generator,
        )
        x_sorted, offsets, order = moe_dispatch(tokens, gating.indices, self.num_experts)
        bounds = offsets.tolist()
        # Facts the compiler cannot know about the data-dependent bounds (no-ops in eager): with
        # them the groups' sizes telescope to exactly x_sorted's rows.
        torch._check(bounds[0] == 0)
        torch._check(bounds[-1] == x_sorted.shape[0])
        outputs = []
        for e, expert in enumerate(self.experts):
            lo, hi = bounds[e], bounds[e + 1]
            torch._check(lo >= 0)
            torch._check(hi >= lo)
            torch._check(hi <= x_sorted.shape[0])
            outputs.append(expert(x_sorted.narrow(0, lo, hi - lo)))
        y_sorted = torch.cat(outputs, dim=0)
        out = moe_combine(y_sorted, gating.weights, order, tokens.shape[0])
        return out.reshape(*lead, out.shape[-1]), gating

    def extra_repr(self) -> str:
        return (
            f"in_dim={self.in_dim}, num_experts={self.num_experts}, k={self.k}, noisy={self.noisy}, "
            f"normalize={self.normalize}"
        )
