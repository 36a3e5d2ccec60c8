r"""Plain-PyTorch reference of the dense CRF and the Gaussian blur: the readable spec of
``ovseg_fast.ops.dense_crf``.

Dense CRF (Kraehenbuehl and Koltun, "Efficient Inference in Fully Connected CRFs with Gaussian Edge
Potentials", NIPS 2011), with exactly pydensecrf's ``DenseCRF2D`` semantics. For one image of N
pixels and C classes::

    U_i(l)   = -log(clip(P_i(l), clip, 1))                      unary (pydensecrf's unary_from_softmax)
    Q^0_i    = softmax_l(-U_i)
    Q^t_i(l) = softmax_l( -U_i(l) + sum_k w_k  n^k_i  sum_j k^k(f^k_i, f^k_j) n^k_j Q^{t-1}_j(l) )
    n^k_i    = 1 / sqrt(sum_j k^k(f^k_i, f^k_j) + 1e-20)        (NORMALIZE_SYMMETRIC)

with the Potts compatibility folded in (a Potts model of weight ``w`` adds ``w * filtered Q`` to the
logits of the same label, which equals penalising different labels up to a per-pixel constant), and
two kernels ``k(f_i, f_j) ~ exp(-|f_i - f_j|^2 / 2)`` on the features

    smoothness (Gaussian)   f = (x / gaussian_sxy, y / gaussian_sxy)
    appearance (bilateral)  f = (x / bilateral_sxy, y / bilateral_sxy, r / srgb, g / srgb, b / srgb)

(x the column, y the row, in that order). The sums over all pixel pairs are not computed exactly:
as in pydensecrf, the kernel is the permutohedral-lattice approximation of Adams, Baek and Davis
("Fast High-Dimensional Filtering Using the Permutohedral Lattice", Eurographics 2010): every
feature vector is *elevated* onto the hyperplane ``H_d = {x in R^{d+1}: sum x = 0}``, scaled so the
lattice blur has the expected standard deviation (their p. 6), its enclosing simplex of the lattice
``A*_d`` is found by rounding to the nearest remainder-0 point and sorting the differences, and then

    splat   each value is added to the d+1 vertices of its simplex with barycentric weights,
    blur    along each of the d+1 lattice axes, v <- v + (v_prev + v_next) / 2,
    slice   each pixel reads back the barycentric combination of its vertices (times 1 / (1 + 2^-d)).

The lattice is not rotation invariant, so the features are built and embedded exactly as in the
reference implementation (same order, same scale factors, same float32 rounding), which is what
makes the result agree with pydensecrf's pixel for pixel. The symmetric normalisation makes the
result independent of the kernel's overall scale.

``exact_filter`` is the O(N^2) Gaussian the lattice approximates, for tiny images in tests.

The reference is device-agnostic (index, ``index_add_`` and ``torch.unique`` only): it is also the
GPU implementation for now. It is inference only, as is the op.

Gaussian blur: ``gaussian_blur_reference`` is ``scipy.ndimage.gaussian_filter`` over the last two
dims: the 1-D kernel ``exp(-x^2 / (2 sigma^2))`` on ``x = -r..r``, ``r = int(truncate * sigma + 0.5)``,
normalised to sum 1, with scipy's 'reflect' boundary (half-sample symmetric: ``d c b a | a b c d |
d c b a``, repeated with period 2n when the kernel is longer than the line), one axis after the other.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "Lattice",
    "bilateral_features",
    "build_lattice",
    "dense_crf_exact_reference",
    "dense_crf_reference",
    "exact_filter",
    "gaussian_blur_reference",
    "gaussian_features",
    "gaussian_kernel1d",
    "lattice_filter",
    "reflect_indices",
]

#: pydensecrf adds this before the inverse square root of the normalisation.
NORM_EPS = 1e-20


# ----------------------------------------------------------------------------------------------------
# Features
# ----------------------------------------------------------------------------------------------------


def _f32(x: float) -> float:
    """The float32 value of a parameter, as pydensecrf receives it (a C ``float``)."""
    return float(np.float32(x))


def gaussian_features(height: int, width: int, sxy: float, device=None) -> Tensor:
    """(H*W, 2) float32 features ``(x / sxy, y / sxy)``, pixels in row-major order."""
    s = torch.tensor(_f32(sxy), dtype=torch.float32, device=device)
    xs = torch.arange(width, dtype=torch.float32, device=device) / s
    ys = torch.arange(height, dtype=torch.float32, device=device) / s
    return torch.stack([xs.expand(height, width), ys[:, None].expand(height, width)], -1).reshape(-1, 2)


def bilateral_features(image: Tensor, sxy: float, srgb: float) -> Tensor:
    """(H*W, 5) float32 features ``(x / sxy, y / sxy, r / srgb, g / srgb, b / srgb)`` of a (3, H, W) image."""
    _, h, w = image.shape
    pos = gaussian_features(h, w, sxy, image.device)
    s = torch.tensor(_f32(srgb), dtype=torch.float32, device=image.device)
    rgb = image.reshape(3, -1).t().to(torch.float32) / s
    return torch.cat([pos, rgb], 1)


# ----------------------------------------------------------------------------------------------------
# Permutohedral lattice
# ----------------------------------------------------------------------------------------------------


class Lattice(NamedTuple):
    """A permutohedral lattice built for N feature vectors of dimension d.

    offsets: (N, d+1) int64, the vertices of each point's simplex (rows of the value buffer).
    weights: (N, d+1) float32, the barycentric weights (sum 1 per point).
    neighbors: (d+1, M, 2) int64, the previous and next vertex along each lattice axis; a missing
        neighbour points at row M, which is kept at zero.
    """

    offsets: Tensor
    weights: Tensor
    neighbors: Tensor
    n_vertices: int

    @property
    def dim(self) -> int:
        return self.offsets.shape[1] - 1


def elevation_scale(d: int) -> Tensor:
    """The diagonal of the elevation matrix times the expected std (Adams et al. 2010, pp. 5-6),
    rounded as pydensecrf rounds it: the std in float32, each factor computed in double, stored as float32."""
    inv_std = float(np.float32(math.sqrt(2.0 / 3.0) * (d + 1)))
    return torch.tensor([1.0 / math.sqrt((i + 2) * (i + 1)) * inv_std for i in range(d)], dtype=torch.float32)


def _unique_rows(keys: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.unique(keys, dim=0, return_inverse=True)`` (rows of small ints)."""
    return torch.unique(keys, dim=0, return_inverse=True)


