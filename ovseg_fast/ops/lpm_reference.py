"""Plain-PyTorch reference of RPN's Linear Projection Module: the readable spec of ``ovseg_fast.ops.lpm``.

RPN (Relationship Prompt Network) turns the class embeddings ``t`` (C, D) (or per image (B, C, D)) and
the image [CLS] embedding ``c_b`` (D) into class embeddings with one of its Linear Projection
Modules, and the pixel embeddings ``x_bn`` (D) into pixel embeddings with a Linear + LayerNorm::

    LPMa:  e_bc = LN(W t_c + w0)
    LPMb:  e_bc = LN(W (t_c * c_b) + w0)                       (* is the Hadamard product)
    LPMc:  e_bc = LN(W [t_c * c_b ; t_c] + w0) = LN(W1 (t_c * c_b) + W2 t_c + w0),   W = [W1 | W2]
    pixels p_bn = LN'(V x_bn + v0)
    logits s_bcn = scale * <e_bc, p_bn>                         (scale = D_out ** -0.5 by default)

``LN(y) = gamma * (y - mean(y)) / sqrt(var(y) + eps) + beta`` over the D_out features (biased
variance, as ``torch.nn.LayerNorm``); without ``norm_weight`` the LayerNorm is skipped. The
training-free variant drops every parameter: ``s_bcn = <t_c / |t_c|, x_bn / |x_bn|>``.

The ``*_spec`` functions are the literal formulas (cat, mul, Linear, LayerNorm, einsum) with
autograd: the readable spec, the eager baseline of the benchmarks and of the reduced-precision tests.

Kernel contract (what every backend's registered forward returns and its backward receives)
-------------------------------------------------------------------------------------------
``hadamard_concat_linear``: text canonicalised to (T, C, D) with T = 1 (shared) or B, cls (B, D).
Forward returns ``(out, xhat, rstd)``: out (B, C, D_out) in the input dtype; with LayerNorm also
``xhat = (y - mean) * rstd`` (B, C, D_out) and ``rstd`` (B, C), both in the compute dtype (float32,
float64 for float64 inputs); without LayerNorm both are empty (shape (0,)). Nothing else is saved:
the backward recomputes the Hadamard product ``t * c`` where it needs it.

``lpm_logits``: pixels (B, N, D), class_emb (B, C, D_out). Forward returns ``(logits, xhat, rstd)``:
logits (B, C, N) in the input dtype; with LayerNorm and ``save=True`` the normalised pixel
projections ``xhat`` (B, N, D_out) and ``rstd`` (B, N) in the compute dtype (empty otherwise: an
inference call saves nothing). Without LayerNorm nothing is saved: every gradient then factors
through C-sized products (see ``lpm_logits_backward_reference``). The registered backward returns the
pixels' gradient stored channel-first, (B, D, N) (``ovseg_fast.ops.lpm`` lays the reference's out so).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "compute_dtype",
    "hadamard_concat_linear_backward_reference",
    "hadamard_concat_linear_forward_reference",
    "hadamard_concat_linear_spec",
    "layer_norm_backward",
    "lpm_logits_backward_reference",
    "lpm_logits_forward_reference",
    "lpm_logits_spec",
    "training_free_logits_spec",
]

MODES = ("a", "b", "c")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _empty(like: Tensor, dtype: torch.dtype) -> Tensor:
    return like.new_empty((0,), dtype=dtype)


# ------------------------------------------------------------------------------------------------
# The literal spec (autograd does the backward).


def hadamard_concat_linear_spec(
    text: Tensor,
    cls: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    *,
    mode: str = "c",
    norm_weight: Optional[Tensor] = None,
    norm_bias: Optional[Tensor] = None,
    eps: float = 1e-5,
) -> Tensor:
    """LPMa/b/c exactly as written: ``LN(Linear(cat(t * c, t)))`` etc., result (B, C, D_out)."""
    b = cls.shape[0]
    t = text.unsqueeze(0).expand(b, *text.shape) if text.dim() == 2 else text
    hadamard = t * cls[:, None, :]
    inp = {"a": t, "b": hadamard, "c": torch.cat([hadamard, t], dim=-1)}[mode]
    y = F.linear(inp, weight, bias)
    if norm_weight is not None:
        y = F.layer_norm(y, (y.shape[-1],), norm_weight, norm_bias, eps)
    return y


def lpm_logits_spec(
    pixels: Tensor,
    class_emb: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    *,
    norm_weight: Optional[Tensor] = None,
    norm_bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    scale: Optional[float] = None,
) -> Tensor:
    """``scale * einsum(class_emb, LN(Linear(pixels)))``: logits (B, C, N)."""
    p = F.linear(pixels, weight, bias)
    if norm_weight is not None:
        p = F.layer_norm(p, (p.shape[-1],), norm_weight, norm_bias, eps)
    scale = p.shape[-1] ** -0.5 if scale is None else scale
    e = class_emb if class_emb.dim() == 3 else class_emb.unsqueeze(0).expand(p.shape[0], *class_emb.shape)
    return torch.einsum("bcd,bnd->bcn", e, p) * scale


def training_free_logits_spec(pixels: Tensor, text: Tensor, scale: float = 1.0) -> Tensor:
    """The paper's parameter-free variant: cosine similarity of every pixel with every class, (B, C, N)."""
    p = F.normalize(pixels, dim=-1)
    t = F.normalize(text, dim=-1)
    if t.dim() == 2:
        return torch.einsum("cd,bnd->bcn", t, p) * scale
    return torch.einsum("bcd,bnd->bcn", t, p) * scale


