"""Sinkhorn-Knopp: ovseg-fast vs the eager and compiled reference, POT, and the plain loops of SwAV's and
PixelCLIP's public code, CPU, fp32, 3 iterations.

Cases: PixelCLIP's real problem is ONE Sinkhorn over all masks of the batch, (1, 48 x 128, 64) for its
48-image batch and (1, 12 x 128, 64) for 12 images; (48, 128, 64) is the same masks as one problem per
image; SwAV's is (1, 4096, 3000).

Providers beside the reference (forward only: both public functions run under ``torch.no_grad``):
``swav_loop`` is SwAV's ``distributed_sinkhorn`` (facebookresearch/swav, ``main_swav.py``): ``Q =
exp(scores / eps)^T``, total mass 1, then per iteration divide the prototype rows by their sums and by
K, the sample columns by their sums and by N, finally ``Q * N``; ``pixelclip_loop`` is PixelCLIP's
``distributed_sinkhorn`` (cvlab-kaist/PixelCLIP, ``pixelclip/pixelclip.py``), the same loop started from
``softmax(logits)`` over the prototypes, here with ``logits = scores / eps`` (its result is
``sinkhorn(log_softmax(logits), epsilon=1)``, one row-normalisation pass more than SwAV's work).
Both are written here from that code for an (N, K) problem and, for B > 1, the same tensor ops on a
leading batch dimension (one loop for the batch rather than one per image, the baseline's best case).

Run with ``ovseg-fast bench sinkhorn`` (or ``pytest bench/bench_sinkhorn.py``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ovseg_fast.bench._common import compiled, record, setup_threads
from ovseg_fast.ops import sinkhorn
from ovseg_fast.ops.sinkhorn import sinkhorn_flops
from ovseg_fast.ops.sinkhorn_reference import default_marginals, sinkhorn_reference

EPSILON, N_ITERS = 0.05, 3
CASES = {
    "pixelclip one problem B=1 N=6144 K=64": (1, 6144, 64),
    "pixelclip one problem B=1 N=1536 K=64": (1, 1536, 64),
    "pixelclip B=48 N=128 K=64": (48, 128, 64),
    "swav B=1 N=4096 K=3000": (1, 4096, 3000),
    "many-small B=256 N=64 K=64": (256, 64, 64),
}
PROVIDERS = ("ovseg_fast", "reference", "reference_compiled", "pot", "swav_loop", "pixelclip_loop")
# POT's numpy backend has no autograd, and SwAV's and PixelCLIP's loops run without it: forward-only peers.
FORWARD_ONLY = ("pot", "swav_loop", "pixelclip_loop")
RUNS = [(p, m) for m in ("fwd", "fwd_bwd") for p in PROVIDERS if not (p in FORWARD_ONLY and m == "fwd_bwd")]

setup_threads()


def _inputs(shape):
    gen = torch.Generator().manual_seed(0)
    b, n, k = shape
    # Cosine similarities, as PixelCLIP and SwAV feed them.
    scores = torch.nn.functional.normalize(
        torch.randn(b, n, 16, generator=gen), dim=-1
    ) @ torch.nn.functional.normalize(torch.randn(b, 16, k, generator=gen), dim=1)
    mask = torch.ones(b, n, dtype=torch.bool)
    rows, cols = default_marginals(mask, k, torch.float32)
    return scores.contiguous(), mask, rows, cols


def _swav_iterations(q: torch.Tensor, n_iters: int) -> torch.Tensor:
    """The public loop on Q^T (..., K, N) in place: total mass 1, then prototypes to 1/K and samples to 1/N."""
    k, n = q.shape[-2], q.shape[-1]
    q /= q.sum(dim=(-2, -1), keepdim=True)
    for _ in range(n_iters):
        q /= q.sum(dim=-1, keepdim=True)
        q /= k
        q /= q.sum(dim=-2, keepdim=True)
        q /= n
    q *= n
    return q.transpose(-2, -1)


def swav_loop(scores: torch.Tensor) -> torch.Tensor:
    """SwAV's ``distributed_sinkhorn`` (one process) on (B, N, K) scores."""
    return _swav_iterations(torch.exp(scores / EPSILON).transpose(-2, -1), N_ITERS)


def pixelclip_loop(logits: torch.Tensor) -> torch.Tensor:
    """PixelCLIP's ``distributed_sinkhorn`` (one process) on (B, N, K) logits."""
    return _swav_iterations(logits.softmax(dim=-1).transpose(-2, -1), N_ITERS)


def _pot_provider(scores, rows, cols):
    import ot

    s = scores.numpy().astype(np.float64)
    r, c = rows.numpy().astype(np.float64), cols.numpy().astype(np.float64)

    def run():
        # POT's ot.sinkhorn on the cost -scores with reg=epsilon is the same entropic problem; it starts
        # with the row step instead of SwAV's column step, which costs the same.
        return [ot.sinkhorn(r[b], c[b], -s[b], EPSILON, numItermax=N_ITERS, stopThr=0.0) for b in range(s.shape[0])]

    return run


@pytest.mark.parametrize(("provider", "mode"), RUNS)
@pytest.mark.parametrize("case", list(CASES))
def test_sinkhorn(benchmark, case, provider, mode):
    shape = CASES[case]
    scores, mask, rows, cols = _inputs(shape)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(1))

    if provider == "ovseg_fast":
        fwd = lambda s: sinkhorn(s, epsilon=EPSILON, n_iters=N_ITERS)
    elif provider == "reference":
        fwd = lambda s: sinkhorn_reference(s, mask, rows, cols, EPSILON, N_ITERS)
    elif provider == "reference_compiled":
        fwd = compiled(lambda s: sinkhorn_reference(s, mask, rows, cols, EPSILON, N_ITERS))
    else:
        fwd = None

    if provider == "pot":
        fn = _pot_provider(scores, rows, cols)
    elif provider in ("swav_loop", "pixelclip_loop"):
        loop, arg = (swav_loop, scores) if provider == "swav_loop" else (pixelclip_loop, scores / EPSILON)

        def fn():
            with torch.no_grad():
                return loop(arg)

    elif mode == "fwd":

        def fn():
            with torch.no_grad():
                return fwd(scores)

    else:
        leaf = scores.clone().requires_grad_(True)

        def fn():
            leaf.grad = None
            fwd(leaf).backward(grad)
            return leaf.grad

    flops = sinkhorn_flops(*shape, N_ITERS) + (
        sinkhorn_flops(*shape, N_ITERS, backward=True) if mode == "fwd_bwd" else 0
    )
    record(benchmark, fn, op="sinkhorn", case=case, mode=mode, provider=provider, flops=flops)
