"""Batched Sinkhorn-Knopp: balanced soft assignment of samples to clusters (SwAV, PixelCLIP).

The maths, the reference and the kernel contract are in :mod:`ovseg_fast.ops.sinkhorn_reference`;
this module is the public op: input checks, the ``torch.library`` registration (forward, backward,
fake tensors, autograd, FLOP formula) and backend dispatch to the C++ kernel (``csrc/sinkhorn.cpp``),
the Triton kernel (``kernels/sinkhorn.py``) or the reference.
"""

from __future__ import annotations

import importlib
import math
from typing import Optional

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import register_flop_formula

from ovseg_fast.backends import KernelSupport, direct_cpu, dispatch, register_op
from ovseg_fast.ops._checks import check_float, check_int, check_same_device, check_shape, check_tensor, value_range
from ovseg_fast.ops.sinkhorn_reference import (
    compute_dtype,
    default_marginals,
    sinkhorn_backward_reference,
    sinkhorn_forward_reference,
    sinkhorn_reference,
)

__all__ = ["Sinkhorn", "sinkhorn", "sinkhorn_flops"]

register_op(
    "sinkhorn",
    KernelSupport(
        cpu_dtypes=(torch.float32, torch.float64, torch.bfloat16, torch.float16),
        triton_dtypes=(torch.float32, torch.float16, torch.bfloat16),
        cpu_ops=("sinkhorn_cpu_forward", "sinkhorn_cpu_backward", "sinkhorn_cpu_plan"),
    ),
)

_MARGINAL_RTOL = 1e-5


def _triton():
    return importlib.import_module("ovseg_fast.kernels.sinkhorn")


def _empty_forward(scores: Tensor, n_iters: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """No sample or no cluster: no mass anywhere (duals -inf), nothing to iterate."""
    b, n, k = scores.shape
    ct = compute_dtype(scores.dtype)
    return (
        torch.zeros_like(scores, memory_format=torch.contiguous_format),
        scores.new_full((b, n_iters, n), float("-inf"), dtype=ct),
        scores.new_full((b, n_iters, k), float("-inf"), dtype=ct),
        scores.new_zeros((b,), dtype=torch.int64),
    )


def _check_marginal_values(mask: Tensor, row_marginals: Tensor, col_marginals: Tensor) -> None:
    """Marginals must be finite, non-negative, and balanced per problem (needs the data: run time)."""
    for name, m in (("row_marginals", row_marginals), ("col_marginals", col_marginals)):
        lo, hi = value_range(m) if m.numel() else (0.0, 0.0)
        if not (lo >= 0 and math.isfinite(hi)):  # NaN fails too
            raise ValueError(f"sinkhorn: {name} must be finite and non-negative")
    rows = torch.where(mask, row_marginals, torch.zeros((), dtype=row_marginals.dtype, device=mask.device)).sum(1)
    cols = col_marginals.sum(1)
    gap = (rows - cols).abs()
    bad = gap > _MARGINAL_RTOL * torch.maximum(rows, cols)
    if bool(bad.any()):
        b = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"sinkhorn: problem {b} is unbalanced: its valid row_marginals sum to {float(rows[b]):.6g} but its "
            f"col_marginals sum to {float(cols[b]):.6g}; they must agree within a relative {_MARGINAL_RTOL:g} "
            "(masked samples' row marginals are ignored)"
        )


