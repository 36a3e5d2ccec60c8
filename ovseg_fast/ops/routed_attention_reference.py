r"""Plain-PyTorch reference of routed top-k window attention: the readable spec of
``ovseg_fast.ops.routed_attention`` (BiFormer's bi-level routing attention, Zhu et al. 2023, eq. 1-6;
LDVC's local consensus self-attention).

Notation, for one image ``b`` and head ``h`` with tokens on an ``H x W`` grid::

    windows      nh x nw windows of wh x ww = ceil(H/nh) x ceil(W/nw) tokens, row-major p = a*nw + b;
                 window (a, b) holds the tokens of rows a*wh .. min((a+1)*wh, H)-1 and columns
                 b*ww .. min((b+1)*ww, W)-1 (the padding at the bottom/right does not exist)
    routing      qw_p = mean of q over the valid tokens of window p, kw_p likewise
                 A_pc = qw_p . kw_c           (routing="shared": heads concatenated, one A per image;
                                               routing="per_head": one A per head)
                 I_p  = the topk windows c with the largest A_pc, ties to the lower c, never an empty c
    attention    for a query token i of window p, over the keys j of the windows in I_p:
                 s_ij = scale * q_i . k_j,   lse_i = log sum_j exp(s_ij),
                 out_i = sum_j exp(s_ij - lse_i) v_j

Routing is a hard selection and carries no gradient (as in BiFormer, whose ``TopkRouting`` detaches).

Kernel contract (every backend): forward ``(q, k, v, indices, nh, nw, scale) -> (out, lse)`` with
``indices`` (B, G, P, topk) int64, G = 1 (shared) or heads, holding distinct non-empty windows;
``out`` (B, heads, H, W, D) contiguous in the dtype of q, ``lse`` (B, heads, H, W) in float32
(float64 for float64 inputs: the float64 kernels exist for gradcheck, which needs the exact lse).
Backward ``(grad_out, q, k, v, out, lse, indices, nh, nw, scale) -> (dq, dk, dv)`` recomputes the
softmax from ``lse``: ``P = exp(S - lse)``, ``Delta_i = dO_i . out_i``, ``dS = P * (dO V^T - Delta)``,
``dq = scale dS K``, ``dk = scale dS^T Q``, ``dv = P^T dO``.

The reference below gathers K and V top-k times as BiFormer's code does (its "topk times redundancy"),
but masks the padding BiFormer leaves unmasked; it is differentiable and device-agnostic.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "compute_dtype",
    "dense_attention_reference",
    "flex_attention_inputs",
    "nonempty_windows",
    "route",
    "routed_attention_backward_reference",
    "routed_attention_forward_reference",
    "routed_attention_reference",
    "window_geometry",
    "window_means",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def window_geometry(h: int, w: int, nh: int, nw: int) -> tuple[int, int]:
    """Window size (wh, ww) = (ceil(H / nh), ceil(W / nw)); padding goes at the bottom and right."""
    return -(-h // nh), -(-w // nw)


def window_valid(h: int, w: int, nh: int, nw: int, device=None) -> Tensor:
    """(P, wh*ww) bool: which slots of each padded window are real tokens."""
    wh, ww = window_geometry(h, w, nh, nw)
    rows = torch.arange(nh * wh, device=device) < h
    cols = torch.arange(nw * ww, device=device) < w
    grid = rows[:, None] & cols[None, :]
    return grid.reshape(nh, wh, nw, ww).permute(0, 2, 1, 3).reshape(nh * nw, wh * ww)


def nonempty_windows(h: int, w: int, nh: int, nw: int) -> list[int]:
    """Windows that contain at least one token (the others are pure padding)."""
    wh, ww = window_geometry(h, w, nh, nw)
    return [a * nw + b for a in range(nh) for b in range(nw) if a * wh < h and b * ww < w]


def _to_windows(x: Tensor, nh: int, nw: int) -> Tensor:
    """(B, Hh, H, W, D) -> (B, Hh, P, wh*ww, D), zero-padded at the bottom/right."""
    b, hh, h, w, d = x.shape
    wh, ww = window_geometry(h, w, nh, nw)
    x = torch.nn.functional.pad(x, (0, 0, 0, nw * ww - w, 0, nh * wh - h))
    x = x.reshape(b, hh, nh, wh, nw, ww, d).permute(0, 1, 2, 4, 3, 5, 6)
    return x.reshape(b, hh, nh * nw, wh * ww, d)


def _from_windows(x: Tensor, h: int, w: int, nh: int, nw: int) -> Tensor:
    """(B, Hh, P, wh*ww, *rest) -> (B, Hh, H, W, *rest), dropping the padding."""
    b, hh = x.shape[:2]
    rest = x.shape[4:]
    wh, ww = window_geometry(h, w, nh, nw)
    x = x.reshape(b, hh, nh, nw, wh, ww, *rest).transpose(3, 4).reshape(b, hh, nh * wh, nw * ww, *rest)
    return x[:, :, :h, :w]


def window_means(x: Tensor, nh: int, nw: int) -> Tensor:
    """(B, Hh, H, W, D) -> (B, Hh, P, D): the mean over each window's valid tokens (0 for empty ones)."""
    b, hh, h, w, d = x.shape
    wh, ww = window_geometry(h, w, nh, nw)
    valid = window_valid(h, w, nh, nw, x.device)
    count = valid.sum(1).clamp(min=1).to(x.dtype)
    # Two reductions of views, each over one axis with contiguous rows (the window's rows, then its
    # columns), not a sum over _to_windows' window-major copy: that copy and the strided sum took
    # longer than the fused attention the router feeds (LDVC: 2.4 ms against 0.14 ms).
    if nh * wh != h or nw * ww != w:
        x = torch.nn.functional.pad(x, (0, 0, 0, nw * ww - w, 0, nh * wh - h))
    rows = x.reshape(b, hh, nh, wh, nw * ww * d).sum(3)
    sums = rows.reshape(b, hh, nh, nw, ww, d).sum(4).reshape(b, hh, nh * nw, d)
    return sums / count[:, None]


