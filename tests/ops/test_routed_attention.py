"""Tests of ovseg_fast.ops.routed_attention: router, reference, C++ and Triton kernels, registration, inputs."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from ovseg_fast.backends import select_backend
from ovseg_fast.ops import use_backend
from ovseg_fast.ops.routed_attention import RoutedAttention, routed_attention, routed_attention_flops
from ovseg_fast.ops.routed_attention_reference import (
    dense_attention_reference,
    flex_attention_inputs,
    nonempty_windows,
    route,
    routed_attention_backward_reference,
    routed_attention_forward_reference,
    routed_attention_reference,
    window_geometry,
)
from tests.helpers import (
    CPU_CAPABILITIES,
    KERNEL_BACKENDS,
    assert_within_reference_error,
    backend_device,
    max_abs_err,
    on,
    require_backend,
    run_under_capability,
    tolerances,
)

OP = torch.ops.ovseg_fast.routed_attention
BACKWARD_OP = torch.ops.ovseg_fast.routed_attention_backward


def qkv(shape, dtype=torch.float32, seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    out = [torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) for _ in range(3)]
    return [t.requires_grad_(requires_grad) for t in out]


def token_windows(h, w, nh, nw):
    """Window id of every token, (H*W,), straight from the definition."""
    wh, ww = window_geometry(h, w, nh, nw)
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return ((ys // wh) * nw + xs // ww).reshape(-1)


def masked_dense_attention(q, k, v, indices, nh, nw, scale):
    """The spec as a token-level mask on dense attention: an implementation independent of windowing."""
    b, hh, h, w, d = q.shape
    win = token_windows(h, w, nh, nw)
    idx = indices.expand(b, hh, *indices.shape[2:])
    chosen = torch.zeros(b, hh, nh * nw, nh * nw, dtype=torch.bool)
    chosen.scatter_(-1, idx, True)
    allowed = chosen[:, :, win][:, :, :, win]  # (B, Hh, HW, HW): query token's window chose key token's window
    qf, kf, vf = (t.double().reshape(b, hh, h * w, d) for t in (q, k, v))
    s = (qf @ kf.transpose(-1, -2)) * scale
    out = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1) @ vf
    return out.reshape(b, hh, h, w, d)


# (B, heads, H, W, D), num_windows, topk, routing
CASES = [
    ((1, 2, 8, 8, 16), 4, 3, "shared"),
    ((2, 3, 9, 7, 5), (4, 3), 4, "per_head"),  # odd sizes: padding at the bottom/right, D=5
    ((1, 2, 5, 5, 8), 4, 4, "shared"),  # 5x5 in 4x4 windows of 2x2: the last row/column of windows is empty
    ((1, 1, 14, 14, 8), 2, 2, "per_head"),  # 7x7 = 49-token windows: more than one lane tile per window
    ((2, 2, 16, 16, 32), 4, 5, "shared"),  # LDVC-like 4x4 windows
    ((1, 2, 6, 6, 32), 3, 9, "shared"),  # BiFormer-like 2x2 windows, topk = all
    # Windows smaller than a vector (the C++ key-lane layout): clipped 2x2 windows with head_dim 12
    # (padded to the vector width), 1x2 windows, and 1x1 windows with topk = all.
    ((2, 3, 7, 5, 12), (4, 3), 5, "per_head"),
    ((1, 2, 4, 8, 4), 4, 6, "shared"),
    ((1, 3, 6, 6, 8), 6, 36, "shared"),
    # Windows of a whole number of vectors (the C++ whole-window key lanes: 16 tokens for AVX-512
    # float32, 8 for AVX2 and float64), clipped at the bottom and right.
    ((1, 2, 15, 14, 16), 4, 5, "per_head"),
    ((1, 2, 7, 15, 8), 4, 5, "shared"),
]
CASE_IDS = [
    "8x8",
    "odd9x7-perhead",
    "emptywin5x5",
    "bigwin14x14",
    "ldvc-like",
    "biformer-like-all",
    "smallwin7x5-perhead",
    "win1x2",
    "win1x1-all",
    "wholewin4x4-clipped",
    "wholewin2x4-clipped",
]
TRITON_CASES = [0, 1, 2]


# ---------------------------------------------------------------------------------------------
# The router and the reference are the spec: check them against definitions first.


def test_router_matches_definition():
    b, hh, h, w, d, nh, nw = 2, 3, 7, 9, 4, 3, 4
    q, k, _ = qkv((b, hh, h, w, d), torch.float64)
    win = token_windows(h, w, nh, nw)
    p = nh * nw
    qm = torch.stack([q.reshape(b, hh, h * w, d)[:, :, win == c].mean(2) for c in range(p)], 2)
    km = torch.stack([k.reshape(b, hh, h * w, d)[:, :, win == c].mean(2) for c in range(p)], 2)
    for routing in ("shared", "per_head"):
        if routing == "shared":
            aff = torch.einsum("bhpd,bhcd->bpc", qm, km)[:, None]
        else:
            aff = torch.einsum("bhpd,bhcd->bhpc", qm, km)
        empty = torch.tensor([bool((win == c).sum() == 0) for c in range(p)])
        assert empty.nonzero().flatten().tolist() == [3, 7, 11]  # window column 3 starts at x = 9 = W
        expected = aff.masked_fill(empty, float("-inf")).argsort(-1, descending=True)[..., :5]
        got = route(q, k, nh, nw, 5, routing)
        # Rows of empty query windows route nothing that is used; they only have to be valid.
        assert torch.equal(got[..., ~empty, :], expected[..., ~empty, :])
        assert not bool(torch.isin(got, empty.nonzero()).any())


def test_router_ties_go_to_lower_index_and_skip_empty_windows():
    # 5x5 in 4x4 windows of 2x2: windows in row 3 and column 3 are pure padding (7 of 16 are empty).
    q = torch.ones(1, 2, 5, 5, 4)
    idx = route(q, q, 4, 4, 9, "shared")
    assert nonempty_windows(5, 5, 4, 4) == [0, 1, 2, 4, 5, 6, 8, 9, 10]
    assert idx[0, 0, 0].tolist() == [0, 1, 2, 4, 5, 6, 8, 9, 10]  # all affinities tie: ascending ids
    assert idx.shape == (1, 1, 16, 9)


@pytest.mark.parametrize("case", range(len(CASES)), ids=CASE_IDS)
def test_reference_equals_masked_dense_attention(case):
    shape, nwin, topk, routing = CASES[case]
    nh, nw = (nwin, nwin) if isinstance(nwin, int) else nwin
    q, k, v = qkv(shape, torch.float64)
    idx = route(q, k, nh, nw, topk, routing)
    scale = 0.7
    expected = masked_dense_attention(q, k, v, idx, nh, nw, scale)
    torch.testing.assert_close(routed_attention_reference(q, k, v, idx, nh, nw, scale), expected)
    out, lse = routed_attention_forward_reference(q, k, v, idx, nh, nw, scale)
    torch.testing.assert_close(out, expected)
    assert lse.shape == shape[:4] and lse.dtype == torch.float64


def test_reference_backward_formula_equals_autograd():
    shape, nh, nw = (2, 2, 9, 7, 6), 4, 3
    q, k, v = qkv(shape, torch.float64, requires_grad=True)
    idx = route(q, k, nh, nw, 4, "per_head")
    grad = torch.randn(shape, dtype=torch.float64)
    expected = torch.autograd.grad(routed_attention_reference(q, k, v, idx, nh, nw, 0.5), (q, k, v), grad)
    out, lse = routed_attention_forward_reference(q, k, v, idx, nh, nw, 0.5)
    got = routed_attention_backward_reference(grad, q, k, v, out, lse, idx, nh, nw, 0.5)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_gradcheck_reference():
    q, k, v = qkv((1, 2, 4, 3, 2), torch.float64, requires_grad=True)
    idx = route(q, k, 3, 2, 2, "per_head")
    assert torch.autograd.gradcheck(lambda *t: routed_attention_reference(*t, idx, 3, 2, 0.8), (q, k, v))


# ---------------------------------------------------------------------------------------------
# Kernels against the reference: out, lse and the gradients.


def _run(backend, tensors, grad, **kwargs):
    """routed_attention(*tensors, **kwargs) and its gradients on ``backend`` (run on its device; the
    CPU leaves get the gradients), on the CPU: (out, *grads), or (out, indices, *grads) when
    ``return_indices``."""
    dev = backend_device(backend)
    leaves = [t.clone().requires_grad_(True) for t in tensors]
    kwargs = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    with use_backend(backend):
        res = routed_attention(*on(dev, *leaves), **kwargs)
        out, idx = res if kwargs.get("return_indices") else (res, None)
        out.backward(grad.to(dev, out.dtype))
    head = (out.detach().cpu(),) if idx is None else (out.detach().cpu(), idx.cpu())
    return (*head, *(t.grad for t in leaves))


def _kernel_case(backend, case):
    shape, nwin, topk, routing = CASES[case]
    if backend == "triton":  # the interpreter is slow: one image, two heads
        shape = (1, 2, *shape[2:])
    q, k, v = qkv(shape)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(9))
    kw = dict(num_windows=nwin, topk=topk, routing=routing)
    results = {name: _run(name, (q, k, v), grad, **kw, return_indices=True) for name in ("reference", backend)}
    # The exact result: the reference in float64 on the same routing (float64 scores may rank differently).
    idx = results["reference"][1]
    exact = _run("reference", [t.double() for t in (q, k, v)], grad.double(), **kw, indices=idx)
    results["exact"] = (exact[0], idx, *exact[1:])
    return results


@pytest.mark.parametrize(
    ("backend", "case"),
    [pytest.param("cpu", c, id=f"cpu-{CASE_IDS[c]}") for c in range(len(CASES))]
    + [pytest.param("triton", c, id=f"triton-{CASE_IDS[c]}", marks=pytest.mark.triton) for c in TRITON_CASES],
)
def test_kernel_matches_reference(backend, case):
    """flash-attention's rule against float64: a bare float32 tolerance against the float32 reference
    fails now and then, where the reference's own MKL products round differently (see the comment
    in test_every_cpu_capability_copy)."""
    require_backend("routed_attention", backend)
    results = _kernel_case(backend, case)
    ref, got, exact = results["reference"], results[backend], results["exact"]
    assert torch.equal(ref[1], got[1])  # routing is backend-independent
    for name, g, e, bl in zip(("out", "indices", "dq", "dk", "dv"), got, exact, ref):
        assert g.shape == bl.shape and g.dtype == bl.dtype, name
        if name != "indices":
            assert_within_reference_error(g, e, bl, factor=2.0, atol=1e-6, what=name)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernel_contract_lse_and_cross_backend_backward(backend):
    """Forward on one backend and backward on another agree: the saved tensors mean the same thing."""
    dev = require_backend("routed_attention", backend)
    shape, nh, nw = (1, 2, 9, 7, 8), 4, 3
    q, k, v = qkv(shape)
    idx = route(q, k, nh, nw, 3, "per_head")
    with use_backend(backend):
        out, lse = OP(*on(dev, q, k, v, idx), nh, nw, 0.4, False)
    assert out.is_contiguous() and lse.dtype == torch.float32 and lse.shape == shape[:4]
    out, lse = out.cpu(), lse.cpu()
    ref_out, ref_lse = routed_attention_forward_reference(q, k, v, idx, nh, nw, 0.4)
    q64, k64, v64 = (t.double() for t in (q, k, v))
    exact_out, exact_lse = routed_attention_forward_reference(q64, k64, v64, idx, nh, nw, 0.4)
    # flash-attention's rule against float64 (bare float32 tolerances fail now and then, see
    # test_kernel_matches_reference)
    assert_within_reference_error(out, exact_out, ref_out, factor=2.0, atol=1e-6, what="out")
    assert_within_reference_error(lse, exact_lse, ref_lse, factor=2.0, atol=1e-6, what="lse")
    grad = torch.randn(shape)
    with use_backend(backend):
        got = BACKWARD_OP(*on(dev, grad, q, k, v, ref_out, ref_lse, idx), nh, nw, 0.4)
    with use_backend("reference"):
        expected = BACKWARD_OP(grad, q, k, v, out, lse, idx, nh, nw, 0.4)
        baseline = BACKWARD_OP(grad, q, k, v, ref_out, ref_lse, idx, nh, nw, 0.4)
        exact = BACKWARD_OP(grad.double(), q64, k64, v64, exact_out, exact_lse, idx, nh, nw, 0.4)
    for name, g, e, bl, ex in zip(("dq", "dk", "dv"), got, expected, baseline, exact):
        assert g.is_contiguous()
        # the kernel's backward of the reference's forward, and the reference's backward of the kernel's
        assert_within_reference_error(g.cpu(), ex, bl, factor=2.0, atol=1e-6, what=f"{backend} {name}")
        assert_within_reference_error(e, ex, bl, factor=2.0, atol=1e-6, what=f"reference {name}")


def test_cpu_kernel_float64_gradcheck():
    require_backend("routed_attention", "cpu", torch.float64)
    q, k, v = qkv((1, 2, 5, 3, 3), torch.float64, requires_grad=True)
    # Fixed indices: a perturbation must not flip the (piecewise constant) routing mid-gradcheck.
    idx = route(q, k, 3, 2, 2, "per_head")
    kw = dict(num_windows=(3, 2), topk=2, routing="per_head", indices=idx)
    with use_backend("cpu"):
        assert torch.autograd.gradcheck(lambda *t: routed_attention(*t, **kw), (q, k, v))
        out = routed_attention(q, k, v, **kw)
    with use_backend("reference"):
        expected = routed_attention(q, k, v, **kw)
    torch.testing.assert_close(out, expected, **tolerances(torch.float64))


@pytest.mark.parametrize(
    ("backend", "dtype"),
    [
        pytest.param("cpu", torch.bfloat16, id="cpu-bf16"),
        pytest.param("cpu", torch.float16, id="cpu-fp16"),
        pytest.param("triton", torch.bfloat16, id="triton-bf16", marks=pytest.mark.triton),
        pytest.param("triton", torch.float16, id="triton-fp16", marks=pytest.mark.triton),
    ],
)
def test_reduced_precision_within_reference_error(backend, dtype):
    """flash-attention's rule: the error against float64 within 2x the plain-PyTorch error at that dtype."""
    require_backend("routed_attention", backend, dtype)
    shape, nwin, topk = ((1, 2, 9, 7, 16), (4, 3), 3) if backend == "triton" else ((2, 2, 12, 10, 32), 4, 5)
    q, k, v = qkv(shape, dtype)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(4)).to(dtype)
    idx = route(q, k, *(nwin if isinstance(nwin, tuple) else (nwin, nwin)), topk, "shared")[:, 0]
    kw = dict(num_windows=nwin, topk=topk, indices=idx)

    exact = _run("reference", [t.double() for t in (q, k, v)], grad, **kw)
    baseline = _run("reference", (q, k, v), grad, **kw)
    got = _run(backend, (q, k, v), grad, **kw)
    assert got[0].dtype == dtype
    for name, g, e, bl in zip(("out", "dq", "dk", "dv"), got, exact, baseline):
        assert_within_reference_error(g, e, bl, factor=2.0, atol=1e-3, what=name)


