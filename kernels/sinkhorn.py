"""Fused Triton kernels of batched Sinkhorn-Knopp (forward and backward).

The maths, the argument conventions and the kernel contract are those of
``ovseg_fast.ops.sinkhorn_reference`` (``sinkhorn_forward_reference`` / ``sinkhorn_backward_reference``):
the kernels here reproduce them, history outputs, early stopping and ``-inf`` conventions included.
This module only launches kernels; the autograd wiring lives in ``ovseg_fast.ops``.

Maths in base 2
---------------
Every exponential is an ``exp2`` and every logarithm a ``log2``. With ``scale = log2(e) / epsilon``
(one multiply per loaded score, the only place epsilon enters)::

    y_ij = scale * s_ij = x_ij * log2(e)            F = f * log2(e),  G = g * log2(e)
    Lr_i = log2 r_i (-inf for a masked row or r_i <= 0),  Lc_j = log2 c_j (-inf for c_j <= 0)
    column step   G_j = Lc_j - lse2_i(y_ij + F_i)
    row step      F_i = Lr_i - lse2_j(y_ij + G_j)
    plan          Q_ij = r_i * softmax2_j(y_ij + G_j)   (= exp(x + f + g), computed so rows sum to r)

where ``lse2(z) = m + log2(sum exp2(z - m))`` with ``m = max z``. The duals are stored in natural
units (``log_u = F * ln 2``, ``log_v = G * ln 2``) as the contract asks.

Why it stays finite: ``|y| <= |s| * 1.45 / epsilon`` (1.45e7 for ``|s| = 1e4``, ``epsilon = 1e-3``,
far from the float32 range); every ``exp2`` argument is ``z - max(z) <= 0`` so it never overflows;
an all ``-inf`` slice (masked rows, padding, zero marginals) uses the shift 0 instead of ``-inf``
(no ``-inf - -inf``) and gives ``lse = -inf``, and ``dual(L, lse) = -inf`` unless both are finite,
so no ``NaN`` and no ``+inf`` is ever formed. The plan is taken from the last row step's softmax
(``p / sum(p) * r``) instead of ``exp2(y + G + F)``: with huge ``|y|`` the dual ``F`` is rounded to
an ulp of ``|y|`` and the latter would miss the row marginals by up to a factor 2; the former sums
to ``r`` to float32 accuracy for any finite input.

Early stopping without a host sync: the column sums of the plan after row step ``t`` are
``sum_i Q_ij = exp2(G^t_j + lse2_i(y_ij + F^t_i))`` and that ``lse2`` is exactly what the column step
of iteration ``t + 1`` computes, so the check costs ``K`` exponentials, is evaluated in-kernel per
problem (``err = max_j |colsum_j - c_j|``; stop when ``err < tol`` at ``t % check_every == 0``,
``t < n_iters``) and a stopped problem simply leaves its loop (the ``G`` of step ``t + 1`` is
discarded). Each program tests only its own problem's flag, so other problems are not held up (the
loop is a ``for`` whose body is skipped once the flag drops: Triton 3.x's layout pass crashes on the
equivalent ``scf.while``).

Variants (chosen in the host launchers from the padded tile size, forced with ``variant=``)
-------------------------------------------------------------------------------------------
* ``resident``: one program per problem holds the whole padded ``(BLOCK_N, BLOCK_K)`` tile of
  ``y`` in registers for all iterations (up to ``RESIDENT_MAX_TILE_FWD`` / ``RESIDENT_MAX_TILE_BWD``
  = 8K padded elements: a 16K tile compiles but spills, see the constants). Scores are read once,
  the plan and the gradient written once; ``num_warps`` grows with the tile (16 elements per thread
  per tile), so tiny problems (e.g. 8x8) run on one warp and a B=256, 64x64 batch gives 256
  programs of 8 warps. Packing several tiny problems into one program (a 3D tile, per-problem
  active flags) would help only for sub-warp problems with huge B; it is not implemented.
* ``streaming``: for tiles that do not fit (PixelCLIP's one problem: N=6144, K=64; SwAV: N=4096,
  K=3000). Each problem is split over ``P`` row-slab programs (about ``STREAM_TARGET_PROGRAMS`` =
  264 over the batch, two per H100 SM, so B = 1 fills the GPU) and every iteration is a two-phase
  reduction, two launches:

  - phase 1 (``_sinkhorn_fwd_rows_kernel``, grid ``(B, P)``): program ``p`` streams its row blocks of
    ``BLOCK_N`` rows once, does their row step ``t`` with the complete ``G^t`` (row-local) and folds
    ``y + F^t`` into column ``(max, sum)`` partials, written to its slab of a ``(B, P, K)`` workspace
    (registers when the padded K fits one chunk, ``BLOCK_K <= STREAM_MAX_BLOCK_K`` = 4096; otherwise
    the slab is read-modified-written per (row block, column chunk) behind a CTA barrier);
  - phase 2 (``_sinkhorn_fwd_cols_kernel``, grid ``(B, cdiv(K, 1024))``): merges the ``P`` partials of
    its columns into the logsumexp of column step ``t + 1``, writes ``G^{t+1}`` (double-buffered by
    the parity of ``t``) and its part of the early-stop error after row step ``t``.

  Early stopping stays on the device: the next phase 1 (or the plan launch) reduces the error
  partials, and a stopped problem's programs return at once (a per-problem, per-pass ``ACT`` flag);
  the host launches all ``2 n_iters + 1`` kernels without reading anything back (and could capture
  them in a CUDA graph). The final row step and the plan write are a fully parallel launch (grid
  ``(B, cdiv(N, BLOCK_N))``) that resolves ``n_done`` and reads the final ``G`` from its buffer, so
  the recomputed ``F`` is bit-identical to a continuation of the loop.

  Grid: phase 1 has ``B * P`` programs (``P <= cdiv(N, BLOCK_N)``; 48 for (1, 6144, 64), 264 for
  SwAV); phase 2 ``B * cdiv(K, 1024)``, a merge of ``P x 1024`` values per program, few blocks
  because its work is that small (one column chunk for K = 64).

Backward
--------
The reverse of the unrolled loop (``sinkhorn_backward_reference``), recomputed from the saved duals
(no stored plans)::

    dx = Gr * Q;  Fb = rowsum(dx);  Gg = colsum(dx)
    for t = T .. 1:
        A^t = softmax2_j(y + G^t) (0 on rows with F^t = -inf):     dx -= Fb A;  Gg -= colsum(Fb A)
        B^t = softmax2_i(y + F^{t-1}) (0 on columns with G^t = -inf): dx -= Gg B;  Fb = -rowsum(Gg B); Gg = 0
    grad = dx / epsilon

* ``resident``: ``y`` and ``dx`` stay in registers, both softmaxes are recomputed exactly on chip
  (row / column max and sum), one sweep of the tile per iteration, the gradient is written once.
* ``streaming``: the vector recursion (``Fb``, ``Gg``), one pass over the row blocks per iteration,
  split like the forward into row-slab programs (``_sinkhorn_bwd_rows_kernel``, grid ``(B, P)``) and
  a column phase that merges their partials (``_sinkhorn_bwd_cols_kernel``): per row block, column
  step ``t`` gives the block's ``Fb^{t-1}`` (row-local), which at once feeds row step ``t - 1`` (its
  row softmax and its column sums into ``Gg^{t-1}``). The column softmax of column step ``t - 1``
  needs all rows, so its statistics are accumulated one pass ahead (a third ``exp2`` per element);
  the pass count follows each problem's ``n_done`` (a problem whose recursion is over skips the
  remaining passes). Every ``Fb^t``, ``Gg^t`` and the softmax statistics, kept as a (shift,
  log2-sum) pair, go to ``(B, T, N)`` / ``(B, T, K)`` float32 workspaces. Then a fully parallel
  launch over row blocks forms
  ``dx = Gr Q - sum_t (Fb^t A^t + Gg^t B^t)`` with ``A = exp2(y + G - shift - logsum)`` (same for
  ``B``) and writes the gradient once. That re-evaluates ``2T`` exponentials per element rather than
  keeping an ``(N, K)`` float32 ``dx`` in global memory and read-modify-writing it every iteration
  (12 more bytes per element and iteration): on current GPUs the bytes cost more than the ``exp2``.
  Why not take the softmaxes from the saved duals (``lse_j(y + G^t) = Lr - F^t``, no statistics):
  a stored dual is rounded to an ulp of its magnitude (``|F|``, ``|G|`` reach about 1e3 in base 2
  for ``epsilon = 0.01``: an ulp of 6e-5), and that error lands in every probability. Measured
  against a float64 reference, that was 10 to 30 times less accurate than the exact recomputation.
  Keeping the shift and the log-sum apart keeps ``exp2(z - shift - logsum)`` as exact as the
  resident ``p / sum(p)``.

Accumulation is in float32 for float32 / float16 / bfloat16 scores; no atomics (a problem's
reductions are owned by one program, or merged in a fixed order from per-program partials).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._gpu import num_sms

__all__ = ["sinkhorn_backward", "sinkhorn_forward"]

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(LN2)

#: largest padded tile (BLOCK_N * BLOCK_K) that the resident forward keeps in registers. ptxas
#: (sm_80, Triton 3.8, 16 elements per thread): 8K uses 128 registers with a 16-byte spill, 16K
#: spills 560 bytes per thread (still 270 at 32 warps): tune on a GPU before raising it.
RESIDENT_MAX_TILE_FWD = 8192
#: same for the resident backward, which also holds the dx tile (8K: 64-byte spill)
RESIDENT_MAX_TILE_BWD = 8192
#: elements of one (row block x column chunk) tile in the streaming kernels
STREAM_TILE = 8192
#: widest column chunk of the streaming kernels; a wider K is processed in chunks
STREAM_MAX_BLOCK_K = 4096
#: programs the streaming forward's row phase aims at over the whole batch: two per SM of an H100
#: (132 SMs; an A100 has 108), so that B = 1 (PixelCLIP's one problem, SwAV) fills the GPU
STREAM_TARGET_PROGRAMS = 264
#: columns per program of the streaming forward's column phase
STREAM_COLS_BLOCK = 1024

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------------
# jit helpers (all in base 2)
# --------------------------------------------------------------------------------------------------


@triton.jit
def _safe_shift(m):
    """The max used as a shift, 0 for an all -inf slice (so ``z - shift`` is never NaN)."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _finish_lse(shift, total):
    """``shift + log2(total)``, -inf for an empty (all -inf) slice."""
    ok = total > 0
    return tl.where(ok, shift + tl.log2(tl.where(ok, total, 1.0)), float("-inf"))


