"""ovseg_fast.compat.pydensecrf runs pydensecrf code unchanged and agrees with pydensecrf2 on the dense CRF photos."""

from __future__ import annotations

import numpy as np
import pydensecrf.densecrf as real_dcrf
import pydensecrf.utils as real_utils
import pytest

import ovseg_fast.compat.pydensecrf.densecrf as dcrf
import ovseg_fast.compat.pydensecrf.utils as utils
from ovseg_fast.bench._crf_inputs import class_map, photo
from tests.ops.test_dense_crf import PARAMS

# The bar: pydensecrf's float rounding (and its phantom lattice vertices) may flip pixels whose
# two best classes are nearly tied; anything semantic moves far more than 1.5% of the labels.
MIN_AGREEMENT = 0.985


def script(dcrf_module, utils_module, probs: np.ndarray, img: np.ndarray, p: dict, n_iters: int = 10) -> np.ndarray:
    """A pydensecrf post-processing script, run on whichever module pair it is given."""
    c, h, w = probs.shape
    d = dcrf_module.DenseCRF2D(w, h, c)
    d.setUnaryEnergy(utils_module.unary_from_softmax(probs))
    d.addPairwiseGaussian(sxy=(p["gaussian_sxy"], p["gaussian_sxy"]), compat=p["gaussian_compat"])
    d.addPairwiseBilateral(
        sxy=p["bilateral_sxy"],
        srgb=(p["bilateral_srgb"],) * 3,
        rgbim=img,
        compat=p["bilateral_compat"],
        kernel=dcrf_module.DIAG_KERNEL,
        normalization=dcrf_module.NORMALIZE_SYMMETRIC,
    )
    q = d.inference(n_iters)
    return np.argmax(np.array(q), axis=0).reshape(h, w)


@pytest.mark.parametrize("params", list(PARAMS))
@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea"])
def test_same_script_agrees_with_pydensecrf2(name, params):
    img = photo(name, 0, 0, 160, 200)
    probs = class_map(img, seed=1)
    expected = script(real_dcrf, real_utils, probs, img, PARAMS[params])
    got = script(dcrf, utils, probs, img, PARAMS[params])
    assert (got == expected).mean() >= MIN_AGREEMENT


def test_marginals_and_unary_from_labels_agree_with_pydensecrf2():
    img = photo("astronaut", 100, 150, 64, 96)
    labels = class_map(img, n_classes=5, seed=2).argmax(0) + 1
    labels[:8] = 0  # unsure rows
    results = []
    for mod, ut in ((real_dcrf, real_utils), (dcrf, utils)):
        unary = ut.unary_from_labels(labels, 5, gt_prob=0.7)
        d = mod.DenseCRF2D(96, 64, 5)
        d.setUnaryEnergy(unary)
        d.addPairwiseGaussian(sxy=3, compat=3)  # one term only: the other kernel is off
        results.append((unary, np.array(d.inference(5))))
    np.testing.assert_array_equal(results[1][0], results[0][0])
    np.testing.assert_allclose(results[1][1], results[0][1], atol=2e-4, rtol=0)
    assert results[1][1].shape == (5, 64 * 96) and results[1][1].dtype == np.float32


def test_unary_from_softmax_matches_pydensecrf2():
    sm = class_map(photo("coffee", 0, 0, 20, 30), n_classes=4)
    for kwargs in ({}, {"scale": 0.8}, {"clip": 1e-3}):
        np.testing.assert_allclose(utils.unary_from_softmax(sm, **kwargs), real_utils.unary_from_softmax(sm, **kwargs))


def test_shifted_unaries_and_zero_iterations():
    """Energies of any offset work (the shim hands the kernel probabilities); 0 steps is the softmax."""
    rng = np.random.default_rng(0)
    unary = (rng.standard_normal((3, 12)) * 5 - 40).astype(np.float32)
    d = dcrf.DenseCRF2D(4, 3, 3)
    d.setUnaryEnergy(unary)
    q = d.inference(0)
    softmax = np.exp(-unary) / np.exp(-unary).sum(0)
    np.testing.assert_allclose(q, softmax, rtol=1e-5, atol=1e-6)


def _crf(w=4, h=3, c=2):
    return dcrf.DenseCRF2D(w, h, c)


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: _crf().setUnaryEnergy(np.zeros((2, 12))), ValueError, "Buffer dtype mismatch, expected 'float'"),
        (lambda: _crf().setUnaryEnergy(np.zeros((2, 11), np.float32)), ValueError, r"Bad shape for unary energy"),
        (
            lambda: _crf().addPairwiseBilateral(rgbim=np.zeros((3, 4, 3))),
            ValueError,
            "expected 'unsigned char' but got 'double'",
        ),
        (
            lambda: _crf().addPairwiseBilateral(rgbim=np.zeros((4, 4, 3), np.uint8)),
            ValueError,
            r"Bad shape for pairwise bilateral \(Need \(3, 4, 3\)",
        ),
        (lambda: _crf().addPairwiseGaussian(compat=np.ones(2, np.float32)), ValueError, "compatibility vectors"),
        (lambda: _crf().addPairwiseGaussian(kernel=dcrf.FULL_KERNEL), ValueError, "FULL_KERNEL"),
        (lambda: _crf().addPairwiseGaussian(normalization=dcrf.NORMALIZE_BEFORE), ValueError, "NORMALIZE_BEFORE"),
        (lambda: _crf().addPairwiseGaussian(sxy=(3, 5)), ValueError, "equal values"),
        (lambda: _crf().addPairwiseGaussian(sxy=-1), ValueError, "sxy must be a positive number"),
        (lambda: _crf().inference(3), ValueError, "setUnaryEnergy must be called"),
        (lambda: _crf().startInference(), NotImplementedError, "startInference"),
        (lambda: dcrf.DenseCRF(10, 2), NotImplementedError, "DenseCRF2D only"),
        (lambda: dcrf.DenseCRF2D(0, 3, 2), ValueError, "W must be a positive int"),
        (lambda: utils.unary_from_labels(np.array([0, 3]), 2, 0.5), ValueError, "labels must be in"),
        (lambda: utils.unary_from_softmax(np.ones(3), scale=2.0), ValueError, "scale"),
    ],
)
def test_bad_inputs(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_second_term_of_a_kind_is_refused_and_nan_unary():
    d = _crf()
    d.addPairwiseGaussian()
    with pytest.raises(ValueError, match="second addPairwiseGaussian"):
        d.addPairwiseGaussian()
    with pytest.raises(ValueError, match="must be finite"):
        d.setUnaryEnergy(np.full((2, 12), np.nan, np.float32))