@pytest.mark.parametrize("backend", ["reference", *KERNEL_BACKENDS])
def test_non_contiguous_views_of_fused_qkv(backend):
    dev = require_backend("routed_attention", backend)
    b, h, w, heads, d = 1, 9, 7, 2, 8
    qkv_t = torch.randn(b, h, w, 3, heads, d)
    q, k, v = (qkv_t.select(3, i).permute(0, 3, 1, 2, 4) for i in range(3))
    qd, kd, vd = (qkv_t.to(dev).select(3, i).permute(0, 3, 1, 2, 4) for i in range(3))
    assert not qd.is_contiguous()
    with use_backend(backend):
        out = routed_attention(qd, kd, vd, num_windows=(4, 3), topk=3).cpu()
    expected = routed_attention_reference(*(t.contiguous() for t in (q, k, v)), route(q, k, 4, 3, 3), 4, 3, d**-0.5)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", *KERNEL_BACKENDS])
def test_topk_all_windows_equals_dense_attention(backend):
    dev = require_backend("routed_attention", backend)
    shape = (1, 2, 9, 7, 8)  # 4x3 windows of 3x3: the last row of windows is empty, the last column thin
    q, k, v = qkv(shape, requires_grad=True)
    with use_backend(backend):
        out = routed_attention(*on(dev, q, k, v), num_windows=(4, 3), topk=9, routing="per_head").cpu()
    b, hh, h, w, d = shape
    flat = [t.reshape(b, hh, h * w, d) for t in (q, k, v)]
    dense = torch.nn.functional.scaled_dot_product_attention(*flat).reshape(shape)
    torch.testing.assert_close(out, dense, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dense_attention_reference(q, k, v, d**-0.5), dense, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", *KERNEL_BACKENDS])
def test_extreme_scores_stay_finite(backend):
    dev = require_backend("routed_attention", backend)
    shape = (1, 2, 8, 8, 8)
    q, k, v = qkv(shape)
    q = (q * 300).requires_grad_(True)  # logits of +-1e4: exp overflows without max-subtraction
    k = k.requires_grad_(True)
    with use_backend(backend):
        out = routed_attention(*on(dev, q, k, v), num_windows=4, topk=3)
        out.backward(torch.randn(shape).to(dev))
    out = out.detach().cpu()
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()
    with use_backend("reference"):
        exact = routed_attention(q.detach().double(), k.detach().double(), v.double(), num_windows=4, topk=3)
    assert max_abs_err(out, exact) < 1e-3


# ---------------------------------------------------------------------------------------------
# Routing options, given indices, returned indices.


@pytest.mark.parametrize("backend", ["reference", *KERNEL_BACKENDS])
def test_given_indices_equal_router_and_shared_vs_per_head(backend):
    dev = require_backend("routed_attention", backend)
    shape = (2, 3, 8, 8, 8) if backend != "triton" else (1, 3, 8, 8, 4)
    q, k, v = on(dev, *qkv(shape))
    with use_backend(backend):
        shared, idx_s = routed_attention(q, k, v, num_windows=4, topk=3, return_indices=True)
        per_head, idx_h = routed_attention(q, k, v, num_windows=4, topk=3, routing="per_head", return_indices=True)
        again = routed_attention(q, k, v, num_windows=4, topk=3, indices=idx_s.int())
        again_h = routed_attention(q, k, v, num_windows=4, topk=3, routing="per_head", indices=idx_h)
        broadcast = routed_attention(
            q, k, v, num_windows=4, topk=3, routing="per_head", indices=idx_s[:, None].expand_as(idx_h)
        )
    assert idx_s.shape == (shape[0], 16, 3) and idx_h.shape == (shape[0], 3, 16, 3) and idx_s.dtype == torch.int64
    assert torch.equal(idx_s.cpu(), route(q.cpu(), k.cpu(), 4, 4, 3, "shared")[:, 0])
    assert torch.equal(idx_h.cpu(), route(q.cpu(), k.cpu(), 4, 4, 3, "per_head"))
    assert not torch.equal(idx_h, idx_s[:, None].expand_as(idx_h))  # heads really route differently here
    torch.testing.assert_close(again, shared, rtol=0, atol=0)
    torch.testing.assert_close(again_h, per_head, rtol=0, atol=0)
    torch.testing.assert_close(broadcast, shared, rtol=1e-6, atol=1e-6)


def test_returned_topk_is_duplicate_free_and_never_empty():
    q, k, _ = qkv((3, 2, 11, 9, 4))
    nonempty = set(nonempty_windows(11, 9, 4, 4))
    assert len(nonempty) < 16
    for routing in ("shared", "per_head"):
        _, idx = routed_attention(q, k, k, num_windows=4, topk=len(nonempty), routing=routing, return_indices=True)
        rows = idx.reshape(-1, idx.shape[-1]).tolist()
        assert all(len(set(r)) == len(r) and set(r) == nonempty for r in rows)


def test_given_indices_may_be_any_distinct_windows():
    """A hand-made routing: every window attends to itself and its right neighbour (wrapping)."""
    shape = (1, 2, 6, 6, 4)
    q, k, v = qkv(shape, torch.float64)
    p = torch.arange(9)
    idx = torch.stack([p, (p // 3) * 3 + (p + 1) % 3], -1)[None]
    out = routed_attention(q, k, v, num_windows=3, topk=2, indices=idx)
    torch.testing.assert_close(out, masked_dense_attention(q, k, v, idx[:, None], 3, 3, 4**-0.5))


# ---------------------------------------------------------------------------------------------
# FlexAttention on the same indices.


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("routing", ["shared", "per_head"])
def test_equals_flex_attention_eager(routing):
    from torch.nn.attention.flex_attention import flex_attention

    shape, nh, nw = (2, 2, 9, 7, 8), 4, 3
    q, k, v = qkv(shape)
    out, idx = routed_attention(q, k, v, num_windows=(nh, nw), topk=4, routing=routing, return_indices=True)
    qf, kf, vf, mask, unflatten = flex_attention_inputs(q, k, v, idx if routing == "per_head" else idx[:, None], nh, nw)
    torch.testing.assert_close(out, unflatten(flex_attention(qf, kf, vf, block_mask=mask)), rtol=1e-4, atol=1e-5)


def test_equals_compiled_flex_attention():
    """torch.compile(flex_attention) on CPU runs inductor's C++ flex template with the block mask."""
    from torch.nn.attention.flex_attention import flex_attention

    shape, nh, nw = (1, 2, 9, 7, 8), 4, 3
    q, k, v = qkv(shape)
    out, idx = routed_attention(q, k, v, num_windows=(nh, nw), topk=3, routing="per_head", return_indices=True)
    qf, kf, vf, mask, unflatten = flex_attention_inputs(q, k, v, idx, nh, nw)
    flex = torch.compile(flex_attention, fullgraph=True)
    torch.testing.assert_close(out, unflatten(flex(qf, kf, vf, block_mask=mask)), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Empty inputs, registration (opcheck, torch.compile), FLOPs, the module.


@pytest.mark.parametrize("backend", ["reference", *KERNEL_BACKENDS])
@pytest.mark.parametrize("shape", [(0, 2, 4, 4, 8), (1, 0, 4, 4, 8), (1, 2, 0, 4, 8), (1, 2, 4, 4, 0)], ids=str)
def test_empty_inputs(backend, shape):
    dev = require_backend("routed_attention", backend)
    q, k, v = qkv(shape, requires_grad=True)
    with use_backend(backend):
        out = routed_attention(*on(dev, q, k, v), num_windows=2, topk=1)
        out.sum().backward()
    assert out.shape == shape and q.grad.shape == shape and k.grad.shape == shape


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_triton_kernel_forward_and_backward(dtype):
    """On a GPU machine: the compiled Triton kernel (the automatic choice for CUDA tensors) at an
    LDVC-like size, forward and backward, by flash-attention's rule against float64."""
    assert select_backend("routed_attention", torch.device("cuda"), dtype) == "triton"
    shape, nwin, topk = (2, 4, 32, 32, 64), 8, 8
    q, k, v = qkv(shape, dtype)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(5)).to(dtype)
    idx = route(q, k, nwin, nwin, topk, "shared")[:, 0]
    kw = dict(num_windows=nwin, topk=topk, indices=idx)
    exact = _run("reference", [t.double() for t in (q, k, v)], grad, **kw)
    baseline = _run("reference", (q, k, v), grad, **kw)
    got = _run("triton", (q, k, v), grad, **kw)  # on the GPU (tests.helpers.triton_device)
    atol = 1e-6 if dtype == torch.float32 else 1e-3
    for name, g, e, bl in zip(("out", "dq", "dk", "dv"), got, exact, baseline):
        assert g.dtype == dtype
        assert_within_reference_error(g, e, bl, factor=2.0, atol=atol, what=name)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_opcheck(backend):
    require_backend("routed_attention", backend)
    shape, nh, nw = (1, 2, 5, 7, 4), 2, 3
    q, k, v = qkv(shape, requires_grad=True)
    with use_backend(backend):
        for routing, validate in (("shared", True), ("per_head", False)):
            idx = route(q, k, nh, nw, 3, routing)
            torch.library.opcheck(OP, (q, k, v, idx, nh, nw, 0.5, validate))
        out, lse = OP(q, k, v, idx, nh, nw, 0.5, False)
        saved = [t.detach() for t in (q, k, v, out, lse)]  # the backward op has no backward of its own
        torch.library.opcheck(BACKWARD_OP, (torch.randn(shape), *saved, idx, nh, nw, 0.5))


def test_compiled_module_fullgraph_forward_and_backward():
    torch.manual_seed(0)
    module = RoutedAttention(16, 2, 4, 3)
    x = torch.randn(2, 9, 10, 16)
    compiled = torch.compile(lambda t: module(t).square().sum(), fullgraph=True)
    leaf = x.clone().requires_grad_(True)
    loss = compiled(leaf)
    loss.backward()
    grads = [p.grad.clone() for p in module.parameters()]
    module.zero_grad()
    leaf_eager = x.clone().requires_grad_(True)
    eager = module(leaf_eager).square().sum()
    eager.backward()
    torch.testing.assert_close(loss, eager)
    torch.testing.assert_close(leaf.grad, leaf_eager.grad)
    for g, p in zip(grads, module.parameters()):
        torch.testing.assert_close(g, p.grad)
    text = repr(module)
    assert "num_windows=(4, 4)" in text and "topk=3" in text and "lepe_kernel=5" in text


def test_bad_given_indices_raise_at_run_time_under_compile():
    q, k, v = qkv((1, 2, 8, 8, 4))
    fn = torch.compile(lambda idx: routed_attention(q, k, v, num_windows=4, topk=2, indices=idx), fullgraph=True)
    good = torch.tensor([[[0, 1]] * 16])
    fn(good)
    with pytest.raises(ValueError, match="repeats a window"):
        fn(torch.tensor([[[0, 0]] * 16]))


def test_module_equals_biformer_style_composition():
    torch.manual_seed(0)
    module = RoutedAttention(12, 3, (3, 2), 2, qkv_bias=False, lepe_kernel=3, routing="per_head")
    x = torch.randn(2, 7, 5, 12)
    b, h, w, c = x.shape
    qkv_t = module.qkv(x).reshape(b, h, w, 3, 3, 4).permute(3, 0, 4, 1, 2, 5)
    q, k, v = qkv_t.unbind(0)
    attn = routed_attention_reference(q, k, v, route(q, k, 3, 2, 2, "per_head"), 3, 2, 0.5)
    lepe = module.lepe(v.permute(0, 1, 4, 2, 3).reshape(b, c, h, w)).permute(0, 2, 3, 1)
    expected = module.proj(attn.permute(0, 2, 3, 1, 4).reshape(b, h, w, c) + lepe)
    torch.testing.assert_close(module(x), expected, rtol=1e-5, atol=1e-6)
    assert module.qkv.bias is None
    assert RoutedAttention(8, 2, 2, 1, lepe_kernel=0).lepe is None


def test_flop_counter_counts_forward_and_backward():
    shape = (2, 3, 8, 8, 16)
    q, k, v = qkv(shape, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        routed_attention(q, k, v, num_windows=4, topk=3).sum().backward()
    fwd = 4 * 2 * 3 * 64 * (3 * 4) * 16  # 4 D FLOPs per (query, key) pair, 3 windows of 4 keys each
    assert routed_attention_flops(2, 3, 8, 8, 16, 4, 3) == fwd
    routing = 2 * 2 * 16 * 16 * (3 * 16)  # the router's affinity matmul (shared: heads concatenated)
    assert counter.get_total_flops() == routing + fwd + routed_attention_flops(2, 3, 8, 8, 16, 4, 3, backward=True)
    assert routed_attention_flops(2, 3, 8, 8, 16, 4, 3, backward=True) == int(2.5 * fwd)


# ---------------------------------------------------------------------------------------------
# Bad inputs: clear errors naming the argument.


def _call(**overrides):
    q, k, v = qkv((1, 2, 8, 8, 4))
    kwargs = dict(q=q, k=k, v=v, num_windows=4, topk=2)
    kwargs.update(overrides)
    q, k, v = kwargs.pop("q"), kwargs.pop("k"), kwargs.pop("v")
    return routed_attention(q, k, v, **kwargs)


@pytest.mark.parametrize(
    ("overrides", "exc", "match"),
    [
        (dict(q=torch.randn(2, 8, 8, 4)), ValueError, "q must have 5 dimensions"),
        (dict(q=[1.0]), TypeError, "q must be a torch.Tensor"),
        (dict(q=torch.zeros(1, 2, 8, 8, 4, dtype=torch.int32)), TypeError, "q must have dtype"),
        (dict(k=torch.randn(1, 2, 8, 8, 4, dtype=torch.float64)), TypeError, "k must have the dtype of q"),
        (dict(v=torch.randn(1, 2, 8, 7, 4)), ValueError, "v must have shape"),
        (dict(num_windows=0), ValueError, "num_windows must be >= 1"),
        (dict(num_windows=(2, 2, 2)), ValueError, "num_windows must be an int or a pair"),
        (dict(num_windows=2.0), TypeError, "num_windows must be an int"),
        (dict(topk=0), ValueError, "topk must be >= 1"),
        (dict(topk=17), ValueError, "topk=17 exceeds the 16 non-empty windows"),
        (
            dict(q=torch.randn(1, 2, 5, 5, 4), k=torch.randn(1, 2, 5, 5, 4), v=torch.randn(1, 2, 5, 5, 4), topk=10),
            ValueError,
            "exceeds the 9 non-empty windows",
        ),
        (dict(scale=float("nan")), ValueError, "scale must be finite"),
        (dict(routing="global"), ValueError, "routing must be one of"),
        (dict(return_indices=1), TypeError, "return_indices must be a bool"),
        (dict(indices=torch.zeros(1, 16, 2)), TypeError, "indices must have dtype"),
        (dict(indices=torch.zeros(1, 16, 3, dtype=torch.int64)), ValueError, "indices must have shape"),
        (dict(indices=torch.zeros(16, 2, dtype=torch.int64)), ValueError, "indices must be"),
        (dict(indices=torch.tensor([[[0, 1]] * 16]), routing="per_head"), ValueError, "pass routing='shared'"),
        (dict(indices=torch.tensor([[[0, 16]] * 16])), ValueError, r"window ids in \[0, 16\)"),
        (dict(indices=torch.tensor([[[-1, 2]] * 16])), ValueError, r"window ids in \[0, 16\)"),
        (dict(indices=torch.tensor([[[3, 3]] * 16])), ValueError, "repeats a window"),
        (dict(indices=torch.tensor([[[1, 2]] * 16]).to("meta")), ValueError, "indices is on meta"),
    ],
    ids=lambda x: x if isinstance(x, str) else None,
)
def test_bad_inputs(overrides, exc, match):
    with pytest.raises(exc, match=match):
        _call(**overrides)


def test_given_indices_naming_an_empty_window():
    q = torch.randn(1, 2, 5, 5, 4)
    idx = torch.tensor([[[0, 3]] * 16])  # window 3 = row 0, column 3: x from 6, beyond W = 5
    with pytest.raises(ValueError, match="selects window 3, which holds no token"):
        routed_attention(q, q, q, num_windows=4, topk=2, indices=idx)


def test_module_bad_arguments():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        RoutedAttention(10, 3, 2, 1)
    with pytest.raises(ValueError, match="lepe_kernel must be odd"):
        RoutedAttention(8, 2, 2, 1, lepe_kernel=4)
    with pytest.raises(ValueError, match=r"x must be \(B, H, W, 8\)"):
        RoutedAttention(8, 2, 2, 1)(torch.randn(1, 4, 4, 6))


# ---------------------------------------------------------------------------------------------
# The CPU kernel's per-capability copies (DEFAULT, AVX2, AVX512) all agree with the reference.


@pytest.mark.parametrize("capability", CPU_CAPABILITIES)
def test_every_cpu_capability_copy(capability):
    run_under_capability(
        "routed_attention",
        capability,
        """
        import torch
        from ovseg_fast.ops import use_backend
        from ovseg_fast.ops.routed_attention import routed_attention
        torch.manual_seed(0)
        # lane tile (3x3 and 7x7 windows) and, for every vector width, key lanes (2x2 windows) and
        # whole-window key lanes (clipped 4x4 and 2x4 windows)
        cases = (((1, 2, 9, 7, 20), (4, 3), 4), ((1, 1, 14, 14, 8), 2, 2), ((1, 2, 7, 5, 12), (4, 3), 4),
                 ((1, 2, 15, 14, 16), 4, 5), ((1, 2, 7, 15, 8), 4, 5))
        for shape, nwin, topk in cases:
            inputs, g = [torch.randn(shape) for _ in range(3)], torch.randn(shape)
            for dtype in (torch.float32, torch.float64, torch.bfloat16):
                xs = [x.to(dtype) for x in inputs]
                with use_backend("cpu"), torch.no_grad():
                    _, idx = routed_attention(*xs, num_windows=nwin, topk=topk, routing="per_head", return_indices=True)

                def run(name, tensors):
                    t = [x.clone().requires_grad_(True) for x in tensors]
                    with use_backend(name):
                        out = routed_attention(*t, num_windows=nwin, topk=topk, routing="per_head", indices=idx)
                        grads = torch.autograd.grad(out, t, g.to(out.dtype))
                    return [r.double() for r in (out, *grads)]

                got, baseline = run("cpu", xs), run("reference", xs)
                if dtype == torch.float64:
                    for a, b in zip(got, baseline):
                        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
                    continue
                # flash-attention's rule against float64 on the same (rounded) inputs and routing:
                # a bare tolerance against the float32 reference fails now and then, where the
                # reference's own MKL products round differently with the buffers' alignment
                exact = run("reference", [x.double() for x in xs])
                atol = 1e-6 if dtype == torch.float32 else 1e-3
                for what, a, e, b in zip(("out", "dq", "dk", "dv"), got, exact, baseline):
                    err, base = float((a - e).abs().max()), float((b - e).abs().max())
                    assert err <= 2 * base + atol, f"{dtype} {shape} {what}: error {err:.3g}, reference's {base:.3g}"
        """,
    )