def build_lattice(features: Tensor) -> Lattice:
    """Embeds (N, d) float32 features in the permutohedral lattice (Adams et al. 2010, Sec. 3-4)."""
    n, d = features.shape
    device = features.device
    dp1 = d + 1
    inv = _f32(1.0 / dp1)
    cf = features * elevation_scale(d).to(device)  # (N, d)

    # Elevation E f: e_0 = sum_k cf_k, e_j = sum_{k > j} cf_k - j cf_j (1-based k, j), accumulated from
    # the last coordinate down as in the reference implementation.
    suffix = torch.flip(torch.cumsum(torch.flip(cf, [1]), 1), [1])  # suffix[:, j] = sum_{k >= j} cf[:, k]
    tail = torch.cat([suffix[:, 1:], cf.new_zeros(n, 1)], 1)
    j = torch.arange(1, d + 1, dtype=torch.float32, device=device)
    elevated = torch.cat([suffix[:, :1], tail - j * cf], 1)  # (N, d+1)

    # Nearest remainder-0 lattice point (coordinates multiples of d+1), rounding half to even as SSE does.
    v = torch.round(elevated * inv)
    rem0 = v * dp1
    total = v.sum(1).to(torch.int64)  # (N,) the point's distance off the plane, in lattice steps

    # Rank of each coordinate of the remainder in decreasing order (ties: the earlier index ranks first).
    diff = elevated - rem0
    di, dj = diff[:, :, None], diff[:, None, :]
    later = torch.triu(torch.ones(dp1, dp1, dtype=torch.bool, device=device), 1)  # [i, j]: j > i
    earlier = later.t()
    rank = ((later & (dj > di)) | (earlier & (dj >= di))).sum(2)
    rank = rank + total[:, None]
    low, high = rank < 0, rank > d
    rank = torch.where(low, rank + dp1, torch.where(high, rank - dp1, rank))
    rem0 = torch.where(low, rem0 + dp1, torch.where(high, rem0 - dp1, rem0))

    # Barycentric weights (p. 10): b_p = vs_p - vs_{p-1}, b_0 = vs_0 + (1 - vs_d), vs sorted by d - rank.
    vv = (elevated - rem0) * inv
    vs = torch.zeros_like(vv).scatter_(1, d - rank, vv)
    weights = torch.cat([vs[:, :1] + (1.0 - vs[:, d:]), vs[:, 1:] - vs[:, :-1]], 1)

    # Vertex r of the simplex: rem0 + the canonical simplex's r-th vertex permuted by rank; only the
    # first d coordinates are needed (they sum to zero with the last).
    r = torch.arange(dp1, device=device)
    rem0_i = rem0[:, :d].to(torch.int64)
    keys = rem0_i[:, None, :] + r[None, :, None] - dp1 * (rank[:, None, :d] > (d - r)[None, :, None])
    vertices, offsets = _unique_rows(keys.reshape(-1, d))
    m = vertices.shape[0]

    # Neighbours along axis j: all coordinates -1 except coordinate j which gets +d (and the reverse).
    step = torch.ones(dp1, d, dtype=torch.int64, device=device)
    step[torch.arange(d), torch.arange(d)] = -d
    prev_keys = vertices[None] - step[:, None, :]  # (d+1, M, d)
    next_keys = vertices[None] + step[:, None, :]
    _, ids = _unique_rows(torch.cat([vertices, prev_keys.reshape(-1, d), next_keys.reshape(-1, d)]))
    table = torch.full((int(ids.max()) + 1,), m, dtype=torch.int64, device=device)
    table[ids[:m]] = torch.arange(m, device=device)
    nb = table[ids[m:]].view(2, dp1, m)
    neighbors = torch.stack([nb[0], nb[1]], -1)
    return Lattice(offsets.view(n, dp1), weights, neighbors, m)


