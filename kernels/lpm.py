"""Fused Triton kernels of RPN's Linear Projection Module (forward and backward).

The maths, the argument conventions and the kernel contract are those of
``ovseg_fast.ops.lpm_reference`` (``*_forward_reference`` / ``*_backward_reference``); this module only
launches kernels, the autograd wiring lives in ``ovseg_fast.ops.lpm``.

Forward
-------
``_linear_ln_kernel`` (text branch, and the image projection when a row does not fit one tile):
a tiled GEMM, one program per ``(image, BLOCK_M rows, BLOCK_N output features)``. The K loop runs
over D once and, per step, loads ONE text tile ``t`` and uses it twice (split-K over the two halves
of the weight): ``acc += (t * c_b) @ W1^T`` with the Hadamard product formed in registers while
the A tile is loaded (``c_b`` is a ``BLOCK_K`` vector), and ``acc += t @ W2^T`` (mode c). Neither
``concat(t * c, t)`` nor ``t * c`` ever reaches memory. Epilogue: bias, then the LayerNorm
- when ``BLOCK_N >= D_out`` (one tile holds a row, the common D_out <= 512 case): mean, centred
  variance, ``xhat``, ``gamma * xhat + beta`` straight from the accumulator, one store each;
- otherwise: the un-normalised tile goes to the ``xhat`` buffer with its per-row partial mean and
  M2 (sum of squared deviations from the tile mean), and ``_ln_finish_kernel``, a light row pass,
  merges the partials with Chan's formula (no ``E[y^2] - mean^2`` cancellation) and normalises.

``_logits_kernel`` (image branch + logits): one program per ``(image, BLOCK_P pixels)``. When a
row of the projection fits one tile it computes the ``(BLOCK_P, D_out)`` projection tile over the
K loop, adds the bias and normalises it in registers (``FUSED``), and then loops over the classes
in ``BLOCK_C`` tiles: ``logits = (scale * e * gamma) @ xhat^T + scale * e . beta``; the normalised
embeddings go from registers straight into the logits GEMM (they are stored only when the backward
needs them). For a wider D_out the projection is done by ``_linear_ln_kernel`` + finish pass and
``_logits_kernel`` reads ``xhat`` tiles from memory instead (``FUSED = False``). Without LayerNorm the
same kernel computes ``scale * e @ (x V^T + v0)^T``.

Backward
--------
``_gemm_kernel`` is a batched GEMM with an in-kernel reduction over a second batch index ``r``
(``out[g] = sum_r A[g, r] @ B[g, r] * s[g, r][None, :]``; no atomics: one program owns an output
tile and loops over ``r``) and an optional per-``r`` column scale applied while the B tile is
loaded: ``d W1 = sum_b g_b^T (t_b * c_b)`` forms the Hadamard product on load, again never in
memory. ``_ln_backward_kernel`` is the LayerNorm backward row pass (two loops over column chunks,
so any D_out works), ``_mul_reduce_kernel`` the small ``sum_r X * Y`` reductions (``d cls``,
``d text`` for shared text, ``d gamma``, ``d beta``, ``d bias``). The pixel-side backward
materialises ``d p * gamma`` (B, N, D_out) once and runs the LayerNorm backward on it in place; fusing
it into the two following GEMMs would need the row-complete tile in both, which a GPU gets from a
persistent kernel; not implemented. A few C-sized (B x C x D_out) products of the logits backward
(``Z * gamma + rows beta^T``) are PyTorch glue.

Accumulation is in float32 for float32 / float16 / bfloat16. float32 dots follow torch's float32 matmul
setting (``ovseg_fast.kernels._gpu.fp32_precision``): ``input_precision="ieee"`` (CUDA cores, no TF32
rounding) under torch's default, TF32 tensor cores when ``torch.backends.cuda.matmul.fp32_precision`` is
``"tf32"``. For float16 / bfloat16 ops every dot runs on the tensor cores in the op's dtype: float32
operands (the LayerNorm's ``xhat``, the gradient workspaces) are rounded to it first, as the plain-PyTorch
spec run in that dtype rounds its intermediate tensors (flash-attention's rule against float64 holds).

Tiles and grids come from ``_linear_ln_config``, ``_logits_config``, ``_gemm_config`` (split-K) and
``_splits`` (split reductions), sized for ``_gpu.num_sms`` of the device; GEMMs and reductions whose
output has too few tiles for the GPU split their reduction into float32 partials summed by a second,
deterministic pass (no atomics).

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

``_linear_ln_kernel``: registers fp32 168/168, tf32 112/96, bf16 128/110; shared KB fp32 18/18, tf32 18/18,
  bf16 36/36; 4 warps; dots fp32 fma, tf32 mma, bf16 mma.
``_ln_finish_kernel``: registers fp32 48/40, bf16 55/56; shared KB fp32 0/0, bf16 4/4; 4 warps.
``_logits_kernel``: registers fp32 128/112, tf32 107/108, bf16 232/168; shared KB fp32 96/96, tf32 96/96, bf16
  66/66; 4/8 warps; dots fp32 fma, tf32 mma, bf16 mma.
``_mul_reduce_kernel``: registers fp32 72/72, bf16 64/64; shared KB fp32 0/0, bf16 0/0; 4 warps.
``_gemm_kernel``: registers fp32 114/80, tf32 96/68, bf16 68/58; shared KB fp32 16/16, tf32 32/48, bf16 16/24;
  4 warps; dots fp32 fma, tf32 mma+wgmma, bf16 mma+wgmma.
``_ln_backward_kernel``: registers fp32 72/72, bf16 72/72; shared KB fp32 0/0, bf16 0/0; 4 warps.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._gpu import INTERPRET, fp32_precision, num_sms

__all__ = ["hcl_backward", "hcl_forward", "logits_backward", "logits_forward"]

#: widest row a single tile normalises in its epilogue (the accumulator is BLOCK_M x BLOCK_N)
MAX_ROW_TILE = 512

_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)

# tl.dot modes (the DOT constexpr): float32 tiles with exact products (CUDA cores) or TF32 (tensor
# cores), or both operands rounded to the op's reduced-precision dtype (tensor cores).
DOT_IEEE, DOT_TF32, DOT_BF16, DOT_FP16 = 0, 1, 2, 3


def _dot_mode(*dtypes: torch.dtype) -> int:
    """The tensor-core dtype of the lowest-precision operand, else float32 as torch's matmul setting says.

    Workspaces (gradients, ``xhat``) are float32 while the op's tensors may be bfloat16: the product is
    taken in the op's dtype, as the plain-PyTorch spec run in that dtype takes it."""
    if torch.bfloat16 in dtypes:
        return DOT_BF16
    if torch.float16 in dtypes:
        return DOT_FP16
    return DOT_TF32 if fp32_precision() == "tf32" else DOT_IEEE


