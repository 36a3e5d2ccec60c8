"""RPN's Linear Projection Module, the whole head: text branch (LPMc + LayerNorm), image branch (Linear +
LayerNorm) and logits. ovseg-fast vs the eager and compiled reference, CPU, fp32.

Run with ``ovseg-fast bench lpm`` (or ``pytest bench/bench_lpm.py``). The eager reference is the
literal spec (cat, mul, Linear, LayerNorm, einsum); fwd runs under ``torch.no_grad`` (inference),
fwd_bwd back-propagates into every input and parameter. In fwd, ovseg-fast's folded LayerNorm reuses
the QR factor of the image branch's weights after the first call (memoised on their contents, as in any
inference loop with fixed weights); the first call pays it once (~3 ms at D = 512).
"""

from __future__ import annotations

import pytest
import torch

from ovseg_fast.bench._common import compiled, record, setup_threads
from ovseg_fast.ops.lpm import hadamard_concat_linear, hadamard_concat_linear_flops, lpm_logits, lpm_logits_flops
from ovseg_fast.ops.lpm_reference import hadamard_concat_linear_spec, lpm_logits_spec

# (B, C, H, W, D, D_out)
CASES = {
    "voc B=8 C=20 N=32x32 D=512": (8, 20, 32, 32, 512, 512),
    "coco-stuff B=8 C=171 N=32x32 D=512": (8, 171, 32, 32, 512, 512),
}
PROVIDERS = ("ovseg_fast", "reference", "reference_compiled")
RUNS = [(p, m) for m in ("fwd", "fwd_bwd") for p in PROVIDERS]

setup_threads()


def _inputs(shape):
    b, c, h, w, d, d_out = shape
    gen = torch.Generator().manual_seed(0)
    r = lambda *s, scale=1.0: torch.randn(*s, generator=gen) * scale
    pixels = r(b, d, h, w)  # channel-first backbone features, read through a (B, N, D) view
    text = r(c, d)
    cls = r(b, d)
    params = [
        r(d_out, 2 * d, scale=(2 * d) ** -0.5), r(d_out, scale=0.02), 1 + r(d_out, scale=0.05), r(d_out, scale=0.05),
        r(d_out, d, scale=d**-0.5), r(d_out, scale=0.02), 1 + r(d_out, scale=0.05), r(d_out, scale=0.05),
    ]
    return pixels, text, cls, params


def _head(text_fn, logits_fn):
    def head(pixels, text, cls, wt, bt, gt, ht, wi, bi, gi, hi):
        emb = text_fn(text, cls, wt, bt, mode="c", norm_weight=gt, norm_bias=ht)
        return logits_fn(pixels.flatten(2).transpose(1, 2), emb, wi, bi, norm_weight=gi, norm_bias=hi)

    return head


@pytest.mark.parametrize(("provider", "mode"), RUNS)
@pytest.mark.parametrize("case", list(CASES))
def test_lpm_head(benchmark, case, provider, mode):
    shape = CASES[case]
    b, c, h, w, d, d_out = shape
    pixels, text, cls, params = _inputs(shape)
    if provider == "ovseg_fast":
        head = _head(hadamard_concat_linear, lpm_logits)
    elif provider == "reference":
        head = _head(hadamard_concat_linear_spec, lpm_logits_spec)
    else:
        head = compiled(_head(hadamard_concat_linear_spec, lpm_logits_spec))

    if mode == "fwd":

        def fn():
            with torch.no_grad():
                return head(pixels, text, cls, *params)

    else:
        leaves = [t.clone().requires_grad_(True) for t in (pixels, text, cls, *params)]
        grad = torch.randn(b, c, h * w, generator=torch.Generator().manual_seed(1))

        def fn():
            for t in leaves:
                t.grad = None
            head(*leaves).backward(grad)
            return [t.grad for t in leaves]

    n = h * w
    # the FLOPs of what ovseg-fast runs: in inference (fwd) its logits take the folded LayerNorm form
    flops = hadamard_concat_linear_flops(b, c, d, d_out, mode="c")
    flops += lpm_logits_flops(b, c, n, d, d_out, save=mode == "fwd_bwd")
    if mode == "fwd_bwd":
        flops += hadamard_concat_linear_flops(b, c, d, d_out, mode="c", backward=True)
        flops += lpm_logits_flops(b, c, n, d, d_out, backward=True)
    record(benchmark, fn, op="lpm", case=case, mode=mode, provider=provider, flops=flops)
