"""Fused Triton kernels of mixture-of-experts gating, dispatch and combine.

The maths and the kernel contracts are those of :mod:`ovseg_fast.ops.moe_reference`
(``gating_forward_reference`` / ``gating_backward_reference``, ``moe_dispatch_reference``,
``moe_combine_reference`` and their backwards); this module only launches kernels, the autograd
wiring lives in :mod:`ovseg_fast.ops.moe`.

Gating (``_gating_fwd_kernel``): one program per ``BLOCK_T`` rows holds the ``(BLOCK_T, BLOCK_E)``
tile of logits (E padded to a power of two; for small E each row is a handful of registers of one
thread, i.e. one row per lane) and does everything in registers in one read of the logits: noise
scale and noisy logits, row max, softmax, the clean logsumexp (z-loss) when noisy, and the top
``k + 1`` by ``k + 1`` rounds of "row max, lowest column attaining it, mark taken" (ties to the lower
expert index by construction, no sort). The kept weights are renormalised in registers and written
straight to their slot (each selected tile element knows its slot: a conflict-free scatter within
the row). Per-expert counts, probability sums, importance, smooth load and the sum of ``lse^2`` are
reduced over the tile's rows and written as one partial row per program; the partials are summed
over programs afterwards (``sum`` over a small ``(programs, 5, E)`` buffer) instead of with atomics,
so the result is deterministic. The O(E) loss epilogue runs as a few PyTorch ops on that total.

Gating backward (``_gating_bwd_kernel``): same tiling; probabilities are recomputed from the saved
row logsumexps (one ``exp`` per logit, no max pass), the per-expert loss coefficients (``dCV^2``
vectors, O(E), computed once on the host side from the saved expert statistics) are gathered by
expert id, and the threshold gradient of the smooth load is two row sums added back at the k-th /
(k+1)-th expert's column.

Dispatch (counting sort, no argsort and no atomics): ``_hist_kernel`` writes one expert histogram
per block of ``BLOCK_N`` (token, slot) pairs (a one-hot tile summed over rows); an exclusive
``cumsum`` over the ``(expert, block)``-ordered histogram gives every block its first slot per
expert (and the offsets); ``_place_kernel`` recomputes each pair's rank within its block and expert
with ``tl.cumsum`` over the one-hot tile and writes ``order`` and ``inverse``; ``_gather_rows_kernel``
copies the rows (parallel over destination rows and feature tiles: a pure gather).

Combine: ``_inverse_kernel`` builds ``inverse[order[r]] = r`` (a permutation, so conflict-free);
``_combine_fwd_kernel`` has one program per (token, feature tile) gather its k rows through the
inverse and accumulate them weighted in float32: no scatter, no atomics. Backward: ``grad_y`` is a
weighted gather per row, ``grad_w`` one dot product per (token, slot), ``grad_x`` of the dispatch a
k-row gather-sum per token.

GPU resources
-------------
From the static check (``python -m ovseg_fast.kernels.report``: Triton 3.8 compiles for sm_80 = A100 and
sm_90 = H100 with its bundled ptxas, at the launch configurations the launchers choose for the benchmark
shapes; ``tests/ops/test_triton_static.py`` asserts them). Per kernel, the largest over those launches,
written ``sm_80/sm_90``: registers per thread, shared memory per block (KB); float32 with torch's default
(IEEE dots on CUDA cores, ``fma``), with TF32 allowed (``tf32``) and bfloat16 (float16 compiles the same
tensor-core code). No build spills, every one fits the target's shared memory with at least one block per
SM, and every bfloat16 / TF32 dot runs on tensor cores (``mma``; ``wgmma`` on sm_90 where the tile has
64 rows). Grids reach the SM count at the benchmark shapes except where a kernel's ``Grid:`` paragraph
says why. Speed is not shown by this: only a GPU run measures it.

``_gating_fwd_kernel``: registers fp32 111/110, bf16 116/96; shared KB fp32 8/8, bf16 8/8; 4 warps.
``_gating_bwd_kernel``: registers fp32 117/162, bf16 126/120; shared KB fp32 0/0, bf16 0/0; 4 warps.
``_hist_kernel``: registers fp32 30/32, bf16 30/32; shared KB fp32 1/1, bf16 1/1; 4 warps.
``_place_kernel``: registers fp32 95/121, bf16 95/121; shared KB fp32 32/32, bf16 32/32; 4 warps.
``_gather_rows_kernel``: registers fp32 32/32, bf16 22/22; shared KB fp32 0/0, bf16 0/0; 4 warps.
``_gather_sum_kernel``: registers fp32 26/26, bf16 23/24; shared KB fp32 0/0, bf16 0/0; 4 warps.
``_inverse_kernel``: registers fp32 10/10, bf16 10/10; shared KB fp32 0/0, bf16 0/0; 4 warps.
``_combine_bwd_y_kernel``: registers fp32 32/32, bf16 28/28; shared KB fp32 0/0, bf16 0/0; 4 warps.
``_combine_bwd_w_kernel``: registers fp32 44/36, bf16 32/32; shared KB fp32 0/0, bf16 0/0; 4 warps.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ovseg_fast.ops.moe_reference import NOISE_EPSILON, compute_dtype, cv_squared, cv_squared_grad

from ._gpu import num_sms

_NOISE_EPS = tl.constexpr(NOISE_EPSILON)
_INV_SQRT2 = tl.constexpr(1.0 / math.sqrt(2.0))
_INV_SQRT2PI = tl.constexpr(1.0 / math.sqrt(2.0 * math.pi))


def _rows_per_block(rows: int, cap: int, sms: int, lo: int = 1) -> int:
    """The largest power of two <= ``cap`` (and >= ``lo``) that still gives ``sms`` blocks over ``rows``."""
    per_sm = max(1, rows // max(sms, 1))
    return max(lo, min(cap, 1 << (per_sm.bit_length() - 1)))


def _block_t(block_e: int, t: int, sms: int) -> int:
    # ~4K elements per tile at most (registers for the tile, its probabilities and the selection mask),
    # fewer rows when that leaves SMs idle
    return _rows_per_block(t, max(1, min(128, 4096 // block_e)), sms)


@triton.jit
def _noise_scale(nl):
    # softplus + eps, finite for any finite input: max(x, 0) + log(1 + exp(-|x|)).
    return tl.maximum(nl, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(nl))) + _NOISE_EPS


@triton.jit
def _gating_fwd_kernel(
    L,
    NZ,
    NL,
    W,
    IDX,
    RLSE,
    NEXT,
    PART,
    T,
    E,
    K: tl.constexpr,
    HAS_NEXT: tl.constexpr,
    NOISY: tl.constexpr,
    NORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """Noisy top-k gating forward of ``BLOCK_T`` rows (module docstring).

    Grid: ``cdiv(T, BLOCK_T)``, ``BLOCK_T`` lowered until the grid reaches the SM count (``_block_t``);
    fewer tokens than SMs (RPN's 16) launch fewer blocks: microseconds of latency-bound work.
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    row_in = rows < T
    col_in = cols < E
    inside = row_in[:, None] & col_in[None, :]
    offs = rows[:, None].to(tl.int64) * E + cols[None, :]
    lg = tl.load(L + offs, mask=inside, other=0.0).to(tl.float32)
    if NOISY:
        nz = tl.load(NZ + offs, mask=inside, other=0.0).to(tl.float32)
        nl = tl.load(NL + offs, mask=inside, other=0.0).to(tl.float32)
        s = _noise_scale(nl)
        h = lg + nz * s
    else:
        h = lg
    neg = float("-inf")
    h = tl.where(inside, h, neg)
    m = tl.max(h, axis=1)
    m = tl.where(row_in, m, 0.0)
    ex = tl.where(inside, tl.exp(h - m[:, None]), 0.0)
    total = tl.sum(ex, axis=1)
    total = tl.where(row_in, total, 1.0)
    p = ex / total[:, None]
    lse_h = m + tl.log(total)
    if NOISY:
        lm = tl.max(tl.where(inside, lg, neg), axis=1)
        lm = tl.where(row_in, lm, 0.0)
        lsum = tl.sum(tl.where(inside, tl.exp(lg - lm[:, None]), 0.0), axis=1)
        lse_l = lm + tl.log(tl.where(row_in, lsum, 1.0))
    else:
        lse_l = lse_h
    tl.store(RLSE + rows.to(tl.int64) * 2, lse_h, mask=row_in)
    tl.store(RLSE + rows.to(tl.int64) * 2 + 1, lse_l, mask=row_in)

    # Top k (+1): k rounds of max / lowest index attaining it / mark taken.
    slot = tl.full((BLOCK_T, BLOCK_E), -1, tl.int32)
    cur = h
    last = tl.zeros((BLOCK_T,), tl.int32)
    for j in tl.static_range(K):
        mj = tl.max(cur, axis=1)
        hit = (cur == mj[:, None]) & inside & (slot < 0)
        ij = tl.min(tl.where(hit, cols[None, :], BLOCK_E), axis=1)
        take = cols[None, :] == ij[:, None]
        slot = tl.where(take, j, slot)
        cur = tl.where(take, neg, cur)
        last = ij
    sel = slot >= 0
    if HAS_NEXT:
        mj = tl.max(cur, axis=1)
        hit = (cur == mj[:, None]) & inside & (slot < 0)
        nxt = tl.min(tl.where(hit, cols[None, :], BLOCK_E), axis=1)
        tl.store(NEXT + rows, nxt.to(tl.int64), mask=row_in)
    else:
        tl.store(NEXT + rows, tl.full((BLOCK_T,), -1, tl.int64), mask=row_in)
    kept = tl.sum(tl.where(sel, p, 0.0), axis=1)
    if NORMALIZE:
        w = p / tl.where(row_in, kept, 1.0)[:, None]
    else:
        w = p
    w = tl.where(sel, w, 0.0)
    out_offs = rows[:, None].to(tl.int64) * K + slot
    tl.store(W + out_offs, w.to(W.dtype.element_ty), mask=sel & inside)
    tl.store(IDX + out_offs, (cols[None, :] + tl.zeros((BLOCK_T, BLOCK_E), tl.int32)).to(tl.int64), mask=sel & inside)

    # Per-block partial sums: [sum p, importance, load, counts, (sum lse_l^2, 0, ...)].
    part = PART + pid.to(tl.int64) * 5 * E
    valid = inside
    tl.store(part + cols, tl.sum(tl.where(valid, p, 0.0), axis=0), mask=col_in)
    tl.store(part + E + cols, tl.sum(w, axis=0), mask=col_in)
    if NOISY and HAS_NEXT:
        thr_in = tl.sum(tl.where(cols[None, :] == nxt[:, None], h, 0.0), axis=1)
        thr_out = tl.sum(tl.where(cols[None, :] == last[:, None], h, 0.0), axis=1)
        thr = tl.where(sel, thr_in[:, None], thr_out[:, None])
        z = (lg - thr) / s
        cdf = 0.5 * (1.0 + tl.math.erf(z * _INV_SQRT2))
        tl.store(part + 2 * E + cols, tl.sum(tl.where(valid, cdf, 0.0), axis=0), mask=col_in)
    else:
        tl.store(part + 2 * E + cols, tl.zeros((BLOCK_E,), tl.float32), mask=col_in)
    tl.store(part + 3 * E + cols, tl.sum(sel.to(tl.float32), axis=0), mask=col_in)
    zrow = tl.where(row_in, lse_l * lse_l, 0.0)
    tl.store(part + 4 * E + cols, tl.where(cols == 0, tl.sum(zrow, axis=0), 0.0), mask=col_in)


def gating_forward(logits: Tensor, noise, noise_logits, k: int, normalize: bool):
    t, e = logits.shape
    ct = compute_dtype(logits.dtype)
    if ct != torch.float32:
        raise TypeError("the Triton gating kernel computes in float32 (float64 is not supported)")
    dev = logits.device
    weights = torch.empty((t, k), dtype=logits.dtype, device=dev)
    indices = torch.empty((t, k), dtype=torch.int64, device=dev)
    row_lse = torch.empty((t, 2), dtype=ct, device=dev)
    next_index = torch.empty((t,), dtype=torch.int64, device=dev)
    block_e = triton.next_power_of_2(e)
    block_t = _block_t(block_e, t, num_sms(dev))
    n_prog = triton.cdiv(t, block_t)
    part = torch.zeros((max(n_prog, 1), 5, e), dtype=ct, device=dev)
    noisy = noise is not None
    if t > 0:
        _gating_fwd_kernel[(n_prog,)](
            logits,
            noise if noisy else logits,
            noise_logits if noisy else logits,
            weights,
            indices,
            row_lse,
            next_index,
            part,
            t,
            e,
            K=k,
            HAS_NEXT=k < e,
            NOISY=noisy,
            NORMALIZE=normalize,
            BLOCK_T=block_t,
            BLOCK_E=block_e,
        )
    tot = part.sum(dim=0)
    psum, imp, load, cnt = tot[0], tot[1], tot[2], tot[3]
    if not noisy:
        load = cnt
    elif k == e:
        load = torch.full_like(cnt, float(t))
    counts = cnt.round().to(torch.int64)
    stats = torch.stack([psum, imp, load])
    if t > 0:
        losses = torch.stack(
            [
                e * (cnt / (t * k) * psum / t).sum(),
                cv_squared(imp),
                cv_squared(load),
                tot[4, 0] / t,
            ]
        )
    else:
        losses = torch.zeros(4, dtype=ct, device=dev)
    return weights, indices, counts, losses, row_lse, stats, next_index


@triton.jit
def _gating_bwd_kernel(
    GW,
    L,
    NZ,
    NL,
    W,
    IDX,
    RLSE,
    NEXT,
    CIMP,
    CLOAD,
    DPLB,
    DL,
    DN,
    T,
    E,
    zc,
    K: tl.constexpr,
    HAS_NEXT: tl.constexpr,
    NOISY: tl.constexpr,
    NORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """Gating backward of ``BLOCK_T`` rows (module docstring).

    Grid: as the forward's: fewer tokens than SMs (RPN's 16) launch fewer blocks than SMs.
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    row_in = rows < T
    col_in = cols < E
    inside = row_in[:, None] & col_in[None, :]
    offs = rows[:, None].to(tl.int64) * E + cols[None, :]
    lg = tl.load(L + offs, mask=inside, other=0.0).to(tl.float32)
    if NOISY:
        nz = tl.load(NZ + offs, mask=inside, other=0.0).to(tl.float32)
        nl = tl.load(NL + offs, mask=inside, other=0.0).to(tl.float32)
        s = _noise_scale(nl)
        h = lg + nz * s
    else:
        h = lg
    lse_h = tl.load(RLSE + rows.to(tl.int64) * 2, mask=row_in, other=0.0)
    lse_l = tl.load(RLSE + rows.to(tl.int64) * 2 + 1, mask=row_in, other=0.0)
    p = tl.where(inside, tl.exp(h - lse_h[:, None]), 0.0)
    if NOISY:
        q = tl.where(inside, tl.exp(lg - lse_l[:, None]), 0.0)
    else:
        q = p
    g_tile = tl.zeros((BLOCK_T, BLOCK_E), tl.float32)
    sel = tl.zeros((BLOCK_T, BLOCK_E), tl.int1)
    gw_dot = tl.zeros((BLOCK_T,), tl.float32)
    kept = tl.zeros((BLOCK_T,), tl.float32)
    last = tl.zeros((BLOCK_T,), tl.int64)
    for j in tl.static_range(K):
        ij = tl.load(IDX + rows.to(tl.int64) * K + j, mask=row_in, other=0)
        gj = tl.load(GW + rows.to(tl.int64) * K + j, mask=row_in, other=0.0).to(tl.float32)
        gj += tl.load(CIMP + ij, mask=row_in, other=0.0)
        wj = tl.load(W + rows.to(tl.int64) * K + j, mask=row_in, other=0.0).to(tl.float32)
        take = (cols[None, :] == ij[:, None]) & inside
        g_tile = tl.where(take, gj[:, None], g_tile)
        sel = sel | take
        gw_dot += gj * wj
        kept += tl.sum(tl.where(take, p, 0.0), axis=1)
        last = ij
    dplb = tl.load(DPLB + cols, mask=col_in, other=0.0)
    if NORMALIZE:
        dk = (g_tile - gw_dot[:, None]) / tl.where(row_in, kept, 1.0)[:, None]
    else:
        dk = g_tile
    dp = dplb[None, :] + tl.where(sel, dk, 0.0)
    dot = tl.sum(p * dp, axis=1)
    dh = p * (dp - dot[:, None])
    dl = dh + (zc * lse_l)[:, None] * q
    if NOISY:
        ds = dh * nz
        if HAS_NEXT:
            nxt = tl.load(NEXT + rows, mask=row_in, other=0)
            at_in = cols[None, :] == nxt[:, None]
            at_out = cols[None, :] == last[:, None]
            thr_in = tl.sum(tl.where(at_in, h, 0.0), axis=1)
            thr_out = tl.sum(tl.where(at_out, h, 0.0), axis=1)
            z = (lg - tl.where(sel, thr_in[:, None], thr_out[:, None])) / s
            cload = tl.load(CLOAD + cols, mask=col_in, other=0.0)
            a = tl.where(inside, cload[None, :] * tl.exp(-0.5 * z * z) * _INV_SQRT2PI / s, 0.0)
            dl += a
            ds -= a * z
            a_in = tl.sum(tl.where(sel, a, 0.0), axis=1)
            a_out = tl.sum(tl.where(sel, 0.0, a), axis=1)
            dthr = tl.where(at_in, a_in[:, None], 0.0) + tl.where(at_out, a_out[:, None], 0.0)
            dl -= dthr
            ds -= dthr * nz
        dn = ds * tl.sigmoid(nl)
        tl.store(DN + offs, dn.to(DN.dtype.element_ty), mask=inside)
    tl.store(DL + offs, dl.to(DL.dtype.element_ty), mask=inside)


def gating_backward(
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
):
    t, e = logits.shape
    ct = compute_dtype(logits.dtype)
    noisy = noise is not None
    dl = torch.empty((t, e), dtype=logits.dtype, device=logits.device)
    dn = torch.empty((t if noisy else 0, e), dtype=logits.dtype, device=logits.device)
    if t == 0:
        return dl, dn
    g = grad_losses.to(ct)
    stats = expert_stats.to(ct)
    c_imp = (cv_squared_grad(stats[1]) * g[1]).contiguous()
    c_load = (cv_squared_grad(stats[2]) * g[2]).contiguous() if noisy and k < e else torch.zeros_like(c_imp)
    dp_lb = (g[0] * e * counts.to(ct) / (t * k) / t).contiguous()
    zc = float(g[3]) * 2.0 / t  # host scalar: one sync; on a GPU pass a pointer instead to stay async
    block_e = triton.next_power_of_2(e)
    block_t = _block_t(block_e, t, num_sms(logits.device))
    _gating_bwd_kernel[(triton.cdiv(t, block_t),)](
        grad_weights.contiguous(),
        logits,
        noise if noisy else logits,
        noise_logits if noisy else logits,
        weights.contiguous(),
        indices.contiguous(),
        row_lse.contiguous(),
        next_index.contiguous(),
        c_imp,
        c_load,
        dp_lb,
        dl,
        dn if noisy else dl,
        t,
        e,
        zc,
        K=k,
        HAS_NEXT=k < e,
        NOISY=noisy,
        NORMALIZE=normalize,
        BLOCK_T=block_t,
        BLOCK_E=block_e,
    )
    return dl, dn


# ---------------------------------------------------------------------------------------------
# Dispatch


@triton.jit
def _hist_kernel(IDX, HIST, N, E, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr):
    """One expert histogram per block of ``BLOCK_N`` (token, slot) pairs.

    Grid: ``cdiv(T k, BLOCK_N)``, ``BLOCK_N`` (>= 16) lowered until the grid reaches the SM count; fewer
    than 16 pairs per SM (RPN's 16 tokens) launch fewer blocks: microseconds of latency-bound work.
    """
    pid = tl.program_id(0)
    p = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_E)
    e = tl.load(IDX + p, mask=p < N, other=-1)
    one_hot = (e[:, None] == cols[None, :]).to(tl.int32)
    tl.store(HIST + cols.to(tl.int64) * tl.num_programs(0) + pid, tl.sum(one_hot, axis=0).to(tl.int64), mask=cols < E)


@triton.jit
def _place_kernel(IDX, BASE, ORDER, INV, N, E, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr):
    """``order`` / ``inverse`` of one block of pairs from its rank within the block and expert.

    Grid: the histogram's (same ``BLOCK_N``): fewer blocks than SMs only for a few hundred pairs.
    """
    pid = tl.program_id(0)
    p = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    inb = p < N
    cols = tl.arange(0, BLOCK_E)
    e = tl.load(IDX + p, mask=inb, other=-1)
    one_hot = (e[:, None] == cols[None, :]).to(tl.int32)
    rank = tl.sum(tl.where(one_hot > 0, tl.cumsum(one_hot, axis=0) - 1, 0), axis=1)
    base = tl.load(BASE + e * tl.num_programs(0) + pid, mask=inb, other=0)
    pos = base + rank
    tl.store(ORDER + pos, p.to(tl.int64), mask=inb)
    tl.store(INV + p, pos.to(tl.int64), mask=inb)


@triton.jit
def _gather_rows_kernel(X, ORDER, OUT, N, D, K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """``out[r] = x[order[r] // K]`` for ``BLOCK_R`` rows and ``BLOCK_D`` features.

    Grid: ``cdiv(T k, BLOCK_R) x cdiv(D, BLOCK_D)``: below the SM count only for tiny batches (RPN's 16
    tokens), a copy of a few KB.
    """
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rin = r < N
    m = rin[:, None] & (d < D)[None, :]
    src = tl.load(ORDER + r, mask=rin, other=0) // K
    v = tl.load(X + src[:, None] * D + d[None, :], mask=m)
    tl.store(OUT + r[:, None].to(tl.int64) * D + d[None, :], v, mask=m)


def _row_blocks(d: int) -> tuple[int, int]:
    block_d = min(triton.next_power_of_2(max(d, 1)), 512)
    return max(1, 2048 // block_d), block_d


def dispatch_forward(x: Tensor, indices: Tensor, num_experts: int):
    t, k = indices.shape
    n, d = t * k, x.shape[1]
    dev = x.device
    x_sorted = torch.empty((n, d), dtype=x.dtype, device=dev)
    order = torch.empty((n,), dtype=torch.int64, device=dev)
    inverse = torch.empty((n,), dtype=torch.int64, device=dev)
    if n == 0:
        return x_sorted, torch.zeros(num_experts + 1, dtype=torch.int64, device=dev), order, inverse
    block_e = triton.next_power_of_2(num_experts)
    block_n = _rows_per_block(n, max(16, min(1024, 8192 // block_e)), num_sms(dev), lo=16)
    n_prog = triton.cdiv(n, block_n)
    flat = indices.reshape(-1)
    hist = torch.empty((num_experts, n_prog), dtype=torch.int64, device=dev)
    _hist_kernel[(n_prog,)](flat, hist, n, num_experts, BLOCK_N=block_n, BLOCK_E=block_e)
    # Exclusive scan in (expert, block) order: each block's first slot per expert, and the offsets.
    run = torch.cumsum(hist.reshape(-1), 0)
    base = (run - hist.reshape(-1)).reshape(num_experts, n_prog).contiguous()
    offsets = torch.cat([run.new_zeros(1), run.reshape(num_experts, n_prog)[:, -1]])
    _place_kernel[(n_prog,)](flat, base, order, inverse, n, num_experts, BLOCK_N=block_n, BLOCK_E=block_e)
    if d > 0:
        block_r, block_d = _row_blocks(d)
        _gather_rows_kernel[(triton.cdiv(n, block_r), triton.cdiv(d, block_d))](
            x, order, x_sorted, n, d, K=k, BLOCK_R=block_r, BLOCK_D=block_d
        )
    return x_sorted, offsets, order, inverse


@triton.jit
def _gather_sum_kernel(G, INV, W, OUT, T, D, K: tl.constexpr, WEIGHTED: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[t] = sum_j (w[t, j] *) g[inv[t K + j]]: dispatch backward and combine forward.

    Grid: one block per (token, feature tile): fewer tokens than SMs (RPN's 16) launch fewer blocks.
    """
    t = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dm = d < D
    acc = tl.zeros((BLOCK_D,), tl.float32)
    for j in tl.static_range(K):
        r = tl.load(INV + t * K + j)
        v = tl.load(G + r * D + d, mask=dm, other=0.0).to(tl.float32)
        if WEIGHTED:
            v = v * tl.load(W + t * K + j).to(tl.float32)
        acc += v
    tl.store(OUT + t.to(tl.int64) * D + d, acc.to(OUT.dtype.element_ty), mask=dm)


def dispatch_backward(grad_sorted: Tensor, inverse: Tensor, tokens: int, k: int) -> Tensor:
    d = grad_sorted.shape[1]
    out = torch.empty((tokens, d), dtype=grad_sorted.dtype, device=grad_sorted.device)
    if tokens == 0 or d == 0:
        return out
    if k == 0:
        return out.zero_()
    block_d = min(triton.next_power_of_2(d), 1024)
    _gather_sum_kernel[(tokens, triton.cdiv(d, block_d))](
        grad_sorted, inverse, grad_sorted, out, tokens, d, K=k, WEIGHTED=False, BLOCK_D=block_d
    )
    return out


# ---------------------------------------------------------------------------------------------
# Combine


@triton.jit
def _inverse_kernel(ORDER, INV, N, BLOCK: tl.constexpr):
    """``inverse[order[r]] = r`` for ``BLOCK`` rows.

    Grid: ``cdiv(N, BLOCK)``, ``BLOCK`` (>= 128) lowered until the grid reaches the SM count: fewer blocks
    only for fewer than 128 rows per SM, a write of a few KB.
    """
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = r < N
    o = tl.load(ORDER + r, mask=m, other=0)
    tl.store(INV + o, r.to(tl.int64), mask=m)


def combine_inverse(order: Tensor) -> Tensor:
    """``inverse[order[r]] = r`` (slots nothing points at stay -1); ``order`` values must be in range."""
    n = order.numel()
    inverse = torch.full_like(order, -1)
    if n:
        block = _rows_per_block(n, 1024, num_sms(order.device), lo=128)
        _inverse_kernel[(triton.cdiv(n, block),)](order, inverse, n, BLOCK=block)
    return inverse


def combine_forward(y_sorted: Tensor, weights: Tensor, inverse: Tensor) -> Tensor:
    t, k = weights.shape
    d = y_sorted.shape[1]
    out = torch.empty((t, d), dtype=y_sorted.dtype, device=y_sorted.device)
    if t == 0 or d == 0:
        return out
    if k == 0:
        return out.zero_()
    block_d = min(triton.next_power_of_2(d), 1024)
    _gather_sum_kernel[(t, triton.cdiv(d, block_d))](
        y_sorted, inverse, weights, out, t, d, K=k, WEIGHTED=True, BLOCK_D=block_d
    )
    return out


@triton.jit
def _combine_bwd_y_kernel(GO, W, ORDER, GY, N, D, K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """``grad_y[r] = w[order[r]] * grad_out[order[r] // K]`` for ``BLOCK_R`` rows.

    Grid: ``cdiv(N, BLOCK_R) x cdiv(D, BLOCK_D)``: below the SM count only for tiny batches (RPN's 16
    tokens).
    """
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rin = r < N
    m = rin[:, None] & (d < D)[None, :]
    p = tl.load(ORDER + r, mask=rin, other=0)
    w = tl.load(W + p, mask=rin, other=0.0).to(tl.float32)
    g = tl.load(GO + (p // K)[:, None] * D + d[None, :], mask=m, other=0.0).to(tl.float32)
    tl.store(GY + r[:, None].to(tl.int64) * D + d[None, :], (w[:, None] * g).to(GY.dtype.element_ty), mask=m)


@triton.jit
def _combine_bwd_w_kernel(GO, Y, INV, GW, D, K: tl.constexpr, BLOCK_D: tl.constexpr):
    """``grad_w[t, j] = grad_out[t] . y[inverse[t K + j]]``, one program per token.

    Grid: one block per token: fewer tokens than SMs (RPN's 16) launch fewer blocks than SMs.
    """
    t = tl.program_id(0)
    for j in tl.static_range(K):
        r = tl.load(INV + t * K + j)
        acc = tl.zeros((BLOCK_D,), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            dm = d < D
            g = tl.load(GO + t.to(tl.int64) * D + d, mask=dm, other=0.0).to(tl.float32)
            y = tl.load(Y + r * D + d, mask=dm, other=0.0).to(tl.float32)
            acc += g * y
        tl.store(GW + t * K + j, tl.sum(acc, axis=0))


def combine_backward(grad_out, y_sorted, weights, order, inverse):
    t, k = weights.shape
    n, d = y_sorted.shape
    grad_y = torch.empty_like(y_sorted)
    grad_w = torch.zeros((t, k), dtype=torch.float32, device=weights.device)
    if n > 0 and d > 0:
        block_r, block_d = _row_blocks(d)
        _combine_bwd_y_kernel[(triton.cdiv(n, block_r), triton.cdiv(d, block_d))](
            grad_out, weights, order, grad_y, n, d, K=k, BLOCK_R=block_r, BLOCK_D=block_d
        )
        _combine_bwd_w_kernel[(t,)](
            grad_out, y_sorted, inverse, grad_w, d, K=k, BLOCK_D=min(triton.next_power_of_2(d), 1024)
        )
    return grad_y, grad_w.to(weights.dtype)