def lattice_filter(lattice: Lattice, values: Tensor) -> Tensor:
    """Splat (N, C) values on the lattice, blur along every axis, slice back: ~ sum_j k(f_i, f_j) v_j."""
    n, c = values.shape
    d, m = lattice.dim, lattice.n_vertices
    buf = values.new_zeros(m + 1, c)  # row m: the absent neighbour, always zero
    for r in range(d + 1):
        buf.index_add_(0, lattice.offsets[:, r], values * lattice.weights[:, r : r + 1].to(values.dtype))
    for j in range(d + 1):
        nb = lattice.neighbors[j]
        blurred = buf[:m] + 0.5 * (buf[nb[:, 0]] + buf[nb[:, 1]])
        buf = torch.cat([blurred, buf[m:]])
    alpha = 1.0 / (1.0 + 2.0 ** (-d))  # Adams et al.'s correction of the blur's total weight
    out = values.new_zeros(n, c)
    for r in range(d + 1):
        out += (lattice.weights[:, r : r + 1] * alpha).to(values.dtype) * buf[lattice.offsets[:, r]]
    return out


def exact_filter(features: Tensor, values: Tensor) -> Tensor:
    """The O(N^2) Gaussian the lattice approximates: ``sum_j exp(-|f_i - f_j|^2 / 2) v_j`` (tiny images)."""
    f = features.to(torch.float64)
    k = torch.exp(-0.5 * torch.cdist(f, f).square())
    return (k @ values.to(torch.float64)).to(values.dtype)


# ----------------------------------------------------------------------------------------------------
# Mean field
# ----------------------------------------------------------------------------------------------------


def _mean_field(log_probs: Tensor, kernels, n_iters: int) -> Tensor:
    """Mean-field updates on (N, C) ``-U``, kernels = [(filter(values) -> values, compat)]."""
    n = log_probs.shape[0]
    ones = log_probs.new_ones(n, 1)
    normalised = []
    for filt, compat in kernels:
        norm = torch.rsqrt(filt(ones) + NORM_EPS)
        normalised.append((filt, norm, compat))
    q = torch.softmax(log_probs, 1)
    for _ in range(n_iters):
        logits = log_probs
        for filt, norm, compat in normalised:
            logits = logits + compat * (norm * filt(q * norm))
        q = torch.softmax(logits, 1)
    return q


def _unary(probs: Tensor, clip: float) -> Tensor:
    """(C, H, W) probabilities -> (N, C) ``-U = log(clip(P, clip, 1))``."""
    c = probs.shape[0]
    return torch.log(probs.clamp(clip, 1.0)).reshape(c, -1).t().contiguous()


