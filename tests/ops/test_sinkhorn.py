"""Tests of ovseg_fast.ops.sinkhorn: reference, C++ and Triton kernels, registration, inputs."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from ovseg_fast.ops import BackendError, Sinkhorn, sinkhorn, use_backend
from ovseg_fast.ops.sinkhorn import sinkhorn_flops
from ovseg_fast.ops.sinkhorn_reference import (
    default_marginals,
    sinkhorn_backward_reference,
    sinkhorn_forward_reference,
    sinkhorn_reference,
)
from tests.helpers import (
    CPU_CAPABILITIES,
    KERNEL_BACKENDS,
    assert_within_reference_error,
    backend_device,
    max_abs_err,
    on,
    require_backend,
    run_gloo_workers,
    run_under_capability,
    tolerances,
)

OP = torch.ops.ovseg_fast.sinkhorn


def swav_sinkhorn(scores: torch.Tensor, epsilon: float, n_iters: int) -> torch.Tensor:
    """SwAV's loop (Caron et al. 2020, ``distributed_sinkhorn`` without the all-reduces), for one problem."""
    q = torch.exp(scores / epsilon).t()
    q = q / q.sum()
    k, b = q.shape
    for _ in range(n_iters):
        q = q / q.sum(dim=1, keepdim=True) / k
        q = q / q.sum(dim=0, keepdim=True) / b
    return (q * b).t()


def canonical(scores, mask=None, rows=None, cols=None):
    b, n, k = scores.shape
    mask = torch.ones(b, n, dtype=torch.bool) if mask is None else mask
    ct = torch.float64 if scores.dtype == torch.float64 else torch.float32
    r0, c0 = default_marginals(mask, k, ct)
    return mask, (r0 if rows is None else rows.to(ct)), (c0 if cols is None else cols.to(ct))


def random_problem(b, n, k, dtype=torch.float32, masked=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(b, n, k, generator=gen, dtype=torch.float64).to(dtype)
    mask = None
    if masked:
        mask = torch.rand(b, n, generator=gen) > 0.3
        mask[0] = False  # an all-invalid problem
    return scores, mask


SHAPES = [(1, 1, 1), (2, 5, 3), (3, 37, 13), (2, 16, 64), (1, 64, 7)]


# ---------------------------------------------------------------------------------------------
# The reference is the spec: check it against SwAV's loop and POT first.


def test_reference_equals_swav_loop():
    scores = torch.randn(2, 40, 9, dtype=torch.float64)
    mask, rows, cols = canonical(scores)
    q = sinkhorn_reference(scores, mask, rows, cols, 0.1, 4)
    for b in range(2):
        torch.testing.assert_close(q[b], swav_sinkhorn(scores[b], 0.1, 4), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["reference", *KERNEL_BACKENDS])
def test_public_op_equals_swav_loop_on_every_backend(backend):
    dtype = torch.float32 if backend == "triton" else torch.float64  # Triton has no float64 kernel
    dev = require_backend("sinkhorn", backend, dtype)
    scores = torch.randn(40, 9, dtype=torch.float64)
    with use_backend(backend):
        q = sinkhorn(scores.to(dev, dtype), epsilon=0.1, n_iters=4).cpu()
    tol = {} if dtype == torch.float64 else dict(rtol=2e-4, atol=1e-6)
    torch.testing.assert_close(q, swav_sinkhorn(scores, 0.1, 4).to(dtype), **tol)


def test_converged_plan_matches_pot():
    import ot  # POT, a test dependency (the [test] extra)
    gen = torch.Generator().manual_seed(3)
    scores = torch.randn(2, 30, 8, generator=gen, dtype=torch.float64)
    rows = torch.rand(2, 30, generator=gen, dtype=torch.float64) + 0.1
    cols = torch.rand(2, 8, generator=gen, dtype=torch.float64) + 0.1
    cols = cols / cols.sum(1, keepdim=True) * rows.sum(1, keepdim=True)
    q = sinkhorn(scores, epsilon=0.5, n_iters=2000, row_marginals=rows, col_marginals=cols, tol=1e-12)
    for b in range(2):
        expected = ot.sinkhorn(
            rows[b].numpy(), cols[b].numpy(), -scores[b].numpy(), 0.5, numItermax=100000, stopThr=1e-13
        )
        np.testing.assert_allclose(q[b].numpy(), expected, rtol=1e-6, atol=1e-9)


def test_reference_backward_formula_equals_autograd():
    scores, mask = random_problem(3, 11, 6, torch.float64, masked=True)
    mask_t, rows, cols = canonical(scores, mask)
    leaf = scores.clone().requires_grad_(True)
    q = sinkhorn_reference(leaf, mask_t, rows, cols, 0.3, 5, tol=1e-3, check_every=2)
    grad = torch.randn_like(q)
    (expected,) = torch.autograd.grad(q, leaf, grad)
    _plan, log_u, log_v, n_done = sinkhorn_forward_reference(scores, mask_t, rows, cols, 0.3, 5, 1e-3, 2)
    got = sinkhorn_backward_reference(grad, scores, mask_t, rows, cols, log_u, log_v, n_done, 0.3)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_gradcheck_reference():
    scores, mask = random_problem(2, 6, 4, torch.float64, masked=True)
    mask_t, rows, cols = canonical(scores, mask)
    leaf = scores.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: sinkhorn_reference(s, mask_t, rows, cols, 0.5, 3), (leaf,))