def _ct(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _np2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(max(int(n), 1)))


def _check(*tensors: Tensor) -> None:
    for t in tensors:
        if t is not None and t.dtype not in _SUPPORTED:
            raise TypeError(f"the Triton kernels take float32, float16 or bfloat16 tensors, got {t.dtype}")


# --------------------------------------------------------------------------------------------------
# Forward kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _mma(a, b, DOT: tl.constexpr, INTERP: tl.constexpr):
    """``a @ b`` accumulated in float32 (``DOT`` in ``DOT_IEEE, DOT_TF32, DOT_BF16, DOT_FP16``).

    Reduced precision: both tiles rounded to bfloat16 / float16, then tensor cores (``mma`` / ``wgmma``).
    Triton's interpreter multiplies bfloat16 tiles in ``tl.dot`` as raw integers (Triton 3.8), so under
    ``INTERP`` the rounded tiles are multiplied in float32: the same rounding as on a GPU."""
    if DOT == 0:
        r = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif DOT == 1:
        r = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="tf32")
    else:
        if DOT == 2:
            a16 = a.to(tl.bfloat16)
            b16 = b.to(tl.bfloat16)
        else:
            a16 = a.to(tl.float16)
            b16 = b.to(tl.float16)
        if INTERP:
            r = tl.dot(a16.to(tl.float32), b16.to(tl.float32), input_precision="ieee")
        else:
            r = tl.dot(a16, b16)
    return r


