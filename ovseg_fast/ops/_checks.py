"""Argument checks shared by the public ops: every message names the argument and what was expected.

Wrong Python types and tensor dtypes raise ``TypeError``; wrong shapes, devices and values raise
``ValueError``. Shape and dtype checks are static, so ``torch.compile`` traces them away; checks on
tensor *values* (which need the data) live inside the registered ops, where they run at run time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

FLOATING = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _dtype_names(dtypes: Sequence[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(
    name: str,
    value: object,
    *,
    ndim: Optional[Sequence[int]] = None,
    dtypes: Optional[Sequence[torch.dtype]] = FLOATING,
) -> Tensor:
    """``value`` must be a tensor with one of ``ndim`` dimensions and one of ``dtypes``."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if dtypes is not None and value.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype {_dtype_names(dtypes)}, got {str(value.dtype).replace('torch.', '')}")
    if ndim is not None and value.dim() not in ndim:
        dims = " or ".join(str(d) for d in ndim)
        raise ValueError(f"{name} must have {dims} dimensions, got shape {tuple(value.shape)}")
    return value


def check_shape(name: str, value: Tensor, expected: Sequence[Optional[int]], what: str = "") -> None:
    """``value.shape`` must equal ``expected`` (None matches any size)."""
    shape = tuple(value.shape)
    if len(shape) != len(expected) or any(e is not None and s != e for s, e in zip(shape, expected)):
        want = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"
        raise ValueError(f"{name} must have shape {want}{' ' + what if what else ''}, got {shape}")


def check_same_device(reference_name: str, reference: Tensor, **others: Optional[Tensor]) -> None:
    for name, t in others.items():
        if t is not None and t.device != reference.device:
            raise ValueError(f"{name} is on {t.device} but {reference_name} is on {reference.device}")


def check_int(name: str, value: object, *, minimum: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_float(name: str, value: object, *, positive: bool = False, minimum: Optional[float] = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value  # type: ignore[return-value]


def value_range(t: Tensor) -> tuple[float, float]:
    """``(min, max)`` of a non-empty floating tensor in one pass, NaN for both if it holds a NaN.

    For the run-time checks on tensor values: ``torch.isfinite(t).all()`` or ``((t >= 0) & (t <= 1)).all()``
    allocate and sweep the tensor several times (170 us against 19 us for a 16384 x 8 gating input, 6 ms
    against 0.5 ms for a 21 x 512 x 512 probability map, 2 threads).
    """
    lo, hi = torch.stack(torch.aminmax(t.detach())).tolist()  # one device-to-host copy, not two
    return lo, hi