# ---------------------------------------------------------------------------------------------
# Kernels against the reference: the whole contract (plan, duals, iteration counts, gradients).


def _contract(backend, scores, mask, rows, cols, eps, n_iters, tol=0.0, check_every=1):
    """The registered op's whole result on ``backend`` (run on its device), on the CPU."""
    with use_backend(backend):
        out = OP(*on(backend_device(backend), scores, mask, rows, cols), eps, n_iters, tol, check_every, False)
    return tuple(t.cpu() for t in out)


def _plan_and_grad(backend, scores, grad, **kwargs):
    """sinkhorn(scores, **kwargs) and d(plan . grad)/d scores on ``backend`` (its device), on the CPU."""
    dev = backend_device(backend)
    leaf = scores.clone().requires_grad_(True)
    kwargs = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    with use_backend(backend):
        q = sinkhorn(leaf.to(dev), **kwargs)
        q.backward(grad.to(dev))
    return q.detach().cpu(), leaf.grad


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("masked", [False, True])
def test_kernel_forward_matches_reference(backend, shape, masked):
    require_backend("sinkhorn", backend)
    scores, mask = random_problem(*shape, masked=masked)
    mask_t, rows, cols = canonical(scores, mask)
    got = _contract(backend, scores, mask_t, rows, cols, 0.1, 4)
    expected = sinkhorn_forward_reference(scores, mask_t, rows, cols, 0.1, 4)
    for name, g, e in zip(("plan", "log_u", "log_v", "n_done"), got, expected):
        assert g.shape == e.shape and g.dtype == e.dtype, name
        finite = torch.isfinite(e)
        assert torch.equal(finite, torch.isfinite(g)), f"{name}: -inf pattern differs"
        torch.testing.assert_close(g[finite], e[finite], rtol=2e-4, atol=1e-5, msg=name)


# Problems that take every path of the C++ forward: plain scaling, masks (an all-masked problem),
# early stopping in the scaling and in the log-domain levels, scores whose exp spans far more than
# the float range (levels B and C), 16-bit scores, a batch wide enough to run in parallel.
NO_GRAD_CASES = {
    "plain": ((2, 37, 13), torch.float32, 1.0, 0.1, 4, None),
    "masked": ((3, 40, 9), torch.float32, 1.0, 0.2, 3, None),
    "early-stop": ((4, 50, 8), torch.float32, 1.0, 0.5, 12, 1e-3),
    "extreme": ((2, 30, 11), torch.float32, 1e4, 1e-3, 3, None),
    "extreme-early-stop": ((2, 30, 11), torch.float32, 50.0, 0.01, 8, 1e-2),
    "bfloat16": ((2, 33, 17), torch.bfloat16, 1.0, 0.1, 3, None),
    "float64": ((2, 21, 6), torch.float64, 1.0, 0.1, 3, None),
    "pixelclip-one-problem": ((1, 1536, 64), torch.float32, 1.0, 0.05, 3, None),
    "batch": ((48, 128, 64), torch.float32, 1.0, 0.05, 3, None),
}


