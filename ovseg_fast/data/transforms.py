"""Joint image/mask augmentation with torchvision's transforms v2 (ZegCLIP's mmsegmentation pipeline).

Training (:class:`TrainTransform`), in ZegCLIP's order:

1. random resize: a ratio r ~ U(0.5, 2.0) scales the target ``scale`` = (2048, 512); the image is
   resized keeping its aspect ratio to the largest size fitting in (2048 r, 512 r) (mmseg's
   ``Resize(keep_ratio=True, ratio_range=...)``), the mask with nearest neighbours;
2. random crop of ``crop_size`` (padding with 0 / the ignore label when the image is smaller);
3. horizontal flip with probability 0.5;
4. photometric distortion of the image only: torchvision's ``ColorJitter`` (brightness 0.125,
   contrast 0.5, saturation 0.5, hue 0.05, random order), torchvision's nearest equivalent of mmseg's
   ``PhotoMetricDistortion`` (which shifts brightness by +-32/255 additively: v2 scales it by
   1 +- 0.125 instead);
5. float, CLIP's mean/std.

mmseg's ``cat_max_ratio=0.75`` (re-draw crops dominated by one class) is not reproduced.

Evaluation (:class:`EvalTransform`) resizes the image to fit ``scale`` (keep ratio) and normalises it;
the mask keeps its original size, and predictions are resized to it (mmseg's protocol).

Randomness comes from torch's global generator; :class:`Augmented` seeds it per sample from
(seed, epoch, index), so a sample's augmentation does not depend on the worker, process or resume.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, Callable, Optional

import torch
from torch.utils.data import Dataset

from ovseg_fast.data.common import IGNORE_INDEX, BadSampleError

__all__ = ["CLIP_MEAN", "CLIP_STD", "Augmented", "EvalTransform", "TrainTransform", "normalize"]

#: open_clip's OPENAI_DATASET_MEAN / STD (images in [0, 1]).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _v2():
    try:
        from torchvision import tv_tensors
        from torchvision.transforms import v2
    except ImportError as exc:  # pragma: no cover - exercised by users without the extra
        msg = f"the data transforms need torchvision >= 0.16: pip install 'ovseg-fast[models]' ({exc})"
        raise ImportError(msg) from exc
    return v2, tv_tensors


def normalize(image: torch.Tensor) -> torch.Tensor:
    """uint8 (3, H, W) (or float in [0, 1]) -> float32 normalised with CLIP's mean/std."""
    v2, _ = _v2()
    image = image.float() / 255 if image.dtype == torch.uint8 else image.float()
    return v2.functional.normalize(image, list(CLIP_MEAN), list(CLIP_STD))


def _fit_size(h: int, w: int, scale: Sequence[int], ratio: float = 1.0) -> tuple[int, int]:
    long_side, short_side = max(scale) * ratio, min(scale) * ratio
    factor = min(long_side / max(h, w), short_side / min(h, w))
    return max(1, int(h * factor + 0.5)), max(1, int(w * factor + 0.5))


def _check_pair(name: str, value: Sequence[float], positive: bool = True) -> tuple:
    if not isinstance(value, Sequence) or len(value) != 2:
        raise ValueError(f"{name} must be a pair, got {value!r}")
    if positive and not all(isinstance(v, (int, float)) and v > 0 for v in value):
        raise ValueError(f"{name} must hold positive numbers, got {value!r}")
    return tuple(value)


