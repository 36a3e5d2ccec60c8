"""Plain-PyTorch reference of batched Sinkhorn-Knopp: the readable spec of ``ovseg_fast.ops.sinkhorn``.

Notation, for one problem ``b`` (all problems of a batch are independent)::

    x_ij = scores_ij / epsilon                       (N samples i, K clusters j)
    f^0_i = 0 for a valid sample, -inf for a masked one
    for t = 1 .. T:                                   (SwAV order: columns first)
        g^t_j = log c_j - logsumexp_i (x_ij + f^{t-1}_i)      column step
        f^t_i = log r_i - logsumexp_j (x_ij + g^t_j)          row step
    Q_ij = exp(x_ij + f^T_i + g^T_j) = r_i softmax_j(x_ij + g^T_j)    (rows sum to r exactly)

``r`` are the row marginals (1 per valid sample by default, 0 for masked ones) and ``c`` the column
marginals (``N_b / K`` each by default, ``N_b`` the number of valid samples). This is exactly SwAV's
multiplicative loop (``Q /= Q.sum(1); Q /= K; Q /= Q.sum(0); Q /= B``) written in the log domain,
``u = exp(f)`` and ``v = exp(g)`` being its scaling vectors: SwAV's initial ``Q /= Q.sum()`` only
rescales ``v`` and cancels in the first column step. The log domain keeps every quantity finite for
any finite score (``scores / epsilon`` reaches 1e7 for PixelCLIP-style logits and ``epsilon=1e-3``),
where the multiplicative loop overflows ``exp`` or divides 0 by 0.

Zero masses follow one rule: a row or column whose marginal is 0 gets dual ``-inf`` (all-zero plan
row/column), and ``log 0 - logsumexp(empty)`` is ``-inf``, never NaN. Gradients of masked or
zero-mass entries are 0.

Early stopping (``tol > 0``): after every iteration ``t`` with ``t % check_every == 0`` a problem
whose largest column error ``max_j |sum_i Q_ij - c_j|`` (absolute, in the marginals' units) is below
``tol`` stops; its duals stay frozen while the other problems of the batch go on. ``n_iters`` caps T.

Kernel contract. Every backend's forward returns ``(plan, log_u, log_v, n_done)``:
``log_u[b, t] = f^{t+1}`` (B, n_iters, N), ``log_v[b, t] = g^{t+1}`` (B, n_iters, K), rows
``t >= n_done[b]`` repeat the final duals, ``n_done`` (B,) int64 is the number of iterations each
problem ran. The duals are kept in float32 (float64 for float64 scores). The backward of the
unrolled loop needs nothing else (see ``sinkhorn_backward_reference``).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "compute_dtype",
    "default_marginals",
    "sinkhorn_backward_reference",
    "sinkhorn_forward_reference",
    "sinkhorn_reference",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def default_marginals(mask: Tensor, num_clusters: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """SwAV's marginals: mass 1 per valid sample, ``N_b / K`` per cluster."""
    rows = mask.to(dtype)
    n_valid = rows.sum(dim=1, keepdim=True)
    cols = (n_valid / num_clusters).expand(-1, num_clusters).contiguous()
    return rows, cols


def _safe_log(t: Tensor) -> Tensor:
    """log with log(0) = -inf and a gradient that is never NaN (inputs here carry no gradient)."""
    return torch.where(t > 0, torch.log(torch.where(t > 0, t, torch.ones_like(t))), float("-inf"))


def _logsumexp(z: Tensor, dim: int) -> Tensor:
    """logsumexp over ``dim`` that returns -inf (not NaN) for an all -inf slice, with finite gradients.

    ``torch.logsumexp`` back-propagates ``exp(z - lse)``, which is NaN when the slice is empty
    (-inf - -inf); here the shift is a detached finite max and the log is guarded by ``where``.
    """
    shift = z.detach().amax(dim=dim, keepdim=True)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    total = torch.exp(z - shift).sum(dim=dim)
    positive = total > 0
    lse = torch.log(torch.where(positive, total, torch.ones_like(total))) + shift.squeeze(dim)
    return torch.where(positive, lse, float("-inf"))


