"""Segmentation losses on pixel-class logits, each with an ignore index and without Python loops.

Every loss takes ``logits`` (B, C, H, W), floating (float16/bfloat16 are computed in float32), and
``targets`` (B, H, W) int64 class indices in ``[0, C)`` or ``ignore_index``. Ignored pixels add
nothing to a loss or to its normaliser; a batch with every pixel ignored gives a loss of exactly 0
(with zero, finite gradients) rather than NaN.

The focal + dice pair is the one ZegCLIP trains with (``models/losses/criterion.py`` and
``atm_loss.py`` of ZiqinZhou66/ZegCLIP: ``sigmoid_focal_loss`` with alpha 0.25, gamma 2, the dice
loss with +1 smoothing, each per class mask and divided by the number of ground-truth masks in the
batch) and that RPN (liblacklucy/RPN, built on ZegCLIP's code) and LDVC reuse. Both repositories'
configs weight them ``mask_weight=100.0`` (focal) and ``dice_weight=1.0`` (their criterion's own
default, 20, is commented out in every config): :data:`FOCAL_WEIGHT`, :data:`DICE_WEIGHT`.
Deliberate difference: ZegCLIP counts pixels labelled 255 as negatives of every class in the focal
loss and as predicted area in the dice loss; here they are ignored, which is what ``ignore_index``
means everywhere else (mmseg's cross entropy). And ZegCLIP divides by the number of masks averaged
over the processes (an all-reduce); here it is the local batch's, so under data parallelism ranks
with more classes in their crops weigh a little less.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ovseg_fast.ops._checks import check_choice, check_float, check_int, check_tensor

__all__ = [
    "DICE_WEIGHT",
    "FOCAL_WEIGHT",
    "binary_cross_entropy",
    "cross_entropy",
    "dice_loss",
    "focal_dice_losses",
    "one_hot_targets",
    "sigmoid_focal_loss",
]

#: ZegCLIP's / RPN's weight of the sigmoid focal loss (``mask_weight`` in their configs).
FOCAL_WEIGHT = 100.0
#: ZegCLIP's / RPN's weight of the dice loss (``dice_weight``).
DICE_WEIGHT = 1.0

_REDUCTIONS = ("mean", "sum", "none")
_MASK_REDUCTIONS = ("masks", "mean", "sum", "none")


def _class_weights(name: str, weight: Tensor, logits: Tensor) -> Tensor:
    """A (C,) per-class weight checked against ``logits`` (B, C, H, W), in the logits' dtype."""
    c = logits.shape[1]
    check_tensor(name, weight, ndim=(1,))
    if weight.shape[0] != c:
        raise ValueError(f"{name} must have shape (C,) = ({c},), got {tuple(weight.shape)}")
    if weight.device != logits.device:
        raise ValueError(f"{name} is on {weight.device} but logits is on {logits.device}")
    return weight.to(logits.dtype)


def _check_inputs(logits: object, targets: object, ignore_index: object) -> tuple[Tensor, Tensor]:
    """Checks shapes, dtypes, devices and label values; returns float logits (at least float32)
    and the valid-pixel mask (B, H, W)."""
    check_tensor("logits", logits, ndim=(4,))
    check_tensor("targets", targets, ndim=(3,), dtypes=(torch.int64,))
    check_int("ignore_index", ignore_index)
    assert isinstance(logits, Tensor) and isinstance(targets, Tensor) and isinstance(ignore_index, int)
    b, c, h, w = logits.shape
    if targets.shape != (b, h, w):
        raise ValueError(
            f"targets must have shape (B, H, W) = {(b, h, w)} to match logits {tuple(logits.shape)}, got "
            f"{tuple(targets.shape)} (resize the logits to the labels first, e.g. F.interpolate(..., mode='bilinear'))"
        )
    if targets.device != logits.device:
        raise ValueError(f"targets is on {targets.device} but logits is on {logits.device}")
    if c == 0:
        raise ValueError("logits must have at least one class (C >= 1), got C = 0")
    valid = targets != ignore_index
    if targets.numel():
        labels = targets[valid]
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= c):
            bad = labels[(labels < 0) | (labels >= c)][0]
            raise ValueError(
                f"targets must hold class indices in [0, {c}) or ignore_index={ignore_index}, got {int(bad)}"
            )
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return logits, valid


def one_hot_targets(targets: Tensor, num_classes: int, ignore_index: int = 255) -> Tensor:
    """(B, H, W) int64 labels -> (B, C, H, W) bool one-hot masks; ignored pixels are all False (also
    when ``ignore_index`` is itself a class index, e.g. 0 for "background is not a class")."""
    check_tensor("targets", targets, ndim=(3,), dtypes=(torch.int64,))
    check_int("num_classes", num_classes, minimum=1)
    check_int("ignore_index", ignore_index)
    classes = torch.arange(num_classes, device=targets.device).view(1, -1, 1, 1)
    return (targets.unsqueeze(1) == classes) & (targets != ignore_index).unsqueeze(1)


