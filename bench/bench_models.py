"""The CLIP image tower at 512x512 (ViT-B-16, random weights): ovseg-fast's CLIPBackbone against
open_clip's own model built for that size (``force_image_size=512``), forward in inference, CPU, fp32.

Run with ``ovseg-fast bench models`` (or ``pytest bench/bench_models.py``). Both providers run the
same weights (open_clip's model gets CLIPBackbone's positional embedding, resized bicubically to the
32x32 grid, so the outputs agree to float32 rounding) in the same process. CLIPBackbone runs its own
loop over open_clip's blocks with ``scaled_dot_product_attention``; open_clip runs its
``nn.MultiheadAttention`` blocks. The goal is parity (ratio >= 0.95): the models are built on this
layer, so it must cost nothing over open_clip.

Besides the time, each row records its efficiency (``extra_info``): achieved GFLOP/s over the rate
of a float32 ``torch.mm`` of the tower's largest GEMM (the MLP's (tokens x width) @ (width x 4 width)),
timed in the same process right after the row's rounds, as ``ovseg-fast profile`` reports it.
"""

from __future__ import annotations

import functools
import logging
import statistics
import time
import warnings

import pytest
import torch

from ovseg_fast.bench._common import record, setup_threads

open_clip = pytest.importorskip("open_clip")  # the models extra

import ovseg_fast.models.profile  # noqa: E402, F401  (registers the FLOP formula of CPU SDPA, as profile counts it)
from ovseg_fast.models import CLIPBackbone  # noqa: E402

# (model, batch, image side)
CASES = {"ViT-B-16 B=1 512x512": ("ViT-B-16", 1, 512)}
PROVIDERS = ("ovseg_fast", "open_clip")

setup_threads()


@functools.lru_cache(maxsize=1)
def _models(name: str, size: int):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "CLIPBackbone.*RANDOM weights")
        ours = CLIPBackbone(name, image_size=size).eval()
    logging.disable(logging.WARNING)  # open_clip logs that it loaded no weights: random ones are the point here
    try:
        theirs = open_clip.create_model(name, pretrained=None, force_image_size=size).eval()
    finally:
        logging.disable(logging.NOTSET)
    grid = size // ours.patch_size
    state = dict(ours.clip.state_dict(), **{"visual.positional_embedding": ours.positional_embedding((grid, grid))})
    theirs.load_state_dict(state)
    return ours, theirs


@functools.lru_cache(maxsize=1)
def _flops(name: str, batch: int, size: int) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    ours, _ = _models(name, size)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        ours.encode_image(torch.randn(batch, 3, size, size))
    return counter.get_total_flops()


def _gemm_rate(m: int, k: int, n: int, calls: int = 7) -> float:
    """GFLOP/s of a float32 (m, k) @ (k, n) ``torch.mm``, median of a few calls after two warm-ups."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=gen), torch.randn(k, n, generator=gen)
    times = []
    for i in range(calls + 2):
        start = time.perf_counter()
        torch.mm(a, b)
        if i >= 2:
            times.append(time.perf_counter() - start)
    return 2 * m * k * n / statistics.median(times) / 1e9


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", list(CASES))
def test_clip_image_tower(benchmark, case, provider):
    name, batch, size = CASES[case]
    ours, theirs = _models(name, size)
    flops = _flops(name, batch, size)
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    encode = ours.encode_image if provider == "ovseg_fast" else theirs.encode_image

    def fn():
        with torch.no_grad():
            return encode(images)

    # ~2-3 s a forward on 2 cores: one warm-up call and the minimum rounds keep the file near a minute.
    record(benchmark, fn, op="clip_image", case=case, mode="fwd", provider=provider, flops=flops, warmup=1)
    # The GEMM rate is taken right after each provider's rounds, so that both see about the same load.
    tokens = batch * (1 + (size // ours.patch_size) ** 2)
    gemm_rate = _gemm_rate(tokens, ours.width, 4 * ours.width)
    achieved = flops / benchmark.stats.stats.median / 1e9
    benchmark.extra_info.update(gemm_gflops_per_s=gemm_rate, efficiency=achieved / gemm_rate)
