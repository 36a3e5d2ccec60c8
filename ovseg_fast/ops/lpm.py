"""RPN's Linear Projection Module: ``hadamard_concat_linear``, ``lpm_logits``, ``LinearProjectionModule``.

The maths, the literal spec and the kernel contract are in :mod:`ovseg_fast.ops.lpm_reference`; this
module is the public op: input checks, the ``torch.library`` registration (forward, backward, fake
tensors, autograd, FLOP formulas) and backend dispatch to the C++ kernels (``csrc/lpm.cpp``), the
Triton kernels (``kernels/lpm.py``) or the reference.

Choices the issue left open (documented API):

* ``class_emb`` of ``lpm_logits`` may be (C, D_out), shared by every image, or (B, C, D_out).
* ``mode="a"`` with shared text still takes ``cls`` (only its batch size is used; its gradient is 0).
* ``norm_bias`` without ``norm_weight`` is an error (the LayerNorm is switched on by ``norm_weight``).
* ``LinearProjectionModule(..., norm=True)``: both branches end in a LayerNorm (RPN's design); the
  training-free mode has no parameters and returns ``logit_scale * cos(pixel, class)``.
* The gradient of ``lpm_logits``' pixels (B, N, D) is stored channel-first, (B, D, N), by every
  backend: for the module's (B, D, H, W) maps autograd passes it on without a transposing copy.
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import register_flop_formula

from ovseg_fast.backends import KernelSupport, dispatch, register_op
from ovseg_fast.ops._checks import check_choice, check_float, check_int, check_same_device, check_shape, check_tensor
from ovseg_fast.ops.lpm_reference import (
    compute_dtype,
    hadamard_concat_linear_backward_reference,
    hadamard_concat_linear_forward_reference,
    lpm_logits_backward_reference,
    lpm_logits_forward_reference,
)

__all__ = [
    "LinearProjectionModule",
    "hadamard_concat_linear",
    "hadamard_concat_linear_flops",
    "lpm_logits",
    "lpm_logits_flops",
]

register_op(
    "lpm",
    KernelSupport(
        cpu_dtypes=(torch.float32, torch.float64, torch.bfloat16, torch.float16),
        triton_dtypes=(torch.float32, torch.float16, torch.bfloat16),
        cpu_ops=("lpm_hcl_cpu_forward", "lpm_hcl_cpu_backward", "lpm_logits_cpu_forward", "lpm_logits_cpu_backward"),
    ),
)

MODES = ("a", "b", "c")


def _triton():
    return importlib.import_module("ovseg_fast.kernels.lpm")


# ------------------------------------------------------------------------------------------------
# hadamard_concat_linear: registered ops


@torch.library.custom_op("ovseg_fast::hadamard_concat_linear", mutates_args=())
def _hcl_op(
    text: Tensor,
    cls: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    norm_weight: Optional[Tensor],
    norm_bias: Optional[Tensor],
    mode: str,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Forward of the contract: ``(out, xhat, rstd)``; text (T, C, D) with T in {1, B}, cls (B, D)."""
    args = (text, cls, weight, bias, norm_weight, norm_bias, mode, eps)
    if text.numel() == 0 or cls.numel() == 0 or weight.numel() == 0:
        return hadamard_concat_linear_forward_reference(*args)
    return dispatch(
        "lpm",
        text,
        {
            "reference": lambda: hadamard_concat_linear_forward_reference(*args),
            "cpu": lambda: tuple(torch.ops.ovseg_fast.lpm_hcl_cpu_forward(*args)),
            "triton": lambda: _triton().hcl_forward(*args),
        },
    )


@_hcl_op.register_fake
def _hcl_fake(text, cls, weight, bias, norm_weight, norm_bias, mode, eps):
    b, c, d_out = cls.shape[0], text.shape[1], weight.shape[0]
    ct = compute_dtype(text.dtype)
    if norm_weight is None:
        return text.new_empty((b, c, d_out)), text.new_empty((0,), dtype=ct), text.new_empty((0,), dtype=ct)
    return (
        text.new_empty((b, c, d_out)),
        text.new_empty((b, c, d_out), dtype=ct),
        text.new_empty((b, c), dtype=ct),
    )


