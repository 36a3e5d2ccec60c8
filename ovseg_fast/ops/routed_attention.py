"""Routed top-k window attention (BiFormer's bi-level routing attention, LDVC's local consensus
self-attention), fused, forward and backward.

The maths, the router, the gather reference and the kernel contract are in
:mod:`ovseg_fast.ops.routed_attention_reference`; this module is the public op: input checks, the
router call, the ``torch.library`` registration (forward, backward, fake tensors, autograd, FLOP
formulas) and backend dispatch to the C++ kernel (``csrc/routed_attention.cpp``), the Triton kernel
(``kernels/routed_attention.py``) or the reference.
"""

from __future__ import annotations

import functools
import importlib
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import register_flop_formula

from ovseg_fast.backends import KernelSupport, dispatch, register_op
from ovseg_fast.ops._checks import check_choice, check_float, check_int, check_same_device, check_shape, check_tensor
from ovseg_fast.ops.routed_attention_reference import (
    compute_dtype,
    nonempty_windows,
    route,
    routed_attention_backward_reference,
    routed_attention_forward_reference,
    window_geometry,
)

__all__ = ["RoutedAttention", "routed_attention", "routed_attention_flops"]

register_op(
    "routed_attention",
    KernelSupport(
        cpu_dtypes=(torch.float32, torch.float64, torch.bfloat16, torch.float16),
        triton_dtypes=(torch.float32, torch.float16, torch.bfloat16),
        cpu_ops=("routed_attention_cpu_forward", "routed_attention_cpu_backward"),
    ),
)

ROUTINGS = ("shared", "per_head")
PADDINGS = ("masked", "biformer")
_INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)


def _triton():
    return importlib.import_module("ovseg_fast.kernels.routed_attention")


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return compute_dtype(dtype)


def _check_index_values(indices: Tensor, h: int, w: int, nh: int, nw: int) -> None:
    """Given indices must be in range, distinct per row, and name non-empty windows (run time).

    Runs on every call with given indices, so it keeps to a few tensor ops (their dispatch, not their
    arithmetic, is the cost at BiFormer's sizes) and locates a bad entry only once it has failed.
    """
    p = nh * nw
    if indices.numel() == 0:
        return
    low, high = (int(t) for t in torch.aminmax(indices))
    if low < 0 or high >= p:
        raise ValueError(
            f"routed_attention: indices must be window ids in [0, {p}) (nh * nw), got values in [{low}, {high}]"
        )
    ordered = indices.sort(dim=-1).values
    dup = ordered[..., 1:] == ordered[..., :-1]
    if bool(dup.any()):
        where = tuple(int(i) for i in dup.any(-1).nonzero()[0])
        raise ValueError(
            f"routed_attention: indices{list(where)} repeats a window; each row must hold distinct windows"
        )
    windows = nonempty_windows(h, w, nh, nw)
    if len(windows) == p:  # H and W fill every window row and column: no window is pure padding
        return
    nonempty = torch.zeros(p, dtype=torch.bool, device=indices.device)
    nonempty[windows] = True
    bad = ~nonempty[indices]
    if bool(bad.any()):
        where = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"routed_attention: indices{list(where[:-1])} selects window {int(indices[where])}, which holds no token "
            f"(a {h}x{w} grid in {nh}x{nw} windows leaves it all padding)"
        )


def _empty(q: Tensor) -> tuple[Tensor, Tensor]:
    return (
        torch.zeros(q.shape, dtype=q.dtype, device=q.device),
        torch.zeros(q.shape[:4], dtype=_lse_dtype(q.dtype), device=q.device),
    )


@torch.library.custom_op("ovseg_fast::routed_attention", mutates_args=())
def _routed_attention_op(
    q: Tensor, k: Tensor, v: Tensor, indices: Tensor, nh: int, nw: int, scale: float, validate_indices: bool
) -> tuple[Tensor, Tensor]:
    """Forward of the kernel contract: ``(out, lse)`` on canonical inputs."""

    def check():
        if validate_indices:
            _check_index_values(indices, q.shape[2], q.shape[3], nh, nw)

    def checked(fn):
        def run():
            check()
            return fn()

        return run

    if q.numel() == 0:
        check()
        return _empty(q)
    args = (q, k, v, indices, nh, nw, scale)
    return dispatch(
        "routed_attention",
        q,
        {
            "reference": checked(lambda: routed_attention_forward_reference(*args)),
            # The C++ kernel checks the indices itself, in one pass before its work (any caller's).
            "cpu": lambda: tuple(torch.ops.ovseg_fast.routed_attention_cpu_forward(*args)),
            "triton": checked(lambda: tuple(_triton().routed_attention_forward(*args))),
        },
    )