@pytest.mark.parametrize("case", list(NO_GRAD_CASES))
def test_cpu_forward_without_history_equals_the_contract_forward(case):
    """Without autograd the public op runs the C++ kernel without the dual history and with its own
    default marginals (sinkhorn_cpu_plan): the plan must be the contract forward's, bit for bit, and
    the reference's within tolerance."""
    require_backend("sinkhorn", "cpu")
    shape, dtype, scale, eps, n_iters, tol = NO_GRAD_CASES[case]
    scores, mask = random_problem(*shape, masked=case == "masked")
    scores = (scores * scale).to(dtype)
    kw = dict(epsilon=eps, n_iters=n_iters, mask=mask, tol=tol, check_every=2)
    with use_backend("cpu"), torch.no_grad():
        got = sinkhorn(scores, **kw)
    mask_t, rows, cols = canonical(scores, mask)
    contract = _contract("cpu", scores, mask_t, rows, cols, eps, n_iters, tol or 0.0, 2)[0]
    assert torch.equal(got, contract)
    if case.startswith("extreme"):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.sum(2), torch.ones(shape[:2]), rtol=1e-4, atol=1e-4)
    else:
        expected = sinkhorn_forward_reference(scores, mask_t, rows, cols, eps, n_iters, tol or 0.0, 2)[0]
        torch.testing.assert_close(got, expected, **tolerances(dtype))


def test_cpu_forward_without_history_follows_autograd_needs():
    """Only a call that needs no gradient skips the history: with a leaf that requires grad the
    registered op (and its backward) runs."""
    require_backend("sinkhorn", "cpu")
    scores, _ = random_problem(2, 10, 4)
    leaf = scores.clone().requires_grad_(True)
    with use_backend("cpu"):
        q = sinkhorn(leaf, epsilon=0.2)
        assert q.grad_fn is not None
        with torch.no_grad():
            assert sinkhorn(leaf, epsilon=0.2).grad_fn is None
        fake = torch._subclasses.FakeTensorMode()
        with fake, torch.no_grad():
            out = sinkhorn(fake.from_tensor(scores), epsilon=0.2)
        assert out.shape == scores.shape


@pytest.mark.triton
@pytest.mark.parametrize(
    ("shape", "blocks", "tol"),
    [((1, 16, 6), dict(block_n=4, parts=3), 0.0), ((2, 12, 7), dict(block_n=4, block_k=4, parts=2), 0.2)],
    ids=["one-chunk", "multi-chunk-early-stop"],
)
def test_triton_streaming_kernels_split_a_problem_over_programs(shape, blocks, tol):
    """The streaming kernels run one problem on several row-slab programs (a two-phase reduction per
    iteration, early stopping decided on device): forward contract and backward as the reference's,
    with problems stopping at different iterations (problem 0 is all masked: it stops at the first
    check)."""
    require_backend("sinkhorn", "triton")
    from ovseg_fast.kernels.sinkhorn import sinkhorn_backward, sinkhorn_forward

    scores, mask = random_problem(*shape, masked=True)
    mask_t, rows, cols = canonical(scores, mask)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    dev = backend_device("triton")
    args = on(dev, scores, mask_t, rows, cols)
    got = sinkhorn_forward(*args, 0.3, 3, tol, 1, variant="streaming", **blocks)
    expected = sinkhorn_forward_reference(scores, mask_t, rows, cols, 0.3, 3, tol, 1)
    assert expected[3].max() == 3 and (expected[3].min() < 3) == (tol > 0)
    for name, g, e in zip(("plan", "log_u", "log_v", "n_done"), got, expected):
        g = g.cpu()
        finite = torch.isfinite(e)
        assert torch.equal(finite, torch.isfinite(g)), f"{name}: -inf pattern differs"
        torch.testing.assert_close(g[finite], e[finite], rtol=2e-4, atol=1e-5, msg=name)
    dx = sinkhorn_backward(grad.to(dev), *args, *on(dev, *expected[1:]), 0.3, variant="streaming", **blocks)
    dx_expected = sinkhorn_backward_reference(grad, scores, mask_t, rows, cols, *expected[1:], 0.3)
    torch.testing.assert_close(dx.cpu(), dx_expected, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("shape", [(2, 5, 3), (3, 37, 13)], ids=lambda s: "x".join(map(str, s)))
def test_kernel_gradient_matches_reference(backend, shape):
    require_backend("sinkhorn", backend)
    scores, mask = random_problem(*shape, masked=True)
    grad = torch.randn(shape)
    _, expected = _plan_and_grad("reference", scores, grad, epsilon=0.2, n_iters=3, mask=mask)
    _, got = _plan_and_grad(backend, scores, grad, epsilon=0.2, n_iters=3, mask=mask)
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-5)


