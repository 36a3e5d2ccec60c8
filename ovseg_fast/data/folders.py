"""Readers of the standard dataset layouts (as mmsegmentation and ZegCLIP expect them on disk).

Each reader checks its folders when it is opened (a missing folder is one ``FileNotFoundError``
naming the layout expected) and reads a sample when it is indexed: a corrupt image, a missing or
differently sized mask, or a label outside the class list is a :class:`BadSampleError` naming the
file. Raw labels are mapped to class indices [0, C) with 255 ignored:

=============  ===========================================================  ==================================
reader         layout under ``root``                                        labels
=============  ===========================================================  ==================================
voc            ``JPEGImages/``, ``SegmentationClass/`` (``SegmentationClass   0 (background) -> 255, 1..20 -> 0..19
               Aug/`` for ``aug``), ``ImageSets/Segmentation/<split>.txt``  (``background=True``: 21 classes)
coco_stuff     ``images/{train,val}2017/``, ``annotations/{train,val}2017/``  ``*_labelTrainIds.png``: 0..170; raw
                                                                            stuffthingmaps ``*.png``: 182 ids -> 171
ade20k         ``images/{training,validation}/``, ``annotations/...``        0 (other) -> 255, 1..150 -> 0..149
context59      ``JPEGImages/``, ``SegmentationClassContext/``,               0 (background) -> 255, 1..59 -> 0..58
               ``ImageSets/SegmentationContext/<split>.txt``
cityscapes     ``leftImg8bit/<split>/<city>/``, ``gtFine/<split>/<city>/``   ``*_labelTrainIds.png`` as is; raw
                                                                            ``*_labelIds.png`` -> the 19 train ids
=============  ===========================================================  ==================================

``voc`` also accepts the VOCdevkit folder (``root/VOC2012``), ``context59`` ``root/VOC2010``. The VOC
``aug`` split is SBD's augmented training set (10582 images) converted as mmsegmentation's
``voc_aug.py`` does: ``SegmentationClassAug/`` and ``ImageSets/Segmentation/train_aug.txt`` (or ``aug.txt``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional, Union

import numpy as np
from torch.utils.data import Dataset

from ovseg_fast.data.common import (
    IGNORE_INDEX,
    BadSampleError,
    check_labels,
    class_names,
    existing_dir,
    read_image,
    read_label_map,
)

__all__ = [
    "ADE20KDataset",
    "COCOStuffDataset",
    "CityscapesDataset",
    "PascalContext59Dataset",
    "RestrictClasses",
    "SegmentationFolder",
    "VOCDataset",
]

PathLike = Union[str, os.PathLike]


# Raw label values a dataset does not use map to -1 (read_label_map reports them as bad samples).
def _lut(mapping: dict[int, int]) -> np.ndarray:
    lut = np.full(256, -1, dtype=np.int64)
    lut[IGNORE_INDEX] = IGNORE_INDEX
    for raw, label in mapping.items():
        lut[raw] = label
    return lut


def _shift_lut(num_classes: int) -> np.ndarray:
    """0 -> 255 and k -> k - 1 for k in 1..C (mmseg's ``reduce_zero_label``); 255 stays 255."""
    return _lut({0: IGNORE_INDEX, **{k + 1: k for k in range(num_classes)}})


def _identity_lut(num_classes: int) -> np.ndarray:
    return _lut({k: k for k in range(num_classes)})


class SegmentationFolder(Dataset):
    """A list of (image file, label file) pairs with a label lookup table; the readers below fill it.

    Samples are ``{"image": uint8 (3, H, W), "mask": int64 (H, W), "name": str}`` passed through
    ``transform`` when given. ``class_names`` lists the C classes in label order.
    """

    key = ""  # the name class_names() / zero_shot_split() know this dataset by

    def __init__(
        self,
        items: Sequence[tuple[Path, Path]],
        class_names: Sequence[str],
        lut: Optional[np.ndarray],
        *,
        transform: Optional[Callable[[dict], dict]] = None,
        what: str = "dataset",
    ) -> None:
        if not items:
            raise FileNotFoundError(f"{what}: no images found")
        self.items = list(items)
        self.class_names = tuple(class_names)
        self.lut = lut
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_path, mask_path = self.items[index]
        image = read_image(image_path)
        if not mask_path.is_file():
            raise BadSampleError(mask_path, f"the label map of {image_path.name} is missing")
        mask = read_label_map(mask_path, self.lut)
        check_labels(mask_path, mask, len(self.class_names), image.shape[-2:])
        sample = {"image": image, "mask": mask, "name": image_path.stem}
        return self.transform(sample) if self.transform is not None else sample


def _split_ids(path: Path, what: str) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"{what}: expected the split list {path}")
    ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise FileNotFoundError(f"{what}: the split list {path} is empty")
    return ids