def _reduce_elements(loss: Tensor, count: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "sum":
        return total
    return total / count.clamp(min=1)


def _num_masks(onehot: Tensor) -> Tensor:
    """Ground-truth masks in the batch: (image, class) pairs with at least one pixel, at least 1."""
    return onehot.flatten(2).any(2).sum().clamp(min=1)


def sigmoid_focal_loss(
    logits: Tensor,
    targets: Tensor,
    *,
    alpha: float = 0.25,
    gamma: float = 2.0,
    ignore_index: int = 255,
    reduction: str = "masks",
) -> Tensor:
    """RetinaNet's sigmoid focal loss, one binary problem per class and pixel (ZegCLIP's form).

    Per element, with p = sigmoid(x), y the one-hot target and p_t = p y + (1 - p)(1 - y):
    ``FL = -alpha_t (1 - p_t)^gamma log(p_t)``, alpha_t = alpha y + (1 - alpha)(1 - y) (no alpha
    weighting when ``alpha < 0``), as ``torchvision.ops.sigmoid_focal_loss``.

    Args:
        logits: (B, C, H, W) floating.
        targets: (B, H, W) int64, class indices or ``ignore_index``.
        alpha, gamma: the focal parameters (defaults: the paper's and ZegCLIP's).
        ignore_index: label of pixels that add nothing.
        reduction: ``"masks"`` (ZegCLIP): per (image, class) mask the mean over the image's valid
            pixels, summed over all B*C masks and divided by the number of ground-truth masks in
            the batch (pairs whose class occurs in the image, at least 1); ``"mean"``: the mean over
            valid elements (B * C * valid pixels; torchvision's mean when nothing is ignored);
            ``"sum"``; ``"none"``: (B, C, H, W), 0 at ignored pixels.
    """
    logits, valid = _check_inputs(logits, targets, ignore_index)
    check_float("alpha", alpha, minimum=None)
    if alpha > 1:
        raise ValueError(f"alpha must be <= 1 (or < 0 for no weighting), got {alpha}")
    check_float("gamma", gamma, minimum=0.0)
    check_choice("reduction", reduction, _MASK_REDUCTIONS)
    c = logits.shape[1]
    onehot = one_hot_targets(targets, c, ignore_index)
    y = onehot.to(logits.dtype)
    ce = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
    p = torch.sigmoid(logits)
    p_t = p * y + (1 - p) * (1 - y)
    loss = ce * (1 - p_t).pow(gamma)
    if alpha >= 0:
        loss = loss * (alpha * y + (1 - alpha) * (1 - y))
    mask = valid.unsqueeze(1)
    loss = loss * mask
    if reduction == "masks":
        pixels = valid.flatten(1).sum(1).clamp(min=1).to(loss.dtype)  # valid pixels per image
        per_mask = loss.flatten(2).sum(2) / pixels.unsqueeze(1)
        return per_mask.sum() / _num_masks(onehot)
    return _reduce_elements(loss, valid.sum() * c, reduction)


def dice_loss(
    logits: Tensor,
    targets: Tensor,
    *,
    ignore_index: int = 255,
    smooth: float = 1.0,
    reduction: str = "masks",
) -> Tensor:
    """Sigmoid dice loss per (image, class) mask, over the valid pixels (ZegCLIP's form).

    ``1 - (2 sum(p y) + smooth) / (sum(p) + sum(y) + smooth)`` with p = sigmoid(logits), y the
    one-hot target, sums over the image's non-ignored pixels.

    Args:
        logits: (B, C, H, W) floating.
        targets: (B, H, W) int64, class indices or ``ignore_index``.
        smooth: added to numerator and denominator (ZegCLIP: 1).
        reduction: ``"masks"`` (ZegCLIP): the sum over the ground-truth masks only (classes present
            in the image) divided by their number, 0 if there are none; ``"mean"``: the mean over all
            B*C masks; ``"sum"``: the sum over all masks; ``"none"``: (B, C) per-mask losses.
    """
    logits, valid = _check_inputs(logits, targets, ignore_index)
    check_float("smooth", smooth, minimum=0.0)
    check_choice("reduction", reduction, _MASK_REDUCTIONS)
    onehot = one_hot_targets(targets, logits.shape[1], ignore_index)
    y = onehot.to(logits.dtype).flatten(2)
    p = (torch.sigmoid(logits) * valid.unsqueeze(1)).flatten(2)
    denom = p.sum(2) + y.sum(2) + smooth
    # smooth=0 with an empty mask and no predicted area is 0/0: that mask is perfectly predicted.
    ratio = torch.where(denom > 0, (2 * (p * y).sum(2) + smooth) / denom.clamp(min=torch.finfo(p.dtype).tiny), 1.0)
    per_mask = 1 - ratio
    if reduction == "masks":
        present = onehot.flatten(2).any(2)
        return (per_mask * present).sum() / _num_masks(onehot)
    if reduction == "none":
        return per_mask
    return per_mask.sum() if reduction == "sum" else per_mask.mean()


def binary_cross_entropy(
    logits: Tensor,
    targets: Tensor,
    *,
    ignore_index: int = 255,
    pos_weight: Optional[Tensor] = None,
    reduction: str = "mean",
) -> Tensor:
    """One-vs-all binary cross entropy of every class at every valid pixel.

    Args:
        logits: (B, C, H, W) floating.
        targets: (B, H, W) int64, class indices or ``ignore_index``.
        pos_weight: optional (C,) weight of each class's positive term (as
            ``F.binary_cross_entropy_with_logits``).
        reduction: ``"mean"`` over valid elements (B * C * valid pixels), ``"sum"``, or ``"none"``
            ((B, C, H, W), 0 at ignored pixels).
    """
    logits, valid = _check_inputs(logits, targets, ignore_index)
    check_choice("reduction", reduction, _REDUCTIONS)
    c = logits.shape[1]
    if pos_weight is not None:
        pos_weight = _class_weights("pos_weight", pos_weight, logits).view(c, 1, 1)
    y = one_hot_targets(targets, c, ignore_index).to(logits.dtype)
    loss = F.binary_cross_entropy_with_logits(logits, y, reduction="none", pos_weight=pos_weight)
    loss = loss * valid.unsqueeze(1)
    return _reduce_elements(loss, valid.sum() * c, reduction)


def cross_entropy(
    logits: Tensor,
    targets: Tensor,
    *,
    ignore_index: int = 255,
    weight: Optional[Tensor] = None,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> Tensor:
    """Softmax cross entropy over the classes at every valid pixel (mmseg's ``CrossEntropyLoss``).

    Args:
        logits: (B, C, H, W) floating.
        targets: (B, H, W) int64, class indices or ``ignore_index``.
        weight: optional (C,) class weights; ``"mean"`` then divides by the summed weights of the
            valid pixels' classes, as ``F.cross_entropy``.
        label_smoothing: as ``F.cross_entropy``.
        reduction: ``"mean"`` over valid pixels (0 when all are ignored, where ``F.cross_entropy``
            gives NaN), ``"sum"``, or ``"none"`` ((B, H, W), 0 at ignored pixels).
    """
    logits, valid = _check_inputs(logits, targets, ignore_index)
    check_choice("reduction", reduction, _REDUCTIONS)
    check_float("label_smoothing", label_smoothing, minimum=0.0)
    if label_smoothing > 1:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if weight is not None:
        weight = _class_weights("weight", weight, logits)
    # F.cross_entropy's own ignore_index must be a valid Python int; the safe labels keep gather in range.
    safe = torch.where(valid, targets, 0)
    loss = F.cross_entropy(logits, safe, weight=weight, reduction="none", label_smoothing=label_smoothing)
    loss = loss * valid
    if reduction != "mean":
        return _reduce_elements(loss, valid.sum(), reduction)
    if weight is None:
        norm = valid.sum().clamp(min=1).to(loss.dtype)
    else:
        norm = (weight[safe] * valid).sum()
        norm = torch.where(norm > 0, norm, torch.ones_like(norm))  # all ignored (or zero weights): 0, not NaN
    return loss.sum() / norm


def focal_dice_losses(
    logits: Tensor,
    targets: Tensor,
    *,
    ignore_index: int = 255,
    focal_weight: float = FOCAL_WEIGHT,
    dice_weight: float = DICE_WEIGHT,
) -> dict[str, Tensor]:
    """ZegCLIP's / RPN's training loss: ``{"loss_focal": w_f * focal, "loss_dice": w_d * dice}``.

    Both with their ``"masks"`` normalisation; sum the values for the total. A model's ``loss``
    can return this dict as is.
    """
    check_float("focal_weight", focal_weight, minimum=0.0)
    check_float("dice_weight", dice_weight, minimum=0.0)
    return {
        "loss_focal": focal_weight * sigmoid_focal_loss(logits, targets, ignore_index=ignore_index),
        "loss_dice": dice_weight * dice_loss(logits, targets, ignore_index=ignore_index),
    }
