"""Tests of ovseg_fast.ops.lpm (RPN's Linear Projection Module): reference, C++ and Triton kernels,
registration, the module and its inputs."""

from __future__ import annotations

import functools
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from ovseg_fast.backends import select_backend
from ovseg_fast.ops import use_backend
from ovseg_fast.ops.lpm import (
    LinearProjectionModule,
    _fold_layer_norm,
    _gram_weight_grad,
    hadamard_concat_linear,
    hadamard_concat_linear_flops,
    lpm_logits,
    lpm_logits_flops,
)
from ovseg_fast.ops.lpm_reference import (
    hadamard_concat_linear_backward_reference,
    hadamard_concat_linear_forward_reference,
    hadamard_concat_linear_spec,
    lpm_logits_backward_reference,
    lpm_logits_forward_reference,
    lpm_logits_spec,
    training_free_logits_spec,
)
from tests.helpers import (
    CPU_CAPABILITIES,
    KERNEL_BACKENDS,
    assert_within_reference_error,
    backend_device,
    on,
    require_backend,
    run_under_capability,
)

HCL = torch.ops.ovseg_fast.hadamard_concat_linear
HCL_BWD = torch.ops.ovseg_fast.hadamard_concat_linear_backward
LOGITS = torch.ops.ovseg_fast.lpm_logits
LOGITS_BWD = torch.ops.ovseg_fast.lpm_logits_backward


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def hcl_inputs(b, c, d, d_out, *, mode="c", shared=True, norm=True, dtype=torch.float64, seed=0):
    gen = _gen(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype)
    text = r(c, d) if shared else r(b, c, d)
    cls = r(b, d)
    weight = r(d_out, 2 * d if mode == "c" else d) * (2 * d) ** -0.5
    bias = r(d_out)
    nw = (1 + 0.1 * r(d_out)) if norm else None
    nb = r(d_out) * 0.1 if norm else None
    return text, cls, weight, bias, nw, nb


def logits_inputs(b, n, c, d, d_out, *, norm=True, shared_emb=False, dtype=torch.float64, seed=1):
    gen = _gen(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype)
    pixels = r(b, n, d)
    emb = r(c, d_out) if shared_emb else r(b, c, d_out)
    weight = r(d_out, d) * d**-0.5
    bias = r(d_out)
    nw = (1 + 0.1 * r(d_out)) if norm else None
    nb = r(d_out) * 0.1 if norm else None
    return pixels, emb, weight, bias, nw, nb


def _run_hcl(backend, inputs, mode, grad=None):
    """Output and the gradients of every tensor argument (zeros for unused ones) under ``backend``, run
    on its device (the spec on the CPU); all results on the CPU."""
    dev = backend_device(backend) if backend != "spec" else torch.device("cpu")
    leaves = [t.clone().requires_grad_(True) if t is not None else None for t in inputs]
    text, cls, w, bias, nw, nb = on(dev, *leaves)
    ctx = use_backend(backend) if backend != "spec" else torch.enable_grad()
    with ctx:
        fn = hadamard_concat_linear if backend != "spec" else hadamard_concat_linear_spec
        out = fn(text, cls, w, bias, mode=mode, norm_weight=nw, norm_bias=nb).cpu()
        grad = torch.randn(out.shape, generator=_gen(7), dtype=torch.float64).to(out.dtype) if grad is None else grad
        used = [t for t in leaves if t is not None]
        grads = torch.autograd.grad(out, used, grad, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(used, grads)]
    return out.detach(), grads, grad


def _run_logits(backend, inputs, grad=None, scale=None):
    """As :func:`_run_hcl`, for lpm_logits."""
    dev = backend_device(backend) if backend != "spec" else torch.device("cpu")
    leaves = [t.clone().requires_grad_(True) if t is not None else None for t in inputs]
    px, e, w, bias, nw, nb = on(dev, *leaves)
    ctx = use_backend(backend) if backend != "spec" else torch.enable_grad()
    with ctx:
        fn = lpm_logits if backend != "spec" else lpm_logits_spec
        out = fn(px, e, w, bias, norm_weight=nw, norm_bias=nb, scale=scale).cpu()
        grad = torch.randn(out.shape, generator=_gen(8), dtype=torch.float64).to(out.dtype) if grad is None else grad
        used = [t for t in leaves if t is not None]
        grads = torch.autograd.grad(out, used, grad)
    return out.detach(), list(grads), grad


MODES = ["a", "b", "c"]


# ---------------------------------------------------------------------------------------------
# The reference is the spec: the contract's forward and hand-written backward equal autograd on
# the literal formulas (cat, mul, Linear, LayerNorm, einsum).


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_image"])
@pytest.mark.parametrize("norm", [True, False], ids=["ln", "no_ln"])
def test_reference_contract_equals_spec(mode, shared, norm):
    inputs = hcl_inputs(3, 5, 6, 7, mode=mode, shared=shared, norm=norm)
    out, grads, g = _run_hcl("spec", inputs, mode)
    text, cls, w, bias, nw, nb = inputs
    t = text.unsqueeze(0) if shared else text
    got, xhat, rstd = hadamard_concat_linear_forward_reference(t, cls, w, bias, nw, nb, mode, 1e-5)
    torch.testing.assert_close(got, out, rtol=1e-12, atol=1e-12)
    back = hadamard_concat_linear_backward_reference(g, t, cls, w, nw, xhat, rstd, mode, True, norm)
    expected = [grads[0].unsqueeze(0) if shared else grads[0], *grads[1:]]
    for a, e in zip(back, expected):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("norm", [True, False], ids=["ln", "no_ln"])