@torch.no_grad()
def route(q: Tensor, k: Tensor, nh: int, nw: int, topk: int, routing: str = "shared") -> Tensor:
    """The router: (B, 1, P, topk) (shared) or (B, heads, P, topk) (per head) int64 window ids.

    Affinities are computed in float32 (float64 for float64 inputs). The top-k is a stable descending
    sort, so equal affinities go to the lower window index (``torch.topk`` leaves that order
    unspecified); empty windows get -inf and so come last, never within the top-k because ``topk``
    may not exceed the number of non-empty windows (checked by the public op).
    """
    b, hh, h, w, d = q.shape
    ct = compute_dtype(q.dtype)
    qw = window_means(q.to(ct), nh, nw)
    kw = window_means(k.to(ct), nh, nw)
    if routing == "shared":
        qw = qw.permute(0, 2, 1, 3).reshape(b, 1, nh * nw, hh * d)
        kw = kw.permute(0, 2, 1, 3).reshape(b, 1, nh * nw, hh * d)
    affinity = qw @ kw.transpose(-1, -2)
    empty = ~window_valid(h, w, nh, nw, q.device).any(1)
    affinity = affinity.masked_fill(empty, float("-inf"))
    order = torch.sort(affinity, dim=-1, descending=True, stable=True).indices
    return order[..., :topk].contiguous()


def _gather_windows(xw: Tensor, idx: Tensor) -> Tensor:
    """xw (B, Hh, P, M, D), idx (B, Hh, P, topk) -> (B, Hh, P, topk*M, D): BiFormer's K/V gather."""
    b, hh, p, m, d = xw.shape
    topk = idx.shape[-1]
    flat = idx.reshape(b, hh, p * topk, 1, 1).expand(b, hh, p * topk, m, d)
    return torch.gather(xw, 2, flat).reshape(b, hh, p, topk * m, d)


def _expand_heads(indices: Tensor, heads: int) -> Tensor:
    return indices.expand(indices.shape[0], heads, *indices.shape[2:])


