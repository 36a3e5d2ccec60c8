"""``shapes``: a synthetic segmentation dataset generated in memory, the embedded default.

Each image shows 1 to ``max_shapes`` coloured geometric shapes (circles, squares, triangles in
red, green, blue, ...) on a textured grey background (stripes of random frequency and direction plus
pixel noise, slightly tinted). The classes are ``"background"`` and every "<colour> <shape>" pair
("red circle", "blue square", ...); later shapes occlude earlier ones and the mask follows.

Sample ``i`` of a split is drawn from ``numpy.random.default_rng([seed, split, i])``: the same
arguments always give the same pixels, on any machine, with nothing stored or downloaded; ``train``
and ``val`` use different streams, so ``val`` is a held-out set of images.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["SHAPE_COLORS", "SHAPE_KINDS", "ShapesDataset"]

SHAPE_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 50, 200),
}
SHAPE_KINDS = ("circle", "square", "triangle")
_SPLITS = {"train": 0, "val": 1}


class ShapesDataset(Dataset):
    """Coloured shapes on textured backgrounds.

    Args:
        split: ``"train"`` or ``"val"`` (held-out images from another random stream).
        num_samples: images in the split.
        image_size: side of the square images.
        colors: colour names (keys of :data:`SHAPE_COLORS`).
        kinds: shape names (from :data:`SHAPE_KINDS`).
        max_shapes: at most this many shapes per image (at least 1).
        radius_range: a shape's size (circle radius, square half-diagonal-ish), as fractions of
            ``image_size``, drawn uniformly.
        seed: the generator seed.
        transform: applied to each sample dict (see :mod:`ovseg_fast.data.common`).

    Samples: ``{"image": uint8 (3, S, S), "mask": int64 (S, S), "name": "shapes-<split>-<i>"}``;
    label 0 is background, label ``1 + ci * len(kinds) + ki`` is colour ``ci`` shape ``ki``.
    """

    def __init__(
        self,
        split: str = "train",
        *,
        num_samples: int = 2000,
        image_size: int = 64,
        colors: Sequence[str] = ("red", "green", "blue"),
        kinds: Sequence[str] = SHAPE_KINDS,
        max_shapes: int = 3,
        radius_range: Sequence[float] = (0.15, 0.3),
        seed: int = 0,
        transform: Optional[Callable[[dict], dict]] = None,
    ) -> None:
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {', '.join(_SPLITS)}, got {split!r}")
        for name, value, minimum in (("num_samples", num_samples, 1), ("image_size", image_size, 16),
                                     ("max_shapes", max_shapes, 1), ("seed", seed, 0)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < minimum:
                raise ValueError(f"{name} must be >= {minimum}, got {value}")
        if len(radius_range) != 2 or not 0 < radius_range[0] <= radius_range[1] <= 0.5:
            raise ValueError(f"radius_range must be (low, high) with 0 < low <= high <= 0.5, got {radius_range!r}")
        colors, kinds = tuple(colors), tuple(kinds)
        unknown = [c for c in colors if c not in SHAPE_COLORS]
        if unknown or not colors or len(set(colors)) != len(colors):
            raise ValueError(f"colors must be distinct names from {', '.join(SHAPE_COLORS)}, got {list(colors)}")
        if not kinds or any(k not in SHAPE_KINDS for k in kinds) or len(set(kinds)) != len(kinds):
            raise ValueError(f"kinds must be distinct names from {', '.join(SHAPE_KINDS)}, got {list(kinds)}")
        self.split = split
        self.num_samples = num_samples
        self.image_size = image_size
        self.colors = colors
        self.kinds = kinds
        self.max_shapes = max_shapes
        self.radius_range = (float(radius_range[0]), float(radius_range[1]))
        self.seed = seed
        self.transform = transform
        self.class_names: tuple[str, ...] = ("background", *(f"{c} {k}" for c in colors for k in kinds))

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        index %= self.num_samples
        image, mask = self.generate(index)
        sample = {
            "image": torch.from_numpy(image).permute(2, 0, 1).contiguous(),
            "mask": torch.from_numpy(mask),
            "name": f"shapes-{self.split}-{index}",
        }
        return self.transform(sample) if self.transform is not None else sample

    def generate(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Sample ``index`` as (uint8 (S, S, 3) image, int64 (S, S) mask)."""
        rng = np.random.default_rng([self.seed, _SPLITS[self.split], index])
        s = self.image_size
        yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) + 0.5
        image = _background(rng, yy, xx)
        mask = np.zeros((s, s), dtype=np.int64)
        for _ in range(int(rng.integers(1, self.max_shapes + 1))):
            ci = int(rng.integers(len(self.colors)))
            ki = int(rng.integers(len(self.kinds)))
            radius = rng.uniform(*self.radius_range) * s
            cy, cx = rng.uniform(radius * 0.6, s - radius * 0.6, size=2)
            inside = _shape(self.kinds[ki], yy - cy, xx - cx, radius, rng.uniform(0, 2 * np.pi))
            # A little brightness jitter per shape, so colour is a range and not one exact value.
            color = np.clip(np.array(SHAPE_COLORS[self.colors[ci]], np.float32) * rng.uniform(0.85, 1.1), 0, 255)
            image[inside] = color + rng.normal(0, 6, size=(int(inside.sum()), 3))
            mask[inside] = 1 + ci * len(self.kinds) + ki
        return np.clip(image, 0, 255).astype(np.uint8), mask


def _background(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    s = yy.shape[0]
    angle = rng.uniform(0, np.pi)
    freq = rng.uniform(2, 8) * 2 * np.pi / s
    stripes = np.sin(freq * (np.cos(angle) * xx + np.sin(angle) * yy) + rng.uniform(0, 2 * np.pi))
    level = rng.uniform(80, 170) + rng.uniform(10, 35) * stripes
    tint = rng.uniform(-12, 12, size=3).astype(np.float32)
    return level[..., None] + tint + rng.normal(0, 8, size=(s, s, 3)).astype(np.float32)


def _shape(kind: str, dy: np.ndarray, dx: np.ndarray, radius: float, angle: float) -> np.ndarray:
    """Boolean mask of a shape centred at (0, 0) of circumradius-like size ``radius``, rotated by ``angle``."""
    if kind == "circle":
        return dy**2 + dx**2 <= radius**2
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * dx + s * dy, -s * dx + c * dy
    if kind == "square":
        half = radius * 0.8
        return (np.abs(u) <= half) & (np.abs(v) <= half)
    # Equilateral triangle: inside all three half-planes whose normals point 120 degrees apart.
    inside = np.ones_like(u, dtype=bool)
    for k in range(3):
        a = angle + k * 2 * np.pi / 3
        inside &= np.cos(a) * dx + np.sin(a) * dy <= radius * 0.55
    return inside