def test_cpu_kernel_float64_is_exact_and_gradchecks():
    require_backend("sinkhorn", "cpu", torch.float64)
    scores, mask = random_problem(2, 9, 5, torch.float64, masked=True)
    with use_backend("cpu"):
        leaf = scores.clone().requires_grad_(True)
        assert torch.autograd.gradcheck(lambda s: sinkhorn(s, epsilon=0.4, n_iters=3, mask=mask), (leaf,))
    mask_t, rows, cols = canonical(scores, mask)
    got = _contract("cpu", scores, mask_t, rows, cols, 0.4, 3)[0]
    torch.testing.assert_close(got, sinkhorn_reference(scores, mask_t, rows, cols, 0.4, 3), **tolerances(torch.float64))


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
    require_backend("sinkhorn", backend, dtype)
    scores, mask = random_problem(2, 24, 10, dtype=dtype, masked=True)
    grad = torch.randn(scores.shape).to(dtype)
    kw = dict(epsilon=0.1, n_iters=3, mask=mask)
    # The exact result comes from the reference in float64 (never from the kernel under test).
    exact, exact_grad = _plan_and_grad("reference", scores.double(), grad.double(), **kw)
    baseline, baseline_grad = _plan_and_grad("reference", scores, grad, **kw)
    out, out_grad = _plan_and_grad(backend, scores, grad, **kw)
    assert out.dtype == dtype
    assert_within_reference_error(out, exact, baseline, factor=2.0, atol=1e-3, what="plan")
    assert_within_reference_error(out_grad, exact_grad, baseline_grad, factor=2.0, atol=1e-2, what="grad")


