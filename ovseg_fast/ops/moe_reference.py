r"""Plain-PyTorch reference of mixture-of-experts gating, dispatch and combine: the readable spec of
``ovseg_fast.ops.topk_gating``, ``moe_dispatch`` and ``moe_combine``.

Gating, for T tokens and E experts (one row ``t`` of the logits ``l`` at a time)::

    s_te = softplus(n_te) + 0.01                 noise scale (noisy gating only; n = noise_logits)
    h_te = l_te + eps_te * s_te                  selection logits, eps ~ N(0, 1)  (h = l without noise)
    p_te = softmax_e(h_t)                        gate probabilities
    i_t1 .. i_tk = the k largest h_te            ties to the lower expert index
    w_tj = p_{t,i_tj} / sum_j' p_{t,i_tj'}       (normalize=True; w_tj = p_{t,i_tj} otherwise)

With ``normalize=True`` this is Shazeer et al. (2017), eq. (3)-(5), ``G = Softmax(KeepTopK(H, k))``,
and Mixtral's / vLLM's ``topk_softmax``. The 0.01 floor on the noise scale is the ``noise_epsilon`` of
Shazeer et al.'s reference implementation: it keeps ``z / s`` below finite for any ``noise_logits``.

Auxiliary losses (all scalars, all differentiable w.r.t. ``l`` and ``n``)::

    c_e  = #{(t, j): i_tj = e}                                  expert counts, sum_e c_e = T k
    load balancing (Switch Transformer, Fedus et al. 2021, eq. (4), generalised to top-k):
         L_lb = E sum_e f_e P_e,  f_e = c_e / (T k),  P_e = (1/T) sum_t p_te          (= 1 if balanced)
    importance (Shazeer et al. 2017, eq. (6)-(7)):  I_e = sum_{t, j: i_tj = e} w_tj,  L_imp = CV^2(I)
    load (Shazeer et al. 2017, eq. (8)-(10)):       L_load = CV^2(load)
         load_e = sum_t Phi((l_te - thr_te) / s_te)        noisy gating in training
         thr_te = the (k+1)-th largest h_t if e is among the top k, else the k-th largest h_t
         load_e = c_e                                      without noise (no gradient)
    z-loss (ST-MoE, Zoph et al. 2022, eq. (5)):    L_z = (1/T) sum_t (logsumexp_e l_te)^2
    CV^2(v) = var(v) / (mean(v)^2 + 1e-10)         population variance; the 1e-10 as in Shazeer et al.

``Phi`` is the standard normal CDF; ``thr`` is a noisy logit, so the load's gradient reaches the
threshold's logit and noise scale too, as in Shazeer et al.'s implementation. With ``k = E`` every
expert is always selected: there is no (k+1)-th logit and ``Phi = 1`` (no gradient). The z-loss
uses the clean logits ``l`` (it keeps the router's logits small; noise is not the router's output).
An empty batch (T = 0) gives zero losses.

Kernel contract of the gating op. Every backend's forward takes ``(logits, noise, noise_logits, k,
normalize)`` (``noise``: the drawn eps, float32 (float64 for float64 logits), ``None`` without noisy
gating) and returns::

    weights (T, k) logits.dtype, indices (T, k) int64 (in decreasing h), counts (E,) int64,
    losses (4,) [lb, importance, load, z], row_lse (T, 2) [logsumexp_e h_t, logsumexp_e l_t],
    expert_stats (3, E) [sum_t p_te, I_e, load_e], next_index (T,) int64 (the (k+1)-th expert, -1 if k=E)

in the accumulation dtype (float32; float64 for float64 logits) except where stated. The backward
(``gating_backward_reference``) needs nothing else.

Dispatch and combine (a counting sort: the N = T k (token, slot) pairs ordered by expert, stable)::

    order[r]          = flat position t*k + j of the r-th pair, pairs sorted by (i_tj, t*k + j)
    inverse[t*k + j]  = r such that order[r] = t*k + j
    offsets[e]        = sum_{e' < e} c_e'                 (E + 1 entries)
    x_sorted[r]       = x[order[r] // k]
    combine: out[t]   = sum_j w_tj y_sorted[inverse[t*k + j]]
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

__all__ = [
    "CV_EPSILON",
    "NOISE_EPSILON",
    "argsort_dispatch",
    "compute_dtype",
    "cv_squared",
    "gating_backward_reference",
    "gating_forward_reference",
    "index_add_combine",
    "moe_combine_reference",
    "moe_dispatch_reference",
    "topk_gating_reference",
]

NOISE_EPSILON = 1e-2
CV_EPSILON = 1e-10


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def cv_squared(v: Tensor) -> Tensor:
    """Squared coefficient of variation with the population variance (0 for fewer than 1 entry)."""
    if v.numel() == 0:
        return v.new_zeros(())
    mean = v.mean()
    return ((v - mean) ** 2).mean() / (mean * mean + CV_EPSILON)


def _normal_cdf(z: Tensor) -> Tensor:
    return 0.5 * torch.erfc(-z / math.sqrt(2.0))


def stable_topk(h: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top ``k + 1`` (if it exists) of each row, ties to the lower index (a stable descending sort)."""
    order = torch.sort(h.detach(), dim=1, descending=True, stable=True).indices
    top = order[:, :k].clone()  # copies: the custom op's outputs may not alias each other
    nxt = order[:, k].clone() if k < h.shape[1] else torch.full_like(order[:, 0], -1)
    return top, nxt