@_routed_attention_op.register_fake
def _routed_attention_fake(q, k, v, indices, nh, nw, scale, validate_indices):
    return q.new_empty(q.shape), q.new_empty(q.shape[:4], dtype=_lse_dtype(q.dtype))


@torch.library.custom_op("ovseg_fast::routed_attention_backward", mutates_args=())
def _routed_attention_backward_op(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    indices: Tensor,
    nh: int,
    nw: int,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients ``(dq, dk, dv)``, the softmax recomputed from the saved ``lse``."""
    if q.numel() == 0:
        return tuple(torch.zeros(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))  # type: ignore[return-value]
    args = (grad_out, q, k, v, out, lse, indices, nh, nw, scale)
    return dispatch(
        "routed_attention",
        q,
        {
            "reference": lambda: routed_attention_backward_reference(*args),
            "cpu": lambda: tuple(torch.ops.ovseg_fast.routed_attention_cpu_backward(*args)),
            "triton": lambda: tuple(_triton().routed_attention_backward(*args)),
        },
    )


@_routed_attention_backward_op.register_fake
def _routed_attention_backward_fake(grad_out, q, k, v, out, lse, indices, nh, nw, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, indices, nh, nw, scale, _ = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, indices)
    ctx.hyper = (nh, nw, scale)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, indices = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = _routed_attention_backward_op(grad_out, q, k, v, out, lse, indices, *ctx.hyper)
    return dq, dk, dv, None, None, None, None, None


_routed_attention_op.register_autograd(_backward, setup_context=_setup_context)


def routed_attention_flops(
    batch: int, heads: int, h: int, w: int, head_dim: int, num_windows, topk: int, *, backward: bool = False
) -> int:
    """FLOPs of the attention step, 2 per multiply-add (routing and softmax not counted).

    Forward: ``QK^T`` and ``PV`` over the attended keys, ``4 * D`` per (query, key) pair. Each query
    attends to ``topk`` windows; the count takes them of the average non-empty window size, which is
    exact when H and W are multiples of the window grid (otherwise it depends on which windows are
    selected, which shapes alone do not tell). Backward: FlashAttention's convention, 2.5x the forward
    (``dV``, ``dP``, ``dQ``, ``dK`` and the recomputed ``QK^T``); the C++ kernel also recomputes ``dP``
    and ``QK^T`` once more in its dK/dV pass, which this count leaves out.
    """
    nh, nw = _window_grid(num_windows)
    windows = nonempty_windows(h, w, nh, nw) if h and w else []
    if not windows:
        return 0
    mean_window = (h * w) / len(windows)
    fwd = 4 * batch * heads * h * w * topk * mean_window * head_dim
    return round(fwd * (2.5 if backward else 1.0))


@register_flop_formula(torch.ops.ovseg_fast.routed_attention)
def _routed_attention_flop_formula(
    q_shape, k_shape, v_shape, indices_shape, nh, nw, *args, out_shape=None, **kwargs
) -> int:
    b, hh, h, w, d = q_shape
    return routed_attention_flops(b, hh, h, w, d, (nh, nw), indices_shape[-1])


@register_flop_formula(torch.ops.ovseg_fast.routed_attention_backward)
def _routed_attention_backward_flop_formula(
    grad_shape, q_shape, k_shape, v_shape, out_shape_, lse_shape, indices_shape, nh, nw, *args, out_shape=None, **kwargs
) -> int:
    b, hh, h, w, d = q_shape
    return routed_attention_flops(b, hh, h, w, d, (nh, nw), indices_shape[-1], backward=True)


def _window_grid(num_windows) -> tuple[int, int]:
    if isinstance(num_windows, (tuple, list)):
        if len(num_windows) != 2:
            raise ValueError(f"num_windows must be an int or a pair (nh, nw), got {num_windows!r}")
        nh = check_int("num_windows[0]", num_windows[0], minimum=1)
        nw = check_int("num_windows[1]", num_windows[1], minimum=1)
        return nh, nw
    n = check_int("num_windows", num_windows, minimum=1)
    return n, n


def routed_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    num_windows: Union[int, tuple[int, int]],
    topk: int,
    scale: Optional[float] = None,
    routing: str = "shared",
    indices: Optional[Tensor] = None,
    return_indices: bool = False,
):
    r"""Bi-level routing attention: every query attends to the tokens of its window's top-k windows.

    The ``H x W`` token grid is split into ``nh x nw`` windows of ``ceil(H/nh) x ceil(W/nw)`` tokens
    (padding at the bottom and right, BiFormer's convention). A router scores window-to-window
    affinity ``A_pc = mean_p(q) . mean_c(k)`` (means over each window's valid tokens) and keeps the
    ``topk`` best windows ``I_p`` for every window ``p``; each query token of ``p`` then attends to all
    valid key tokens of the windows in ``I_p``: ``out_i = softmax_j(scale q_i . k_j) v_j``
    (Zhu et al., BiFormer, CVPR 2023, eq. 1-6). Padded keys enter no softmax, padded tokens no mean.

    Args:
        q, k, v: (B, heads, H, W, head_dim) tensors of one dtype (float32, float64, bfloat16,
            float16) on one device; any strides (e.g. views of a fused qkv projection).
        num_windows: ``nh`` (= ``nw``) or ``(nh, nw)``: the grid of routing windows (LDVC: 8; BiFormer: 7).
        topk: windows attended per query window, 1 .. number of non-empty windows.
        scale: softmax temperature, default ``head_dim ** -0.5``.
        routing: ``"shared"`` (BiFormer: heads concatenated, one top-k for all heads) or
            ``"per_head"`` (each head routes on its own q and k).
        indices: optional precomputed routing, int (B, P, topk) for shared or (B, heads, P, topk)
            for per-head routing (P = nh * nw, row-major windows), bypassing the router; its layout
            must agree with ``routing``, and every row must hold distinct, non-empty windows.
        return_indices: also return the routing indices used (int64, the layout above).

    Returns:
        ``out`` (B, heads, H, W, head_dim) in q's dtype, and the indices if ``return_indices``.

    Routing is computed in float32 (float64 for float64 inputs) with a stable sort, so ties go to
    the lower window index; it carries no gradient. Gradients flow to q, k and v.

    Backends: the fused C++ kernel for CPU tensors, the fused Triton kernel for CUDA tensors, else
    the reference (see :mod:`ovseg_fast.backends`). No backend materialises the top-k gathered K/V.
    """
    check_tensor("q", q, ndim=(5,))
    for name, t in (("k", k), ("v", v)):
        check_tensor(name, t, ndim=(5,))
        if t.dtype != q.dtype:
            raise TypeError(
                f"{name} must have the dtype of q ({str(q.dtype).replace('torch.', '')}), "
                f"got {str(t.dtype).replace('torch.', '')}"
            )
        check_shape(name, t, tuple(q.shape), "(the shape of q)")
    check_same_device("q", q, k=k, v=v, indices=indices)
    nh, nw = _window_grid(num_windows)
    topk = check_int("topk", topk, minimum=1)
    check_choice("routing", routing, ROUTINGS)
    if not isinstance(return_indices, bool):
        raise TypeError(f"return_indices must be a bool, got {type(return_indices).__name__}")
    b, heads, h, w, d = q.shape
    scale = (d**-0.5 if d > 0 else 1.0) if scale is None else check_float("scale", scale)
    p = nh * nw
    if h > 0 and w > 0:
        available = len(nonempty_windows(h, w, nh, nw))
        if topk > available:
            wh, ww = window_geometry(h, w, nh, nw)
            raise ValueError(
                f"topk={topk} exceeds the {available} non-empty windows of a {h}x{w} grid in {nh}x{nw} windows "
                f"of {wh}x{ww} tokens"
            )

    if indices is not None:
        check_tensor("indices", indices, dtypes=_INDEX_DTYPES)
        if indices.dim() == 3:
            layout = "shared"
            check_shape("indices", indices, (b, p, topk), "(B, nh * nw, topk) for shared routing")
            canonical = indices.unsqueeze(1)
        elif indices.dim() == 4:
            layout = "per_head"
            check_shape("indices", indices, (b, heads, p, topk), "(B, heads, nh * nw, topk) for per-head routing")
            canonical = indices
        else:
            raise ValueError(
                "indices must be (B, P, topk) (shared) or (B, heads, P, topk) (per head), "
                f"got shape {tuple(indices.shape)}"
            )
        if layout != routing:
            raise ValueError(
                f"indices has the {layout} layout {tuple(indices.shape)} but routing={routing!r}; "
                f"pass routing={layout!r}"
            )
        canonical = canonical.to(torch.int64).contiguous()
        validate = True
    else:
        if h == 0 or w == 0:  # no window holds a token: nothing to route, nothing to attend
            canonical = torch.zeros(
                (b, 1 if routing == "shared" else heads, p, topk), dtype=torch.int64, device=q.device
            )
        else:
            canonical = route(q, k, nh, nw, topk, routing)
        validate = False

    out, _ = _routed_attention_op(q, k, v, canonical, nh, nw, scale, validate)
    if not return_indices:
        return out
    returned = canonical[:, 0] if routing == "shared" else canonical
    return out, returned


class RoutedAttention(nn.Module):
    """BiFormer's BiLevelRoutingAttention / LDVC's LCSA block on the fused op.

    Input (B, H, W, C) (or (B, C, H, W) with ``channels_first=True``, BiFormer's NCHW variant):
    ``qkv`` linear projection, routed attention over ``num_windows`` windows with ``topk`` routing,
    LEPE (a ``lepe_kernel`` depthwise convolution of v, added to the attention output;
    ``lepe_kernel=0`` disables it) and the output projection. Output in the input's layout.

    ``padding`` decides what happens when H or W is not a multiple of the window count:
    ``"masked"`` (default) leaves the bottom/right windows short, and no padding enters the routing
    means, the softmax or LEPE; ``"biformer"`` zero-pads the input before the projections and crops
    the output, as BiFormer's ``auto_pad`` does, so the padded tokens (the projections' biases) take
    part in the routing, the softmax and LEPE and BiFormer's outputs are reproduced. With
    ``channels_first=True``, ``"biformer"`` is BiFormer's NCHW module's scheme instead: regions of
    ``H // nh x W // nw`` tokens (as many as cover the grid), routed on their real tokens' means,
    q, k, v zero-padded after the projections (the padded keys enter the softmax with score 0).
    Both settings agree on multiples of the window count. :meth:`from_biformer` builds one from a
    BiFormer module.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_windows: Union[int, tuple[int, int]],
        topk: int,
        qkv_bias: bool = True,
        lepe_kernel: int = 5,
        *,
        routing: str = "shared",
        scale: Optional[float] = None,
        padding: str = "masked",
        channels_first: bool = False,
    ):
        super().__init__()
        dim = check_int("dim", dim, minimum=1)
        num_heads = check_int("num_heads", num_heads, minimum=1)
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        lepe_kernel = check_int("lepe_kernel", lepe_kernel, minimum=0)
        if lepe_kernel and lepe_kernel % 2 == 0:
            raise ValueError(f"lepe_kernel must be odd (or 0 to disable LEPE), got {lepe_kernel}")
        self.dim, self.num_heads = dim, num_heads
        self.num_windows = _window_grid(num_windows)
        self.topk = check_int("topk", topk, minimum=1)
        self.routing = check_choice("routing", routing, ROUTINGS)
        self.scale = None if scale is None else check_float("scale", scale)
        self.lepe_kernel = lepe_kernel
        self.padding = check_choice("padding", padding, PADDINGS)
        if not isinstance(channels_first, bool):
            raise TypeError(f"channels_first must be a bool, got {type(channels_first).__name__}")
        self.channels_first = channels_first
        if padding == "biformer" and channels_first and routing != "shared":
            raise ValueError(
                "padding='biformer' with channels_first=True (BiFormer's NCHW module) needs routing='shared'"
            )
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.lepe = nn.Conv2d(dim, dim, lepe_kernel, padding=lepe_kernel // 2, groups=dim) if lepe_kernel else None
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        check_tensor("x", x, ndim=(4,))
        if x.shape[1 if self.channels_first else -1] != self.dim:
            want = f"(B, {self.dim}, H, W)" if self.channels_first else f"(B, H, W, {self.dim})"
            raise ValueError(f"x must be {want}, got shape {tuple(x.shape)}")
        if self.channels_first:
            return self._forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self._forward(x)

    def _forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[1:3]
        if self.padding == "biformer" and self.channels_first:
            return self._attend_regions(x)
        if self.padding == "biformer":
            nh, nw = self.num_windows
            pad_b, pad_r = (-h) % nh, (-w) % nw
            if pad_b or pad_r:
                return self._attend(F.pad(x, (0, 0, 0, pad_r, 0, pad_b)))[:, :h, :w]
        return self._attend(x)

    def _attend(self, x: Tensor) -> Tensor:
        b, h, w, c = x.shape
        qkv = self.qkv(x).reshape(b, h, w, 3, self.num_heads, c // self.num_heads)
        # Strided views, no copies: the kernels read (B, heads, H, W, head_dim) through strides.
        q, k, v = (qkv.select(3, i).permute(0, 3, 1, 2, 4) for i in range(3))
        out = routed_attention(
            q, k, v, num_windows=self.num_windows, topk=self.topk, scale=self.scale, routing=self.routing
        )
        out = out.permute(0, 2, 3, 1, 4).reshape(b, h, w, c)
        if self.lepe is not None:
            lepe = self.lepe(qkv.select(3, 2).reshape(b, h, w, c).permute(0, 3, 1, 2))
            out = out + lepe.permute(0, 2, 3, 1)
        return self.proj(out)

    def _attend_regions(self, x: Tensor) -> Tensor:
        """BiFormer's NCHW module: regions of ``H // nh x W // nw`` tokens (as many as it takes to cover
        the grid), routed on the means of their real tokens; q, k, v zero-padded after the projections,
        so the padded keys enter the softmax with score 0 and value 0; LEPE on the unpadded v."""
        b, h, w, c = x.shape
        nh, nw = self.num_windows
        rh, rw = h // nh, w // nw
        if rh == 0 or rw == 0:
            raise ValueError(
                f"padding='biformer' (BiFormer's NCHW regions of H // {nh} x W // {nw} tokens) needs H >= {nh} and "
                f"W >= {nw}, got {h}x{w}"
            )
        gh, gw = -(-h // rh), -(-w // rw)
        if self.topk > gh * gw:
            raise ValueError(f"topk={self.topk} exceeds the {gh * gw} regions of {rh}x{rw} tokens of a {h}x{w} grid")
        heads, d = self.num_heads, c // self.num_heads
        qkv = self.qkv(x)
        with torch.no_grad():  # routing is a hard selection, no gradient (BiFormer detaches q and k)
            means = F.avg_pool2d(
                qkv[..., : 2 * c].permute(0, 3, 1, 2), (rh, rw), ceil_mode=True, count_include_pad=False
            ).flatten(2)
            q_r, k_r = means.split(c, dim=1)
            indices = torch.topk(q_r.transpose(1, 2) @ k_r, self.topk, dim=-1).indices
        padded = F.pad(qkv, (0, 0, 0, gw * rw - w, 0, gh * rh - h)).reshape(b, gh * rh, gw * rw, 3, heads, d)
        q, k, v = (padded.select(3, i).permute(0, 3, 1, 2, 4) for i in range(3))
        out = routed_attention(q, k, v, num_windows=(gh, gw), topk=self.topk, scale=self.scale, indices=indices)
        out = out[:, :, :h, :w].permute(0, 2, 3, 1, 4).reshape(b, h, w, c)
        if self.lepe is not None:
            out = out + self.lepe(qkv[..., 2 * c :].permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.proj(out)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, num_windows={self.num_windows}, topk={self.topk}, "
            f"routing={self.routing!r}, lepe_kernel={self.lepe_kernel}, padding={self.padding!r}"
            + (", channels_first=True" if self.channels_first else "")
        )

    @classmethod
    def from_biformer(cls, module: nn.Module, *, padding: str = "masked") -> RoutedAttention:
        """A RoutedAttention computing what BiFormer's bi-level routing attention ``module`` computes.

        ``module`` is BiFormer's ``BiLevelRoutingAttention`` ((B, H, W, C) input) or its NCHW variant
        (``nchwBRA`` / ``BiLevelRoutingAttention_nchw``), recognised by their attributes. The result
        holds the module's own parameters (the same ``nn.Parameter`` objects for the (B, H, W, C)
        module; views of them for the NCHW one, whose projections are 1x1 convolutions), its scale
        (``qk_dim ** -0.5`` unless set: BiFormer scales by the full width, not the head width), its
        ``n_win``, ``topk``, heads and LEPE, in the module's layout and train/eval mode.

        Supported settings (those of BiFormer's released models): identity K/V downsampling,
        ``qk_dim == dim``, output projection ``wo`` a Linear (``param_attention="qkvo"``), no
        parametric, differentiable or soft routing, any odd LEPE kernel (or none). Anything else
        raises ``ValueError`` naming the setting. Routing ties (measure zero with real inputs) may
        pick a different window than ``torch.topk``.

        Its ``state_dict`` keeps the module's keys and shapes (``qkv.qkv.weight``, ``wo.weight``, ...;
        ``qkv_linear.weight`` (3C, C, 1, 1), ... for NCHW) and ``load_state_dict`` takes them, so
        checkpoints move between the patched and the original model.

        ``padding``: ``"masked"`` (default) or ``"biformer"`` (see the class docstring). With
        ``"biformer"`` either module is reproduced on any size: the (B, H, W, C) one with ``auto_pad``
        (zero-padding of the input), the NCHW one with its regions of ``H // n_win`` rows and zeros
        after the projections. With ``"masked"`` both agree with BiFormer on multiples of ``n_win``.
        """
        spec = biformer_spec(module)
        new = cls(
            spec["dim"],
            spec["num_heads"],
            spec["n_win"],
            spec["topk"],
            qkv_bias=spec["qkv_bias"],
            lepe_kernel=spec["lepe_kernel"],
            scale=spec["scale"],
            padding=padding,
            channels_first=spec["channels_first"],
        )
        for name, param in spec["params"].items():
            owner, attr = name.split(".")
            setattr(getattr(new, owner), attr, param)
        new.train(module.training)
        # Checkpoints keep BiFormer's keys and shapes both ways, so a patched model saves what BiFormer
        # loads and loads what BiFormer saved (partials of module-level functions: picklable).
        names = spec["state_dict_names"]
        new.register_state_dict_post_hook(functools.partial(_to_biformer_state, names=names))
        new.register_load_state_dict_pre_hook(functools.partial(_from_biformer_state, names=names))
        return new


def _to_biformer_state(module, state_dict, prefix, local_metadata, *, names):
    for ours, (theirs, shape) in names.items():
        if prefix + ours in state_dict:
            value = state_dict.pop(prefix + ours)
            state_dict[prefix + theirs] = value if shape is None else value.reshape(shape)


def _from_biformer_state(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors, *, names):
    for ours, (theirs, _) in names.items():
        if prefix + theirs in state_dict and prefix + ours not in state_dict:
            value = state_dict.pop(prefix + theirs)
            state_dict[prefix + ours] = value.reshape(value.shape[:2]) if value.dim() == 4 else value


def _odd_depthwise(lepe, dim: int) -> int:
    """LEPE's kernel size (0 when BiFormer's ``side_dwconv=0`` made it a zeros function), or raises."""
    if not isinstance(lepe, nn.Module):
        return 0
    ok = (
        isinstance(lepe, nn.Conv2d)
        and lepe.in_channels == dim
        and lepe.out_channels == dim
        and lepe.groups == dim
        and lepe.kernel_size[0] == lepe.kernel_size[1]
        and lepe.kernel_size[0] % 2 == 1
        and lepe.stride == (1, 1)
        and lepe.dilation == (1, 1)
        and lepe.padding == (lepe.kernel_size[0] // 2,) * 2
        and lepe.padding_mode == "zeros"
        and lepe.bias is not None
    )
    if not ok:
        raise ValueError(
            f"BiFormer setting lepe={lepe!r}: only a depthwise odd-kernel 'same' Conv2d with bias is supported"
        )
    return lepe.kernel_size[0]


def biformer_spec(module: nn.Module) -> dict:
    """The RoutedAttention settings and parameters of BiFormer module ``module``; raises ``ValueError``
    naming the first unsupported setting (see :meth:`RoutedAttention.from_biformer`)."""
    variant = biformer_variant(module)
    if variant is None:
        raise TypeError(
            f"module must be BiFormer's bi-level routing attention (BiLevelRoutingAttention or its NCHW variant), "
            f"got {type(module).__name__}"
        )
    dim, heads, n_win, topk = module.dim, module.num_heads, module.n_win, module.topk
    if isinstance(n_win, (tuple, list)) or isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ValueError(
            f"BiFormer setting n_win={n_win!r}, topk={topk!r}: an int window count and topk >= 1 are needed"
        )
    if dim % heads:
        raise ValueError(f"BiFormer setting dim={dim}, num_heads={heads}: dim must be divisible by num_heads")
    scale = float(module.scale)
    lepe_kernel = _odd_depthwise(module.lepe, dim)
    params = {}
    if variant == "nhwc":
        if module.qk_dim != dim:
            raise ValueError(f"BiFormer setting qk_dim={module.qk_dim}: only qk_dim == dim ({dim}) is supported")
        mode = getattr(module, "kv_downsample_mode", "identity")
        if mode != "identity" or not isinstance(getattr(module, "kv_down", nn.Identity()), nn.Identity):
            raise ValueError(f"BiFormer setting kv_downsample_mode={mode!r}: only 'identity' is supported")
        for flag in ("param_routing", "diff_routing", "soft_routing"):
            if getattr(module, flag, False):
                raise ValueError(f"BiFormer setting {flag}=True: only hard, non-parametric top-k routing is supported")
        qkv = getattr(module.qkv, "qkv", None)
        if not isinstance(qkv, nn.Linear) or qkv.in_features != dim or qkv.out_features != 3 * dim:
            raise ValueError(
                f"BiFormer setting qkv={module.qkv!r}: a QKVLinear over Linear({dim}, {3 * dim}) is needed"
            )
        if not isinstance(module.wo, nn.Linear):
            raise ValueError(
                f"BiFormer setting param_attention={getattr(module, 'param_attention', '?')!r} (wo={module.wo!r}): "
                "only 'qkvo' (a Linear output projection) is supported"
            )
        params["qkv.weight"], params["qkv.bias"] = qkv.weight, qkv.bias
        params["proj.weight"], params["proj.bias"] = module.wo.weight, module.wo.bias
    else:
        for name, out in (("qkv_linear", 3 * dim), ("output_linear", dim)):
            conv = getattr(module, name)
            if not (
                isinstance(conv, nn.Conv2d)
                and conv.kernel_size == (1, 1)
                and conv.groups == 1
                and conv.in_channels == dim
                and conv.out_channels == out
                and conv.stride == (1, 1)
            ):
                raise ValueError(f"BiFormer setting {name}={conv!r}: a 1x1 Conv2d({dim}, {out}) is needed")
        # Views share the storage, so the conv weights stay the ones that are trained.
        params["qkv.weight"] = nn.Parameter(module.qkv_linear.weight.detach().view(3 * dim, dim))
        params["qkv.bias"] = module.qkv_linear.bias
        params["proj.weight"] = nn.Parameter(module.output_linear.weight.detach().view(dim, dim))
        params["proj.bias"] = module.output_linear.bias
        if params["proj.bias"] is None:
            raise ValueError("BiFormer setting output_linear bias=False: an output projection with bias is needed")
    if params["proj.bias"] is None:
        raise ValueError("BiFormer setting wo bias=False: an output projection with bias is needed")
    if lepe_kernel:
        params["lepe.weight"], params["lepe.bias"] = module.lepe.weight, module.lepe.bias
    if variant == "nhwc":
        renames = {"qkv": ("qkv.qkv", None), "proj": ("wo", None)}
    else:
        renames = {"qkv": ("qkv_linear", (3 * dim, dim, 1, 1)), "proj": ("output_linear", (dim, dim, 1, 1))}
    state_dict_names = {
        f"{ours}.{attr}": (f"{theirs}.{attr}", shape if attr == "weight" else None)
        for ours, (theirs, shape) in renames.items()
        for attr in ("weight", "bias")
        if params[f"{ours}.{attr}"] is not None
    }
    return dict(
        state_dict_names=state_dict_names,
        dim=dim,
        num_heads=heads,
        n_win=n_win,
        topk=topk,
        scale=scale,
        lepe_kernel=lepe_kernel,
        qkv_bias=params["qkv.bias"] is not None,
        channels_first=variant == "nchw",
        params=params,
    )


def biformer_variant(module: nn.Module) -> Optional[str]:
    """``"nhwc"`` for BiFormer's BiLevelRoutingAttention, ``"nchw"`` for its NCHW variant, else None
    (recognised by attributes, so BiFormer need not be importable)."""
    common = all(hasattr(module, a) for a in ("n_win", "topk", "num_heads", "dim", "scale", "lepe"))
    if not common:
        return None
    if all(hasattr(module, a) for a in ("qkv", "wo", "router", "kv_gather")):
        return "nhwc"
    if all(hasattr(module, a) for a in ("qkv_linear", "output_linear")):
        return "nchw"
    return None