@torch.library.custom_op("ovseg_fast::hadamard_concat_linear_backward", mutates_args=())
def _hcl_backward_op(
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
    """Gradients ``(text, cls, weight, bias, norm_weight, norm_bias)``, empty for absent arguments."""
    args = (grad_out, text, cls, weight, norm_weight, xhat, rstd, mode, has_bias, has_norm_bias)
    if text.numel() == 0 or cls.numel() == 0 or weight.numel() == 0:
        return hadamard_concat_linear_backward_reference(*args)
    return dispatch(
        "lpm",
        text,
        {
            "reference": lambda: hadamard_concat_linear_backward_reference(*args),
            "cpu": lambda: tuple(torch.ops.ovseg_fast.lpm_hcl_cpu_backward(*args)),
            "triton": lambda: _triton().hcl_backward(*args),
        },
    )


@_hcl_backward_op.register_fake
def _hcl_backward_fake(grad_out, text, cls, weight, norm_weight, xhat, rstd, mode, has_bias, has_norm_bias):
    d_out = weight.shape[0]
    empty = lambda: text.new_empty((0,))
    return (
        torch.empty_like(text, memory_format=torch.contiguous_format),
        torch.empty_like(cls, memory_format=torch.contiguous_format),
        torch.empty_like(weight, memory_format=torch.contiguous_format),
        text.new_empty((d_out,)) if has_bias else empty(),
        text.new_empty((d_out,)) if norm_weight is not None else empty(),
        text.new_empty((d_out,)) if has_norm_bias else empty(),
    )


def _hcl_setup_context(ctx, inputs, output):
    text, cls, weight, bias, norm_weight, norm_bias, mode, _eps = inputs
    _, xhat, rstd = output
    ctx.save_for_backward(text, cls, weight, norm_weight, xhat, rstd)
    ctx.mode = mode
    ctx.has_bias = bias is not None
    ctx.has_norm_bias = norm_bias is not None
    ctx.mark_non_differentiable(xhat, rstd)


def _hcl_backward(ctx, grad_out, _grad_xhat, _grad_rstd):
    text, cls, weight, norm_weight, xhat, rstd = ctx.saved_tensors
    grads = _hcl_backward_op(
        grad_out.contiguous(), text, cls, weight, norm_weight, xhat, rstd, ctx.mode, ctx.has_bias, ctx.has_norm_bias
    )
    g_text, g_cls, g_w, g_b, g_nw, g_nb = grads
    return (
        g_text,
        g_cls,
        g_w,
        g_b if ctx.has_bias else None,
        g_nw if norm_weight is not None else None,
        g_nb if ctx.has_norm_bias else None,
        None,
        None,
    )


_hcl_op.register_autograd(_hcl_backward, setup_context=_hcl_setup_context)


def hadamard_concat_linear_flops(
    batch: int, classes: int, dim: int, out_dim: int, *, mode: str = "c", shared: bool = True, backward: bool = False
) -> int:
    """GEMM FLOPs of the fused kernels (2 per multiply-add), as they run after the re-association.

    Forward: the Hadamard half is ``B`` GEMMs (C, D) x (D, D_out); the plain half ``t W2^T`` (mode c)
    and mode a run once for shared text, ``B`` times for per-image text. Backward: ``g W1``, ``d W1``
    (``B`` each) plus ``g W2`` and ``d W2`` (once for shared text). Bias, Hadamard products and the
    LayerNorm are O(B C D) and not counted.
    """
    per = classes * dim * out_dim * 2
    plain = per * (1 if shared else batch)
    hadamard = per * batch
    fwd = {"a": plain, "b": hadamard, "c": hadamard + plain}[mode]
    return 2 * fwd if backward else fwd


@register_flop_formula(torch.ops.ovseg_fast.hadamard_concat_linear)
def _hcl_flop_formula(text_shape, cls_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    mode = args[3]
    return hadamard_concat_linear_flops(
        cls_shape[0], text_shape[1], text_shape[2], weight_shape[0], mode=mode, shared=text_shape[0] == 1
    )


@register_flop_formula(torch.ops.ovseg_fast.hadamard_concat_linear_backward)
def _hcl_backward_flop_formula(grad_shape, text_shape, cls_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    mode = args[3]
    return hadamard_concat_linear_flops(
        cls_shape[0],
        text_shape[1],
        text_shape[2],
        weight_shape[0],
        mode=mode,
        shared=text_shape[0] == 1,
        backward=True,
    )


# ------------------------------------------------------------------------------------------------
# lpm_logits: registered ops


@torch.library.custom_op("ovseg_fast::lpm_logits", mutates_args=())
def _logits_op(
    pixels: Tensor,
    class_emb: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    norm_weight: Optional[Tensor],
    norm_bias: Optional[Tensor],
    eps: float,
    scale: float,
    save: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Forward of the contract: ``(logits, xhat, rstd)``; pixels (B, N, D), class_emb (B, C, D_out)."""
    args = (pixels, class_emb, weight, bias, norm_weight, norm_bias, eps, scale, save)
    if pixels.numel() == 0 or class_emb.numel() == 0 or weight.numel() == 0:
        return lpm_logits_forward_reference(*args)
    return dispatch(
        "lpm",
        pixels,
        {
            "reference": lambda: lpm_logits_forward_reference(*args),
            "cpu": lambda: tuple(torch.ops.ovseg_fast.lpm_logits_cpu_forward(*args)),
            "triton": lambda: _triton().logits_forward(*args),
        },
    )


@_logits_op.register_fake
def _logits_fake(pixels, class_emb, weight, bias, norm_weight, norm_bias, eps, scale, save):
    b, n, _ = pixels.shape
    c, d_out = class_emb.shape[1], weight.shape[0]
    ct = compute_dtype(pixels.dtype)
    logits = pixels.new_empty((b, c, n))
    if norm_weight is None or not save:
        return logits, pixels.new_empty((0,), dtype=ct), pixels.new_empty((0,), dtype=ct)
    return logits, pixels.new_empty((b, n, d_out), dtype=ct), pixels.new_empty((b, n), dtype=ct)


@torch.library.custom_op("ovseg_fast::lpm_logits_backward", mutates_args=())
def _logits_backward_op(
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
    """Gradients ``(pixels, class_emb, weight, bias, norm_weight, norm_bias)``, empty for absent ones."""
    args = (grad_logits, pixels, class_emb, weight, bias, norm_weight, norm_bias, xhat, rstd, scale)
    if pixels.numel() == 0 or class_emb.numel() == 0 or weight.numel() == 0:
        return _in_pixels_layout(pixels, lpm_logits_backward_reference(*args))
    return dispatch(
        "lpm",
        pixels,
        {
            "reference": lambda: _in_pixels_layout(pixels, lpm_logits_backward_reference(*args)),
            "cpu": lambda: tuple(torch.ops.ovseg_fast.lpm_logits_cpu_backward(*args)),
            "triton": lambda: _in_pixels_layout(pixels, _triton().logits_backward(*args)),
        },
    )


def _channel_first(pixels: Tensor) -> Tensor:
    """An empty (B, N, D) tensor stored as (B, D, N): the layout of the pixels' gradient. It is that of the
    (B, N, D) view of a channel-first map (B, D, H, W), which autograd then hands to the map as it is,
    without a transposing copy. Fixed by the shape alone, so compiled graphs can rely on it."""
    b, n, d = pixels.shape
    return pixels.new_empty((b, d, n)).transpose(1, 2)


def _in_pixels_layout(pixels: Tensor, grads: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """The backends' gradients with the pixels' one laid out as the C++ kernel writes it (``_channel_first``)."""
    return (_channel_first(pixels).copy_(grads[0]), *grads[1:])


@_logits_backward_op.register_fake
def _logits_backward_fake(grad_logits, pixels, class_emb, weight, bias, norm_weight, norm_bias, xhat, rstd, scale):
    d_out = weight.shape[0]
    empty = lambda: pixels.new_empty((0,))
    return (
        _channel_first(pixels),
        torch.empty_like(class_emb, memory_format=torch.contiguous_format),
        torch.empty_like(weight, memory_format=torch.contiguous_format),
        pixels.new_empty((d_out,)) if bias is not None else empty(),
        pixels.new_empty((d_out,)) if norm_weight is not None else empty(),
        pixels.new_empty((d_out,)) if norm_bias is not None else empty(),
    )


def _logits_setup_context(ctx, inputs, output):
    pixels, class_emb, weight, bias, norm_weight, norm_bias, _eps, scale, save = inputs
    _, xhat, rstd = output
    ctx.save_for_backward(pixels, class_emb, weight, bias, norm_weight, norm_bias, xhat, rstd)
    ctx.scale = scale
    ctx.save = save
    ctx.mark_non_differentiable(xhat, rstd)


def _logits_backward(ctx, grad_logits, _grad_xhat, _grad_rstd):
    pixels, class_emb, weight, bias, norm_weight, norm_bias, xhat, rstd = ctx.saved_tensors
    if norm_weight is not None and not ctx.save:
        raise RuntimeError(
            "lpm_logits: this call saved nothing for backward (it ran without grad mode); "
            "call it with gradients enabled"
        )
    g_x, g_e, g_w, g_b, g_nw, g_nb = _logits_backward_op(
        grad_logits.contiguous(), pixels, class_emb, weight, bias, norm_weight, norm_bias, xhat, rstd, ctx.scale
    )
    return (
        g_x,
        g_e,
        g_w,
        g_b if bias is not None else None,
        g_nw if norm_weight is not None else None,
        g_nb if norm_bias is not None else None,
        None,
        None,
        None,
    )


_logits_op.register_autograd(_logits_backward, setup_context=_logits_setup_context)


def _reassociate(classes: int, pixels: int, dim: int, out_dim: int) -> bool:
    """Without LayerNorm, ``(e V) x^T`` is cheaper than ``e (x V^T)^T`` when C is small against N."""
    return classes * out_dim * dim + classes * pixels * dim < pixels * dim * out_dim + classes * pixels * out_dim


_TRI_BLOCK = 32  # csrc/lpm.cpp's kTriBlock
_GRAM_BLOCK = 64  # csrc/lpm.cpp's kGramBlock


def _triangular_fmas(dim: int, rows: int) -> int:
    """Multiply-adds per pixel of ``R[:, :D] x`` (R upper trapezoidal, ``rows`` rows), K-split in blocks of
    ``_TRI_BLOCK`` features: the block ``[k, k + kw)`` meets R's first ``min(k + kw, rows)`` rows only."""
    return sum(min(_TRI_BLOCK, dim - k) * min(k + _TRI_BLOCK, dim, rows) for k in range(0, dim, _TRI_BLOCK))


def _qr_fmas(m: int, n: int) -> int:
    """Multiply-adds of the Householder QR of an (m, n) matrix (half of LAPACK's geqrf FLOP count)."""
    return m * n * n - n**3 // 3 if m >= n else n * m * m - m**3 // 3


def _folded_fmas(batch: int, classes: int, pixels: int, dim: int, out_dim: int) -> tuple[int, int]:
    """Multiply-adds of the folded LayerNorm logits (inference): ``A = (e * gamma) Vc`` (B C D_out D),
    ``A x^T`` (B C N D), ``R [x; 1]`` (B N x the triangular count) and the QR of ``[Vc | v0c]``."""
    b, c, n, d, o = batch, classes, pixels, dim, out_dim
    qr = _qr_fmas(o, d + 1)
    return b * c * o * d + b * c * n * d + b * n * _triangular_fmas(d, min(o, d + 1)), qr


def _fold_layer_norm(batch: int, classes: int, pixels: int, dim: int, out_dim: int) -> bool:
    """The C++ kernel's choice for inference with LayerNorm (csrc/lpm.cpp's fold_layer_norm): the folded
    form when it costs less than projection + logits, its QR weighted 4x (LAPACK runs it far below GEMM rate)."""
    gemms, qr = _folded_fmas(batch, classes, pixels, dim, out_dim)
    b, c, n, d, o = batch, classes, pixels, dim, out_dim
    return gemms + 4 * qr < b * n * d * o + b * c * n * o


def _gram_fmas(dim: int) -> int:
    """Multiply-adds per pixel of the lower block triangle of ``S = x^T diag(w) x`` (D x D), in column
    blocks of ``_GRAM_BLOCK``: block ``[j, j + jw)`` takes rows ``[j, D)``."""
    return sum(min(_GRAM_BLOCK, dim - j) * (dim - j) for j in range(0, dim, _GRAM_BLOCK))


def _gram_weight_grad(batch: int, classes: int, pixels: int, dim: int, out_dim: int) -> bool:
    """The C++ kernel's choice (csrc/lpm.cpp's gram_weight_grad) of the Gram form of ``d V`` with LayerNorm."""
    b, c, n, d, o = batch, classes, pixels, dim, out_dim
    return b * n * (c * d + _gram_fmas(d)) + o * d * d + b * c * o * d < b * n * d * o


def lpm_logits_flops(
    batch: int,
    classes: int,
    pixels: int,
    dim: int,
    out_dim: int,
    *,
    norm: bool = True,
    backward: bool = False,
    save: bool = True,
) -> int:
    """FLOPs of the fused C++ kernels (2 per multiply-add): GEMMs and the QR; LayerNorm and biases are not
    counted.

    With LayerNorm: forward ``B N D D_out`` (projection) + ``B C N D_out`` (logits); backward
    ``2 B C N D_out`` (``G xhat`` and ``G^T e``) + ``B N D D_out`` (``d x``) + ``d V``: ``B N D D_out``
    as ``d y^T x``, or, when cheaper, the Gram form ``(e * gamma)^T (G * rstd) x - Vc S - ...`` with the
    symmetric ``S = x^T diag(w) x`` (about ``B N D^2 / 2``) + ``B C N D + D_out D^2 + B C D_out D``. An inference
    forward (``save=False``) runs the folded form when it is cheaper (see ``csrc/lpm.cpp``):
    ``B C D_out D + B C N D`` + the triangular product ``R [x; 1]`` (about ``B N D^2 / 2`` for
    ``D_out = D``) + the QR of the centred weights. Without LayerNorm the forward takes the cheaper
    association and the backward is C-sized: ``B C (D_out D + N D + N D + D D_out + D_out D)``.
    """
    b, c, n, d, o = batch, classes, pixels, dim, out_dim
    if norm:
        fwd = b * n * d * o + b * c * n * o
        if not save and _fold_layer_norm(b, c, n, d, o):
            fwd = sum(_folded_fmas(b, c, n, d, o))
        weight_grad = b * n * d * o
        if _gram_weight_grad(b, c, n, d, o):
            weight_grad = b * n * (c * d + _gram_fmas(d)) + o * d * d + b * c * o * d
        bwd = 2 * b * c * n * o + b * n * d * o + weight_grad
    else:
        fwd = b * (c * o * d + c * n * d) if _reassociate(c, n, d, o) else b * (n * d * o + c * n * o)
        bwd = b * c * (o * d + n * d + n * d + d * o + o * d)
    return 2 * (bwd if backward else fwd)


@register_flop_formula(torch.ops.ovseg_fast.lpm_logits)
def _logits_flop_formula(pixels_shape, emb_shape, weight_shape, bias, norm_weight, *args, out_shape=None, **kw) -> int:
    b, n, d = pixels_shape
    save = args[3]  # (norm_bias, eps, scale, save)
    return lpm_logits_flops(b, emb_shape[1], n, d, weight_shape[0], norm=norm_weight is not None, save=save)


@register_flop_formula(torch.ops.ovseg_fast.lpm_logits_backward)
def _logits_backward_flop_formula(
    grad_shape, pixels_shape, emb_shape, weight_shape, bias, norm_weight, *args, out_shape=None, **kw
) -> int:
    b, n, d = pixels_shape
    return lpm_logits_flops(b, emb_shape[1], n, d, weight_shape[0], norm=norm_weight is not None, backward=True)


# ------------------------------------------------------------------------------------------------
# Public functions


def _check_vector(name: str, value: Optional[Tensor], size: int, dtype: torch.dtype) -> None:
    if value is None:
        return
    check_tensor(name, value, ndim=(1,))
    if value.dtype != dtype:
        raise TypeError(
            f"{name} must have the dtype of the inputs ({str(dtype).replace('torch.', '')}), got {value.dtype}"
        )
    check_shape(name, value, (size,), "(the output features of weight)")


def _check_same_dtype(ref_name: str, ref: Tensor, **others: Tensor) -> None:
    for name, t in others.items():
        if t.dtype != ref.dtype:
            raise TypeError(
                f"{name} must have the dtype of {ref_name} ({str(ref.dtype).replace('torch.', '')}), "
                f"got {str(t.dtype).replace('torch.', '')}"
            )


def _check_norm(norm_weight, norm_bias, eps, d_out, dtype):
    if norm_bias is not None and norm_weight is None:
        raise ValueError("norm_bias was given without norm_weight; the LayerNorm is enabled by norm_weight")
    _check_vector("norm_weight", norm_weight, d_out, dtype)
    _check_vector("norm_bias", norm_bias, d_out, dtype)
    return check_float("eps", eps, positive=True)


def _needs_grad(*tensors: Optional[Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def hadamard_concat_linear(
    text: Tensor,
    cls: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    *,
    mode: str = "c",
    norm_weight: Optional[Tensor] = None,
    norm_bias: Optional[Tensor] = None,
    eps: float = 1e-5,
) -> Tensor:
    r"""RPN's Linear Projection Module on the text side (LPMa/b/c), fused with its LayerNorm.

    .. math::
        \text{a: } e_{bc} = W t_c + w_0, \quad
        \text{b: } e_{bc} = W (t_c \odot c_b) + w_0, \quad
        \text{c: } e_{bc} = W [t_c \odot c_b;\ t_c] + w_0 = W_1 (t_c \odot c_b) + W_2 t_c + w_0

    followed by ``LayerNorm(e) * norm_weight + norm_bias`` (over the D_out features) when
    ``norm_weight`` is given.

    Args:
        text: (C, D) class embeddings shared by every image, or (B, C, D) per image.
        cls: (B, D) the images' [CLS] embeddings (mode ``"a"`` only uses its batch size).
        weight: (D_out, 2D) for mode ``"c"``, (D_out, D) for ``"a"`` and ``"b"``.
        bias: optional (D_out,).
        mode: ``"a"``, ``"b"`` or ``"c"``.
        norm_weight, norm_bias: optional (D_out,) LayerNorm affine parameters; ``norm_weight``
            switches the LayerNorm on.
        eps: LayerNorm epsilon (> 0).

    Returns:
        (B, C, D_out) in the inputs' dtype (also for mode ``"a"`` with shared text).

    The fused kernels never form ``concat(t * c, t)`` nor ``t * c`` for all images: the plain half
    ``t W2^T`` is one GEMM shared by all images when the text is shared, and the Hadamard half is
    formed per image on the smaller operand (the text rows or W1's columns), split-K accumulated onto
    the plain half, with bias and LayerNorm in the epilogue. Gradients reach every tensor argument.
    All tensors must share dtype (float32, float64, bfloat16, float16) and device.
    """
    mode = check_choice("mode", mode, MODES)
    check_tensor("text", text, ndim=(2, 3))
    check_tensor("cls", cls, ndim=(2,))
    check_tensor("weight", weight, ndim=(2,))
    _check_same_dtype("text", text, cls=cls, weight=weight)
    d = text.shape[-1]
    b = cls.shape[0]
    check_shape("cls", cls, (None, d), "(the feature size D of text)")
    if text.dim() == 3:
        check_shape("text", text, (b, None, d), "(per-image text: one row of classes per image of cls)")
    d_out = weight.shape[0]
    check_shape("weight", weight, (d_out, 2 * d if mode == "c" else d), f"for mode {mode!r} with D = {d}")
    _check_vector("bias", bias, d_out, text.dtype)
    eps = _check_norm(norm_weight, norm_bias, eps, d_out, text.dtype)
    check_same_device("text", text, cls=cls, weight=weight, bias=bias, norm_weight=norm_weight, norm_bias=norm_bias)
    t = text.unsqueeze(0) if text.dim() == 2 else text
    out, _, _ = _hcl_op(t, cls, weight, bias, norm_weight, norm_bias, mode, eps)
    return out


def lpm_logits(
    pixels: Tensor,
    class_emb: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    *,
    norm_weight: Optional[Tensor] = None,
    norm_bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    scale: Optional[float] = None,
) -> Tensor:
    r"""RPN's image branch and logits, fused: ``s_bcn = scale * <e_bc, LN(V x_bn + v_0)>``.

    Args:
        pixels: (B, N, D) pixel features (any strides: a ``(B, D, H, W)`` map's
            ``flatten(2).transpose(1, 2)`` is read in place).
        class_emb: (B, C, D_out) class embeddings (e.g. from :func:`hadamard_concat_linear`), or
            (C, D_out) shared by every image.
        weight: (D_out, D) the image projection; bias: optional (D_out,).
        norm_weight, norm_bias: optional (D_out,) LayerNorm affine parameters; ``norm_weight``
            switches the LayerNorm on.
        eps: LayerNorm epsilon (> 0).
        scale: logit scale, default ``D_out ** -0.5``.

    Returns:
        logits (B, C, N) in the inputs' dtype.

    The projected pixels never exist as an (B, N, D_out) tensor in inference. With LayerNorm the
    C++ kernel folds it into the weights when that is cheaper (at RPN's sizes it is): with ``Vc``,
    ``v0c`` the weight and bias centred over the output features, ``logits = rstd * (A x + a0) +
    scale e . beta`` with the C-sized ``A = scale (e * gamma) Vc``, and ``rstd`` from ``|R [x; 1]|``,
    ``R`` the triangular QR factor of ``[Vc | v0c]``: about half the multiply-adds of the projection
    (for channel-first pixels the triangular product, its norm and ``A x`` are one fused
    micro-kernel per block of pixels, so ``R [x; 1]`` never reaches memory either). ``R`` is
    memoised on the exact contents of ``[Vc | v0c]`` (a few entries), so repeated inference with the
    same weights pays the QR once; any change of the weights, in place or not, recomputes it.
    Otherwise, per chunk of pixels, the projection GEMM, the LayerNorm (in place) and the logits GEMM
    run back to back (gamma and beta folded into the class side). With gradients enabled the
    normalised projection and the inverse std are saved (one (B, N, D_out) tensor, nothing else).
    Without LayerNorm the product is re-associated as ``(e V) x^T`` when C is small against N.
    The gradient of ``pixels`` is stored channel-first ((B, D, N) storage, the layout of a
    ``(B, D, H, W)`` map's view), whatever the strides of ``pixels``.
    """
    check_tensor("pixels", pixels, ndim=(3,))
    check_tensor("class_emb", class_emb, ndim=(2, 3))
    check_tensor("weight", weight, ndim=(2,))
    _check_same_dtype("pixels", pixels, class_emb=class_emb, weight=weight)
    b, _, d = pixels.shape
    d_out = weight.shape[0]
    check_shape("weight", weight, (d_out, d), "(D_out, D) with D the feature size of pixels")
    if class_emb.dim() == 3:
        check_shape("class_emb", class_emb, (b, None, d_out), "(B, C, D_out) with the B of pixels and D_out of weight")
    else:
        check_shape("class_emb", class_emb, (None, d_out), "(C, D_out) with the D_out of weight")
    _check_vector("bias", bias, d_out, pixels.dtype)
    eps = _check_norm(norm_weight, norm_bias, eps, d_out, pixels.dtype)
    if scale is None:
        scale = float(d_out) ** -0.5 if d_out > 0 else 1.0
    scale = check_float("scale", scale)
    check_same_device(
        "pixels", pixels, class_emb=class_emb, weight=weight, bias=bias, norm_weight=norm_weight, norm_bias=norm_bias
    )
    e = class_emb if class_emb.dim() == 3 else class_emb.unsqueeze(0).expand(b, -1, -1)
    save = _needs_grad(pixels, class_emb, weight, bias, norm_weight, norm_bias)
    logits, _, _ = _logits_op(pixels, e, weight, bias, norm_weight, norm_bias, eps, scale, save)
    return logits


# ------------------------------------------------------------------------------------------------
# Module


class LinearProjectionModule(nn.Module):
    """RPN's Linear Projection Module (LPMa/b/c) or its training-free variant, as a segmentation head.

    ``forward(pixels (B, D, H, W), text (C, D) or (B, C, D), cls (B, D)) -> logits (B, C, H, W)``:
    the text branch is :func:`hadamard_concat_linear` (mode a/b/c, LayerNorm), the image branch
    Linear + LayerNorm and the logits their scaled dot products (:func:`lpm_logits`).
    ``mode="training_free"`` has no parameters: ``logit_scale * cos(pixel, class)``.
    """

    def __init__(
        self,
        dim: int,
        out_dim: int,
        mode: str = "c",
        *,
        norm: bool = True,
        eps: float = 1e-5,
        logit_scale: Optional[float] = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.dim = check_int("dim", dim, minimum=1)
        self.out_dim = check_int("out_dim", out_dim, minimum=1)
        self.mode = check_choice("mode", mode, (*MODES, "training_free"))
        self.norm = bool(norm)
        self.eps = check_float("eps", eps, positive=True)
        self.logit_scale = None if logit_scale is None else check_float("logit_scale", logit_scale)
        factory = {"device": device, "dtype": dtype}
        if self.mode == "training_free":
            return
        in_text = 2 * dim if mode == "c" else dim
        self.text_proj = nn.Linear(in_text, out_dim, **factory)
        self.image_proj = nn.Linear(dim, out_dim, **factory)
        if self.norm:
            self.text_norm = nn.LayerNorm(out_dim, eps=eps, **factory)
            self.image_norm = nn.LayerNorm(out_dim, eps=eps, **factory)

    def class_embeddings(self, text: Tensor, cls: Tensor) -> Tensor:
        """The text branch: (B, C, out_dim)."""
        return hadamard_concat_linear(
            text,
            cls,
            self.text_proj.weight,
            self.text_proj.bias,
            mode=self.mode,
            norm_weight=self.text_norm.weight if self.norm else None,
            norm_bias=self.text_norm.bias if self.norm else None,
            eps=self.eps,
        )

    def forward(self, pixels: Tensor, text: Tensor, cls: Optional[Tensor] = None) -> Tensor:
        check_tensor("pixels", pixels, ndim=(4,))
        b, d, h, w = pixels.shape
        if d != self.dim:
            raise ValueError(f"pixels must have {self.dim} channels (dim), got shape {tuple(pixels.shape)}")
        flat = pixels.flatten(2).transpose(1, 2)  # (B, N, D) view, read in place by the kernels
        if self.mode == "training_free":
            check_tensor("text", text, ndim=(2, 3))
            if text.shape[-1] != d:
                raise ValueError(f"text must have feature size {d} (that of pixels), got shape {tuple(text.shape)}")
            scale = 1.0 if self.logit_scale is None else self.logit_scale
            if text.dim() == 3 and text.shape[0] != b:
                raise ValueError(
                    f"per-image text must have {b} rows (the batch of pixels), got shape {tuple(text.shape)}"
                )
            logits = _cosine_logits(flat, text, scale)
            return logits.view(b, -1, h, w)
        if cls is None:
            raise ValueError(f"cls is required for mode {self.mode!r}")
        emb = self.class_embeddings(text, cls)
        logits = lpm_logits(
            flat,
            emb,
            self.image_proj.weight,
            self.image_proj.bias,
            norm_weight=self.image_norm.weight if self.norm else None,
            norm_bias=self.image_norm.bias if self.norm else None,
            eps=self.eps,
            scale=self.logit_scale,
        )
        return logits.view(b, -1, h, w)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, out_dim={self.out_dim}, mode={self.mode!r}, norm={self.norm}, eps={self.eps}, "
            f"logit_scale={self.logit_scale}"
        )


def _cosine_logits(pixels: Tensor, text: Tensor, scale: float) -> Tensor:
    """Training-free logits: cosine of every pixel with every class (B, C, N), one batched GEMM."""
    p = F.normalize(pixels, dim=-1)
    t = F.normalize(text, dim=-1)
    if t.dim() == 2:
        t = t.unsqueeze(0).expand(p.shape[0], -1, -1)
    return torch.bmm(t, p.transpose(1, 2)) * scale
