"""Tests of ovseg_fast.ops.dense_crf and gaussian_blur: pydensecrf agreement, lattice vs exact filter,
C++ kernel vs reference, scipy blur, registration, inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from ovseg_fast.bench._crf_inputs import class_map, photo, pydensecrf_marginals
from ovseg_fast.ops import use_backend
from ovseg_fast.ops.dense_crf import DenseCRF, dense_crf, dense_crf_flops, gaussian_blur
from ovseg_fast.ops.dense_crf_reference import (
    bilateral_features,
    build_lattice,
    dense_crf_exact_reference,
    dense_crf_reference,
    exact_filter,
    gaussian_features,
    lattice_filter,
)
from tests.helpers import CPU_CAPABILITIES, require_backend, run_under_capability

OP = torch.ops.ovseg_fast.dense_crf
DEFAULTS = dict(gaussian_sxy=3.0, gaussian_compat=3.0, bilateral_sxy=80.0, bilateral_srgb=13.0, bilateral_compat=10.0)
PARAMS = {
    "defaults": DEFAULTS,
    "pnp_ovss": dict(
        gaussian_sxy=1.0, gaussian_compat=3.0, bilateral_sxy=60.0, bilateral_srgb=5.0, bilateral_compat=5.0
    ),
    "wide": dict(gaussian_sxy=5.0, gaussian_compat=1.5, bilateral_sxy=30.0, bilateral_srgb=20.0, bilateral_compat=4.0),
}


def as_inputs(probs: np.ndarray, img: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(probs), torch.from_numpy(img).permute(2, 0, 1)  # image stays a (non-contiguous) view


def random_inputs(b, c, h, w, seed=0, smooth=True):
    gen = torch.Generator().manual_seed(seed)
    probs = torch.softmax(3 * torch.randn(b, c, h, w, generator=gen), 1)
    if smooth:  # blobs of colour, so the bilateral kernel has neighbours in colour space too
        base = torch.randint(0, 256, (b, 3, max(1, h // 4), max(1, w // 4)), generator=gen).float()
        img = torch.nn.functional.interpolate(base, size=(h, w), mode="bilinear", align_corners=False)
        img = (img + 8 * torch.randn(img.shape, generator=gen)).clamp(0, 255).to(torch.uint8)
    else:
        img = torch.randint(0, 256, (b, 3, h, w), generator=gen, dtype=torch.uint8)
    return probs, img


def label_agreement(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float((a.argmax(0) == b.argmax(0)).mean())


# ---------------------------------------------------------------------------------------------
# The reference is the spec: it must be pydensecrf, and its lattice must approximate the Gaussian.

# float32 rounding differences (summation order, exp/log implementations) compound over the
# iterations; agreement is at this level, orders of magnitude below any semantic difference
# (a wrong normalisation, kernel order or lattice scale moves marginals by >1e-2).
MARGINAL_ATOL = 2e-4


@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea"])
def test_reference_matches_pydensecrf(name):
    img = photo(name, 40, 60, 40, 56)
    probs = class_map(img, n_classes=6, stride=4)
    p = PARAMS["pnp_ovss"] if name == "coffee" else DEFAULTS
    expected = pydensecrf_marginals(probs, img, 5, p)
    t_probs, t_img = as_inputs(probs, img)
    got = dense_crf_reference(t_probs[None], t_img[None].contiguous(), 5, *p.values())[0].numpy()
    np.testing.assert_allclose(got, expected, atol=MARGINAL_ATOL, rtol=0)
    assert label_agreement(got, expected) == 1.0


@pytest.mark.parametrize("params", list(PARAMS))
@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea"])
def test_cpu_kernel_matches_pydensecrf(name, params):
    require_backend("dense_crf", "cpu")
    img = photo(name, 0, 0, 160, 200)
    probs = class_map(img, seed=1)
    p = PARAMS[params]
    expected = pydensecrf_marginals(probs, img, 10, p)
    t_probs, t_img = as_inputs(probs, img)
    with use_backend("cpu"):
        got = dense_crf(t_probs, t_img, n_iters=10, **p).numpy()
    np.testing.assert_allclose(got, expected, atol=MARGINAL_ATOL, rtol=0)
    # Labels may only differ where pydensecrf's two best classes are tied to within the rounding level.
    top2 = np.sort(expected, 0)[-2:]
    decided = (top2[1] - top2[0]) > 2 * MARGINAL_ATOL
    assert (got.argmax(0) == expected.argmax(0))[decided].all()
    assert label_agreement(got, expected) >= 0.999


def test_lattice_approximates_the_unit_gaussian():
    """Splat-blur-slice ~ sum_j exp(-|f_i - f_j|^2 / 2) v_j: normalised outputs agree with the exact
    filter, and better than with a Gaussian of std 0.8 or 1.25 (so the lattice's scale is right)."""
    img = torch.from_numpy(photo("astronaut", 100, 200, 24, 30)[::2, ::2].copy()).permute(2, 0, 1).contiguous()
    gen = torch.Generator().manual_seed(0)
    for feats, bound in ((gaussian_features(16, 20, 3.0), 0.005), (bilateral_features(img, 4.0, 20.0), 0.01)):
        lat = build_lattice(feats)
        v = torch.rand(feats.shape[0], 3, generator=gen)
        ones = torch.ones(feats.shape[0], 1)
        approx = lattice_filter(lat, v) / lattice_filter(lat, ones)
        errors = {}
        for s in (0.8, 1.0, 1.25):
            exact = exact_filter(feats / s, v) / exact_filter(feats / s, ones)
            errors[s] = float((approx - exact).abs().mean())
        assert errors[1.0] < bound, errors
        assert errors[1.0] < min(errors[0.8], errors[1.25]), errors
        assert lat.weights.sum(1).sub(1).abs().max() < 1e-5  # barycentric weights of each point sum to 1


def test_lattice_crf_agrees_with_exact_crf_on_tiny_images():
    img = photo("chelsea", 120, 180, 24, 28)
    probs = class_map(img, n_classes=4, stride=4, seed=2)
    t_probs, t_img = as_inputs(probs, img)
    p = dict(gaussian_sxy=3.0, gaussian_compat=3.0, bilateral_sxy=10.0, bilateral_srgb=13.0, bilateral_compat=5.0)
    lattice = dense_crf_reference(t_probs[None], t_img[None].contiguous(), 5, *p.values())[0]
    exact = dense_crf_exact_reference(t_probs[None], t_img[None].contiguous(), 5, *p.values())[0]
    assert label_agreement(lattice, exact) >= 0.97
    assert float((lattice - exact).abs().mean()) < 0.02
    # The CRF does something: it changes labels of the noisy input.
    assert label_agreement(exact, t_probs) < 0.99


# ---------------------------------------------------------------------------------------------
# The C++ kernel against the reference.

SHAPES = [(1, 1, 1, 1), (1, 2, 1, 9), (2, 3, 7, 5), (1, 21, 13, 17), (2, 9, 16, 12), (1, 70, 6, 11)]


@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
@pytest.mark.parametrize("n_iters", [0, 1, 4])
def test_cpu_kernel_matches_reference(shape, n_iters):
    require_backend("dense_crf", "cpu")
    probs, img = random_inputs(*shape, seed=sum(shape) + n_iters)
    p = dict(gaussian_sxy=2.0, gaussian_compat=3.0, bilateral_sxy=6.0, bilateral_srgb=20.0, bilateral_compat=5.0)
    with use_backend("cpu"):
        got = dense_crf(probs, img, n_iters=n_iters, **p)
    ref = dense_crf_reference(probs, img, n_iters, *p.values())
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-5)
    torch.testing.assert_close(got.sum(1), torch.ones_like(got[:, 0]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("which", ["gaussian_only", "bilateral_only", "none"])
def test_disabled_kernels(which):
    require_backend("dense_crf", "cpu")
    probs, img = random_inputs(1, 5, 12, 10, seed=3)
    p = dict(DEFAULTS, bilateral_sxy=8.0)
    if which in ("gaussian_only", "none"):
        p["bilateral_compat"] = 0.0
    if which in ("bilateral_only", "none"):
        p["gaussian_compat"] = 0.0
    with use_backend("cpu"):
        got = dense_crf(probs, img, n_iters=3, **p)
    torch.testing.assert_close(got, dense_crf_reference(probs, img, 3, *p.values()), rtol=0, atol=2e-5)
    if which == "none":  # no pairwise term: the clipped, renormalised unary
        torch.testing.assert_close(got, probs.clamp(1e-5, 1) / probs.clamp(1e-5, 1).sum(1, keepdim=True))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_batch_of_different_images_equals_one_by_one(backend, threads):
    require_backend("dense_crf", backend)
    # 3 images on 2 threads: the first two over the batch, the third within the image on both threads.
    probs, img = random_inputs(3, 6, 20, 14, seed=4)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        with use_backend(backend):
            batched = dense_crf(probs, img, n_iters=3)
            alone = torch.stack([dense_crf(probs[i], img[i], n_iters=3) for i in range(3)])
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(batched, alone, rtol=0, atol=1e-6)


def test_thread_count_changes_only_rounding():
    require_backend("dense_crf", "cpu")
    probs, img = random_inputs(1, 7, 40, 33, seed=5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = dense_crf(probs, img, n_iters=5)
        torch.set_num_threads(max(2, threads))
        many = dense_crf(probs, img, n_iters=5)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(one, many, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_other_dtypes_compute_in_float32(dtype):
    probs, img = random_inputs(1, 4, 9, 8, seed=6)
    out = dense_crf(probs.to(dtype), img, n_iters=2)
    assert out.dtype == dtype
    expected = dense_crf(probs.to(dtype).float(), img, n_iters=2).to(dtype)
    torch.testing.assert_close(out, expected)


def test_single_image_and_non_contiguous_inputs():
    probs, img = random_inputs(2, 5, 11, 13, seed=7)
    ref = dense_crf(probs, img)
    # channels-last image (as from an HWC numpy array) and a transposed-then-restored probs layout
    img_cl = img.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    probs_nc = probs.transpose(2, 3).contiguous().transpose(2, 3)
    torch.testing.assert_close(dense_crf(probs_nc, img_cl), ref, rtol=0, atol=0)
    torch.testing.assert_close(dense_crf(probs[1], img[1]), ref[1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("shape", [(0, 3, 4, 5), (2, 0, 4, 5), (2, 3, 0, 5), (1, 3, 4, 0)])
def test_empty_inputs(backend, shape):
    require_backend("dense_crf", backend)
    b, _, h, w = shape
    with use_backend(backend):
        out = dense_crf(torch.rand(shape), torch.zeros(b, 3, h, w, dtype=torch.uint8))
    assert out.shape == shape


def test_zero_and_one_probabilities_stay_finite():
    probs = torch.zeros(1, 3, 10, 12)
    probs[:, 0, :, :6] = 1.0
    probs[:, 2, :, 6:] = 1.0
    img = torch.zeros(1, 3, 10, 12, dtype=torch.uint8)
    out = dense_crf(probs, img, n_iters=10)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, dense_crf_reference(probs, img, 10, *DEFAULTS.values()), rtol=0, atol=2e-5)


# ---------------------------------------------------------------------------------------------
# Inference only, registration: opcheck, torch.compile, FLOPs.


def test_gradients_are_refused():
    probs, img = random_inputs(1, 3, 5, 6)
    leaf = probs.clone().requires_grad_(True)
    with pytest.raises(RuntimeError, match="inference only"):
        dense_crf(leaf, img)
    with torch.no_grad():
        out = dense_crf(leaf, img)
    assert not out.requires_grad


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_opcheck(backend):
    require_backend("dense_crf", backend)
    probs, img = random_inputs(2, 4, 7, 6, seed=8)
    with use_backend(backend):
        torch.library.opcheck(OP, (probs, img, 3, 3.0, 3.0, 8.0, 13.0, 10.0, 1e-5))


def test_compiled_module_fullgraph():
    module = DenseCRF(n_iters=3, bilateral_sxy=8.0)
    compiled = torch.compile(lambda p, i: module(p, i).argmax(1), fullgraph=True)
    probs, img = random_inputs(2, 5, 9, 10, seed=9)
    torch.testing.assert_close(compiled(probs, img), module(probs, img).argmax(1))
    assert "bilateral_sxy=8.0" in repr(module)


def test_flop_counter():
    probs, img = random_inputs(2, 5, 9, 10)
    with FlopCounterMode(display=False) as counter:
        dense_crf(probs, img, n_iters=3)
    assert counter.get_total_flops() == dense_crf_flops(2, 5, 9, 10, 3) > 0
    assert dense_crf_flops(1, 1, 1, 1, 0) == 5


@pytest.mark.parametrize("capability", CPU_CAPABILITIES)
def test_every_cpu_capability_copy(capability):
    run_under_capability(
        "dense_crf",
        capability,
        """
        import torch
        from ovseg_fast.ops import use_backend
        from ovseg_fast.ops.dense_crf import dense_crf
        from ovseg_fast.ops.dense_crf_reference import dense_crf_reference
        g = torch.Generator().manual_seed(0)
        probs = torch.softmax(3 * torch.randn(2, 21, 23, 19, generator=g), 1)
        img = torch.randint(0, 256, (2, 3, 23, 19), generator=g, dtype=torch.uint8)
        with use_backend("cpu"):
            out = dense_crf(probs, img, n_iters=3, bilateral_sxy=6.0, bilateral_srgb=30.0)
        ref = dense_crf_reference(probs, img, 3, 3.0, 3.0, 6.0, 30.0, 10.0)
        torch.testing.assert_close(out, ref, rtol=0, atol=2e-5)
        """,
    )


# ---------------------------------------------------------------------------------------------
# Gaussian blur vs scipy.ndimage.gaussian_filter.


@pytest.mark.parametrize(
    ("shape", "sigma", "truncate"),
    [
        ((2, 3, 17, 23), 1.0, 4.0),
        ((5, 40, 31), 2.5, 4.0),
        ((1, 12, 9), (0.7, 3.0), 4.0),
        ((2, 8, 8), (0.0, 1.5), 4.0),
        ((3, 6), 4.0, 4.0),  # kernel much longer than the image: repeated reflection
        ((1, 1, 7), 1.3, 2.0),
        ((2, 20, 20), 0.3, 3.0),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gaussian_blur_matches_scipy(shape, sigma, truncate, dtype):
    from scipy import ndimage
    x = torch.randn(shape, dtype=torch.float64).to(dtype)
    got = gaussian_blur(x, sigma, truncate=truncate)
    sig = sigma if isinstance(sigma, tuple) else (sigma, sigma)
    flat = x.double().reshape(-1, *shape[-2:]).numpy()
    expected = np.stack([ndimage.gaussian_filter(a, sig, truncate=truncate, mode="reflect") for a in flat])
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    np.testing.assert_allclose(got.double().numpy().reshape(expected.shape), expected, atol=tol, rtol=0)
    assert got.dtype == dtype and got.shape == x.shape


def test_gaussian_blur_half_precision_compiled_and_differentiable():
    x = torch.randn(2, 3, 10, 12)
    xb = x.to(torch.bfloat16)
    # filtered in float32, rounded once at the end
    expected = gaussian_blur(xb.float(), 1.5).to(torch.bfloat16)
    torch.testing.assert_close(gaussian_blur(xb, 1.5), expected, rtol=0, atol=0)
    compiled = torch.compile(lambda t: gaussian_blur(t, (1.0, 2.0)), fullgraph=True)
    torch.testing.assert_close(compiled(x), gaussian_blur(x, (1.0, 2.0)))
    leaf = x.double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: gaussian_blur(t, 1.2), (leaf[:1, :1, :5, :6].detach().requires_grad_(),))
    assert gaussian_blur(torch.empty(0, 4, 5), 1.0).shape == (0, 4, 5)
    assert gaussian_blur(torch.empty(2, 0, 5), 1.0).shape == (2, 0, 5)


# ---------------------------------------------------------------------------------------------
# Bad inputs.

_P, _I = random_inputs(2, 3, 4, 5)
_P_ONE_NAN = _P.clone()
_P_ONE_NAN[1, 2, 3, 4] = float("nan")
BAD_INPUTS = [
    (dict(probs=[[1.0]]), TypeError, "probs must be a torch.Tensor"),
    (dict(probs=torch.ones(2, 3, 4, 5, dtype=torch.int64)), TypeError, "probs must have dtype"),
    (dict(probs=torch.ones(4, 5)), ValueError, "probs must have 3 or 4 dimensions"),
    (dict(image=_I.float()), TypeError, "image must have dtype uint8"),
    (dict(image=_I[0]), ValueError, "image must have 4 dimensions"),
    (dict(image=_I[:, :2]), ValueError, r"image must have shape \(2, 3, 4, 5\)"),
    (dict(image=_I[:1]), ValueError, r"image must have shape \(2, 3, 4, 5\)"),
    (dict(image=_I[..., :4]), ValueError, r"image must have shape"),
    (dict(image=torch.zeros(2, 3, 4, 5, dtype=torch.uint8, device="meta")), ValueError, "image is on meta"),
    (dict(probs=_P * 3), ValueError, r"outside \[0, 1\]"),
    (dict(probs=torch.log(_P)), ValueError, "apply a softmax"),
    (dict(probs=torch.full((2, 3, 4, 5), float("nan"))), ValueError, "non-finite"),
    (dict(probs=_P_ONE_NAN), ValueError, "non-finite"),  # one NaN among probabilities
    (dict(n_iters=-1), ValueError, "n_iters must be >= 0"),
    (dict(n_iters=2.0), TypeError, "n_iters must be an int"),
    (dict(gaussian_sxy=0.0), ValueError, "gaussian_sxy must be > 0"),
    (dict(bilateral_sxy=-3.0), ValueError, "bilateral_sxy must be > 0"),
    (dict(bilateral_srgb=float("inf")), ValueError, "bilateral_srgb must be finite"),
    (dict(bilateral_srgb=1e-9), ValueError, "bilateral_srgb=1e-09 is too small"),
    (dict(gaussian_sxy=1e-9), ValueError, "gaussian_sxy=1e-09 is too small"),
    (dict(gaussian_compat=float("nan")), ValueError, "gaussian_compat must be finite"),
    (dict(bilateral_compat="10"), TypeError, "bilateral_compat must be a float"),
    (dict(clip=0.0), ValueError, "clip must be > 0"),
    (dict(clip=2.0), ValueError, r"clip must be in \(0, 1\]"),
]


@pytest.mark.parametrize(("kwargs", "exc", "match"), BAD_INPUTS, ids=[m for _, _, m in BAD_INPUTS])
def test_bad_inputs(kwargs, exc, match):
    kwargs = dict(kwargs)
    probs = kwargs.pop("probs", _P)
    image = kwargs.pop("image", _I)
    with pytest.raises(exc, match=match):
        dense_crf(probs, image, **kwargs)


BAD_BLUR = [
    (dict(x=np.zeros((3, 3))), TypeError, "x must be a torch.Tensor"),
    (dict(x=torch.zeros(3, 3, dtype=torch.int32)), TypeError, "x must have dtype"),
    (dict(x=torch.zeros(5)), ValueError, "at least 2 dimensions"),
    (dict(sigma=-1.0), ValueError, "sigma must be >= 0"),
    (dict(sigma=(1.0, 2.0, 3.0)), ValueError, r"sigma must be one value or \(sigma_y, sigma_x\)"),
    (dict(sigma=(1.0, float("nan"))), ValueError, r"sigma\[1\] must be finite"),
    (dict(truncate=0.0), ValueError, "truncate must be > 0"),
    (dict(sigma=1e12), ValueError, "too large"),
]


@pytest.mark.parametrize(("kwargs", "exc", "match"), BAD_BLUR, ids=[m for _, _, m in BAD_BLUR])
def test_gaussian_blur_bad_inputs(kwargs, exc, match):
    kwargs = dict(kwargs)
    x = kwargs.pop("x", torch.zeros(2, 4, 4))
    sigma = kwargs.pop("sigma", 1.0)
    with pytest.raises(exc, match=match):
        gaussian_blur(x, sigma, **kwargs)