def _scores(q: Tensor, k: Tensor, indices: Tensor, nh: int, nw: int, scale: float):
    """Windowed q, gathered k, the key mask and the scaled, masked scores (B, Hh, P, M, topk*M)."""
    _, hh, h, w, _ = q.shape
    idx = _expand_heads(indices, hh)
    qw = _to_windows(q, nh, nw)
    kg = _gather_windows(_to_windows(k, nh, nw), idx)
    valid = window_valid(h, w, nh, nw, q.device)
    key_valid = valid[idx].flatten(-2)  # (B, Hh, P, topk*M)
    s = (qw @ kg.transpose(-1, -2)) * scale
    s = s.masked_fill(~key_valid[..., None, :], float("-inf"))
    return qw, kg, idx, s


def routed_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, indices: Tensor, nh: int, nw: int, scale: float
) -> Tensor:
    """Differentiable gather reference of the attention step: ``out`` (B, Hh, H, W, D) in q's dtype.

    Computes in float32 (float64 for float64) like the kernels; gradients flow to q, k and v.
    """
    ct = compute_dtype(q.dtype)
    _, _, h, w, _ = q.shape
    _, _, idx, s = _scores(q.to(ct), k.to(ct), indices, nh, nw, scale)
    vg = _gather_windows(_to_windows(v.to(ct), nh, nw), idx)
    out = torch.softmax(s, dim=-1) @ vg
    return _from_windows(out, h, w, nh, nw).to(q.dtype)


def routed_attention_forward_reference(
    q: Tensor, k: Tensor, v: Tensor, indices: Tensor, nh: int, nw: int, scale: float
) -> tuple[Tensor, Tensor]:
    """Forward of the kernel contract: ``(out, lse)``."""
    ct = compute_dtype(q.dtype)
    _, _, h, w, _ = q.shape
    with torch.no_grad():
        _, _, idx, s = _scores(q.to(ct), k.to(ct), indices, nh, nw, scale)
        lse = torch.logsumexp(s, dim=-1)
        vg = _gather_windows(_to_windows(v.to(ct), nh, nw), idx)
        out = torch.exp(s - lse[..., None]) @ vg
    out = _from_windows(out, h, w, nh, nw).to(q.dtype).contiguous()
    return out, _from_windows(lse, h, w, nh, nw).contiguous()


