"""Fused Triton kernels of routed top-k window attention (forward and backward).

The kernel contract is the one of ``ovseg_fast.ops.routed_attention`` (and of the C++ kernels):
``q``, ``k``, ``v`` of shape ``(B, Hh, H, W, D)`` with any strides, ``indices`` of shape
``(B, G, P, topk)`` (``G = 1``: one routing shared by all heads, ``G = Hh``: per head;
``P = nh * nw`` windows in row-major order; each row holds ``topk`` distinct non-empty windows).
Windows are ``wh = ceil(H / nh)`` by ``ww = ceil(W / nw)`` tokens; window ``w = (a, b)`` covers rows
``a*wh .. min((a+1)*wh, H) - 1`` and columns ``b*ww .. min((b+1)*ww, W) - 1``: the padding at the
bottom / right does not exist in memory, so padded keys never enter a softmax and padded queries
produce nothing. Every query token ``i`` of window ``p`` attends to the set ``S(p)`` of valid key
tokens of the windows ``indices[b, g, p, :]``::

    s_ij = scale * q_i . k_j              (j in S(p))
    lse_i = log sum_j exp(s_ij)           (natural log, saved for the backward)
    o_i = sum_j exp(s_ij - lse_i) v_j

This module only launches kernels (the autograd wiring lives in ``ovseg_fast.ops``):
``routed_attention_forward(q, k, v, indices, nh, nw, scale) -> (out, lse)`` and
``routed_attention_backward(grad_out, q, k, v, out, lse, indices, nh, nw, scale) -> (dq, dk, dv)``.
``out`` / ``dq`` / ``dk`` / ``dv`` are contiguous in the dtype of ``q``, ``lse`` is float32
``(B, Hh, H, W)``; all accumulation is in float32; inputs of any size 0 give zeros.

Forward (``_fwd_kernel``)
------------------------
Grids are 1-D, ``n_tiles * B * Hh`` programs with the tile index fastest, so neighbouring programs
work on the same (batch, head) and share its K/V windows in L2 (and no grid axis limit of 65535
applies to ``B * Hh``).

All queries of a window share the same top-k, so the **query window is the Q tile**: one program
loads its queries once, then loops over the selected key windows, reading K and V straight from
the input through the index (``indices`` -> window -> token rows/columns -> strides; no gathered
copy of K/V exists anywhere) with FlashAttention's online softmax in base 2. With
``c = scale * log2(e)`` folded into one multiply of the score tile::

    y_ij = c * (q_i . k_j)                      (-inf for padded keys / foreign columns, see packing)
    m_i' = max(m_i, max_j y_ij);  alpha = exp2(m_i - m_i');  p_ij = exp2(y_ij - m_i')
    l_i  = alpha * l_i + sum_j p_ij;  acc_i = alpha * acc_i + sum_j p_ij v_j
    o_i = acc_i / l_i,   lse_i = (m_i + log2(l_i)) * ln(2)

Every ``exp2`` argument is ``<= 0`` (in the backward, up to rounding, and masked entries are set
to ``-inf`` before the ``exp2``); a row that has seen no valid key yet uses the shift 0 instead of
``-inf`` (no ``-inf - -inf``), so any finite input stays finite. Windows larger than a tile are
split: a query window into ``NSUB`` sub-tiles of ``BLOCK_M`` rows (separate programs), a key window
into ``NKC`` chunks of ``BLOCK_N`` columns (inner loop).

Packing small windows
---------------------
``tl.dot`` needs at least 16 rows (and columns), while BiFormer's windows hold 2x2 = 4 tokens and
LDVC's 4x4 = 16. When a window has ``T < BLOCK_M`` tokens, **several consecutive query windows of the
same (batch, head) are packed into one Q tile** (``PACK = BLOCK_M // T`` slots of ``T`` rows), and the
key tile of a step holds, for every slot, ``KVP`` of that slot's own selected windows
(``BLOCK_N // PACK`` columns per slot). The scores are masked to the block diagonal (row slot ==
column slot). Why: unpacked, a 4-token window would fill 4 of 16 query rows, so 3/4 of the Q/O/LSE
loads and stores, of the softmax row statistics and of the programs' registers would be padding;
packed, every query row and every key column is a real token and there are ``PACK`` times fewer
programs. What packing cannot remove: the MMA of a (16 x BLOCK_N) tile whose useful part is block
diagonal still does ``PACK`` times the useful multiply-adds, which is the floor for tensor-core
tiles of 16 rows whatever the layout (one unpacked 4-token window against 16 keys wastes the same
fraction in its empty rows); the tiles are tiny and the kernel is bound by loading K/V, which is
not duplicated. Packing is done for key windows in the same way in the dK/dV pass.

Backward
--------
Recomputed from the saved ``lse`` (no stored probabilities), in two launches without atomics:

* ``_bwd_dq_kernel`` (same tiles and loop as the forward): first ``delta_i = sum_d dO_id * O_id``
  for the tile's queries (computed exactly once per query and stored in float32 for the second
  pass), then per selected key window::

      p_ij = exp2(c * q_i . k_j - lse_i * log2(e));  ds_ij = p_ij * (dO_i . v_j - delta_i)
      dq_i += sum_j ds_ij k_j            (dq = scale * that at the end)

* ``_bwd_dkdv_kernel``: one program per key tile (key windows packed as above, or a sub-tile of a
  large window) loops over the **query windows that selected it**, listed by an inverse index::

      dv_j += sum_i p_ij dO_i;   dk_j += scale * sum_i ds_ij q_i

  The inverse index is built on the device by a histogram + prefix sum (``bincount`` over the
  key-window ids of each (batch, routing group), exclusive ``cumsum`` for the offsets) and a stable
  ``argsort`` that lists, per key window, the query windows that chose it (each at most once: a
  row's ids are distinct). Each dK/dV row is owned by one program, so there are no atomics and
  the result is deterministic; with shared routing one list serves all heads. Key windows nobody
  selected get zero gradients (their loop is empty).

Matmul precision
----------------
``Q K^T`` and ``dO V^T`` take the inputs as they are (float16 / bfloat16 on tensor cores, exact
products, float32 accumulation). The float32 operands of the other products (``P`` in ``P V`` and
``P^T dO``, ``dS`` in ``dS K`` and ``dS^T Q``) are split as ``x = hi + lo`` with both halves in the
input dtype and multiplied twice (``split_probs=True``, the default), so they keep ~16 (bf16) /
~22 (fp16) significant bits instead of 8 / 11: the kernel then matches the float32-computing
reference and C++ kernel to the final rounding of the outputs (all backends meet one contract; the
usual FlashAttention rounding of ``P`` to bf16 alone would make bf16 results 2-4x less accurate).
The extra MMA is cheap here: with 16-row tiles a step does ``2 * 16 * BLOCK_N * D`` multiply-adds
per ``2 * BLOCK_N * D`` loaded K/V elements (~8 FLOP/byte in 16-bit), far below any GPU's
compute/bandwidth ridge, so the kernels are bound by loading K/V, not by the tensor cores.
``split_probs=False`` gives the plain FlashAttention rounding. float32 dots follow torch's float32
matmul setting (``ovseg_fast.kernels._gpu.fp32_precision``): ``input_precision="ieee"`` under torch's
default, which meets the float32 contract, TF32 tensor cores when
``torch.backends.cuda.matmul.fp32_precision == "tf32"`` (``allow_tf32=True`` / ``False`` overrides it).

Tiles (``_tile_config``)
------------------------
``BLOCK_D`` = next power of two of ``head_dim`` (>= 16, masked). Windows of <= 16 tokens take
16-row Q tiles and up to 64 keys per step; larger windows take 32 x 32 tiles (sub-tiles of the
query window, chunks of each key window). LDVC (4x4 windows, top-16): one window per 16-row tile,
4 selected windows (64 keys) per step, 4 steps. BiFormer stage 3 (2x2 windows, top-16): 4 query
windows packed per 16-row tile, 4 of each one's windows per step, 4 steps. The sizes and warp
counts come from ``ptxas -v`` on sm_80 bfloat16 builds (no register spills at head_dim 64 / 128 in
the configurations chosen, 20 bytes in the dK/dV kernel at head_dim 32); ``block_m`` / ``block_n``
override them (the tests use that to force the splitting and packing variants). Index maths is
int32 on 1-D vectors; only the per-token memory offsets are int64 (any strides, tensors beyond
2**31 elements).

Under Triton's interpreter (how this is tested without a GPU) two bfloat16 defects of the
interpreter are worked around behind the ``INTERP_BF16`` constexpr, which is never set on a GPU:
``tl.dot`` of bfloat16 operands multiplies their raw bit patterns (so operands are upcast to
float32, which computes what the tensor cores compute), and its float32 -> bfloat16 cast truncates
(so the stored outputs are rounded to nearest even by integer arithmetic first).

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

``_fwd_kernel``: registers fp32 128/136, tf32 226/164, bf16 162/160; shared KB fp32 40/40, tf32 41/41, bf16
  20/20; 4/8 warps; dots fp32 fma, tf32 mma, bf16 mma.
``_bwd_dq_kernel``: registers fp32 128/134, tf32 168/182, bf16 168/148; shared KB fp32 44/44, tf32 48/48, bf16
  22/22; 4/8 warps; dots fp32 fma, tf32 mma, bf16 mma.
``_bwd_dkdv_kernel``: registers fp32 156/153, tf32 177/170, bf16 178/152; shared KB fp32 45/45, tf32 57/57,
  bf16 23/23; 8 warps; dots fp32 fma, tf32 mma, bf16 mma.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._gpu import fp32_precision

__all__ = ["routed_attention_backward", "routed_attention_forward"]

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(LN2)

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: smallest tile side tl.dot accepts
MIN_BLOCK = 16


# --------------------------------------------------------------------------------------------------
# jit helpers: where the rows / columns of a tile live on the token grid
# --------------------------------------------------------------------------------------------------


@triton.jit
def _row_layout(tile, T, wh, ww, nw, H, W, P, PACK, RPS, NSUB, BLOCK_M: tl.constexpr):
    """Rows of tile ``tile``: ``PACK`` windows of ``RPS`` rows each, or sub-tile ``tile % NSUB`` of
    one large window. Returns the row's slot, window, grid row/column and validity."""
    r = tl.arange(0, BLOCK_M)
    slot = r // RPS
    win = (tile // NSUB) * PACK + slot
    t = (tile % NSUB) * RPS + r % RPS
    y = (win // nw) * wh + t // ww
    x = (win % nw) * ww + t % ww
    ok = (slot < PACK) & (win < P) & (t < T) & (y < H) & (x < W)
    return slot, win, y, x, ok


@triton.jit
def _col_layout(CPS, KVP, KC, PACK, BLOCK_N: tl.constexpr):
    """Columns of a step: slot (``CPS`` columns each), which of the slot's ``KVP`` windows of the
    step, token within the chunk of ``KC`` tokens, and whether the column is used at all."""
    c = tl.arange(0, BLOCK_N)
    slot = c // CPS
    cc = c % CPS
    jj = cc // KC
    return slot, jj, cc % KC, (slot < PACK) & (jj < KVP)


@triton.jit
def _col_tokens(win, t, T, wh, ww, nw, H, W, ok):
    """Grid position and validity of token ``t`` of window ``win`` (per column)."""
    win = win.to(tl.int32)  # int32 index maths: int64 divisions and products cost registers
    y = (win // nw) * wh + t // ww
    x = (win % nw) * ww + t % ww
    ok = ok & (t < T) & (y < H) & (x < W)
    return y, x, ok


@triton.jit
def _mm(a, b, PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr):
    """``tl.dot`` with float32 accumulation.

    ``INTERP_BF16`` is set only for bfloat16 under Triton's interpreter (never on a GPU), whose
    ``tl.dot`` multiplies the raw uint16 bit patterns of bfloat16 operands (triton-lang/triton#11584,
    not supported upstream); a float32 dot of the bfloat16 values is what the tensor cores compute
    (exact products, float32 sums)."""
    if INTERP_BF16:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _to_out(x, dtype: tl.constexpr, INTERP_BF16: tl.constexpr):
    """Final float32 -> output dtype conversion, round to nearest even as on the GPU. The
    interpreter's float32 -> bfloat16 cast truncates (doubling the rounding error), so under
    ``INTERP_BF16`` the float32 bits are rounded first (``+ 0x7FFF + lsb``, low half cleared), which
    leaves an exactly representable value for the cast. Inputs are finite (no NaN payloads)."""
    if INTERP_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _mm_f32_lhs(x, b, PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr, SPLIT: tl.constexpr):
    """``x @ b`` for a float32 ``x`` (probabilities or dS) and ``b`` in the input dtype. With
    ``SPLIT`` (float16 / bfloat16), ``x = hi + lo`` with both halves in the input dtype and two
    tensor-core products, so ``x`` keeps ~16 (bf16) / ~22 (fp16) bits instead of 8 / 11."""
    hi = x.to(b.dtype)
    acc = _mm(hi, b, PRECISION, INTERP_BF16)
    if SPLIT:
        acc += _mm((x - hi.to(tl.float32)).to(b.dtype), b, PRECISION, INTERP_BF16)
    return acc


@triton.jit
def _at(base, y, x, d, sy, sx, sd):
    """Pointers of a (tokens, BLOCK_D) tile: tokens at grid (y, x) (int32), features d. The token
    offsets are formed in int64 on the 1-D vector (any strides, tensors beyond 2**31 elements)."""
    off = y.to(tl.int64) * sy + x.to(tl.int64) * sx
    return base + off[:, None] + d[None, :] * sd


# --------------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------------


@triton.jit
def _fwd_kernel(
    Q, K, V, IDX, OUT, LSE,
    sqb, sqh, sqy, sqx, sqd,
    skb, skh, sky, skx, skd,
    svb, svh, svy, svx, svd,
    sib, sig, sip, sik,
    Hh, H, W, D, nw, wh, ww, P, topk, T,
    PACK, RPS, NSUB, CPS, KVP, KC, NKC, n_tiles,
    qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    INTERP_BF16: tl.constexpr, SPLIT: tl.constexpr,
):  # fmt: skip
    """One program = one Q tile (packed query windows or a sub-tile of one) of one (batch, head);
    loops over the tile's selected key windows with an online softmax (see the module docstring).
    ``sig`` is 0 for shared routing, so ``h * sig`` picks the routing group."""
    pid = tl.program_id(0).to(tl.int64)
    tile = (pid % n_tiles).to(tl.int32)
    bh = pid // n_tiles
    b = bh // Hh
    h = bh % Hh
    rslot, _, qy, qx, qok = _row_layout(tile, T, wh, ww, nw, H, W, P, PACK, RPS, NSUB, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    dok = d < D
    q = tl.load(
        _at(Q + b * sqb + h * sqh, qy, qx, d, sqy, sqx, sqd),
        mask=qok[:, None] & dok[None, :], other=0.0,
    )  # fmt: skip

    cslot, cj, ct, cused = _col_layout(CPS, KVP, KC, PACK, BLOCK_N)
    cwin = (tile // NSUB) * PACK + cslot  # query window whose selection feeds the column
    cused = cused & (cwin < P)
    idx_col = IDX + b * sib + h * sig + cwin.to(tl.int64) * sip
    Kb = K + b * skb + h * skh
    Vb = V + b * svb + h * svh
    same = rslot[:, None] == cslot[None, :]

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for j0 in range(0, topk, KVP):
        j = j0 + cj
        jok = cused & (j < topk)
        kwin = tl.load(idx_col + j * sik, mask=jok, other=0)
        for kc in range(0, NKC):
            ky, kx, kok = _col_tokens(kwin, kc * KC + ct, T, wh, ww, nw, H, W, jok)
            kmask = kok[:, None] & dok[None, :]
            k = tl.load(_at(Kb, ky, kx, d, sky, skx, skd), mask=kmask, other=0.0)
            s = _mm(q, tl.trans(k), PRECISION, INTERP_BF16) * qk_scale
            s = tl.where(same & kok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - shift)
            p = tl.exp2(s - shift[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(_at(Vb, ky, kx, d, svy, svx, svd), mask=kmask, other=0.0)
            acc = acc * alpha[:, None] + _mm_f32_lhs(p, v, PRECISION, INTERP_BF16, SPLIT)
            m_i = m_new

    seen = l_i > 0
    out = acc * tl.where(seen, 1.0 / tl.where(seen, l_i, 1.0), 0.0)[:, None]
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * _LN2, float("-inf"))
    row = (bh * H + qy) * W + qx
    out = _to_out(out, OUT.dtype.element_ty, INTERP_BF16)
    tl.store(OUT + row[:, None] * D + d[None, :], out, mask=qok[:, None] & dok[None, :])
    tl.store(LSE + row, lse, mask=qok)


# --------------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------------


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, OUT, LSE, DELTA, IDX, DQ,
    sqb, sqh, sqy, sqx, sqd,
    skb, skh, sky, skx, skd,
    svb, svh, svy, svx, svd,
    sdb, sdh, sdy, sdx, sdd,
    sob, soh, soy, sox, sod,
    sib, sig, sip, sik,
    Hh, H, W, D, nw, wh, ww, P, topk, T,
    PACK, RPS, NSUB, CPS, KVP, KC, NKC, n_tiles,
    qk_scale, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    INTERP_BF16: tl.constexpr, SPLIT: tl.constexpr,
):  # fmt: skip
    """dQ pass, same tiles and loop as the forward; also computes and stores ``delta`` (float32,
    contiguous ``(B, Hh, H, W)``) for the dK/dV pass, once per query."""
    pid = tl.program_id(0).to(tl.int64)
    tile = (pid % n_tiles).to(tl.int32)
    bh = pid // n_tiles
    b = bh // Hh
    h = bh % Hh
    rslot, _, qy, qx, qok = _row_layout(tile, T, wh, ww, nw, H, W, P, PACK, RPS, NSUB, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    dok = d < D
    qmask = qok[:, None] & dok[None, :]
    q = tl.load(_at(Q + b * sqb + h * sqh, qy, qx, d, sqy, sqx, sqd), mask=qmask, other=0.0)
    do = tl.load(_at(DO + b * sdb + h * sdh, qy, qx, d, sdy, sdx, sdd), mask=qmask, other=0.0)
    o = tl.load(_at(OUT + b * sob + h * soh, qy, qx, d, soy, sox, sod), mask=qmask, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
    row = (bh * H + qy) * W + qx
    tl.store(DELTA + row, delta, mask=qok)
    lse2 = tl.load(LSE + row, mask=qok, other=0.0) * _LOG2E

    cslot, cj, ct, cused = _col_layout(CPS, KVP, KC, PACK, BLOCK_N)
    cwin = (tile // NSUB) * PACK + cslot
    cused = cused & (cwin < P)
    idx_col = IDX + b * sib + h * sig + cwin.to(tl.int64) * sip
    Kb = K + b * skb + h * skh
    Vb = V + b * svb + h * svh
    same = (rslot[:, None] == cslot[None, :]) & qok[:, None]

    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for j0 in range(0, topk, KVP):
        j = j0 + cj
        jok = cused & (j < topk)
        kwin = tl.load(idx_col + j * sik, mask=jok, other=0)
        for kc in range(0, NKC):
            ky, kx, kok = _col_tokens(kwin, kc * KC + ct, T, wh, ww, nw, H, W, jok)
            kmask = kok[:, None] & dok[None, :]
            k = tl.load(_at(Kb, ky, kx, d, sky, skx, skd), mask=kmask, other=0.0)
            v = tl.load(_at(Vb, ky, kx, d, svy, svx, svd), mask=kmask, other=0.0)
            s = _mm(q, tl.trans(k), PRECISION, INTERP_BF16) * qk_scale
            # masked before exp2: a foreign slot's score may exceed this row's lse (no inf formed)
            p = tl.exp2(tl.where(same & kok[None, :], s - lse2[:, None], float("-inf")))
            dp = _mm(do, tl.trans(v), PRECISION, INTERP_BF16)
            ds = p * (dp - delta[:, None])
            dq += _mm_f32_lhs(ds, k, PRECISION, INTERP_BF16, SPLIT)

    dq = dq * scale
    tl.store(DQ + row[:, None] * D + d[None, :], _to_out(dq, DQ.dtype.element_ty, INTERP_BF16), mask=qmask)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, INV_OFF, INV_Q, DK, DV,
    sqb, sqh, sqy, sqx, sqd,
    skb, skh, sky, skx, skd,
    svb, svh, svy, svx, svd,
    sdb, sdh, sdy, sdx, sdd,
    G, per_head, Hh, H, W, D, nw, wh, ww, P, T,
    PACK, RPS, NSUB, CPS, KVP, KC, NKC, n_tiles,
    qk_scale, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    INTERP_BF16: tl.constexpr, SPLIT: tl.constexpr,
):  # fmt: skip
    """dK/dV pass: one program = one key tile (packed key windows or a sub-tile of one) of one
    (batch, head); the columns of a step are, per slot, the next ``KVP`` query windows of the slot's
    inverse-index list ``INV_Q[INV_OFF[w] : INV_OFF[w + 1]]`` (``w`` indexed per routing group:
    ``per_head`` is 1 for per-head routing, 0 when all heads share group 0)."""
    pid = tl.program_id(0).to(tl.int64)
    tile = (pid % n_tiles).to(tl.int32)
    bh = pid // n_tiles
    b = bh // Hh
    h = bh % Hh
    rslot, _, ky, kx, kok = _row_layout(tile, T, wh, ww, nw, H, W, P, PACK, RPS, NSUB, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    dok = d < D
    kmask = kok[:, None] & dok[None, :]
    k = tl.load(_at(K + b * skb + h * skh, ky, kx, d, sky, skx, skd), mask=kmask, other=0.0)
    v = tl.load(_at(V + b * svb + h * svh, ky, kx, d, svy, svx, svd), mask=kmask, other=0.0)

    cslot, cj, ct, cused = _col_layout(CPS, KVP, KC, PACK, BLOCK_N)
    cwin = (tile // NSUB) * PACK + cslot  # key window whose inverse list feeds the column
    cused = cused & (cwin < P)
    list_at = (b * G + h * per_head) * P + cwin
    start = tl.load(INV_OFF + list_at, mask=cused, other=0)
    count = tl.load(INV_OFF + list_at + 1, mask=cused, other=0) - start
    longest = tl.max(count, axis=0)
    Qb = Q + b * sqb + h * sqh
    DOb = DO + b * sdb + h * sdh
    same = (rslot[:, None] == cslot[None, :]) & kok[:, None]

    dk = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for j0 in range(0, longest, KVP):
        j = j0 + cj
        jok = cused & (j < count)
        qwin = tl.load(INV_Q + start + j, mask=jok, other=0)
        for kc in range(0, NKC):
            qy, qx, qok = _col_tokens(qwin, kc * KC + ct, T, wh, ww, nw, H, W, jok)
            qmask = qok[:, None] & dok[None, :]
            q = tl.load(_at(Qb, qy, qx, d, sqy, sqx, sqd), mask=qmask, other=0.0)
            do = tl.load(_at(DOb, qy, qx, d, sdy, sdx, sdd), mask=qmask, other=0.0)
            row = (bh * H + qy) * W + qx
            lse2 = tl.load(LSE + row, mask=qok, other=0.0) * _LOG2E
            delta = tl.load(DELTA + row, mask=qok, other=0.0)
            s = _mm(k, tl.trans(q), PRECISION, INTERP_BF16) * qk_scale
            p = tl.exp2(tl.where(same & qok[None, :], s - lse2[None, :], float("-inf")))
            dv += _mm_f32_lhs(p, do, PRECISION, INTERP_BF16, SPLIT)
            dp = _mm(v, tl.trans(do), PRECISION, INTERP_BF16)
            ds = p * (dp - delta[None, :])
            dk += _mm_f32_lhs(ds, q, PRECISION, INTERP_BF16, SPLIT)

    dk = dk * scale
    out_row = (bh * H + ky) * W + kx
    tl.store(DK + out_row[:, None] * D + d[None, :], _to_out(dk, DK.dtype.element_ty, INTERP_BF16), mask=kmask)
    tl.store(DV + out_row[:, None] * D + d[None, :], _to_out(dv, DV.dtype.element_ty, INTERP_BF16), mask=kmask)


# --------------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------------


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _check(q: Tensor, k: Tensor, v: Tensor, indices: Tensor, nh: int, nw: int) -> None:
    if q.dim() != 5:
        raise ValueError(f"q must have shape (B, heads, H, W, head_dim), got {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{name} must have the shape of q {tuple(q.shape)}, got {tuple(t.shape)}")
        if t.dtype != q.dtype or t.device != q.device:
            raise TypeError(
                f"{name} must match q's dtype and device ({q.dtype}, {q.device}), got {t.dtype}, {t.device}"
            )
    if q.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"q, k, v must be float32, float16 or bfloat16 for the Triton kernel, got {q.dtype}")
    if int(nh) < 1 or int(nw) < 1:
        raise ValueError(f"nh and nw must be >= 1, got {nh}, {nw}")
    B, Hh = q.shape[:2]
    if indices.dim() != 4 or indices.shape[0] != B or indices.shape[1] not in (1, Hh) or indices.shape[2] != nh * nw:
        raise ValueError(
            f"indices must have shape (B={B}, 1 or heads={Hh}, P={nh * nw}, topk), got {tuple(indices.shape)}"
        )
    if indices.dtype not in (torch.int64, torch.int32) or indices.device != q.device:
        raise TypeError(
            f"indices must be an int64 (or int32) tensor on {q.device}, got {indices.dtype} on {indices.device}"
        )


def _tile_config(T: int, D: int, topk: int, block_m, block_n, fma: bool = False) -> tuple[int, ...]:
    """``(BLOCK_M, BLOCK_N, BLOCK_D, warps_q, warps_kv, num_stages)`` for windows of ``T`` tokens;
    ``warps_q`` for the forward and dQ kernels, ``warps_kv`` for the dK/dV kernel.

    Chosen from ``ptxas -v`` register counts of the sm_80 builds (bf16, no GPU needed to compile):
    windows of <= 16 tokens (LDVC 4x4, BiFormer 2x2 packed) take 16-row tiles and up to 64 keys per
    step (150-175 registers, no spills; the dK/dV kernel needs 8 warps there, 255 registers with 4);
    larger windows take 32 x 32 tiles (64 x 64 tiles spill at head_dim 64 even with 8 warps), split
    into sub-tiles / chunks; head_dim 128 takes 8 warps and at most 32 keys per step except
    for 16-row tiles. head_dim >= 256 falls back to 16 x 32 tiles (not measured). ``block_m`` /
    ``block_n`` override (powers of two >= 16).
    """
    BLOCK_D = max(MIN_BLOCK, _next_pow2(D))
    small = T <= MIN_BLOCK
    if block_m is None:
        block_m = MIN_BLOCK if (small or BLOCK_D >= 256) else 32
    pack = block_m // T if T <= block_m else 1
    if block_n is None:
        cap = 64 if (small and BLOCK_D <= 128) else 32
        block_n = min(cap, max(block_m, _next_pow2(pack * T * max(topk, 1))))
    for name, val in (("block_m", block_m), ("block_n", block_n)):
        if val < MIN_BLOCK or val & (val - 1):
            raise ValueError(f"{name} must be a power of two >= {MIN_BLOCK}, got {val}")
    if pack > 1 and block_n < block_m:
        raise ValueError(f"block_n ({block_n}) must be >= block_m ({block_m}) when windows are packed")
    # float32 IEEE dots run on CUDA cores, whose layout keeps both operand tiles in registers: 8 warps
    # from head_dim 64 (the LDVC forward spilled 168 B per thread with 4 on sm_90; at head_dim 32,
    # BiFormer's, 4 warps do not spill and 8 spilled 8 B in the forward)
    wide = BLOCK_D >= 128 or (fma and BLOCK_D >= 64)
    warps_q = 8 if wide else 4
    warps_kv = 8 if (wide or block_n >= 64 or fma) else 4
    return block_m, block_n, BLOCK_D, warps_q, warps_kv, 2


def _layout(T: int, P: int, BLOCK_M: int, BLOCK_N: int) -> dict[str, int]:
    """Integer layout parameters shared by the kernels (see ``_row_layout`` / ``_col_layout``)."""
    if T <= BLOCK_M:
        PACK, RPS, NSUB = BLOCK_M // T, T, 1
    else:
        PACK, RPS, NSUB = 1, BLOCK_M, triton.cdiv(T, BLOCK_M)
    if PACK > 1:
        CPS = BLOCK_N // PACK
        KVP, KC, NKC = CPS // T, T, 1
    elif T <= BLOCK_N:
        CPS, KVP, KC, NKC = BLOCK_N, BLOCK_N // T, T, 1
    else:
        CPS, KVP, KC, NKC = BLOCK_N, 1, BLOCK_N, triton.cdiv(T, BLOCK_N)
    return dict(PACK=PACK, RPS=RPS, NSUB=NSUB, CPS=CPS, KVP=KVP, KC=KC, NKC=NKC, n_tiles=triton.cdiv(P, PACK) * NSUB)


def _strides5(t: Tensor) -> tuple[int, ...]:
    return tuple(t.stride())


def _idx_strides(indices: Tensor) -> tuple[int, int, int, int]:
    sib, sig, sip, sik = indices.stride()
    return sib, (sig if indices.shape[1] > 1 else 0), sip, sik


def _precision(dtype: torch.dtype, allow_tf32: bool | None) -> str:
    """``input_precision`` of the float32 dots: torch's setting unless ``allow_tf32`` says otherwise."""
    if dtype != torch.float32:
        return "ieee"  # not used: reduced-precision operands go to the tensor cores in their dtype
    if allow_tf32 is None:
        return fp32_precision()
    return "tf32" if allow_tf32 else "ieee"


def _meta(dtype, BLOCK_M, BLOCK_N, BLOCK_D, precision, split_probs, num_warps, num_stages) -> dict:
    """Compile-time parameters and launch options shared by the three kernels."""
    return dict(
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        BLOCK_D=BLOCK_D,
        PRECISION=precision,
        # bfloat16 under the interpreter only: see _mm / _to_out
        INTERP_BF16=dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") == "1",
        SPLIT=bool(split_probs) and dtype != torch.float32,
        num_warps=num_warps,
        num_stages=num_stages,
    )


def _empty(q: Tensor, indices: Tensor) -> bool:
    return q.numel() == 0 or indices.numel() == 0


def routed_attention_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    indices: Tensor,
    nh: int,
    nw: int,
    scale: float,
    *,
    allow_tf32: bool | None = None,
    split_probs: bool = True,
    block_m: int | None = None,
    block_n: int | None = None,
) -> tuple[Tensor, Tensor]:
    """``(out, lse)`` of routed attention (kernel contract in the module docstring).

    ``block_m`` / ``block_n`` force the tile sizes (tests use them to exercise packing and
    splitting); ``allow_tf32`` True / False forces TF32 / IEEE float32 dots, None follows torch's
    ``torch.backends.cuda.matmul.fp32_precision``.
    """
    _check(q, k, v, indices, nh, nw)
    B, Hh, H, W, D = q.shape
    P, topk = indices.shape[2], indices.shape[3]
    if _empty(q, indices):
        return q.new_zeros((B, Hh, H, W, D)), q.new_zeros((B, Hh, H, W), dtype=torch.float32)
    # every token of the grid lies in exactly one window, so the kernel writes every element
    out = torch.empty((B, Hh, H, W, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hh, H, W), dtype=torch.float32, device=q.device)
    wh, ww = triton.cdiv(H, nh), triton.cdiv(W, nw)
    T = wh * ww
    precision = _precision(q.dtype, allow_tf32)
    fma = q.dtype == torch.float32 and precision == "ieee"
    BLOCK_M, BLOCK_N, BLOCK_D, warps_q, _, num_stages = _tile_config(T, D, topk, block_m, block_n, fma)
    lay = _layout(T, P, BLOCK_M, BLOCK_N)
    _fwd_kernel[(lay["n_tiles"] * B * Hh,)](
        q, k, v, indices, out, lse,
        *_strides5(q), *_strides5(k), *_strides5(v), *_idx_strides(indices),
        Hh, H, W, D, nw, wh, ww, P, topk, T,
        lay["PACK"], lay["RPS"], lay["NSUB"], lay["CPS"], lay["KVP"], lay["KC"], lay["NKC"], lay["n_tiles"],
        float(scale) * LOG2E,
        **_meta(q.dtype, BLOCK_M, BLOCK_N, BLOCK_D, precision, split_probs, warps_q, num_stages),
    )  # fmt: skip
    return out, lse


def _inverse_index(indices: Tensor, P: int) -> tuple[Tensor, Tensor]:
    """For every (batch, routing group, key window), the query windows that selected it.

    Returns ``(offsets, query_windows)``: the list of group ``bg`` and key window ``w`` is
    ``query_windows[offsets[bg * P + w] : offsets[bg * P + w + 1]]`` (int32, ascending query window).
    Histogram (``bincount``) + exclusive prefix sum give the offsets; a stable ``argsort`` of the
    (group, key window) ids gives the lists. All on the device, no host sync.
    """
    B, G, _, topk = indices.shape
    key = indices.reshape(B * G, P * topk).to(torch.int64)
    key = (key + torch.arange(B * G, device=indices.device, dtype=torch.int64)[:, None] * P).reshape(-1)
    order = torch.argsort(key, stable=True)
    query_windows = ((order % (P * topk)) // topk).to(torch.int32)
    counts = torch.bincount(key, minlength=B * G * P)
    offsets = torch.zeros(B * G * P + 1, dtype=torch.int64, device=indices.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    return offsets, query_windows


def routed_attention_backward(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    indices: Tensor,
    nh: int,
    nw: int,
    scale: float,
    *,
    allow_tf32: bool | None = None,
    split_probs: bool = True,
    block_m: int | None = None,
    block_n: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)`` from the saved ``out`` and ``lse`` (see the module docstring)."""
    _check(q, k, v, indices, nh, nw)
    for name, t in (("grad_out", grad_out), ("out", out)):
        if t.shape != q.shape or t.device != q.device:
            raise ValueError(
                f"{name} must have q's shape {tuple(q.shape)} on {q.device}, got {tuple(t.shape)} on {t.device}"
            )
    if lse.shape != q.shape[:4] or lse.dtype != torch.float32 or lse.device != q.device:
        raise ValueError(
            f"lse must be float32 of shape {tuple(q.shape[:4])} on {q.device}, got {lse.dtype} {tuple(lse.shape)}"
        )
    B, Hh, H, W, D = q.shape
    G, P, topk = indices.shape[1:]
    if _empty(q, indices):
        return tuple(q.new_zeros((B, Hh, H, W, D)) for _ in range(3))  # type: ignore[return-value]
    # every query is written by its Q tile and every key (selected or not) by its key tile
    dq, dk, dv = (torch.empty((B, Hh, H, W, D), dtype=q.dtype, device=q.device) for _ in range(3))
    grad_out = grad_out.to(q.dtype)
    out = out.to(q.dtype)
    lse = lse.contiguous()
    wh, ww = triton.cdiv(H, nh), triton.cdiv(W, nw)
    T = wh * ww
    precision = _precision(q.dtype, allow_tf32)
    fma = q.dtype == torch.float32 and precision == "ieee"
    BLOCK_M, BLOCK_N, BLOCK_D, warps_q, warps_kv, num_stages = _tile_config(T, D, topk, block_m, block_n, fma)
    lay = _layout(T, P, BLOCK_M, BLOCK_N)
    ints = (lay["PACK"], lay["RPS"], lay["NSUB"], lay["CPS"], lay["KVP"], lay["KC"], lay["NKC"], lay["n_tiles"])
    meta_q = _meta(q.dtype, BLOCK_M, BLOCK_N, BLOCK_D, precision, split_probs, warps_q, num_stages)
    meta_kv = _meta(q.dtype, BLOCK_M, BLOCK_N, BLOCK_D, precision, split_probs, warps_kv, num_stages)
    delta = torch.empty((B, Hh, H, W), dtype=torch.float32, device=q.device)
    _bwd_dq_kernel[(lay["n_tiles"] * B * Hh,)](
        q, k, v, grad_out, out, lse, delta, indices, dq,
        *_strides5(q), *_strides5(k), *_strides5(v), *_strides5(grad_out), *_strides5(out), *_idx_strides(indices),
        Hh, H, W, D, nw, wh, ww, P, topk, T, *ints,
        float(scale) * LOG2E, float(scale),
        **meta_q,
    )  # fmt: skip
    offsets, query_windows = _inverse_index(indices, P)
    _bwd_dkdv_kernel[(lay["n_tiles"] * B * Hh,)](
        q, k, v, grad_out, lse, delta, offsets, query_windows, dk, dv,
        *_strides5(q), *_strides5(k), *_strides5(v), *_strides5(grad_out),
        G, int(G > 1), Hh, H, W, D, nw, wh, ww, P, T, *ints,
        float(scale) * LOG2E, float(scale),
        **meta_kv,
    )  # fmt: skip
    return dq, dk, dv
