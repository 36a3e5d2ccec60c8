"""The standard-layout readers on tiny copies of each layout built in a temporary folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ovseg_fast.data import (
    IGNORE_INDEX,
    ADE20KDataset,
    BadSampleError,
    CityscapesDataset,
    COCOStuffDataset,
    PascalContext59Dataset,
    RestrictClasses,
    VOCDataset,
    build_dataset,
    zero_shot_split,
)


def _image(path: Path, h: int = 6, w: int = 8, fmt: str = "JPEG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path, fmt)


def _label(path: Path, values: np.ndarray, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(values.astype(np.uint8))
    if palette:  # VOC's label PNGs are palette images: their indices are the labels
        img = img.convert("P")
        img.putpalette([(i * 37 + c * 101) % 256 for i in range(256) for c in range(3)])
    img.save(path)


def _raw(h: int = 6, w: int = 8, values=(0, 1, 5, 255)) -> np.ndarray:
    out = np.zeros((h, w), dtype=np.int64)
    for i, v in enumerate(values):
        out[i] = v
    return out


def _voc(root: Path) -> Path:
    voc = root / "VOCdevkit" / "VOC2012"
    for i in ("a", "b"):
        _image(voc / "JPEGImages" / f"{i}.jpg")
        _label(voc / "SegmentationClass" / f"{i}.png", _raw(values=(0, 1, 20, 255)), palette=True)
        _label(voc / "SegmentationClassAug" / f"{i}.png", _raw(values=(0, 2, 3, 255)))
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("a\nb\n")
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("b\n")
    (voc / "ImageSets" / "Segmentation" / "train_aug.txt").write_text("a\nb\n")
    return voc


def test_voc_background_ignored_and_kept(tmp_path):
    voc = _voc(tmp_path)
    d = VOCDataset(tmp_path / "VOCdevkit", "train")  # the VOCdevkit folder is accepted too
    assert len(d) == 2 and len(d.class_names) == 20
    s = d[0]
    assert s["image"].shape == (3, 6, 8) and s["image"].dtype == torch.uint8
    assert s["mask"][0].unique().tolist() == [IGNORE_INDEX]  # background -> ignored
    assert s["mask"][1].unique().tolist() == [0] and s["mask"][2].unique().tolist() == [19]
    assert s["mask"][3].unique().tolist() == [IGNORE_INDEX]
    with_bg = VOCDataset(voc, "val", background=True)
    assert len(with_bg) == 1 and with_bg.class_names[0] == "background" and len(with_bg.class_names) == 21
    assert with_bg[0]["mask"][0].unique().tolist() == [0]
    aug = build_dataset("voc", "aug", str(voc))
    assert aug[0]["mask"][1].unique().tolist() == [1]


def test_voc_zero_shot_training_ignores_unseen(tmp_path):
    voc = _voc(tmp_path)
    seen, _ = zero_shot_split("voc")
    d = RestrictClasses(VOCDataset(voc, "train"), seen)
    assert len(d.class_names) == 15 and "sheep" not in d.class_names
    mask = d[0]["mask"]
    assert mask[1].unique().tolist() == [0]  # aeroplane, seen
    assert mask[2].unique().tolist() == [IGNORE_INDEX]  # tvmonitor (19), unseen


def test_missing_folders_name_the_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="root folder"):
        VOCDataset(tmp_path / "nowhere")
    (tmp_path / "JPEGImages").mkdir()
    with pytest.raises(FileNotFoundError, match="ImageSets/Segmentation"):
        VOCDataset(tmp_path)
    with pytest.raises(FileNotFoundError, match="images/training"):
        ADE20KDataset(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="leftImg8bit/val"):
        CityscapesDataset(tmp_path, "val")
    with pytest.raises(ValueError, match="split must be one of"):
        ADE20KDataset(tmp_path, "test")
    with pytest.raises(ValueError, match="needs root"):
        build_dataset("ade20k", "train")


def test_bad_samples_name_the_file(tmp_path):
    voc = _voc(tmp_path)
    (voc / "JPEGImages" / "a.jpg").write_bytes(b"not a jpeg")
    d = VOCDataset(voc, "train")
    with pytest.raises(BadSampleError, match=r"a\.jpg"):
        d[0]
    _label(voc / "SegmentationClass" / "b.png", _raw(h=5))
    with pytest.raises(BadSampleError, match=r"b.png: the mask is 8x5 but its image is 8x6"):
        d[1]
    _label(voc / "SegmentationClass" / "b.png", _raw(values=(0, 23, 1, 1)))
    with pytest.raises(BadSampleError, match=r"b\.png: raw label 23 is not a label of this dataset"):
        d[1]
    (voc / "SegmentationClass" / "b.png").unlink()
    with pytest.raises(BadSampleError, match="missing"):
        d[1]


def test_coco_stuff_converted_and_raw(tmp_path):
    conv = tmp_path / "conv"
    _image(conv / "images" / "val2017" / "0001.jpg")
    _label(conv / "annotations" / "val2017" / "0001_labelTrainIds.png", _raw(values=(0, 170, 5, 255)))
    d = COCOStuffDataset(conv, "val")
    assert len(d.class_names) == 171
    assert d[0]["mask"][:, 0].tolist() == [0, 170, 5, IGNORE_INDEX, 0, 0]
    raw = tmp_path / "raw"
    _image(raw / "images" / "train2017" / "0002.jpg")
    # raw stuffthingmaps: 0-based COCO ids; 11 (id 12) is unused, 12 -> train id 11, 181 -> 170
    _label(raw / "annotations" / "train2017" / "0002.png", _raw(values=(10, 12, 181, 255)))
    s = COCOStuffDataset(raw, "train2017")[0]
    assert s["mask"][:4, 0].tolist() == [10, 11, 170, IGNORE_INDEX]


def test_ade20k(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    _image(root / "images" / "validation" / "ADE_val_1.jpg")
    _label(root / "annotations" / "validation" / "ADE_val_1.png", _raw(values=(0, 1, 150, 3)))
    d = ADE20KDataset(tmp_path, "val")
    assert len(d.class_names) == 150 and d.class_names[0] == "wall"
    assert d[0]["mask"][:4, 0].tolist() == [IGNORE_INDEX, 0, 149, 2]


def test_context59(tmp_path):
    root = tmp_path / "VOC2010"
    _image(root / "JPEGImages" / "2008_000001.jpg")
    _label(root / "SegmentationClassContext" / "2008_000001.png", _raw(values=(0, 1, 59, 255)))
    (root / "ImageSets" / "SegmentationContext").mkdir(parents=True)
    (root / "ImageSets" / "SegmentationContext" / "val.txt").write_text("2008_000001\n")
    d = PascalContext59Dataset(tmp_path, "val")
    assert len(d.class_names) == 59
    assert d[0]["mask"][:4, 0].tolist() == [IGNORE_INDEX, 0, 58, IGNORE_INDEX]


def test_cityscapes_train_ids_and_label_ids(tmp_path):
    conv = tmp_path / "conv"
    _image(conv / "leftImg8bit" / "val" / "aachen" / "aachen_1_leftImg8bit.png", fmt="PNG")
    _label(conv / "gtFine" / "val" / "aachen" / "aachen_1_gtFine_labelTrainIds.png", _raw(values=(0, 18, 255, 3)))
    d = CityscapesDataset(conv, "val")
    assert len(d.class_names) == 19 and d[0]["name"] == "aachen_1_leftImg8bit"
    assert d[0]["mask"][:4, 0].tolist() == [0, 18, IGNORE_INDEX, 3]
    raw = tmp_path / "raw"
    _image(raw / "leftImg8bit" / "train" / "bonn" / "bonn_1_leftImg8bit.png", fmt="PNG")
    _label(raw / "gtFine" / "train" / "bonn" / "bonn_1_gtFine_labelIds.png", _raw(values=(7, 33, 0, 26)))
    assert CityscapesDataset(raw, "train")[0]["mask"][:4, 0].tolist() == [0, 18, IGNORE_INDEX, 13]