@triton.jit
def _dual(log_target, lse):
    """``log_target - lse``; zero mass or nothing to scale gives -inf (never NaN)."""
    ok = (log_target > float("-inf")) & (lse > float("-inf"))
    return tl.where(ok, tl.where(ok, log_target, 0.0) - tl.where(ok, lse, 0.0), float("-inf"))


@triton.jit
def _log2_mass(m):
    """log2 of a mass, -inf for m <= 0."""
    return tl.where(m > 0, tl.log2(tl.where(m > 0, m, 1.0)), float("-inf"))


@triton.jit
def _inv_or_zero(total):
    ok = total > 0
    return tl.where(ok, 1.0 / tl.where(ok, total, 1.0), 0.0)


@triton.jit
def _row_stats(z):
    """Row softmax pieces of a (BN, BK) tile: ``p = exp2(z - shift)``, the shift and ``sum_j p``."""
    shift = _safe_shift(tl.max(z, axis=1))
    p = tl.exp2(z - shift[:, None])
    return p, shift, tl.sum(p, axis=1)


@triton.jit
def _col_lse(z):
    shift = _safe_shift(tl.max(z, axis=0))
    return _finish_lse(shift, tl.sum(tl.exp2(z - shift[None, :]), axis=0))


@triton.jit
def _row_softmax(z):
    p, _shift, total = _row_stats(z)
    return p * _inv_or_zero(total)[:, None]


@triton.jit
def _col_softmax(z):
    shift = _safe_shift(tl.max(z, axis=0))
    p = tl.exp2(z - shift[None, :])
    return p * _inv_or_zero(tl.sum(p, axis=0))[None, :]


@triton.jit
def _merge_cols(run_max, run_sum, z):
    """Online logsumexp over rows: fold the (BN, BK) block ``z`` into per-column (max, sum)."""
    new_max = tl.maximum(run_max, tl.max(z, axis=0))
    shift = _safe_shift(new_max)
    run_sum = run_sum * tl.exp2(run_max - shift) + tl.sum(tl.exp2(z - shift[None, :]), axis=0)
    return new_max, run_sum


@triton.jit
def _merge_rows(run_max, run_sum, z):
    """Online logsumexp over columns: fold the (BN, BK) block ``z`` into per-row (max, sum)."""
    new_max = tl.maximum(run_max, tl.max(z, axis=1))
    shift = _safe_shift(new_max)
    run_sum = run_sum * tl.exp2(run_max - shift) + tl.sum(tl.exp2(z - shift[:, None]), axis=1)
    return new_max, run_sum


@triton.jit
def _load_y(S, s_n, s_k, rows, cols, row_in, col_in, scale):
    """Scaled scores ``y = s * log2(e) / epsilon`` in float32, -inf outside the problem."""
    inside = row_in[:, None] & col_in[None, :]
    s = tl.load(S + rows[:, None] * s_n + cols[None, :] * s_k, mask=inside, other=0.0)
    return tl.where(inside, s.to(tl.float32) * scale, float("-inf"))


@triton.jit
def _load_valid(MASK, m_n, rows, row_in):
    return (tl.load(MASK + rows * m_n, mask=row_in, other=0) != 0) & row_in


@triton.jit
def _load_mass(R, r_n, rows, row_in, valid):
    """Row masses in float32, 0 on masked rows."""
    r = tl.load(R + rows * r_n, mask=row_in, other=0.0).to(tl.float32)
    return tl.where(valid, r, 0.0)


@triton.jit
def _load_dual(H, offs, inside):
    """A saved natural-log dual from the history, in base 2 (-inf outside)."""
    return tl.load(H + offs, mask=inside, other=float("-inf")) * _LOG2E


# --------------------------------------------------------------------------------------------------
# forward, resident: the whole problem in registers
# --------------------------------------------------------------------------------------------------


@triton.jit
def _sinkhorn_fwd_resident_kernel(
    S, s_b, s_n, s_k,
    MASK, m_b, m_n,
    R, r_b, r_n,
    C, c_b, c_k,
    PLAN, LOGU, LOGV, NDONE,
    N, K, n_iters, scale, tol, check_every,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """One program = one problem; the padded (BLOCK_N, BLOCK_K) tile of y is loaded once and every
    iteration, the in-kernel early-stop check and the plan run on it.

    Grid: ``(B,)``, one program per problem, so B < the SM count (PixelCLIP's per-image (48, 128, 64))
    leaves SMs idle. Deliberately: a resident problem is at most ``RESIDENT_MAX_TILE`` elements, and
    every half-iteration needs the whole problem's row or column sums; spread over several blocks that
    is a grid-wide reduction per half-iteration (two launches, as the streaming path does), whose
    launch and global round trips cost more than the ~10 us one block spends on such a tile. Larger
    problems take the multi-program streaming path."""
    b = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_K)
    row_in = rows < N
    col_in = cols < K
    y = _load_y(S + b * s_b, s_n, s_k, rows, cols, row_in, col_in, scale)
    valid = _load_valid(MASK + b * m_b, m_n, rows, row_in)
    r = _load_mass(R + b * r_b, r_n, rows, row_in, valid)
    Lr = _log2_mass(r)
    c = tl.load(C + b * c_b + cols * c_k, mask=col_in, other=0.0).to(tl.float32)
    Lc = _log2_mass(c)
    U = LOGU + b * n_iters * N
    V = LOGV + b * n_iters * K

    # column step 1 from f^0 (0 on valid rows, -inf on masked ones)
    F = tl.where(valid, 0.0, float("-inf"))
    G = _dual(Lc, _col_lse(y + F[:, None]))
    tl.store(V + cols, G * _LN2, mask=col_in)

    # Iteration `it` = row step it + column step it + 1. A `for` with an `if` rather than a `while`
    # on the flag: Triton 3.x's layout pass mishandles an scf.while whose results drop a carried value.
    t = tl.full((), 1, tl.int32)  # iterations whose column step is done (n_done at the end)
    active = tl.full((), 1, tl.int32)
    for it in range(1, n_iters):
        if active != 0:
            p, shift, total = _row_stats(y + G[None, :])
            F = _dual(Lr, _finish_lse(shift, total))  # row step it
            tl.store(U + (it - 1) * N + rows, F * _LN2, mask=row_in)
            lse_c = _col_lse(y + F[:, None])  # column step it + 1 ...
            colsum = tl.exp2(G + lse_c)  # ... whose lse gives the plan's column sums after step it
            err = tl.max(tl.where(col_in, tl.abs(colsum - c), 0.0), axis=0)
            stop = (tol > 0) & (it % check_every == 0) & (err < tol)
            G = tl.where(stop, G, _dual(Lc, lse_c))
            tl.store(V + it * K + cols, G * _LN2, mask=col_in & (stop == 0))
            active = tl.where(stop, 0, 1)
            t = tl.where(stop, it, it + 1)

    # final row step (recomputed identically when the problem stopped) and the plan
    p, shift, total = _row_stats(y + G[None, :])
    F = _dual(Lr, _finish_lse(shift, total))
    q = p * tl.where(F > float("-inf"), r * _inv_or_zero(total), 0.0)[:, None]
    inside = row_in[:, None] & col_in[None, :]
    tl.store(PLAN + b * N * K + rows[:, None] * K + cols[None, :], q.to(PLAN.dtype.element_ty), mask=inside)
    for tt in range(t - 1, n_iters):  # the history repeats the final duals after n_done
        tl.store(U + tt * N + rows, F * _LN2, mask=row_in)
    for tt in range(t, n_iters):
        tl.store(V + tt * K + cols, G * _LN2, mask=col_in)
    tl.store(NDONE + b, t.to(tl.int64))