def topk_gating_reference(
    logits: Tensor,
    k: int,
    noise: Optional[Tensor] = None,
    noise_logits: Optional[Tensor] = None,
    normalize: bool = True,
) -> dict[str, Tensor]:
    """Differentiable reference: the equations of the module docstring, written as eager ops.

    ``noise`` (the drawn N(0, 1) samples) and ``noise_logits`` together turn on noisy gating.
    Returns a dict with ``weights``, ``indices``, ``counts``, ``probs`` (p), ``importance``, ``load``,
    ``next_index``, ``lse_h``, ``lse_l``, and the four losses ``load_balancing_loss``,
    ``importance_loss``, ``load_loss``, ``z_loss``.
    """
    ct = compute_dtype(logits.dtype)
    lg = logits.to(ct)
    t, e = lg.shape
    noisy = noise is not None
    if noisy:
        s = torch.nn.functional.softplus(noise_logits.to(ct)) + NOISE_EPSILON
        h = lg + noise.to(ct) * s
    else:
        h = lg
    probs = torch.softmax(h, dim=1)
    indices, next_index = stable_topk(h, k)
    kept = probs.gather(1, indices)
    weights = kept / kept.sum(dim=1, keepdim=True) if normalize else kept
    one_hot = torch.nn.functional.one_hot(indices, e).to(ct)  # (T, k, E)
    counts = one_hot.sum(dim=(0, 1))
    importance = (one_hot * weights.unsqueeze(-1)).sum(dim=(0, 1))
    if noisy:
        if k < e:
            h_sorted = h.gather(1, torch.stack([indices[:, -1], next_index], dim=1))
            thr_out, thr_in = h_sorted[:, :1], h_sorted[:, 1:]  # k-th and (k+1)-th largest
            selected = one_hot.sum(dim=1) > 0
            thr = torch.where(selected, thr_in, thr_out)
            load = _normal_cdf((lg - thr) / s).sum(dim=0)
        else:
            load = lg.new_full((e,), float(t))
    else:
        load = counts
    lse_l = torch.logsumexp(lg, dim=1)
    lse_h = torch.logsumexp(h, dim=1) if noisy else lse_l
    if t > 0:
        lb = e * (counts / (t * k) * probs.mean(dim=0)).sum()
        z = (lse_l * lse_l).mean()
    else:
        lb = z = lg.new_zeros(()) + 0.0 * lg.sum()
    return dict(
        weights=weights.to(logits.dtype),
        indices=indices,
        counts=counts.long(),
        probs=probs,
        importance=importance,
        load=load,
        next_index=next_index,
        lse_h=lse_h,
        lse_l=lse_l,
        load_balancing_loss=lb,
        importance_loss=cv_squared(importance) if t > 0 else lb * 0,
        load_loss=cv_squared(load) if t > 0 else lb * 0,
        z_loss=z,
    )