def test_reference_logits_contract_equals_spec(norm):
    inputs = logits_inputs(2, 11, 4, 6, 5, norm=norm)
    out, grads, g = _run_logits("spec", inputs)
    px, e, w, bias, nw, nb = inputs
    got, xhat, rstd = lpm_logits_forward_reference(px, e, w, bias, nw, nb, 1e-5, 5**-0.5, True)
    torch.testing.assert_close(got, out, rtol=1e-12, atol=1e-12)
    back = lpm_logits_backward_reference(g, px, e, w, bias, nw, nb, xhat, rstd, 5**-0.5)
    for a, ex in zip(back, grads):
        torch.testing.assert_close(a, ex, rtol=1e-10, atol=1e-12)


def _hcl_positional(t, c, w, b, nw, nb, *, mode):
    return hadamard_concat_linear(t, c, w, b, mode=mode, norm_weight=nw, norm_bias=nb)


def test_gradcheck_reference():
    with use_backend("reference"):
        for mode in MODES:
            leaves = [t.requires_grad_(True) for t in hcl_inputs(2, 3, 4, 5, mode=mode, shared=mode != "b")]
            fn = functools.partial(_hcl_positional, mode=mode)
            assert torch.autograd.gradcheck(fn, leaves)
        leaves = [t.requires_grad_(True) for t in logits_inputs(2, 5, 3, 4, 6)]
        assert torch.autograd.gradcheck(
            lambda x, e, w, b, nw, nb: lpm_logits(x, e, w, b, norm_weight=nw, norm_bias=nb), leaves
        )
        leaves = [t.requires_grad_(True) for t in logits_inputs(2, 5, 3, 4, 6, norm=False)[:4]]
        assert torch.autograd.gradcheck(lambda x, e, w, b: lpm_logits(x, e, w, b, scale=0.7), leaves)


# ---------------------------------------------------------------------------------------------
# Kernels against the reference (float32 against the float64 spec; gradients of every argument).

HCL_CASES = [(m, s, n) for m in MODES for s in (True, False) for n in (True, False)]


def _assert_all_close(got, expected, rtol, atol, what):
    for i, (a, e) in enumerate(zip(got, expected)):
        assert a.shape == e.shape, f"{what}[{i}]: shape {tuple(a.shape)} != {tuple(e.shape)}"
        torch.testing.assert_close(a.double(), e.double(), rtol=rtol, atol=atol, msg=lambda m, i=i: f"{what}[{i}]: {m}")


@pytest.mark.parametrize(
    "case", HCL_CASES, ids=lambda c: f"{c[0]}-{'shared' if c[1] else 'per_image'}-{'ln' if c[2] else 'no_ln'}"
)
def test_cpu_hcl_matches_reference(case):
    require_backend("lpm", "cpu")
    mode, shared, norm = case
    inputs64 = hcl_inputs(4, 19, 24, 33, mode=mode, shared=shared, norm=norm)
    out64, grads64, g = _run_hcl("spec", inputs64, mode)
    out, grads, _ = _run_hcl("cpu", [t.float() if t is not None else None for t in inputs64], mode, g.float())
    _assert_all_close([out], [out64], 1e-4, 1e-5, "out")
    _assert_all_close(grads, grads64, 1e-4, 1e-4, "grad")


@pytest.mark.triton
@pytest.mark.parametrize(
    "case",
    [("a", True, True), ("b", False, True), ("c", True, True), ("c", False, False)],
    ids=lambda c: f"{c[0]}-{'shared' if c[1] else 'per_image'}-{'ln' if c[2] else 'no_ln'}",
)
def test_triton_hcl_matches_reference(case):
    require_backend("lpm", "triton")
    mode, shared, norm = case
    inputs64 = hcl_inputs(2, 5, 20, 24, mode=mode, shared=shared, norm=norm)
    out64, grads64, g = _run_hcl("spec", inputs64, mode)
    out, grads, _ = _run_hcl("triton", [t.float() if t is not None else None for t in inputs64], mode, g.float())
    _assert_all_close([out], [out64], 1e-4, 1e-5, "out")
    _assert_all_close(grads, grads64, 1e-4, 1e-4, "grad")


@pytest.mark.triton
def test_triton_partial_statistics_path():
    """D_out wider than one tile: per-row partial (mean, M2) and the finish pass."""
    dev = require_backend("lpm", "triton")
    from ovseg_fast.kernels import lpm as K

    text, cls, w, bias, nw, nb = [t.float() for t in hcl_inputs(2, 3, 16, 40, mode="c")]
    text = text.unsqueeze(0) + 30.0  # a large mean: the merge must not cancel
    got = K.hcl_forward(*on(dev, text, cls, w, bias, nw, nb), "c", 1e-5, row_tile=16)
    exp = hadamard_concat_linear_forward_reference(
        text.double(), cls.double(), w.double(), bias.double(), nw.double(), nb.double(), "c", 1e-5
    )
    _assert_all_close([t.cpu() for t in got], exp, 1e-4, 1e-4, "hcl")
    px, e, w, bias, nw, nb = [t.float() for t in logits_inputs(2, 7, 3, 16, 40)]
    for norm in (True, False):
        tensors = (px, e, w, bias, nw if norm else None, nb if norm else None)
        got = K.logits_forward(*on(dev, *tensors), 1e-5, 0.3, True, row_tile=16)
        exp = lpm_logits_forward_reference(*[t.double() if t is not None else None for t in tensors], 1e-5, 0.3, True)
        _assert_all_close([t.cpu() for t in got], exp, 1e-4, 1e-5, f"logits norm={norm}")