class TrainTransform:
    """ZegCLIP's training augmentation of a sample dict (see the module docstring).

    Args:
        crop_size: side of the square crop (ZegCLIP: 512).
        scale: the (long, short) target of the random resize (ZegCLIP: (2048, 512)); None skips the resize.
        ratio_range: the range of the resize ratio (ZegCLIP: (0.5, 2.0)).
        flip: horizontal flip probability.
        photometric: whether to apply the colour distortion.
        ignore_index: the mask value of padded pixels.
    """

    def __init__(
        self,
        crop_size: int = 512,
        scale: Optional[Sequence[int]] = (2048, 512),
        ratio_range: Sequence[float] = (0.5, 2.0),
        flip: float = 0.5,
        photometric: bool = True,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        v2, tv_tensors = _v2()
        if isinstance(crop_size, bool) or not isinstance(crop_size, int) or crop_size < 1:
            raise ValueError(f"crop_size must be a positive int, got {crop_size!r}")
        self.scale = None if scale is None else _check_pair("scale", scale)
        self.ratio_range = _check_pair("ratio_range", ratio_range)
        if self.ratio_range[0] > self.ratio_range[1]:
            raise ValueError(f"ratio_range must be (low, high) with low <= high, got {ratio_range!r}")
        if not isinstance(flip, (int, float)) or not 0 <= flip <= 1:
            raise ValueError(f"flip must be a probability in [0, 1], got {flip!r}")
        self.crop_size = crop_size
        steps: list[Callable] = [
            v2.RandomCrop(
                crop_size, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: ignore_index}
            ),
            v2.RandomHorizontalFlip(flip),
        ]
        if photometric:
            steps.append(v2.RandomOrder([
                v2.ColorJitter(brightness=0.125), v2.ColorJitter(contrast=0.5),
                v2.ColorJitter(saturation=0.5), v2.ColorJitter(hue=0.05),
            ]))
        self.pipeline = v2.Compose(steps)

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        v2, tv_tensors = _v2()
        image, mask = tv_tensors.Image(sample["image"]), tv_tensors.Mask(sample["mask"])
        if self.scale is not None:
            low, high = self.ratio_range
            ratio = low + float(torch.rand(())) * (high - low)
            size = _fit_size(image.shape[-2], image.shape[-1], self.scale, ratio)
            image = v2.functional.resize(image, list(size), antialias=True)
            mask = v2.functional.resize(mask, list(size))  # a Mask resizes with nearest neighbours
        image, mask = self.pipeline(image, mask)
        return {**sample, "image": normalize(image.as_subclass(torch.Tensor)), "mask": mask.as_subclass(torch.Tensor)}


class EvalTransform:
    """Test-time preprocessing: the image resized to fit ``scale`` (keep ratio; None: unchanged) and
    normalised; the mask is left at its original size."""

    def __init__(self, scale: Optional[Sequence[int]] = (2048, 512)) -> None:
        self.scale = None if scale is None else _check_pair("scale", scale)

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        v2, _ = _v2()
        image = sample["image"]
        if self.scale is not None:
            size = _fit_size(image.shape[-2], image.shape[-1], self.scale)
            if size != tuple(image.shape[-2:]):
                image = v2.functional.resize(image, list(size), antialias=True)
        return {**sample, "image": normalize(image)}


class Augmented(Dataset):
    """``dataset`` with ``transform`` applied under a per-sample seed, and bad samples reported or skipped.

    The torch, Python ``random`` generators are seeded from (``seed``, ``epoch``, index) for each
    sample (and restored after), so the augmentation of a sample is the same in any worker, any
    process and after a resume. Call :meth:`set_epoch` at each epoch. With ``skip_bad`` a
    :class:`BadSampleError` returns ``None`` (dropped and counted by ``collate``); otherwise it is raised.
    """

    def __init__(
        self, dataset: Dataset, transform: Optional[Callable[[dict], dict]], *, seed: int = 0, skip_bad: bool = False
    ) -> None:
        self.dataset = dataset
        self.transform = transform
        self.seed = seed
        self.skip_bad = skip_bad
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Optional[dict[str, Any]]:
        try:
            sample = self.dataset[index]
            if self.transform is None:
                return sample
            seed = (self.seed * 1_000_003 + self.epoch) * 10_000_019 + int(index)
            state = random.getstate()
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed % (2**63))
                random.seed(seed)
                try:
                    return self.transform(sample)
                finally:
                    random.setstate(state)
        except BadSampleError:
            if self.skip_bad:
                return None
            raise
