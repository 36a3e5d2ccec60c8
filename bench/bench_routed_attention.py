"""Routed top-k window attention: ovseg-fast vs the gather reference (eager and compiled),
FlexAttention with a block mask of the same routing, and dense SDPA over all tokens; CPU, fp32.

Run with ``ovseg-fast bench routed_attention`` (or ``pytest bench/bench_routed_attention.py``).

Every provider runs the attention step on the same precomputed top-k indices (the router is shared
and cheap); ``ovseg_fast`` is the public op given those indices (so its run-time index validation is
timed too). FlexAttention gets its inputs already in its window-major token order and its block mask
built outside the timed call, which favours it. The FLOPs recorded are each provider's own: the
routed count for the routed providers (their GFLOP/s is the effective rate), all-pairs attention for
dense SDPA (its GFLOP/s is the hardware's practical rate; at the LDVC shape it does 4x the work).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ovseg_fast.bench._common import compiled, record, setup_threads
from ovseg_fast.ops.routed_attention import routed_attention, routed_attention_flops
from ovseg_fast.ops.routed_attention_reference import flex_attention_inputs, route, routed_attention_reference

CASES = {
    # B, heads, H, W, head_dim, windows per side, topk
    "ldvc B=2 h=8 32x32 d=64 8x8win top16": (2, 8, 32, 32, 64, 8, 16),
    "biformer-s3 B=8 h=8 14x14 d=32 7x7win top16": (8, 8, 14, 14, 32, 7, 16),
}
PROVIDERS = ("ovseg_fast", "reference", "reference_compiled", "flex_attention", "sdpa_dense")
# FlexAttention has no CPU backward in this torch ("FlexAttention does not support backward on CPU",
# NotImplementedError from torch.nn.attention.flex_attention), so it is a forward-only peer here.
RUNS = [(p, m) for m in ("fwd", "fwd_bwd") for p in PROVIDERS if not (p == "flex_attention" and m == "fwd_bwd")]

setup_threads()


def _inputs(case):
    b, hh, h, w, d, n, topk = CASES[case]
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, hh, h, w, d, generator=gen) for _ in range(3))
    indices = route(q, k, n, n, topk, "shared")
    return q, k, v, indices


def _dense_flops(b, hh, h, w, d):
    return 4 * b * hh * (h * w) ** 2 * d


@pytest.mark.parametrize(("provider", "mode"), RUNS)
@pytest.mark.parametrize("case", list(CASES))
def test_routed_attention(benchmark, case, provider, mode):
    b, hh, h, w, d, n, topk = CASES[case]
    q, k, v, indices = _inputs(case)
    scale = d**-0.5
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))

    if provider == "ovseg_fast":
        given = indices[:, 0]
        fwd = lambda q, k, v: routed_attention(q, k, v, num_windows=n, topk=topk, indices=given)
    elif provider == "reference":
        fwd = lambda q, k, v: routed_attention_reference(q, k, v, indices, n, n, scale)
    elif provider == "reference_compiled":
        fwd = compiled(lambda q, k, v: routed_attention_reference(q, k, v, indices, n, n, scale))
    elif provider == "flex_attention":
        from torch.nn.attention.flex_attention import flex_attention

        q, k, v, block_mask, _ = flex_attention_inputs(q, k, v, indices, n, n)
        grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
        flex = compiled(flex_attention)
        fwd = lambda q, k, v: flex(q, k, v, block_mask=block_mask, scale=scale)
    else:
        q, k, v = (t.reshape(b, hh, h * w, d) for t in (q, k, v))
        grad = grad.reshape(b, hh, h * w, d)
        fwd = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=scale)

    if mode == "fwd":

        def fn():
            with torch.no_grad():
                return fwd(q, k, v)

    else:
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]

        def fn():
            for t in leaves:
                t.grad = None
            fwd(*leaves).backward(grad)
            return leaves[0].grad

    routed = routed_attention_flops(b, hh, h, w, d, n, topk)
    if provider == "sdpa_dense":
        flops = _dense_flops(b, hh, h, w, d) * (1 if mode == "fwd" else 3.5)
    else:
        flops = routed + (routed_attention_flops(b, hh, h, w, d, n, topk, backward=True) if mode == "fwd_bwd" else 0)
    record(benchmark, fn, op="routed_attention", case=case, mode=mode, provider=provider, flops=int(flops))
    benchmark.extra_info["output_bytes"] = q.numel() * q.element_size()