@pytest.mark.triton
def test_triton_split_k_gemm_and_split_reduction():
    """Grids too small for the GPU split the reduction (float32 partials, summed by a second launch): the
    split-K GEMM and the split-R reduction, with and without accumulating into the output."""
    dev = require_backend("lpm", "triton")
    from ovseg_fast.kernels import lpm as K

    a, b = torch.randn(2, 3, 20, 70, dtype=torch.float64), torch.randn(2, 3, 70, 24, dtype=torch.float64)
    assert K._gemm_config(20, 24, 70, 3, 2, K.DOT_IEEE, 132)[3] > 1  # 2 tiles, 15 K steps: 3 splits
    exact = torch.einsum("grmk,grkn->gmn", a, b)
    for accumulate in (False, True):
        out = torch.randn(2, 20, 24, dtype=torch.float64)
        expected = 0.5 * exact + (out if accumulate else 0)
        got = on(dev, out.float())[0]
        K._gemm(*on(dev, a.float(), b.float()), got, alpha=0.5, accumulate=accumulate)
        torch.testing.assert_close(got.cpu().double(), expected, rtol=1e-5, atol=1e-4)
    x, y = torch.randn(1, 200, 3, 5, dtype=torch.float64), torch.randn(1, 200, 3, 5, dtype=torch.float64)
    assert K._splits(1, 200, K.MIN_SPLIT_ROWS, 132) == 12
    got = on(dev, torch.zeros(1, 3, 5))[0]
    K._mul_reduce(*on(dev, x.float(), y.float()), got)
    torch.testing.assert_close(got.cpu().double(), (x * y).sum(1), rtol=1e-5, atol=1e-5)


@pytest.mark.triton
def test_triton_float32_dots_follow_torch_tf32_setting():
    """float32 tl.dots are IEEE under torch's default and TF32 when torch allows TF32 matmuls; reduced
    precision tiles always go to the tensor cores in their own dtype."""
    from ovseg_fast.kernels import lpm as K

    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    try:
        matmul.fp32_precision = "ieee"
        assert K._dot_mode(torch.float32) == K.DOT_IEEE
        matmul.fp32_precision = "tf32"
        assert K._dot_mode(torch.float32) == K.DOT_TF32
        assert K._dot_mode(torch.float32, torch.bfloat16) == K.DOT_BF16
        assert K._dot_mode(torch.float16, torch.float32) == K.DOT_FP16
    finally:
        matmul.fp32_precision = before


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("norm", [True, False], ids=["ln", "no_ln"])
@pytest.mark.parametrize("shared_emb", [False, True], ids=["per_image_emb", "shared_emb"])
def test_kernel_logits_matches_reference(backend, norm, shared_emb):
    require_backend("lpm", backend)
    shape = (2, 37, 5, 24, 20) if backend == "triton" else (3, 300, 9, 40, 48)
    inputs64 = logits_inputs(*shape, norm=norm, shared_emb=shared_emb)
    out64, grads64, g = _run_logits("spec", inputs64)
    out, grads, _ = _run_logits(backend, [t.float() if t is not None else None for t in inputs64], g.float())
    _assert_all_close([out], [out64], 1e-4, 1e-5, "logits")
    _assert_all_close(grads, grads64, 1e-4, 1e-4, "grad")


