"""The public ops of ovseg-fast.

Each op is one function (plus an ``nn.Module`` where parameters belong) with a plain-PyTorch
reference, a fused C++ CPU kernel and a fused Triton GPU kernel behind it, chosen per call (see
:mod:`ovseg_fast.backends`; override with :func:`use_backend` or ``OVSEG_BACKEND``).
"""

from ovseg_fast.backends import BackendError, use_backend
from ovseg_fast.ops.sinkhorn import Sinkhorn, sinkhorn

__all__ = ["BackendError", "Sinkhorn", "sinkhorn", "use_backend"]
