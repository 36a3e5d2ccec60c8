"""Tests of ovseg_fast.ops.moe: gating, dispatch, combine (reference, C++ and Triton kernels), the
registrations, the module and the inputs."""

from __future__ import annotations

import contextlib
import textwrap

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from ovseg_fast.backends import select_backend
from ovseg_fast.ops import use_backend
from ovseg_fast.ops.moe import (
    GatingOutput,
    MixtureOfExperts,
    moe_combine,
    moe_combine_flops,
    moe_dispatch,
    topk_gating,
    topk_gating_flops,
)
from ovseg_fast.ops.moe_reference import (
    argsort_dispatch,
    gating_backward_reference,
    gating_forward_reference,
    index_add_combine,
    topk_gating_reference,
)
from tests.helpers import (
    CPU_CAPABILITIES,
    KERNEL_BACKENDS,
    assert_within_reference_error,
    backend_device,
    on,
    require_backend,
    run_under_capability,
    tolerances,
)

GATING = torch.ops.ovseg_fast.topk_gating
LOSSES = ("load_balancing_loss", "importance_loss", "load_loss", "z_loss")


def plain_topk_softmax(logits: torch.Tensor, k: int, normalize: bool = True):
    """The eager chain the op replaces: softmax, topk, renormalise (float64)."""
    p = torch.softmax(logits.double(), dim=1)
    w, i = torch.topk(p, k, dim=1)
    return (w / w.sum(1, keepdim=True) if normalize else w), i


def make(t, e, dtype=torch.float32, seed=0, noisy=False):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(t, e, generator=gen, dtype=torch.float64) * 2).to(dtype)
    if not noisy:
        return logits, None, None
    noise = torch.randn(t, e, generator=gen, dtype=torch.float64).to(
        torch.float64 if dtype == torch.float64 else torch.float32
    )
    noise_logits = torch.randn(t, e, generator=gen, dtype=torch.float64).to(dtype)
    return logits, noise, noise_logits


# ---------------------------------------------------------------------------------------------
# Reference: the spec against the plain eager chain and the papers' definitions.


@pytest.mark.parametrize("normalize", [True, False])
def test_reference_agrees_with_plain_softmax_topk(normalize):
    logits, _, _ = make(50, 7, torch.float64)
    w, i = plain_topk_softmax(logits, 3, normalize)
    r = topk_gating_reference(logits, 3, normalize=normalize)
    assert torch.equal(r["indices"], i)
    torch.testing.assert_close(r["weights"], w)


def test_reference_losses_match_definitions():
    logits, _, _ = make(40, 6, torch.float64, seed=1)
    t, e, k = 40, 6, 2
    r = topk_gating_reference(logits, k)
    p = torch.softmax(logits, 1)
    counts = torch.bincount(r["indices"].reshape(-1), minlength=e).double()
    torch.testing.assert_close(r["load_balancing_loss"], e * (counts / (t * k) * p.mean(0)).sum())
    imp = torch.zeros(e, dtype=torch.float64).index_add_(0, r["indices"].reshape(-1), r["weights"].reshape(-1))
    torch.testing.assert_close(r["importance_loss"], imp.var(unbiased=False) / (imp.mean() ** 2 + 1e-10))
    torch.testing.assert_close(r["load_loss"], counts.var(unbiased=False) / (counts.mean() ** 2 + 1e-10))
    torch.testing.assert_close(r["z_loss"], (torch.logsumexp(logits, 1) ** 2).mean())
    # Perfect balance: uniform logits on a round-robin choice gives exactly 1.
    uniform = torch.zeros(8, 4, dtype=torch.float64)
    assert float(topk_gating_reference(uniform, 4)["load_balancing_loss"]) == pytest.approx(1.0)


def test_reference_smooth_load_matches_shazeer():
    logits, noise, noise_logits = make(30, 5, torch.float64, seed=2, noisy=True)
    k = 2
    r = topk_gating_reference(logits, k, noise, noise_logits)
    std = torch.nn.functional.softplus(noise_logits) + 1e-2
    noisy = logits + noise * std
    top = noisy.topk(k + 1, dim=1).values
    is_in = noisy > top[:, k : k + 1]
    thr = torch.where(is_in, top[:, k : k + 1], top[:, k - 1 : k])
    normal = torch.distributions.Normal(0.0, 1.0)
    expected = normal.cdf((logits - thr) / std).sum(0)
    torch.testing.assert_close(r["load"], expected)