def test_cpu_logits_several_chunks_and_reassociation():
    """N spans several pixel chunks of the C++ kernel (rows per chunk = 2^18 / D_out), with and without
    LayerNorm (without it, C << N takes the re-associated (e V) x^T path)."""
    require_backend("lpm", "cpu")
    for norm in (True, False):
        inputs64 = logits_inputs(2, 700, 3, 8, 1024, norm=norm)
        out64, grads64, g = _run_logits("spec", inputs64)
        out, grads, _ = _run_logits("cpu", [t.float() if t is not None else None for t in inputs64], g.float())
        _assert_all_close([out], [out64], 1e-4, 1e-5, "logits")
        _assert_all_close(grads, grads64, 1e-4, 1e-4, "grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("affine", ["bias_beta", "no_bias_beta"])
@pytest.mark.parametrize("layout", ["channel_first", "pixel_rows"])
def test_cpu_folded_inference_logits(dtype, affine, layout):
    """Inference with LayerNorm at shapes where the C++ kernel folds the LayerNorm into the weights (QR of
    the centred weights, triangular norm, C-sized logits GEMM): equal to the spec, also for a large mean of
    the projection (the centring happens on the weights, before any product), D not a multiple of the
    triangular blocks, N not a multiple of the pixel block, D_out < D and D_out > D + 1; channel-first
    pixels take the fused micro-kernel (triangular norm and class-side product), (B, N, D) rows the
    column-blocked GEMMs."""
    require_backend("lpm", "cpu", dtype)
    # C = 13: several whole row blocks of the class-side micro-kernel and a partial one (blocks of 3
    # rows in the AVX2 copy, 6 in the AVX-512 one).
    shapes = (
        (2, 1500, 3, 130, 128, 0.0),
        (2, 1500, 4, 256, 192, 1e3),
        (2, 900, 5, 96, 300, 30),
        (1, 2000, 13, 96, 96, 0.0),
    )
    for b, n, c, d, d_out, mean in shapes:
        assert _fold_layer_norm(b, c, n, d, d_out)
        px, e, w, bias, nw, nb = logits_inputs(b, n, c, d, d_out, seed=3)
        if layout == "channel_first":
            px = px.transpose(1, 2).contiguous().transpose(1, 2)  # the (B, N, D) view of a (B, D, N) map
        else:
            px = px.contiguous()
        bias = bias + mean if affine == "bias_beta" else None
        nb = nb if affine == "bias_beta" else None
        args = [t.to(dtype) if t is not None else None for t in (px, e, w, bias, nw, nb)]
        # the exact result of the dtype-rounded inputs: only the computation's error is compared
        x64, e64, w64, b64, nw64, nb64 = [t.double() if t is not None else None for t in args]
        exp = lpm_logits_spec(x64, e64, w64, b64, norm_weight=nw64, norm_bias=nb64)
        with torch.no_grad(), use_backend("cpu"):
            got = lpm_logits(args[0], args[1], args[2], args[3], norm_weight=args[4], norm_bias=args[5])
        tol = 1e-11 if dtype == torch.float64 else 2e-5
        torch.testing.assert_close(got.double(), exp, rtol=tol, atol=tol)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            lpm_logits(*args[:4], norm_weight=args[4], norm_bias=args[5])
        assert counter.get_total_flops() == lpm_logits_flops(b, c, n, d, d_out, save=False)
        assert counter.get_total_flops() < lpm_logits_flops(b, c, n, d, d_out)


def test_cpu_folded_inference_follows_weight_changes():
    """The folded form memoises the QR of the centred weights on their exact contents: in-place updates
    of the weight or the bias (an optimiser step, load_state_dict) and new tensors are all seen."""
    require_backend("lpm", "cpu")
    b, n, c, d, d_out = 2, 1500, 3, 130, 128
    assert _fold_layer_norm(b, c, n, d, d_out)
    px, e, w, bias, nw, nb = [t.float() for t in logits_inputs(b, n, c, d, d_out, seed=7)]

    def check():
        with torch.no_grad():
            with use_backend("cpu"):
                got = lpm_logits(px, e, w, bias, norm_weight=nw, norm_bias=nb)
            x64, e64, w64, b64 = (t.double() for t in (px, e, w, bias))
            exp = lpm_logits_spec(x64, e64, w64, b64, norm_weight=nw.double(), norm_bias=nb.double())
        torch.testing.assert_close(got.double(), exp, rtol=2e-5, atol=2e-5)
        return got

    first = check()
    assert torch.equal(check(), first)  # the memoised factor gives the same result
    with torch.no_grad():
        w[:, 0] *= 3.0
    changed = check()
    assert not torch.allclose(changed, first)
    with torch.no_grad():
        bias[::2] += 0.5  # not a constant shift, which the LayerNorm (and the centred bias) ignores
    check()
    w = w.clone() * 0.5
    check()


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_cpu_gram_weight_gradient(bias):
    """Shapes where the C++ backward takes d V through the Gram form ((e * gamma)^T (G * rstd) x - Vc S -
    ...): exact in float64 (D not a multiple of the Gram block, channel-first pixels), close in float32."""
    require_backend("lpm", "cpu", torch.float64)
    b, n, c, d, d_out = 2, 200, 2, 70, 96
    assert _gram_weight_grad(b, c, n, d, d_out)
    px, e, w, bias_t, nw, nb = logits_inputs(b, n, c, d, d_out, seed=5)
    px = px.transpose(1, 2).contiguous().transpose(1, 2)
    inputs = [px, e, w, bias_t if bias else None, nw, nb]
    out64, grads64, g = _run_logits("spec", inputs)
    out, grads, _ = _run_logits("cpu", inputs, g)
    _assert_all_close([out, *grads], [out64, *grads64], 1e-10, 1e-11, "float64")
    out, grads, _ = _run_logits("cpu", [t.float() if t is not None else None for t in inputs], g.float())
    _assert_all_close([out, *grads], [out64, *grads64], 1e-4, 1e-4, "float32")


def test_pixels_gradient_is_channel_first():
    """d pixels comes stored as (B, D, N): the gradient of a (B, D, H, W) map's (B, N, D) view needs no copy."""
    for backend in ("reference", "cpu"):
        require_backend("lpm", backend)
        px, e, w, bias, nw, nb = [t.float() for t in logits_inputs(2, 12, 3, 8, 10)]
        with use_backend(backend):
            g_x, *_ = LOGITS_BWD(
                torch.randn(2, 3, 12), px, e, w, bias, nw, nb, torch.randn(2, 12, 10), torch.rand(2, 12), 0.5
            )
        assert g_x.shape == (2, 12, 8) and g_x.transpose(1, 2).is_contiguous()


def test_cpu_kernel_float64_is_exact_and_gradchecks():
    require_backend("lpm", "cpu", torch.float64)
    with use_backend("cpu"):
        for mode, shared in (("c", True), ("b", False), ("a", True)):
            leaves = [t.requires_grad_(True) for t in hcl_inputs(3, 4, 5, 6, mode=mode, shared=shared)]
            fn = functools.partial(_hcl_positional, mode=mode)
            assert torch.autograd.gradcheck(fn, leaves)
        for norm in (True, False):
            leaves = [t.requires_grad_(True) for t in logits_inputs(2, 6, 3, 4, 5, norm=norm) if t is not None]
            if norm:
                fn = lambda x, e, w, b, nw, nb: lpm_logits(x, e, w, b, norm_weight=nw, norm_bias=nb)
            else:
                fn = lambda x, e, w, b: lpm_logits(x, e, w, b)
            assert torch.autograd.gradcheck(fn, leaves)
    inputs = hcl_inputs(3, 7, 8, 9, mode="c", shared=True)
    out, _, _ = _run_hcl("cpu", inputs, "c")
    torch.testing.assert_close(
        out,
        hadamard_concat_linear_spec(*inputs[:4], mode="c", norm_weight=inputs[4], norm_bias=inputs[5]),
        rtol=1e-12,
        atol=1e-12,
    )


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
    """flash-attention's rule: the kernel's error against float64 within 2x that of the plain-PyTorch
    spec run in the same dtype (+ a small atol for entries whose spec error is ~0)."""
    require_backend("lpm", backend, dtype)
    small = backend == "triton"
    hin = hcl_inputs(2, 5 if small else 21, 16 if small else 64, 32 if small else 64, mode="c", norm=True)
    lin = logits_inputs(2, 20 if small else 200, 5 if small else 21, 16 if small else 64, 32 if small else 64)
    _assert_within_reference_error(backend, dtype, hin, lin)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_triton_kernels_forward_and_backward(dtype):
    """On a GPU machine: the compiled Triton kernels (the automatic choice for CUDA tensors) at an RPN-like
    size (COCO-Stuff's 171 classes, D = 512), forward and backward, by flash-attention's rule."""
    assert select_backend("lpm", torch.device("cuda"), dtype) == "triton"
    hin = hcl_inputs(4, 171, 512, 512, mode="c", norm=True)
    lin = logits_inputs(4, 1024, 171, 512, 512)
    atol = (1e-4, 1e-4) if dtype == torch.float32 else (1e-2, 2e-2)
    _assert_within_reference_error("triton", dtype, hin, lin, atol)  # on the GPU (tests.helpers.triton_device)


def _assert_within_reference_error(backend, dtype, hin, lin, atol=(1e-2, 2e-2)):
    """hadamard_concat_linear and lpm_logits on ``backend`` in ``dtype``, outputs and gradients, by
    flash-attention's rule; ``atol`` is (outputs, gradients)."""
    low = lambda ts: [t.to(dtype) if t is not None else None for t in ts]
    # the "exact" results use the dtype-rounded inputs, so only the computation's error is compared
    exact_h, exact_hg, gh = _run_hcl("spec", [t.double() if t is not None else None for t in low(hin)], "c")
    base_h, base_hg, _ = _run_hcl("spec", low(hin), "c", gh.to(dtype))
    got_h, got_hg, _ = _run_hcl(backend, low(hin), "c", gh.to(dtype))
    assert got_h.dtype == dtype
    assert_within_reference_error(got_h, exact_h, base_h, factor=2.0, atol=atol[0], what="hcl out")
    for i, (a, e, bl) in enumerate(zip(got_hg, exact_hg, base_hg)):
        assert_within_reference_error(a, e, bl, factor=2.0, atol=atol[1], what=f"hcl grad {i}")
    exact_l, exact_lg, gl = _run_logits("spec", [t.double() if t is not None else None for t in low(lin)])
    base_l, base_lg, _ = _run_logits("spec", low(lin), gl.to(dtype))
    got_l, got_lg, _ = _run_logits(backend, low(lin), gl.to(dtype))
    assert_within_reference_error(got_l, exact_l, base_l, factor=2.0, atol=atol[0], what="logits")
    for i, (a, e, bl) in enumerate(zip(got_lg, exact_lg, base_lg)):
        assert_within_reference_error(a, e, bl, factor=2.0, atol=atol[1], what=f"logits grad {i}")


@pytest.mark.parametrize("backend", ["reference", *KERNEL_BACKENDS])
def test_large_mean_stays_accurate(backend):
    """Pixels with a large common offset: the LayerNorm's centred variance must not cancel."""
    dev = require_backend("lpm", backend)
    px, e, w, bias, nw, nb = [t.float() for t in logits_inputs(2, 9, 3, 16, 24)]
    bias = bias + 1e3
    with use_backend(backend):
        out = lpm_logits(*on(dev, px, e, w, bias), norm_weight=nw.to(dev), norm_bias=nb.to(dev)).cpu()
    exp = lpm_logits_spec(
        px.double(), e.double(), w.double(), bias.double(), norm_weight=nw.double(), norm_bias=nb.double()
    )
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), exp, rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------------------------------------
# The module: modes a, b, c and training-free against the spec; shared vs per-image text.


