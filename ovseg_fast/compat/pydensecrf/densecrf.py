"""pydensecrf's ``densecrf`` module on :func:`ovseg_fast.ops.dense_crf` (``import ... as dcrf``).

``DenseCRF2D`` records the unary and the pairwise terms and runs the fused CRF at ``inference``.
The kernel's model is pydensecrf's usual one: one Gaussian (smoothness) and one bilateral
(appearance) term, Potts compatibilities, diagonal kernels, symmetric normalisation. Settings
outside it (compatibility vectors or matrices, ``CONST_KERNEL``/``FULL_KERNEL``, other
normalisations, a second term of the same kind, anisotropic ``sxy``/``srgb``) raise ``ValueError``
naming the setting, so nothing silently computes a different CRF.
"""

from __future__ import annotations

from numbers import Real
from typing import Optional

import numpy as np
import torch

from ovseg_fast.ops.dense_crf import dense_crf

__all__ = [
    "CONST_KERNEL",
    "DIAG_KERNEL",
    "FULL_KERNEL",
    "NORMALIZE_AFTER",
    "NORMALIZE_BEFORE",
    "NORMALIZE_SYMMETRIC",
    "NO_NORMALIZATION",
    "DenseCRF",
    "DenseCRF2D",
]

# pydensecrf's enum values (KernelType, NormalizationType), so code comparing or passing them works.
CONST_KERNEL, DIAG_KERNEL, FULL_KERNEL = 0, 1, 2
NO_NORMALIZATION, NORMALIZE_BEFORE, NORMALIZE_AFTER, NORMALIZE_SYMMETRIC = 0, 1, 2, 3

_KERNELS = {CONST_KERNEL: "CONST_KERNEL", DIAG_KERNEL: "DIAG_KERNEL", FULL_KERNEL: "FULL_KERNEL"}
_NORMALIZATIONS = {
    NO_NORMALIZATION: "NO_NORMALIZATION",
    NORMALIZE_BEFORE: "NORMALIZE_BEFORE",
    NORMALIZE_AFTER: "NORMALIZE_AFTER",
    NORMALIZE_SYMMETRIC: "NORMALIZE_SYMMETRIC",
}
# Unaries are handed to dense_crf as probabilities exp(-(U - min_l U)) clipped here: energies above
# -log(tiny) = 87.3 above a pixel's best label weigh exp(-87) in the softmax, i.e. nothing.
_CLIP = float(np.finfo(np.float32).tiny)


def _c_type(dtype: np.dtype) -> str:
    """The C name Cython's buffer check prints for a numpy dtype (pydensecrf's error wording)."""
    names = {"float64": "double", "float32": "float", "uint8": "unsigned char", "int64": "long", "int32": "int"}
    return names.get(np.dtype(dtype).name, np.dtype(dtype).name)


def _as_array(name: str, value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(value).__name__}")
    return value


def _isotropic(name: str, value, n: int) -> float:
    """A number, or ``n`` equal numbers (pydensecrf takes per-axis values; the kernel one std)."""
    values = np.atleast_1d(np.asarray(value, dtype=np.float64)).reshape(-1)
    if values.size not in (1, n) or not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise ValueError(f"{name} must be a positive number or {n} of them, got {value!r}")
    if np.any(values != values[0]):
        raise ValueError(f"{name}={value!r}: only equal values on every axis are supported (one std per kernel)")
    return float(values[0])


def _potts(compat) -> float:
    if isinstance(compat, (Real, np.number)) or (isinstance(compat, np.ndarray) and compat.ndim == 0):
        value = float(compat)
        if not np.isfinite(value):
            raise ValueError(f"compat must be finite, got {value}")
        return value
    raise ValueError(
        f"compat must be a number (a Potts weight); compatibility vectors and matrices are not supported, got "
        f"{type(compat).__name__} of shape {np.shape(compat)}"
    )


def _check_kernel(kernel, normalization) -> None:
    if kernel != DIAG_KERNEL:
        raise ValueError(f"kernel={_KERNELS.get(kernel, kernel)!r} is not supported; only DIAG_KERNEL is")
    if normalization != NORMALIZE_SYMMETRIC:
        raise ValueError(
            f"normalization={_NORMALIZATIONS.get(normalization, normalization)!r} is not supported; "
            "only NORMALIZE_SYMMETRIC is"
        )


class DenseCRF:
    """pydensecrf's feature-space ``DenseCRF(n_nodes, n_labels)``: not supported (the kernel is for images)."""

    def __init__(self, *args, **kwargs):
        raise NotImplementedError(
            "ovseg_fast.compat.pydensecrf supports DenseCRF2D only (image CRFs with Gaussian and bilateral terms)"
        )