# --------------------------------------------------------------------------------------------------
# forward, streaming: row blocks, one pass per iteration, then a parallel plan launch
# --------------------------------------------------------------------------------------------------


@triton.jit
def _fold_cols_ws(WMAX, WSUM, cols, col_in, has_prev, z):
    """Merge block ``z`` into the column (max, sum) accumulators kept in global memory."""
    run_max = tl.load(WMAX + cols, mask=col_in & has_prev, other=float("-inf"))
    run_sum = tl.load(WSUM + cols, mask=col_in & has_prev, other=0.0)
    run_max, run_sum = _merge_cols(run_max, run_sum, z)
    tl.store(WMAX + cols, run_max, mask=col_in)
    tl.store(WSUM + cols, run_sum, mask=col_in)
    tl.debug_barrier()  # the next load of these columns may be done by other threads


@triton.jit
def _still_active(ACT, ERR, b, it, n_iters, n_kc, tol, check_every, BLOCK_KC: tl.constexpr):
    """Whether problem ``b`` runs pass ``it >= 1`` (row step ``it``): it ran pass ``it - 1`` (``ACT``)
    and the early-stop check after row step ``it - 1``, if there was one, did not stop it. The check's
    error is the max of the per-column-chunk partials ``ERR[b, it - 1, :]`` of the column phase."""
    prev = tl.load(ACT + b * n_iters + it - 1)
    checked = (tol > 0) & (it - 1 >= 1) & ((it - 1) % check_every == 0) & (prev != 0)
    err = tl.zeros((), tl.float32)
    if checked:
        offs0 = tl.arange(0, BLOCK_KC)
        for k0 in range(0, n_kc, BLOCK_KC):
            offs = k0 + offs0
            part = tl.load(ERR + (b * n_iters + it - 1) * n_kc + offs, mask=offs < n_kc, other=0.0)
            err = tl.maximum(err, tl.max(part, axis=0))
    return (prev != 0) & ((checked == 0) | (err >= tol))


@triton.jit
def _sinkhorn_fwd_rows_kernel(
    S, s_b, s_n, s_k,
    MASK, m_b, m_n,
    R, r_b, r_n,
    LOGU, GBUF, PMAX, PSUM, ACT, ERR,
    N, K, n_iters, it, rows_per_prog, n_kc, scale, tol, check_every,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_KC: tl.constexpr, ONE_CHUNK: tl.constexpr,
):  # fmt: skip
    """Pass ``it``, phase 1, grid ``(B, P)``: program ``p`` owns rows ``[p, p + 1) * rows_per_prog``,
    does their row step ``it`` (``it >= 1``, with the complete ``G^it``; pass 0 starts from ``f^0``)
    and writes their column ``(max, sum)`` of ``y + F^it`` to its slab ``PMAX / PSUM[b, p]``, the
    partials of column step ``it + 1``. A stopped problem's programs do nothing.

    Grid: ``B * P`` programs, ``P`` up to ``STREAM_TARGET_PROGRAMS // B`` but at most one per row
    block of ``BLOCK_N`` rows (``STREAM_TILE / BLOCK_K``): PixelCLIP's (1, 6144, 64) has 48 row blocks
    of 128 rows, so 48 programs; SwAV's (1, 4096, 3000) 256. Resources (ptxas, Triton 3.8, 16 warps):
    64-104 registers, no spill, 128 B-4 KiB shared memory on sm_80 and sm_90."""
    b = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1)
    n_prog = tl.num_programs(1)
    active = tl.full((), 1, tl.int32)
    if it > 0:
        active = _still_active(ACT, ERR, b, it, n_iters, n_kc, tol, check_every, BLOCK_KC).to(tl.int32)
        if p == 0:
            tl.store(ACT + b * n_iters + it, active)
    if active != 0:
        S += b * s_b
        MASK += b * m_b
        R += b * r_b
        U = LOGU + (b * n_iters + it - 1) * N
        GB = GBUF + ((it % 2) * tl.num_programs(0) + b) * K
        WMAX = PMAX + (b * n_prog + p) * K
        WSUM = PSUM + (b * n_prog + p) * K
        rows0 = tl.arange(0, BLOCK_N)
        cols0 = tl.arange(0, BLOCK_K)
        n_begin = p * rows_per_prog
        n_end = tl.minimum(N, n_begin + rows_per_prog)
        if ONE_CHUNK:
            col_in = cols0 < K
            G = tl.load(GB + cols0, mask=col_in & (it > 0), other=float("-inf"))
            run_max = tl.full((BLOCK_K,), float("-inf"), tl.float32)
            run_sum = tl.zeros((BLOCK_K,), tl.float32)
            for n0 in range(n_begin, n_end, BLOCK_N):
                rows = n0 + rows0
                row_in = rows < n_end
                y = _load_y(S, s_n, s_k, rows, cols0, row_in, col_in, scale)
                valid = _load_valid(MASK, m_n, rows, row_in)
                if it == 0:
                    F = tl.where(valid, 0.0, float("-inf"))
                else:
                    Lr = _log2_mass(_load_mass(R, r_n, rows, row_in, valid))
                    _p, shift, total = _row_stats(y + G[None, :])
                    F = _dual(Lr, _finish_lse(shift, total))  # row step it
                    tl.store(U + rows, F * _LN2, mask=row_in)
                run_max, run_sum = _merge_cols(run_max, run_sum, y + F[:, None])
            tl.store(WMAX + cols0, run_max, mask=col_in)
            tl.store(WSUM + cols0, run_sum, mask=col_in)
        else:
            for n0 in range(n_begin, n_end, BLOCK_N):
                rows = n0 + rows0
                row_in = rows < n_end
                valid = _load_valid(MASK, m_n, rows, row_in)
                if it == 0:
                    F = tl.where(valid, 0.0, float("-inf"))
                else:
                    Lr = _log2_mass(_load_mass(R, r_n, rows, row_in, valid))
                    row_max = tl.full((BLOCK_N,), float("-inf"), tl.float32)
                    row_sum = tl.zeros((BLOCK_N,), tl.float32)
                    for k0 in range(0, K, BLOCK_K):
                        cols = k0 + cols0
                        col_in = cols < K
                        y = _load_y(S, s_n, s_k, rows, cols, row_in, col_in, scale)
                        G = tl.load(GB + cols, mask=col_in, other=float("-inf"))
                        row_max, row_sum = _merge_rows(row_max, row_sum, y + G[None, :])
                    F = _dual(Lr, _finish_lse(_safe_shift(row_max), row_sum))  # row step it
                    tl.store(U + rows, F * _LN2, mask=row_in)
                for k0 in range(0, K, BLOCK_K):
                    cols = k0 + cols0
                    col_in = cols < K
                    y = _load_y(S, s_n, s_k, rows, cols, row_in, col_in, scale)
                    _fold_cols_ws(WMAX, WSUM, cols, col_in, n0 > n_begin, y + F[:, None])


