"""Mixture-of-experts gating and dispatch+combine: ovseg-fast vs the eager and compiled reference,
and (dispatch+combine) the usual argsort / index_add eager code. CPU, fp32.

Gating is noisy top-k gating in training mode with all four losses (the noise is drawn inside
every provider's call). Dispatch+combine is ``moe_dispatch`` then ``moe_combine`` with identity
experts and D = 768; x_sorted is returned too, since real experts read it.

Run with ``ovseg-fast bench moe`` (or ``pytest bench/bench_moe.py``).
"""

from __future__ import annotations

import pytest
import torch

from ovseg_fast.bench._common import compiled, record, setup_threads
from ovseg_fast.ops.moe import moe_combine, moe_combine_flops, moe_dispatch, topk_gating, topk_gating_flops
from ovseg_fast.ops.moe_reference import (
    argsort_dispatch,
    index_add_combine,
    moe_combine_reference,
    moe_dispatch_reference,
    topk_gating_reference,
)

CASES = {
    "T=16384 E=8 k=2": (16384, 8, 2),
    "T=4096 E=64 k=8": (4096, 64, 2 * 4),
    "rpn T=16 E=4 k=1": (16, 4, 1),
}
D = 768
LOSSES = ("load_balancing_loss", "importance_loss", "load_loss", "z_loss")
MODES = ("fwd", "fwd_bwd")

setup_threads()


def _gating_inputs(shape):
    t, e, _ = shape
    gen = torch.Generator().manual_seed(0)
    return torch.randn(t, e, generator=gen), torch.randn(t, e, generator=gen) - 1.0


def _reference_gating(logits, noise_logits, k):
    noise = torch.randn(logits.shape, dtype=logits.dtype)
    r = topk_gating_reference(logits, k, noise, noise_logits)
    return r["weights"], torch.stack([r[n] for n in LOSSES])


def _ovseg_gating(logits, noise_logits, k):
    out = topk_gating(logits, k, noise_logits=noise_logits, training=True)
    return out.weights, torch.stack([getattr(out, n) for n in LOSSES])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", ("ovseg_fast", "reference", "reference_compiled"))
@pytest.mark.parametrize("case", list(CASES))
def test_topk_gating(benchmark, case, provider, mode):
    shape = CASES[case]
    t, e, k = shape
    logits, noise_logits = _gating_inputs(shape)
    fwd = {
        "ovseg_fast": _ovseg_gating,
        "reference": _reference_gating,
        "reference_compiled": compiled(_reference_gating),
    }[provider]
    if mode == "fwd":

        def fn():
            # training=True: noisy gating with the smooth load, as in a training step.
            return fwd(logits, noise_logits, k)

    else:
        leaves = (logits.clone().requires_grad_(True), noise_logits.clone().requires_grad_(True))
        gw = torch.randn(t, k)
        gl = torch.tensor([1e-2, 1e-2, 1e-2, 1e-3])

        def fn():
            for leaf in leaves:
                leaf.grad = None
            w, losses = fwd(*leaves, k)
            ((w * gw).sum() + (losses * gl).sum()).backward()
            return leaves[0].grad

    flops = topk_gating_flops(t, e, k, noisy=True)
    if mode == "fwd_bwd":
        flops += topk_gating_flops(t, e, k, noisy=True, backward=True)
    record(benchmark, fn, op="topk_gating", case=case, mode=mode, provider=provider, flops=flops)


def _dispatch_inputs(shape):
    t, e, k = shape
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(t, D, generator=gen)
    logits = torch.randn(t, e, generator=gen)
    out = topk_gating(logits, k, training=False)
    return x, out.indices, out.weights.detach()


# Every provider returns x_sorted too: in a real MoE the experts read it between dispatch and
# combine, so it must be materialised (otherwise inductor fuses the gather into the combine).
def _ref_dc(x, idx, w, e):
    xs, _, _, inverse = moe_dispatch_reference(x, idx, e)
    return moe_combine_reference(xs, w, inverse), xs


def _argsort_dc(x, idx, w, e):
    xs, _, order = argsort_dispatch(x, idx, e)
    return index_add_combine(xs, w, order, x.shape[0]), xs


def _ovseg_dc(x, idx, w, e):
    xs, _, order = moe_dispatch(x, idx, e)
    return moe_combine(xs, w, order, x.shape[0]), xs


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", ("ovseg_fast", "reference", "reference_compiled", "argsort_index_add"))
@pytest.mark.parametrize("case", list(CASES))
def test_moe_dispatch_combine(benchmark, case, provider, mode):
    shape = CASES[case]
    t, e, k = shape
    x, idx, w = _dispatch_inputs(shape)
    fwd = {
        "ovseg_fast": _ovseg_dc,
        "reference": _ref_dc,
        "reference_compiled": compiled(_ref_dc),
        "argsort_index_add": _argsort_dc,
    }[provider]
    if mode == "fwd":

        def fn():
            with torch.no_grad():
                return fwd(x, idx, w, e)

    else:
        xl, wl = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        grad = torch.randn(t, D)

        def fn():
            xl.grad = wl.grad = None
            fwd(xl, idx, wl, e)[0].backward(grad)
            return xl.grad

    flops = moe_combine_flops(t, k, D) + (moe_combine_flops(t, k, D, backward=True) if mode == "fwd_bwd" else 0)
    record(benchmark, fn, op="moe_dispatch_combine", case=case, mode=mode, provider=provider, flops=flops)