class DenseCRF2D:
    """pydensecrf's ``DenseCRF2D(w, h, n_labels)``: a fully connected CRF over a ``h x w`` image.

    Call ``setUnaryEnergy`` (a (n_labels, h*w) float32 array), add the pairwise terms, then
    ``inference(n)``, which returns the (n_labels, h*w) float32 marginals as a numpy array (pydensecrf
    returns an Eigen matrix that code turns into one with ``np.array``; this array serves the same uses).
    """

    def __init__(self, W: int, H: int, nlabels: int):
        for name, v in (("W", W), ("H", H), ("nlabels", nlabels)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.W, self.H, self.nlabels = int(W), int(H), int(nlabels)
        self._unary: Optional[np.ndarray] = None
        self._gaussian: Optional[tuple[float, float]] = None
        self._bilateral: Optional[tuple[float, float, float, np.ndarray]] = None

    def setUnaryEnergy(self, unary, *args) -> None:
        """``unary``: (nlabels, W*H) float32 energies (``-log`` probabilities), C order (rows of the image)."""
        if args:
            raise ValueError("setUnaryEnergy with a second argument (a LogisticUnary's features) is not supported")
        unary = _as_array("unary", unary)
        if unary.dtype != np.float32:
            raise ValueError(f"Buffer dtype mismatch, expected 'float' but got '{_c_type(unary.dtype)}'")
        n = self.W * self.H
        if unary.shape != (self.nlabels, n):
            raise ValueError(f"Bad shape for unary energy (Need {(self.nlabels, n)}, got {unary.shape})")
        if not np.all(np.isfinite(unary)):
            raise ValueError(
                "unary energy must be finite (clip probabilities before the log, as unary_from_softmax does)"
            )
        self._unary = np.array(unary, dtype=np.float32)

    def addPairwiseGaussian(self, sxy=(3, 3), compat=3, kernel=DIAG_KERNEL, normalization=NORMALIZE_SYMMETRIC) -> None:
        """Smoothness term: Potts weight ``compat``, spatial std ``sxy`` pixels."""
        if self._gaussian is not None:
            raise ValueError("a second addPairwiseGaussian term is not supported (one Gaussian term per CRF)")
        _check_kernel(kernel, normalization)
        self._gaussian = (_isotropic("sxy", sxy, 2), _potts(compat))

    def addPairwiseBilateral(
        self,
        sxy=(80, 80),
        srgb=(13, 13, 13),
        rgbim=None,
        compat=10,
        kernel=DIAG_KERNEL,
        normalization=NORMALIZE_SYMMETRIC,
    ) -> None:
        """Appearance term: Potts weight ``compat``, spatial std ``sxy``, colour std ``srgb``, ``rgbim``
        the (H, W, 3) uint8 image."""
        if self._bilateral is not None:
            raise ValueError("a second addPairwiseBilateral term is not supported (one bilateral term per CRF)")
        if rgbim is None:
            raise TypeError("Argument 'rgbim' must not be None")
        rgbim = _as_array("rgbim", rgbim)
        if rgbim.dtype != np.uint8:
            raise ValueError(f"Buffer dtype mismatch, expected 'unsigned char' but got '{_c_type(rgbim.dtype)}'")
        if rgbim.shape != (self.H, self.W, 3):
            raise ValueError(f"Bad shape for pairwise bilateral (Need {(self.H, self.W, 3)}, got {rgbim.shape})")
        _check_kernel(kernel, normalization)
        sxy_value = _isotropic("sxy", sxy, 2)
        self._bilateral = (sxy_value, _isotropic("srgb", srgb, 3), _potts(compat), np.ascontiguousarray(rgbim))

    def inference(self, niter: int) -> np.ndarray:
        """``niter`` mean-field steps; the (nlabels, W*H) float32 marginals."""
        if isinstance(niter, bool) or not isinstance(niter, (int, np.integer)) or niter < 0:
            raise ValueError(f"niter must be an int >= 0, got {niter!r}")
        if self._unary is None:
            raise ValueError("setUnaryEnergy must be called before inference")
        energy = self._unary - self._unary.min(0, keepdims=True)  # the softmax ignores per-pixel shifts
        probs = torch.from_numpy(np.exp(-energy)).reshape(self.nlabels, self.H, self.W)
        g_sxy, g_compat = self._gaussian if self._gaussian is not None else (1.0, 0.0)
        if self._bilateral is not None:
            b_sxy, b_srgb, b_compat, rgbim = self._bilateral
            image = torch.from_numpy(rgbim).permute(2, 0, 1)
        else:
            b_sxy, b_srgb, b_compat = 1.0, 1.0, 0.0
            image = torch.zeros((3, self.H, self.W), dtype=torch.uint8)
        q = dense_crf(
            probs,
            image,
            n_iters=int(niter),
            gaussian_sxy=g_sxy,
            gaussian_compat=g_compat,
            bilateral_sxy=b_sxy,
            bilateral_srgb=b_srgb,
            bilateral_compat=b_compat,
            clip=_CLIP,
        )
        return q.reshape(self.nlabels, -1).numpy()

    def _unsupported(self, name: str):
        raise NotImplementedError(
            f"DenseCRF2D.{name} is not supported by ovseg_fast.compat.pydensecrf (setUnaryEnergy, "
            "addPairwiseGaussian, addPairwiseBilateral and inference are)"
        )

    def addPairwiseEnergy(self, *args, **kwargs):
        self._unsupported("addPairwiseEnergy")

    def startInference(self, *args, **kwargs):
        self._unsupported("startInference")

    def stepInference(self, *args, **kwargs):
        self._unsupported("stepInference")

    def klDivergence(self, *args, **kwargs):
        self._unsupported("klDivergence")
