"""ovseg_fast.compat.swav against SwAV's and PixelCLIP's loops, written from the papers' pseudo-code."""

from __future__ import annotations

import pytest
import torch

from ovseg_fast.compat.swav import distributed_sinkhorn, pixelclip_sinkhorn
from tests.helpers import run_gloo_workers


def _swav_iterations(q: torch.Tensor, iterations: int, world: int, all_reduce) -> torch.Tensor:
    """SwAV's normalisation of Q^T (K, B_local): total mass 1, then alternately every prototype row to 1/K
    and every sample column to 1/B; finally columns sum to 1. Returns (B_local, K)."""
    reduce = all_reduce or (lambda t: t)
    k, b = q.shape[0], q.shape[1] * world
    q /= reduce(q.sum())
    for _ in range(iterations):
        q /= reduce(q.sum(dim=1, keepdim=True))
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= b
    return (q * b).t()


def swav_loop(out: torch.Tensor, epsilon: float, iterations: int, world: int = 1, all_reduce=None) -> torch.Tensor:
    """SwAV (Caron et al. 2020, Algorithm 1 / appendix): Q = exp(scores / eps)^T, then SwAV's iterations."""
    return _swav_iterations(torch.exp(out.double() / epsilon).t(), iterations, world, all_reduce)


def pixelclip_loop(logits: torch.Tensor, iterations: int, world: int = 1, all_reduce=None) -> torch.Tensor:
    """PixelCLIP: the softmax over the clusters replaces exp(scores / eps), then SwAV's iterations over
    all masks of the batch as one problem."""
    return _swav_iterations(torch.softmax(logits.double(), -1).t(), iterations, world, all_reduce)


@pytest.mark.parametrize("shape, epsilon, iterations", [((64, 10), 0.05, 3), ((37, 128), 0.1, 5), ((5, 3), 1.0, 1)])
def test_distributed_sinkhorn_equals_swav_loop(shape, epsilon, iterations):
    out = torch.nn.functional.normalize(torch.randn(shape, generator=torch.Generator().manual_seed(0)), dim=0)
    got = distributed_sinkhorn(out, epsilon=epsilon, iterations=iterations)
    assert got.shape == shape and got.dtype == out.dtype and not got.requires_grad
    torch.testing.assert_close(got.double(), swav_loop(out, epsilon, iterations), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("iterations", [1, 3, 7])
def test_pixelclip_sinkhorn_equals_pixelclip_loop(iterations):
    gen = torch.Generator().manual_seed(1)
    cosine = torch.nn.functional.normalize(torch.randn(200, 64, generator=gen), dim=-1) @ torch.nn.functional.normalize(
        torch.randn(64, 64, generator=gen), dim=0
    )
    logits = 100 * cosine  # PixelCLIP's temperature
    got = pixelclip_sinkhorn(logits, iterations=iterations)
    torch.testing.assert_close(got.double(), pixelclip_loop(logits, iterations), rtol=1e-4, atol=1e-6)
    # It is one problem over all rows: solving the rows in two halves is a different assignment.
    halves = torch.cat([pixelclip_sinkhorn(logits[:100], iterations), pixelclip_sinkhorn(logits[100:], iterations)])
    assert (halves - got).abs().max() > 1e-3


def test_no_gradient_is_tracked():
    out = torch.randn(16, 8, requires_grad=True)
    assert not distributed_sinkhorn(out).requires_grad
    assert not pixelclip_sinkhorn(out).requires_grad


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: distributed_sinkhorn(torch.randn(2, 3, 4)), ValueError, "out must have 2 dimensions"),
        (lambda: distributed_sinkhorn(torch.ones(2, 3, dtype=torch.int64)), TypeError, "out must have dtype"),
        (lambda: distributed_sinkhorn(torch.randn(4, 3), epsilon=0.0), ValueError, "epsilon"),
        (lambda: distributed_sinkhorn(torch.randn(4, 3), iterations=0), ValueError, "iterations must be >= 1"),
        (lambda: pixelclip_sinkhorn([[1.0, 2.0]]), TypeError, "logits must be a torch.Tensor"),
        (lambda: pixelclip_sinkhorn(torch.randn(4, 3), iterations=1.5), TypeError, "iterations must be an int"),
    ],
)
def test_bad_inputs(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


WORKER = """
import sys
import torch
import torch.distributed as dist
from ovseg_fast.compat.swav import distributed_sinkhorn, pixelclip_sinkhorn

rank, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
scores = torch.randn(2 * 48, 30, generator=torch.Generator().manual_seed(3)).chunk(2)[rank].contiguous()
# process_group=None: the initialised world is used, as SwAV's function does.
result = {"swav": distributed_sinkhorn(scores, 0.05, 3), "pixelclip": pixelclip_sinkhorn(100 * scores, 3)}
torch.save(result, f"{out}.{rank}")
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.distributed
def test_two_gloo_processes_equal_the_loops_on_all_rows(tmp_path):
    results = run_gloo_workers(WORKER, tmp_path)
    scores = torch.randn(2 * 48, 30, generator=torch.Generator().manual_seed(3))
    swav = torch.cat([r["swav"] for r in results])
    pixelclip = torch.cat([r["pixelclip"] for r in results])
    torch.testing.assert_close(swav.double(), swav_loop(scores, 0.05, 3), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(pixelclip.double(), pixelclip_loop(100 * scores, 3), rtol=1e-4, atol=1e-6)
