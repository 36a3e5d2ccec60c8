"""What the Triton launchers ask of the GPU and of torch's settings (shared by the kernel modules).

``fp32_precision()``: float32 ``tl.dot``s follow torch's float32 CUDA matmul setting, as users of
``torch.matmul`` expect: ``"tf32"`` when ``torch.backends.cuda.matmul.fp32_precision == "tf32"`` (what
``torch.set_float32_matmul_precision("high")`` and the legacy ``allow_tf32 = True`` set), else ``"ieee"``,
torch's default (exact float32 products on CUDA cores).

``num_sms(device)``: the SM count the grids are sized for: the device's on CUDA; elsewhere (Triton's
interpreter, the static check's ``meta`` tensors) an H100's 132, the largest of the targets the static
check compiles for (``ovseg_fast.kernels.report``), so a grid sized for it covers an A100's 108 too.
"""

from __future__ import annotations

import functools
import os

import torch

#: SMs assumed where there is no CUDA device (H100 SXM)
DEFAULT_SMS = 132

#: under TRITON_INTERPRET=1 the kernels are interpreted on CPU tensors
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def fp32_precision() -> str:
    """``"tf32"`` or ``"ieee"``: the input precision of float32 ``tl.dot``s, following torch (see module doc)."""
    matmul = torch.backends.cuda.matmul
    setting = getattr(matmul, "fp32_precision", "none")
    if setting in ("tf32", "ieee"):
        return setting
    try:
        return "tf32" if matmul.allow_tf32 else "ieee"
    except RuntimeError:  # torch refuses to answer when the legacy and new APIs were mixed
        return "ieee"


@functools.cache
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """SMs of ``device`` when it is a CUDA device, else ``DEFAULT_SMS``."""
    if device.type == "cuda":
        return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
    return DEFAULT_SMS
