"""Test utilities shared by the op tests."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Optional

import pytest
import torch
from torch import Tensor

from ovseg_fast.backends import backend_report

#: Backends that are exercised by kernel-vs-reference tests, with the marks they need.
KERNEL_BACKENDS = [
    pytest.param("cpu", id="cpu"),
    pytest.param("triton", id="triton", marks=pytest.mark.triton),
]

HAS_TRITON = importlib.util.find_spec("triton") is not None


def require_backend(op: str, backend: str, dtype: torch.dtype = torch.float32, device: str = "cpu") -> None:
    """Fails (not skips) when a backend that must exist here cannot run: a missing kernel is a defect.

    The one legitimate absence is an op that declares it has no kernel for that backend (e.g. a
    CPU-only op with no Triton kernel); that is skipped with the op's own reason.
    """
    reason = backend_report(op, torch.device(device), dtype)[backend]
    if reason is None:
        return
    if "has no" in reason:
        pytest.skip(reason)
    pytest.fail(f"backend {backend} cannot run {op} here: {reason}")


def max_abs_err(a: Tensor, b: Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return float((a.double() - b.double()).abs().max())


def assert_within_reference_error(
    out: Tensor,
    exact: Tensor,
    baseline: Tensor,
    *,
    factor: float = 2.0,
    atol: float = 0.0,
    what: str = "output",
) -> None:
    """flash-attention's rule: the kernel's error against an exact (float64) result stays within
    ``factor`` times the error of the plain-PyTorch reference run at the same precision (+ ``atol``
    for results whose reference error is ~0)."""
    err = max_abs_err(out, exact)
    base = max_abs_err(baseline, exact)
    assert err <= factor * base + atol, (
        f"{what}: kernel error {err:.3g} > {factor} x reference error {base:.3g} + {atol:g}"
    )


def tolerances(dtype: torch.dtype) -> dict[str, float]:
    """rtol/atol for comparing a kernel with the reference *at the same dtype*."""
    return {
        torch.float64: dict(rtol=1e-10, atol=1e-12),
        torch.float32: dict(rtol=1e-4, atol=1e-5),
        torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
        torch.float16: dict(rtol=5e-3, atol=5e-3),
    }[dtype]


def raises(exc: type[BaseException], match: Optional[str], fn: Callable[[], object]) -> None:
    with pytest.raises(exc, match=match):
        fn()
