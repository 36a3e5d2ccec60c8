"""Dense CRF: ovseg-fast vs pydensecrf2 and the reference, CPU, fp32, 10 mean-field iterations, C=21.

Run with ``ovseg-fast bench dense_crf`` (or ``pytest bench/bench_dense_crf.py``). Needs the bench
extras ``pydensecrf2`` and ``scikit-image`` (its bundled sample photos, no download).

Inputs: scikit-image's natural photos with realistic class maps: a coarse segmentation (k-means of
the stride-8 pixels on colour and position, like a CNN's low-resolution output), one-hot, with
Gaussian noise, bilinearly upsampled and softmaxed. Every provider's labels are compared with
pydensecrf2's and the agreement is recorded in ``extra_info["label_agreement_vs_pydensecrf"]``
(goal: >= 0.985; speed goal: ovseg_fast >= 5x faster than pydensecrf2 at 512x512).

The reference (index/scatter lattice in plain PyTorch) takes tens of seconds per 512x512 image, so it
runs without warm-up, on the single-image case only.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ovseg_fast.bench._common import record, setup_threads
from ovseg_fast.bench._crf_inputs import class_map, photo, pydensecrf_marginals
from ovseg_fast.ops.dense_crf import dense_crf, dense_crf_flops
from ovseg_fast.ops.dense_crf_reference import dense_crf_reference

N_ITERS, N_CLASSES = 10, 21
PARAMS = dict(gaussian_sxy=3.0, gaussian_compat=3.0, bilateral_sxy=80.0, bilateral_srgb=13.0, bilateral_compat=10.0)
CASES = {
    "astronaut 512x512 C=21": (("astronaut",), 512, 512),
    "batch B=3 256x256 C=21": (("astronaut", "coffee", "chelsea"), 256, 256),
}
PROVIDERS = ("ovseg_fast", "pydensecrf2", "reference")

setup_threads()


# pydensecrf2's labels per case, computed once and compared with every provider's.
_PYDENSECRF_LABELS: dict[str, np.ndarray] = {}


def _pydensecrf(probs: np.ndarray, imgs: list[np.ndarray]):
    def run():
        return np.stack([pydensecrf_marginals(p, img, N_ITERS, PARAMS) for p, img in zip(probs, imgs)])

    return run


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", list(CASES))
def test_dense_crf(benchmark, case, provider):
    names, h, w = CASES[case]
    if provider == "reference" and len(names) > 1:
        pytest.skip("the reference runs on the single-image case only (tens of seconds per image)")
    imgs = [photo(n, height=h, width=w) for n in names]
    probs = np.stack([class_map(img, seed=i) for i, img in enumerate(imgs)])
    t_probs = torch.from_numpy(probs)
    t_imgs = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2)  # the usual HWC numpy layout, as a view

    warmup = 2
    if provider == "ovseg_fast":
        fn = lambda: dense_crf(t_probs, t_imgs, n_iters=N_ITERS, **PARAMS)
    elif provider == "reference":
        fn = lambda: dense_crf_reference(t_probs, t_imgs.contiguous(), N_ITERS, *PARAMS.values())
        warmup = 0
    else:
        fn = _pydensecrf(probs, imgs)

    flops = dense_crf_flops(len(names), N_CLASSES, h, w, N_ITERS)
    record(benchmark, fn, op="dense_crf", case=case, mode="fwd", provider=provider, flops=flops, warmup=warmup)

    labels = np.asarray(fn()).argmax(1)
    if case not in _PYDENSECRF_LABELS:
        _PYDENSECRF_LABELS[case] = _pydensecrf(probs, imgs)().argmax(1)
    agreement = float((labels == _PYDENSECRF_LABELS[case]).mean())
    benchmark.extra_info["label_agreement_vs_pydensecrf"] = agreement
    assert agreement >= 0.985, f"{provider} labels agree with pydensecrf2 on only {agreement:.4f} of pixels"