@pytest.mark.parametrize("backend", ["reference", *KERNEL_BACKENDS])
def test_user_marginals_with_zeros(backend):
    dev = require_backend("sinkhorn", backend)
    gen = torch.Generator().manual_seed(5)
    scores = torch.randn(2, 12, 5, generator=gen)
    rows = torch.rand(2, 12, generator=gen)
    rows[:, 3] = 0.0
    cols = torch.rand(2, 5, generator=gen)
    cols[1, 2] = 0.0
    cols = cols / cols.sum(1, keepdim=True) * rows.sum(1, keepdim=True)
    with use_backend(backend):
        q = sinkhorn(*on(dev, scores), epsilon=0.2, n_iters=5, row_marginals=rows.to(dev), col_marginals=cols.to(dev))
    q = q.cpu()
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q.sum(2), rows, rtol=1e-5, atol=1e-6)
    assert float(q[:, 3].abs().max()) == 0.0 and float(q[1, :, 2].abs().max()) == 0.0
    mask_t, r, c = canonical(scores, None, rows, cols)
    torch.testing.assert_close(q, sinkhorn_reference(scores, mask_t, r, c, 0.2, 5), rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", *KERNEL_BACKENDS])
def test_tol_stops_each_problem_early(backend):
    require_backend("sinkhorn", backend)
    gen = torch.Generator().manual_seed(7)
    scores = torch.randn(3, 20, 6, generator=gen)
    scores[1] *= 8.0  # a harder problem that needs more iterations
    mask_t, rows, cols = canonical(scores)
    plan, _, _, n_done = _contract(backend, scores, mask_t, rows, cols, 0.5, 200, 1e-4, 2)
    expected = sinkhorn_forward_reference(scores, mask_t, rows, cols, 0.5, 200, 1e-4, 2)
    assert torch.equal(n_done, expected[3])
    assert int(n_done.max()) < 200 and int(n_done[1]) > int(n_done[0])
    assert bool(((plan.sum(1) - cols).abs().amax(1) < 1e-4).all())
    torch.testing.assert_close(plan, expected[0], rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", *KERNEL_BACKENDS])
def test_ragged_batch_equals_problems_alone(backend):
    dev = require_backend("sinkhorn", backend)
    scores, mask = random_problem(3, 15, 4, torch.float64 if backend != "triton" else torch.float32, masked=True)
    mask[2, :] = True
    scores, mask = scores.to(dev), mask.to(dev)
    with use_backend(backend):
        q = sinkhorn(scores, epsilon=0.2, n_iters=3, mask=mask)
        for b in (1, 2):
            alone = sinkhorn(scores[b][mask[b]], epsilon=0.2, n_iters=3)
            torch.testing.assert_close(q[b][mask[b]], alone, rtol=1e-5, atol=1e-7)
    assert torch.count_nonzero(q[~mask]) == 0  # masked samples get nothing
    assert torch.count_nonzero(q[0]) == 0  # the all-invalid problem gives zeros, not NaN


@pytest.mark.parametrize("backend", ["reference", *KERNEL_BACKENDS])
def test_extreme_scores_stay_finite(backend):
    dev = require_backend("sinkhorn", backend)
    gen = torch.Generator().manual_seed(11)
    shape = (2, 30, 12) if backend == "triton" else (2, 200, 50)
    scores = (torch.rand(shape, generator=gen) * 2e4 - 1e4).requires_grad_(True)
    with use_backend(backend):
        q = sinkhorn(scores.to(dev), epsilon=1e-3, n_iters=3)
        q.backward(torch.randn(shape, generator=gen).to(dev))
    q = q.detach().cpu()
    assert torch.isfinite(q).all() and torch.isfinite(scores.grad).all()
    assert bool((q >= 0).all())
    # Rows sum to their mass exactly even here (the plan is a normalised softmax, not exp of
    # rounded duals). Agreement with float64 is not expected: float32 holds scores / 1e-3 ~ 1e7
    # only to +-0.5, which moves near-tied entries by O(1) factors in any float32 implementation.
    torch.testing.assert_close(q.sum(2), torch.ones(shape[:2]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", *KERNEL_BACKENDS])
def test_large_logits_match_float64(backend):
    """PixelCLIP's regime: cosine similarity x 100 with epsilon 0.05, |scores / epsilon| up to 2000."""
    dev = require_backend("sinkhorn", backend)
    gen = torch.Generator().manual_seed(12)
    scores = (
        torch.nn.functional.normalize(torch.randn(2, 24, 16, generator=gen), dim=-1)
        @ torch.nn.functional.normalize(torch.randn(2, 16, 10, generator=gen), dim=1)
        * 100
    )
    with use_backend(backend):
        q = sinkhorn(scores.to(dev), epsilon=0.05, n_iters=3).cpu()
    with use_backend("reference"):
        exact = sinkhorn(scores.double(), epsilon=0.05, n_iters=3)
    assert max_abs_err(q, exact) < 2e-3


@pytest.mark.parametrize("backend", ["reference", *KERNEL_BACKENDS])
@pytest.mark.parametrize("shape", [(0, 4, 3), (2, 0, 3), (2, 4, 0)], ids=str)
def test_empty_inputs(backend, shape):
    dev = require_backend("sinkhorn", backend)
    scores = torch.randn(shape, requires_grad=True)
    with use_backend(backend):
        q = sinkhorn(scores.to(dev))
        q.sum().backward()
    assert q.shape == shape and scores.grad.shape == shape


@pytest.mark.parametrize("backend", ["reference", *KERNEL_BACKENDS])
def test_non_contiguous_input(backend):
    dev = require_backend("sinkhorn", backend)
    base = torch.randn(3, 7, 12)
    scores = base.to(dev).transpose(1, 2)  # (3, 12, 7), non-contiguous
    assert not scores.is_contiguous()
    with use_backend(backend):
        q = sinkhorn(scores, epsilon=0.2).cpu()
    with use_backend("reference"):
        expected = sinkhorn(base.transpose(1, 2).contiguous().double(), epsilon=0.2).float()
    torch.testing.assert_close(q, expected, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Registration: opcheck, torch.compile, FLOPs.


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_opcheck(backend):
    require_backend("sinkhorn", backend)
    scores, mask = random_problem(2, 9, 4, masked=True)
    mask_t, rows, cols = canonical(scores, mask)
    with use_backend(backend):
        for tol in (0.0, 1e-3):
            args = (scores.clone().requires_grad_(True), mask_t, rows, cols, 0.3, 4, tol, 2, False)
            torch.library.opcheck(OP, args)
        plan, log_u, log_v, n_done = OP(scores, mask_t, rows, cols, 0.3, 4, 0.0, 1, False)
        torch.library.opcheck(
            torch.ops.ovseg_fast.sinkhorn_backward,
            (torch.randn_like(plan), scores, mask_t, rows, cols, log_u, log_v, n_done, 0.3, 4, 0.0, 1),
        )


def test_compiled_module_fullgraph_forward_and_backward():
    module = Sinkhorn(epsilon=0.1, n_iters=3)
    compiled = torch.compile(lambda s, m: module(s, m).square().sum(), fullgraph=True)
    scores, mask = random_problem(2, 10, 5, masked=True)
    leaf = scores.clone().requires_grad_(True)
    loss = compiled(leaf, mask)
    loss.backward()
    leaf_eager = scores.clone().requires_grad_(True)
    module(leaf_eager, mask).square().sum().backward()
    torch.testing.assert_close(loss, module(scores, mask).square().sum())
    torch.testing.assert_close(leaf.grad, leaf_eager.grad)
    assert "epsilon=0.1" in repr(module)


def test_flop_counter_counts_forward_and_backward():
    scores = torch.randn(2, 10, 5, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        sinkhorn(scores, n_iters=3).sum().backward()
    expected = sinkhorn_flops(2, 10, 5, 3) + sinkhorn_flops(2, 10, 5, 3, backward=True)
    assert counter.get_total_flops() == expected
    assert sinkhorn_flops(1, 1, 1, 3) == 15


# ---------------------------------------------------------------------------------------------
# The CPU kernel's per-capability copies (DEFAULT, AVX2, AVX512) all agree with the reference.


@pytest.mark.parametrize("capability", CPU_CAPABILITIES)
def test_every_cpu_capability_copy(capability):
    run_under_capability(
        "sinkhorn",
        capability,
        """
        import torch
        from ovseg_fast.ops import sinkhorn, use_backend
        torch.manual_seed(0)
        s = torch.randn(3, 33, 17, requires_grad=True)
        g = torch.randn(3, 33, 17)
        with use_backend("cpu"):
            q = sinkhorn(s, epsilon=0.1); q.backward(g); gk = s.grad.clone(); s.grad = None
        with use_backend("reference"):
            r = sinkhorn(s, epsilon=0.1); r.backward(g)
        torch.testing.assert_close(q, r, rtol=2e-4, atol=1e-6)
        torch.testing.assert_close(gk, s.grad, rtol=1e-3, atol=1e-5)
        """,
    )


# ---------------------------------------------------------------------------------------------
# Distributed: two gloo processes each holding half of the samples.


_DIST_WORKER = textwrap.dedent(
    """
    import os, sys, torch, torch.distributed as dist
    from ovseg_fast.ops import sinkhorn
    rank, world, port, out = int(sys.argv[1]), 2, sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 21, 6, generator=gen, dtype=torch.float64)
    mask = torch.rand(2, 21, generator=gen) > 0.2
    lo, hi = (0, 9) if rank == 0 else (9, 21)  # uneven split
    leaf = scores[:, lo:hi].clone().requires_grad_(True)
    grad = torch.randn(2, 21, 6, generator=gen, dtype=torch.float64)[:, lo:hi]
    q = sinkhorn(leaf, epsilon=0.2, n_iters=4, mask=mask[:, lo:hi], process_group=dist.group.WORLD)
    q.backward(grad)
    torch.save({"q": q.detach(), "grad": leaf.grad}, f"{out}.{rank}")
    # Both ranks done before either tears down: otherwise gloo's threads can abort the exit
    # ("terminate called without an active exception") while the other rank still talks to them.
    dist.barrier()
    dist.destroy_process_group()
    """
)


@pytest.mark.distributed
def test_process_group_equals_single_process(tmp_path):
    parts = run_gloo_workers(_DIST_WORKER, tmp_path)

    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 21, 6, generator=gen, dtype=torch.float64)
    mask = torch.rand(2, 21, generator=gen) > 0.2
    grad = torch.randn(2, 21, 6, generator=gen, dtype=torch.float64)
    leaf = scores.clone().requires_grad_(True)
    q = sinkhorn(leaf, epsilon=0.2, n_iters=4, mask=mask)
    q.backward(grad)
    torch.testing.assert_close(torch.cat([p["q"] for p in parts], 1), q.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.cat([p["grad"] for p in parts], 1), leaf.grad, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Bad inputs: a clear error naming the argument, never a crash or a silent wrong answer.


BAD_INPUTS = [
    (dict(scores=[[1.0]]), TypeError, "scores must be a torch.Tensor"),
    (dict(scores=torch.ones(3, 4, dtype=torch.int64)), TypeError, "scores must have dtype"),
    (dict(scores=torch.ones(4)), ValueError, "scores must have 2 or 3 dimensions"),
    (dict(epsilon=0.0), ValueError, "epsilon must be > 0"),
    (dict(epsilon=float("nan")), ValueError, "epsilon must be finite"),
    (dict(epsilon="0.1"), TypeError, "epsilon must be a float"),
    (dict(n_iters=0), ValueError, "n_iters must be >= 1"),
    (dict(n_iters=2.5), TypeError, "n_iters must be an int"),
    (dict(tol=-1.0), ValueError, "tol must be >= 0"),
    (dict(check_every=0), ValueError, "check_every must be >= 1"),
    (dict(mask=torch.ones(2, 5)), TypeError, "mask must have dtype bool"),
    (dict(mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, "mask must have shape"),
    (dict(row_marginals=torch.ones(2, 4)), ValueError, "row_marginals must have shape"),
    (dict(col_marginals=torch.ones(2, 3, dtype=torch.int32)), TypeError, "col_marginals must have dtype"),
    (dict(row_marginals=-torch.ones(2, 5), col_marginals=-torch.ones(2, 3) * 5 / 3), ValueError, "non-negative"),
    (dict(row_marginals=torch.ones(2, 5), col_marginals=torch.ones(2, 3)), ValueError, "unbalanced"),
    (dict(row_marginals=torch.full((2, 5), float("inf")), col_marginals=torch.ones(2, 3)), ValueError, "finite"),
    (dict(col_marginals=torch.tensor([[1.0, float("nan"), 1.0]] * 2)), ValueError, "col_marginals must be finite"),
    (dict(mask=torch.ones(2, 5, dtype=torch.bool, device="meta")), ValueError, "mask is on meta"),
]


@pytest.mark.parametrize(("kwargs", "exc", "match"), BAD_INPUTS, ids=[m for _, _, m in BAD_INPUTS])
def test_bad_inputs(kwargs, exc, match):
    kwargs = dict(kwargs)
    scores = kwargs.pop("scores", torch.randn(2, 5, 3))
    with pytest.raises(exc, match=match):
        sinkhorn(scores, **kwargs)


def test_backend_errors_name_the_reason(monkeypatch):
    scores = torch.randn(4, 3)
    with pytest.raises(ValueError, match="not a backend"):
        with use_backend("cuda"):
            pass
    monkeypatch.setenv("OVSEG_BACKEND", "fastest")
    with pytest.raises(ValueError, match="OVSEG_BACKEND"):
        sinkhorn(scores)
    monkeypatch.setenv("OVSEG_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendError, match="TRITON_INTERPRET=1 is not set"):
        sinkhorn(scores)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_automatic_backend_matches_reference(dtype):
    """On a GPU machine: the compiled Triton kernel (not the interpreter), chosen automatically for CUDA
    tensors, forward and backward. float32 against the reference at a tolerance; bfloat16 by
    flash-attention's rule (most plan entries are below bfloat16's absolute tolerance, so a bare
    comparison would check next to nothing)."""
    scores, mask = random_problem(4, 300, 70, dtype=dtype, masked=True)
    scores, mask = scores.cuda(), mask.cuda()
    grad = torch.randn(scores.shape, generator=torch.Generator().manual_seed(1)).to(dtype).cuda()
    kw = dict(epsilon=0.05, n_iters=3, mask=mask)

    def run(s, g):
        leaf = s.clone().requires_grad_(True)
        q = sinkhorn(leaf, **kw)
        q.backward(g)
        return q.detach(), leaf.grad

    q, dq = run(scores, grad)
    with use_backend("reference"):
        r, dr = run(scores, grad)
        exact, dexact = run(scores.double(), grad.double())
    if dtype == torch.float32:
        torch.testing.assert_close(q, r, **tolerances(dtype))
        torch.testing.assert_close(dq, dr, rtol=1e-3, atol=1e-5)
    else:
        assert_within_reference_error(q, exact, r, factor=2.0, atol=1e-3, what="plan")
        assert_within_reference_error(dq, dexact, dr, factor=2.0, atol=1e-2, what="grad")