@triton.jit
def _merge_col_parts(PMAX, PSUM, base, n_parts, K, cols, col_in, BLOCK: tl.constexpr):
    """Merge the ``n_parts`` row-slab partials ``(max, sum)`` at ``base + q * K + cols`` of the column
    logsumexp statistics (phase 2 of the streaming kernels' two-phase reductions)."""
    run_max = tl.full((BLOCK,), float("-inf"), tl.float32)
    run_sum = tl.zeros((BLOCK,), tl.float32)
    for q in range(0, n_parts):
        part = base + q * K + cols
        m = tl.load(PMAX + part, mask=col_in, other=float("-inf"))
        new_max = tl.maximum(run_max, m)
        shift = _safe_shift(new_max)
        part_sum = tl.load(PSUM + part, mask=col_in, other=0.0)
        run_sum = run_sum * tl.exp2(run_max - shift) + part_sum * tl.exp2(m - shift)
        run_max = new_max
    return run_max, run_sum


@triton.jit
def _sinkhorn_fwd_cols_kernel(
    C, c_b, c_k,
    LOGV, GBUF, PMAX, PSUM, ACT, ERR,
    K, n_iters, it, n_parts,
    BLOCK_KC: tl.constexpr,
):  # fmt: skip
    """Pass ``it``, phase 2, grid ``(B, n_kc)``: merges the ``n_parts`` row-slab partials of a column
    chunk into ``lse_i(y + F^it)``, forms ``G^{it+1}`` (column step ``it + 1``, into ``GBUF[(it + 1) %
    2]`` and ``log_v[it]``) and, for ``it >= 1``, the chunk's part of the early-stop error after row
    step ``it``, ``max_j |exp2(G^it_j + lse_j) - c_j|``, into ``ERR[b, it, chunk]``.

    Grid: ``B * cdiv(K, BLOCK_KC)`` programs, 1 for K = 64 and 3 for K = 3000 at B = 1: each merges
    ``P x BLOCK_KC`` partials (at most 264 x 1024 values), work too small to spread further; the
    iteration's time is in phase 1. 32-69 registers, no spill, under 1 KiB of shared memory."""
    b = tl.program_id(0).to(tl.int64)
    kc = tl.program_id(1)
    n_kc = tl.num_programs(1)
    if tl.load(ACT + b * n_iters + it) != 0:
        cols = kc * BLOCK_KC + tl.arange(0, BLOCK_KC)
        col_in = cols < K
        run_max, run_sum = _merge_col_parts(PMAX, PSUM, b * n_parts * K, n_parts, K, cols, col_in, BLOCK_KC)
        lse_c = _finish_lse(_safe_shift(run_max), run_sum)
        c = tl.load(C + b * c_b + cols * c_k, mask=col_in, other=0.0).to(tl.float32)
        G = _dual(_log2_mass(c), lse_c)
        n_b = tl.num_programs(0)
        tl.store(GBUF + (((it + 1) % 2) * n_b + b) * K + cols, G, mask=col_in)
        tl.store(LOGV + (b * n_iters + it) * K + cols, G * _LN2, mask=col_in)
        if it > 0:
            G_old = tl.load(GBUF + ((it % 2) * n_b + b) * K + cols, mask=col_in, other=float("-inf"))
            err = tl.max(tl.where(col_in, tl.abs(tl.exp2(G_old + lse_c) - c), 0.0), axis=0)
            tl.store(ERR + (b * n_iters + it) * n_kc + kc, err)


