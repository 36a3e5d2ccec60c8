"""Backend selection: which implementation of an op runs for given tensors.

Every op has up to three backends, all meeting the same kernel contract (the same outputs and the
same tensors saved for backward, so a forward and its backward may even run on different ones):

``reference``  plain PyTorch, any device, always available: the spec the kernels are tested against.
``cpu``        the fused C++ kernels of ``ovseg_fast._C``, for CPU tensors.
``triton``     the fused Triton kernels of ``ovseg_fast.kernels``, for CUDA tensors, or for CPU tensors
               under Triton's interpreter (``TRITON_INTERPRET=1``, how they are tested without a GPU).

Automatic choice: CPU tensors take ``cpu`` when the extension is loaded and supports the dtype,
CUDA tensors take ``triton`` when Triton is importable and supports the dtype; otherwise
``reference``. Override it with ``with ovseg_fast.ops.use_backend(name):`` (thread-local) or the
environment variable ``OVSEG_BACKEND``; a backend that cannot run the call raises
:class:`BackendError` listing why each backend was or was not usable.

The choice is made when a kernel is launched, inside the registered ``torch.library`` op, so it
also holds inside ``torch.compile``'d graphs and a compiled graph follows later overrides. A backward
pass uses the override in force when it runs.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Callable, Optional, TypeVar

import torch

from ovseg_fast._extension import extension_error, extension_loaded

__all__ = [
    "BACKENDS",
    "BackendError",
    "KernelSupport",
    "backend_report",
    "dispatch",
    "register_op",
    "registered_ops",
    "requested_backend",
    "select_backend",
    "triton_error",
    "use_backend",
]

BACKENDS = ("reference", "cpu", "triton")
_ENV = "OVSEG_BACKEND"
T = TypeVar("T")


class BackendError(RuntimeError):
    """The requested backend cannot run this call (the message says why, for every backend)."""


@dataclass(frozen=True)
class KernelSupport:
    """What an op's kernels accept; the reference accepts everything."""

    cpu_dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float64, torch.bfloat16)
    triton_dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
    has_cpu: bool = True
    has_triton: bool = True
    #: The ``torch.ops.ovseg_fast`` ops the C++ backend calls (checked, so a stale build is reported).
    cpu_ops: tuple[str, ...] = ()
    #: Said instead of "no Triton kernel" when the op deliberately has none.
    no_triton_reason: str = "this op has no Triton kernel"


_OPS: dict[str, KernelSupport] = {}


def register_op(name: str, support: KernelSupport) -> None:
    """Declares an op's kernels (used by ``select_backend`` and ``python -m ovseg_fast.info``)."""
    _OPS[name] = support


def registered_ops() -> Mapping[str, KernelSupport]:
    return dict(_OPS)


def _validate_name(name: str, source: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"{source} must be a backend name (str), got {type(name).__name__}")
    key = name.strip().lower()
    if key not in (*BACKENDS, "auto"):
        raise ValueError(f"{source}={name!r} is not a backend; choose one of {', '.join((*BACKENDS, 'auto'))}")
    return key


