"""``ovseg_fast.patch.biformer``: a BiFormer-S stage-3 block before and after the one-line patch; CPU, fp32.

Run with ``ovseg-fast bench patch_biformer`` (or ``pytest bench/bench_patch_biformer.py``).

The block is BiFormer's (conditional position encoding by a 3x3 depthwise conv, pre-norm bi-level
routing attention, pre-norm MLP of ratio 3) at stage 3 of BiFormer-S: 14x14 tokens of a 224x224
image, dim 256, 8 heads, 7x7 windows, top-16, LEPE 5x5, batch 8. Its attention has BiFormer's
attributes and layout; its forward is the gather reference (:mod:`ovseg_fast.ops.routed_attention_reference`),
which gathers K/V top-k times as BiFormer's code does, standing in for BiFormer's module (BiFormer is
not a dependency). ``biformer_gather`` is that block; ``ovseg_fast`` is a copy of it after
``ovseg_fast.patch.biformer``. Outputs of the two are checked to agree before timing.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ovseg_fast.patch
from ovseg_fast.bench._common import record, setup_threads
from ovseg_fast.ops.routed_attention import routed_attention_flops
from ovseg_fast.ops.routed_attention_reference import route, routed_attention_reference

CASES = {"biformer-s stage3 B=8 14x14 C=256 h=8 7x7win top16": (8, 14, 14, 256, 8, 7, 16)}
PROVIDERS = ("ovseg_fast", "biformer_gather")
MODES = ("fwd", "fwd_bwd")

setup_threads()


class _QKVLinear(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)


class GatherBRA(nn.Module):
    """BiFormer's BiLevelRoutingAttention attributes (identity K/V downsampling, qk_dim == dim, LEPE)
    with the gather reference as its attention step."""

    def __init__(self, dim, num_heads, n_win, topk, side_dwconv=5):
        super().__init__()
        self.dim, self.qk_dim, self.num_heads, self.n_win, self.topk = dim, dim, num_heads, n_win, topk
        self.scale = dim**-0.5
        self.qkv = _QKVLinear(dim)
        self.wo = nn.Linear(dim, dim)
        self.lepe = nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim)
        self.router, self.kv_gather, self.kv_down = nn.Identity(), nn.Identity(), nn.Identity()
        self.kv_downsample_mode, self.auto_pad = "identity", True
        self.param_routing = self.diff_routing = self.soft_routing = False

    def forward(self, x):
        b, h, w, c = x.shape
        q, k, v = self.qkv.qkv(x).reshape(b, h, w, 3, self.num_heads, -1).permute(3, 0, 4, 1, 2, 5)
        idx = route(q, k, self.n_win, self.n_win, self.topk, "shared")
        out = routed_attention_reference(q, k, v, idx, self.n_win, self.n_win, self.scale)
        out = out.permute(0, 2, 3, 1, 4).reshape(b, h, w, c)
        lepe = self.lepe(v.permute(0, 1, 4, 2, 3).reshape(b, c, h, w)).permute(0, 2, 3, 1)
        return self.wo(out + lepe)


class Block(nn.Module):
    """BiFormer's block: x += dwconv3x3(x); x += attn(LN(x)); x += MLP(LN(x)), (B, C, H, W) in and out."""

    def __init__(self, dim, num_heads, n_win, topk, mlp_ratio=3):
        super().__init__()
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = GatherBRA(dim, num_heads, n_win, topk)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x):
        x = (x + self.pos_embed(x)).permute(0, 2, 3, 1)
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x.permute(0, 3, 1, 2)


def _block_flops(b, h, w, c, heads, n_win, topk, backward):
    """Linear layers (qkv, wo, MLP: 2 * 10 c^2 per token, 3x for fwd+bwd) plus the routed attention."""
    linear = 2 * b * h * w * 10 * c * c * (3 if backward else 1)
    attn = routed_attention_flops(b, heads, h, w, c // heads, n_win, topk)
    if backward:
        attn += routed_attention_flops(b, heads, h, w, c // heads, n_win, topk, backward=True)
    return linear + attn


_BLOCKS: dict[str, tuple[nn.Module, nn.Module]] = {}


def _blocks(case):
    if case not in _BLOCKS:
        b, h, w, c, heads, n_win, topk = CASES[case]
        torch.manual_seed(0)
        original = Block(c, heads, n_win, topk)
        patched = copy.deepcopy(original)
        assert ovseg_fast.patch.biformer(patched) == 1
        x = torch.randn(b, c, h, w)
        with torch.no_grad():
            err = (patched(x) - original(x)).abs().max().item()
        assert err < 1e-4, f"the patched block differs from the original by {err}"
        _BLOCKS[case] = (patched, original)
    return _BLOCKS[case]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", list(CASES))
def test_patch_biformer(benchmark, case, provider, mode):
    b, h, w, c, heads, n_win, topk = CASES[case]
    patched, original = _blocks(case)
    block = patched if provider == "ovseg_fast" else original
    x = torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(1))
    if mode == "fwd":

        def fn():
            with torch.no_grad():
                return block(x)

    else:
        leaf = x.clone().requires_grad_(True)
        grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))

        def fn():
            leaf.grad = None
            block.zero_grad(set_to_none=True)
            F.silu(block(leaf)).backward(grad)  # a non-linear head, so the last layer's backward is not trivial
            return leaf.grad

    flops = _block_flops(b, h, w, c, heads, n_win, topk, mode == "fwd_bwd")
    record(benchmark, fn, op="patch_biformer", case=case, mode=mode, provider=provider, flops=flops)