@torch.library.custom_op("ovseg_fast::sinkhorn", mutates_args=())
def _sinkhorn_op(
    scores: Tensor,
    mask: Tensor,
    row_marginals: Tensor,
    col_marginals: Tensor,
    epsilon: float,
    n_iters: int,
    tol: float,
    check_every: int,
    validate_marginals: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Forward of the kernel contract: ``(plan, log_u, log_v, n_done)`` on canonical inputs."""
    if validate_marginals:
        _check_marginal_values(mask, row_marginals, col_marginals)
    if scores.numel() == 0:
        return _empty_forward(scores, n_iters)
    args = (scores, mask, row_marginals, col_marginals, epsilon, n_iters, tol, check_every)
    return dispatch(
        "sinkhorn",
        scores,
        {
            "reference": lambda: sinkhorn_forward_reference(*args),
            "cpu": lambda: tuple(torch.ops.ovseg_fast.sinkhorn_cpu_forward(*args)),
            "triton": lambda: _triton().sinkhorn_forward(*args),
        },
    )


@_sinkhorn_op.register_fake
def _sinkhorn_fake(scores, mask, row_marginals, col_marginals, epsilon, n_iters, tol, check_every, validate_marginals):
    b, n, k = scores.shape
    ct = compute_dtype(scores.dtype)
    return (
        scores.new_empty((b, n, k)),
        scores.new_empty((b, n_iters, n), dtype=ct),
        scores.new_empty((b, n_iters, k), dtype=ct),
        scores.new_empty((b,), dtype=torch.int64),
    )


@torch.library.custom_op("ovseg_fast::sinkhorn_backward", mutates_args=())
def _sinkhorn_backward_op(
    grad_plan: Tensor,
    scores: Tensor,
    mask: Tensor,
    row_marginals: Tensor,
    col_marginals: Tensor,
    log_u: Tensor,
    log_v: Tensor,
    n_done: Tensor,
    epsilon: float,
    n_iters: int,
    tol: float,
    check_every: int,
) -> Tensor:
    """Gradient with respect to ``scores`` of the unrolled loop, from the saved duals."""
    if scores.numel() == 0:
        return torch.zeros_like(scores, memory_format=torch.contiguous_format)
    saved = (grad_plan, scores, mask, row_marginals, col_marginals, log_u, log_v, n_done, epsilon)
    return dispatch(
        "sinkhorn",
        scores,
        {
            "reference": lambda: sinkhorn_backward_reference(*saved),
            "cpu": lambda: torch.ops.ovseg_fast.sinkhorn_cpu_backward(*saved),
            "triton": lambda: _triton().sinkhorn_backward(*saved),
        },
    )


@_sinkhorn_backward_op.register_fake
def _sinkhorn_backward_fake(grad_plan, scores, *rest):
    return torch.empty_like(scores, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    scores, mask, row_marginals, col_marginals, epsilon, n_iters, tol, check_every, _ = inputs
    _, log_u, log_v, n_done = output
    ctx.save_for_backward(scores, mask, row_marginals, col_marginals, log_u, log_v, n_done)
    ctx.hyper = (epsilon, n_iters, tol, check_every)
    ctx.mark_non_differentiable(log_u, log_v, n_done)


def _backward(ctx, grad_plan, _grad_log_u, _grad_log_v, _grad_n_done):
    scores, mask, row_marginals, col_marginals, log_u, log_v, n_done = ctx.saved_tensors
    if grad_plan is None:
        grad_plan = torch.zeros_like(scores)
    grad = _sinkhorn_backward_op(
        grad_plan, scores, mask, row_marginals, col_marginals, log_u, log_v, n_done, *ctx.hyper
    )
    return grad, None, None, None, None, None, None, None, None


_sinkhorn_op.register_autograd(_backward, setup_context=_setup_context)


if hasattr(torch.ops.ovseg_fast, "sinkhorn_cpu_plan"):

    @torch.library.register_fake("ovseg_fast::sinkhorn_cpu_plan")
    def _sinkhorn_plan_fake(scores, mask, row_marginals, col_marginals, epsilon, n_iters, tol, check_every):
        return torch.empty_like(scores, memory_format=torch.contiguous_format)


def sinkhorn_flops(batch: int, samples: int, clusters: int, n_iters: int, *, backward: bool = False) -> int:
    """FLOPs of the op, 2 per multiply-add, ``exp`` counted as one.

    Forward: the initial ``exp``, then per iteration one multiply-add per entry for the column sums
    and one for the row sums, then the final scaling (2 multiplies): ``B N K (4 n_iters + 3)``.
    Backward: per iteration two multiply-adds per entry for each reversed step, plus ``G * Q`` and
    its sums: ``B N K (8 n_iters + 3)``. With ``tol`` the count is for ``n_iters`` (an upper bound).
    """
    per_entry = 8 * n_iters + 3 if backward else 4 * n_iters + 3
    return batch * samples * clusters * per_entry


@register_flop_formula(torch.ops.ovseg_fast.sinkhorn)
def _sinkhorn_flop_formula(scores_shape, *args, out_shape=None, **kwargs) -> int:
    b, n, k = scores_shape
    return sinkhorn_flops(b, n, k, args[4])


@register_flop_formula(torch.ops.ovseg_fast.sinkhorn_backward)
def _sinkhorn_backward_flop_formula(grad_shape, *args, out_shape=None, **kwargs) -> int:
    b, n, k = grad_shape
    return sinkhorn_flops(b, n, k, args[8], backward=True)


def sinkhorn(
    scores: Tensor,
    *,
    epsilon: float = 0.05,
    n_iters: int = 3,
    mask: Optional[Tensor] = None,
    row_marginals: Optional[Tensor] = None,
    col_marginals: Optional[Tensor] = None,
    tol: Optional[float] = None,
    process_group=None,
    check_every: int = 5,
) -> Tensor:
    r"""Balanced soft assignment of N samples to K clusters by Sinkhorn-Knopp, for B problems at once.

    Computes the entropic optimal-transport plan :math:`Q \propto \exp(S/\varepsilon)` with row sums
    ``row_marginals`` and column sums ``col_marginals``, by alternating normalisation in SwAV's
    order: every cluster (column) to its mass, then every sample (row) to its mass, ``n_iters``
    times. Rows sum to their marginal exactly after the last step; columns approach theirs as the
    iterations converge (Caron et al. 2020, eq. 3; Cuturi 2013).

    Which call reproduces which method (see :mod:`ovseg_fast.compat.swav` for both as drop-ins):
    SwAV's ``distributed_sinkhorn(out, epsilon, iters)`` is ``sinkhorn(out, epsilon=epsilon,
    n_iters=iters)`` on its (N, K) scores. PixelCLIP starts from a softmax over the clusters of its
    logits (``100 x`` cosine) and solves ONE problem over all masks of the batch:
    ``sinkhorn(log_softmax(logits, -1), epsilon=1)`` on the (N_total, K) rows.
    ``sinkhorn(cosine, epsilon=1/100)`` is SwAV at PixelCLIP's temperature, not PixelCLIP; and a
    batched (B, N, K) call solves one problem per image, a different problem from PixelCLIP's.

    Args:
        scores: (B, N, K) similarities of N samples to K clusters, or (N, K) for one problem.
            float32, float64, bfloat16 or float16 (accumulation in float32; float64 in float64).
        epsilon: entropic regularisation (> 0); smaller is harder. Down to 1e-3 with scores of
            +-1e4 stays finite.
        n_iters: number of (column, row) iterations, >= 1; the cap when ``tol`` is given.
        mask: (B, N) bool, the valid samples. Masked rows get 0 and do not count in N_b; a problem
            with no valid sample returns zeros.
        row_marginals: (B, N) non-negative masses of the samples (default 1 per valid sample).
        col_marginals: (B, K) non-negative masses of the clusters (default N_b / K each). Each
            problem's valid row total must equal its column total within a relative 1e-5.
        tol: stop a problem early once its largest absolute column error
            ``max_j |sum_i Q_ij - c_j|`` is below ``tol``, checked every ``check_every`` iterations.
        process_group: a ``torch.distributed`` group over which the N samples are split: every
            rank passes its own samples of the same B problems and gets its rows of the plan,
            identical to running on the concatenation (SwAV's ``distributed_sinkhorn``). Default
            column marginals then use the global N_b.
        check_every: iterations between early-stopping checks (a check costs a column-sum pass,
            and on a GPU the reference's a host sync).

    Returns:
        Q, same shape and dtype as ``scores``.

    Numerics: the iteration is carried out on log-domain duals ``f = log u``, ``g = log v`` with
    max-subtracted logsumexps, never on ``exp(scores / epsilon)`` itself, because that overflows for
    ``|scores / epsilon| > 88`` (float32) and the multiplicative loop then returns NaN. Zero masses
    give -inf duals and exact zeros, never NaN.

    Gradients flow to ``scores`` through the unrolled iterations (exactly the gradient of the
    reference loop, early stopping included); masks and marginals are constants.

    Backends: the fused C++ kernel for CPU tensors, the fused Triton kernel for CUDA tensors, else
    the reference (see :mod:`ovseg_fast.backends`). With ``process_group`` the iteration runs as
    PyTorch ops with an all-reduce per column step (the fused kernels run a whole problem without
    leaving the chip, so they have no point at which to synchronise ranks). When no gradient is
    needed (``scores`` does not require grad, or grad mode is off) and the C++ kernel runs, the plan
    is computed without the per-iteration dual history a backward would need.
    """
    check_tensor("scores", scores, ndim=(2, 3))
    epsilon = check_float("epsilon", epsilon, positive=True)
    n_iters = check_int("n_iters", n_iters, minimum=1)
    check_every = check_int("check_every", check_every, minimum=1)
    tol_value = 0.0 if tol is None else check_float("tol", tol, minimum=0.0)
    single = scores.dim() == 2
    s = scores.unsqueeze(0) if single else scores
    b, n, k = s.shape
    lead = () if single else (b,)
    ct = compute_dtype(s.dtype)

    if mask is not None:
        check_tensor("mask", mask, dtypes=(torch.bool,))
        check_shape("mask", mask, (*lead, n), "(the samples of scores)")
        mask = mask.unsqueeze(0) if single else mask
    user_marginals = row_marginals is not None or col_marginals is not None
    marginals = {"row_marginals": None, "col_marginals": None}
    if user_marginals:
        for name, value, size in (("row_marginals", row_marginals, n), ("col_marginals", col_marginals, k)):
            if value is not None:
                check_tensor(name, value)
                check_shape(name, value, (*lead, size))
                marginals[name] = (value.unsqueeze(0) if single else value).detach().to(ct)
    if mask is not None or user_marginals:
        check_same_device("scores", s, mask=mask, **marginals)

    if process_group is not None:
        return _distributed(s, mask, marginals, epsilon, n_iters, tol_value, check_every, process_group, single)

    if not user_marginals and not (s.requires_grad and torch.is_grad_enabled()) and direct_cpu("sinkhorn", s, mask):
        # No backward will follow: the C++ kernel keeps no history of the duals and builds the default
        # marginals itself (the registered op's layers would cost as much as the kernel at PixelCLIP's
        # sizes).
        plan = torch.ops.ovseg_fast.sinkhorn_cpu_plan.default(
            s, mask, None, None, epsilon, n_iters, tol_value, check_every
        )
        return plan[0] if single else plan

    mask_t = torch.ones((b, n), dtype=torch.bool, device=s.device) if mask is None else mask
    default_rows, default_cols = (None, None)
    if marginals["row_marginals"] is None or marginals["col_marginals"] is None:
        default_rows, default_cols = default_marginals(mask_t, k, ct)
    rows = default_rows if marginals["row_marginals"] is None else marginals["row_marginals"]
    cols = default_cols if marginals["col_marginals"] is None else marginals["col_marginals"]
    plan, _, _, _ = _sinkhorn_op(s, mask_t, rows, cols, epsilon, n_iters, tol_value, check_every, user_marginals)
    return plan[0] if single else plan


def _distributed(s, mask, marginals, epsilon, n_iters, tol, check_every, group, single):
    """SwAV's distributed Sinkhorn: the column steps reduce over the ranks of ``group``."""
    import torch.distributed as dist

    b, n, k = s.shape
    ct = compute_dtype(s.dtype)
    mask_t = torch.ones((b, n), dtype=torch.bool, device=s.device) if mask is None else mask
    rows = marginals["row_marginals"]
    if rows is None:
        rows = mask_t.to(ct)
    cols = marginals["col_marginals"]
    if cols is None:
        n_valid = mask_t.sum(1, dtype=ct)
        dist.all_reduce(n_valid, group=group)
        cols = (n_valid / k).unsqueeze(1).expand(b, k).contiguous()
    if marginals["row_marginals"] is not None or marginals["col_marginals"] is not None:
        local = torch.where(mask_t, rows, torch.zeros((), dtype=ct, device=s.device)).sum(1)
        dist.all_reduce(local, group=group)
        # Every rank holds the global column marginals; balance them against the global row total.
        _check_marginal_values(torch.ones_like(local, dtype=torch.bool).unsqueeze(1), local.unsqueeze(1), cols)
    if b == 0 or k == 0:  # the same on every rank, so no rank waits in a collective
        return s.new_zeros(s.shape)[0] if single else s.new_zeros(s.shape)
    plan = sinkhorn_reference(s, mask_t, rows, cols, epsilon, n_iters, tol, check_every, group=group)
    return plan[0] if single else plan


class Sinkhorn(nn.Module):
    """Module form of :func:`sinkhorn` (no parameters), e.g. as a SwAV / PixelCLIP clustering head."""

    def __init__(self, epsilon: float = 0.05, n_iters: int = 3, tol: Optional[float] = None, process_group=None):
        super().__init__()
        self.epsilon = check_float("epsilon", epsilon, positive=True)
        self.n_iters = check_int("n_iters", n_iters, minimum=1)
        self.tol = tol
        self.process_group = process_group

    def forward(self, scores: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        return sinkhorn(
            scores,
            epsilon=self.epsilon,
            n_iters=self.n_iters,
            mask=mask,
            tol=self.tol,
            process_group=self.process_group,
        )

    def extra_repr(self) -> str:
        return f"epsilon={self.epsilon}, n_iters={self.n_iters}, tol={self.tol}"