@triton.jit
def _sinkhorn_fwd_plan_kernel(
    S, s_b, s_n, s_k,
    MASK, m_b, m_n,
    R, r_b, r_n,
    PLAN, LOGU, LOGV, NDONE, GBUF, ACT, ERR,
    N, K, n_iters, n_kc, scale, tol, check_every,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_KC: tl.constexpr, ONE_CHUNK: tl.constexpr,
):  # fmt: skip
    """Grid (B, cdiv(N, BLOCK_N)): resolves ``n_done`` (the passes that ran, and the last check), then
    the final row step from ``G^{n_done}`` and the plan of one row block; fills log_u rows
    ``n_done - 1 ..`` with the final ``F``; the row block 0 program also writes ``n_done`` and
    repeats ``G^{n_done}`` in log_v rows ``n_done ..``.

    Grid: one program per row block of ``BLOCK_N`` rows (48 for PixelCLIP's (1, 6144, 64), 2048 for
    SwAV's). 56-64 registers, no spill, at most 512 B of shared memory on sm_80 and sm_90."""
    b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols0 = tl.arange(0, BLOCK_K)
    row_in = rows < N
    S += b * s_b
    PLAN += b * N * K
    n_done = _still_active(ACT, ERR, b, n_iters, n_iters, n_kc, tol, check_every, BLOCK_KC).to(tl.int32)
    for it in range(1, n_iters):
        n_done += tl.load(ACT + b * n_iters + it)
    GF = GBUF + ((n_done % 2) * tl.num_programs(0) + b) * K
    if tl.program_id(1) == 0:
        tl.store(NDONE + b, n_done.to(tl.int64))
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + cols0
            G = tl.load(GF + cols, mask=cols < K, other=float("-inf"))
            for tt in range(n_done, n_iters):
                tl.store(LOGV + (b * n_iters + tt) * K + cols, G * _LN2, mask=cols < K)
    r = _load_mass(R + b * r_b, r_n, rows, row_in, _load_valid(MASK + b * m_b, m_n, rows, row_in))
    Lr = _log2_mass(r)
    if ONE_CHUNK:
        col_in = cols0 < K
        y = _load_y(S, s_n, s_k, rows, cols0, row_in, col_in, scale)
        G = tl.load(GF + cols0, mask=col_in, other=float("-inf"))
        p, shift, total = _row_stats(y + G[None, :])
        F = _dual(Lr, _finish_lse(shift, total))
        q = p * tl.where(F > float("-inf"), r * _inv_or_zero(total), 0.0)[:, None]
        inside = row_in[:, None] & col_in[None, :]
        tl.store(PLAN + rows[:, None] * K + cols0[None, :], q.to(PLAN.dtype.element_ty), mask=inside)
    else:
        row_max = tl.full((BLOCK_N,), float("-inf"), tl.float32)
        row_sum = tl.zeros((BLOCK_N,), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + cols0
            col_in = cols < K
            y = _load_y(S, s_n, s_k, rows, cols, row_in, col_in, scale)
            G = tl.load(GF + cols, mask=col_in, other=float("-inf"))
            row_max, row_sum = _merge_rows(row_max, row_sum, y + G[None, :])
        shift = _safe_shift(row_max)
        F = _dual(Lr, _finish_lse(shift, row_sum))
        factor = tl.where(F > float("-inf"), r * _inv_or_zero(row_sum), 0.0)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + cols0
            col_in = cols < K
            y = _load_y(S, s_n, s_k, rows, cols, row_in, col_in, scale)
            G = tl.load(GF + cols, mask=col_in, other=float("-inf"))
            q = tl.exp2(y + G[None, :] - shift[:, None]) * factor[:, None]
            inside = row_in[:, None] & col_in[None, :]
            tl.store(PLAN + rows[:, None] * K + cols[None, :], q.to(PLAN.dtype.element_ty), mask=inside)
    U = LOGU + b * n_iters * N
    for tt in range(n_done - 1, n_iters):
        tl.store(U + tt * N + rows, F * _LN2, mask=row_in)


# --------------------------------------------------------------------------------------------------
# backward, resident: y and dx in registers, exact softmax recomputation
# --------------------------------------------------------------------------------------------------


@triton.jit
def _sinkhorn_bwd_resident_kernel(
    GR, g_b, g_n, g_k,
    S, s_b, s_n, s_k,
    MASK, m_b, m_n,
    R, r_b, r_n,
    LOGU, LOGV, NDONE, OUT,
    N, K, n_iters, scale, inv_eps,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """One program = one problem: ``T = n_done[b]`` reverse steps on the resident tile.

    Grid: ``(B,)``, one program per problem, for the reason the resident forward gives (each reverse
    step reduces over the whole problem; splitting it costs a grid-wide reduction per step)."""
    b = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_K)
    row_in = rows < N
    col_in = cols < K
    inside = row_in[:, None] & col_in[None, :]
    y = _load_y(S + b * s_b, s_n, s_k, rows, cols, row_in, col_in, scale)
    valid = _load_valid(MASK + b * m_b, m_n, rows, row_in)
    r = _load_mass(R + b * r_b, r_n, rows, row_in, valid)
    U = LOGU + b * n_iters * N
    V = LOGV + b * n_iters * K
    T = tl.load(NDONE + b).to(tl.int32)

    # Q from the final duals, as the forward formed it (r * row softmax of y + G^T)
    F_T = _load_dual(U + (T - 1) * N, rows, row_in)
    G_T = _load_dual(V + (T - 1) * K, cols, col_in)
    q = _row_softmax(y + G_T[None, :]) * tl.where(F_T > float("-inf"), r, 0.0)[:, None]
    gr = tl.load(GR + b * g_b + rows[:, None] * g_n + cols[None, :] * g_k, mask=inside, other=0.0)
    dx = gr.to(tl.float32) * q
    fb = tl.sum(dx, axis=1)
    gg = tl.sum(dx, axis=0)
    F0 = tl.where(valid, 0.0, float("-inf"))
    for s in range(0, T):
        t = T - s
        G_t = _load_dual(V + (t - 1) * K, cols, col_in)
        F_t = _load_dual(U + (t - 1) * N, rows, row_in)
        F_p = tl.where(t > 1, _load_dual(U + (t - 2) * N, rows, row_in & (t > 1)), F0)
        # row step t
        a = _row_softmax(y + G_t[None, :])
        a = tl.where(F_t[:, None] > float("-inf"), a, 0.0)
        fa = fb[:, None] * a
        dx -= fa
        gg -= tl.sum(fa, axis=0)
        # column step t
        bm = _col_softmax(y + F_p[:, None])
        bm = tl.where(G_t[None, :] > float("-inf"), bm, 0.0)
        gb = gg[None, :] * bm
        dx -= gb
        fb = -tl.sum(gb, axis=1)
        gg = tl.zeros((BLOCK_K,), tl.float32)
    tl.store(OUT + b * N * K + rows[:, None] * K + cols[None, :], (dx * inv_eps).to(OUT.dtype.element_ty), mask=inside)


# --------------------------------------------------------------------------------------------------
# backward, streaming: vector recursion (one program per problem) + parallel gradient launch
# --------------------------------------------------------------------------------------------------


@triton.jit
def _log2_sum_or_inf(total, active):
    """log2 of a softmax denominator; +inf where the slice is inactive, so that
    ``exp2(z - shift - log_sum)`` is 0 there without a select."""
    ok = active & (total > 0)
    return tl.where(ok, tl.log2(tl.where(ok, total, 1.0)), float("inf"))


@triton.jit
def _dual_at(U, t, N, rows, row_in, valid):
    """``F^t`` in base 2: the saved ``log_u[t - 1]`` for t >= 1, ``f^0`` (0 / -inf masked) for t = 0."""
    saved = _load_dual(U + (t - 1) * N, rows, row_in & (t > 0))
    return tl.where(t > 0, saved, tl.where(valid, 0.0, float("-inf")))


@triton.jit
def _add_cols_ws(W, cols, col_in, has_prev, delta):
    """``W[cols] += delta`` (``W[cols] = delta`` for the first row block) in global memory."""
    acc = tl.load(W + cols, mask=col_in & has_prev, other=0.0)
    tl.store(W + cols, acc + delta, mask=col_in)
    tl.debug_barrier()  # the next load of these columns may be done by other threads


@triton.jit
def _finish_cols_ws(WMAX, WSUM, cols, col_in, active):
    """Turn the raw column (max, sum) accumulators into (shift, log2 sum or +inf), in place."""
    run_max = tl.load(WMAX + cols, mask=col_in, other=float("-inf"))
    run_sum = tl.load(WSUM + cols, mask=col_in, other=0.0)
    tl.debug_barrier()  # all loads of this chunk before any store
    tl.store(WMAX + cols, _safe_shift(run_max), mask=col_in)
    tl.store(WSUM + cols, _log2_sum_or_inf(run_sum, active), mask=col_in)


@triton.jit
def _sinkhorn_bwd_rows_kernel(
    GR, g_b, g_n, g_k,
    S, s_b, s_n, s_k,
    MASK, m_b, m_n,
    R, r_b, r_n,
    LOGU, LOGV, NDONE, FB, GG, RM, RS, CM, CS, PACC, PMAX, PSUM,
    N, K, n_iters, st, rows_per_prog, scale,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ONE_CHUNK: tl.constexpr,
):  # fmt: skip
    """Stage ``st`` of the backward recursion, phase 1, grid ``(B, P)``, for index ``j = T - 1 - st``
    (``T = n_done[b]``; a problem with ``j < 0`` is done). Program ``p`` owns rows
    ``[p, p + 1) * rows_per_prog``; per row block:

    * ``Fb^{j+1}`` (``FB[j]``): stage 0 starts the recursion, ``Fb^T = rowsum(Gr Q)``; a later stage
      is column step ``j + 2``, ``Fb^{j+1} = -rowsum(Gg^{j+2} B^{j+2})`` from the complete ``GG``,
      ``CM``, ``CS`` rows ``j + 1`` of the previous stage;
    * the statistics of row step ``j + 1``, ``A = softmax2_j(y + G^{j+1})`` (``RM``/``RS[j]``);
    * partials (slab ``p`` of ``PACC``/``PMAX``/``PSUM``, (B, P, K)) of ``Gg^{j+1}``
      (``colsum(Gr Q) - colsum(Fb A)`` at stage 0, ``-colsum(Fb A)`` later) and of the column
      statistics of ``softmax2_i(y + F^j)``, which phase 2 merges.

    Grid: as the forward's row phase, ``B * P`` programs, at most one per row block (48 for
    PixelCLIP's (1, 6144, 64), 256 for SwAV's (1, 4096, 3000)). 101-128 registers, no spill, 128 B-4 KiB
    of shared memory (16 warps) on sm_80 and sm_90.
    """
    b = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1)
    j = tl.load(NDONE + b).to(tl.int32) - 1 - st
    if j >= 0:
        n_prog = tl.num_programs(1)
        GR += b * g_b
        S += b * s_b
        MASK += b * m_b
        R += b * r_b
        hu = b * n_iters * N
        U = LOGU + hu
        FB += hu + j * N
        RM += hu + j * N
        RS += hu + j * N
        V = LOGV + (b * n_iters + j) * K  # G^{j+1}
        GG += (b * n_iters + j + 1) * K  # row j + 1 (stages >= 1)
        CM += (b * n_iters + j + 1) * K
        CS += (b * n_iters + j + 1) * K
        WACC = PACC + (b * n_prog + p) * K
        WMAX = PMAX + (b * n_prog + p) * K
        WSUM = PSUM + (b * n_prog + p) * K
        rows0 = tl.arange(0, BLOCK_N)
        cols0 = tl.arange(0, BLOCK_K)
        n_begin = p * rows_per_prog
        n_end = tl.minimum(N, n_begin + rows_per_prog)
        if ONE_CHUNK:
            col_in = cols0 < K
            G = _load_dual(V, cols0, col_in)
            gg = tl.load(GG + cols0, mask=col_in & (st > 0), other=0.0)
            c_shift = tl.load(CM + cols0, mask=col_in & (st > 0), other=0.0)
            c_log_sum = tl.load(CS + cols0, mask=col_in & (st > 0), other=float("inf"))
            acc = tl.zeros((BLOCK_K,), tl.float32)
            c_max = tl.full((BLOCK_K,), float("-inf"), tl.float32)
            c_sum = tl.zeros((BLOCK_K,), tl.float32)
            for n0 in range(n_begin, n_end, BLOCK_N):
                rows = n0 + rows0
                row_in = rows < n_end
                valid = _load_valid(MASK, m_n, rows, row_in)
                y = _load_y(S, s_n, s_k, rows, cols0, row_in, col_in, scale)
                F_j = _dual_at(U, j, N, rows, row_in, valid)
                F_j1 = _dual_at(U, j + 1, N, rows, row_in, valid)
                e, shift, total = _row_stats(y + G[None, :])
                log_sum = _log2_sum_or_inf(total, F_j1 > float("-inf"))
                a = e * tl.exp2(-log_sum)[:, None]
                if st == 0:
                    inside = row_in[:, None] & col_in[None, :]
                    gr = tl.load(GR + rows[:, None] * g_n + cols0[None, :] * g_k, mask=inside, other=0.0)
                    r = _load_mass(R, r_n, rows, row_in, valid)
                    gq = gr.to(tl.float32) * a * r[:, None]  # Gr * Q
                    fb = tl.sum(gq, axis=1)
                    acc += tl.sum(gq - fb[:, None] * a, axis=0)
                else:
                    bm = tl.exp2(y + F_j1[:, None] - c_shift[None, :] - c_log_sum[None, :])
                    fb = -tl.sum(gg[None, :] * bm, axis=1)
                    acc -= tl.sum(fb[:, None] * a, axis=0)
                tl.store(FB + rows, fb, mask=row_in)
                tl.store(RM + rows, shift, mask=row_in)
                tl.store(RS + rows, log_sum, mask=row_in)
                c_max, c_sum = _merge_cols(c_max, c_sum, y + F_j[:, None])
            tl.store(WACC + cols0, acc, mask=col_in)
            tl.store(WMAX + cols0, c_max, mask=col_in)
            tl.store(WSUM + cols0, c_sum, mask=col_in)
        else:
            for n0 in range(n_begin, n_end, BLOCK_N):
                rows = n0 + rows0
                row_in = rows < n_end
                has_prev = n0 > n_begin
                valid = _load_valid(MASK, m_n, rows, row_in)
                F_j = _dual_at(U, j, N, rows, row_in, valid)
                F_j1 = _dual_at(U, j + 1, N, rows, row_in, valid)
                r_max = tl.full((BLOCK_N,), float("-inf"), tl.float32)
                r_sum = tl.zeros((BLOCK_N,), tl.float32)
                for k0 in range(0, K, BLOCK_K):
                    cols = k0 + cols0
                    col_in = cols < K
                    y = _load_y(S, s_n, s_k, rows, cols, row_in, col_in, scale)
                    r_max, r_sum = _merge_rows(r_max, r_sum, y + _load_dual(V, cols, col_in)[None, :])
                    _fold_cols_ws(WMAX, WSUM, cols, col_in, has_prev, y + F_j[:, None])
                shift = _safe_shift(r_max)
                log_sum = _log2_sum_or_inf(r_sum, F_j1 > float("-inf"))
                fb = tl.zeros((BLOCK_N,), tl.float32)
                for k0 in range(0, K, BLOCK_K):
                    cols = k0 + cols0
                    col_in = cols < K
                    y = _load_y(S, s_n, s_k, rows, cols, row_in, col_in, scale)
                    if st == 0:
                        inside = row_in[:, None] & col_in[None, :]
                        a = tl.exp2(y + _load_dual(V, cols, col_in)[None, :] - shift[:, None] - log_sum[:, None])
                        gr = tl.load(GR + rows[:, None] * g_n + cols[None, :] * g_k, mask=inside, other=0.0)
                        gq = gr.to(tl.float32) * a * _load_mass(R, r_n, rows, row_in, valid)[:, None]
                        fb += tl.sum(gq, axis=1)
                        _add_cols_ws(WACC, cols, col_in, has_prev, tl.sum(gq, axis=0))
                    else:
                        gg = tl.load(GG + cols, mask=col_in, other=0.0)
                        c_shift = tl.load(CM + cols, mask=col_in, other=0.0)
                        c_log_sum = tl.load(CS + cols, mask=col_in, other=float("inf"))
                        bm = tl.exp2(y + F_j1[:, None] - c_shift[None, :] - c_log_sum[None, :])
                        fb -= tl.sum(gg[None, :] * bm, axis=1)
                for k0 in range(0, K, BLOCK_K):
                    cols = k0 + cols0
                    col_in = cols < K
                    y = _load_y(S, s_n, s_k, rows, cols, row_in, col_in, scale)
                    a = tl.exp2(y + _load_dual(V, cols, col_in)[None, :] - shift[:, None] - log_sum[:, None])
                    _add_cols_ws(WACC, cols, col_in, has_prev | (st == 0), -tl.sum(fb[:, None] * a, axis=0))
                tl.store(FB + rows, fb, mask=row_in)
                tl.store(RM + rows, shift, mask=row_in)
                tl.store(RS + rows, log_sum, mask=row_in)