def routed_attention_backward_reference(
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
    """Backward of the kernel contract from the saved ``lse``: ``(dq, dk, dv)``.

    dK and dV come out in the gathered layout (one copy per selecting query window) and are summed
    back onto their windows with ``index_add_``, the scatter the fused kernels avoid.
    """
    ct = compute_dtype(q.dtype)
    b, hh, h, w, d = q.shape
    with torch.no_grad():
        qw, kg, idx, s = _scores(q.to(ct), k.to(ct), indices, nh, nw, scale)
        vg = _gather_windows(_to_windows(v.to(ct), nh, nw), idx)
        gw = _to_windows(grad_out.to(ct), nh, nw)
        lse_w = _to_windows(lse.to(ct).unsqueeze(-1), nh, nw).squeeze(-1)
        delta = (gw * _to_windows(out.to(ct), nh, nw)).sum(-1)
        # Padded query rows have lse 0 and dO 0, so their dS is 0 and they add nothing to dk, dv.
        prob = torch.exp(s - lse_w[..., None])
        dp = gw @ vg.transpose(-1, -2)
        ds = prob * (dp - delta[..., None])
        dqw = (ds @ kg) * scale
        dkg = (ds.transpose(-1, -2) @ qw) * scale  # (B, Hh, P, topk*M, D)
        dvg = prob.transpose(-1, -2) @ gw
        m = qw.shape[3]
        p = nh * nw
        target = idx.reshape(b * hh, -1) + (torch.arange(b * hh, device=q.device) * p)[:, None]
        dkw = torch.zeros(b * hh * p, m, d, dtype=ct, device=q.device)
        dvw = torch.zeros_like(dkw)
        dkw.index_add_(0, target.reshape(-1), dkg.reshape(-1, m, d))
        dvw.index_add_(0, target.reshape(-1), dvg.reshape(-1, m, d))
        shape = (b, hh, p, m, d)
    return tuple(
        _from_windows(t, h, w, nh, nw).to(q.dtype).contiguous() for t in (dqw, dkw.reshape(shape), dvw.reshape(shape))
    )  # type: ignore[return-value]


def dense_attention_reference(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """Full attention over all tokens (what routing with topk = all non-empty windows must equal)."""
    b, hh, h, w, d = q.shape
    ct = compute_dtype(q.dtype)
    qf, kf, vf = (t.to(ct).reshape(b, hh, h * w, d) for t in (q, k, v))
    out = torch.softmax((qf @ kf.transpose(-1, -2)) * scale, dim=-1) @ vf
    return out.reshape(b, hh, h, w, d).to(q.dtype)


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0


def flex_attention_inputs(q: Tensor, k: Tensor, v: Tensor, indices: Tensor, nh: int, nw: int):
    """The same routed attention as a FlexAttention problem (the peer the tests and benchmark use).

    Tokens are reordered window-major (each window padded to wh*ww slots), so a window is one block
    of ``BLOCK_SIZE = wh*ww`` and the top-k becomes ``BlockMask.from_kv_blocks``: fully valid windows
    are "full" blocks (no mask evaluated), windows with padding "partial" blocks whose ``mask_mod``
    drops the padded keys. The ``mask_mod`` also encodes the routing itself, because eager
    FlexAttention evaluates it on every (query, key) pair and uses the block structure only when
    compiled. Returns ``(qf, kf, vf, block_mask, unflatten)`` with ``unflatten(out)`` mapping the
    (B, heads, P*wh*ww, D) result back to (B, heads, H, W, D).
    """
    from torch.nn.attention.flex_attention import BlockMask

    b, hh, h, w, d = q.shape
    wh, ww = window_geometry(h, w, nh, nw)
    m, p = wh * ww, nh * nw
    topk = indices.shape[-1]
    valid = window_valid(h, w, nh, nw, q.device)
    full_window = valid.all(1)
    idx = _expand_heads(indices, hh).to(torch.int32)
    chosen = torch.zeros(b, hh, p, p, dtype=torch.bool, device=q.device)
    chosen.scatter_(-1, idx.long(), True)
    valid_flat = valid.reshape(-1)

    def mask_mod(bi, hi, qi, kvi):
        return valid_flat[kvi] & chosen[bi, hi, qi // m, kvi // m]

    # Full blocks first in each row (stable sort on "is partial"), then the partial ones.
    is_full = full_window[idx.long()]
    order = torch.sort((~is_full).to(torch.int8), dim=-1, stable=True).indices
    ordered = torch.gather(idx, -1, order)
    n_full = is_full.sum(-1, dtype=torch.int32)
    kv_full = torch.zeros(b, hh, p, p, dtype=torch.int32, device=q.device)
    kv_part = torch.zeros_like(kv_full)
    kv_full[..., :topk] = ordered
    # Partial blocks: the ids after the full ones, shifted to the front of their own table.
    shift = (torch.arange(topk, device=q.device) + n_full[..., None]).clamp(max=topk - 1)
    kv_part[..., :topk] = torch.gather(ordered, -1, shift.long())
    block_mask = BlockMask.from_kv_blocks(
        (topk - n_full).contiguous(),
        kv_part,
        n_full.contiguous(),
        kv_full,
        BLOCK_SIZE=m,
        mask_mod=mask_mod,
        seq_lengths=(p * m, p * m),
    )

    def flat(x: Tensor) -> Tensor:
        return _to_windows(x, nh, nw).reshape(b, hh, p * m, d)

    def unflatten(out: Tensor) -> Tensor:
        return _from_windows(out.reshape(b, hh, p, m, d), h, w, nh, nw)

    return flat(q), flat(k), flat(v), block_mask, unflatten
