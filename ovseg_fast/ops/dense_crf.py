"""Dense CRF post-processing (PnP-OVSS): mean-field inference on the permutohedral lattice, and the
Gaussian blur that precedes it.

The maths and the reference are in :mod:`ovseg_fast.ops.dense_crf_reference`; this module is the
public op: input checks, the ``torch.library`` registration (op, fake tensors, FLOP formula) and
backend dispatch to the C++ kernel (``csrc/dense_crf.cpp``) or the reference.

Both are inference only: the CRF is not differentiated (pydensecrf's semantics are a fixed number of
mean-field steps used as post-processing), so no autograd formula is registered and asking for a
gradient raises. There is no Triton kernel: on GPUs the device-agnostic reference runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Union

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import register_flop_formula

from ovseg_fast.backends import KernelSupport, dispatch, register_op
from ovseg_fast.ops._checks import FLOATING, check_float, check_int, check_same_device, check_tensor, value_range
from ovseg_fast.ops.dense_crf_reference import dense_crf_reference, gaussian_blur_reference

__all__ = ["DenseCRF", "dense_crf", "dense_crf_flops", "gaussian_blur"]

register_op(
    "dense_crf",
    KernelSupport(
        cpu_dtypes=(torch.float32,),
        triton_dtypes=(),
        has_triton=False,
        cpu_ops=("dense_crf_cpu_forward",),
        no_triton_reason=(
            "this op has no Triton kernel: on GPUs the device-agnostic reference (index/scatter "
            "permutohedral lattice) runs for now"
        ),
    ),
)

# Lattice keys are int32 in the C++ kernel and the elevated coordinates are float32: features
# beyond this magnitude would overflow the keys or lose whole lattice steps to rounding.
_MAX_FEATURE = 2.0**22


@torch.library.custom_op("ovseg_fast::dense_crf", mutates_args=())
def _dense_crf_op(
    probs: Tensor,
    image: Tensor,
    n_iters: int,
    gaussian_sxy: float,
    gaussian_compat: float,
    bilateral_sxy: float,
    bilateral_srgb: float,
    bilateral_compat: float,
    clip: float,
) -> Tensor:
    """Marginals (B, C, H, W) float32 from (B, C, H, W) float32 probs and a (B, 3, H, W) uint8 image."""
    lo, hi = value_range(probs) if probs.numel() else (0.0, 1.0)
    if not (lo >= 0 and hi <= 1):  # NaN fails too
        bad = "non-finite" if not (math.isfinite(lo) and math.isfinite(hi)) else "outside [0, 1]"
        raise ValueError(
            f"dense_crf: probs has values {bad}; it must hold class probabilities in [0, 1] "
            "(apply a softmax to logits first)"
        )
    if probs.numel() == 0:
        return torch.empty_like(probs, memory_format=torch.contiguous_format)
    args = (probs, image, n_iters, gaussian_sxy, gaussian_compat, bilateral_sxy, bilateral_srgb, bilateral_compat, clip)
    return dispatch(
        "dense_crf",
        probs,
        {
            "reference": lambda: dense_crf_reference(*args),
            "cpu": lambda: torch.ops.ovseg_fast.dense_crf_cpu_forward(*args),
        },
    )


@_dense_crf_op.register_fake
def _dense_crf_fake(probs, image, *args):
    return torch.empty_like(probs, memory_format=torch.contiguous_format)


def dense_crf_flops(
    batch: int, classes: int, height: int, width: int, n_iters: int, *, gaussian: bool = True, bilateral: bool = True
) -> int:
    """FLOPs of the mean-field iterations (2 per multiply-add, ``exp`` as one), lattice construction excluded.

    Per iteration and pixel, for a lattice of dimension d: splat and slice touch the d+1 simplex
    vertices (one multiply-add per class each, ``4 (d+1) C``), the blur costs 3 FLOPs per vertex, class
    and axis (at most d+1 vertices per pixel: ``3 (d+1)^2 C`` bounds it), and the unary add plus the
    softmax cost ``5 C`` (add, max, subtract, exp, normalise). Gaussian d = 2, bilateral d = 5.
    """
    per_pixel = 5 * classes
    for d, used in ((2, gaussian), (5, bilateral)):
        if used:
            per_pixel += 4 * (d + 1) * classes + 3 * (d + 1) * (d + 1) * classes
    return batch * height * width * (5 * classes + n_iters * per_pixel)


@register_flop_formula(torch.ops.ovseg_fast.dense_crf)
def _dense_crf_flop_formula(probs_shape, image_shape, n_iters, gsxy, gcompat, bsxy, bsrgb, bcompat, clip, **kwargs):
    b, c, h, w = probs_shape
    return dense_crf_flops(b, c, h, w, n_iters, gaussian=gcompat != 0.0, bilateral=bcompat != 0.0)


def _check_no_grad(name: str, t: Tensor) -> None:
    if t.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(
            f"dense_crf: {name} requires grad, but dense_crf is inference only (no gradient is defined); "
            f"pass {name}.detach() or call it under torch.no_grad()"
        )


def dense_crf(
    probs: Tensor,
    image: Tensor,
    *,
    n_iters: int = 10,
    gaussian_sxy: float = 3.0,
    gaussian_compat: float = 3.0,
    bilateral_sxy: float = 80.0,
    bilateral_srgb: float = 13.0,
    bilateral_compat: float = 10.0,
    clip: float = 1e-5,
) -> Tensor:
    r"""Fully connected CRF over the pixels of a batch of images (Kraehenbuehl & Koltun 2011).

    Exactly pydensecrf's ``DenseCRF2D`` pipeline::

        d = DenseCRF2D(W, H, C)
        d.setUnaryEnergy(unary_from_softmax(probs, clip=clip))          # U = -log(clip(P, clip, 1))
        d.addPairwiseGaussian(sxy=gaussian_sxy, compat=gaussian_compat)
        d.addPairwiseBilateral(sxy=bilateral_sxy, srgb=bilateral_srgb, rgbim=image, compat=bilateral_compat)
        Q = d.inference(n_iters)

    i.e. ``n_iters`` mean-field updates
    :math:`Q_i(l) \propto \exp(-U_i(l) + \sum_k w_k n^k_i \sum_j k^k(f_i, f_j) n^k_j Q_j(l))` with Potts
    compatibilities ``w_k``, symmetric normalisation :math:`n^k_i = (\sum_j k^k(f_i, f_j))^{-1/2}`, the
    smoothness kernel on ``(x, y) / gaussian_sxy`` and the appearance kernel on
    ``(x / bilateral_sxy, y / bilateral_sxy, r / srgb, g / srgb, b / srgb)``, both
    ``exp(-|f_i - f_j|^2 / 2)`` filtered on the permutohedral lattice (Adams et al. 2010) with the same
    embedding as pydensecrf, so labels agree with it pixel for pixel up to float32 rounding.

    Args:
        probs: (B, C, H, W) class probabilities (e.g. a softmax), or (C, H, W) for one image. Values
            must lie in [0, 1]; float32, float64, float16 or bfloat16 (computed in float32, as pydensecrf).
        image: (B, 3, H, W) uint8 RGB images ((3, H, W) with 3-D ``probs``), same H and W as ``probs``.
        n_iters: mean-field iterations, >= 0 (0 returns the normalised clipped probabilities).
        gaussian_sxy: spatial std (pixels) of the smoothness kernel, > 0.
        gaussian_compat: Potts weight of the smoothness kernel (0 disables it).
        bilateral_sxy: spatial std (pixels) of the appearance kernel, > 0.
        bilateral_srgb: colour std (intensity levels) of the appearance kernel, > 0.
        bilateral_compat: Potts weight of the appearance kernel (0 disables it).
        clip: probabilities are clipped to ``[clip, 1]`` before the log (``unary_from_softmax``'s
            default 1e-5), in (0, 1].

    Returns:
        Marginals Q, shape and dtype of ``probs``; ``Q.argmax(1)`` are the labels.

    Inference only: no gradient is defined; if ``probs`` requires grad while grad mode is on, this
    raises (detach it or use ``torch.no_grad()``).

    Backends: the fused C++ kernel for CPU tensors (lattices built once per image, all iterations
    fused, threads over the batch or within an image); elsewhere (GPUs) the device-agnostic reference.
    Known difference from pydensecrf: when H*W is not a multiple of 4 pydensecrf's SSE code adds a
    few phantom lattice vertices for the zero feature vector; they only shift values near black
    top-left pixels by float-rounding-level amounts, and are not reproduced.
    """
    check_tensor("probs", probs, ndim=(3, 4), dtypes=FLOATING)
    check_tensor("image", image, ndim=(probs.dim(),), dtypes=(torch.uint8,))
    n_iters = check_int("n_iters", n_iters, minimum=0)
    gaussian_sxy = check_float("gaussian_sxy", gaussian_sxy, positive=True)
    gaussian_compat = check_float("gaussian_compat", gaussian_compat)
    bilateral_sxy = check_float("bilateral_sxy", bilateral_sxy, positive=True)
    bilateral_srgb = check_float("bilateral_srgb", bilateral_srgb, positive=True)
    bilateral_compat = check_float("bilateral_compat", bilateral_compat)
    clip = check_float("clip", clip, positive=True)
    if clip > 1.0:
        raise ValueError(f"clip must be in (0, 1], got {clip}")
    single = probs.dim() == 3
    p = probs.unsqueeze(0) if single else probs
    im = image.unsqueeze(0) if single else image
    b, _, h, w = p.shape
    expected = (3, h, w) if single else (b, 3, h, w)
    if tuple(image.shape) != expected:
        raise ValueError(
            f"image must have shape {expected} (RGB, same batch and size as probs {tuple(probs.shape)}), "
            f"got {tuple(image.shape)}"
        )
    check_same_device("probs", probs, image=image)
    _check_no_grad("probs", probs)
    for name, s in (("gaussian_sxy", gaussian_sxy), ("bilateral_sxy", bilateral_sxy)):
        if max(h, w) / s > _MAX_FEATURE:
            raise ValueError(
                f"{name}={s:g} is too small for a {h}x{w} image (features beyond 2^22 overflow the lattice)"
            )
    if 255.0 / bilateral_srgb > _MAX_FEATURE:
        raise ValueError(f"bilateral_srgb={bilateral_srgb:g} is too small (features beyond 2^22 overflow the lattice)")

    out = _dense_crf_op(
        p.detach().to(torch.float32).contiguous(),
        im.contiguous(),
        n_iters,
        gaussian_sxy,
        gaussian_compat,
        bilateral_sxy,
        bilateral_srgb,
        bilateral_compat,
        clip,
    )
    out = out.to(probs.dtype)
    return out[0] if single else out


def gaussian_blur(x: Tensor, sigma: Union[float, Sequence[float]], *, truncate: float = 4.0) -> Tensor:
    """Gaussian blur over the last two dims of ``x`` (..., H, W), as ``scipy.ndimage.gaussian_filter``.

    Separable: the 1-D kernel ``exp(-t^2 / (2 sigma^2))`` on ``t = -r..r`` with
    ``r = int(truncate * sigma + 0.5)``, normalised to sum 1, applied along H then W, with scipy's
    ``mode='reflect'`` boundary (half-sample symmetric, ``d c b a | a b c d | d c b a``, repeated when
    the kernel is longer than the image). Equals ``scipy.ndimage.gaussian_filter(x[i], sigma,
    truncate=truncate)`` for every leading index ``i``.

    Args:
        x: (..., H, W) float tensor (float32, float64, float16, bfloat16; half types are filtered in
            float32 and rounded back), any device, any number of leading (batch/channel) dims.
        sigma: std in pixels, one value or ``(sigma_y, sigma_x)``, each >= 0 (0 leaves that axis as is).
        truncate: kernel radius in stds, > 0.

    Returns:
        The blurred tensor, same shape, dtype and device.

    Plain PyTorch (index_select for the reflected border, then two 1-D convolutions), so it runs on
    any device, under ``torch.compile``, and is differentiable (unlike :func:`dense_crf`).
    """
    check_tensor("x", x, dtypes=FLOATING)
    if x.dim() < 2:
        raise ValueError(f"x must have at least 2 dimensions (..., H, W), got shape {tuple(x.shape)}")
    if isinstance(sigma, (list, tuple)):
        if len(sigma) != 2:
            raise ValueError(f"sigma must be one value or (sigma_y, sigma_x), got {len(sigma)} values")
        sig = tuple(check_float(f"sigma[{i}]", s, minimum=0.0) for i, s in enumerate(sigma))
    else:
        s = check_float("sigma", sigma, minimum=0.0)
        sig = (s, s)
    truncate = check_float("truncate", truncate, positive=True)
    for s in sig:
        radius = int(truncate * s + 0.5)
        if radius > 10_000_000 or not math.isfinite(truncate * s):
            raise ValueError(f"sigma * truncate = {truncate * s:g} gives a kernel too large to build")
    return gaussian_blur_reference(x, sig, truncate)


class DenseCRF(nn.Module):
    """Module form of :func:`dense_crf` (no parameters): ``forward(probs, image) -> marginals``."""

    def __init__(
        self,
        n_iters: int = 10,
        gaussian_sxy: float = 3.0,
        gaussian_compat: float = 3.0,
        bilateral_sxy: float = 80.0,
        bilateral_srgb: float = 13.0,
        bilateral_compat: float = 10.0,
        clip: float = 1e-5,
    ):
        super().__init__()
        self.n_iters = check_int("n_iters", n_iters, minimum=0)
        self.gaussian_sxy = check_float("gaussian_sxy", gaussian_sxy, positive=True)
        self.gaussian_compat = check_float("gaussian_compat", gaussian_compat)
        self.bilateral_sxy = check_float("bilateral_sxy", bilateral_sxy, positive=True)
        self.bilateral_srgb = check_float("bilateral_srgb", bilateral_srgb, positive=True)
        self.bilateral_compat = check_float("bilateral_compat", bilateral_compat)
        self.clip = check_float("clip", clip, positive=True)

    def forward(self, probs: Tensor, image: Tensor) -> Tensor:
        return dense_crf(
            probs,
            image,
            n_iters=self.n_iters,
            gaussian_sxy=self.gaussian_sxy,
            gaussian_compat=self.gaussian_compat,
            bilateral_sxy=self.bilateral_sxy,
            bilateral_srgb=self.bilateral_srgb,
            bilateral_compat=self.bilateral_compat,
            clip=self.clip,
        )

    def extra_repr(self) -> str:
        return (
            f"n_iters={self.n_iters}, gaussian_sxy={self.gaussian_sxy}, gaussian_compat={self.gaussian_compat}, "
            f"bilateral_sxy={self.bilateral_sxy}, bilateral_srgb={self.bilateral_srgb}, "
            f"bilateral_compat={self.bilateral_compat}, clip={self.clip}"
        )