@triton.jit
def _sinkhorn_bwd_cols_kernel(
    LOGV, NDONE, GG, CM, CS, PACC, PMAX, PSUM,
    K, n_iters, st, n_parts,
    BLOCK_KC: tl.constexpr,
):  # fmt: skip
    """Stage ``st``, phase 2, grid ``(B, n_kc)``: merges the row-slab partials of a column chunk into
    ``Gg^{j+1}`` (``GG[j]``) and the (shift, log2-sum) of ``softmax2_i(y + F^j)`` (``CM``/``CS[j]``,
    log2-sum ``+inf`` on columns with ``G^{j+1} = -inf``), ``j = n_done[b] - 1 - st``.

    Grid: ``B * cdiv(K, BLOCK_KC)``, a merge of ``P x BLOCK_KC`` partials, as the forward's column
    phase (few programs because the work is that small). 32-56 registers, no spill, no shared memory."""
    b = tl.program_id(0).to(tl.int64)
    j = tl.load(NDONE + b).to(tl.int32) - 1 - st
    if j >= 0:
        cols = tl.program_id(1) * BLOCK_KC + tl.arange(0, BLOCK_KC)
        col_in = cols < K
        base = b * n_parts * K
        acc = tl.zeros((BLOCK_KC,), tl.float32)
        for q in range(0, n_parts):
            acc += tl.load(PACC + base + q * K + cols, mask=col_in, other=0.0)
        c_max, c_sum = _merge_col_parts(PMAX, PSUM, base, n_parts, K, cols, col_in, BLOCK_KC)
        G = _load_dual(LOGV + (b * n_iters + j) * K, cols, col_in)
        out = (b * n_iters + j) * K + cols
        tl.store(GG + out, acc, mask=col_in)
        tl.store(CM + out, _safe_shift(c_max), mask=col_in)
        tl.store(CS + out, _log2_sum_or_inf(c_sum, G > float("-inf")), mask=col_in)


