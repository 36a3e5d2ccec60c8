"""ovseg-fast: fused kernels for open-vocabulary semantic segmentation.

``import ovseg_fast.ops`` gives the ops; ``python -m ovseg_fast.info`` explains the install.
"""

__version__ = "0.1.0"

from ovseg_fast import ops
from ovseg_fast.backends import BackendError, use_backend

__all__ = ["BackendError", "__version__", "ops", "use_backend"]
