"""Masks as data: class-agnostic region masks of unlabeled images (SA-1B's, or from a label map).

PixelCLIP learns from images paired with masks and no class labels. This module turns the formats
they arrive in into the tensors the model takes:

- :func:`decode_rle` / :func:`rles_to_masks`: COCO run-length encodings (SA-1B's json format, the
  compressed ``counts`` string or the uncompressed list) -> bool masks, decoded by pycocotools;
- :func:`label_map_to_masks`: an integer label map -> one bool mask per label present;
- :func:`resize_masks` (nearest) and :func:`crop_masks`: geometry that **drops** masks left with
  fewer than ``min_area`` pixels, returning the indices kept;
- :func:`random_box_masks`: ragged sets of random rectangles, padded: stand-in masks for timing a
  training step (``profile``, the benchmarks) where no mask files exist;
- :func:`pad_masks`: a batch of ragged mask sets (N_i, H, W) -> (B, M, H, W) plus a (B, M) validity
  mask, the input of ``PixelCLIP.training_step``;
- :class:`SA1BFolder`: a small reader of SA-1B-style folders (``x.jpg`` beside ``x.json``), and
  :func:`collate_masks`, a ``DataLoader`` collate that skips images left without any mask.

Images without any mask are skipped, never an error: the folder reader leaves out images whose json
lists no annotation and the collate function drops samples whose masks all vanished; both count
what they skip and log it (logger ``ovseg_fast.data.masks``).

Masks are ``torch.bool`` throughout; shapes are (N, H, W) for one image. Imports nothing else of
ovseg_fast.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "SA1BFolder",
    "collate_masks",
    "crop_masks",
    "decode_rle",
    "label_map_to_masks",
    "pad_masks",
    "random_box_masks",
    "resize_masks",
    "rles_to_masks",
]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def _mask_utils():
    try:
        from pycocotools import mask as mask_utils
    except ImportError as exc:  # pragma: no cover - exercised by users without the extra
        raise ImportError(
            f"decoding COCO RLE needs pycocotools: pip install 'ovseg-fast[models]' (importing it failed: {exc})"
        ) from exc
    return mask_utils


def _check_masks(name: str, masks: object) -> Tensor:
    if not isinstance(masks, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(masks).__name__}")
    if masks.dim() != 3:
        raise ValueError(f"{name} must have shape (N, H, W), got {tuple(masks.shape)}")
    if masks.dtype != torch.bool:
        raise TypeError(f"{name} must be torch.bool, got {masks.dtype}")
    return masks


def _check_size(name: str, size: object) -> tuple[int, int]:
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    if (
        not isinstance(size, Sequence)
        or len(size) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)
    ):
        raise ValueError(f"{name} must be a positive int or (H, W) of positive ints, got {size!r}")
    return int(size[0]), int(size[1])


def _check_min_area(min_area: object) -> int:
    if not isinstance(min_area, int) or isinstance(min_area, bool) or min_area < 1:
        raise ValueError(f"min_area must be an int >= 1, got {min_area!r}")
    return min_area


# -- decoding ----------------------------------------------------------------------------------------
def decode_rle(rle: Mapping[str, Any]) -> Tensor:
    """One COCO RLE -> (H, W) bool mask.

    ``rle`` is ``{"size": [H, W], "counts": ...}``: ``counts`` a compressed string (SA-1B, COCO
    crowd annotations; str or bytes) or the uncompressed list of run lengths.
    """
    if not isinstance(rle, Mapping) or "size" not in rle or "counts" not in rle:
        raise ValueError(f"rle must be a dict with 'size' and 'counts' (COCO RLE), got {rle!r:.200}")
    size = rle["size"]
    if not isinstance(size, Sequence) or len(size) != 2 or not all(isinstance(s, int) and s >= 0 for s in size):
        raise ValueError(f"rle['size'] must be [H, W] of non-negative ints, got {size!r}")
    counts = rle["counts"]
    mask_utils = _mask_utils()
    if isinstance(counts, list):
        if sum(counts) != size[0] * size[1]:
            raise ValueError(
                f"rle['counts'] (uncompressed) covers {sum(counts)} pixels, rle['size'] {size} needs "
                f"{size[0] * size[1]}"
            )
        encoded = mask_utils.frPyObjects({"size": list(size), "counts": counts}, size[0], size[1])
    elif isinstance(counts, (str, bytes)):
        encoded = {"size": list(size), "counts": counts.encode() if isinstance(counts, str) else counts}
    else:
        raise TypeError(f"rle['counts'] must be a str, bytes or list of ints, got {type(counts).__name__}")
    return torch.from_numpy(np.ascontiguousarray(mask_utils.decode(encoded))).bool()


def rles_to_masks(rles: Sequence[Mapping[str, Any]], size: Optional[Sequence[int]] = None) -> Tensor:
    """RLEs of one image -> (N, H, W) bool. ``size`` (H, W) gives the shape when ``rles`` is empty
    and is checked against every RLE's ``size`` otherwise."""
    if isinstance(rles, Mapping) or not isinstance(rles, Sequence):
        raise TypeError(f"rles must be a list of COCO RLE dicts, got {type(rles).__name__}")
    hw = None if size is None else _check_size("size", tuple(size))
    masks = []
    for i, rle in enumerate(rles):
        m = decode_rle(rle)
        if hw is None:
            hw = tuple(m.shape)
        elif tuple(m.shape) != hw:
            raise ValueError(f"rles[{i}] has size {list(m.shape)}, expected {list(hw)}")
        masks.append(m)
    if not masks:
        if hw is None:
            raise ValueError("rles is empty: pass size=(H, W) for the shape of an image without masks")
        return torch.zeros((0, *hw), dtype=torch.bool)
    return torch.stack(masks)


