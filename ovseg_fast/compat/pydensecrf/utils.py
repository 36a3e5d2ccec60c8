"""pydensecrf's ``utils.unary_from_softmax`` and ``utils.unary_from_labels`` (same arguments, same results)."""

from __future__ import annotations

from numbers import Real
from typing import Optional

import numpy as np

__all__ = ["unary_from_labels", "unary_from_softmax"]


def unary_from_softmax(sm, scale: Optional[float] = None, clip: Optional[float] = 1e-5) -> np.ndarray:
    """Unary energies ``-log(p)`` from class probabilities.

    Args:
        sm: (C, ...) array of probabilities, classes first; the other dims are flattened.
        scale: if given, in (0, 1]: probabilities are first mixed with the uniform distribution,
            ``scale * p + (1 - scale) / C``.
        clip: probabilities are clipped to ``[clip, 1]`` before the log (None: no clipping).

    Returns:
        (C, prod(rest)) float32 C-contiguous, ready for ``DenseCRF2D.setUnaryEnergy``.
    """
    sm = np.asarray(sm)
    if sm.ndim < 1 or not np.issubdtype(sm.dtype, np.floating):
        raise ValueError(f"sm must be a floating array of class probabilities (C, ...), got {sm.dtype} {sm.shape}")
    n_classes = sm.shape[0]
    if scale is not None:
        if not isinstance(scale, Real) or not 0 < scale <= 1:
            raise ValueError(f"`scale` needs to be in (0,1], got {scale!r}")
        # In float64, as pydensecrf's float64 uniform array makes it: the energies then round alike.
        sm = scale * sm + (1 - scale) * np.full(sm.shape, 1.0 / n_classes)
    if clip is not None:
        sm = np.clip(sm, clip, 1.0)
    return np.ascontiguousarray(-np.log(sm).reshape(n_classes, -1), dtype=np.float32)


def unary_from_labels(labels, n_labels: int, gt_prob: float, zero_unsure: bool = True) -> np.ndarray:
    """Unary energies from a label map, trusting each label with probability ``gt_prob``.

    Args:
        labels: integer label map of any shape (flattened). With ``zero_unsure``, 0 means "unknown"
            and label ``l >= 1`` is class ``l - 1``; otherwise label ``l`` is class ``l``.
        n_labels: number of classes (not counting the 0 of ``zero_unsure``), >= 2.
        gt_prob: probability of the given label, in (0, 1); the rest is spread evenly over the others.
        zero_unsure: see ``labels``; unknown pixels get the uniform energy ``log(n_labels)``.

    Returns:
        (n_labels, labels.size) float32.
    """
    if not 0 < gt_prob < 1:
        raise ValueError(f"`gt_prob must be in (0,1), got {gt_prob!r}")
    if isinstance(n_labels, bool) or not isinstance(n_labels, (int, np.integer)) or n_labels < 2:
        raise ValueError(f"n_labels must be an int >= 2, got {n_labels!r}")
    labels = np.asarray(labels).reshape(-1)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be an integer label map, got dtype {labels.dtype}")
    classes = labels - 1 if zero_unsure else labels
    known = labels != 0 if zero_unsure else np.ones(labels.shape, dtype=bool)
    if known.any() and (classes[known].min() < 0 or classes[known].max() >= n_labels):
        raise ValueError(
            f"labels must be in [{int(zero_unsure)}, {n_labels - 1 + int(zero_unsure)}] for n_labels={n_labels} "
            f"and zero_unsure={zero_unsure}, got values in [{labels.min()}, {labels.max()}]"
        )
    unary = np.full((n_labels, labels.size), -np.log((1.0 - gt_prob) / (n_labels - 1)), dtype=np.float32)
    idx = np.nonzero(known)[0]
    unary[classes[idx], idx] = -np.log(gt_prob)
    unary[:, ~known] = np.log(n_labels)
    return unary