def _column_logsumexp(z: Tensor, group) -> Tensor:
    """logsumexp over the samples (dim 1) of every problem, across the processes of ``group``.

    Without a group this is ``_logsumexp(z, 1)``. With one, the shift is the all-reduced max
    (detached: logsumexp does not depend on it) and the exp-sums are all-reduced with the
    autograd-aware collective, so gradients reach every rank's scores.
    """
    if group is None:
        return _logsumexp(z, dim=1)
    import torch.distributed as dist
    import torch.distributed.nn.functional as dist_fn

    if z.shape[1] == 0:  # this rank has no samples but still takes part in the collectives
        shift = z.new_full((z.shape[0], z.shape[2]), float("-inf")).detach()
    else:
        shift = z.detach().amax(dim=1)
    shift = torch.where(torch.isfinite(shift), shift, torch.full_like(shift, -torch.finfo(shift.dtype).max))
    dist.all_reduce(shift, op=dist.ReduceOp.MAX, group=group)
    shift = torch.where(shift > -torch.finfo(shift.dtype).max, shift, torch.zeros_like(shift))
    total = dist_fn.all_reduce(torch.exp(z - shift.unsqueeze(1)).sum(dim=1), group=group)
    positive = total > 0
    lse = torch.log(torch.where(positive, total, torch.ones_like(total))) + shift
    return torch.where(positive, lse, float("-inf"))


def _column_sum(q: Tensor, group) -> Tensor:
    total = q.sum(dim=1)
    if group is not None:
        import torch.distributed as dist

        dist.all_reduce(total, group=group)
    return total


def _dual_update(log_target: Tensor, lse: Tensor) -> Tensor:
    """``log_target - lse`` with zero mass (-inf target) or nothing to scale (-inf lse) giving -inf."""
    ok = torch.isfinite(log_target) & torch.isfinite(lse)
    return torch.where(ok, log_target - torch.where(ok, lse, torch.zeros_like(lse)), float("-inf"))


def _row_softmax(z: Tensor) -> Tensor:
    """softmax over the clusters; an all -inf row gives zeros (and zero gradients), not NaN."""
    shift = z.detach().amax(dim=2, keepdim=True)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    e = torch.exp(z - shift)
    total = e.sum(dim=2, keepdim=True)
    return e / torch.where(total > 0, total, torch.ones_like(total))


def _plan(x: Tensor, rows: Tensor, g: Tensor) -> Tensor:
    """The plan after a row step, ``Q_ij = exp(x_ij + f_i + g_j) = r_i softmax_j(x_ij + g_j)``.

    The second form is used because it is exact where the first is not: when ``|x|`` is ~1e7
    (scores 1e4, epsilon 1e-3), float32 rounds ``x + f + g`` by up to 0.5 and the rows would sum
    to anything in [e^-0.5, e^0.5]; normalising ``exp(x + g - max)`` by its own sum makes every row
    sum to its marginal to rounding, as the row step promises.
    """
    return rows.unsqueeze(-1) * _row_softmax(x + g.unsqueeze(-2))


def _run(
    scores: Tensor,
    mask: Tensor,
    row_marginals: Tensor,
    col_marginals: Tensor,
    epsilon: float,
    n_iters: int,
    tol: float,
    check_every: int,
    keep_history: bool,
    group=None,
):
    ct = compute_dtype(scores.dtype)
    x = scores.to(ct) / epsilon
    batch, _n, k = x.shape
    rows = torch.where(mask, row_marginals.to(ct), torch.zeros((), dtype=ct, device=x.device))
    log_r = _safe_log(rows)
    log_c = _safe_log(col_marginals.to(ct))
    f = torch.where(mask, 0.0, float("-inf")).to(ct)
    g = torch.zeros(batch, k, dtype=ct, device=x.device)
    active = torch.ones(batch, dtype=torch.bool, device=x.device)
    n_done = torch.zeros(batch, dtype=torch.int64, device=x.device)
    hist_f, hist_g = [], []
    for t in range(1, n_iters + 1):
        g_new = _dual_update(log_c, _column_logsumexp(x + f.unsqueeze(-1), group))
        f_new = _dual_update(log_r, _logsumexp(x + g_new.unsqueeze(-2), dim=2))
        g = torch.where(active.unsqueeze(-1), g_new, g)
        f = torch.where(active.unsqueeze(-1), f_new, f)
        n_done = n_done + active.long()
        if keep_history:
            hist_f.append(f)
            hist_g.append(g)
        if tol > 0 and t % check_every == 0 and t < n_iters:
            with torch.no_grad():
                err = (_column_sum(_plan(x, rows, g), group) - col_marginals.to(ct)).abs().amax(dim=1)
                active = active & ~(err < tol)
            if not bool(active.any()):
                # The frozen problems would repeat their duals; fill the history with them.
                if keep_history:
                    hist_f.extend([f] * (n_iters - t))
                    hist_g.extend([g] * (n_iters - t))
                break
    return x, rows, f, g, n_done, hist_f, hist_g


