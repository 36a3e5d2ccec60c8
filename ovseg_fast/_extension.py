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

__all__ = ["extension", "extension_error", "extension_loaded"]

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
    return _C, None


_EXTENSION, _ERROR = _load()


def extension() -> Optional[ModuleType]:
    """The loaded ``ovseg_fast._C`` module, or None."""
    return _EXTENSION


def extension_loaded() -> bool:
    return _EXTENSION is not None


def extension_error() -> Optional[str]:
    """Why the extension is not in use, or None when it is."""
    return _ERROR
