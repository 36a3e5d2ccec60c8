"""Loading of ``ovseg_fast._C``, the compiled C++ CPU kernels.

The extension is optional: when it is missing (``OVSEG_NO_EXT=1`` at install time) or cannot load
(typically built against another torch), every op runs its reference implementation and a single
warning says why and how to fix it. Setting ``OVSEG_NO_EXT=1`` at run time skips the extension
deliberately, without a warning.
"""

from __future__ import annotations

import os
import warnings
from types import ModuleType
from typing import Optional

import torch

__all__ = ["CAPABILITY_RANK", "extension", "extension_error", "extension_loaded", "requested_capability"]

_REBUILD_HINT = (
    "Rebuild it against the installed torch with `pip install --no-build-isolation --force-reinstall "
    "--no-deps .` (or `-e .` for a checkout); `python -m ovseg_fast.info` shows the details. Until "
    "then every op runs its plain-PyTorch reference implementation on CPU."
)


def _load() -> tuple[Optional[ModuleType], Optional[str]]:
    if os.environ.get("OVSEG_NO_EXT", "0").lower() in {"1", "true", "yes", "on"}:
        return None, "disabled by OVSEG_NO_EXT=1"
    try:
        from ovseg_fast import _C
    except ImportError as exc:
        if "No module named" in str(exc) and "_C" in str(exc):
            reason = "ovseg_fast._C is not built (installed with OVSEG_NO_EXT=1 or from a source tree)"
        else:
            reason = f"ovseg_fast._C failed to load: {exc}"
        warnings.warn(f"ovseg-fast: {reason}. {_REBUILD_HINT}", RuntimeWarning, stacklevel=3)
        return None, reason
    built_for = _C.built_for_torch()
    if built_for.split("+")[0] != torch.__version__.split("+")[0]:
        reason = f"ovseg_fast._C was built for torch {built_for} but torch {torch.__version__} is running"
        warnings.warn(f"ovseg-fast: {reason}. {_REBUILD_HINT}", RuntimeWarning, stacklevel=3)
        return None, reason
    _limit_capability_to_cpu(_C)
    return _C, None


#: The kernel copies (csrc/cpu_dispatch.h) from the narrowest to the widest vectors.
CAPABILITY_RANK = {"DEFAULT": 0, "AVX2": 1, "AVX512": 2}


def requested_capability() -> str:
    """The kernel copy torch asks for: ``ATEN_CPU_CAPABILITY`` when set, else torch's own choice (upper case)."""
    return (os.environ.get("ATEN_CPU_CAPABILITY") or torch.backends.cpu.get_cpu_capability()).upper()


def _limit_capability_to_cpu(ext: ModuleType) -> None:
    """Warns once, and keeps the process alive, when more is asked of the CPU than it can execute.

    ATen takes ``ATEN_CPU_CAPABILITY`` at its word: ``avx512`` on an AVX2-only CPU makes torch's own
    kernels and ours die with SIGILL. Our kernels never run above what the CPU supports (see
    csrc/cpu_dispatch.h); torch reads the variable lazily, at its first vectorised kernel, so lowering
    it here also saves torch's kernels whenever ovseg_fast is imported before any such kernel ran.
    """
    requested_env = os.environ.get("ATEN_CPU_CAPABILITY")
    requested = requested_capability()
    if requested not in CAPABILITY_RANK:  # another architecture's names (vsx, zvector, sve...)
        return
    supported = ext.supported_capability()
    if CAPABILITY_RANK[requested] <= CAPABILITY_RANK[supported]:
        return
    missing = [name for name, present in ext.cpu_features().items() if not present]
    masked = list(ext.masked_cpu_features())
    source = f"ATEN_CPU_CAPABILITY={requested_env}" if requested_env else "torch"
    why = f"this CPU lacks {', '.join(missing)}" + (f" (hidden by OVSEG_CPU_MASK={','.join(masked)})" if masked else "")
    cpu_best = ext.supported_capability(apply_mask=False)
    if requested_env and CAPABILITY_RANK[requested] > CAPABILITY_RANK[cpu_best]:
        os.environ["ATEN_CPU_CAPABILITY"] = cpu_best.lower()
        torch_note = f"; ATEN_CPU_CAPABILITY is lowered to {cpu_best.lower()} for torch's own kernels too"
    else:
        torch_note = ""
    warnings.warn(
        f"ovseg-fast: {source} asks for {requested} kernels but {why}: running the {supported} copy of "
        f"ovseg-fast's kernels instead{torch_note}. `python -m ovseg_fast.info` shows the requested, supported "
        "and chosen capability.",
        RuntimeWarning,
        stacklevel=4,
    )


_EXTENSION, _ERROR = _load()


def extension() -> Optional[ModuleType]:
    """The loaded ``ovseg_fast._C`` module, or None."""
    return _EXTENSION


def extension_loaded() -> bool:
    return _EXTENSION is not None


def extension_error() -> Optional[str]:
    """Why the extension is not in use, or None when it is."""
    return _ERROR
