"""``ovseg-fast train`` then ``ovseg-fast eval`` on the saved weights; zero-shot evaluation on a VOC layout."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from PIL import Image

from ovseg_fast.cli import main
from tests.train.helpers import write_tiny_config


@pytest.fixture(autouse=True)
def _quiet_random_weights():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*RANDOM weights")
        yield


def test_train_then_eval_reproduces_the_final_evaluation(tmp_path, capsys):
    config = write_tiny_config(tmp_path / "c.toml", tmp_path / "run")
    assert main(["train", str(config), "--set", "schedule.iterations=2", "--no-progress"]) == 0
    out = capsys.readouterr()
    assert "synthetic 'shapes' dataset" in out.err and "RANDOM initial weights" in out.err
    assert "trained clip for 2 iterations" in out.out and "|  pAcc | " in out.out
    trained = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert main(["eval", str(config), "--weights", str(tmp_path / "run" / "model.pt"), "--json",
                 str(tmp_path / "e.json"), "--no-progress"]) == 0
    evaluated = json.loads((tmp_path / "e.json").read_text())
    assert evaluated["miou"] == trained["miou"] and evaluated["iou"] == trained["iou"]
    assert main(["train", str(tmp_path / "missing.toml")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["eval", str(config), "--weights", str(tmp_path / "nope.pt")]) == 2


def test_eval_zero_shot_split_reports_seen_unseen_and_hiou(tmp_path, capsys):
    voc = tmp_path / "VOC2012"
    (voc / "JPEGImages").mkdir(parents=True)
    (voc / "SegmentationClass").mkdir()
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (32, 48, 3), dtype=np.uint8)).save(voc / "JPEGImages" / f"{i}.jpg")
        Image.fromarray(rng.integers(0, 21, (32, 48), dtype=np.uint8)).save(voc / "SegmentationClass" / f"{i}.png")
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("0\n1\n")
    config = write_tiny_config(tmp_path / "c.toml", tmp_path / "run")
    overrides = ["data.dataset='voc'", f"data.root='{voc}'", "data.zero_shot=true", "data.options={}",
                 "data.val_options={}"]
    args = ["eval", str(config), "--json", str(tmp_path / "e.json"), "--mode", "slide", "--no-progress"]
    assert main([*args, *[a for o in overrides for a in ("--set", o)]]) == 0
    out = capsys.readouterr()
    assert "mIoU(unseen)" in out.out and "no --weights" in out.err
    record = json.loads((tmp_path / "e.json").read_text())
    assert {"seen_miou", "unseen_miou", "hiou", "miou", "pixel_accuracy"} <= set(record)
    assert len(record["iou"]) == 20 and "sheep" in record["iou"] and record["mode"] == "slide"
    assert record["pixels"] == int(sum((np.asarray(Image.open(voc / "SegmentationClass" / f"{i}.png")) > 0).sum()
                                       for i in range(2)))