@pytest.mark.parametrize("mode", [*MODES, "training_free"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_image"])
def test_module_matches_spec(mode, shared):
    torch.manual_seed(0)
    b, d, h, w, c, d_out = 2, 12, 5, 4, 6, 10
    module = LinearProjectionModule(d, d_out, mode=mode).double()
    pixels = torch.randn(b, d, h, w, dtype=torch.float64)
    text = torch.randn(c, d, dtype=torch.float64) if shared else torch.randn(b, c, d, dtype=torch.float64)
    cls = torch.randn(b, d, dtype=torch.float64)
    out = module(pixels, text, cls)
    assert out.shape == (b, c, h, w)
    flat = pixels.flatten(2).transpose(1, 2)
    if mode == "training_free":
        exp = training_free_logits_spec(flat, text)
        assert not list(module.parameters())
    else:
        emb = hadamard_concat_linear_spec(
            text,
            cls,
            module.text_proj.weight,
            module.text_proj.bias,
            mode=mode,
            norm_weight=module.text_norm.weight,
            norm_bias=module.text_norm.bias,
        )
        exp = lpm_logits_spec(
            flat,
            emb,
            module.image_proj.weight,
            module.image_proj.bias,
            norm_weight=module.image_norm.weight,
            norm_bias=module.image_norm.bias,
        )
    torch.testing.assert_close(out, exp.view(b, c, h, w), rtol=1e-10, atol=1e-10)
    assert f"mode='{mode}'" in repr(module)


def test_module_without_layernorm_and_cosine_range():
    module = LinearProjectionModule(8, 6, mode="b", norm=False)
    assert not hasattr(module, "text_norm")
    out = module(torch.randn(2, 8, 3, 3), torch.randn(4, 8), torch.randn(2, 8))
    assert out.shape == (2, 4, 3, 3)
    free = LinearProjectionModule(8, 8, mode="training_free")
    cos = free(torch.randn(2, 8, 3, 3), torch.randn(4, 8))
    assert float(cos.abs().max()) <= 1.0 + 1e-6


def test_compiled_module_fullgraph_forward_and_backward():
    torch.manual_seed(0)
    module = LinearProjectionModule(16, 12, mode="c")
    pixels = torch.randn(2, 16, 4, 5)
    text, cls = torch.randn(7, 16), torch.randn(2, 16)
    compiled = torch.compile(lambda p, t, c: module(p, t, c).square().sum(), fullgraph=True)
    leaf = pixels.clone().requires_grad_(True)
    loss = compiled(leaf, text, cls)
    loss.backward()
    grads_c = [leaf.grad, *[p.grad.clone() for p in module.parameters()]]
    module.zero_grad()
    leaf_e = pixels.clone().requires_grad_(True)
    loss_e = module(leaf_e, text, cls).square().sum()
    loss_e.backward()
    torch.testing.assert_close(loss, loss_e)
    for a, e in zip(grads_c, [leaf_e.grad, *[p.grad for p in module.parameters()]]):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Registration: opcheck, FLOPs, empty and non-contiguous inputs.


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_opcheck(backend):
    require_backend("lpm", backend)
    with use_backend(backend):
        for mode, shared, norm in (("c", True, True), ("b", False, False), ("a", True, True)):
            text, cls, w, bias, nw, nb = [
                t.float() if t is not None else None
                for t in hcl_inputs(2, 3, 4, 5, mode=mode, shared=shared, norm=norm)
            ]
            t3 = text.unsqueeze(0) if shared else text
            args = (t3.requires_grad_(True), cls.requires_grad_(True), w.requires_grad_(True), bias, nw, nb, mode, 1e-5)
            torch.library.opcheck(HCL, args)
            out, xhat, rstd = HCL(*args)
            torch.library.opcheck(
                HCL_BWD,
                (torch.randn_like(out), t3.detach(), cls.detach(), w.detach(), nw, xhat, rstd, mode, True, norm),
            )
        for norm in (True, False):
            px, e, w, bias, nw, nb = [
                t.float() if t is not None else None for t in logits_inputs(2, 6, 3, 4, 5, norm=norm)
            ]
            args = (px.requires_grad_(True), e.requires_grad_(True), w, bias, nw, nb, 1e-5, 0.5, True)
            torch.library.opcheck(LOGITS, args)
            lg, xhat, rstd = LOGITS(*args)
            torch.library.opcheck(
                LOGITS_BWD, (torch.randn_like(lg), px.detach(), e.detach(), w, bias, nw, nb, xhat, rstd, 0.5)
            )


def test_flop_counter_counts_forward_and_backward():
    text, cls, w, bias, nw, nb = [t.float().requires_grad_(True) for t in hcl_inputs(3, 5, 4, 6, mode="c")]
    with FlopCounterMode(display=False) as counter:
        hadamard_concat_linear(text, cls, w, bias, norm_weight=nw, norm_bias=nb).sum().backward()
    assert counter.get_total_flops() == hadamard_concat_linear_flops(3, 5, 4, 6) * 3
    # shared text: 3 Hadamard GEMMs + 1 shared one, 2 FLOPs per multiply-add
    assert hadamard_concat_linear_flops(3, 5, 4, 6) == (3 + 1) * 5 * 4 * 6 * 2
    px, e, w, bias, nw, nb = [t.float().requires_grad_(True) for t in logits_inputs(2, 7, 3, 4, 5)]
    with FlopCounterMode(display=False) as counter:
        lpm_logits(px, e, w, bias, norm_weight=nw, norm_bias=nb).sum().backward()
    expected = lpm_logits_flops(2, 3, 7, 4, 5) + lpm_logits_flops(2, 3, 7, 4, 5, backward=True)
    assert counter.get_total_flops() == expected
    assert lpm_logits_flops(1, 1, 1, 1, 1) == 4


@pytest.mark.parametrize("backend", ["reference", *KERNEL_BACKENDS])
@pytest.mark.parametrize("which", ["B=0", "C=0", "N=0"])
def test_empty_inputs(backend, which):
    dev = require_backend("lpm", backend)
    b, c, n = {"B=0": (0, 3, 4), "C=0": (2, 0, 4), "N=0": (2, 3, 0)}[which]
    text, cls, w, bias, nw, nb = [t.float().requires_grad_(True) for t in hcl_inputs(max(b, 1), c, 4, 5, shared=False)]
    text = text[:b].detach().requires_grad_(True)
    cls = cls[:b].detach().requires_grad_(True)
    px = torch.randn(b, n, 4, requires_grad=True)
    wp = torch.randn(5, 4, requires_grad=True)
    with use_backend(backend):
        text_d, cls_d, w_d, bias_d, nw_d, nb_d, px_d, wp_d = on(dev, text, cls, w, bias, nw, nb, px, wp)
        emb = hadamard_concat_linear(text_d, cls_d, w_d, bias_d, norm_weight=nw_d, norm_bias=nb_d)
        logits = lpm_logits(px_d, emb, wp_d, norm_weight=nw_d)
        (logits.sum() + emb.sum()).backward()
    assert emb.shape == (b, c, 5) and logits.shape == (b, c, n)
    for t in (text, cls, w, bias, nw, nb, px, wp):
        assert t.grad is not None and torch.isfinite(t.grad).all()


@pytest.mark.parametrize("backend", ["reference", *KERNEL_BACKENDS])
def test_non_contiguous_inputs(backend):
    dev = require_backend("lpm", backend)
    gen = _gen(4)
    # (B, N, D) channel-first view; (C, D), (D_out=12, 2D=32) and (D, D_out) transposed
    pixels_map, text_t, cls_t, w_t, wp_t = (
        torch.randn(*s, generator=gen) for s in ((2, 16, 3, 5), (16, 6), (16, 2), (32, 12), (16, 12))
    )
    nw, nb = torch.rand(12, generator=gen) + 0.5, torch.randn(12, generator=gen)
    views = lambda d: (pixels_map.to(d).flatten(2).transpose(1, 2), *(t.to(d).t() for t in (text_t, cls_t, w_t, wp_t)))
    pixels, text, cls, w, wp = views("cpu")
    pixels_d, text_d, cls_d, w_d, wp_d = views(dev)
    assert not (pixels_d.is_contiguous() or text_d.is_contiguous() or w_d.is_contiguous())
    with use_backend(backend):
        emb = hadamard_concat_linear(text_d, cls_d, w_d, norm_weight=nw.to(dev), norm_bias=nb.to(dev))
        out = lpm_logits(pixels_d, emb, wp_d, norm_weight=nw.to(dev), norm_bias=nb.to(dev)).cpu()
    emb_e = hadamard_concat_linear_spec(
        text.double(), cls.double(), w.double(), norm_weight=nw.double(), norm_bias=nb.double()
    )
    exp = lpm_logits_spec(pixels.double(), emb_e, wp.double(), norm_weight=nw.double(), norm_bias=nb.double())
    torch.testing.assert_close(out.double(), exp, rtol=1e-4, atol=1e-5)


def test_inference_saves_nothing():
    require_backend("lpm", "cpu")
    px, e, w, bias, nw, nb = [t.float() for t in logits_inputs(2, 6, 3, 4, 5)]
    with torch.no_grad():
        _, xhat, rstd = LOGITS(px, e, w, bias, nw, nb, 1e-5, 0.5, False)
    assert xhat.numel() == 0 and rstd.numel() == 0


# ---------------------------------------------------------------------------------------------
# Bad inputs: clear errors naming the argument.


def test_bad_inputs():
    text, cls, w, bias, nw, nb = [t.float() for t in hcl_inputs(2, 3, 4, 5)]
    px, e, wp, bp, _, _ = [t.float() for t in logits_inputs(2, 6, 3, 4, 5)]
    bad_hcl = [
        (ValueError, "mode", dict(mode="d")),
        (TypeError, "text must be a torch.Tensor", dict(text=[1.0])),
        (ValueError, "text must have 2 or 3", dict(text=text[0])),
        (TypeError, "cls must have the dtype", dict(cls=cls.double())),
        (TypeError, "text must have dtype", dict(text=text.int(), cls=cls.int(), weight=w.int())),
        (ValueError, "cls must have shape", dict(cls=cls[:, :3])),
        (ValueError, "text must have shape", dict(text=torch.randn(3, 3, 4))),
        (ValueError, "weight must have shape", dict(weight=w[:, :4])),
        (ValueError, "weight must have shape", dict(weight=w[:, :4], mode="c")),
        (ValueError, "bias must have shape", dict(bias=bias[:4])),
        (ValueError, "norm_bias was given without norm_weight", dict(norm_weight=None)),
        (ValueError, "norm_weight must have shape", dict(norm_weight=nw[:3])),
        (ValueError, "eps must be > 0", dict(eps=0.0)),
        (ValueError, "eps must be finite", dict(eps=float("nan"))),
    ]
    base = dict(text=text, cls=cls, weight=w, bias=bias, mode="c", norm_weight=nw, norm_bias=nb, eps=1e-5)
    for exc, match, change in bad_hcl:
        kw = {**base, **change}
        with pytest.raises(exc, match=match):
            hadamard_concat_linear(kw.pop("text"), kw.pop("cls"), kw.pop("weight"), kw.pop("bias"), **kw)
    with pytest.raises(ValueError, match="weight must have shape"):
        hadamard_concat_linear(text, cls, w, bias, mode="a")
    bad_logits = [
        (ValueError, "pixels must have 3", dict(pixels=px[0])),
        (ValueError, "class_emb must have shape", dict(class_emb=torch.randn(3, 3, 5))),
        (ValueError, "class_emb must have shape", dict(class_emb=torch.randn(3, 4))),
        (ValueError, "weight must have shape", dict(weight=torch.randn(5, 3))),
        (TypeError, "weight must have the dtype", dict(weight=wp.double())),
        (TypeError, "scale must be a float", dict(scale="1")),
        (ValueError, "scale must be finite", dict(scale=float("inf"))),
        (ValueError, "norm_weight must have shape", dict(norm_weight=torch.ones(4))),
        (TypeError, "norm_weight must have the dtype", dict(norm_weight=torch.ones(5, dtype=torch.float64))),
    ]
    base = dict(pixels=px, class_emb=e, weight=wp, bias=bp, norm_weight=None, norm_bias=None, eps=1e-5, scale=None)
    for exc, match, change in bad_logits:
        kw = {**base, **change}
        with pytest.raises(exc, match=match):
            lpm_logits(kw.pop("pixels"), kw.pop("class_emb"), kw.pop("weight"), kw.pop("bias"), **kw)
    if torch.device("meta") is not None:
        with pytest.raises(ValueError, match="is on meta"):
            lpm_logits(px, e, wp.to("meta"))
    with pytest.raises(ValueError, match="mode"):
        LinearProjectionModule(4, 4, mode="x")
    with pytest.raises(ValueError, match="dim must be >= 1"):
        LinearProjectionModule(0, 4)
    module = LinearProjectionModule(4, 5)
    with pytest.raises(ValueError, match="pixels must have 4 channels"):
        module(torch.randn(2, 3, 2, 2), torch.randn(3, 4), torch.randn(2, 4))
    with pytest.raises(ValueError, match="cls is required"):
        module(torch.randn(2, 4, 2, 2), torch.randn(3, 4))


# ---------------------------------------------------------------------------------------------
# The CPU kernel's per-capability copies (DEFAULT, AVX2, AVX512) all agree with the reference.


@pytest.mark.parametrize("capability", CPU_CAPABILITIES)
def test_every_cpu_capability_copy(capability):
    code = textwrap.dedent(
        """
        import torch, ovseg_fast._C as ext
        from ovseg_fast.ops import use_backend
        from ovseg_fast.ops.lpm import LinearProjectionModule
        torch.manual_seed(0)
        m = LinearProjectionModule(21, 37, mode="c")
        p, t, c = torch.randn(2, 21, 5, 7, requires_grad=True), torch.randn(9, 21), torch.randn(2, 21)
        res = {}
        for name in ("cpu", "reference"):
            m.zero_grad(); p.grad = None
            with use_backend(name):
                out = m(p, t, c); out.square().sum().backward()
            res[name] = [out.detach(), p.grad.clone(), *[q.grad.clone() for q in m.parameters()]]
        for a, b in zip(res["cpu"], res["reference"]):
            torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-5)
        # inference at a size that folds the LayerNorm (the micro-kernel's per-capability blocking),
        # channel-first pixels whose count is no multiple of the pixel block, 13 classes (whole and
        # partial row blocks)
        from ovseg_fast.ops.lpm import _fold_layer_norm, lpm_logits
        from ovseg_fast.ops.lpm_reference import lpm_logits_spec
        assert _fold_layer_norm(2, 13, 1500, 130, 128)
        x = torch.randn(2, 130, 1500).transpose(1, 2).double()
        e, w, b = torch.randn(2, 13, 128), torch.randn(128, 130) / 12, torch.randn(128)
        g, h = torch.rand(128) + 0.5, torch.randn(128)
        args = [t.double() for t in (e, w, b)]
        with torch.no_grad(), use_backend("cpu"):
            got = lpm_logits(x, *args, norm_weight=g.double(), norm_bias=h.double())
        exp = lpm_logits_spec(x, *args, norm_weight=g.double(), norm_bias=h.double())
        torch.testing.assert_close(got, exp, rtol=1e-11, atol=1e-11)
        """
    )
    run_under_capability("lpm", capability, code)


def test_training_free_spec_is_cosine():
    p = torch.randn(1, 4, 3, dtype=torch.float64)
    t = torch.randn(2, 3, dtype=torch.float64)
    got = training_free_logits_spec(p, t)
    exp = F.cosine_similarity(t[:, None, :], p[0][None, :, :], dim=-1)
    torch.testing.assert_close(got[0], exp)