@pytest.mark.parametrize("noisy", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("tek", [(7, 5, 2), (6, 4, 4), (5, 3, 1)], ids=lambda s: "x".join(map(str, s)))
def test_reference_backward_formula_equals_autograd(noisy, normalize, tek):
    t, e, k = tek
    logits, noise, noise_logits = make(t, e, torch.float64, seed=3, noisy=noisy)
    leaves = [logits.clone().requires_grad_(True)] + ([noise_logits.clone().requires_grad_(True)] if noisy else [])
    r = topk_gating_reference(leaves[0], k, noise, leaves[1] if noisy else None, normalize)
    gw = torch.randn(t, k, dtype=torch.float64)
    gl = torch.randn(4, dtype=torch.float64)
    obj = (r["weights"] * gw).sum() + sum(gl[i] * r[name] for i, name in enumerate(LOSSES))
    expected = torch.autograd.grad(obj, leaves)
    w, i, c, _, rl, st, nx = gating_forward_reference(logits, noise, noise_logits, k, normalize)
    dl, dn = gating_backward_reference(gw, gl, logits, noise, noise_logits, w, i, c, rl, st, nx, k, normalize)
    torch.testing.assert_close(dl, expected[0], rtol=1e-10, atol=1e-12)
    if noisy:
        torch.testing.assert_close(dn, expected[1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("which", ["weights", *LOSSES])
def test_gradcheck_each_output_alone_reference(which):
    logits, noise, noise_logits = make(6, 5, torch.float64, seed=4, noisy=True)
    leaves = (logits.clone().requires_grad_(True), noise_logits.clone().requires_grad_(True))

    def fn(lg, nl):
        out = topk_gating_reference(lg, 2, noise, nl)[which]
        return out

    assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("which", ["weights", *LOSSES])
def test_gradcheck_public_op_each_output_alone(which):
    """Through the registered op (C++ kernel in float64 on CPU): each loss's gradient on its own."""
    logits, _, noise_logits = make(6, 5, torch.float64, seed=5, noisy=True)
    leaves = (logits.clone().requires_grad_(True), noise_logits.clone().requires_grad_(True))

    def fn(lg, nl):
        out = topk_gating(lg, 2, noise_logits=nl, training=True, generator=torch.Generator().manual_seed(0))
        return getattr(out, which)

    assert torch.autograd.gradcheck(fn, leaves)


# ---------------------------------------------------------------------------------------------
# Kernels against the reference: the whole contract and the gradients.


GATING_CASES = [(1, 1, 1), (5, 3, 1), (37, 8, 2), (19, 6, 6), (64, 64, 8), (33, 13, 4)]


def _contract(backend, logits, noise, noise_logits, k, normalize):
    """The registered op's whole result on ``backend`` (run on its device), on the CPU."""
    with use_backend(backend):
        out = GATING(*on(backend_device(backend), logits, noise, noise_logits), k, normalize)
    return tuple(t.cpu() for t in out)


def _generator(device, seed):
    """A generator on ``device``: the noise is drawn on the logits' device, so runs compared with each
    other share the device (CPU and CUDA generators give different streams for the same seed)."""
    return torch.Generator(device=device).manual_seed(seed)


def _compare_contract(got, expected, rtol, atol):
    names = ("weights", "indices", "counts", "losses", "row_lse", "stats", "next_index")
    for name, g, e in zip(names, got, expected):
        assert g.shape == e.shape and g.dtype == e.dtype, (name, g.shape, e.shape, g.dtype, e.dtype)
        if g.dtype in (torch.int64,):
            assert torch.equal(g, e), name
        else:
            torch.testing.assert_close(g, e, rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("backend", ["cpu"])
@pytest.mark.parametrize("case", GATING_CASES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("noisy", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_cpu_gating_contract_matches_reference(backend, case, noisy, normalize):
    require_backend("topk_gating", backend)
    t, e, k = case
    logits, noise, noise_logits = make(t, e, noisy=noisy, seed=t + e)
    got = _contract(backend, logits, noise, noise_logits, k, normalize)
    expected = gating_forward_reference(logits, noise, noise_logits, k, normalize)
    _compare_contract(got, expected, 1e-4, 1e-5)


@pytest.mark.triton
@pytest.mark.parametrize("case", [(5, 3, 1), (9, 8, 2), (6, 4, 4)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("noisy", [False, True])
def test_triton_gating_contract_matches_reference(case, noisy):
    require_backend("topk_gating", "triton")
    t, e, k = case
    logits, noise, noise_logits = make(t, e, noisy=noisy, seed=t)
    got = _contract("triton", logits, noise, noise_logits, k, True)
    expected = gating_forward_reference(logits, noise, noise_logits, k, True)
    _compare_contract(got, expected, 1e-4, 1e-5)


def _grads(backend, logits, noise_logits, k, normalize, seed=0, device="cpu"):
    """Gradients (of the CPU leaves) of a random combination of every output, the op run on ``device``."""
    leaves = [logits.clone().requires_grad_(True)]
    if noise_logits is not None:
        leaves.append(noise_logits.clone().requires_grad_(True))
    gen = torch.Generator().manual_seed(seed)
    with use_backend(backend):
        lg, nl = on(device, leaves[0], leaves[1] if noise_logits is not None else None)
        out = topk_gating(lg, k, noise_logits=nl, normalize=normalize, training=True, generator=_generator(device, 7))
        gw = torch.randn(out.weights.shape, generator=gen, dtype=torch.float64).to(device, logits.dtype)
        obj = (out.weights * gw).sum() + sum(
            float(c) * getattr(out, n) for c, n in zip(torch.randn(4, generator=gen), LOSSES)
        )
        obj.backward()
    return out, [x.grad for x in leaves]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("noisy", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_kernel_gradients_match_reference(backend, noisy, normalize):
    dev = require_backend("topk_gating", backend)
    shape = (37, 8, 2) if backend == "cpu" else (9, 6, 2)
    t, e, k = shape
    logits, _, noise_logits = make(t, e, noisy=noisy, seed=11)
    _, expected = _grads("reference", logits, noise_logits, k, normalize, device=dev)
    _, got = _grads(backend, logits, noise_logits, k, normalize, device=dev)
    for g, x in zip(got, expected):
        torch.testing.assert_close(g, x, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("which", ["weights", *LOSSES])
def test_kernel_gradient_of_each_loss_alone(backend, which):
    dev = require_backend("topk_gating", backend)
    logits, _, noise_logits = make(13, 6, noisy=True, seed=12)
    res = {}
    for b in ("reference", backend):
        leaves = (logits.clone().requires_grad_(True), noise_logits.clone().requires_grad_(True))
        with use_backend(b):
            lg, nl = on(dev, *leaves)
            out = topk_gating(lg, 3, noise_logits=nl, training=True, generator=_generator(dev, 3))
            v = getattr(out, which)
            (v * torch.linspace(0.5, 1.5, v.numel(), device=dev).reshape(v.shape)).sum().backward()
        res[b] = [x.grad for x in leaves]
    for g, x in zip(res[backend], res["reference"]):
        torch.testing.assert_close(g, x, rtol=1e-4, atol=1e-6)


def test_cpu_kernel_float64_gradcheck_and_capabilities():
    """float64 goes through the C++ kernel: exact enough to gradcheck the kernel's own backward."""
    require_backend("topk_gating", "cpu", torch.float64)
    logits, _, noise_logits = make(9, 7, torch.float64, seed=13, noisy=True)
    leaves = (logits.clone().requires_grad_(True), noise_logits.clone().requires_grad_(True))

    def fn(lg, nl):
        out = topk_gating(
            lg, 3, noise_logits=nl, normalize=False, training=True, generator=torch.Generator().manual_seed(1)
        )
        return (out.weights, *(getattr(out, n) for n in LOSSES))

    with use_backend("cpu"):
        assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("capability", CPU_CAPABILITIES)
def test_cpu_kernel_every_capability_copy(capability):
    """Every compiled copy (default / AVX2 / AVX512) that this CPU can execute gives the reference's result."""
    script = textwrap.dedent(
        """
        import torch
        from ovseg_fast.ops import use_backend
        from ovseg_fast.ops.moe import topk_gating, moe_dispatch, moe_combine
        g = torch.Generator().manual_seed(0)
        logits = torch.randn(300, 8, generator=g); nl = torch.randn(300, 8, generator=g)
        x = torch.randn(300, 33, generator=g)
        res = {}
        for b in ("cpu", "reference"):
            with use_backend(b):
                o = topk_gating(logits, 2, noise_logits=nl, training=True, generator=torch.Generator().manual_seed(1))
                xs, off, order = moe_dispatch(x, o.indices, 8)
                y = moe_combine(xs * 2, o.weights, order, 300)
                res[b] = (o.weights, torch.stack([o.load_balancing_loss, o.importance_loss, o.load_loss, o.z_loss]), y)
        for a, b in zip(res["cpu"], res["reference"]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        """
    )
    run_under_capability("topk_gating", capability, script)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_reduced_precision_within_reference_error(dtype):
    require_backend("topk_gating", "cpu", dtype)
    logits64, _, _ = make(200, 8, torch.float64, seed=14)
    logits = logits64.to(dtype)
    exact = topk_gating_reference(logits.double(), 2)  # the same (rounded) inputs, exact maths
    with use_backend("reference"):
        base = topk_gating(logits, 2)
    with use_backend("cpu"):
        got = topk_gating(logits, 2)
    assert torch.equal(got.indices, exact["indices"])
    assert_within_reference_error(got.weights, exact["weights"], base.weights, factor=2.0, atol=1e-3, what="weights")
    for name in LOSSES:
        assert_within_reference_error(
            getattr(got, name), exact[name], getattr(base, name), factor=2.0, atol=1e-5, what=name
        )


@pytest.mark.triton
def test_triton_bf16_within_reference_error():
    """flash-attention's rule (a bare bfloat16 tolerance of 2e-2 on weights near 0.5 checks little)."""
    dev = require_backend("topk_gating", "triton", torch.bfloat16)
    logits, _, _ = make(16, 8, torch.bfloat16, seed=15)
    exact = topk_gating_reference(logits.double(), 2)  # the same (rounded) inputs, exact maths
    with use_backend("reference"):
        ref = topk_gating(logits, 2)
    with use_backend("triton"):
        got = topk_gating(logits.to(dev), 2)
    assert torch.equal(got.indices.cpu(), exact["indices"])
    assert_within_reference_error(got.weights.cpu(), exact["weights"], ref.weights, factor=2.0, atol=1e-3)
    for name in LOSSES:
        assert_within_reference_error(
            getattr(got, name).cpu(), exact[name], getattr(ref, name), factor=2.0, atol=1e-5, what=name
        )


# ---------------------------------------------------------------------------------------------
# Semantics: ties, k = E, noise, training flag, empty batches, extremes.


@pytest.mark.parametrize("backend", ["reference", *KERNEL_BACKENDS])
def test_ties_go_to_the_lower_expert_index(backend):
    dev = require_backend("topk_gating", backend)
    logits = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0, 2.0], [0.0, 0.0, 5.0, 0.0, 5.0]], device=dev)
    with use_backend(backend):
        out = topk_gating(logits, 2)
    assert out.indices.tolist() == [[1, 2], [0, 1], [2, 4]]
    torch.testing.assert_close(out.weights.cpu(), torch.full((3, 2), 0.5))
    with use_backend(backend):
        nxt = GATING(logits, None, None, 2, True)[6]
    assert nxt.tolist() == [3, 2, 0]


@pytest.mark.parametrize("backend", ["reference", *KERNEL_BACKENDS])
def test_k_equals_num_experts(backend):
    dev = require_backend("topk_gating", backend)
    logits, _, noise_logits = on(dev, *make(10, 4, seed=16, noisy=True))
    with use_backend(backend):
        out = topk_gating(logits, 4, noise_logits=noise_logits, training=True, generator=_generator(dev, 0))
    assert sorted(out.indices[0].tolist()) == [0, 1, 2, 3]
    assert out.expert_counts.tolist() == [10] * 4
    torch.testing.assert_close(out.weights.sum(1).cpu(), torch.ones(10))
    torch.testing.assert_close(out.load_balancing_loss.cpu(), torch.tensor(1.0))
    assert float(out.load_loss) == 0.0


@pytest.mark.parametrize("backend", ["reference", *KERNEL_BACKENDS])
def test_noise_off_in_eval_and_reproducible_in_training(backend):
    dev = require_backend("topk_gating", backend)
    logits, _, noise_logits = on(dev, *make(12, 6, seed=17, noisy=True))
    noise_logits = noise_logits + 3  # big noise: training picks differ from eval
    with use_backend(backend):
        clean = topk_gating(logits, 2)
        ev = topk_gating(logits, 2, noise_logits=noise_logits, training=False)
        with torch.no_grad():  # training=None follows grad mode: off here
            ev2 = topk_gating(logits, 2, noise_logits=noise_logits)
        tr1 = topk_gating(logits, 2, noise_logits=noise_logits, training=True, generator=_generator(dev, 5))
        tr2 = topk_gating(logits, 2, noise_logits=noise_logits, training=True, generator=_generator(dev, 5))
    for o in (ev, ev2):
        assert torch.equal(o.indices, clean.indices) and torch.equal(o.weights, clean.weights)
        torch.testing.assert_close(o.load_loss, clean.load_loss)
    assert torch.equal(tr1.indices, tr2.indices) and torch.equal(tr1.weights, tr2.weights)
    assert not torch.equal(tr1.indices, clean.indices)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_all_backends_agree_for_the_same_generator_state(backend):
    """The noise comes from the generator, not the backend: reference, C++ and Triton (one kernel per
    case, each against the reference) pick the same experts. The comparison is on the kernel's device
    (Triton's is the GPU when there is one, whose generator gives another stream for the same seed)."""
    dev = require_backend("topk_gating", backend)
    logits, _, noise_logits = make(20, 8, seed=18, noisy=True)

    def run(name):
        with use_backend(name):
            lg, nl = on(dev, logits, noise_logits)
            out = topk_gating(lg, 2, noise_logits=nl, training=True, generator=_generator(dev, 9))
        return out.indices.cpu(), out.weights.cpu(), out.load_loss.cpu()

    ref, got = run("reference"), run(backend)
    assert torch.equal(got[0], ref[0])
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[2], ref[2])


@pytest.mark.parametrize("backend", ["reference", *KERNEL_BACKENDS])
def test_empty_batch(backend):
    dev = require_backend("topk_gating", backend)
    logits = torch.zeros(0, 5, requires_grad=True)
    nl = torch.zeros(0, 5, requires_grad=True)
    with use_backend(backend):
        out = topk_gating(*on(dev, logits), 2, noise_logits=nl.to(dev), training=True)
        assert out.weights.shape == (0, 2) and out.indices.shape == (0, 2)
        assert out.expert_counts.tolist() == [0] * 5
        total = out.weights.sum() + sum(getattr(out, n) for n in LOSSES)
        assert float(total.detach()) == 0.0
        total.backward()
        assert logits.grad.shape == (0, 5)
        x = torch.zeros(0, 3, requires_grad=True)
        xs, off, order = moe_dispatch(x.to(dev), out.indices, 5)
        assert xs.shape == (0, 3) and off.tolist() == [0] * 6 and order.shape == (0,)
        y = moe_combine(xs, out.weights.detach(), order, 0)
        assert y.shape == (0, 3)
        y.sum().backward()
        assert x.grad.shape == (0, 3)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_extreme_logits_stay_finite(backend):
    require_backend("topk_gating", backend)
    logits = torch.tensor([[1e4, -1e4, 0.0, 3e4], [-3e4, -3e4, -3e4, -3e4]], requires_grad=True)
    nl = torch.tensor([[-1e3, 1e3, 0.0, 50.0], [1e3, -1e3, 0.0, 0.0]], requires_grad=True)
    with use_backend(backend):
        out = topk_gating(logits, 2, noise_logits=nl, training=True, generator=torch.Generator().manual_seed(0))
        vals = torch.stack([getattr(out, n) for n in LOSSES])
        assert torch.isfinite(out.weights).all() and torch.isfinite(vals).all()
        (out.weights.sum() + vals.sum()).backward()
    assert torch.isfinite(logits.grad).all() and torch.isfinite(nl.grad).all()


# ---------------------------------------------------------------------------------------------
# Dispatch and combine


DISPATCH_CASES = [(1, 1, 1, 1), (10, 4, 2, 3), (33, 8, 3, 17), (64, 64, 8, 5), (16, 4, 1, 768)]


def _dispatch_inputs(t, e, k, d, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(t, d, generator=gen).to(dtype)
    idx = torch.rand(t, e, generator=gen).argsort(1)[:, :k]
    w = torch.rand(t, k, generator=gen)
    return x, idx, w


# The interpreter runs Triton on the small cases only (the RPN-sized D=768 one is for the CPU).
DISPATCH_RUNS = [
    pytest.param(backend, case, id=f"{'x'.join(map(str, case))}-{backend}", marks=marks)
    for backend, marks in (("reference", ()), ("cpu", ()), ("triton", pytest.mark.triton))
    for case in DISPATCH_CASES
    if backend != "triton" or case[0] * case[3] <= 4096
]


@pytest.mark.parametrize(("backend", "case"), DISPATCH_RUNS)
def test_dispatch_matches_argsort_and_combine_matches_index_add(backend, case):
    dev = require_backend("moe_dispatch", backend)
    t, e, k, d = case
    x, idx, w = _dispatch_inputs(t, e, k, d)
    with use_backend(backend):
        xs, off, order = moe_dispatch(*on(dev, x, idx), e)
        y = moe_combine(xs * 3, w.to(dev), order, t)
    xs, off, order, y = (r.cpu() for r in (xs, off, order, y))
    xs_ref, off_ref, order_ref = argsort_dispatch(x, idx, e)
    assert torch.equal(order, order_ref) and torch.equal(off, off_ref)
    assert torch.equal(xs, xs_ref)
    torch.testing.assert_close(y, index_add_combine(xs_ref * 3, w, order_ref, t), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_dispatch_and_combine_stream_their_outputs_exactly(dtype):
    """Outputs beyond the C++ kernel's streaming threshold (16 MiB) take non-temporal stores; rows of
    4400 bytes start at every alignment, so each store width and the plain copy are exercised."""
    require_backend("moe_dispatch", "cpu", dtype)
    t, e, k, d = 4096 if dtype == torch.float32 else 8192, 8, 2, 1100
    x, idx, w = _dispatch_inputs(t, e, k, d, seed=3)
    x = x.to(dtype)
    with use_backend("cpu"):
        xs, off, order = moe_dispatch(x, idx, e)
        y = moe_combine(xs, w, order, t)
    xs_ref, off_ref, order_ref = argsort_dispatch(x, idx, e)
    assert torch.equal(order, order_ref) and torch.equal(off, off_ref)
    assert torch.equal(xs, xs_ref)
    expected = index_add_combine(xs_ref.float(), w, order_ref, t).to(dtype)
    torch.testing.assert_close(y, expected, **({} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}))


@pytest.mark.parametrize("backend", ["reference", *KERNEL_BACKENDS])
def test_dispatch_then_combine_with_identity_experts_gives_k_x(backend):
    dev = require_backend("moe_dispatch", backend)
    t, e, k, d = 11, 5, 3, 6
    x, idx, _ = _dispatch_inputs(t, e, k, d, seed=1)
    with use_backend(backend):
        xs, off, order = moe_dispatch(*on(dev, x, idx), e)
        out = moe_combine(xs, torch.ones(t, k, device=dev), order, t)
    out, off, order = out.cpu(), off.cpu(), order.cpu()
    torch.testing.assert_close(out, k * x)
    # Groups are contiguous, stable in token order, and sized by the counts.
    for ex in range(e):
        rows = order[off[ex] : off[ex + 1]]
        assert torch.equal(idx.reshape(-1)[rows], torch.full_like(rows, ex))
        assert torch.equal(rows, rows.sort().values)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dispatch_combine_gradients_match_reference(backend, dtype):
    dev = require_backend("moe_combine", backend, dtype)
    require_backend("moe_dispatch", backend, dtype)
    t, e, k, d = 9, 4, 2, 7
    x0, idx, w0 = _dispatch_inputs(t, e, k, d, dtype=dtype, seed=2)
    gen = torch.Generator().manual_seed(3)
    scale = torch.randn(t * k, d, generator=gen).to(dtype)
    grad = torch.randn(t, d, generator=gen).to(dtype)
    res = {}
    for b in ("reference", backend):
        x = x0.clone().requires_grad_(True)
        w = w0.clone().requires_grad_(True)
        with use_backend(b):
            xs, _, order = moe_dispatch(*on(dev, x, idx), e)
            out = moe_combine(xs * scale.to(dev), w.to(dev), order, t)
            out.backward(grad.to(dev))
        res[b] = (out.detach().cpu(), x.grad, w.grad)
    tol = tolerances(dtype)
    for a, r in zip(res[backend], res["reference"]):
        torch.testing.assert_close(a, r, **tol)


@pytest.mark.cuda
def test_cuda_triton_kernels_forward_and_backward():
    """On a GPU machine: topk_gating, moe_dispatch and moe_combine take the compiled Triton kernels for
    CUDA tensors (RPN-like sizes); values and gradients equal the reference's on the same device (the
    same generator, so the same noise)."""
    dev = torch.device("cuda")
    for op in ("topk_gating", "moe_dispatch", "moe_combine"):
        assert select_backend(op, dev, torch.float32) == "triton", op
    t, e, k, d = 4096, 8, 2, 256
    logits, _, noise_logits = make(t, e, seed=40, noisy=True)
    x, _, _ = _dispatch_inputs(t, e, k, d, seed=41)
    grad = torch.randn(t, d, generator=torch.Generator().manual_seed(42))

    def run(backend):
        leaves = [a.clone().requires_grad_(True) for a in (logits, noise_logits, x)]
        lg, nl, xd = on(dev, *leaves)
        with use_backend(backend):
            g = topk_gating(lg, k, noise_logits=nl, training=True, generator=_generator(dev, 3))
            xs, off, order = moe_dispatch(xd, g.indices, e)
            y = moe_combine(xs * 2, g.weights, order, t)
            ((y * grad.to(dev)).sum() + sum(getattr(g, n) for n in LOSSES)).backward()
        values = [g.weights, *(getattr(g, n) for n in LOSSES), xs, y]
        return [g.indices.cpu(), off.cpu(), order.cpu()], [v.detach().cpu() for v in values], [a.grad for a in leaves]

    ref_idx, ref_vals, ref_grads = run("reference")
    idx, vals, grads = run("auto")
    for a, b in zip(idx, ref_idx):
        assert torch.equal(a, b)
    for a, b in zip(vals + grads, ref_vals + ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_dispatch_combine_gradcheck_float64():
    x, idx, w = _dispatch_inputs(6, 3, 2, 4, dtype=torch.float64, seed=4)
    x.requires_grad_(True)
    w = w.double().requires_grad_(True)
    for b in ("reference", "cpu"):
        require_backend("moe_dispatch", b, torch.float64)
        with use_backend(b):

            def fn(x, w):
                xs, _, order = moe_dispatch(x, idx, 3)
                return moe_combine(xs * xs, w, order, 6)

            assert torch.autograd.gradcheck(fn, (x, w))


def test_dispatch_accepts_feature_maps_int32_indices_and_non_contiguous():
    x = torch.randn(2, 5, 3, 4).transpose(0, 1)  # (5, 2, 3, 4), non-contiguous
    idx = torch.tensor([[0, 2], [1, 0], [2, 1], [0, 1], [2, 0]], dtype=torch.int32)
    xs, _, order = moe_dispatch(x, idx, 3)
    assert xs.shape == (10, 2, 3, 4)
    y = moe_combine(xs, torch.ones(5, 2).t().contiguous().t(), order, 5)
    torch.testing.assert_close(y, 2 * x)


# ---------------------------------------------------------------------------------------------
# Registration: opcheck, torch.compile, FLOP counter


def test_opcheck_every_custom_op():
    logits, noise, noise_logits = make(9, 5, noisy=True, seed=20)
    for args in (
        (logits, None, None, 2, True),
        (logits, noise, noise_logits, 2, False),
        (logits, noise, noise_logits, 5, True),
    ):
        a = [
            x.clone().requires_grad_(True)
            if isinstance(x, torch.Tensor) and x.dtype.is_floating_point and x is not args[1]
            else x
            for x in args
        ]
        torch.library.opcheck(GATING, tuple(a))
    out = GATING(logits, noise, noise_logits, 2, True)
    torch.library.opcheck(
        torch.ops.ovseg_fast.topk_gating_backward,
        (
            torch.randn(9, 2),
            torch.randn(4),
            logits,
            noise,
            noise_logits,
            out[0],
            out[1],
            out[2],
            out[4],
            out[5],
            out[6],
            2,
            True,
        ),
    )
    x, idx, w = _dispatch_inputs(8, 4, 2, 5)
    torch.library.opcheck(torch.ops.ovseg_fast.moe_dispatch, (x.requires_grad_(True), idx, 4))
    xs, _, order, inv = torch.ops.ovseg_fast.moe_dispatch(x.detach(), idx, 4)
    torch.library.opcheck(torch.ops.ovseg_fast.moe_dispatch_backward, (torch.randn(16, 5), inv, 8, 2))
    torch.library.opcheck(
        torch.ops.ovseg_fast.moe_combine, (xs.clone().requires_grad_(True), w.requires_grad_(True), order)
    )
    torch.library.opcheck(torch.ops.ovseg_fast.moe_combine_backward, (torch.randn(8, 5), xs, w.detach(), order, inv))


def _moe_module(noisy=True):
    torch.manual_seed(0)
    experts = [nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 6)) for _ in range(4)]
    return MixtureOfExperts(experts, in_dim=6, k=2, noisy=noisy)


def test_module_matches_dense_computation_and_repr():
    moe = _moe_module().eval()
    x = torch.randn(10, 6)
    out, gating = moe(x)
    assert isinstance(gating, GatingOutput)
    expected = torch.zeros_like(x)
    for t in range(10):
        for j in range(2):
            expected[t] += gating.weights[t, j] * moe.experts[int(gating.indices[t, j])](x[t : t + 1])[0]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert "num_experts=4, k=2, noisy=True" in repr(moe)


def test_module_torch_compile_fullgraph_forward_and_backward():
    moe = _moe_module().train()
    x = torch.randn(12, 6)
    eager_moe = _moe_module().train()
    eager_moe.load_state_dict(moe.state_dict())

    def loss_fn(m, x):
        out, g = m(x)
        return out.square().mean() + 0.01 * (g.load_balancing_loss + g.importance_loss + g.load_loss + g.z_loss)

    # fallback_random: the compiled graph draws the gating noise with eager's RNG, so with the same seed
    # compiled and eager training steps see the same noise and must give the same loss and gradients.
    with torch._dynamo.config.patch(capture_scalar_outputs=True), torch._inductor.config.patch(fallback_random=True):
        compiled = torch.compile(lambda x: loss_fn(moe, x), fullgraph=True)
        torch.manual_seed(5)
        loss = compiled(x)
    loss.backward()
    torch.manual_seed(5)
    eager_loss = loss_fn(eager_moe, x)
    eager_loss.backward()
    torch.testing.assert_close(loss, eager_loss)
    for (name, p), p_eager in zip(moe.named_parameters(), eager_moe.parameters()):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, p_eager.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert moe.noise_gate.weight.grad.abs().sum() > 0  # the load loss reaches the noise gate
    # In eval (no randomness) compiled and eager agree exactly in value.
    moe.eval()
    eager_moe.eval()
    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        c = torch.compile(lambda x: moe(x)[0], fullgraph=True)(x)
    torch.testing.assert_close(c, eager_moe(x)[0])


def test_flop_counter():
    logits, _, _ = make(32, 8, seed=21)
    leaf = logits.clone().requires_grad_(True)
    with FlopCounterMode(display=False) as fc:
        out = topk_gating(leaf, 2)
        out.weights.sum().backward()
    counts = fc.get_flop_counts()["Global"]
    assert counts[torch.ops.ovseg_fast.topk_gating] == topk_gating_flops(32, 8, 2)
    assert counts[torch.ops.ovseg_fast.topk_gating_backward] == topk_gating_flops(32, 8, 2, backward=True)
    x, idx, w = _dispatch_inputs(10, 4, 2, 6)
    with FlopCounterMode(display=False) as fc:
        xs, _, order = moe_dispatch(x, idx, 4)
        moe_combine(xs, w.requires_grad_(True), order, 10).sum().backward()
    counts = fc.get_flop_counts()["Global"]
    assert counts[torch.ops.ovseg_fast.moe_combine] == moe_combine_flops(10, 2, 6)
    assert counts[torch.ops.ovseg_fast.moe_combine_backward] == moe_combine_flops(10, 2, 6, backward=True)


class _PassThroughMode(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def test_eager_fast_path_matches_the_registered_ops():
    """Plain eager CPU calls go straight to the C++ kernels (``backends.direct_cpu``); under a dispatch
    mode the registered ops run. Same values and gradients either way."""
    require_backend("topk_gating", "cpu")
    logits, _, noise_logits = make(24, 6, seed=31, noisy=True)
    x, idx, w = _dispatch_inputs(24, 6, 2, 5)
    runs = []
    for mode in (contextlib.nullcontext, _PassThroughMode):
        leaves = [t.clone().requires_grad_(True) for t in (logits, noise_logits, x, w)]
        with mode():
            g = topk_gating(
                leaves[0], 2, noise_logits=leaves[1], training=True, generator=torch.Generator().manual_seed(2)
            )
            xs, _, order = moe_dispatch(leaves[2], idx, 6)
            y = moe_combine(xs * 2, leaves[3], order, 24)
            total = (g.weights * 3).sum() + sum(getattr(g, n) for n in LOSSES) + (y * y).sum()
            total.backward()
        runs.append([g.weights, g.indices, *(getattr(g, n) for n in LOSSES), y, *(t.grad for t in leaves)])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# Bad inputs: clear errors naming the argument, never a crash.


BAD_GATING = [
    (lambda: topk_gating([[1.0]], 1), TypeError, "logits must be a torch.Tensor"),
    (lambda: topk_gating(torch.ones(3, 4, dtype=torch.int64), 1), TypeError, "logits must have dtype"),
    (lambda: topk_gating(torch.ones(3), 1), ValueError, "logits must have 2 dimensions"),
    (lambda: topk_gating(torch.ones(3, 0), 1), ValueError, "at least one expert"),
    (lambda: topk_gating(torch.ones(3, 4), 0), ValueError, "k must be >= 1"),
    (lambda: topk_gating(torch.ones(3, 4), 5), ValueError, "k must be <= the number of experts"),
    (lambda: topk_gating(torch.ones(3, 4), 1.5), TypeError, "k must be an int"),
    (
        lambda: topk_gating(torch.ones(3, 4), 1, noise_logits=torch.ones(3, 5)),
        ValueError,
        "noise_logits must have shape",
    ),
    (
        lambda: topk_gating(torch.ones(3, 4), 1, noise_logits=torch.ones(3, 4, dtype=torch.float64)),
        TypeError,
        "noise_logits must have dtype",
    ),
    (lambda: topk_gating(torch.ones(3, 4), 1, normalize=1), TypeError, "normalize must be a bool"),
    (lambda: topk_gating(torch.ones(3, 4), 1, training="yes"), TypeError, "training must be a bool"),
    (lambda: topk_gating(torch.ones(3, 4), 1, generator=3), TypeError, "generator must be a torch.Generator"),
]


@pytest.mark.parametrize("i", range(len(BAD_GATING)))
def test_bad_gating_inputs(i):
    fn, exc, match = BAD_GATING[i]
    with pytest.raises(exc, match=match):
        fn()


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_non_finite_logits_rejected(backend):
    require_backend("topk_gating", backend)
    for bad in (float("nan"), float("inf")):
        logits = torch.zeros(300, 4)
        logits[257, 1] = bad
        with use_backend(backend), pytest.raises(ValueError, match="must be finite"):
            topk_gating(logits, 2)
    with use_backend(backend), pytest.raises(ValueError, match="must be finite"):
        nl = torch.zeros(3, 4)
        nl[1, 1] = float("nan")
        topk_gating(torch.zeros(3, 4), 2, noise_logits=nl, training=True)


BAD_DISPATCH = [
    (
        lambda: moe_dispatch(torch.ones(3, 2), torch.zeros(3, 1, dtype=torch.float32), 2),
        TypeError,
        "indices must have an integer dtype",
    ),
    (lambda: moe_dispatch(torch.ones(3, 2), torch.zeros(3), 2), TypeError, "indices must have an integer dtype"),
    (
        lambda: moe_dispatch(torch.ones(3, 2), torch.zeros(3, dtype=torch.int64), 2),
        ValueError,
        "indices must have 2 dimensions",
    ),
    (
        lambda: moe_dispatch(torch.ones(3, 2), torch.zeros(4, 1, dtype=torch.int64), 2),
        ValueError,
        "indices must have shape",
    ),
    (
        lambda: moe_dispatch(torch.ones(3, 2), torch.zeros(3, 1, dtype=torch.int64), 0),
        ValueError,
        "num_experts must be >= 1",
    ),
    (
        lambda: moe_dispatch(torch.ones(3, 2, dtype=torch.int32), torch.zeros(3, 1, dtype=torch.int64), 2),
        TypeError,
        "x must have dtype",
    ),
    (
        lambda: moe_dispatch(torch.tensor(1.0), torch.zeros(3, 1, dtype=torch.int64), 2),
        ValueError,
        "x must have at least 1",
    ),
    (
        lambda: moe_combine(torch.ones(4, 2), torch.ones(2, 2), torch.arange(4), 3),
        ValueError,
        "weights must have shape",
    ),
    (lambda: moe_combine(torch.ones(5, 2), torch.ones(2, 2), torch.arange(4), 2), ValueError, "y_sorted must have T"),
    (lambda: moe_combine(torch.ones(4, 2), torch.ones(2, 2), torch.arange(5), 2), ValueError, "order must have shape"),
    (
        lambda: moe_combine(torch.ones(4, 2), torch.ones(2, 2), torch.arange(4.0), 2),
        TypeError,
        "order must have an integer",
    ),
    (lambda: moe_combine(torch.ones(4, 2), torch.ones(4), torch.arange(4), 2), ValueError, "weights must have 2"),
    (lambda: moe_combine(torch.ones(4, 2), torch.ones(2, 2), torch.arange(4), -1), ValueError, "T must be >= 0"),
    (lambda: MixtureOfExperts([], 4, 1), TypeError, "non-empty sequence"),
    (lambda: MixtureOfExperts([nn.Identity()], 4, 2), ValueError, "k must be <="),
    (lambda: MixtureOfExperts([nn.Identity()], 4, 1)(torch.ones(3, 5)), ValueError, r"x must have shape \(\.\.\., 4\)"),
]


@pytest.mark.parametrize("i", range(len(BAD_DISPATCH)))
def test_bad_dispatch_combine_inputs(i):
    fn, exc, match = BAD_DISPATCH[i]
    with pytest.raises(exc, match=match):
        fn()


@pytest.mark.parametrize("backend", ["reference", *KERNEL_BACKENDS])
def test_bad_index_values_rejected(backend):
    dev = require_backend("moe_dispatch", backend)
    x = torch.ones(4, 2, device=dev)
    y, w = torch.ones(4, 2, device=dev), torch.ones(2, 2, device=dev)
    with use_backend(backend):
        with pytest.raises(ValueError, match=r"indices must lie in \[0, 3\)"):
            moe_dispatch(x, torch.tensor([[0], [3], [1], [2]], device=dev), 3)
        with pytest.raises(ValueError, match=r"indices must lie in \[0, 3\)"):
            moe_dispatch(x, torch.tensor([[0], [-1], [1], [2]], device=dev), 3)
        with pytest.raises(ValueError, match="order must be a permutation"):
            moe_combine(y, w, torch.tensor([0, 1, 4, 2], device=dev), 2)
        with pytest.raises(ValueError, match="order must be a permutation"):
            moe_combine(y, w, torch.tensor([0, 1, 1, 2], device=dev), 2)