def label_map_to_masks(label_map: Tensor, *, ignore_index: Optional[int] = 255) -> tuple[Tensor, Tensor]:
    """An integer label map (H, W) -> (masks (N, H, W) bool, labels (N,) int64), one mask per label.

    Labels come sorted; pixels equal to ``ignore_index`` (None: none) belong to no mask. Used for
    DINO-style or superpixel segmentations stored as label images, and for labelled datasets whose
    classes are to be ignored.
    """
    if not isinstance(label_map, Tensor):
        raise TypeError(f"label_map must be a torch.Tensor, got {type(label_map).__name__}")
    if label_map.dim() != 2 or label_map.dtype.is_floating_point or label_map.dtype == torch.bool:
        raise ValueError(f"label_map must be an integer (H, W) tensor, got {label_map.dtype} {tuple(label_map.shape)}")
    labels = torch.unique(label_map)
    if ignore_index is not None:
        labels = labels[labels != ignore_index]
    masks = label_map.unsqueeze(0) == labels.view(-1, 1, 1)
    return masks, labels.long()


# -- geometry ----------------------------------------------------------------------------------------
def resize_masks(masks: Tensor, size: Union[int, Sequence[int]], *, min_area: int = 1) -> tuple[Tensor, Tensor]:
    """Nearest-neighbour resize of (N, H, W) bool masks to ``size``; masks with fewer than
    ``min_area`` pixels afterwards are dropped.

    Returns ``(masks (N', h, w) bool, kept (N',) int64)``, ``kept`` the indices into the input.
    PixelCLIP resizes to its mask resolution (256 x 256) with ``min_area=2`` (it drops masks of at
    most one pixel there).
    """
    _check_masks("masks", masks)
    h, w = _check_size("size", size)
    min_area = _check_min_area(min_area)
    if tuple(masks.shape[-2:]) != (h, w) and masks.shape[0]:
        # uint8 keeps the memory of SA-1B's ~100 masks per 1500x2250 image small; nearest is exact on it.
        masks = F.interpolate(masks.unsqueeze(0).to(torch.uint8), size=(h, w), mode="nearest")[0].bool()
    elif tuple(masks.shape[-2:]) != (h, w):
        masks = masks.new_zeros((0, h, w))
    return _drop_small(masks, min_area)