@triton.jit
def _sinkhorn_bwd_grad_kernel(
    GR, g_b, g_n, g_k,
    S, s_b, s_n, s_k,
    MASK, m_b, m_n,
    R, r_b, r_n,
    LOGU, LOGV, NDONE, FB, GG, RM, RS, CM, CS, OUT,
    N, K, n_iters, scale, inv_eps,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Grid (B, cdiv(N, BLOCK_N)): ``dx = Gr Q - sum_t (Fb^t A^t + Gg^t B^t)`` of one row block from
    the recursion's workspaces, written once as ``dx / epsilon`` in the output dtype."""
    b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols0 = tl.arange(0, BLOCK_K)
    row_in = rows < N
    GR += b * g_b
    S += b * s_b
    OUT += b * N * K
    hu = b * n_iters * N
    hv = b * n_iters * K
    U = LOGU + hu
    V = LOGV + hv
    FB += hu
    RM += hu
    RS += hu
    GG += hv
    CM += hv
    CS += hv
    valid = _load_valid(MASK + b * m_b, m_n, rows, row_in)
    r = _load_mass(R + b * r_b, r_n, rows, row_in, valid)
    F0 = tl.where(valid, 0.0, float("-inf"))
    T = tl.load(NDONE + b).to(tl.int32)
    shift_T = tl.load(RM + (T - 1) * N + rows, mask=row_in, other=0.0)
    log_sum_T = tl.load(RS + (T - 1) * N + rows, mask=row_in, other=float("inf"))
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + cols0
        col_in = cols < K
        inside = row_in[:, None] & col_in[None, :]
        y = _load_y(S, s_n, s_k, rows, cols, row_in, col_in, scale)
        G_T = _load_dual(V + (T - 1) * K, cols, col_in)
        gr = tl.load(GR + rows[:, None] * g_n + cols[None, :] * g_k, mask=inside, other=0.0)
        q = tl.exp2(y + G_T[None, :] - shift_T[:, None] - log_sum_T[:, None]) * r[:, None]
        dx = gr.to(tl.float32) * q
        F_p = F0
        for t in range(1, T + 1):
            G_t = _load_dual(V + (t - 1) * K, cols, col_in)
            shift = tl.load(RM + (t - 1) * N + rows, mask=row_in, other=0.0)
            log_sum = tl.load(RS + (t - 1) * N + rows, mask=row_in, other=float("inf"))
            c_shift = tl.load(CM + (t - 1) * K + cols, mask=col_in, other=0.0)
            c_log_sum = tl.load(CS + (t - 1) * K + cols, mask=col_in, other=float("inf"))
            fb = tl.load(FB + (t - 1) * N + rows, mask=row_in, other=0.0)
            gg = tl.load(GG + (t - 1) * K + cols, mask=col_in, other=0.0)
            a = tl.exp2(y + G_t[None, :] - shift[:, None] - log_sum[:, None])
            bm = tl.exp2(y + F_p[:, None] - c_shift[None, :] - c_log_sum[None, :])
            dx -= fb[:, None] * a + gg[None, :] * bm
            F_p = _load_dual(U + (t - 1) * N, rows, row_in)
        tl.store(OUT + rows[:, None] * K + cols[None, :], (dx * inv_eps).to(OUT.dtype.element_ty), mask=inside)


# --------------------------------------------------------------------------------------------------
# host launchers
# --------------------------------------------------------------------------------------------------


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _resident_warps(tile: int) -> int:
    """About 16 elements per thread and tile, 1 .. 16 warps (untuned: no GPU to tune on yet)."""
    return max(1, min(16, _pow2(tile // 512)))


def _stream_warps(tile: int) -> int:
    """Same 16 elements per thread; the one-chunk loops also keep 3 (forward) to 7 (backward)
    BLOCK_K-vectors live, which 16 warps keep at 8 registers each for BLOCK_K = 4096."""
    return max(1, min(16, _pow2(tile // 512)))


def _stream_blocks(n: int, k: int, block_n: int | None, block_k: int | None) -> tuple[int, int, bool]:
    bk = _pow2(block_k) if block_k else min(_pow2(k), STREAM_MAX_BLOCK_K)
    bn = _pow2(block_n) if block_n else max(1, min(_pow2(n), STREAM_TILE // bk))
    return bn, bk, bk >= k


def _stream_split(b: int, n: int, k: int, bn: int, parts: int | None) -> tuple[int, int, int]:
    """How the streaming kernels split each problem: row blocks per row-phase program, programs per
    problem (about ``parts`` or ``STREAM_TARGET_PROGRAMS`` over the batch, at most one per row block),
    and the column chunk of the column phase."""
    n_blocks = triton.cdiv(n, bn)
    per_prog = triton.cdiv(n_blocks, min(n_blocks, max(1, (parts or STREAM_TARGET_PROGRAMS) // b)))
    return per_prog, triton.cdiv(n_blocks, per_prog), min(_pow2(k), STREAM_COLS_BLOCK)


class _Streaming(NamedTuple):
    """The streaming kernels' launch geometry, shared by forward and backward."""

    bn: int  # BLOCK_N
    bk: int  # BLOCK_K
    one_chunk: bool  # BLOCK_K covers K
    per_prog: int  # row blocks per row-phase program
    n_parts: int  # row-phase programs per problem
    bkc: int  # column chunk of the column phase
    warps: int


def _streaming(b: int, n: int, k: int, block_n: int | None, block_k: int | None, parts: int | None) -> _Streaming:
    bn, bk, one_chunk = _stream_blocks(n, k, block_n, block_k)
    per_prog, n_parts, bkc = _stream_split(b, n, k, bn, parts)
    return _Streaming(bn, bk, one_chunk, per_prog, n_parts, bkc, _stream_warps(bn * bk))


def _strided(*tensors: Tensor) -> tuple:
    """Each tensor followed by its strides: the kernels take pointers and strides in that order."""
    return tuple(x for t in tensors for x in (t, *t.stride()))


def _choose(variant: str | None, tile: int, limit: int) -> str:
    if variant is None:
        return "resident" if tile <= limit else "streaming"
    if variant not in ("resident", "streaming"):
        raise ValueError(f"variant must be None, 'resident' or 'streaming', got {variant!r}")
    return variant


def _check_inputs(scores: Tensor, mask: Tensor, row_marginals: Tensor, col_marginals: Tensor, epsilon: float):
    if scores.dim() != 3:
        raise ValueError(f"scores must be (B, N, K), got shape {tuple(scores.shape)}")
    if scores.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"the Triton Sinkhorn kernels take float32/float16/bfloat16 scores, got {scores.dtype}")
    b, n, k = scores.shape
    if tuple(mask.shape) != (b, n) or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor of shape {(b, n)}, got {mask.dtype} {tuple(mask.shape)}")
    if tuple(row_marginals.shape) != (b, n) or tuple(col_marginals.shape) != (b, k):
        got = f"{tuple(row_marginals.shape)} and {tuple(col_marginals.shape)}"
        raise ValueError(f"marginals must be {(b, n)} and {(b, k)}, got {got}")
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")


def _as_float(t: Tensor) -> Tensor:
    return t if t.is_floating_point() else t.float()


def _empty_forward(scores, col_marginals, n_iters, tol, check_every, plan, log_u, log_v, n_done):
    """N == 0 or K == 0: no mass can move, every dual is -inf (log of a mass minus the logsumexp of an
    empty set) and the plan is empty; the early-stop error is max_j |0 - c_j| (0 when K == 0)."""
    log_u.fill_(float("-inf"))
    log_v.fill_(float("-inf"))
    n_done.fill_(n_iters)
    b, _, k = scores.shape
    if tol > 0 and check_every < n_iters and b > 0:
        if k > 0:
            err = col_marginals.float().abs().amax(dim=1)
        else:
            err = torch.zeros(b, device=scores.device)
        n_done.masked_fill_(err < tol, check_every)
    return plan, log_u, log_v, n_done


def sinkhorn_forward(
    scores: Tensor,
    mask: Tensor,
    row_marginals: Tensor,
    col_marginals: Tensor,
    epsilon: float,
    n_iters: int,
    tol: float,
    check_every: int,
    *,
    variant: str | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    parts: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Batched Sinkhorn-Knopp forward: ``(plan, log_u, log_v, n_done)`` as ``sinkhorn_forward_reference``.

    scores (B, N, K) float32/float16/bfloat16, any strides; mask (B, N) bool; row_marginals (B, N)
    and col_marginals (B, K), float (any strides). ``tol <= 0`` disables early stopping. Returns the
    plan (B, N, K) in ``scores.dtype`` (contiguous), log_u (B, n_iters, N) and log_v (B, n_iters, K)
    float32, n_done (B,) int64.

    ``variant``: ``None`` picks ``"resident"`` when the padded tile has at most
    ``RESIDENT_MAX_TILE_FWD`` elements, else ``"streaming"``; a string forces it. ``block_n`` /
    ``block_k`` override the streaming block sizes (testing knobs: ``block_k < K`` exercises the
    multi-chunk path); ``parts`` the number of row-slab programs per problem the streaming passes
    aim at over the whole batch (default ``STREAM_TARGET_PROGRAMS``).
    """
    _check_inputs(scores, mask, row_marginals, col_marginals, epsilon)
    n_iters = int(n_iters)
    if n_iters < 1:
        raise ValueError(f"n_iters must be >= 1, got {n_iters}")
    tol = float(tol)
    if tol > 0:
        check_every = int(check_every)
        if check_every < 1:
            raise ValueError(f"check_every must be >= 1, got {check_every}")
    else:
        tol, check_every = 0.0, 1
    b, n, k = scores.shape
    dev = scores.device
    plan = torch.empty((b, n, k), dtype=scores.dtype, device=dev)
    log_u = torch.empty((b, n_iters, n), dtype=torch.float32, device=dev)
    log_v = torch.empty((b, n_iters, k), dtype=torch.float32, device=dev)
    n_done = torch.empty((b,), dtype=torch.int64, device=dev)
    if b == 0 or n == 0 or k == 0:
        return _empty_forward(scores, col_marginals, n_iters, tol, check_every, plan, log_u, log_v, n_done)

    mask_u8 = mask.view(torch.uint8)
    rows = _as_float(row_marginals)
    cols = _as_float(col_marginals)
    scale = LOG2E / float(epsilon)
    args = _strided(scores, mask_u8, rows)
    bn_r, bk_r = _pow2(n), _pow2(k)
    if _choose(variant, bn_r * bk_r, RESIDENT_MAX_TILE_FWD) == "resident":
        _sinkhorn_fwd_resident_kernel[(b,)](
            *args, *_strided(cols),
            plan, log_u, log_v, n_done,
            n, k, n_iters, scale, tol, check_every,
            BLOCK_N=bn_r, BLOCK_K=bk_r, num_warps=_resident_warps(bn_r * bk_r),
        )  # fmt: skip
        return plan, log_u, log_v, n_done

    bn, bk, one_chunk, per_prog, n_parts, bkc, warps = _streaming(b, n, k, block_n, block_k, parts)
    n_blocks = triton.cdiv(n, bn)
    n_kc = triton.cdiv(k, bkc)
    f32 = dict(dtype=torch.float32, device=dev)
    g_buf = torch.empty((2, b, k), **f32)
    p_max = torch.empty((b, n_parts, k), **f32)
    p_sum = torch.empty((b, n_parts, k), **f32)
    err = torch.empty((b, n_iters, n_kc), **f32)
    act = torch.zeros((b, n_iters), dtype=torch.int32, device=dev)
    act[:, 0] = 1
    for it in range(n_iters):
        _sinkhorn_fwd_rows_kernel[(b, n_parts)](
            *args,
            log_u, g_buf, p_max, p_sum, act, err,
            n, k, n_iters, it, per_prog * bn, n_kc, scale, tol, check_every,
            BLOCK_N=bn, BLOCK_K=bk, BLOCK_KC=bkc, ONE_CHUNK=one_chunk, num_warps=warps,
        )  # fmt: skip
        _sinkhorn_fwd_cols_kernel[(b, n_kc)](
            *_strided(cols),
            log_v, g_buf, p_max, p_sum, act, err,
            k, n_iters, it, n_parts,
            BLOCK_KC=bkc, num_warps=4,
        )  # fmt: skip
    _sinkhorn_fwd_plan_kernel[(b, n_blocks)](
        *args,
        plan, log_u, log_v, n_done, g_buf, act, err,
        n, k, n_iters, n_kc, scale, tol, check_every,
        BLOCK_N=bn, BLOCK_K=bk, BLOCK_KC=bkc, ONE_CHUNK=one_chunk, num_warps=warps,
    )  # fmt: skip
    return plan, log_u, log_v, n_done


def sinkhorn_backward(
    grad_plan: Tensor,
    scores: Tensor,
    mask: Tensor,
    row_marginals: Tensor,
    col_marginals: Tensor,
    log_u: Tensor,
    log_v: Tensor,
    n_done: Tensor,
    epsilon: float,
    *,
    variant: str | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    parts: int | None = None,
) -> Tensor:
    """Gradient w.r.t. ``scores`` of the unrolled loop, as ``sinkhorn_backward_reference``.

    ``log_u``, ``log_v`` and ``n_done`` are the forward's outputs (``n_done >= 1``); ``grad_plan``
    (B, N, K) any float dtype and strides. Returns (B, N, K) in ``scores.dtype`` (contiguous).
    ``col_marginals`` is only shape-checked: the column masses enter through the saved duals
    (``row_marginals`` scales the recomputed plan). ``variant=None`` picks ``"resident"`` up to
    ``RESIDENT_MAX_TILE_BWD`` padded elements; ``block_n`` / ``block_k`` / ``parts`` as in the forward.
    """
    _check_inputs(scores, mask, row_marginals, col_marginals, epsilon)
    b, n, k = scores.shape
    if tuple(grad_plan.shape) != (b, n, k):
        raise ValueError(f"grad_plan must have shape {(b, n, k)}, got {tuple(grad_plan.shape)}")
    n_iters = log_u.shape[1]
    if tuple(log_u.shape) != (b, n_iters, n) or tuple(log_v.shape) != (b, n_iters, k) or tuple(n_done.shape) != (b,):
        raise ValueError("log_u, log_v and n_done must be the forward's (B, T, N), (B, T, K) and (B,) outputs")
    dev = scores.device
    grad = torch.empty((b, n, k), dtype=scores.dtype, device=dev)
    if b == 0 or n == 0 or k == 0:
        return grad.zero_()
    log_u = log_u.float().contiguous()
    log_v = log_v.float().contiguous()
    n_done = n_done.to(torch.int64).contiguous()
    mask_u8 = mask.view(torch.uint8)
    rows = _as_float(row_marginals)  # the column masses enter only through the saved duals
    scale = LOG2E / float(epsilon)
    inv_eps = 1.0 / float(epsilon)
    args = _strided(grad_plan, scores, mask_u8, rows)
    bn_r, bk_r = _pow2(n), _pow2(k)
    if _choose(variant, bn_r * bk_r, RESIDENT_MAX_TILE_BWD) == "resident":
        _sinkhorn_bwd_resident_kernel[(b,)](
            *args,
            log_u, log_v, n_done, grad,
            n, k, n_iters, scale, inv_eps,
            BLOCK_N=bn_r, BLOCK_K=bk_r, num_warps=_resident_warps(bn_r * bk_r),
        )  # fmt: skip
        return grad

    bn, bk, one_chunk, per_prog, n_parts, bkc, warps = _streaming(b, n, k, block_n, block_k, parts)
    ws_rows = torch.empty((3, b, n_iters, n), dtype=torch.float32, device=dev)  # Fb, row shift, row log-sum
    ws_cols = torch.empty((3, b, n_iters, k), dtype=torch.float32, device=dev)  # Gg, col shift, col log-sum
    partials = torch.empty((3, b, n_parts, k), dtype=torch.float32, device=dev)  # Gg, col max, col sum
    for st in range(n_iters):  # stage st runs the problems with n_done > st
        _sinkhorn_bwd_rows_kernel[(b, n_parts)](
            *args,
            log_u, log_v, n_done, ws_rows[0], ws_cols[0], ws_rows[1], ws_rows[2], ws_cols[1], ws_cols[2],
            partials[0], partials[1], partials[2],
            n, k, n_iters, st, per_prog * bn, scale,
            BLOCK_N=bn, BLOCK_K=bk, ONE_CHUNK=one_chunk, num_warps=warps,
        )  # fmt: skip
        _sinkhorn_bwd_cols_kernel[(b, triton.cdiv(k, bkc))](
            log_v, n_done, ws_cols[0], ws_cols[1], ws_cols[2], partials[0], partials[1], partials[2],
            k, n_iters, st, n_parts,
            BLOCK_KC=bkc, num_warps=4,
        )  # fmt: skip
    # The gradient pass has no reduction across rows: rows blocks as small as it takes to give every
    # SM a program (PixelCLIP's (1, 6144, 64): 192 blocks of 32 rows, not 48 of 128), which also keeps
    # the float32 tile's registers from spilling.
    bn_grad = bn
    while bn_grad > 8 and b * triton.cdiv(n, bn_grad) < num_sms(dev):
        bn_grad //= 2
    _sinkhorn_bwd_grad_kernel[(b, triton.cdiv(n, bn_grad))](
        *args,
        log_u, log_v, n_done, ws_rows[0], ws_cols[0], ws_rows[1], ws_rows[2], ws_cols[1], ws_cols[2], grad,
        n, k, n_iters, scale, inv_eps,
        BLOCK_N=bn_grad, BLOCK_K=bk, num_warps=_stream_warps(bn_grad * bk),
    )  # fmt: skip
    return grad
