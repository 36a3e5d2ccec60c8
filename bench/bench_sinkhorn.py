"""Sinkhorn-Knopp: ovseg-fast vs the eager and compiled reference and POT, CPU, fp32, 3 iterations.

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
    "pixelclip B=48 N=128 K=64": (48, 128, 64),
    "swav B=1 N=4096 K=3000": (1, 4096, 3000),
    "many-small B=256 N=64 K=64": (256, 64, 64),
}
PROVIDERS = ("ovseg_fast", "reference", "reference_compiled", "pot")
# POT's numpy backend has no autograd, so it is a forward-only peer.
RUNS = [(p, m) for m in ("fwd", "fwd_bwd") for p in PROVIDERS if not (p == "pot" and m == "fwd_bwd")]

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