_local = threading.local()


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Runs ops with backend ``name`` ("reference", "cpu", "triton" or "auto") in this block.

    Nests, is thread-local, and takes precedence over ``OVSEG_BACKEND``. An unknown name raises at
    once; a backend that cannot run a given call raises :class:`BackendError` at that call.
    """
    key = _validate_name(name, "use_backend(name)")
    stack = _local.__dict__.setdefault("stack", [])
    stack.append(key)
    try:
        yield
    finally:
        stack.pop()


def requested_backend() -> Optional[str]:
    """The override in force (context first, then ``OVSEG_BACKEND``), or None for automatic."""
    stack = getattr(_local, "stack", None)
    if stack:
        key = stack[-1]
    else:
        env = os.environ.get(_ENV)
        if not env or not (env := env.strip()):
            return None
        key = _validate_name(env, f"environment variable {_ENV}")
    return None if key == "auto" else key


@functools.lru_cache(maxsize=1)
def _triton_import_error() -> Optional[str]:
    try:
        importlib.import_module("triton")
    except Exception as exc:  # ImportError, or a broken install raising anything else
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    return None


def triton_error() -> Optional[str]:
    """Why Triton cannot be used at all in this process, or None."""
    return _triton_import_error()


@functools.cache
def _has_cpu_op(name: str) -> bool:
    return hasattr(torch.ops.ovseg_fast, name)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _status(op: str, backend: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """None when ``backend`` can run ``op`` on such tensors, else the reason it cannot."""
    support = _OPS[op]
    names = lambda dts: ", ".join(str(d).replace("torch.", "") for d in dts)
    if backend == "reference":
        return None
    if backend == "cpu":
        if not support.has_cpu:
            return "this op has no C++ kernel"
        if not extension_loaded():
            return f"the C++ extension is not in use: {extension_error()}"
        missing = [name for name in support.cpu_ops if not _has_cpu_op(name)]
        if missing:
            return f"ovseg_fast._C lacks {', '.join(missing)} (built from older sources? rebuild it)"
        if device.type != "cpu":
            return f"tensors are on {device}; the C++ kernels take CPU tensors"
        if dtype not in support.cpu_dtypes:
            return f"dtype {names([dtype])} is not supported (the C++ kernel takes {names(support.cpu_dtypes)})"
        return None
    if backend == "triton":
        if not support.has_triton:
            return support.no_triton_reason
        if triton_error() is not None:
            return triton_error()
        if device.type == "cpu" and not _interpreting():
            return "tensors are on the CPU and TRITON_INTERPRET=1 is not set (Triton compiles for GPUs)"
        if device.type not in ("cpu", "cuda"):
            return f"tensors are on {device}; Triton runs on CUDA devices"
        if dtype not in support.triton_dtypes:
            return f"dtype {names([dtype])} is not supported (the Triton kernel takes {names(support.triton_dtypes)})"
        return None
    raise AssertionError(backend)


def backend_report(op: str, device: torch.device, dtype: torch.dtype) -> dict[str, Optional[str]]:
    """For each backend: None if it can run ``op`` on such tensors, else why not."""
    return {b: _status(op, b, torch.device(device), dtype) for b in BACKENDS}


def _automatic(op: str, device: torch.device, dtype: torch.dtype) -> str:
    preferred = {"cpu": "cpu", "cuda": "triton"}.get(device.type)
    if preferred is not None and _status(op, preferred, device, dtype) is None:
        return preferred
    return "reference"


def select_backend(op: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend that runs ``op`` on tensors of ``device`` and ``dtype`` now."""
    device = torch.device(device)
    requested = requested_backend()
    if requested is None:
        return _automatic(op, device, dtype)
    reason = _status(op, requested, device, dtype)
    if reason is None:
        return requested
    lines = "\n".join(
        f"  {b}: {'usable' if why is None else why}" for b, why in backend_report(op, device, dtype).items()
    )
    raise BackendError(
        f"ovseg_fast.ops.{op}: backend {requested!r} was requested but cannot run this call "
        f"({device}, {str(dtype).replace('torch.', '')}): {reason}.\nBackends:\n{lines}"
    )


def dispatch(op: str, like: torch.Tensor, impls: Mapping[str, Callable[[], T]]) -> T:
    """Runs the implementation of the backend selected for tensors like ``like``."""
    return impls[select_backend(op, like.device, like.dtype)]()


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)
_CPU = torch.device("cpu")


@functools.cache
def _cpu_kernel_runs(op: str, dtype: torch.dtype) -> bool:
    """Whether the C++ backend can run ``op`` on CPU tensors of ``dtype`` (fixed for the process:
    it depends on the loaded extension only)."""
    return backend_report(op, _CPU, dtype)["cpu"] is None


def direct_cpu(op: str, *tensors: Optional[torch.Tensor]) -> bool:
    """Whether to call the C++ kernels directly instead of through the registered ``torch.library`` op.

    In plain eager mode on CPU with the C++ backend selected, the registered op's Python layers
    (custom-op dispatch, its autograd wrapper, the backend choice) only forward to the same kernels,
    yet at RPN sizes (T = 16) they cost several times the kernels. Under ``torch.compile``, a
    dispatch or function mode (e.g. ``FlopCounterMode``), a functorch transform or a tensor
    subclass, the registered op runs, so that these see it. The backend test is
    ``select_backend(...) == "cpu"`` with its static part cached.
    """
    if torch.compiler.is_compiling():  # first: Dynamo folds it, and traces nothing after it
        return False
    for t in tensors:
        if t is not None and type(t) not in _PLAIN_TENSORS:
            return False
    like = tensors[0]
    if (
        not like.is_cpu
        or torch._C._len_torch_dispatch_stack()
        or torch._C._is_torch_function_mode_enabled()
        or torch._C._are_functorch_transforms_active()
    ):
        return False
    return requested_backend() in (None, "cpu") and _cpu_kernel_runs(op, like.dtype)
