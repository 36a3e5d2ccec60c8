"""Test utilities shared by the op tests.

Devices: Triton tests put their tensors on :func:`triton_device` (the GPU when present, else the CPU
under Triton's interpreter; skipped when neither). Planted bugs: ``OVSEG_PLANT_BUG=<kernel>`` makes a
C++ kernel return a wrong result (csrc/planted_bug.h); tests/ops/test_planted_bugs.py checks that
each op's kernel-vs-reference tests then fail.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from typing import Optional

import pytest
import torch
from torch import Tensor

from ovseg_fast._extension import CAPABILITY_RANK
from ovseg_fast.backends import backend_report, registered_ops

#: Backends that are exercised by kernel-vs-reference tests, with the marks they need.
KERNEL_BACKENDS = [
    pytest.param("cpu", id="cpu"),
    pytest.param("triton", id="triton", marks=pytest.mark.triton),
]

HAS_TRITON = importlib.util.find_spec("triton") is not None


def triton_device() -> torch.device:
    """Where the Triton tests put their tensors: the GPU when there is one (the compiled kernels, their
    real target), else the CPU under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1
    when no GPU is present). Skips when neither can run: no GPU and TRITON_INTERPRET=0, which is how a
    GPU machine's semantics are simulated on a machine without one."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return torch.device("cpu")
    pytest.skip("the Triton kernels need a CUDA device or TRITON_INTERPRET=1; neither is present")


def backend_device(backend: str) -> torch.device:
    """The device of a test's tensors for ``backend`` (see :func:`triton_device`; the others take CPU tensors)."""
    return triton_device() if backend == "triton" else torch.device("cpu")


def on(device: torch.device, *tensors: Optional[Tensor]) -> list[Optional[Tensor]]:
    """``tensors`` moved to ``device`` (None stays None). ``.to`` is differentiable, so gradients still
    reach CPU leaves: a test builds its inputs and expected results on the CPU and runs only the
    kernel on the backend's device."""
    return [t if t is None else t.to(device) for t in tensors]


def require_backend(
    op: str, backend: str, dtype: torch.dtype = torch.float32, device: Optional[str] = None
) -> torch.device:
    """Fails (not skips) when a backend that must exist here cannot run: a missing kernel is a defect.

    The legitimate absences are skipped with their reason: an op that declares it has no kernel for
    that backend (e.g. a CPU-only op with no Triton kernel), and Triton on a machine with neither a
    GPU nor the interpreter (see :func:`triton_device`). Returns the device the test's tensors go to
    for that backend (``device`` when given, else :func:`backend_device`).
    """
    support = registered_ops()[op]
    if backend == "triton" and not support.has_triton:
        pytest.skip(support.no_triton_reason)
    dev = backend_device(backend) if device is None else torch.device(device)
    reason = backend_report(op, dev, dtype)[backend]
    if reason is None:
        return dev
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


#: The copies of every C++ kernel (see csrc/cpu_dispatch.h), as torch's ATEN_CPU_CAPABILITY names them.
CPU_CAPABILITIES = ["default", "avx2", "avx512"]


def cpu_capability_skip_reason(capability: str) -> Optional[str]:
    """Why the ``capability`` copy of the kernels cannot run on this machine, or None when it can."""
    import ovseg_fast._C as ext

    name = capability.upper()
    if name not in ext.compiled_capabilities():
        return f"the {capability} copy is not compiled on this architecture"
    supported = ext.supported_capability(apply_mask=False)
    if CAPABILITY_RANK[name] > CAPABILITY_RANK[supported]:
        # Only a CPU that has the copy's instructions can check its values; what such a request does on
        # this CPU (fall back with a warning) is tested by tests/test_cpu_dispatch.py on every machine.
        return f"this CPU cannot execute the {capability} copy (it supports up to {supported})"
    return None


def child_env(**overrides: str) -> dict[str, str]:
    """The environment of a child interpreter: ours without OVSEG_CPU_MASK, plus ``overrides``."""
    env = {k: v for k, v in os.environ.items() if k != "OVSEG_CPU_MASK"}
    env.update(overrides)
    return env


def run_under_capability(op: str, capability: str, code: str) -> None:
    """Runs ``code`` in a fresh interpreter with ``ATEN_CPU_CAPABILITY=capability`` and checks that it
    passes and that the extension really ran that copy of the kernels. ``code`` does the comparing
    (the capability is fixed per process, hence the subprocess)."""
    require_backend(op, "cpu")
    reason = cpu_capability_skip_reason(capability)
    if reason is not None:
        pytest.skip(reason)
    check = "\nimport ovseg_fast._C as _ext\nprint(_ext.kernel_capability())\n"
    env = child_env(ATEN_CPU_CAPABILITY=capability)
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code) + check], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == capability.upper()


def run_gloo_workers(worker_code: str, tmp_path, world: int = 2, timeout: float = 240) -> list:
    """Runs ``worker_code`` in ``world`` fresh interpreters and returns what each rank saved.

    Each worker gets ``sys.argv[1:] = [rank, port, out]``: it joins a gloo group with
    ``init_method=f"tcp://127.0.0.1:{port}"`` (a free port), ``torch.save``s its result to
    ``f"{out}.{rank}"``, and calls ``dist.barrier()`` before ``destroy_process_group()`` (otherwise
    gloo's threads can abort a rank's exit while the other still talks to them); the helper then ends
    the process with ``os._exit(0)``. The repository root is on the workers' path, so they can import
    ``tests.*``.
    """
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    script = tmp_path / "gloo_worker.py"
    # After its result is saved and the group torn down, a rank leaves without the interpreter's
    # teardown: there gloo's threads have crashed a rank now and then (1 run in ~10 of the Sinkhorn
    # file, a non-zero exit with nothing on stderr), after everything the test checks was done.
    exit_now = "\nimport sys as _sys, os as _os\n_sys.stdout.flush(); _sys.stderr.flush(); _os._exit(0)\n"
    script.write_text(worker_code + exit_now)
    out = str(tmp_path / "result")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    procs = [
        subprocess.Popen([sys.executable, str(script), str(r), port, out], stderr=subprocess.PIPE, text=True, env=env)
        for r in range(world)
    ]
    for p in procs:
        _, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, f"rank exited with {p.returncode}: {err[-3000:]}"
    return [torch.load(f"{out}.{r}", weights_only=False) for r in range(world)]


def tiny_clip(image_size: int = 64, *, layers: int = 2, text_layers: int = 2, context_length: int = 77) -> dict:
    """An open_clip config dict of a tiny ViT (width 64, patch 16, ``layers`` blocks; text width 64,
    ``text_layers`` blocks): a whole CLIP in milliseconds, for the model tests (``CLIPBackbone(
    tiny_clip(), image_size=64)`` or a model config's ``clip=tiny_clip()``). ``context_length`` 77 lets
    text prompts of any realistic template fit."""
    return {
        "embed_dim": 32,
        "vision_cfg": {"image_size": image_size, "layers": layers, "width": 64, "patch_size": 16, "head_width": 32},
        "text_cfg": {
            "context_length": context_length, "vocab_size": 49408, "width": 64, "heads": 2, "layers": text_layers,
        },
    }