# ------------------------------------------------------------------------------------------------
# The kernel contract, in plain PyTorch (the reference backend).


def _layer_norm_forward(y: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    mean = y.mean(-1, keepdim=True)
    centred = y - mean
    var = centred.square().mean(-1, keepdim=True)
    rstd = torch.rsqrt(var + eps)
    return centred * rstd, rstd.squeeze(-1)


def layer_norm_backward(g_xhat: Tensor, xhat: Tensor, rstd: Tensor) -> Tensor:
    """d/dy of ``xhat = (y - mean) * rstd`` applied to ``g_xhat``."""
    mean_g = g_xhat.mean(-1, keepdim=True)
    mean_gx = (g_xhat * xhat).mean(-1, keepdim=True)
    return (g_xhat - mean_g - xhat * mean_gx) * rstd.unsqueeze(-1)


def hadamard_concat_linear_forward_reference(
    text: Tensor,
    cls: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    norm_weight: Optional[Tensor],
    norm_bias: Optional[Tensor],
    mode: str,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(out, xhat, rstd)`` of the contract; text (T, C, D), T in {1, B}."""
    ct = compute_dtype(text.dtype)
    b = cls.shape[0]
    d = text.shape[-1]
    t = text.to(ct).expand(b, -1, -1)
    w = weight.to(ct)
    if mode == "a":
        y = t @ w.t()
    elif mode == "b":
        y = (t * cls.to(ct)[:, None, :]) @ w.t()
    else:
        y = (t * cls.to(ct)[:, None, :]) @ w[:, :d].t() + t @ w[:, d:].t()
    if bias is not None:
        y = y + bias.to(ct)
    if norm_weight is None:
        return y.to(text.dtype), _empty(text, ct), _empty(text, ct)
    xhat, rstd = _layer_norm_forward(y, eps)
    out = xhat * norm_weight.to(ct)
    if norm_bias is not None:
        out = out + norm_bias.to(ct)
    return out.to(text.dtype), xhat, rstd


def hadamard_concat_linear_backward_reference(
    grad_out: Tensor,
    text: Tensor,
    cls: Tensor,
    weight: Tensor,
    norm_weight: Optional[Tensor],
    xhat: Tensor,
    rstd: Tensor,
    mode: str,
    has_bias: bool,
    has_norm_bias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients ``(text, cls, weight, bias, norm_weight, norm_bias)``; absent arguments get empty tensors.

    With ``g`` the gradient of the pre-norm projection ``y`` and ``H_b = g_b W1`` (C, D)::

        d text_b = H_b * c_b + g_b W2        (shared text: summed over b)
        d c_b    = sum_c H_bc * t_c
        d W1     = sum_b g_b^T (t_b * c_b),   d W2 = sum_b g_b^T t_b

    (modes a and b keep only the W2, resp. W1, terms, with W in their place).
    """
    ct = compute_dtype(text.dtype)
    dt = text.dtype
    b = cls.shape[0]
    d = text.shape[-1]
    shared = text.shape[0] == 1 and b != 1
    g_out = grad_out.to(ct)
    w = weight.to(ct)
    t = text.to(ct)
    c = cls.to(ct)
    empty = lambda: _empty(text, dt)
    if norm_weight is not None:
        g_nw = (g_out * xhat).sum((0, 1)).to(dt)
        g_nb = g_out.sum((0, 1)).to(dt) if has_norm_bias else empty()
        g = layer_norm_backward(g_out * norm_weight.to(ct), xhat, rstd)
    else:
        g_nw, g_nb = empty(), empty()
        g = g_out
    g_bias = g.sum((0, 1)).to(dt) if has_bias else empty()
    te = t.expand(b, -1, -1)
    w1 = w if mode == "b" else w[:, :d]
    w2 = w if mode == "a" else w[:, d:]
    if mode == "a":
        g_text = g @ w2
        g_cls = torch.zeros_like(c)
        g_w = torch.einsum("bco,bcd->od", g, te)
    else:
        h = g @ w1
        g_text = h * c[:, None, :]
        g_cls = (h * te).sum(1)
        g_w1 = torch.einsum("bco,bcd->od", g, te * c[:, None, :])
        if mode == "c":
            g_text = g_text + g @ w2
            g_w = torch.cat([g_w1, torch.einsum("bco,bcd->od", g, te)], dim=1)
        else:
            g_w = g_w1
    if shared:
        g_text = g_text.sum(0, keepdim=True)
    return g_text.to(dt), g_cls.to(dt), g_w.to(dt), g_bias, g_nw, g_nb


def lpm_logits_forward_reference(
    pixels: Tensor,
    class_emb: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    norm_weight: Optional[Tensor],
    norm_bias: Optional[Tensor],
    eps: float,
    scale: float,
    save: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(logits, xhat, rstd)`` of the contract; pixels (B, N, D), class_emb (B, C, D_out)."""
    ct = compute_dtype(pixels.dtype)
    x = pixels.to(ct)
    e = class_emb.to(ct)
    p = x @ weight.to(ct).t()
    if bias is not None:
        p = p + bias.to(ct)
    xhat, rstd = _empty(pixels, ct), _empty(pixels, ct)
    if norm_weight is not None:
        xh, rs = _layer_norm_forward(p, eps)
        p = xh * norm_weight.to(ct)
        if norm_bias is not None:
            p = p + norm_bias.to(ct)
        if save:
            xhat, rstd = xh, rs
    logits = (e @ p.transpose(1, 2)) * scale
    return logits.to(pixels.dtype), xhat, rstd


def lpm_logits_backward_reference(
    grad_logits: Tensor,
    pixels: Tensor,
    class_emb: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    norm_weight: Optional[Tensor],
    norm_bias: Optional[Tensor],
    xhat: Tensor,
    rstd: Tensor,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients ``(pixels, class_emb, weight, bias, norm_weight, norm_bias)`` (empty when absent).

    With LayerNorm, ``Z_b = G_b xhat_b`` (C, D_out) for ``G = scale * grad_logits``::

        d e_b    = Z_b * gamma + rowsum(G_b) beta^T
        d gamma  = sum_b colsum(e_b * Z_b),   d beta = sum_b e_b^T rowsum(G_b)
        d p_bn   = sum_c G_bcn e_bc           then the LayerNorm backward to d y, and
        d x = d y V,  d V = d y^T x,  d v0 = colsum(d y)

    Without LayerNorm every product is C-sized (``A_b = e_b V``, ``M_b = G_b x_b``)::

        d x_b = G_b^T A_b,   d e_b = M_b V^T + rowsum(G_b) v0^T,
        d V = sum_b e_b^T M_b,   d v0 = sum_b e_b^T rowsum(G_b)
    """
    ct = compute_dtype(pixels.dtype)
    dt = pixels.dtype
    empty = lambda: _empty(pixels, dt)
    g = grad_logits.to(ct) * scale
    x = pixels.to(ct)
    e = class_emb.to(ct)
    w = weight.to(ct)
    rows = g.sum(2)  # (B, C)
    if norm_weight is None:
        a = e @ w
        m = g @ x
        g_x = g.transpose(1, 2) @ a
        g_e = m @ w.t()
        if bias is not None:
            g_e = g_e + rows[..., None] * bias.to(ct)
        g_w = torch.einsum("bco,bcd->od", e, m)
        g_b = torch.einsum("bco,bc->o", e, rows).to(dt) if bias is not None else empty()
        return g_x.to(dt), g_e.to(dt), g_w.to(dt), g_b, empty(), empty()
    gamma = norm_weight.to(ct)
    z = g @ xhat
    g_e = z * gamma
    if norm_bias is not None:
        g_e = g_e + rows[..., None] * norm_bias.to(ct)
    g_gamma = (e * z).sum((0, 1))
    g_beta = torch.einsum("bco,bc->o", e, rows) if norm_bias is not None else None
    g_p = g.transpose(1, 2) @ e
    g_y = layer_norm_backward(g_p * gamma, xhat, rstd)
    g_x = g_y @ w
    g_w = torch.einsum("bno,bnd->od", g_y, x)
    g_b = g_y.sum((0, 1)) if bias is not None else None
    return (
        g_x.to(dt),
        g_e.to(dt),
        g_w.to(dt),
        g_b.to(dt) if g_b is not None else empty(),
        g_gamma.to(dt),
        g_beta.to(dt) if g_beta is not None else empty(),
    )
