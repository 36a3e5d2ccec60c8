"""ovseg_fast.data.masks: RLE and label maps to masks, resize/crop dropping empty masks, padding, SA-1B folders."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from ovseg_fast.data.masks import (
    SA1BFolder,
    collate_masks,
    crop_masks,
    decode_rle,
    label_map_to_masks,
    pad_masks,
    random_box_masks,
    resize_masks,
    rles_to_masks,
)

mask_utils = pytest.importorskip("pycocotools.mask")


def _rle(mask: np.ndarray) -> dict:
    enc = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in enc["size"]], "counts": enc["counts"].decode()}


def _random_masks(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.random((n, h, w)) > 0.6


def test_decode_rle_compressed_string_round_trips():
    masks = _random_masks(3, 7, 11)
    for m in masks:
        assert torch.equal(decode_rle(_rle(m)), torch.from_numpy(m))


def test_decode_rle_uncompressed_counts():
    # Column-major runs (COCO's order): 2 zeros, 3 ones, 1 zero over a 3x2 image.
    out = decode_rle({"size": [3, 2], "counts": [2, 3, 1]})
    expected = torch.tensor([[False, True], [False, True], [True, False]])
    assert torch.equal(out, expected)


def test_decode_rle_rejects_bad_input():
    with pytest.raises(ValueError, match="rle must be a dict"):
        decode_rle({"counts": "abc"})
    with pytest.raises(ValueError, match="covers 5 pixels"):
        decode_rle({"size": [3, 2], "counts": [2, 3]})
    with pytest.raises(TypeError, match="rle\\['counts'\\]"):
        decode_rle({"size": [3, 2], "counts": 7})


def test_rles_to_masks_stack_and_empty():
    masks = _random_masks(4, 5, 6, seed=1)
    out = rles_to_masks([_rle(m) for m in masks])
    assert out.dtype == torch.bool and torch.equal(out, torch.from_numpy(masks))
    assert rles_to_masks([], size=(5, 6)).shape == (0, 5, 6)
    with pytest.raises(ValueError, match="pass size"):
        rles_to_masks([])
    with pytest.raises(ValueError, match="expected \\[4, 6\\]"):
        rles_to_masks([_rle(masks[0])], size=(4, 6))


def test_label_map_to_masks():
    label_map = torch.tensor([[0, 0, 3], [255, 3, 7]])
    masks, labels = label_map_to_masks(label_map)
    assert labels.tolist() == [0, 3, 7]
    assert torch.equal(masks.sum(0), (label_map != 255).long())
    assert torch.equal(masks[1], label_map == 3)
    _, labels = label_map_to_masks(label_map, ignore_index=None)
    assert labels.tolist() == [0, 3, 7, 255]
    with pytest.raises(ValueError, match="integer"):
        label_map_to_masks(label_map.float())


def test_resize_drops_masks_that_vanish():
    masks = torch.zeros(3, 8, 8, dtype=torch.bool)
    masks[0, :4, :4] = True  # survives a 2x downsample as a 2x2 block
    masks[1, 1, 1] = True  # a lone odd pixel: nearest sampling at 4x4 reads even pixels only
    masks[2] = True
    out, kept = resize_masks(masks, 4)
    assert kept.tolist() == [0, 2] and out.shape == (2, 4, 4)
    assert out[0].sum() == 4 and out[1].all()
    out, kept = resize_masks(masks, (4, 4), min_area=5)
    assert kept.tolist() == [2]
    out, kept = resize_masks(masks, 16)
    assert kept.tolist() == [0, 1, 2] and int(out[1].sum()) == 4


def test_crop_drops_masks_outside_the_window():
    masks = torch.zeros(2, 6, 6, dtype=torch.bool)
    masks[0, :2, :2] = True
    masks[1, 4:, 4:] = True
    out, kept = crop_masks(masks, 0, 0, 3, 3)
    assert kept.tolist() == [0] and out.shape == (1, 3, 3) and int(out.sum()) == 4
    with pytest.raises(ValueError, match="inside"):
        crop_masks(masks, 4, 4, 3, 3)
    with pytest.raises(TypeError, match=r"torch\.bool"):
        crop_masks(masks.float(), 0, 0, 3, 3)


def test_pad_masks_ragged_counts():
    sets = [torch.zeros(0, 4, 4, dtype=torch.bool), torch.ones(1, 4, 4, dtype=torch.bool), torch.rand(5, 4, 4) > 0.5]
    masks, valid = pad_masks(sets)
    assert masks.shape == (3, 5, 4, 4) and valid.shape == (3, 5)
    assert valid.sum(1).tolist() == [0, 1, 5]
    assert torch.equal(masks[2], sets[2]) and not masks[0].any() and not masks[1, 1:].any()
    # All images without masks still give non-empty shapes.
    masks, valid = pad_masks([torch.zeros(0, 2, 2, dtype=torch.bool)])
    assert masks.shape == (1, 1, 2, 2) and not valid.any()
    with pytest.raises(ValueError, match="resize them"):
        pad_masks([torch.zeros(1, 2, 2, dtype=torch.bool), torch.zeros(1, 3, 2, dtype=torch.bool)])


def test_pad_masks_max_masks_keeps_the_largest_in_order():
    m = torch.zeros(4, 4, 4, dtype=torch.bool)
    for i, area in enumerate([2, 9, 1, 5]):
        m[i].view(-1)[:area] = True
    masks, valid = pad_masks([m], max_masks=2)
    assert valid.all() and masks.shape[1] == 2
    assert masks[0].flatten(1).sum(1).tolist() == [9, 5]


def _write_sa1b(root, name, masks, image=None):
    from PIL import Image

    h, w = masks.shape[-2:]
    image = np.zeros((h, w, 3), np.uint8) if image is None else image
    Image.fromarray(image).save(root / f"{name}.png")
    anns = [{"segmentation": _rle(m), "area": int(m.sum()), "id": i} for i, m in enumerate(masks)]
    (root / f"{name}.json").write_text(json.dumps({"image": {"height": h, "width": w}, "annotations": anns}))


def test_sa1b_folder_reads_skips_and_collates(tmp_path, caplog):
    _write_sa1b(tmp_path, "a", _random_masks(3, 16, 20, seed=2))
    _write_sa1b(tmp_path, "b", np.zeros((0, 16, 20), bool))
    tiny = np.zeros((2, 16, 20), bool)
    tiny[:, 1, 1] = True  # vanishes at 8x10
    _write_sa1b(tmp_path, "c", tiny)
    with caplog.at_level(logging.INFO, logger="ovseg_fast.data.masks"):
        ds = SA1BFolder(tmp_path)
    assert len(ds) == 2 and ds.skipped == ["b.png"]
    assert "skipped 1 image" in caplog.text
    item = ds[0]
    assert item["image"].shape == (3, 16, 20) and item["image"].dtype == torch.uint8
    assert torch.equal(item["masks"], torch.from_numpy(_random_masks(3, 16, 20, seed=2)))

    small = SA1BFolder(tmp_path, size=(8, 10))
    items = [small[0], small[1]]
    assert items[1]["masks"].shape == (0, 8, 10)
    with caplog.at_level(logging.INFO, logger="ovseg_fast.data.masks"):
        batch = collate_masks(items)
    assert batch["images"].shape == (1, 3, 8, 10) and batch["file_names"] == ["a.png"]
    assert batch["masks"].shape[:2] == batch["valid"].shape
    assert "collate_masks: skipped 1" in caplog.text
    assert collate_masks([items[1]]) is None


def test_sa1b_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        SA1BFolder(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no image"):
        SA1BFolder(tmp_path)
    from PIL import Image

    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "x.png")
    with pytest.raises(FileNotFoundError, match=r"x\.json"):
        SA1BFolder(tmp_path)
    (tmp_path / "x.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="annotations"):
        SA1BFolder(tmp_path)


def test_random_box_masks_are_ragged_rectangles_in_valid_slots():
    masks, valid = random_box_masks(3, 6, 40, generator=torch.Generator().manual_seed(0))
    assert masks.shape == (3, 6, 40, 40) and masks.dtype == torch.bool and valid.shape == (3, 6)
    counts = valid.sum(1)
    assert ((counts >= 3) & (counts <= 6)).all()
    assert torch.equal(masks.flatten(2).any(-1), valid)  # every valid slot holds a box, padding none
    for b, m in valid.nonzero().tolist():
        ys, xs = masks[b, m].nonzero().unbind(1)
        h, w = int(ys.max() - ys.min() + 1), int(xs.max() - xs.min() + 1)
        assert 8 <= h <= 20 and 8 <= w <= 20 and masks[b, m].sum() == h * w  # one filled rectangle
    again, _ = random_box_masks(3, 6, 40, generator=torch.Generator().manual_seed(0))
    assert torch.equal(masks, again)
    small, small_valid = random_box_masks(1, 1, 4)
    assert small_valid.all() and small.any()
    with pytest.raises(ValueError, match="max_masks must be >= 1"):
        random_box_masks(1, 0, 8)
    with pytest.raises(TypeError, match="size must be an int"):
        random_box_masks(1, 2, 8.0)
