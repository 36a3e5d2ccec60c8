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
* ``streaming``: for tiles that do not fit (SwAV: N=4096, K=3000). One program per problem runs
  the iteration loop over row blocks of ``BLOCK_N`` rows; each iteration is ONE pass over the
  scores: per row block, the row step of iteration ``t`` (row-local: needs the complete ``G^t``) is
  followed at once by the online column logsumexp of iteration ``t + 1`` with the fresh ``F^t``
  (running max / rescaled sum per column, merged block by block). ``F`` never needs to be stored
  (other than in the history); ``G`` is a register vector when the padded K fits one column chunk
  (``BLOCK_K <= STREAM_MAX_BLOCK_K`` = 4096, the common case) and otherwise lives in a global
  workspace, as do the column accumulators, which are then read-modified-written per (row block,
  column chunk) with a CTA barrier (``tl.debug_barrier``: bar.sync also orders global memory
  within the CTA) between a store and the next load, since the compiler may give the load and the
  store different thread layouts. The final row step and the plan write are a separate,
  fully parallel launch (grid ``(B, cdiv(N, BLOCK_N))``) from the final ``G`` (kept in base 2 in a
  workspace, so the recomputed ``F`` is bit-identical to a continuation of the loop).

  One program per problem leaves most of a GPU idle when B is small (SwAV runs B=1): each
  iteration is then bounded by one SM. The way to split one problem across ``P`` programs is a
  two-phase reduction per iteration: phase 1, grid ``(B, P)``, program ``p`` owns a slab of row
  blocks, does their row steps with the complete ``G`` and writes its partial column
  ``(max, sum)`` to a ``(B, P, K)`` workspace; phase 2, grid ``(B, cdiv(K, BLOCK_K))``, merges the
  ``P`` partials, forms ``G`` and a per-chunk partial of the early-stop error. Early stopping stays
  on device: a per-problem ``active`` flag in global memory (set by the next phase 1 from the chunk
  errors) makes the programs of a stopped problem return at once; the host launches all
  ``2 * n_iters`` phases without reading anything back (and can capture them in a CUDA graph).
  That is not implemented here.

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
* ``streaming``: two launches. (1) One program per problem runs the vector recursion (``Fb``,
  ``Gg``), one pass over the row blocks per iteration: per row block, column step ``t`` gives the
  block's ``Fb^{t-1}`` (row-local), which at once feeds row step ``t - 1`` (its row softmax and its
  column sums into ``Gg^{t-1}``). The column softmax of column step ``t - 1`` needs all rows, so its
  statistics are accumulated online one pass ahead (a third ``exp2`` per element). Every ``Fb^t``,
  ``Gg^t`` and the softmax statistics, kept as a (shift, log2-sum) pair, go to ``(B, T, N)`` /
  ``(B, T, K)`` float32 workspaces. (2) A fully parallel launch over row blocks forms
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
reductions are owned by one program).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

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
    iteration, the in-kernel early-stop check and the plan run on it."""
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
def _sinkhorn_fwd_stream_kernel(
    S, s_b, s_n, s_k,
    MASK, m_b, m_n,
    R, r_b, r_n,
    C, c_b, c_k,
    LOGU, LOGV, NDONE, GFIN, WS_MAX, WS_SUM,
    N, K, n_iters, scale, tol, check_every,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ONE_CHUNK: tl.constexpr,
):  # fmt: skip
    """One program = one problem: the iteration loop, one pass over the row blocks per iteration.

    Pass ``t`` does, per row block, row step ``t`` (with the complete ``G^t``) and folds the block
    into the online column logsumexp of column step ``t + 1`` with the fresh ``F^t``. Writes log_v
    (whole history), log_u rows ``0 .. n_done - 2`` (the final row step is recomputed by the plan
    kernel, which writes the rest), n_done and the final ``G`` in base 2 (``GFIN``, (B, K)).
    ``ONE_CHUNK`` (K fits one BLOCK_K chunk): ``G`` and the column accumulators are register
    vectors. Otherwise the rows are swept chunk by chunk (online row logsumexp), ``G`` lives in
    ``GFIN`` and the column accumulators in ``WS_MAX`` / ``WS_SUM`` ((B, K)).
    """
    b = tl.program_id(0).to(tl.int64)
    S += b * s_b
    MASK += b * m_b
    R += b * r_b
    C += b * c_b
    U = LOGU + b * n_iters * N
    V = LOGV + b * n_iters * K
    GF = GFIN + b * K
    WMAX = WS_MAX + b * K
    WSUM = WS_SUM + b * K
    rows0 = tl.arange(0, BLOCK_N)
    cols0 = tl.arange(0, BLOCK_K)
    t = tl.full((), 1, tl.int32)  # iterations whose column step is done
    active = tl.full((), 1, tl.int32)
    if ONE_CHUNK:
        col_in = cols0 < K
        # pass 0: column step 1 from f^0
        run_max = tl.full((BLOCK_K,), float("-inf"), tl.float32)
        run_sum = tl.zeros((BLOCK_K,), tl.float32)
        for n0 in range(0, N, BLOCK_N):
            rows = n0 + rows0
            row_in = rows < N
            y = _load_y(S, s_n, s_k, rows, cols0, row_in, col_in, scale)
            valid = _load_valid(MASK, m_n, rows, row_in)
            F = tl.where(valid, 0.0, float("-inf"))
            run_max, run_sum = _merge_cols(run_max, run_sum, y + F[:, None])
        c = tl.load(C + cols0 * c_k, mask=col_in, other=0.0).to(tl.float32)
        G = _dual(_log2_mass(c), _finish_lse(_safe_shift(run_max), run_sum))
        tl.store(V + cols0, G * _LN2, mask=col_in)
        for it in range(1, n_iters):  # for + if, not while: see the resident kernel
            if active != 0:
                run_max = tl.full((BLOCK_K,), float("-inf"), tl.float32)
                run_sum = tl.zeros((BLOCK_K,), tl.float32)
                for n0 in range(0, N, BLOCK_N):
                    rows = n0 + rows0
                    row_in = rows < N
                    y = _load_y(S, s_n, s_k, rows, cols0, row_in, col_in, scale)
                    Lr = _log2_mass(_load_mass(R, r_n, rows, row_in, _load_valid(MASK, m_n, rows, row_in)))
                    _p, shift, total = _row_stats(y + G[None, :])
                    F = _dual(Lr, _finish_lse(shift, total))  # row step it
                    tl.store(U + (it - 1) * N + rows, F * _LN2, mask=row_in)
                    run_max, run_sum = _merge_cols(run_max, run_sum, y + F[:, None])
                lse_c = _finish_lse(_safe_shift(run_max), run_sum)  # column step it + 1
                c = tl.load(C + cols0 * c_k, mask=col_in, other=0.0).to(tl.float32)
                err = tl.max(tl.where(col_in, tl.abs(tl.exp2(G + lse_c) - c), 0.0), axis=0)
                stop = (tol > 0) & (it % check_every == 0) & (err < tol)
                G = tl.where(stop, G, _dual(_log2_mass(c), lse_c))
                tl.store(V + it * K + cols0, G * _LN2, mask=col_in & (stop == 0))
                active = tl.where(stop, 0, 1)
                t = tl.where(stop, it, it + 1)
        tl.store(GF + cols0, G, mask=col_in)
        for tt in range(t, n_iters):
            tl.store(V + tt * K + cols0, G * _LN2, mask=col_in)
    else:
        # pass 0: column step 1 from f^0
        for n0 in range(0, N, BLOCK_N):
            rows = n0 + rows0
            row_in = rows < N
            valid = _load_valid(MASK, m_n, rows, row_in)
            F = tl.where(valid, 0.0, float("-inf"))
            for k0 in range(0, K, BLOCK_K):
                cols = k0 + cols0
                col_in = cols < K
                y = _load_y(S, s_n, s_k, rows, cols, row_in, col_in, scale)
                _fold_cols_ws(WMAX, WSUM, cols, col_in, n0 > 0, y + F[:, None])
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + cols0
            col_in = cols < K
            Lc = _log2_mass(tl.load(C + cols * c_k, mask=col_in, other=0.0).to(tl.float32))
            lse_c = _finish_lse(
                _safe_shift(tl.load(WMAX + cols, mask=col_in, other=float("-inf"))),
                tl.load(WSUM + cols, mask=col_in, other=0.0),
            )
            G = _dual(Lc, lse_c)
            tl.store(GF + cols, G, mask=col_in)
            tl.store(V + cols, G * _LN2, mask=col_in)
        tl.debug_barrier()
        for it in range(1, n_iters):  # for + if, not while: see the resident kernel
            if active != 0:
                for n0 in range(0, N, BLOCK_N):
                    rows = n0 + rows0
                    row_in = rows < N
                    Lr = _log2_mass(_load_mass(R, r_n, rows, row_in, _load_valid(MASK, m_n, rows, row_in)))
                    row_max = tl.full((BLOCK_N,), float("-inf"), tl.float32)
                    row_sum = tl.zeros((BLOCK_N,), tl.float32)
                    for k0 in range(0, K, BLOCK_K):
                        cols = k0 + cols0
                        col_in = cols < K
                        y = _load_y(S, s_n, s_k, rows, cols, row_in, col_in, scale)
                        G = tl.load(GF + cols, mask=col_in, other=float("-inf"))
                        row_max, row_sum = _merge_rows(row_max, row_sum, y + G[None, :])
                    F = _dual(Lr, _finish_lse(_safe_shift(row_max), row_sum))  # row step it
                    tl.store(U + (it - 1) * N + rows, F * _LN2, mask=row_in)
                    for k0 in range(0, K, BLOCK_K):
                        cols = k0 + cols0
                        col_in = cols < K
                        y = _load_y(S, s_n, s_k, rows, cols, row_in, col_in, scale)
                        _fold_cols_ws(WMAX, WSUM, cols, col_in, n0 > 0, y + F[:, None])
                err = tl.zeros((), tl.float32)
                for k0 in range(0, K, BLOCK_K):
                    cols = k0 + cols0
                    col_in = cols < K
                    c = tl.load(C + cols * c_k, mask=col_in, other=0.0).to(tl.float32)
                    lse_c = _finish_lse(
                        _safe_shift(tl.load(WMAX + cols, mask=col_in, other=float("-inf"))),
                        tl.load(WSUM + cols, mask=col_in, other=0.0),
                    )
                    G = tl.load(GF + cols, mask=col_in, other=float("-inf"))
                    err = tl.maximum(err, tl.max(tl.where(col_in, tl.abs(tl.exp2(G + lse_c) - c), 0.0), axis=0))
                stop = (tol > 0) & (it % check_every == 0) & (err < tol)
                tl.debug_barrier()  # G^it was read above; G^{it+1} overwrites it below
                for k0 in range(0, K, BLOCK_K):
                    cols = k0 + cols0
                    col_in = cols < K
                    Lc = _log2_mass(tl.load(C + cols * c_k, mask=col_in, other=0.0).to(tl.float32))
                    lse_c = _finish_lse(
                        _safe_shift(tl.load(WMAX + cols, mask=col_in, other=float("-inf"))),
                        tl.load(WSUM + cols, mask=col_in, other=0.0),
                    )
                    G = _dual(Lc, lse_c)
                    tl.store(GF + cols, G, mask=col_in & (stop == 0))
                    tl.store(V + it * K + cols, G * _LN2, mask=col_in & (stop == 0))
                tl.debug_barrier()
                active = tl.where(stop, 0, 1)
                t = tl.where(stop, it, it + 1)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + cols0
            col_in = cols < K
            G = tl.load(GF + cols, mask=col_in, other=float("-inf"))
            for tt in range(t, n_iters):
                tl.store(V + tt * K + cols, G * _LN2, mask=col_in)
    tl.store(NDONE + b, t.to(tl.int64))


@triton.jit
def _sinkhorn_fwd_plan_kernel(
    S, s_b, s_n, s_k,
    MASK, m_b, m_n,
    R, r_b, r_n,
    PLAN, LOGU, NDONE, GFIN,
    N, K, n_iters, scale,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ONE_CHUNK: tl.constexpr,
):  # fmt: skip
    """Grid (B, cdiv(N, BLOCK_N)): the final row step from the final ``G`` and the plan of one row
    block; fills log_u rows ``n_done - 1 ..`` with the final ``F``."""
    b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols0 = tl.arange(0, BLOCK_K)
    row_in = rows < N
    S += b * s_b
    PLAN += b * N * K
    GF = GFIN + b * K
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
    n_done = tl.load(NDONE + b).to(tl.int32)
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
    """One program = one problem: ``T = n_done[b]`` reverse steps on the resident tile."""
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
def _sinkhorn_bwd_stream_kernel(
    GR, g_b, g_n, g_k,
    S, s_b, s_n, s_k,
    MASK, m_b, m_n,
    R, r_b, r_n,
    LOGU, LOGV, NDONE, FB, GG, RM, RS, CM, CS,
    N, K, n_iters, scale,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ONE_CHUNK: tl.constexpr,
):  # fmt: skip
    """One program = one problem: the vector recursion of the backward, one pass per iteration.

    Workspaces, row ``t - 1`` for step ``t`` (all float32, base 2):
    ``FB``/``GG`` (B, T, N)/(B, T, K): ``Fb^t`` entering row step t, ``Gg^t`` entering column step t;
    ``RM``/``RS`` (B, T, N): shift and log2-sum of ``softmax2_j(y + G^t)`` (log2-sum +inf on rows
    with ``F^t = -inf``); ``CM``/``CS`` (B, T, K): same for ``softmax2_i(y + F^{t-1})`` (+inf on
    columns with ``G^t = -inf``). Keeping shift and log-sum apart keeps ``exp2(z - shift - logsum)``
    as exact as the resident kernel's ``p / sum(p)`` (a single stored logsumexp would carry an ulp of
    its magnitude into every probability).
    Pass ``t`` (t = T .. 1), per row block: column step t gives the block's ``Fb^{t-1}`` (row-local),
    which at once feeds row step ``t - 1`` (its row statistics and column sums), and the block is
    folded into the online column statistics of column step ``t - 1`` for the next pass.
    """
    b = tl.program_id(0).to(tl.int64)
    GR += b * g_b
    S += b * s_b
    MASK += b * m_b
    R += b * r_b
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
    rows0 = tl.arange(0, BLOCK_N)
    cols0 = tl.arange(0, BLOCK_K)
    T = tl.load(NDONE + b).to(tl.int32)
    if ONE_CHUNK:
        col_in = cols0 < K
        G_T = _load_dual(V + (T - 1) * K, cols0, col_in)
        acc = tl.zeros((BLOCK_K,), tl.float32)
        c_max = tl.full((BLOCK_K,), float("-inf"), tl.float32)
        c_sum = tl.zeros((BLOCK_K,), tl.float32)
        for n0 in range(0, N, BLOCK_N):  # init: Fb^T, Gg^T, row stats T, column stats T
            rows = n0 + rows0
            row_in = rows < N
            valid = _load_valid(MASK, m_n, rows, row_in)
            r = _load_mass(R, r_n, rows, row_in, valid)
            y = _load_y(S, s_n, s_k, rows, cols0, row_in, col_in, scale)
            p, shift, total = _row_stats(y + G_T[None, :])
            log_sum = _log2_sum_or_inf(total, _dual_at(U, T, N, rows, row_in, valid) > float("-inf"))
            tl.store(RM + (T - 1) * N + rows, shift, mask=row_in)
            tl.store(RS + (T - 1) * N + rows, log_sum, mask=row_in)
            a = p * tl.exp2(-log_sum)[:, None]
            inside = row_in[:, None] & col_in[None, :]
            gr = tl.load(GR + rows[:, None] * g_n + cols0[None, :] * g_k, mask=inside, other=0.0)
            gq = gr.to(tl.float32) * a * r[:, None]  # Gr * Q
            fb = tl.sum(gq, axis=1)
            tl.store(FB + (T - 1) * N + rows, fb, mask=row_in)
            acc += tl.sum(gq - fb[:, None] * a, axis=0)  # colsum(Gr Q) - colsum(Fb^T A^T)
            F_p = _dual_at(U, T - 1, N, rows, row_in, valid)
            c_max, c_sum = _merge_cols(c_max, c_sum, y + F_p[:, None])
        gg = acc
        c_shift = _safe_shift(c_max)
        c_log_sum = _log2_sum_or_inf(c_sum, G_T > float("-inf"))
        tl.store(GG + (T - 1) * K + cols0, gg, mask=col_in)
        tl.store(CM + (T - 1) * K + cols0, c_shift, mask=col_in)
        tl.store(CS + (T - 1) * K + cols0, c_log_sum, mask=col_in)
        for s in range(0, T):
            t = T - s
            has_prev = t > 1
            G_p = _load_dual(V + (t - 2) * K, cols0, col_in & has_prev)  # G^{t-1}
            acc = tl.zeros((BLOCK_K,), tl.float32)
            c_max = tl.full((BLOCK_K,), float("-inf"), tl.float32)
            c_sum = tl.zeros((BLOCK_K,), tl.float32)
            for n0 in range(0, N, BLOCK_N):
                rows = n0 + rows0
                row_in = rows < N
                valid = _load_valid(MASK, m_n, rows, row_in)
                y = _load_y(S, s_n, s_k, rows, cols0, row_in, col_in, scale)
                F_p = _dual_at(U, t - 1, N, rows, row_in, valid)  # F^{t-1}
                bm = tl.exp2(y + F_p[:, None] - c_shift[None, :] - c_log_sum[None, :])
                fb = -tl.sum(gg[None, :] * bm, axis=1)  # column step t
                if has_prev:  # row step t - 1
                    tl.store(FB + (t - 2) * N + rows, fb, mask=row_in)
                    p, shift, total = _row_stats(y + G_p[None, :])
                    log_sum = _log2_sum_or_inf(total, F_p > float("-inf"))
                    tl.store(RM + (t - 2) * N + rows, shift, mask=row_in)
                    tl.store(RS + (t - 2) * N + rows, log_sum, mask=row_in)
                    acc -= tl.sum(fb[:, None] * (p * tl.exp2(-log_sum)[:, None]), axis=0)
                    F_pp = _dual_at(U, t - 2, N, rows, row_in, valid)
                    c_max, c_sum = _merge_cols(c_max, c_sum, y + F_pp[:, None])
            gg = acc
            c_shift = _safe_shift(c_max)
            c_log_sum = _log2_sum_or_inf(c_sum, G_p > float("-inf"))
            tl.store(GG + (t - 2) * K + cols0, gg, mask=col_in & has_prev)
            tl.store(CM + (t - 2) * K + cols0, c_shift, mask=col_in & has_prev)
            tl.store(CS + (t - 2) * K + cols0, c_log_sum, mask=col_in & has_prev)
    else:
        # init pass: row stats T, column stats T (raw, finished below), Fb^T, Gg^T
        for n0 in range(0, N, BLOCK_N):
            rows = n0 + rows0
            row_in = rows < N
            valid = _load_valid(MASK, m_n, rows, row_in)
            r = _load_mass(R, r_n, rows, row_in, valid)
            F_p = _dual_at(U, T - 1, N, rows, row_in, valid)
            r_max = tl.full((BLOCK_N,), float("-inf"), tl.float32)
            r_sum = tl.zeros((BLOCK_N,), tl.float32)
            for k0 in range(0, K, BLOCK_K):
                cols = k0 + cols0
                col_in = cols < K
                y = _load_y(S, s_n, s_k, rows, cols, row_in, col_in, scale)
                G_T = _load_dual(V + (T - 1) * K, cols, col_in)
                r_max, r_sum = _merge_rows(r_max, r_sum, y + G_T[None, :])
                _fold_cols_ws(CM + (T - 1) * K, CS + (T - 1) * K, cols, col_in, n0 > 0, y + F_p[:, None])
            shift = _safe_shift(r_max)
            log_sum = _log2_sum_or_inf(r_sum, _dual_at(U, T, N, rows, row_in, valid) > float("-inf"))
            tl.store(RM + (T - 1) * N + rows, shift, mask=row_in)
            tl.store(RS + (T - 1) * N + rows, log_sum, mask=row_in)
            fb = tl.zeros((BLOCK_N,), tl.float32)
            for k0 in range(0, K, BLOCK_K):
                cols = k0 + cols0
                col_in = cols < K
                inside = row_in[:, None] & col_in[None, :]
                y = _load_y(S, s_n, s_k, rows, cols, row_in, col_in, scale)
                G_T = _load_dual(V + (T - 1) * K, cols, col_in)
                a = tl.exp2(y + G_T[None, :] - shift[:, None] - log_sum[:, None])
                gr = tl.load(GR + rows[:, None] * g_n + cols[None, :] * g_k, mask=inside, other=0.0)
                gq = gr.to(tl.float32) * a * r[:, None]
                fb += tl.sum(gq, axis=1)
                _add_cols_ws(GG + (T - 1) * K, cols, col_in, n0 > 0, tl.sum(gq, axis=0))
            tl.store(FB + (T - 1) * N + rows, fb, mask=row_in)
            for k0 in range(0, K, BLOCK_K):
                cols = k0 + cols0
                col_in = cols < K
                y = _load_y(S, s_n, s_k, rows, cols, row_in, col_in, scale)
                G_T = _load_dual(V + (T - 1) * K, cols, col_in)
                a = tl.exp2(y + G_T[None, :] - shift[:, None] - log_sum[:, None])
                _add_cols_ws(GG + (T - 1) * K, cols, col_in, True, -tl.sum(fb[:, None] * a, axis=0))
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + cols0
            col_in = cols < K
            G_T = _load_dual(V + (T - 1) * K, cols, col_in)
            _finish_cols_ws(CM + (T - 1) * K, CS + (T - 1) * K, cols, col_in, G_T > float("-inf"))
        tl.debug_barrier()
        for s in range(0, T):
            t = T - s
            has_prev = t > 1
            for n0 in range(0, N, BLOCK_N):
                rows = n0 + rows0
                row_in = rows < N
                valid = _load_valid(MASK, m_n, rows, row_in)
                F_p = _dual_at(U, t - 1, N, rows, row_in, valid)  # F^{t-1}
                F_pp = _dual_at(U, t - 2, N, rows, row_in, valid)  # F^{t-2} (when has_prev)
                fb = tl.zeros((BLOCK_N,), tl.float32)
                r_max = tl.full((BLOCK_N,), float("-inf"), tl.float32)
                r_sum = tl.zeros((BLOCK_N,), tl.float32)
                for k0 in range(0, K, BLOCK_K):
                    cols = k0 + cols0
                    col_in = cols < K
                    y = _load_y(S, s_n, s_k, rows, cols, row_in, col_in, scale)
                    c_shift = tl.load(CM + (t - 1) * K + cols, mask=col_in, other=0.0)
                    c_log_sum = tl.load(CS + (t - 1) * K + cols, mask=col_in, other=float("inf"))
                    gg = tl.load(GG + (t - 1) * K + cols, mask=col_in, other=0.0)
                    bm = tl.exp2(y + F_p[:, None] - c_shift[None, :] - c_log_sum[None, :])
                    fb -= tl.sum(gg[None, :] * bm, axis=1)  # column step t
                    if has_prev:
                        G_p = _load_dual(V + (t - 2) * K, cols, col_in)
                        r_max, r_sum = _merge_rows(r_max, r_sum, y + G_p[None, :])
                        _fold_cols_ws(CM + (t - 2) * K, CS + (t - 2) * K, cols, col_in, n0 > 0, y + F_pp[:, None])
                if has_prev:  # row step t - 1
                    tl.store(FB + (t - 2) * N + rows, fb, mask=row_in)
                    shift = _safe_shift(r_max)
                    log_sum = _log2_sum_or_inf(r_sum, F_p > float("-inf"))
                    tl.store(RM + (t - 2) * N + rows, shift, mask=row_in)
                    tl.store(RS + (t - 2) * N + rows, log_sum, mask=row_in)
                    for k0 in range(0, K, BLOCK_K):
                        cols = k0 + cols0
                        col_in = cols < K
                        y = _load_y(S, s_n, s_k, rows, cols, row_in, col_in, scale)
                        G_p = _load_dual(V + (t - 2) * K, cols, col_in)
                        a = tl.exp2(y + G_p[None, :] - shift[:, None] - log_sum[:, None])
                        _add_cols_ws(GG + (t - 2) * K, cols, col_in, n0 > 0, -tl.sum(fb[:, None] * a, axis=0))
            if has_prev:
                for k0 in range(0, K, BLOCK_K):
                    cols = k0 + cols0
                    col_in = cols < K
                    G_p = _load_dual(V + (t - 2) * K, cols, col_in)
                    _finish_cols_ws(CM + (t - 2) * K, CS + (t - 2) * K, cols, col_in, G_p > float("-inf"))
            tl.debug_barrier()


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
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Batched Sinkhorn-Knopp forward: ``(plan, log_u, log_v, n_done)`` as ``sinkhorn_forward_reference``.

    scores (B, N, K) float32/float16/bfloat16, any strides; mask (B, N) bool; row_marginals (B, N)
    and col_marginals (B, K), float (any strides). ``tol <= 0`` disables early stopping. Returns the
    plan (B, N, K) in ``scores.dtype`` (contiguous), log_u (B, n_iters, N) and log_v (B, n_iters, K)
    float32, n_done (B,) int64.

    ``variant``: ``None`` picks ``"resident"`` when the padded tile has at most
    ``RESIDENT_MAX_TILE_FWD`` elements, else ``"streaming"``; a string forces it. ``block_n`` /
    ``block_k`` override the streaming block sizes (testing knobs: ``block_k < K`` exercises the
    multi-chunk path).
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
    args = (
        scores, *scores.stride(),
        mask_u8, *mask_u8.stride(),
        rows, *rows.stride(),
    )  # fmt: skip
    bn_r, bk_r = _pow2(n), _pow2(k)
    if _choose(variant, bn_r * bk_r, RESIDENT_MAX_TILE_FWD) == "resident":
        _sinkhorn_fwd_resident_kernel[(b,)](
            *args, cols, *cols.stride(),
            plan, log_u, log_v, n_done,
            n, k, n_iters, scale, tol, check_every,
            BLOCK_N=bn_r, BLOCK_K=bk_r, num_warps=_resident_warps(bn_r * bk_r),
        )  # fmt: skip
        return plan, log_u, log_v, n_done

    bn, bk, one_chunk = _stream_blocks(n, k, block_n, block_k)
    g_fin = torch.empty((b, k), dtype=torch.float32, device=dev)
    ws = torch.empty((0 if one_chunk else 2, b, k), dtype=torch.float32, device=dev)
    ws_max, ws_sum = (g_fin, g_fin) if one_chunk else (ws[0], ws[1])  # unused when one_chunk
    warps = _stream_warps(bn * bk)
    _sinkhorn_fwd_stream_kernel[(b,)](
        *args, cols, *cols.stride(),
        log_u, log_v, n_done, g_fin, ws_max, ws_sum,
        n, k, n_iters, scale, tol, check_every,
        BLOCK_N=bn, BLOCK_K=bk, ONE_CHUNK=one_chunk, num_warps=warps,
    )  # fmt: skip
    _sinkhorn_fwd_plan_kernel[(b, triton.cdiv(n, bn))](
        *args,
        plan, log_u, n_done, g_fin,
        n, k, n_iters, scale,
        BLOCK_N=bn, BLOCK_K=bk, ONE_CHUNK=one_chunk, num_warps=warps,
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
) -> Tensor:
    """Gradient w.r.t. ``scores`` of the unrolled loop, as ``sinkhorn_backward_reference``.

    ``log_u``, ``log_v`` and ``n_done`` are the forward's outputs (``n_done >= 1``); ``grad_plan``
    (B, N, K) any float dtype and strides. Returns (B, N, K) in ``scores.dtype`` (contiguous).
    ``col_marginals`` is only shape-checked: the column masses enter through the saved duals
    (``row_marginals`` scales the recomputed plan). ``variant=None`` picks ``"resident"`` up to
    ``RESIDENT_MAX_TILE_BWD`` padded elements; ``block_n`` / ``block_k`` as in the forward.
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
    args = (
        grad_plan, *grad_plan.stride(),
        scores, *scores.stride(),
        mask_u8, *mask_u8.stride(),
        rows, *rows.stride(),
    )  # fmt: skip
    bn_r, bk_r = _pow2(n), _pow2(k)
    if _choose(variant, bn_r * bk_r, RESIDENT_MAX_TILE_BWD) == "resident":
        _sinkhorn_bwd_resident_kernel[(b,)](
            *args,
            log_u, log_v, n_done, grad,
            n, k, n_iters, scale, inv_eps,
            BLOCK_N=bn_r, BLOCK_K=bk_r, num_warps=_resident_warps(bn_r * bk_r),
        )  # fmt: skip
        return grad

    bn, bk, one_chunk = _stream_blocks(n, k, block_n, block_k)
    ws_rows = torch.empty((3, b, n_iters, n), dtype=torch.float32, device=dev)  # Fb, row shift, row log-sum
    ws_cols = torch.empty((3, b, n_iters, k), dtype=torch.float32, device=dev)  # Gg, col shift, col log-sum
    warps = _stream_warps(bn * bk)
    _sinkhorn_bwd_stream_kernel[(b,)](
        *args,
        log_u, log_v, n_done, ws_rows[0], ws_cols[0], ws_rows[1], ws_rows[2], ws_cols[1], ws_cols[2],
        n, k, n_iters, scale,
        BLOCK_N=bn, BLOCK_K=bk, ONE_CHUNK=one_chunk, num_warps=warps,
    )  # fmt: skip
    _sinkhorn_bwd_grad_kernel[(b, triton.cdiv(n, bn))](
        *args,
        log_u, log_v, n_done, ws_rows[0], ws_cols[0], ws_rows[1], ws_rows[2], ws_cols[1], ws_cols[2], grad,
        n, k, n_iters, scale, inv_eps,
        BLOCK_N=bn, BLOCK_K=bk, num_warps=warps,
    )  # fmt: skip
    return grad