def crop_masks(
    masks: Tensor, top: int, left: int, height: int, width: int, *, min_area: int = 1
) -> tuple[Tensor, Tensor]:
    """The window ``[top:top+height, left:left+width]`` of (N, H, W) bool masks (inside the image),
    dropping masks with fewer than ``min_area`` pixels in it. Returns ``(masks, kept)`` as
    :func:`resize_masks`."""
    _check_masks("masks", masks)
    for name, v in (("top", top), ("left", left), ("height", height), ("width", width)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{name} must be a non-negative int, got {v!r}")
    H, W = masks.shape[-2:]
    if height == 0 or width == 0 or top + height > H or left + width > W:
        raise ValueError(
            f"crop window top={top} left={left} height={height} width={width} must be non-empty and inside "
            f"the {H}x{W} masks"
        )
    return _drop_small(masks[:, top : top + height, left : left + width], _check_min_area(min_area))


def _drop_small(masks: Tensor, min_area: int) -> tuple[Tensor, Tensor]:
    area = masks.flatten(1).sum(1)
    kept = torch.nonzero(area >= min_area).flatten()
    return masks[kept], kept


def pad_masks(mask_sets: Sequence[Tensor], *, max_masks: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """Pads ragged per-image mask sets into one batch.

    Args:
        mask_sets: B tensors (N_i, H, W) bool, same H and W, any N_i >= 0.
        max_masks: keep at most this many masks per image, the largest by area (PixelCLIP's
            ``MAX_MASKS``); None keeps all.

    Returns:
        ``(masks (B, M, H, W) bool, valid (B, M) bool)`` with M = max N_i (after ``max_masks``),
        at least 1 so the shapes stay non-empty; padded slots are all-False masks with
        ``valid == False``.
    """
    if isinstance(mask_sets, Tensor) or not isinstance(mask_sets, Sequence) or len(mask_sets) == 0:
        raise ValueError("mask_sets must be a non-empty list of (N_i, H, W) bool tensors")
    if max_masks is not None and (not isinstance(max_masks, int) or isinstance(max_masks, bool) or max_masks < 1):
        raise ValueError(f"max_masks must be None or an int >= 1, got {max_masks!r}")
    sets = []
    for i, m in enumerate(mask_sets):
        _check_masks(f"mask_sets[{i}]", m)
        if m.shape[-2:] != mask_sets[0].shape[-2:]:
            raise ValueError(
                f"mask_sets[{i}] is {tuple(m.shape[-2:])}, mask_sets[0] is {tuple(mask_sets[0].shape[-2:])}: "
                "resize them to one size first"
            )
        if max_masks is not None and m.shape[0] > max_masks:
            order = torch.argsort(m.flatten(1).sum(1), descending=True, stable=True)[:max_masks]
            m = m[order.sort().values]
        sets.append(m)
    b, h, w = len(sets), *sets[0].shape[-2:]
    m_max = max(1, max(s.shape[0] for s in sets))
    masks = torch.zeros((b, m_max, h, w), dtype=torch.bool, device=sets[0].device)
    valid = torch.zeros((b, m_max), dtype=torch.bool, device=sets[0].device)
    for i, s in enumerate(sets):
        masks[i, : s.shape[0]] = s
        valid[i, : s.shape[0]] = True
    return masks, valid


# -- an SA-1B-style folder ---------------------------------------------------------------------------
class SA1BFolder(torch.utils.data.Dataset):
    """Images with SA-1B-style json annotations: ``root/x.jpg`` beside ``root/x.json``.

    The json is SA-1B's: ``{"image": {...}, "annotations": [{"segmentation": {"size": [H, W],
    "counts": "..."}, ...}, ...]}`` (extra fields ignored). An image whose json lists no annotation
    is left out when the folder is scanned, and the number left out is logged; an image without a
    json is an error naming it (a missing json is a broken copy, not an unlabeled image).

    Args:
        root: the folder.
        size: if given, images are resized (bilinear) and masks (nearest) to this (H, W) or side;
            masks left empty are dropped.
        max_masks: at most this many masks per image, the largest (see :func:`pad_masks`).

    ``dataset[i]`` is ``{"image": uint8 (3, H, W), "masks": bool (N, H, W), "file_name": str}``;
    N may be 0 after resizing (:func:`collate_masks` then skips the sample).
    """

    def __init__(
        self,
        root: Union[str, os.PathLike],
        *,
        size: Optional[Union[int, Sequence[int]]] = None,
        max_masks: Optional[int] = None,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"root: {self.root} is not a directory")
        self.size = None if size is None else _check_size("size", size)
        if max_masks is not None and (not isinstance(max_masks, int) or isinstance(max_masks, bool) or max_masks < 1):
            raise ValueError(f"max_masks must be None or an int >= 1, got {max_masks!r}")
        self.max_masks = max_masks
        images = sorted(p for p in self.root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise FileNotFoundError(f"root: no image ({', '.join(IMAGE_SUFFIXES)}) in {self.root}")
        self.items: list[tuple[Path, Path]] = []
        self.skipped: list[str] = []
        for img in images:
            ann = img.with_suffix(".json")
            if not ann.is_file():
                raise FileNotFoundError(f"{img.name} has no annotation file {ann.name} in {self.root}")
            if self._annotations(ann):
                self.items.append((img, ann))
            else:
                self.skipped.append(img.name)
        if self.skipped:
            log.info("SA1BFolder(%s): skipped %d image(s) without any mask", self.root, len(self.skipped))

    @staticmethod
    def _annotations(path: Path) -> list[dict]:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: not a readable json file: {exc}") from exc
        anns = data.get("annotations") if isinstance(data, dict) else None
        if not isinstance(anns, list):
            raise ValueError(f"{path}: expected SA-1B's format, a dict with an 'annotations' list")
        return anns

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from torchvision.io import ImageReadMode, decode_image, read_file

        img_path, ann_path = self.items[index]
        image = decode_image(read_file(str(img_path)), mode=ImageReadMode.RGB)
        anns = self._annotations(ann_path)
        for i, a in enumerate(anns):
            if not isinstance(a, dict) or "segmentation" not in a:
                raise ValueError(f"{ann_path}: annotations[{i}] has no 'segmentation' (COCO RLE)")
        masks = rles_to_masks([a["segmentation"] for a in anns], size=image.shape[-2:])
        if masks.shape[-2:] != image.shape[-2:]:
            raise ValueError(f"{ann_path}: masks are {tuple(masks.shape[-2:])}, the image {tuple(image.shape[-2:])}")
        if self.max_masks is not None and masks.shape[0] > self.max_masks:
            masks = pad_masks([masks], max_masks=self.max_masks)[0][0]
        if self.size is not None:
            image = F.interpolate(image.unsqueeze(0).float(), size=self.size, mode="bilinear", align_corners=False)
            image = image[0].round().clamp(0, 255).to(torch.uint8)
            masks, _ = resize_masks(masks, self.size)
        return {"image": image, "masks": masks, "file_name": img_path.name}


class _SkipCounter:
    total = 0


def random_box_masks(
    batch: int, max_masks: int, size: int, *, generator: Optional[torch.Generator] = None
) -> tuple[Tensor, Tensor]:
    """Random axis-aligned rectangles: (B, M, S, S) bool masks and their (B, M) validity, with
    between ``max_masks // 2`` (at least 1) and ``max_masks`` valid masks per image, each side 8
    to ``size // 2`` pixels (at most ``size``). For timing and tests, not for training."""
    for name, value, minimum in (("batch", batch, 1), ("max_masks", max_masks, 1), ("size", size, 1)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {value}")
    masks = torch.zeros(batch, max_masks, size, size, dtype=torch.bool)
    valid = torch.zeros(batch, max_masks, dtype=torch.bool)
    low_side, high_side = min(8, size), max(min(8, size), size // 2)
    for b in range(batch):
        n = int(torch.randint(max(1, max_masks // 2), max_masks + 1, (1,), generator=generator))
        valid[b, :n] = True
        sides = torch.randint(low_side, high_side + 1, (n, 2), generator=generator)
        for i, (h, w) in enumerate(sides.tolist()):
            y, x = (int(torch.randint(0, size - side + 1, (1,), generator=generator)) for side in (h, w))
            masks[b, i, y : y + h, x : x + w] = True
    return masks, valid


def collate_masks(samples: Sequence[Mapping[str, Any]], *, max_masks: Optional[int] = None) -> Optional[dict[str, Any]]:
    """``DataLoader`` collate for samples ``{"image": (3, H, W), "masks": (N, H, W) bool, ...}``.

    Samples with no mask are skipped (counted and logged, the running total in the message);
    returns None when none is left, else ``{"images": (B, 3, H, W), "masks": (B, M, H, W) bool,
    "valid": (B, M) bool, "file_names": [...]}`` (:func:`pad_masks`). Images must share one size.
    """
    kept = [s for s in samples if s["masks"].shape[0] > 0]
    skipped = len(samples) - len(kept)
    if skipped:
        _SkipCounter.total += skipped
        log.info("collate_masks: skipped %d image(s) without any mask (%d so far)", skipped, _SkipCounter.total)
    if not kept:
        return None
    sizes = {tuple(s["image"].shape) for s in kept}
    if len(sizes) > 1:
        raise ValueError(f"collate_masks: images must share one shape, got {sorted(sizes)}")
    masks, valid = pad_masks([s["masks"] for s in kept], max_masks=max_masks)
    return {
        "images": torch.stack([s["image"] for s in kept]),
        "masks": masks,
        "valid": valid,
        "file_names": [s.get("file_name", "") for s in kept],
    }
