"""Environment report: ``python -m ovseg_fast.info`` (also ``ovseg-fast info``).

Says what is installed, whether the C++ extension is built and loaded (and for which torch), what
the CPU offers, which CUDA devices there are, and for every op which backend would run on CPU and on
CUDA tensors, and why the others would not.
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Any

import torch

import ovseg_fast
from ovseg_fast import _extension
from ovseg_fast.backends import (
    BACKENDS,
    backend_report,
    registered_ops,
    requested_backend,
    select_backend,
    triton_error,
)

__all__ = ["collect", "cpu_model", "main", "render"]

_ENV_VARS = (
    "OVSEG_BACKEND",
    "OVSEG_NO_EXT",
    "OVSEG_NATIVE",
    "TRITON_INTERPRET",
    "ATEN_CPU_CAPABILITY",
    "OVSEG_CPU_MASK",
    "OMP_NUM_THREADS",
)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str:
    try:
        mod = __import__(module)
    except Exception as exc:  # a broken optional install must not break the report
        return f"not available ({type(exc).__name__})"
    return getattr(mod, "__version__", "unknown")


def collect() -> dict[str, Any]:
    """The report as a dict (also recorded in benchmark JSON)."""
    ext = _extension.extension()
    extension: dict[str, Any] = {"loaded": ext is not None, "error": _extension.extension_error()}
    if ext is not None:
        extension.update(
            built_for_torch=ext.built_for_torch(),
            kernel_capability=ext.kernel_capability(),
            requested_capability=_extension.requested_capability(),
            supported_capability=ext.supported_capability(),
            cpu_features=dict(ext.cpu_features()),
            masked_cpu_features=list(ext.masked_cpu_features()),
            compiled_capabilities=list(ext.compiled_capabilities()),
            openmp=ext.has_openmp(),
        )
    cuda_devices = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    )
    ops = {}
    for name in sorted(registered_ops()):
        per_device = {}
        for device, dtype in (("cpu", torch.float32), ("cuda", torch.float16)):
            report = backend_report(name, torch.device(device), dtype)
            if device == "cuda" and not cuda_devices:
                chosen, note = "reference", "no CUDA device here"
            else:
                try:
                    chosen, note = select_backend(name, torch.device(device), dtype), ""
                except Exception as exc:  # e.g. OVSEG_BACKEND asks for something unusable
                    chosen, note = "error", str(exc).splitlines()[0]
            per_device[device] = {"backend": chosen, "note": note, "why_not": {b: r for b, r in report.items() if r}}
        ops[name] = per_device
    return {
        "ovseg_fast": ovseg_fast.__version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "triton": _version("triton") if triton_error() is None else f"not available: {triton_error()}",
        "numpy": _version("numpy"),
        "platform": platform.platform(),
        "cpu": {
            "model": cpu_model(),
            "torch_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(),
            "cores": os.cpu_count(),
        },
        "cuda": {"available": torch.cuda.is_available(), "devices": cuda_devices, "torch_cuda": torch.version.cuda},
        "extension": extension,
        "backend_override": requested_backend(),
        "environment": {k: os.environ[k] for k in _ENV_VARS if k in os.environ},
        "ops": ops,
    }


def render(info: dict[str, Any]) -> str:
    lines = [
        f"ovseg-fast {info['ovseg_fast']}  (python {info['python']}, torch {info['torch']}, "
        f"triton {info['triton']}, numpy {info['numpy']})",
        f"platform: {info['platform']}",
        f"CPU: {info['cpu']['model']}; torch kernels use {info['cpu']['torch_capability']}; "
        f"{info['cpu']['threads']} threads of {info['cpu']['cores']} cores",
        "CUDA: "
        + (", ".join(info["cuda"]["devices"]) if info["cuda"]["devices"] else "no device")
        + f" (torch built with CUDA {info['cuda']['torch_cuda']})",
    ]
    ext = info["extension"]
    if ext["loaded"]:
        lines.append(
            f"C++ extension: loaded, built for torch {ext['built_for_torch']}; running the "
            f"{ext['kernel_capability']} kernels (compiled: {', '.join(ext['compiled_capabilities'])}); "
            f"OpenMP {'on' if ext['openmp'] else 'off'}"
        )
        missing = [name for name, present in ext["cpu_features"].items() if not present]
        lines.append(
            f"kernel capability: requested {ext['requested_capability']}, supported by this CPU "
            f"{ext['supported_capability']}, chosen {ext['kernel_capability']}"
            + (f"; CPU lacks {', '.join(missing)}" if missing else "")
            + (f" (OVSEG_CPU_MASK hides {', '.join(ext['masked_cpu_features'])})" if ext["masked_cpu_features"] else "")
        )
    else:
        lines.append(f"C++ extension: NOT in use: {ext['error']}")
        lines.append("  fix: pip install --no-build-isolation --force-reinstall --no-deps .  (see README, 'Building')")
    lines.append(f"backend override: {info['backend_override'] or 'none (automatic)'}")
    if info["environment"]:
        lines.append("environment: " + ", ".join(f"{k}={v}" for k, v in info["environment"].items()))
    lines.append("")
    lines.append("op backends (what runs on float32 CPU tensors / float16 CUDA tensors, and why not the others):")
    for name, per_device in info["ops"].items():
        lines.append(f"  {name}")
        for device, entry in per_device.items():
            note = f" ({entry['note']})" if entry["note"] else ""
            lines.append(f"    {device:<5} -> {entry['backend']}{note}")
            for backend in BACKENDS:
                if backend in entry["why_not"] and backend != entry["backend"]:
                    lines.append(f"             {backend}: {entry['why_not'][backend]}")
    return "\n".join(lines)


def main() -> int:
    print(render(collect()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
