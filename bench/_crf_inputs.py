"""Inputs of the dense CRF benchmark and tests: natural photos with realistic class maps, and the peer
they are compared with, pydensecrf2 (both are test and bench extras)."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

__all__ = ["class_map", "photo", "pydensecrf_marginals"]


def photo(
    name: str, top: int = 0, left: int = 0, height: Optional[int] = None, width: Optional[int] = None
) -> np.ndarray:
    """A crop of one of scikit-image's bundled sample photos (H, W, 3) uint8 (no download)."""
    import skimage.data as skdata

    img = getattr(skdata, name)()
    h = img.shape[0] - top if height is None else height
    w = img.shape[1] - left if width is None else width
    if top + h > img.shape[0] or left + w > img.shape[1]:
        raise ValueError(f"{name} is {img.shape[0]}x{img.shape[1]}, smaller than the crop asked for")
    return np.ascontiguousarray(img[top : top + h, left : left + w, :3])


def class_map(img: np.ndarray, n_classes: int = 21, stride: int = 8, seed: int = 0) -> np.ndarray:
    """(C, H, W) float32 class probabilities as a segmentation network gives them: a coarse
    segmentation (k-means of the stride-8 pixels on colour and position, like a CNN's low-resolution
    output), one-hot, with Gaussian noise, bilinearly upsampled, softmax."""
    gen = torch.Generator().manual_seed(seed)
    h, w, _ = img.shape
    small = torch.from_numpy(img[::stride, ::stride]).float()
    hs, ws, _ = small.shape
    yy, xx = torch.meshgrid(torch.arange(hs), torch.arange(ws), indexing="ij")
    feats = torch.cat([small.reshape(-1, 3) / 255.0, torch.stack([yy, xx], -1).reshape(-1, 2) / max(hs, ws)], 1)
    centers = feats[torch.randperm(feats.shape[0], generator=gen)[:n_classes]]
    for _ in range(8):
        labels = torch.cdist(feats, centers).argmin(1)
        for k in range(centers.shape[0]):
            sel = labels == k
            if sel.any():
                centers[k] = feats[sel].mean(0)
    onehot = torch.nn.functional.one_hot(labels.view(hs, ws), n_classes).permute(2, 0, 1).float()
    logits = 4.0 * onehot + 1.5 * torch.randn(onehot.shape, generator=gen)
    logits = torch.nn.functional.interpolate(logits[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    return torch.softmax(logits, 0).numpy().astype(np.float32)


def pydensecrf_marginals(probs: np.ndarray, img: np.ndarray, n_iters: int, params: dict) -> np.ndarray:
    """pydensecrf2's DenseCRF2D on (C, H, W) probs and an (H, W, 3) image, with ``dense_crf``'s
    keyword parameters: (C, H, W) float32 marginals."""
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    c, h, w = probs.shape
    d = dcrf.DenseCRF2D(w, h, c)
    d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    d.addPairwiseGaussian(sxy=params["gaussian_sxy"], compat=params["gaussian_compat"])
    d.addPairwiseBilateral(
        sxy=params["bilateral_sxy"], srgb=params["bilateral_srgb"], rgbim=img, compat=params["bilateral_compat"]
    )
    return np.array(d.inference(n_iters), dtype=np.float32).reshape(c, h, w)