@triton.jit
def _linear_ln_kernel(
    A,
    S,
    W,
    BIAS,
    GAMMA,
    BETA,
    OUT,
    XHAT,
    RSTD,
    PART,
    M,
    K,
    NOUT,
    eps,
    s_ag,
    s_am,
    s_ak,
    s_sg,
    s_sk,
    s_wn,
    s_wk,
    s_og,
    s_om,
    s_xg,
    s_xm,
    K2_OFFSET,
    MODE: tl.constexpr,  # 0: A W^T, 1: (A * s) W^T, 2: (A * s) W1^T + A W2^T (W2 = W[:, K2_OFFSET:])
    HAS_BIAS: tl.constexpr,
    NORM: tl.constexpr,
    FULL_ROW: tl.constexpr,
    HAS_GAMMA_BETA: tl.constexpr,
    DOT: tl.constexpr,
    INTERP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Rows of ``A`` (times ``S``) through the weight, bias and LayerNorm (module docstring: Forward).

    Grid: ``G x cdiv(M, BLOCK_M) x cdiv(D_out, BLOCK_N)``; ``_linear_ln_config`` narrows the tiles (one row
    per tile, then 128 / 64 / 32 columns) until it reaches the SM count. Fewer blocks remain only for
    fewer than ~8 rows per SM at 32 columns (e.g. one image's 20 classes): a GEMM of a few MFLOP.
    """
    g = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_n = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < NOUT
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < K
        a = tl.load(
            A + g * s_ag + rm[:, None] * s_am + kk[None, :] * s_ak, mask=m_ok[:, None] & k_ok[None, :], other=0.0
        )
        w1 = tl.load(W + rn[None, :] * s_wn + kk[:, None] * s_wk, mask=n_ok[None, :] & k_ok[:, None], other=0.0)
        if MODE == 0:
            acc += _mma(a, w1, DOT, INTERP)
        else:
            s = tl.load(S + g * s_sg + kk * s_sk, mask=k_ok, other=0.0)
            # the Hadamard product, formed in registers as the A tile is loaded
            ah = (a.to(tl.float32) * s.to(tl.float32)[None, :]).to(a.dtype)
            acc += _mma(ah, w1, DOT, INTERP)
            if MODE == 2:
                w2 = tl.load(
                    W + rn[None, :] * s_wn + (kk[:, None] + K2_OFFSET) * s_wk,
                    mask=n_ok[None, :] & k_ok[:, None],
                    other=0.0,
                )
                acc += _mma(a, w2, DOT, INTERP)
    if HAS_BIAS:
        acc += tl.load(BIAS + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if NORM:
        if FULL_ROW:
            nf = NOUT * 1.0
            accm = tl.where(n_ok[None, :], acc, 0.0)
            mean = tl.sum(accm, axis=1) / nf
            d = tl.where(n_ok[None, :], acc - mean[:, None], 0.0)
            var = tl.sum(d * d, axis=1) / nf
            rstd = 1.0 / tl.sqrt(var + eps)
            xh = d * rstd[:, None]
            mask2 = m_ok[:, None] & n_ok[None, :]
            tl.store(XHAT + g * s_xg + rm[:, None] * s_xm + rn[None, :], xh, mask=mask2)
            tl.store(RSTD + g * M + rm, rstd, mask=m_ok)
            if HAS_GAMMA_BETA:
                gamma = tl.load(GAMMA + rn, mask=n_ok, other=0.0).to(tl.float32)
                beta = tl.load(BETA + rn, mask=n_ok, other=0.0).to(tl.float32)
                out = xh * gamma[None, :] + beta[None, :]
                tl.store(OUT + g * s_og + rm[:, None] * s_om + rn[None, :], out.to(OUT.dtype.element_ty), mask=mask2)
        else:
            # partial statistics of this tile's columns: count, mean and M2 per row
            cnt = tl.minimum(NOUT - pid_n * BLOCK_N, BLOCK_N) * 1.0
            accm = tl.where(n_ok[None, :], acc, 0.0)
            tmean = tl.sum(accm, axis=1) / cnt
            d = tl.where(n_ok[None, :], acc - tmean[:, None], 0.0)
            m2 = tl.sum(d * d, axis=1)
            n_tiles = tl.num_programs(2)
            base = PART + ((g * M + rm) * n_tiles + pid_n) * 2
            tl.store(base, tmean, mask=m_ok)
            tl.store(base + 1, m2, mask=m_ok)
            tl.store(XHAT + g * s_xg + rm[:, None] * s_xm + rn[None, :], acc, mask=m_ok[:, None] & n_ok[None, :])
    else:
        tl.store(
            OUT + g * s_og + rm[:, None] * s_om + rn[None, :],
            acc.to(OUT.dtype.element_ty),
            mask=m_ok[:, None] & n_ok[None, :],
        )


@triton.jit
def _ln_finish_kernel(
    XHAT,
    RSTD,
    PART,
    GAMMA,
    BETA,
    OUT,
    ROWS,
    NOUT,
    eps,
    s_om,
    N_TILES: tl.constexpr,
    TILE: tl.constexpr,
    HAS_GAMMA_BETA: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Merges the per-tile (mean, M2) partials of each row (Chan) and normalises the row in place.

    Grid: ``cdiv(rows, BLOCK_R)``, ``BLOCK_R`` from 16 down to 2 until the grid reaches the SM count
    (``_row_block``); fewer than two rows per SM (a text branch of a few hundred rows) launch fewer blocks:
    a pass over a few hundred KB.
    """
    rr = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = rr < ROWS
    n_acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    mean = tl.zeros((BLOCK_R,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for t in range(N_TILES):
        cnt = tl.minimum(NOUT - t * TILE, TILE) * 1.0
        tm = tl.load(PART + (rr * N_TILES + t) * 2, mask=r_ok, other=0.0)
        tq = tl.load(PART + (rr * N_TILES + t) * 2 + 1, mask=r_ok, other=0.0)
        tot = n_acc + cnt
        delta = tm - mean
        mean = mean + delta * (cnt / tot)
        m2 = m2 + tq + delta * delta * (n_acc * cnt / tot)
        n_acc = tot
    rstd = 1.0 / tl.sqrt(m2 / (NOUT * 1.0) + eps)
    tl.store(RSTD + rr, rstd, mask=r_ok)
    for c0 in range(0, NOUT, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        c_ok = cc < NOUT
        mask = r_ok[:, None] & c_ok[None, :]
        y = tl.load(XHAT + rr[:, None] * NOUT + cc[None, :], mask=mask, other=0.0)
        xh = (y - mean[:, None]) * rstd[:, None]
        tl.store(XHAT + rr[:, None] * NOUT + cc[None, :], xh, mask=mask)
        if HAS_GAMMA_BETA:
            gamma = tl.load(GAMMA + cc, mask=c_ok, other=0.0).to(tl.float32)
            beta = tl.load(BETA + cc, mask=c_ok, other=0.0).to(tl.float32)
            out = xh * gamma[None, :] + beta[None, :]
            tl.store(OUT + rr[:, None] * s_om + cc[None, :], out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _logits_kernel(
    X,
    W,
    BIAS,
    E,
    GAMMA,
    BETA,
    XHAT,
    RSTD,
    LOGITS,
    N,
    K,
    NOUT,
    C,
    eps,
    scale,
    s_xb,
    s_xn,
    s_xk,
    s_wn,
    s_wk,
    s_eb,
    s_ec,
    s_ek,
    s_lb,
    s_lc,
    FUSED: tl.constexpr,
    NORM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_BETA: tl.constexpr,
    SAVE: tl.constexpr,
    DOT: tl.constexpr,
    INTERP: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Projection, LayerNorm and class logits of ``BLOCK_P`` pixels of one image (module docstring).

    Grid: ``B x cdiv(N, BLOCK_P)`` (512 blocks for 8 images of 32 x 32); fewer than the SM count only for
    fewer than ~2,000 pixels in the batch, where the whole head is a few tens of MFLOP.
    """
    b = tl.program_id(0)
    rp = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    ro = tl.arange(0, BLOCK_O)
    p_ok = rp < N
    o_ok = ro < NOUT
    if FUSED:
        acc = tl.zeros((BLOCK_P, BLOCK_O), dtype=tl.float32)
        rk = tl.arange(0, BLOCK_K)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            k_ok = kk < K
            x = tl.load(
                X + b * s_xb + rp[:, None] * s_xn + kk[None, :] * s_xk, mask=p_ok[:, None] & k_ok[None, :], other=0.0
            )
            w = tl.load(W + ro[None, :] * s_wn + kk[:, None] * s_wk, mask=o_ok[None, :] & k_ok[:, None], other=0.0)
            acc += _mma(x, w, DOT, INTERP)
        if HAS_BIAS:
            acc += tl.load(BIAS + ro, mask=o_ok, other=0.0).to(tl.float32)[None, :]
        if NORM:
            nf = NOUT * 1.0
            mean = tl.sum(tl.where(o_ok[None, :], acc, 0.0), axis=1) / nf
            d = tl.where(o_ok[None, :], acc - mean[:, None], 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / nf + eps)
            xh = d * rstd[:, None]
            if SAVE:
                tl.store(XHAT + (b * N + rp[:, None]) * NOUT + ro[None, :], xh, mask=p_ok[:, None] & o_ok[None, :])
                tl.store(RSTD + b * N + rp, rstd, mask=p_ok)
        else:
            xh = tl.where(o_ok[None, :], acc, 0.0)
    else:
        xh = tl.load(XHAT + (b * N + rp[:, None]) * NOUT + ro[None, :], mask=p_ok[:, None] & o_ok[None, :], other=0.0)
    if NORM:
        gamma = tl.load(GAMMA + ro, mask=o_ok, other=0.0).to(tl.float32)
    if HAS_BETA:
        beta = tl.load(BETA + ro, mask=o_ok, other=0.0).to(tl.float32)
    xt = tl.trans(xh)
    # The class loop: the normalised tile goes from registers straight into the logits GEMM.
    for c0 in range(0, C, BLOCK_C):
        rc = c0 + tl.arange(0, BLOCK_C)
        c_ok = rc < C
        e = tl.load(
            E + b * s_eb + rc[:, None] * s_ec + ro[None, :] * s_ek, mask=c_ok[:, None] & o_ok[None, :], other=0.0
        ).to(tl.float32)
        ep = e * scale
        if NORM:
            ep = ep * gamma[None, :]
        lg = _mma(ep, xt, DOT, INTERP)
        if HAS_BETA:
            lg += (tl.sum(e * beta[None, :], axis=1) * scale)[:, None]
        tl.store(
            LOGITS + b * s_lb + rc[:, None] * s_lc + rp[None, :],
            lg.to(LOGITS.dtype.element_ty),
            mask=c_ok[:, None] & p_ok[None, :],
        )


# --------------------------------------------------------------------------------------------------
# Backward kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _gemm_kernel(
    A,
    B,
    S,
    OUT,
    M,
    N,
    K,
    R,
    alpha,
    s_ag,
    s_ar,
    s_am,
    s_ak,
    s_bg,
    s_br,
    s_bk,
    s_bn,
    s_sg,
    s_sr,
    s_sn,
    s_os,
    s_og,
    s_om,
    s_on,
    STEPS,
    HAS_S: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    DOT: tl.constexpr,
    INTERP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out[g] (+)= alpha * sum_r A[g, r] @ (B[g, r] * S[g, r][None, :]).

    The reduction over (r, k) is one flat loop of ``R * cdiv(K, BLOCK_K)`` steps; program ``(tile, g,
    s)`` runs steps ``[s * STEPS, (s + 1) * STEPS)`` (split-K: with more than one split OUT is a float32
    workspace (splits, G, M, N) that ``_mul_reduce_kernel`` sums, so the result does not depend on
    timing, no atomics).

    Grid: ``tiles x G x splits``, the splits chosen by ``_gemm_splits`` to reach the SM count; a launch
    stays below it only when each split would keep fewer than ``MIN_SPLIT_STEPS`` K steps even with
    32 x 32 tiles (a GEMM smaller than one wave of the GPU, a few microseconds).
    """
    g = tl.program_id(1)
    split = tl.program_id(2)
    n_tiles = tl.cdiv(N, BLOCK_N)
    pid_m = tl.program_id(0) // n_tiles
    pid_n = tl.program_id(0) % n_tiles
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    k_steps = tl.cdiv(K, BLOCK_K)
    lo = split * STEPS
    hi = tl.minimum(lo + STEPS, R * k_steps)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in range(lo, hi):
        r = step // k_steps
        kk = (step - r * k_steps) * BLOCK_K + rk
        k_ok = kk < K
        a = tl.load(
            A + g * s_ag + r * s_ar + rm[:, None] * s_am + kk[None, :] * s_ak,
            mask=m_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        bt = tl.load(
            B + g * s_bg + r * s_br + kk[:, None] * s_bk + rn[None, :] * s_bn,
            mask=k_ok[:, None] & n_ok[None, :],
            other=0.0,
        )
        if HAS_S:
            s = tl.load(S + g * s_sg + r * s_sr + rn * s_sn, mask=n_ok, other=0.0)
            bt = (bt.to(tl.float32) * s.to(tl.float32)[None, :]).to(bt.dtype)  # Hadamard on load
        acc += _mma(a, bt, DOT, INTERP)
    acc = acc * alpha
    ptrs = OUT + split * s_os + g * s_og + rm[:, None] * s_om + rn[None, :] * s_on
    mask = m_ok[:, None] & n_ok[None, :]
    if ACCUMULATE:
        acc += tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptrs, acc.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _ln_backward_kernel(
    G,
    XHAT,
    RSTD,
    GAMMA,
    ROWS,
    NOUT,
    s_gr,
    HAS_GAMMA: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """In place: g <- rstd * (g' - mean(g') - xhat * mean(g' xhat)), g' = g * gamma.

    Grid: ``cdiv(rows, BLOCK_R)``, ``BLOCK_R`` from 16 down to 2 until the grid reaches the SM count
    (``_row_block``); fewer than two rows per SM (the text branch's B x C rows) launch fewer blocks.
    """
    rr = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = rr < ROWS
    s1 = tl.zeros((BLOCK_R,), dtype=tl.float32)
    s2 = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for c0 in range(0, NOUT, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        c_ok = cc < NOUT
        mask = r_ok[:, None] & c_ok[None, :]
        gv = tl.load(G + rr[:, None] * s_gr + cc[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_GAMMA:
            gv = gv * tl.load(GAMMA + cc, mask=c_ok, other=0.0).to(tl.float32)[None, :]
        xv = tl.load(XHAT + rr[:, None] * NOUT + cc[None, :], mask=mask, other=0.0)
        s1 += tl.sum(gv, axis=1)
        s2 += tl.sum(gv * xv, axis=1)
    nf = NOUT * 1.0
    m1 = s1 / nf
    m2 = s2 / nf
    rstd = tl.load(RSTD + rr, mask=r_ok, other=0.0)
    for c0 in range(0, NOUT, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        c_ok = cc < NOUT
        mask = r_ok[:, None] & c_ok[None, :]
        gv = tl.load(G + rr[:, None] * s_gr + cc[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_GAMMA:
            gv = gv * tl.load(GAMMA + cc, mask=c_ok, other=0.0).to(tl.float32)[None, :]
        xv = tl.load(XHAT + rr[:, None] * NOUT + cc[None, :], mask=mask, other=0.0)
        out = (gv - m1[:, None] - xv * m2[:, None]) * rstd[:, None]
        tl.store(G + rr[:, None] * s_gr + cc[None, :], out, mask=mask)


@triton.jit
def _mul_reduce_kernel(
    X,
    Y,
    OUT,
    R,
    ROWS,
    DD,
    s_xg,
    s_xr,
    s_xi,
    s_xd,
    s_yg,
    s_yr,
    s_yi,
    s_yd,
    s_os,
    s_og,
    s_oi,
    s_od,
    STEPS,
    SPLITS,
    HAS_Y: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out[s, g, i, d] (+)= sum_{r in split s} X[g, r, i, d] * Y[g, r, i, d] (Y = 1 without HAS_Y).

    Program ``(i tile, d tile, g * SPLITS + s)`` sums rows ``[s * STEPS, (s + 1) * STEPS)`` of ``r``; with
    ``SPLITS > 1`` OUT is a float32 workspace that a second launch (``R = SPLITS``) sums.

    Grid: ``I tiles x D tiles x G x splits``; ``_reduce_splits`` splits ``r`` until the grid reaches the SM
    count, keeping at least ``MIN_SPLIT_ROWS`` rows per split. Below it stay the second pass (at most
    ``MAX_SPLITS`` rows per output tile) and reductions too small to split (a few microseconds).
    """
    g = tl.program_id(2) // SPLITS
    split = tl.program_id(2) % SPLITS
    ri = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    rd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (ri < ROWS)[:, None] & (rd < DD)[None, :]
    acc = tl.zeros((BLOCK_I, BLOCK_D), dtype=tl.float32)
    lo = split * STEPS
    hi = tl.minimum(lo + STEPS, R)
    for r in range(lo, hi):
        x = tl.load(X + g * s_xg + r * s_xr + ri[:, None] * s_xi + rd[None, :] * s_xd, mask=mask, other=0.0)
        x = x.to(tl.float32)
        if HAS_Y:
            y = tl.load(Y + g * s_yg + r * s_yr + ri[:, None] * s_yi + rd[None, :] * s_yd, mask=mask, other=0.0)
            x = x * y.to(tl.float32)
        acc += x
    ptrs = OUT + split * s_os + g * s_og + ri[:, None] * s_oi + rd[None, :] * s_od
    if ACCUMULATE:
        acc += tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptrs, acc.to(OUT.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------
# Launch helpers
# --------------------------------------------------------------------------------------------------


#: fewest K steps (of BLOCK_K) per split of a GEMM, and fewest rows per split of a reduction
MIN_SPLIT_STEPS = 4
MIN_SPLIT_ROWS = 16
#: most splits of one reduction (the second pass sums them per output element)
MAX_SPLITS = 64


def _splits(blocks: int, work: int, min_work: int, sms: int) -> int:
    """Splits of a reduction of ``work`` steps so ``blocks * splits`` reaches ``sms`` (each split keeping
    ``min_work`` steps)."""
    if blocks >= sms:
        return 1
    return max(1, min(triton.cdiv(sms, blocks), work // min_work, MAX_SPLITS))


def _gemm_config(m: int, n: int, k: int, r: int, g: int, dot: int, sms: int) -> tuple[int, int, int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, BLOCK_K, splits, num_warps, num_stages)`` of ``_gemm_kernel``.

    64 x 64 tiles, BLOCK_K 32 on tensor cores; float32 IEEE (CUDA cores) takes BLOCK_K 16 (the FMA
    layout holds the B tile in registers); split-K as ``_splits`` says, and 32 x 32 tiles when even the
    splits leave SMs idle (a reduction of a few K steps, e.g. over 20 classes)."""
    bk = min(16 if dot == DOT_IEEE else 32, _np2(k))
    for side in (64, 32):
        bm, bn = min(side, _np2(m)), min(side, _np2(n))
        tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn) * g
        splits = _splits(tiles, r * triton.cdiv(k, bk), MIN_SPLIT_STEPS, sms)
        if tiles * splits >= sms:
            break
    return bm, bn, bk, splits, 4, 3


def _gemm(a4, b4, out3, *, s3=None, alpha=1.0, accumulate=False):
    """out3[g] (+)= alpha * sum_r a4[g, r] @ (b4[g, r] * s3[g, r]); views with any strides (0 allowed)."""
    g, r, m, k = a4.shape
    n = b4.shape[3]
    if m == 0 or n == 0 or g == 0:
        return out3
    dot = _dot_mode(a4.dtype, b4.dtype)
    bm, bn, bk, splits, warps, stages = _gemm_config(m, n, k, r, g, dot, num_sms(out3.device))
    steps = triton.cdiv(r * triton.cdiv(k, bk), splits)
    splits = triton.cdiv(r * triton.cdiv(k, bk), steps)
    dst = out3 if splits == 1 else torch.empty((splits, g, m, n), dtype=torch.float32, device=out3.device)
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn), g, splits)
    s = s3 if s3 is not None else a4
    ss = s3.stride() if s3 is not None else (0, 0, 0)
    _gemm_kernel[grid](
        a4,
        b4,
        s,
        dst,
        m,
        n,
        k,
        r,
        float(alpha),
        *a4.stride(),
        *b4.stride(),
        *ss,
        dst.stride(0) if splits > 1 else 0,
        *dst.stride()[-3:],
        steps,
        HAS_S=s3 is not None,
        ACCUMULATE=accumulate and splits == 1,
        DOT=dot,
        INTERP=INTERPRET,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        num_warps=warps,
        num_stages=stages,
    )
    if splits > 1:
        _mul_reduce(dst.transpose(0, 1), None, out3, accumulate=accumulate, split=False)
    return out3


def _mul_reduce(x4, y4, out3, *, accumulate=False, split=True):
    """out3[g, i, d] (+)= sum_r x4[g, r, i, d] * y4[g, r, i, d] (y4 None: 1); split over r when the
    output has too few tiles to fill the GPU (float32 partials, summed by a second launch, never split)."""
    g, r, i, d = x4.shape
    if g == 0 or i == 0 or d == 0:
        return out3
    bi, bd = min(32, _np2(i, 1)), min(128, _np2(d, 1))
    blocks = triton.cdiv(i, bi) * triton.cdiv(d, bd) * g
    splits = _splits(blocks, r, MIN_SPLIT_ROWS, num_sms(out3.device)) if split else 1
    steps = triton.cdiv(r, splits) if r else 0
    splits = triton.cdiv(r, steps) if r else 1
    dst = out3 if splits == 1 else torch.empty((splits, g, i, d), dtype=torch.float32, device=out3.device)
    y = y4 if y4 is not None else x4
    _mul_reduce_kernel[(triton.cdiv(i, bi), triton.cdiv(d, bd), g * splits)](
        x4,
        y,
        dst,
        r,
        i,
        d,
        *x4.stride(),
        *(y4.stride() if y4 is not None else (0, 0, 0, 0)),
        dst.stride(0) if splits > 1 else 0,
        *dst.stride()[-3:],
        steps,
        SPLITS=splits,
        HAS_Y=y4 is not None,
        ACCUMULATE=accumulate and splits == 1,
        BLOCK_I=bi,
        BLOCK_D=bd,
    )
    if splits > 1:
        _mul_reduce(dst.transpose(0, 1), None, out3, accumulate=accumulate, split=False)
    return out3


def _row_block(rows: int, device: torch.device) -> int:
    """Rows per program of the LayerNorm row passes: 16, fewer (down to 2) while that leaves SMs idle."""
    per_sm = max(1, rows // num_sms(device))
    return max(2, min(16, 1 << (per_sm.bit_length() - 1)))


def _linear_ln_config(g: int, m: int, nout: int, dot: int, row_tile: int, sms: int) -> tuple[int, ...]:
    """``(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)`` of ``_linear_ln_kernel``.

    One tile per row (``BLOCK_N >= D_out``, LayerNorm in the epilogue) when ``D_out <= row_tile`` and
    16-row tiles already give ``sms`` blocks; otherwise the widest of 128 / 64 / 32 columns (and 32 or 16
    rows) that reaches ``sms`` blocks, with the partial-statistics LayerNorm. float32 IEEE runs on CUDA
    cores, whose dot layout holds the whole B tile in registers: BLOCK_K 8 (16 for narrow tiles), 8 warps
    for 512-wide rows, 2 stages (3 stages of 16 x 512 x 32 float32 tiles needed 268 KB of shared memory)."""
    fma = dot == DOT_IEEE
    blocks = lambda bm, bn: g * triton.cdiv(m, bm) * triton.cdiv(nout, bn)
    if nout <= row_tile and (blocks(16, nout) >= sms or nout <= 32):
        bm, bn = 16, _np2(nout)
    else:
        widths = [w for w in (128, 64, 32) if w <= max(row_tile, 32)]
        bn = next((w for w in widths if blocks(16, w) >= sms), widths[-1])
        bm = 32 if (blocks(32, bn) >= sms and not fma) else 16
    bk = (8 if bn >= 256 else 16) if fma else (16 if dot == DOT_TF32 else 32)
    warps = 8 if bn >= 256 else 4
    return bm, bn, bk, warps, 3 if dot in (DOT_BF16, DOT_FP16) else 2


def _logits_config(d_out: int, dot: int) -> tuple[int, ...]:
    """``(BLOCK_P, BLOCK_O, BLOCK_K, BLOCK_C, num_warps, num_stages)`` of ``_logits_kernel``: the whole
    projected row resident (``BLOCK_O >= D_out``), 16 pixels x 16 classes per step for rows >= 256 wide.
    float32 (CUDA cores or TF32, whose tiles are twice as large in shared memory) takes BLOCK_K 8 / 16,
    2 stages and 8 warps for wide rows (4 warps and BLOCK_K 32 gave 255 registers and spills)."""
    bo = _np2(d_out)
    bp = bc = 16 if bo >= 256 else 32
    low = dot in (DOT_BF16, DOT_FP16)
    bk = 32 if low else (8 if bo >= 256 else 16)
    warps = 8 if (bo >= 256 and not low) else 4
    return bp, bo, bk, bc, warps, 3 if low else 2


def _linear_ln(a3, s2, w, bias, gamma, beta, mode, eps, norm, out_dtype, *, k2_offset=0, row_tile=MAX_ROW_TILE):
    """(G, M, K) rows through ``_linear_ln_kernel``: returns (out (G, M, NOUT) or None, xhat, rstd)."""
    g, m, k = a3.shape
    nout = w.shape[0]
    dev = a3.device
    ct = torch.float32
    dot = _dot_mode(a3.dtype, w.dtype)
    bm, bn, bk, warps, stages = _linear_ln_config(g, m, nout, dot, row_tile, num_sms(dev))
    full = bn >= nout
    n_tiles = triton.cdiv(nout, bn)
    out = torch.empty((g, m, nout), dtype=out_dtype, device=dev)
    if norm:
        xhat = torch.empty((g, m, nout), dtype=ct, device=dev)
        rstd = torch.empty((g, m), dtype=ct, device=dev)
        part = torch.empty((g * m * n_tiles * 2,) if not full else (1,), dtype=ct, device=dev)
    else:
        xhat = rstd = part = out
    has_gb = gamma is not None
    grid = (g, triton.cdiv(m, bm), n_tiles)
    s = s2 if s2 is not None else a3
    _linear_ln_kernel[grid](
        a3,
        s,
        w,
        bias if bias is not None else w,
        gamma if has_gb else w,
        beta if beta is not None else (gamma if has_gb else w),
        out,
        xhat,
        rstd,
        part,
        m,
        k,
        nout,
        float(eps),
        a3.stride(0),
        a3.stride(1),
        a3.stride(2),
        s2.stride(0) if s2 is not None else 0,
        s2.stride(1) if s2 is not None else 0,
        w.stride(0),
        w.stride(1),
        out.stride(0),
        out.stride(1),
        xhat.stride(0),
        xhat.stride(1),
        k2_offset,
        MODE=mode,
        HAS_BIAS=bias is not None,
        NORM=norm,
        FULL_ROW=full,
        HAS_GAMMA_BETA=has_gb,
        DOT=dot,
        INTERP=INTERPRET,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        num_warps=warps,
        num_stages=stages,
    )
    if norm and not full:
        rows = g * m
        br = _row_block(rows, dev)
        _ln_finish_kernel[(triton.cdiv(rows, br),)](
            xhat,
            rstd,
            part,
            gamma if has_gb else xhat,
            beta if beta is not None else xhat,
            out,
            rows,
            nout,
            float(eps),
            nout,
            N_TILES=n_tiles,
            TILE=bn,
            HAS_GAMMA_BETA=has_gb,
            BLOCK_R=br,
            BLOCK_C=128,
        )
    return (out if (not norm or has_gb) else None), (xhat if norm else None), (rstd if norm else None)


# --------------------------------------------------------------------------------------------------
# Contract entry points
# --------------------------------------------------------------------------------------------------


def hcl_forward(
    text: Tensor,
    cls: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    norm_weight: Optional[Tensor],
    norm_bias: Optional[Tensor],
    mode: str,
    eps: float,
    *,
    row_tile: int = MAX_ROW_TILE,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(out, xhat, rstd)`` as ``hadamard_concat_linear_forward_reference``; ``row_tile`` < D_out
    forces the partial-statistics LayerNorm path (a testing knob)."""
    _check(text, cls, weight)
    b = cls.shape[0]
    t_rows, c, d = text.shape
    d_out = weight.shape[0]
    ct = torch.float32
    norm = norm_weight is not None
    beta = norm_bias
    if norm and beta is None:
        beta = torch.zeros_like(norm_weight)
    shared_a = mode == "a" and t_rows == 1 and b != 1
    if mode == "a":
        out, xhat, rstd = _linear_ln(
            text, None, weight, bias, norm_weight, beta, 0, eps, norm, text.dtype, row_tile=row_tile
        )
        if shared_a:
            out = out.expand(b, c, d_out).contiguous()
            if norm:
                xhat = xhat.expand(b, c, d_out).contiguous()
                rstd = rstd.expand(b, c).contiguous()
    else:
        a3 = text.expand(b, c, d)  # stride 0 over images for shared text: the same tile re-read, never copied
        out, xhat, rstd = _linear_ln(
            a3,
            cls,
            weight,
            bias,
            norm_weight,
            beta,
            1 if mode == "b" else 2,
            eps,
            norm,
            text.dtype,
            k2_offset=d,
            row_tile=row_tile,
        )
    if not norm:
        return out, text.new_empty((0,), dtype=ct), text.new_empty((0,), dtype=ct)
    return out, xhat, rstd


def hcl_backward(
    grad_out: Tensor,
    text: Tensor,
    cls: Tensor,
    weight: Tensor,
    norm_weight: Optional[Tensor],
    xhat: Tensor,
    rstd: Tensor,
    mode: str,
    has_bias: bool,
    has_norm_bias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    _check(grad_out, text, cls, weight)
    dt = text.dtype
    ct = torch.float32
    b = cls.shape[0]
    t_rows, c, d = text.shape
    d_out = weight.shape[0]
    shared = t_rows == 1 and b != 1
    dev = text.device
    rows = b * c
    empty = lambda: text.new_empty((0,))
    go = grad_out.reshape(rows, d_out)
    g_nw, g_nb = empty(), empty()
    if norm_weight is not None:
        g_nw = _mul_reduce(
            go.reshape(1, rows, 1, d_out),
            xhat.reshape(1, rows, 1, d_out),
            torch.empty((1, 1, d_out), dtype=dt, device=dev),
        ).view(d_out)
        if has_norm_bias:
            g_nb = _mul_reduce(
                go.reshape(1, rows, 1, d_out), None, torch.empty((1, 1, d_out), dtype=dt, device=dev)
            ).view(d_out)
        g = go.to(ct).clone()
        br = _row_block(rows, dev)
        _ln_backward_kernel[(triton.cdiv(rows, br),)](
            g, xhat, rstd, norm_weight, rows, d_out, g.stride(0), HAS_GAMMA=True, BLOCK_R=br, BLOCK_C=128
        )
    else:
        g = go
    g_bias = (
        _mul_reduce(g.view(1, rows, 1, d_out), None, torch.empty((1, 1, d_out), dtype=dt, device=dev)).view(d_out)
        if has_bias
        else empty()
    )
    g3 = g.view(b, c, d_out)
    gsum = (
        _mul_reduce(g3.unsqueeze(0), None, torch.empty((1, c, d_out), dtype=g.dtype, device=dev))[0] if shared else None
    )
    w = weight
    t = text
    g_text = torch.empty((t_rows, c, d), dtype=ct, device=dev)
    g_cls = torch.zeros((b, d), dtype=dt, device=dev)
    g_w = torch.empty((d_out, 2 * d if mode == "c" else d), dtype=dt, device=dev)
    if mode == "a":
        w2 = w
    else:
        w1 = w[:, :d]
        h = torch.empty((b, c, d), dtype=ct, device=dev)  # d(t * c_b), (B, C, D)
        _gemm(g3.unsqueeze(1), w1.unsqueeze(0).unsqueeze(0).expand(b, 1, d_out, d), h)
        if shared:  # d text = sum_b H_b * c_b
            _mul_reduce(h.unsqueeze(0), cls[:, None, :].unsqueeze(0).expand(1, b, c, d), g_text)
        else:
            _mul_reduce(h.unsqueeze(1), cls[:, None, None, :].expand(b, 1, c, d), g_text)
        # d cls_b = sum_c H_bc * t_c
        _mul_reduce(h.unsqueeze(2), t.expand(b, c, d).unsqueeze(2), g_cls.unsqueeze(1))
        # d W1 = sum_b g_b^T (t_b * c_b): reduction over images in-kernel, Hadamard product on load
        _gemm(
            g3.transpose(1, 2).unsqueeze(0),
            t.expand(b, c, d).unsqueeze(0),
            g_w[:, :d].unsqueeze(0),
            s3=cls.unsqueeze(0),
        )
        w2 = w[:, d:] if mode == "c" else None
    if w2 is not None:
        gg = gsum.unsqueeze(0) if shared else g3
        ng = gg.shape[0]
        _gemm(gg.unsqueeze(1), w2.unsqueeze(0).unsqueeze(0).expand(ng, 1, d_out, d), g_text, accumulate=mode == "c")
        g_w2 = g_w[:, d:] if mode == "c" else g_w
        _gemm(gg.transpose(1, 2).unsqueeze(0), t.expand(ng, c, d).unsqueeze(0), g_w2.unsqueeze(0))
    return g_text.to(dt), g_cls, g_w, g_bias, g_nw, g_nb


def logits_forward(
    pixels: Tensor,
    class_emb: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    norm_weight: Optional[Tensor],
    norm_bias: Optional[Tensor],
    eps: float,
    scale: float,
    save: bool,
    *,
    row_tile: int = MAX_ROW_TILE,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(logits, xhat, rstd)`` as ``lpm_logits_forward_reference``; ``row_tile`` < D_out forces the
    unfused path (projection kernel + finish pass + logits kernel reading xhat)."""
    _check(pixels, class_emb, weight)
    b, n, d = pixels.shape
    c, d_out = class_emb.shape[1], weight.shape[0]
    dev = pixels.device
    ct = torch.float32
    norm = norm_weight is not None
    logits = torch.empty((b, c, n), dtype=pixels.dtype, device=dev)
    fused = d_out <= row_tile
    keep = norm and (save or not fused)
    xhat = torch.empty((b, n, d_out), dtype=ct, device=dev) if keep else None
    rstd = torch.empty((b, n), dtype=ct, device=dev) if keep else None
    if not fused:
        if norm:
            _, xhat, rstd = _linear_ln(pixels, None, weight, bias, None, None, 0, eps, True, ct, row_tile=row_tile)
        else:
            proj, _, _ = _linear_ln(pixels, None, weight, bias, None, None, 0, eps, False, ct, row_tile=row_tile)
            xhat = proj
    dot = _dot_mode(pixels.dtype)
    bp, bo, bk, bc, warps, stages = _logits_config(d_out, dot)
    dummy = logits
    _logits_kernel[(b, triton.cdiv(n, bp))](
        pixels,
        weight,
        bias if bias is not None else dummy,
        class_emb,
        norm_weight if norm else dummy,
        norm_bias if norm_bias is not None else dummy,
        xhat if xhat is not None else dummy,
        rstd if rstd is not None else dummy,
        logits,
        n,
        d,
        d_out,
        c,
        float(eps),
        float(scale),
        *pixels.stride(),
        *weight.stride(),
        *class_emb.stride(),
        logits.stride(0),
        logits.stride(1),
        FUSED=fused,
        NORM=norm,
        HAS_BIAS=bias is not None and fused,
        HAS_BETA=norm_bias is not None,
        SAVE=keep and fused,
        DOT=dot,
        INTERP=INTERPRET,
        BLOCK_P=bp,
        BLOCK_O=bo,
        BLOCK_K=bk,
        BLOCK_C=bc,
        num_warps=warps,
        num_stages=stages,
    )
    if not (norm and save):
        return logits, pixels.new_empty((0,), dtype=ct), pixels.new_empty((0,), dtype=ct)
    return logits, xhat, rstd


def logits_backward(
    grad_logits: Tensor,
    pixels: Tensor,
    class_emb: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    norm_weight: Optional[Tensor],
    norm_bias: Optional[Tensor],
    xhat: Tensor,
    rstd: Tensor,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    _check(grad_logits, pixels, class_emb, weight)
    dt = pixels.dtype
    ct = torch.float32
    b, n, d = pixels.shape
    c, d_out = class_emb.shape[1], weight.shape[0]
    dev = pixels.device
    empty = lambda: pixels.new_empty((0,))
    g = grad_logits
    rows = _mul_reduce(g.permute(2, 0, 1).unsqueeze(0), None, torch.empty((1, b, c), dtype=ct, device=dev))[0] * scale
    e = class_emb
    g_b = empty()
    if norm_weight is None:
        a = torch.empty((b, c, d), dtype=ct, device=dev)
        _gemm(e.unsqueeze(1), weight.unsqueeze(0).unsqueeze(0).expand(b, 1, d_out, d), a)
        m = torch.empty((b, c, d), dtype=ct, device=dev)
        _gemm(g.unsqueeze(1), pixels.unsqueeze(1), m, alpha=scale)
        g_x = torch.empty((b, n, d), dtype=dt, device=dev)
        _gemm(g.transpose(1, 2).unsqueeze(1), a.unsqueeze(1), g_x, alpha=scale)
        g_e = torch.empty((b, c, d_out), dtype=ct, device=dev)
        _gemm(m.unsqueeze(1), weight.t().unsqueeze(0).unsqueeze(0).expand(b, 1, d, d_out), g_e)
        if bias is not None:
            g_e += rows[..., None] * bias.to(ct)
            g_b = (e.to(ct) * rows[..., None]).sum((0, 1)).to(dt)
        g_w = torch.empty((d_out, d), dtype=dt, device=dev)
        _gemm(e.transpose(1, 2).unsqueeze(0), m.unsqueeze(0), g_w.unsqueeze(0))
        return g_x, g_e.to(dt), g_w, g_b, empty(), empty()
    gamma = norm_weight.to(ct)
    z = torch.empty((b, c, d_out), dtype=ct, device=dev)
    _gemm(g.unsqueeze(1), xhat.unsqueeze(1), z, alpha=scale)
    g_e = z * gamma
    g_beta = empty()
    if norm_bias is not None:
        g_e += rows[..., None] * norm_bias.to(ct)
        g_beta = (e.to(ct) * rows[..., None]).sum((0, 1)).to(dt)
    g_gamma = (e.to(ct) * z).sum((0, 1)).to(dt)
    u = torch.empty((b, n, d_out), dtype=ct, device=dev)  # d p, then d y in place
    _gemm(g.transpose(1, 2).unsqueeze(1), e.unsqueeze(1), u, alpha=scale)
    rws = b * n
    u2 = u.view(rws, d_out)
    br = _row_block(rws, dev)
    _ln_backward_kernel[(triton.cdiv(rws, br),)](
        u2, xhat, rstd, norm_weight, rws, d_out, u2.stride(0), HAS_GAMMA=True, BLOCK_R=br, BLOCK_C=128
    )
    g_x = torch.empty((b, n, d), dtype=dt, device=dev)
    _gemm(u.unsqueeze(1), weight.unsqueeze(0).unsqueeze(0).expand(b, 1, d_out, d), g_x)
    g_w = torch.empty((d_out, d), dtype=dt, device=dev)
    _gemm(u.transpose(1, 2).unsqueeze(0), pixels.unsqueeze(0), g_w.unsqueeze(0))
    if bias is not None:
        g_b = _mul_reduce(u.view(1, rws, 1, d_out), None, torch.empty((1, 1, d_out), dtype=dt, device=dev)).view(d_out)
    return g_x, g_e.to(dt), g_w, g_b, g_gamma, g_beta
