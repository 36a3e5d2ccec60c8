"""ovseg_fast.patch.biformer / RoutedAttention.from_biformer on modules built here from BiFormer's description.

The two modules below follow BiFormer's code as its paper and repository describe it (Zhu et al. 2023),
with its attribute names, so the patch recognises them as it would BiFormer's own:
- ``BiLevelRoutingAttention`` ((B, H, W, C)): with ``auto_pad`` it zero-pads the input to a multiple of
  ``n_win`` before the fused ``qkv`` projection (a ``QKVLinear`` holding ``.qkv``), splits q, k, v into
  ``n_win x n_win`` windows, routes with window means (``TopkRouting``: detached, scaled, torch.topk),
  gathers the top-k windows' k and v (``KVGather``), attends with scale ``qk_dim ** -0.5`` over all
  gathered tokens (padding included), adds LEPE (a depthwise conv of v over the padded image) and
  projects with ``wo``; the output is cropped.
- ``BiLevelRoutingAttention_nchw`` ((B, C, H, W)): 1x1-conv projections ``qkv_linear``/``output_linear``,
  regions of ``H // n_win x W // n_win`` tokens, routing on ``avg_pool2d(ceil_mode=True,
  count_include_pad=False)`` means, q, k, v zero-padded after the projection to whole regions.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ovseg_fast.patch
from ovseg_fast.ops import RoutedAttention
from ovseg_fast.ops.routed_attention_reference import route, routed_attention_reference


class QKVLinear(nn.Module):
    def __init__(self, dim, qk_dim):
        super().__init__()
        self.dim, self.qk_dim = dim, qk_dim
        self.qkv = nn.Linear(dim, 2 * qk_dim + dim)

    def forward(self, x):
        q, kv = self.qkv(x).split([self.qk_dim, self.qk_dim + self.dim], dim=-1)
        return q, kv


class TopkRouting(nn.Module):
    def __init__(self, qk_dim, topk, qk_scale, param_routing=False, diff_routing=False):
        super().__init__()
        self.topk, self.scale, self.diff_routing = topk, qk_scale, diff_routing
        self.emb = nn.Linear(qk_dim, qk_dim) if param_routing else nn.Identity()

    def forward(self, q_win, k_win):
        if not self.diff_routing:
            q_win, k_win = q_win.detach(), k_win.detach()
        logits = (self.emb(q_win) * self.scale) @ self.emb(k_win).transpose(-2, -1)
        top, idx = torch.topk(logits, k=self.topk, dim=-1)
        return torch.softmax(top, -1), idx


class KVGather(nn.Module):
    def forward(self, r_idx, kv):  # kv (n, p, w2, c), r_idx (n, p, topk) -> (n, p, topk, w2, c)
        n, p, w2, c = kv.shape
        expanded = kv.unsqueeze(1).expand(n, p, p, w2, c)
        index = r_idx[..., None, None].expand(n, p, r_idx.shape[-1], w2, c)
        return torch.gather(expanded, 2, index)


def _to_windows(x, n_win):  # (n, H, W, c) -> (n, p, h*w, c)
    n, hh, ww, c = x.shape
    h, w = hh // n_win, ww // n_win
    return x.reshape(n, n_win, h, n_win, w, c).permute(0, 1, 3, 2, 4, 5).reshape(n, n_win * n_win, h * w, c)


def _from_windows(x, n_win, h, w):  # (n, p, h*w, c) -> (n, H, W, c)
    n, _, _, c = x.shape
    return x.reshape(n, n_win, n_win, h, w, c).permute(0, 1, 3, 2, 4, 5).reshape(n, n_win * h, n_win * w, c)


class BiLevelRoutingAttention(nn.Module):
    def __init__(self, dim, n_win=7, num_heads=8, qk_dim=None, qk_scale=None, topk=4, side_dwconv=5, auto_pad=True,
                 kv_downsample_mode="identity", param_routing=False, diff_routing=False, soft_routing=False,
                 param_attention="qkvo"):  # fmt: skip
        super().__init__()
        self.dim, self.n_win, self.num_heads, self.topk, self.auto_pad = dim, n_win, num_heads, topk, auto_pad
        self.qk_dim = qk_dim or dim
        self.scale = qk_scale or self.qk_dim**-0.5
        self.param_routing, self.diff_routing, self.soft_routing = param_routing, diff_routing, soft_routing
        # side_dwconv=0 turns LEPE off with a zeros function, not a module, as BiFormer does.
        self.lepe = (
            nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim) if side_dwconv else torch.zeros_like
        )
        self.router = TopkRouting(self.qk_dim, topk, self.scale, param_routing, diff_routing)
        self.kv_gather = KVGather()
        self.param_attention = param_attention
        self.qkv = QKVLinear(dim, self.qk_dim)
        self.wo = nn.Linear(dim, dim) if param_attention == "qkvo" else nn.Identity()
        self.kv_downsample_mode = kv_downsample_mode
        self.kv_down = nn.Identity() if kv_downsample_mode == "identity" else nn.AvgPool2d(2)

    def forward(self, x):
        n, h_in, w_in, _ = x.shape
        if self.auto_pad:
            x = F.pad(x, (0, 0, 0, (-w_in) % self.n_win, 0, (-h_in) % self.n_win))
        _, hh, ww, c = x.shape
        h, w = hh // self.n_win, ww // self.n_win
        q, kv = self.qkv(x)
        q_pix, kv_pix = _to_windows(q, self.n_win), _to_windows(kv, self.n_win)
        _, r_idx = self.router(q_pix.mean(2), kv_pix[..., : self.qk_dim].mean(2))
        kv_sel = self.kv_gather(r_idx, kv_pix)  # (n, p, topk, h*w, qk_dim + dim)
        k_sel, v_sel = kv_sel.split([self.qk_dim, self.dim], dim=-1)
        m, p = self.num_heads, self.n_win**2
        k_sel = k_sel.reshape(n, p, -1, m, self.qk_dim // m).permute(0, 1, 3, 4, 2)  # (n, p, m, c, topk*h*w)
        v_sel = v_sel.reshape(n, p, -1, m, c // m).permute(0, 1, 3, 2, 4)  # (n, p, m, topk*h*w, c)
        q_heads = q_pix.reshape(n, p, h * w, m, -1).permute(0, 1, 3, 2, 4)  # (n, p, m, h*w, c)
        out = torch.softmax((q_heads * self.scale) @ k_sel, dim=-1) @ v_sel
        out = _from_windows(out.permute(0, 1, 3, 2, 4).reshape(n, p, h * w, c), self.n_win, h, w)
        lepe = self.lepe(kv[..., self.qk_dim :].permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.wo(out + lepe)[:, :h_in, :w_in]


class BiLevelRoutingAttention_nchw(nn.Module):
    def __init__(self, dim, num_heads=8, n_win=7, qk_scale=None, topk=4, side_dwconv=5):
        super().__init__()
        self.dim, self.num_heads, self.n_win, self.topk = dim, num_heads, n_win, topk
        self.scale = qk_scale or dim**-0.5
        self.lepe = nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim)
        self.qkv_linear = nn.Conv2d(dim, 3 * dim, 1)
        self.output_linear = nn.Conv2d(dim, dim, 1)

    def forward(self, x):
        n, c, h_in, w_in = x.shape
        rh, rw = h_in // self.n_win, w_in // self.n_win
        q, k, v = self.qkv_linear(x).chunk(3, dim=1)
        pool = dict(kernel_size=(rh, rw), ceil_mode=True, count_include_pad=False)
        q_r = F.avg_pool2d(q.detach(), **pool).flatten(2).transpose(1, 2)
        k_r = F.avg_pool2d(k.detach(), **pool).flatten(2)
        idx = torch.topk(q_r @ k_r, k=self.topk, dim=-1).indices  # (n, regions, topk)
        pads = (0, (-w_in) % rw, 0, (-h_in) % rh)
        qp, kp, vp = (F.pad(t, pads).permute(0, 2, 3, 1) for t in (q, k, v))  # zeros after the projection
        gh, gw = qp.shape[1] // rh, qp.shape[2] // rw
        m = self.num_heads

        def regions(t):  # (n, H, W, c) -> (n, m, regions, rh*rw, c/m)
            t = t.reshape(n, gh, rh, gw, rw, m, c // m).permute(0, 5, 1, 3, 2, 4, 6)
            return t.reshape(n, m, gh * gw, rh * rw, c // m)

        qr, kr, vr = regions(qp), regions(kp), regions(vp)
        gather = idx[:, None, :, :, None, None].expand(n, m, gh * gw, self.topk, rh * rw, c // m)
        kg = torch.gather(kr[:, :, None].expand(n, m, gh * gw, gh * gw, rh * rw, c // m), 3, gather).flatten(3, 4)
        vg = torch.gather(vr[:, :, None].expand(n, m, gh * gw, gh * gw, rh * rw, c // m), 3, gather).flatten(3, 4)
        out = torch.softmax((qr * self.scale) @ kg.transpose(-1, -2), -1) @ vg  # (n, m, regions, rh*rw, c/m)
        out = out.reshape(n, m, gh, gw, rh, rw, c // m).permute(0, 1, 6, 2, 4, 3, 5).reshape(n, c, gh * rh, gw * rw)
        out = out[:, :, :h_in, :w_in] + self.lepe(v)
        return self.output_linear(out)


def make(variant, dim=32, heads=4, n_win=4, topk=3, seed=0, **kw):
    torch.manual_seed(seed)
    if variant == "nhwc":
        return BiLevelRoutingAttention(dim, n_win=n_win, num_heads=heads, topk=topk, **kw)
    return BiLevelRoutingAttention_nchw(dim, num_heads=heads, n_win=n_win, topk=topk, **kw)


def inputs(variant, h, w, dim=32, seed=1):
    x = torch.randn(2, h, w, dim, generator=torch.Generator().manual_seed(seed))
    return (x if variant == "nhwc" else x.permute(0, 3, 1, 2).contiguous()).requires_grad_(True)


def run(module, x):
    """Output, input gradient, and the gradients of the weights by role (the two layouts name them differently)."""
    for p in module.parameters():
        p.grad = None
    x = x.detach().clone().requires_grad_(True)
    out = module(x)
    out.backward(torch.cos(torch.arange(out.numel(), dtype=out.dtype)).reshape(out.shape))
    if isinstance(module, RoutedAttention):
        roles = {"qkv": module.qkv, "proj": module.proj, "lepe": module.lepe}
    elif hasattr(module, "wo"):
        roles = {"qkv": module.qkv.qkv, "proj": module.wo, "lepe": module.lepe}
    else:
        roles = {"qkv": module.qkv_linear, "proj": module.output_linear, "lepe": module.lepe}
    grads = {
        f"{r}.{n}": p.grad.reshape(p.shape[0], -1)
        for r, mod in roles.items()
        if isinstance(mod, nn.Module)
        for n, p in mod.named_parameters()
    }
    return out, x.grad, grads


def assert_same(a, b):
    out_a, dx_a, g_a = a
    out_b, dx_b, g_b = b
    torch.testing.assert_close(out_a, out_b, rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(dx_a, dx_b, rtol=1e-4, atol=2e-5)
    assert g_a.keys() == g_b.keys()
    for name in g_a:
        torch.testing.assert_close(g_a[name], g_b[name], rtol=1e-4, atol=5e-5, msg=name)


def masked_composition(module, x):
    """What the default (masked) padding computes, from the module's weights and the gather reference."""
    nchw = not hasattr(module, "wo")
    xs = x.permute(0, 2, 3, 1) if nchw else x
    n, h, w, c = xs.shape
    if nchw:
        qkv_w, qkv_b = module.qkv_linear.weight.flatten(1), module.qkv_linear.bias
        out_w, out_b = module.output_linear.weight.flatten(1), module.output_linear.bias
    else:
        qkv_w, qkv_b, out_w, out_b = module.qkv.qkv.weight, module.qkv.qkv.bias, module.wo.weight, module.wo.bias
    m = module.num_heads
    q, k, v = F.linear(xs, qkv_w, qkv_b).reshape(n, h, w, 3, m, c // m).permute(3, 0, 4, 1, 2, 5)
    idx = route(q, k, module.n_win, module.n_win, module.topk, "shared")
    out = routed_attention_reference(q, k, v, idx, module.n_win, module.n_win, module.scale)
    out = out.permute(0, 2, 3, 1, 4).reshape(n, h, w, c)
    out = out + module.lepe(v.permute(0, 1, 4, 2, 3).reshape(n, c, h, w)).permute(0, 2, 3, 1)
    out = F.linear(out, out_w, out_b)
    return out.permute(0, 3, 1, 2) if nchw else out


class Net(nn.Module):
    """A model holding the attention deep inside, as BiFormer's blocks do."""

    def __init__(self, attn):
        super().__init__()
        self.blocks = nn.Sequential(nn.Identity(), nn.ModuleDict({"attn": attn}))

    def forward(self, x):
        return self.blocks[1]["attn"](x)


@pytest.mark.parametrize("variant", ["nhwc", "nchw"])
@pytest.mark.parametrize("padding", ["masked", "biformer"])
@pytest.mark.parametrize("n_win, topk, size", [(4, 3, (16, 12)), (7, 4, (14, 14))])
def test_patched_equals_original_on_multiples_of_the_window_count(variant, padding, n_win, topk, size):
    original = make(variant, n_win=n_win, topk=topk)
    model = Net(copy.deepcopy(original))
    assert ovseg_fast.patch.biformer(model, padding=padding) == 1
    patched = model.blocks[1]["attn"]
    assert isinstance(patched, RoutedAttention) and patched.scale == pytest.approx(32**-0.5)
    x = inputs(variant, *size)
    assert_same(run(patched, x), run(original, x))


@pytest.mark.parametrize("variant", ["nhwc", "nchw"])
@pytest.mark.parametrize("n_win, size", [(4, (13, 10)), (4, (15, 17)), (4, (5, 9)), (2, (9, 7))])
def test_biformer_padding_reproduces_biformer_on_other_sizes(variant, n_win, size):
    original = make(variant, n_win=n_win, topk=3)
    patched = RoutedAttention.from_biformer(copy.deepcopy(original), padding="biformer")
    x = inputs(variant, *size)
    assert_same(run(patched, x), run(original, x))
    # The default masks the padding, which the original lets into the routing, softmax and LEPE.
    masked = RoutedAttention.from_biformer(copy.deepcopy(original))
    assert (masked(x) - original(x)).abs().max() > 1e-3


@pytest.mark.parametrize("variant", ["nhwc", "nchw"])
@pytest.mark.parametrize("size", [(13, 10), (15, 17)])
def test_masked_padding_on_other_sizes_is_the_gather_reference_with_the_modules_weights(variant, size):
    original = make(variant, n_win=4, topk=3)
    patched = RoutedAttention.from_biformer(copy.deepcopy(original))
    x = inputs(variant, *size)
    out, dx, _ = run(patched, x)
    xr = x.detach().clone().requires_grad_(True)
    expected = masked_composition(original, xr)
    expected.backward(torch.cos(torch.arange(expected.numel(), dtype=expected.dtype)).reshape(expected.shape))
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(dx, xr.grad, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("size", [(16, 12), (13, 10)])
def test_without_lepe(size):
    original = make("nhwc", side_dwconv=0)
    patched = RoutedAttention.from_biformer(copy.deepcopy(original), padding="biformer")
    assert patched.lepe is None
    x = inputs("nhwc", *size)
    assert_same(run(patched, x), run(original, x))


def test_parameters_are_kept_and_mode_follows():
    original = make("nhwc").eval()
    patched = RoutedAttention.from_biformer(original)
    assert patched.qkv.weight is original.qkv.qkv.weight and patched.proj.bias is original.wo.bias
    assert patched.lepe.weight is original.lepe.weight and not patched.training
    nchw = make("nchw")
    view = RoutedAttention.from_biformer(nchw)
    assert view.qkv.weight.data_ptr() == nchw.qkv_linear.weight.data_ptr() and view.training
    assert view.channels_first and not patched.channels_first


@pytest.mark.parametrize(
    "kwargs, setting",
    [
        (dict(qk_dim=16), "qk_dim=16"),
        (dict(kv_downsample_mode="ada_avgpool"), "kv_downsample_mode='ada_avgpool'"),
        (dict(param_routing=True), "param_routing=True"),
        (dict(diff_routing=True), "diff_routing=True"),
        (dict(soft_routing=True), "soft_routing=True"),
        (dict(param_attention="qkv"), "param_attention='qkv'"),
        (dict(side_dwconv=4), "lepe="),
    ],
)
def test_unsupported_settings_are_refused_and_nothing_changes(kwargs, setting):
    supported = make("nhwc")
    unsupported = make("nhwc", **kwargs)
    model = nn.Sequential(supported, nn.Sequential(unsupported))
    with pytest.raises(ValueError, match=f"BiFormer setting {setting}".replace("(", r"\(").replace("[", r"\[")):
        ovseg_fast.patch.biformer(model)
    assert model[0] is supported and model[1][0] is unsupported


def test_counts_every_module_and_leaves_others_alone():
    model = nn.Sequential(make("nhwc"), nn.Linear(4, 4), nn.Sequential(make("nchw"), make("nhwc", seed=3)))
    assert ovseg_fast.patch.biformer(model) == 3
    assert isinstance(model[1], nn.Linear)
    assert sum(isinstance(m, RoutedAttention) for m in model.modules()) == 3
    assert ovseg_fast.patch.biformer(model) == 0


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: ovseg_fast.patch.biformer("model"), TypeError, "model must be an nn.Module"),
        (lambda: ovseg_fast.patch.biformer(nn.Sequential(), padding="zeros"), ValueError, "padding"),
        (lambda: ovseg_fast.patch.biformer(make("nhwc")), ValueError, "use RoutedAttention.from_biformer"),
        (lambda: RoutedAttention.from_biformer(nn.Linear(2, 2)), TypeError, "module must be BiFormer"),
        (lambda: RoutedAttention(8, 2, 2, 1, padding="reflect"), ValueError, "padding"),
        (lambda: RoutedAttention(8, 2, 2, 1, channels_first=1), TypeError, "channels_first must be a bool"),
        (
            lambda: RoutedAttention(8, 2, 2, 1, routing="per_head", padding="biformer", channels_first=True),
            ValueError,
            "needs routing='shared'",
        ),
        (
            lambda: RoutedAttention(8, 2, 4, 1, padding="biformer", channels_first=True)(torch.randn(1, 8, 3, 8)),
            ValueError,
            "needs H >= 4",
        ),
        (
            lambda: RoutedAttention(8, 2, 2, 5, padding="biformer", channels_first=True)(torch.randn(1, 8, 4, 4)),
            ValueError,
            "topk=5 exceeds the 4 regions",
        ),
        (
            lambda: RoutedAttention(8, 2, 2, 1, channels_first=True)(torch.randn(1, 4, 4, 8)),
            ValueError,
            r"\(B, 8, H, W\)",
        ),
    ],
)
def test_bad_inputs(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize("variant", ["nhwc", "nchw"])
def test_checkpoints_move_between_the_original_and_the_patched_model(variant):
    original = Net(make(variant))
    patched = copy.deepcopy(original)
    ovseg_fast.patch.biformer(patched)
    saved = original.state_dict()
    assert {k: v.shape for k, v in patched.state_dict().items()} == {k: v.shape for k, v in saved.items()}
    # A BiFormer checkpoint (other weights) loads into the patched model, and back into a fresh original.
    other = Net(make(variant, seed=5))
    patched.load_state_dict(other.state_dict())
    fresh = Net(make(variant, seed=7))
    fresh.load_state_dict(patched.state_dict())
    x = inputs(variant, 16, 12)
    with torch.no_grad():
        torch.testing.assert_close(patched(x), other(x), rtol=1e-4, atol=2e-5)
        torch.testing.assert_close(fresh(x), other(x), rtol=1e-4, atol=2e-5)
    # The hooks survive pickling (torch.save of a whole model).
    clone = pickle.loads(pickle.dumps(patched))
    assert clone.state_dict().keys() == saved.keys()
