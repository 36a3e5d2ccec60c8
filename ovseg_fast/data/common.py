"""What every dataset shares: the sample format, the bad-sample error, image/label reading, class
names and zero-shot splits (package data), and the collate function.

A sample is a dict ``{"image": uint8 (3, H, W), "mask": int64 (H, W), "name": str}`` before the
transform; after it ``image`` is float32 (3, h, w) normalised with CLIP's mean/std and ``mask``
int64 (h, w). Labels are class indices in [0, C) or :data:`IGNORE_INDEX` (255), which no loss or
metric counts.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "IGNORE_INDEX",
    "BadSampleError",
    "check_labels",
    "class_names",
    "collate",
    "read_image",
    "read_label_map",
    "zero_shot_split",
]

IGNORE_INDEX = 255

#: Datasets whose class names ship as package data (ovseg_fast/data/classes/<name>.txt).
CLASS_LISTS = ("voc", "coco_stuff", "ade20k", "context59", "cityscapes")
#: Datasets with the zero-shot split of ZegCLIP/RPN/LDVC (ovseg_fast/data/classes/<name>_unseen.txt):
#: VOC 15 seen / 5 unseen, COCO-Stuff 156 / 15, PASCAL Context-59 49 / 10.
ZERO_SHOT = ("voc", "coco_stuff", "context59")


class BadSampleError(ValueError):
    """A sample that cannot be used: a corrupt image, a mask of another size, a label outside the
    class list. ``path`` names the file, ``reason`` says what is wrong."""

    def __init__(self, path: Union[str, os.PathLike], reason: str = "") -> None:
        # One-argument form: DataLoader workers re-raise an exception from its message alone.
        super().__init__(f"{path}: {reason}" if reason else str(path))
        self.path = str(path)
        self.reason = reason


def _read_lines(name: str) -> list[str]:
    text = resources.files("ovseg_fast.data").joinpath("classes", name).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def class_names(dataset: str) -> tuple[str, ...]:
    """The class names of a standard dataset, in label order (``voc``: the 20 object classes, label 0 =
    aeroplane, background not included; ``coco_stuff``: 171; ``ade20k``: 150; ``context59``: 59;
    ``cityscapes``: the 19 train ids)."""
    if dataset not in CLASS_LISTS:
        raise ValueError(f"dataset must be one of {', '.join(CLASS_LISTS)}, got {dataset!r}")
    return tuple(_read_lines(f"{dataset}.txt"))


def zero_shot_split(dataset: str) -> tuple[list[int], list[int]]:
    """(seen, unseen) class indices of ZegCLIP's zero-shot setting: VOC 15/5, COCO-Stuff 156/15,
    Context-59 49/10. Models train on the seen classes; evaluation reports mIoU on both and hIoU."""
    if dataset not in ZERO_SHOT:
        raise ValueError(f"dataset must be one of {', '.join(ZERO_SHOT)} (the zero-shot splits), got {dataset!r}")
    names = class_names(dataset)
    unseen_names = _read_lines(f"{dataset}_unseen.txt")
    unseen = sorted(names.index(n) for n in unseen_names)
    seen = [i for i in range(len(names)) if i not in set(unseen)]
    return seen, unseen


def read_image(path: Union[str, os.PathLike]) -> Tensor:
    """An RGB image file as uint8 (3, H, W); an unreadable file is a :class:`BadSampleError`."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            array = np.asarray(img.convert("RGB"))
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise BadSampleError(path, f"cannot read the image ({type(exc).__name__}: {exc})") from exc
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def read_label_map(path: Union[str, os.PathLike], lut: Optional[np.ndarray] = None) -> Tensor:
    """A label PNG (one channel, 8 or 16 bit; palette images give their indices) as int64 (H, W),
    mapped through ``lut`` (an int array indexed by the raw value; -1 marks raw values the dataset
    does not use, a :class:`BadSampleError`) when given."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            if img.mode not in ("L", "P", "I", "I;16", "1"):
                raise BadSampleError(path, f"a label map must be a single-channel image, got mode {img.mode}")
            raw = np.asarray(img).astype(np.int64)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        if isinstance(exc, BadSampleError):
            raise
        raise BadSampleError(path, f"cannot read the label map ({type(exc).__name__}: {exc})") from exc
    if lut is not None:
        if raw.size and (raw.min() < 0 or raw.max() >= len(lut)):
            raise BadSampleError(path, f"raw label {int(raw.max())} is outside the expected range [0, {len(lut)})")
        mapped = lut[raw]
        invalid = mapped < 0
        if invalid.any():
            raise BadSampleError(path, f"raw label {int(raw[invalid][0])} is not a label of this dataset")
        raw = mapped
    return torch.from_numpy(raw)


def check_labels(path: Union[str, os.PathLike], mask: Tensor, num_classes: int, image_size: Sequence[int]) -> None:
    """``mask`` (H, W) must match the image's (H, W) and hold labels in [0, C) or 255."""
    if tuple(mask.shape) != tuple(image_size):
        raise BadSampleError(
            path, f"the mask is {mask.shape[1]}x{mask.shape[0]} but its image is {image_size[1]}x{image_size[0]}"
        )
    bad = (mask >= num_classes) & (mask != IGNORE_INDEX) | (mask < 0)
    if bool(bad.any()):
        value = int(mask[bad][0])
        raise BadSampleError(path, f"label {value} is outside the {num_classes} classes (and is not {IGNORE_INDEX})")


def collate(samples: Sequence[Optional[dict[str, Any]]]) -> Optional[dict[str, Any]]:
    """Stacks samples of one size into a batch; ``None`` (a sample skipped by ``--skip-bad``) is
    dropped and counted in ``"skipped"``. An all-skipped batch is ``{"skipped": n}`` with no images."""
    kept = [s for s in samples if s is not None]
    batch: dict[str, Any] = {"skipped": len(samples) - len(kept)}
    if not kept:
        return batch
    sizes = {tuple(s["image"].shape[-2:]) for s in kept}
    if len(sizes) > 1:
        raise ValueError(
            f"cannot batch images of different sizes {sorted(sizes)}: use a transform that crops to one size, "
            "or batch size 1"
        )
    batch["image"] = torch.stack([s["image"] for s in kept])
    batch["mask"] = torch.stack([s["mask"] for s in kept])
    batch["name"] = [s["name"] for s in kept]
    return batch


def existing_dir(root: Path, *parts: str, what: str) -> Path:
    """``root/parts`` must be a directory; otherwise one error naming the layout expected."""
    path = root.joinpath(*parts)
    if not path.is_dir():
        raise FileNotFoundError(f"{what}: expected the folder {path} ({'/'.join(parts)} under {root})")
    return path