def sinkhorn_reference(
    scores: Tensor,
    mask: Tensor,
    row_marginals: Tensor,
    col_marginals: Tensor,
    epsilon: float,
    n_iters: int,
    tol: float = 0.0,
    check_every: int = 1,
    group=None,
) -> Tensor:
    """Differentiable reference on canonical inputs: scores (B, N, K), mask (B, N) bool, marginals
    (B, N) and (B, K) (masked rows ignored). Returns the plan Q in ``scores.dtype``.

    With a process ``group``, each rank holds its own samples of the same B problems and the
    column steps reduce over all ranks (``col_marginals`` are the global ones, equal on all ranks).
    """
    x, rows, _, g, _, _, _ = _run(
        scores, mask, row_marginals, col_marginals, epsilon, n_iters, tol, check_every, False, group
    )
    return _plan(x, rows, g).to(scores.dtype)


def sinkhorn_forward_reference(
    scores: Tensor,
    mask: Tensor,
    row_marginals: Tensor,
    col_marginals: Tensor,
    epsilon: float,
    n_iters: int,
    tol: float = 0.0,
    check_every: int = 1,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The kernel contract's forward: ``(plan, log_u, log_v, n_done)`` (see the module docstring)."""
    with torch.no_grad():
        x, rows, _f, g, n_done, hist_f, hist_g = _run(
            scores, mask, row_marginals, col_marginals, epsilon, n_iters, tol, check_every, True
        )
        plan = _plan(x, rows, g).to(scores.dtype)
        return plan, torch.stack(hist_f, dim=1), torch.stack(hist_g, dim=1), n_done


def sinkhorn_backward_reference(
    grad_plan: Tensor,
    scores: Tensor,
    mask: Tensor,
    row_marginals: Tensor,
    col_marginals: Tensor,
    log_u: Tensor,
    log_v: Tensor,
    n_done: Tensor,
    epsilon: float,
) -> Tensor:
    """Gradient of the unrolled loop with respect to ``scores``, from the saved duals.

    Reverse-mode through the two steps, with ``A^t = softmax_j(x + g^t)`` (the row-normalised plan
    after row step t) and ``B^t = softmax_i(x + f^{t-1})`` (column-normalised after column step t)::

        dx = G * Q;  F = rowsum(G * Q);  Gg = colsum(G * Q)            (from Q = exp(x + f^T + g^T))
        (Q's own dependence on f^T is what makes F the gradient of f^T: Q = r softmax(x + g^T) is the
        same function, computed so that rows sum to r exactly)
        for t = T .. 1:
            dx -= F_i A^t_ij;   Gg_j -= sum_i F_i A^t_ij                 (row step t)
            dx -= Gg_j B^t_ij;  F_i = -sum_j Gg_j B^t_ij;  Gg = 0        (column step t)
        grad_scores = dx / epsilon

    ``A`` is 0 on zero-mass rows and ``B`` on zero-mass columns, which is what the reference's
    ``where`` guards give. Each problem runs its own ``n_done[b]`` steps.
    """
    ct = compute_dtype(scores.dtype)
    x = scores.to(ct) / epsilon
    f0 = torch.where(mask, 0.0, float("-inf")).to(ct)
    rows = torch.where(mask, row_marginals.to(ct), torch.zeros((), dtype=ct, device=x.device))
    q = _plan(x, rows, log_v[:, -1])  # history rows past n_done repeat the final duals
    dx = grad_plan.to(ct) * q
    F = dx.sum(dim=2)
    Gg = dx.sum(dim=1)
    zero = torch.zeros((), dtype=ct, device=x.device)
    for t in range(int(n_done.max()) if n_done.numel() else 0, 0, -1):
        act = (n_done >= t).view(-1, 1, 1)  # problems that ran iteration t
        f_t, g_t = log_u[:, t - 1], log_v[:, t - 1]
        f_prev = f0 if t == 1 else log_u[:, t - 2]
        a = torch.softmax(x + g_t.unsqueeze(1), dim=2)
        a = torch.where(torch.isfinite(f_t).unsqueeze(2), a, zero)
        fa = F.unsqueeze(2) * a
        dx = torch.where(act, dx - fa, dx)
        Gg = torch.where(act[:, 0], Gg - fa.sum(dim=1), Gg)
        z = x + f_prev.unsqueeze(2)
        bmat = torch.exp(z - _logsumexp(z, dim=1).unsqueeze(1))
        bmat = torch.where(torch.isfinite(g_t).unsqueeze(1) & torch.isfinite(z), bmat, zero)
        gb = Gg.unsqueeze(1) * bmat
        dx = torch.where(act, dx - gb, dx)
        F = torch.where(act[:, :, 0], -gb.sum(dim=2), F)
        Gg = torch.where(act[:, 0], zero, Gg)
    return (dx / epsilon).to(scores.dtype)
