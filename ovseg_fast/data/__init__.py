"""Datasets: readers of the standard folder layouts, unlabeled images with masks, the synthetic
``shapes`` dataset, and the joint image/mask augmentation. Imports nothing else of ovseg_fast.

``build_dataset(name, split, root=None, **options)`` opens any of them by name (what the training
configs' ``[data]`` tables name); :data:`DATASETS` lists the names. Unlabeled images with SA-1B-style
mask files (PixelCLIP's data) are read by :mod:`ovseg_fast.data.masks` (``SA1BFolder``).
"""

from __future__ import annotations

from typing import Any, Optional

from ovseg_fast.data.common import (
    IGNORE_INDEX,
    BadSampleError,
    class_names,
    collate,
    read_image,
    read_label_map,
    zero_shot_split,
)
from ovseg_fast.data.folders import (
    ADE20KDataset,
    CityscapesDataset,
    COCOStuffDataset,
    PascalContext59Dataset,
    RestrictClasses,
    SegmentationFolder,
    VOCDataset,
)
from ovseg_fast.data.shapes import ShapesDataset
from ovseg_fast.data.transforms import CLIP_MEAN, CLIP_STD, Augmented, EvalTransform, TrainTransform, normalize

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "DATASETS",
    "IGNORE_INDEX",
    "ADE20KDataset",
    "Augmented",
    "BadSampleError",
    "COCOStuffDataset",
    "CityscapesDataset",
    "EvalTransform",
    "PascalContext59Dataset",
    "RestrictClasses",
    "SegmentationFolder",
    "ShapesDataset",
    "TrainTransform",
    "VOCDataset",
    "build_dataset",
    "class_names",
    "collate",
    "normalize",
    "read_image",
    "read_label_map",
    "zero_shot_split",
]

#: Dataset names for :func:`build_dataset` and the configs.
DATASETS: dict[str, type] = {
    "shapes": ShapesDataset,
    "voc": VOCDataset,
    "coco_stuff": COCOStuffDataset,
    "ade20k": ADE20KDataset,
    "context59": PascalContext59Dataset,
    "cityscapes": CityscapesDataset,
}


def build_dataset(name: str, split: str, root: Optional[str] = None, **options: Any):
    """The dataset ``name`` (a key of :data:`DATASETS`), ``split``, read from ``root`` (every name but
    ``shapes`` needs one); ``options`` go to its constructor (e.g. ``num_samples`` for shapes,
    ``background`` for voc)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    cls = DATASETS[name]
    if name == "shapes":
        if root is not None:
            raise ValueError("the shapes dataset is generated in memory: it takes no root")
        return cls(split, **options)
    if root is None:
        raise ValueError(f"dataset {name!r} needs root, the folder it is stored in")
    return cls(root, split, **options)