def dense_crf_reference(
    probs: Tensor,
    image: Tensor,
    n_iters: int,
    gaussian_sxy: float,
    gaussian_compat: float,
    bilateral_sxy: float,
    bilateral_srgb: float,
    bilateral_compat: float,
    clip: float = 1e-5,
) -> Tensor:
    """Marginals (B, C, H, W) float32 of the dense CRF on (B, C, H, W) float32 probs and (B, 3, H, W) uint8 images.

    A kernel whose compatibility is 0 contributes nothing and is skipped.
    """
    b, c, h, w = probs.shape
    out = probs.new_empty(b, c, h, w)
    for i in range(b):
        kernels = []
        if gaussian_compat != 0.0:
            lat = build_lattice(gaussian_features(h, w, gaussian_sxy, probs.device))
            kernels.append((lambda v, lat=lat: lattice_filter(lat, v), _f32(gaussian_compat)))
        if bilateral_compat != 0.0:
            lat = build_lattice(bilateral_features(image[i], bilateral_sxy, bilateral_srgb))
            kernels.append((lambda v, lat=lat: lattice_filter(lat, v), _f32(bilateral_compat)))
        q = _mean_field(_unary(probs[i], clip), kernels, n_iters)
        out[i] = q.t().reshape(c, h, w)
    return out


def dense_crf_exact_reference(
    probs: Tensor,
    image: Tensor,
    n_iters: int,
    gaussian_sxy: float,
    gaussian_compat: float,
    bilateral_sxy: float,
    bilateral_srgb: float,
    bilateral_compat: float,
    clip: float = 1e-5,
) -> Tensor:
    """The same mean field with the exact O(N^2) Gaussian kernels instead of the lattice (tiny images)."""
    b, c, h, w = probs.shape
    out = probs.new_empty(b, c, h, w)
    for i in range(b):
        kernels = []
        if gaussian_compat != 0.0:
            f = gaussian_features(h, w, gaussian_sxy, probs.device)
            kernels.append((lambda v, f=f: exact_filter(f, v), _f32(gaussian_compat)))
        if bilateral_compat != 0.0:
            f = bilateral_features(image[i], bilateral_sxy, bilateral_srgb)
            kernels.append((lambda v, f=f: exact_filter(f, v), _f32(bilateral_compat)))
        q = _mean_field(_unary(probs[i], clip), kernels, n_iters)
        out[i] = q.t().reshape(c, h, w)
    return out


# ----------------------------------------------------------------------------------------------------
# Gaussian blur
# ----------------------------------------------------------------------------------------------------


def gaussian_kernel1d(sigma: float, truncate: float, dtype=torch.float64, device=None) -> Tensor:
    """scipy.ndimage's 1-D Gaussian: radius ``int(truncate * sigma + 0.5)``, normalised to sum 1."""
    radius = int(truncate * float(sigma) + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 / (float(sigma) ** 2) * x * x)
    return (k / k.sum()).to(dtype=dtype, device=device)


def reflect_indices(n: int, radius: int, device=None) -> Tensor:
    """Source index of each of the ``n + 2 radius`` padded positions under scipy's 'reflect' mode."""
    i = torch.arange(-radius, n + radius, device=device) % (2 * n)
    return torch.where(i >= n, 2 * n - 1 - i, i)


def gaussian_blur_reference(x: Tensor, sigma: Union[float, Sequence[float]], truncate: float = 4.0) -> Tensor:
    """Separable Gaussian over the last two dims of ``x`` (..., H, W), scipy.ndimage.gaussian_filter's semantics.

    ``sigma`` is one value or ``(sigma_y, sigma_x)``; an axis with sigma 0 is left as is (as in scipy).
    Half-precision inputs are filtered in float32 and rounded back.
    """
    sig = (float(sigma), float(sigma)) if isinstance(sigma, (int, float)) else tuple(float(s) for s in sigma)
    if x.numel() == 0:
        return x.clone()
    ct = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    *lead, h, w = x.shape
    y = x.reshape(-1, 1, h, w).to(ct)
    for axis, s in ((2, sig[0]), (3, sig[1])):
        if s == 0.0:
            continue
        k = gaussian_kernel1d(s, truncate, ct, x.device)
        radius = (k.numel() - 1) // 2
        n = y.shape[axis]
        y = y.index_select(axis, reflect_indices(n, radius, x.device))
        weight = k.view(1, 1, -1, 1) if axis == 2 else k.view(1, 1, 1, -1)
        y = F.conv2d(y, weight)
    return y.reshape(*lead, h, w).to(x.dtype)