def _check_split(what: str, split: str, aliases: dict[str, str]) -> str:
    if split not in aliases:
        raise ValueError(f"{what}: split must be one of {', '.join(aliases)}, got {split!r}")
    return aliases[split]


def _sub_root(root: PathLike, child: str, marker: str, what: str) -> Path:
    if not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"{what}: root must be a path, got {type(root).__name__}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"{what}: root folder {root} does not exist")
    if not (root / marker).is_dir() and (root / child / marker).is_dir():
        return root / child
    return root


class VOCDataset(SegmentationFolder):
    """PASCAL VOC 2012 (``split``: ``train``, ``val``, ``aug``: SBD's augmented train set).

    ZegCLIP's setting is the 20 object classes with background ignored (``background=False``);
    ``background=True`` keeps it as class 0 of 21.
    """

    key = "voc"

    def __init__(self, root: PathLike, split: str = "train", *, background: bool = False, **kwargs: Any) -> None:
        what = "VOC 2012"
        split = _check_split(what, split, {"train": "train", "val": "val", "aug": "aug", "train_aug": "aug"})
        root = _sub_root(root, "VOC2012", "JPEGImages", what)
        images = existing_dir(root, "JPEGImages", what=what)
        sets = existing_dir(root, "ImageSets", "Segmentation", what=what)
        if split == "aug":
            masks = existing_dir(root, "SegmentationClassAug", what=what)
            listing = sets / "train_aug.txt" if (sets / "train_aug.txt").is_file() else sets / "aug.txt"
        else:
            masks = existing_dir(root, "SegmentationClass", what=what)
            listing = sets / f"{split}.txt"
        ids = _split_ids(listing, what)
        names = class_names("voc")
        lut = _shift_lut(len(names))
        if background:
            names = ("background", *names)
            lut = _identity_lut(len(names))
        items = [(images / f"{i}.jpg", masks / f"{i}.png") for i in ids]
        super().__init__(items, names, lut, what=what, **kwargs)


class COCOStuffDataset(SegmentationFolder):
    """COCO-Stuff 164k, 171 classes (``split``: ``train``/``train2017``, ``val``/``val2017``).

    Label files are mmsegmentation's converted ``<id>_labelTrainIds.png`` (0..170) when present, else
    the raw stuffthingmaps ``<id>.png`` (COCO ids - 1, 0..181 with 11 unused thing ids) mapped to 0..170.
    """

    key = "coco_stuff"
    # 0-based raw ids of COCO's 11 unused thing categories (ids 12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91).
    UNUSED_RAW = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)

    def __init__(self, root: PathLike, split: str = "train", **kwargs: Any) -> None:
        what = "COCO-Stuff 164k"
        split = _check_split(what, split, {"train": "train2017", "val": "val2017", "train2017": "train2017",
                                           "val2017": "val2017"})
        root = _sub_root(root, "coco_stuff164k", "images", what)
        images = existing_dir(root, "images", split, what=what)
        masks = existing_dir(root, "annotations", split, what=what)
        files = sorted(images.glob("*.jpg"))
        converted = any(masks.glob("*_labelTrainIds.png"))
        names = class_names("coco_stuff")
        if converted:
            lut = _identity_lut(len(names))
            items = [(f, masks / f"{f.stem}_labelTrainIds.png") for f in files]
        else:
            # The unused ids never occur in COCO's maps; were they there, they would be ignored as mmseg does.
            used = [i for i in range(182) if i not in self.UNUSED_RAW]
            lut = _lut({**{i: IGNORE_INDEX for i in self.UNUSED_RAW}, **{raw: k for k, raw in enumerate(used)}})
            items = [(f, masks / f"{f.stem}.png") for f in files]
        super().__init__(items, names, lut, what=f"{what} ({images})", **kwargs)


