"""Semantic-segmentation metrics from a streaming confusion matrix, across processes.

:class:`ConfusionMatrix` accumulates a (C, C) int64 matrix (rows: ground truth, columns:
prediction), one ``torch.bincount`` per batch, and :meth:`ConfusionMatrix.compute` turns it into
pixel accuracy, per-class IoU and mIoU and, for the zero-shot setting (classes split into *seen*,
trained on, and *unseen*), mIoU(seen), mIoU(unseen) and their harmonic mean hIoU (ZegCLIP's
protocol). When ``torch.distributed`` is initialised, ``compute`` sums the matrices of all
processes first (``all_reduce``), so every rank gets the metrics of the whole data set.

Conventions (mmsegmentation's ``IoUMetric``): pixels whose label is ``ignore_index`` are not
counted; the IoU of class c is TP / (TP + FP + FN); a class absent from both the labels and the
predictions has 0 / 0 = NaN IoU and is left out of every mean (``nanmean``), while a class only
predicted (never labelled) has IoU 0 and counts. Means are NaN only when no class has a defined IoU.

This module depends on torch alone (it imports nothing else of ovseg-fast), so evaluation scripts
can use it without the kernels.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import Tensor

__all__ = ["ConfusionMatrix", "SegmentationMetrics", "confusion_matrix", "harmonic_mean", "metrics_from_confusion"]


def _check_labels(name: str, value: object, ndim: int) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer class indices, got dtype {str(value.dtype).replace('torch.', '')}")
    if value.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions (B, H, W), got shape {tuple(value.shape)}")
    return value


def _check_int(name: str, value: object, minimum: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, *, ignore_index: int = 255) -> Tensor:
    """The (C, C) int64 confusion matrix of one batch: entry [t, p] counts pixels labelled t predicted p.

    Args:
        pred: (B, H, W) integer predicted classes in [0, C), or (B, C, H, W) floating scores (argmax
            over C is taken).
        target: (B, H, W) integer labels in [0, C) or ``ignore_index``.
        num_classes: C.
        ignore_index: label of pixels that are not counted (their prediction is not looked at).
    """
    _check_int("num_classes", num_classes, minimum=1)
    _check_int("ignore_index", ignore_index)
    if isinstance(pred, Tensor) and pred.dtype.is_floating_point:
        if pred.dim() != 4:
            raise ValueError(f"pred given as scores must have 4 dimensions (B, C, H, W), got shape {tuple(pred.shape)}")
        if pred.shape[1] != num_classes:
            raise ValueError(f"pred has {pred.shape[1]} classes (B, C, H, W) but num_classes is {num_classes}")
        pred = pred.argmax(1)
    _check_labels("pred", pred, 3)
    _check_labels("target", target, 3)
    if pred.shape != target.shape:
        raise ValueError(
            f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same (B, H, W) shape"
        )
    if pred.device != target.device:
        raise ValueError(f"pred is on {pred.device} but target is on {target.device}")
    valid = target != ignore_index
    t = target[valid].long()
    p = pred[valid].long()
    if t.numel():
        if int(t.min()) < 0 or int(t.max()) >= num_classes:
            bad = int(t[(t < 0) | (t >= num_classes)][0])
            raise ValueError(f"target must hold labels in [0, {num_classes}) or ignore_index={ignore_index}, got {bad}")
        if int(p.min()) < 0 or int(p.max()) >= num_classes:
            bad = int(p[(p < 0) | (p >= num_classes)][0])
            raise ValueError(f"pred must hold classes in [0, {num_classes}), got {bad}")
    counts = torch.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    return counts.view(num_classes, num_classes)


def harmonic_mean(a: float, b: float) -> float:
    """2ab / (a + b); 0 when both are 0, NaN when either is NaN."""
    if math.isnan(a) or math.isnan(b):
        return math.nan
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


def _nanmean(values: Tensor) -> float:
    defined = values[~values.isnan()]
    return float(defined.mean()) if defined.numel() else math.nan


@dataclasses.dataclass(frozen=True)
class SegmentationMetrics:
    """Metrics of a confusion matrix; IoUs and accuracies are fractions in [0, 1] (NaN: undefined).

    Attributes:
        pixel_accuracy: correctly predicted / counted pixels.
        iou: (C,) float64 per-class IoU, NaN for classes absent from labels and predictions.
        accuracy: (C,) float64 per-class accuracy (recall), NaN for classes never labelled.
        miou: nanmean of ``iou``.
        mean_accuracy: nanmean of ``accuracy``.
        seen_miou, unseen_miou, hiou: over the seen / unseen classes and their harmonic mean, None
            when no split was given.
        pixels: pixels counted.
    """

    pixel_accuracy: float
    iou: Tensor
    accuracy: Tensor
    miou: float
    mean_accuracy: float
    pixels: int
    seen_miou: Optional[float] = None
    unseen_miou: Optional[float] = None
    hiou: Optional[float] = None

    def as_dict(self, class_names: Optional[Sequence[str]] = None) -> dict[str, Any]:
        """Plain floats (JSON-ready); per-class IoUs keyed by ``class_names`` when given."""
        names = list(class_names) if class_names is not None else [str(i) for i in range(len(self.iou))]
        if len(names) != len(self.iou):
            raise ValueError(f"class_names has {len(names)} names but there are {len(self.iou)} classes")
        out: dict[str, Any] = {
            "pixel_accuracy": self.pixel_accuracy,
            "miou": self.miou,
            "mean_accuracy": self.mean_accuracy,
            "pixels": self.pixels,
            "iou": dict(zip(names, self.iou.tolist())),
        }
        if self.hiou is not None:
            out.update(seen_miou=self.seen_miou, unseen_miou=self.unseen_miou, hiou=self.hiou)
        return out


def _check_split(name: str, value: Optional[Sequence[int]], num_classes: int) -> Optional[list[int]]:
    if value is None:
        return None
    if isinstance(value, Tensor):
        value = value.tolist()
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a sequence of class indices, got {type(value).__name__}")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must hold int class indices, got {v!r}")
        if not 0 <= v < num_classes:
            raise ValueError(f"{name} holds class {v}, outside [0, {num_classes})")
        out.append(v)
    if not out:
        raise ValueError(f"{name} must not be empty")
    if len(set(out)) != len(out):
        raise ValueError(f"{name} holds a class more than once: {out}")
    return out


def metrics_from_confusion(
    matrix: Tensor, *, seen: Optional[Sequence[int]] = None, unseen: Optional[Sequence[int]] = None
) -> SegmentationMetrics:
    """Pixel accuracy, per-class IoU/accuracy, mIoU and, given ``seen`` and ``unseen`` class indices
    (disjoint, both or neither), mIoU(seen), mIoU(unseen) and hIoU, from a (C, C) confusion matrix."""
    if not isinstance(matrix, Tensor):
        raise TypeError(f"matrix must be a torch.Tensor, got {type(matrix).__name__}")
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] == 0:
        raise ValueError(f"matrix must be square (C, C) with C >= 1, got shape {tuple(matrix.shape)}")
    c = matrix.shape[0]
    seen_idx, unseen_idx = _check_split("seen", seen, c), _check_split("unseen", unseen, c)
    if (seen_idx is None) != (unseen_idx is None):
        raise ValueError("seen and unseen must be given together (the zero-shot split) or not at all")
    if seen_idx is not None and set(seen_idx) & set(unseen_idx):
        raise ValueError(f"seen and unseen share classes {sorted(set(seen_idx) & set(unseen_idx))}")
    m = matrix.detach().to("cpu", torch.float64)
    tp = m.diagonal()
    labelled = m.sum(1)
    predicted = m.sum(0)
    union = labelled + predicted - tp
    iou = tp / union  # 0/0 = NaN: class absent from labels and predictions
    accuracy = tp / labelled
    total = float(m.sum())
    result = dict(
        pixel_accuracy=float(tp.sum()) / total if total else math.nan,
        iou=iou,
        accuracy=accuracy,
        miou=_nanmean(iou),
        mean_accuracy=_nanmean(accuracy),
        pixels=int(total),
    )
    if seen_idx is not None:
        s, u = _nanmean(iou[seen_idx]), _nanmean(iou[unseen_idx])
        result.update(seen_miou=s, unseen_miou=u, hiou=harmonic_mean(s, u))
    return SegmentationMetrics(**result)


class ConfusionMatrix:
    """Streaming confusion matrix over batches (and processes).

    Args:
        num_classes: C.
        ignore_index: label of pixels that are not counted.
        seen, unseen: the zero-shot split (class indices), for mIoU(seen), mIoU(unseen) and hIoU.
        device: where the matrix accumulates (default: the device of the first batch).
        process_group: the group ``compute`` sums over when ``torch.distributed`` is initialised
            (default: the world).

    ``update(pred, target)`` adds one batch (see :func:`confusion_matrix` for the shapes);
    ``compute()`` returns :class:`SegmentationMetrics`; ``reset()`` starts over.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        ignore_index: int = 255,
        seen: Optional[Sequence[int]] = None,
        unseen: Optional[Sequence[int]] = None,
        device: Optional[torch.device] = None,
        process_group: Any = None,
    ) -> None:
        self.num_classes = _check_int("num_classes", num_classes, minimum=1)
        self.ignore_index = _check_int("ignore_index", ignore_index)
        # Validated now, so a wrong split fails before hours of evaluation, not at compute().
        metrics_from_confusion(torch.zeros(num_classes, num_classes, dtype=torch.int64), seen=seen, unseen=unseen)
        self.seen = None if seen is None else list(seen)
        self.unseen = None if unseen is None else list(unseen)
        self.process_group = process_group
        self._device = None if device is None else torch.device(device)
        self.matrix: Optional[Tensor] = None

    def reset(self) -> None:
        self.matrix = None

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        """Adds a batch: ``pred`` (B, H, W) classes or (B, C, H, W) scores, ``target`` (B, H, W) labels."""
        counts = confusion_matrix(pred, target, self.num_classes, ignore_index=self.ignore_index)
        if self.matrix is None:
            device = self._device if self._device is not None else counts.device
            self.matrix = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64, device=device)
        self.matrix += counts.to(self.matrix.device)

    def total(self) -> Tensor:
        """The accumulated matrix, summed over the process group when ``torch.distributed`` is
        initialised (a collective: every rank must call it). Zeros before any update."""
        matrix = self.matrix
        if matrix is None:
            matrix = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64, device=self._device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            matrix = matrix.clone()  # the local counts stay local: compute() twice does not double them
            torch.distributed.all_reduce(matrix, group=self.process_group)
        return matrix

    def compute(self) -> SegmentationMetrics:
        """The metrics of everything added so far (on every process: a collective when distributed)."""
        return metrics_from_confusion(self.total(), seen=self.seen, unseen=self.unseen)
