"""``ovseg_fast.compat.pydensecrf`` vs pydensecrf2 on the same calls; CPU, 10 mean-field iterations, C=21.

Run with ``ovseg-fast bench compat_pydensecrf`` (or ``pytest bench/bench_compat_pydensecrf.py``). Needs
the bench extras ``pydensecrf2`` and ``scikit-image``.

Both providers run one pydensecrf script (``DenseCRF2D``, ``setUnaryEnergy(unary_from_softmax(...))``,
``addPairwiseGaussian``, ``addPairwiseBilateral``, ``inference``, argmax) on a 512x512 photo, with
the modules imported as ``dcrf`` and ``utils``: ``ovseg_fast`` is the shim, ``pydensecrf2`` the
original. The shim's labels are checked against pydensecrf2's (>= 98.5% of the pixels).
"""

from __future__ import annotations

import numpy as np
import pytest

import ovseg_fast.compat.pydensecrf.densecrf as shim_dcrf
import ovseg_fast.compat.pydensecrf.utils as shim_utils
from ovseg_fast.bench._common import record, setup_threads
from ovseg_fast.bench._crf_inputs import class_map, photo
from ovseg_fast.ops.dense_crf import dense_crf_flops

N_ITERS, N_CLASSES = 10, 21
CASES = {"astronaut 512x512 C=21": ("astronaut", 512, 512)}
PROVIDERS = ("ovseg_fast", "pydensecrf2")

setup_threads()

_LABELS: dict[str, np.ndarray] = {}


def script(dcrf, utils, probs: np.ndarray, img: np.ndarray) -> np.ndarray:
    """pydensecrf's README pipeline with its default parameters: the (H, W) labels."""
    c, h, w = probs.shape
    d = dcrf.DenseCRF2D(w, h, c)
    d.setUnaryEnergy(utils.unary_from_softmax(probs))
    d.addPairwiseGaussian(sxy=3, compat=3)
    d.addPairwiseBilateral(sxy=80, srgb=13, rgbim=img, compat=10)
    return np.argmax(d.inference(N_ITERS), axis=0).reshape(h, w)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", list(CASES))
def test_compat_pydensecrf(benchmark, case, provider):
    name, h, w = CASES[case]
    img = photo(name, height=h, width=w)
    probs = class_map(img, n_classes=N_CLASSES)
    if provider == "ovseg_fast":
        dcrf, utils = shim_dcrf, shim_utils
    else:
        import pydensecrf.densecrf as dcrf
        import pydensecrf.utils as utils
    fn = lambda: script(dcrf, utils, probs, img)
    record(
        benchmark,
        fn,
        op="compat_pydensecrf",
        case=case,
        mode="fwd",
        provider=provider,
        flops=dense_crf_flops(1, N_CLASSES, h, w, N_ITERS),
    )
    if case not in _LABELS:
        import pydensecrf.densecrf as real_dcrf
        import pydensecrf.utils as real_utils

        _LABELS[case] = script(real_dcrf, real_utils, probs, img)
    agreement = float((fn() == _LABELS[case]).mean())
    benchmark.extra_info["label_agreement_vs_pydensecrf"] = agreement
    assert agreement >= 0.985, f"{provider} labels agree with pydensecrf2 on only {agreement:.4f} of pixels"
