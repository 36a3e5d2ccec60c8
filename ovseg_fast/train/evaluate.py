"""Zero-shot evaluation: whole or sliding-window inference into the streaming confusion matrix.

Each process evaluates every ``world``-th sample (no sample twice, none padded in) and the matrices
are all-reduced by :class:`ovseg_fast.metrics.ConfusionMatrix`, so every rank gets the metrics of the
whole set. Predictions are made on the transformed image and resized (bilinearly, as probabilities)
to the label map's original size.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ovseg_fast.metrics import ConfusionMatrix, SegmentationMetrics

__all__ = ["evaluate", "format_metrics"]


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def evaluate(
    model: torch.nn.Module,
    dataset: Dataset,
    class_names: Sequence[str],
    *,
    seen: Optional[Sequence[int]] = None,
    unseen: Optional[Sequence[int]] = None,
    mode: str = "whole",
    crop: int = 512,
    stride: int = 341,
    device: Optional[torch.device] = None,
    amp: Optional[torch.dtype] = None,
    max_samples: int = 0,
    progress: bool = False,
) -> tuple[SegmentationMetrics, int]:
    """Metrics of ``model`` (a ``Segmentor``) on ``dataset`` (samples already transformed: float
    (3, H, W) image, int64 (H0, W0) mask; ``None`` samples, skipped bad data, are counted).

    Returns (metrics over all processes, samples skipped over all processes).
    """
    from ovseg_fast.models.base import Segmentor

    if not isinstance(model, Segmentor):
        raise TypeError(f"model must be a Segmentor, got {type(model).__name__}")
    rank, world = _dist()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    matrix = ConfusionMatrix(len(class_names), seen=seen, unseen=unseen, device=device)
    total = len(dataset) if not max_samples else min(max_samples, len(dataset))
    indices = range(rank, total, world)
    skipped = 0
    autocast = (
        torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()
    )
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=len(indices), desc="eval", unit="img", dynamic_ncols=True, leave=False)
    with torch.no_grad(), autocast:
        text = model.encode(list(class_names))
        for i in indices:
            sample = dataset[i]
            if bar is not None:
                bar.update(1)
            if sample is None:
                skipped += 1
                continue
            image = sample["image"].unsqueeze(0).to(device)
            mask = sample["mask"].unsqueeze(0).to(device)
            probs = model.predict(image, text, mode=mode, crop=crop, stride=stride)
            if probs.shape[-2:] != mask.shape[-2:]:
                probs = F.interpolate(probs, size=mask.shape[-2:], mode="bilinear", align_corners=False)
            matrix.update(probs.argmax(1), mask)
    if bar is not None:
        bar.close()
    counts = torch.tensor([skipped], dtype=torch.int64, device=device)
    if world > 1:
        torch.distributed.all_reduce(counts)
    return matrix.compute(), int(counts.item())


def format_metrics(metrics: Union[SegmentationMetrics, dict[str, Any]]) -> str:
    """The table printed after an evaluation: pAcc, mIoU, mIoU(seen), mIoU(unseen), hIoU in percent
    (of metrics or of their JSON record)."""
    record = metrics.as_dict() if isinstance(metrics, SegmentationMetrics) else metrics

    def pct(key: str) -> str:
        v = record.get(key)
        return "-" if v is None else f"{100 * v:.2f}"

    head = ["pAcc", "mIoU", "mIoU(seen)", "mIoU(unseen)", "hIoU"]
    row = [pct(k) for k in ("pixel_accuracy", "miou", "seen_miou", "unseen_miou", "hiou")]
    widths = [max(len(h), len(r)) for h, r in zip(head, row)]
    line = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", line(row)])


def metrics_record(metrics: SegmentationMetrics, class_names: Sequence[str], **extra: Any) -> dict[str, Any]:
    """The JSON record of an evaluation: the metrics with per-class IoU keyed by class name."""
    return {**extra, **metrics.as_dict(list(class_names))}