class ADE20KDataset(SegmentationFolder):
    """ADE20K-150, the ADEChallengeData2016 folder (``split``: ``train``/``training``, ``val``/``validation``)."""

    key = "ade20k"

    def __init__(self, root: PathLike, split: str = "train", **kwargs: Any) -> None:
        what = "ADE20K (ADEChallengeData2016)"
        split = _check_split(what, split, {"train": "training", "val": "validation", "training": "training",
                                           "validation": "validation"})
        root = _sub_root(root, "ADEChallengeData2016", "images", what)
        images = existing_dir(root, "images", split, what=what)
        masks = existing_dir(root, "annotations", split, what=what)
        names = class_names("ade20k")
        items = [(f, masks / f"{f.stem}.png") for f in sorted(images.glob("*.jpg"))]
        super().__init__(items, names, _shift_lut(len(names)), what=f"{what} ({images})", **kwargs)


class PascalContext59Dataset(SegmentationFolder):
    """PASCAL Context-59 in mmsegmentation's layout under VOC2010 (``split``: ``train``, ``val``)."""

    key = "context59"

    def __init__(self, root: PathLike, split: str = "train", **kwargs: Any) -> None:
        what = "PASCAL Context-59"
        split = _check_split(what, split, {"train": "train", "val": "val"})
        root = _sub_root(root, "VOC2010", "JPEGImages", what)
        images = existing_dir(root, "JPEGImages", what=what)
        masks = existing_dir(root, "SegmentationClassContext", what=what)
        ids = _split_ids(existing_dir(root, "ImageSets", "SegmentationContext", what=what) / f"{split}.txt", what)
        names = class_names("context59")
        items = [(images / f"{i}.jpg", masks / f"{i}.png") for i in ids]
        super().__init__(items, names, _shift_lut(len(names)), what=what, **kwargs)


class CityscapesDataset(SegmentationFolder):
    """Cityscapes fine annotations, 19 classes (``split``: ``train``, ``val``)."""

    key = "cityscapes"
    # Cityscapes' labelIds -> trainIds (the 19 evaluated classes; everything else ignored).
    TRAIN_IDS: ClassVar[dict[int, int]] = {
        7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13, 27: 14,
        28: 15, 31: 16, 32: 17, 33: 18,
    }

    def __init__(self, root: PathLike, split: str = "train", **kwargs: Any) -> None:
        what = "Cityscapes"
        split = _check_split(what, split, {"train": "train", "val": "val"})
        root = _sub_root(root, "cityscapes", "leftImg8bit", what)
        images = existing_dir(root, "leftImg8bit", split, what=what)
        masks = existing_dir(root, "gtFine", split, what=what)
        files = sorted(images.glob("*/*_leftImg8bit.png"))
        converted = any(masks.glob("*/*_gtFine_labelTrainIds.png"))
        suffix = "_gtFine_labelTrainIds.png" if converted else "_gtFine_labelIds.png"
        if converted:
            lut = _identity_lut(19)
        else:
            # labelIds 0..33: the 19 evaluated classes keep a train id, the others are ignored.
            lut = _lut({**{i: IGNORE_INDEX for i in range(34)}, **self.TRAIN_IDS})
        stem = len("_leftImg8bit")
        items = [(f, masks / f.parent.name / (f.stem[:-stem] + suffix)) for f in files]
        super().__init__(items, class_names("cityscapes"), lut, what=f"{what} ({images})", **kwargs)


class RestrictClasses(Dataset):
    """``dataset`` seen through a subset of its classes: label ``keep[j]`` becomes ``j``, every other
    label 255 (ZegCLIP's inductive training: the unseen classes' pixels are ignored).
    ``class_names`` is the kept names."""

    def __init__(self, dataset: Dataset, keep: Sequence[int]) -> None:
        names = tuple(dataset.class_names)
        keep = list(keep)
        if not keep or any(not 0 <= k < len(names) for k in keep):
            raise ValueError(f"keep must be non-empty class indices in [0, {len(names)}), got {keep}")
        self.dataset = dataset
        self.class_names = tuple(names[k] for k in keep)
        self.lut = np.full(256, IGNORE_INDEX, dtype=np.int64)
        self.lut[keep] = np.arange(len(keep))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        import torch

        sample = self.dataset[index]
        lut = torch.from_numpy(self.lut)
        return {**sample, "mask": lut[sample["mask"].clamp(0, 255)]}