def gating_forward_reference(
    logits: Tensor, noise: Optional[Tensor], noise_logits: Optional[Tensor], k: int, normalize: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The kernel contract's forward (see the module docstring)."""
    with torch.no_grad():
        r = topk_gating_reference(logits, k, noise, noise_logits, normalize)
        losses = torch.stack([r["load_balancing_loss"], r["importance_loss"], r["load_loss"], r["z_loss"]])
        row_lse = torch.stack([r["lse_h"], r["lse_l"]], dim=1)
        stats = torch.stack([r["probs"].sum(dim=0), r["importance"], r["load"].to(r["importance"].dtype)])
        return r["weights"], r["indices"], r["counts"], losses, row_lse, stats, r["next_index"]


def cv_squared_grad(v: Tensor) -> Tensor:
    """d CV^2(v) / d v_e = 2 (v_e - m) / (E (m^2 + c)) - 2 m var / (E (m^2 + c)^2)."""
    n = v.numel()
    if n == 0:
        return v
    m = v.mean()
    var = ((v - m) ** 2).mean()
    den = m * m + CV_EPSILON
    return 2.0 * (v - m) / (n * den) - 2.0 * m * var / (n * den * den)


def gating_backward_reference(
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
    """Gradients w.r.t. ``logits`` and ``noise_logits`` (the latter (0, E) without noise).

    With ``G`` the gradient reaching the weights (``grad_weights`` plus the importance term)::

        G_tj    = grad_w_tj + g_imp dCV^2(I)/dI_{i_tj}
        dp_ti   = (G_tj - sum_j' G_tj' w_tj') / S_t   at i = i_tj   (normalize; S_t = sum of kept p)
                = G_tj                                              (normalize=False)
        dp_te  += g_lb E f_e / T                                    (load balancing)
        dh_te   = p_te (dp_te - sum_e' p_te' dp_te')                (softmax)
        dl_te   = dh_te + g_z 2 lse_l_t / T softmax_e(l_t)          (z-loss)
        noisy:  ds_te = dh_te eps_te, and with z = (l - thr) / s, a_te = g_load dCV^2(load)/dload_e phi(z) / s:
                dl_te += a_te;  ds_te -= a_te z;  the threshold's logit h_tm gets -a_te:
                dl_tm -= a_te,  ds_tm -= a_te eps_tm;   dn = ds sigmoid(n)
    """
    ct = compute_dtype(logits.dtype)
    t, e = logits.shape
    lg = logits.to(ct)
    noisy = noise is not None
    g_lb, g_imp, g_load, g_z = (grad_losses[i].to(ct) for i in range(4))
    gw = grad_weights.to(ct)
    w = weights.to(ct)
    counts_f = counts.to(ct)
    if noisy:
        s = torch.nn.functional.softplus(noise_logits.to(ct)) + NOISE_EPSILON
        eps = noise.to(ct)
        h = lg + eps * s
    else:
        h = lg
    p = torch.exp(h - row_lse[:, :1].to(ct))
    G = gw + g_imp * cv_squared_grad(expert_stats[1].to(ct))[indices]
    if normalize:
        kept_sum = p.gather(1, indices).sum(dim=1, keepdim=True)
        dkept = (G - (G * w).sum(dim=1, keepdim=True)) / kept_sum
    else:
        dkept = G
    dp = torch.zeros_like(p).scatter_add_(1, indices, dkept)
    if t > 0:
        dp = dp + g_lb * e * counts_f / (t * k) / t
    dh = p * (dp - (p * dp).sum(dim=1, keepdim=True))
    dl = dh.clone()
    if t > 0:
        q = torch.exp(lg - row_lse[:, 1:].to(ct))
        dl = dl + g_z * 2.0 * row_lse[:, 1:].to(ct) / t * q
    if not noisy:
        return dl.to(logits.dtype), logits.new_zeros((0, e))
    ds = dh * eps
    if k < e:
        cl = cv_squared_grad(expert_stats[2].to(ct))
        selected = torch.zeros_like(h, dtype=torch.bool).scatter_(1, indices, True)
        thr_idx = torch.where(selected, next_index.unsqueeze(1), indices[:, -1:])
        thr = h.gather(1, thr_idx)
        z = (lg - thr) / s
        a = g_load * cl * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi) / s
        dl = dl + a
        ds = ds - a * z
        dthr = torch.zeros_like(h).scatter_add_(1, thr_idx, -a)
        dl = dl + dthr
        ds = ds + dthr * eps
    dn = ds * torch.sigmoid(noise_logits.to(ct))
    return dl.to(logits.dtype), dn.to(noise_logits.dtype)


# ---------------------------------------------------------------------------------------------
# Dispatch and combine


def moe_dispatch_reference(x: Tensor, indices: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Counting sort of the (token, slot) pairs by expert: ``(x_sorted, offsets, order, inverse)``.

    Written as the counting sort itself (one-hot histogram, prefix sum, rank within expert by a
    cumulative sum), not as an argsort, so that it is the spec of the kernels' order.
    """
    k = indices.shape[1]
    flat = indices.reshape(-1)
    one_hot = torch.nn.functional.one_hot(flat, num_experts) if flat.numel() else flat.new_zeros((0, num_experts))
    counts = one_hot.sum(dim=0)
    offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    rank = (torch.cumsum(one_hot, dim=0) - 1).gather(1, flat.unsqueeze(1)).squeeze(1) if flat.numel() else flat
    inverse = offsets[flat] + rank
    order = torch.empty_like(flat).scatter_(0, inverse, torch.arange(flat.numel(), device=flat.device))
    x_sorted = x[torch.div(order, k, rounding_mode="floor")] if k > 0 else x.new_empty((0, *x.shape[1:]))
    return x_sorted, offsets, order, inverse


def moe_dispatch_backward_reference(grad_sorted: Tensor, inverse: Tensor, t: int, k: int) -> Tensor:
    """``grad_x[t] = sum_j grad_sorted[inverse[t k + j]]``: a gather per token, no scatter."""
    if k == 0:
        return grad_sorted.new_zeros((t, *grad_sorted.shape[1:]))
    return grad_sorted[inverse].reshape(t, k, *grad_sorted.shape[1:]).sum(dim=1)


def combine_inverse_reference(order: Tensor) -> Tensor:
    """``inverse[order[r]] = r``; slots no ``order`` value points at stay -1 (an invalid order)."""
    return torch.full_like(order, -1).scatter_(0, order, torch.arange(order.numel(), device=order.device))


def moe_combine_reference(y_sorted: Tensor, weights: Tensor, inverse: Tensor) -> Tensor:
    """``out[t] = sum_j w_tj y_sorted[inverse[t k + j]]``, accumulated in float32 (float64)."""
    t, k = weights.shape
    ct = compute_dtype(y_sorted.dtype)
    g = y_sorted[inverse].reshape(t, k, y_sorted.shape[1]).to(ct)
    return (weights.to(ct).unsqueeze(-1) * g).sum(dim=1).to(y_sorted.dtype)


def moe_combine_backward_reference(
    grad_out: Tensor, y_sorted: Tensor, weights: Tensor, order: Tensor, inverse: Tensor
) -> tuple[Tensor, Tensor]:
    """``grad_y[r] = w[order[r]] grad_out[order[r] // k]``;
    ``grad_w[t, j] = <grad_out[t], y_sorted[inverse[t k + j]]>``."""
    t, k = weights.shape
    ct = compute_dtype(y_sorted.dtype)
    go = grad_out.to(ct)
    if k == 0:
        return y_sorted.new_zeros(y_sorted.shape), weights.new_zeros(weights.shape)
    tok = torch.div(order, k, rounding_mode="floor")
    grad_y = (weights.reshape(-1).to(ct)[order].unsqueeze(1) * go[tok]).to(y_sorted.dtype)
    grad_w = (go.unsqueeze(1) * y_sorted[inverse].reshape(t, k, y_sorted.shape[1]).to(ct)).sum(dim=2).to(weights.dtype)
    return grad_y, grad_w


def argsort_dispatch(x: Tensor, indices: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """The usual eager dispatch (a benchmark peer): stable argsort of the expert ids, bincount, gather."""
    k = indices.shape[1]
    flat = indices.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    return x[order // k], offsets, order


def index_add_combine(y_sorted: Tensor, weights: Tensor, order: Tensor, t: int) -> Tensor:
    """The usual eager combine (a benchmark peer): scale the rows, ``index_add_`` them to their tokens."""
    k = weights.shape[1]
    out = y_sorted.new_zeros((t, *y_sorted.shape[1:]))
    scaled = y_sorted * weights.reshape(-1)[order].unsqueeze(1).to(y_sorted.dtype)
    return out.index_add_(0, order // k, scaled)
