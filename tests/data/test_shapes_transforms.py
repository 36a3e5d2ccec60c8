"""The synthetic shapes dataset, the joint augmentation, the per-sample seeding and collate."""

from __future__ import annotations

import pytest
import torch

from ovseg_fast.data import (
    CLIP_MEAN,
    CLIP_STD,
    IGNORE_INDEX,
    Augmented,
    EvalTransform,
    ShapesDataset,
    TrainTransform,
    build_dataset,
    class_names,
    collate,
    zero_shot_split,
)


def test_shapes_deterministic_and_labelled():
    a = ShapesDataset("train", num_samples=20, image_size=48, seed=3)
    b = ShapesDataset("train", num_samples=20, image_size=48, seed=3)
    for i in (0, 7, 19):
        sa, sb = a[i], b[i]
        assert torch.equal(sa["image"], sb["image"]) and torch.equal(sa["mask"], sb["mask"])
        assert sa["image"].dtype == torch.uint8 and sa["image"].shape == (3, 48, 48)
        assert sa["mask"].dtype == torch.int64 and sa["mask"].shape == (48, 48)
        labels = sa["mask"].unique()
        assert int(labels.min()) >= 0 and int(labels.max()) < len(a.class_names)
        assert (labels > 0).any()  # at least one shape
    assert a.class_names[0] == "background" and "red circle" in a.class_names and len(a.class_names) == 10
    # another seed or split gives other images
    assert not torch.equal(a[0]["image"], ShapesDataset("train", num_samples=20, image_size=48, seed=4)[0]["image"])
    assert not torch.equal(a[0]["image"], ShapesDataset("val", num_samples=20, image_size=48, seed=3)[0]["image"])


def test_shapes_colour_follows_label():
    d = ShapesDataset("val", num_samples=10, image_size=64, colors=("red", "blue"), kinds=("square",))
    for i in range(10):
        s = d[i]
        img = s["image"].float()
        for label, channel in ((1, 0), (2, 2)):  # red squares are red, blue squares blue
            inside = s["mask"] == label
            if inside.sum() > 20:
                means = img[:, inside].mean(1)
                assert int(means.argmax()) == channel


def test_shapes_checks_arguments():
    with pytest.raises(ValueError, match="split"):
        ShapesDataset("test")
    with pytest.raises(ValueError, match="colors"):
        ShapesDataset(colors=("mauve",))
    with pytest.raises(ValueError, match="image_size"):
        ShapesDataset(image_size=8)
    with pytest.raises(TypeError, match="num_samples"):
        ShapesDataset(num_samples=2.5)
    with pytest.raises(IndexError):
        ShapesDataset(num_samples=3)[3]
    with pytest.raises(ValueError, match="takes no root"):
        build_dataset("shapes", "train", root="/tmp")
    with pytest.raises(ValueError, match="unknown dataset"):
        build_dataset("imagenet", "train")


def test_train_transform_pads_with_ignore_and_normalises():
    sample = {"image": torch.full((3, 20, 30), 255, dtype=torch.uint8), "mask": torch.ones(20, 30, dtype=torch.int64),
              "name": "x"}
    t = TrainTransform(crop_size=40, scale=None, photometric=False, flip=0.0)
    out = t(sample)
    assert out["image"].shape == (3, 40, 40) and out["image"].dtype == torch.float32
    assert out["mask"].shape == (40, 40)
    assert set(out["mask"].unique().tolist()) == {1, IGNORE_INDEX}
    assert int((out["mask"] == 1).sum()) == 20 * 30
    white = torch.tensor([(1 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD)])
    inside = out["mask"] == 1
    assert torch.allclose(out["image"][:, inside].mean(1), white, atol=1e-5)


def test_train_transform_resize_keeps_mask_labels_and_alignment():
    d = ShapesDataset("train", num_samples=4, image_size=64)
    t = TrainTransform(crop_size=64, scale=(64, 64), ratio_range=(1.5, 1.5), photometric=False)
    for i in range(4):
        s = d[i]
        out = t(s)
        # nearest-neighbour resizing: no label appears that was not there
        assert set(out["mask"].unique().tolist()) <= set(s["mask"].unique().tolist())
    with pytest.raises(ValueError, match="ratio_range"):
        TrainTransform(ratio_range=(2.0, 0.5))
    with pytest.raises(ValueError, match="crop_size"):
        TrainTransform(crop_size=0)


def test_augmented_is_seeded_per_sample_and_epoch():
    d = ShapesDataset("train", num_samples=8, image_size=32)
    t = TrainTransform(crop_size=32, scale=(32, 32))
    a = Augmented(d, t, seed=5)
    first = a[2]["image"]
    torch.manual_seed(123)  # the global stream does not matter
    assert torch.equal(a[2]["image"], first)
    state = torch.get_rng_state()
    a[3]
    assert torch.equal(torch.get_rng_state(), state)  # and is left untouched
    a.set_epoch(1)
    assert not torch.equal(a[2]["image"], first)
    assert torch.equal(Augmented(d, t, seed=5)[2]["image"], first)


def test_eval_transform_keeps_mask_size():
    s = {"image": torch.zeros(3, 100, 50, dtype=torch.uint8), "mask": torch.zeros(100, 50, dtype=torch.int64),
         "name": "x"}
    out = EvalTransform(scale=(64, 32))(s)
    assert out["image"].shape == (3, 64, 32) and out["mask"].shape == (100, 50)


def test_collate_drops_skipped_and_refuses_mixed_sizes():
    s = {"image": torch.zeros(3, 8, 8), "mask": torch.zeros(8, 8, dtype=torch.int64), "name": "a"}
    batch = collate([s, None, s])
    assert batch["skipped"] == 1 and batch["image"].shape == (2, 3, 8, 8) and batch["name"] == ["a", "a"]
    assert collate([None]) == {"skipped": 1}
    other = {**s, "image": torch.zeros(3, 8, 9)}
    with pytest.raises(ValueError, match="different sizes"):
        collate([s, other])


def test_class_names_and_zero_shot_splits():
    assert len(class_names("voc")) == 20 and len(class_names("coco_stuff")) == 171
    assert len(class_names("ade20k")) == 150 and len(class_names("context59")) == 59
    assert len(class_names("cityscapes")) == 19
    for name, (n_seen, n_unseen) in {"voc": (15, 5), "coco_stuff": (156, 15), "context59": (49, 10)}.items():
        seen, unseen = zero_shot_split(name)
        assert (len(seen), len(unseen)) == (n_seen, n_unseen)
        assert not set(seen) & set(unseen)
    voc = class_names("voc")
    assert [voc[i] for i in zero_shot_split("voc")[1]] == ["pottedplant", "sheep", "sofa", "train", "tvmonitor"]
    with pytest.raises(ValueError, match="zero-shot"):
        zero_shot_split("ade20k")
    with pytest.raises(ValueError, match="dataset must be one of"):
        class_names("kitti")
