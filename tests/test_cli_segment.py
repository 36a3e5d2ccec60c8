"""``ovseg-fast segment``: label/overlay PNGs at the original size, probabilities, bad inputs."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from ovseg_fast.cli import main
from ovseg_fast.cli.segment import expand_images, palette, parse_classes
from tests.helpers import tiny_clip
from tests.train.helpers import _toml_value

CLIP = tiny_clip(32, layers=1, text_layers=1)
MODEL_ARGS = ["--model", "clip", "--set", "image_size=32", "--set", f"clip={_toml_value(CLIP)}",
              "--set", "templates=['{}']"]


@pytest.fixture(autouse=True)
def _quiet_random_weights():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*RANDOM weights")
        yield


def _images(folder):
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 255, (33, 20, 3), dtype=np.uint8)).save(folder / "b.jpg")
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    return folder


def test_segment_writes_label_overlay_and_probs_at_the_original_size(tmp_path, capsys):
    images = _images(tmp_path / "in")
    out = tmp_path / "out"
    code = main(["segment", str(images), *MODEL_ARGS, "--classes", "cat, grass,sky", "--out", str(out), "--probs",
                 "--no-progress"])
    assert code == 1  # one image was unreadable
    err = capsys.readouterr().err
    assert "broken.png" in err and "RANDOM weights" in err
    for stem, (h, w) in (("a", (40, 50)), ("b", (33, 20))):
        label = Image.open(out / f"{stem}_label.png")
        assert label.mode == "P" and label.size == (w, h)
        labels = np.asarray(label)
        assert labels.max() < 3
        assert Image.open(out / f"{stem}_overlay.png").size == (w, h)
        npz = np.load(out / f"{stem}_probs.npz")
        assert npz["probs"].shape == (3, h, w) and list(npz["class_names"]) == ["cat", "grass", "sky"]
        np.testing.assert_allclose(npz["probs"].astype(np.float32).sum(0), 1, atol=1e-2)
        assert (npz["probs"].argmax(0) == labels).mean() > 0.95  # float16 rounding may flip near-ties
    assert not (out / "broken_label.png").exists()


def test_segment_with_trained_weights_matches_predict(tmp_path):
    from ovseg_fast.data import normalize
    from ovseg_fast.models import create_model

    torch.manual_seed(1)
    model = create_model("clip", clip=CLIP, image_size=32, templates=["{}"])
    torch.save(model.state_dict(), tmp_path / "w.pt")
    img = np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "x.png")
    code = main(["segment", str(tmp_path / "*.png"), *MODEL_ARGS, "--classes", "cat,dog", "--weights",
                 str(tmp_path / "w.pt"), "--out", str(tmp_path / "out"), "--mode", "whole"])
    assert code == 0
    image = normalize(torch.from_numpy(img).permute(2, 0, 1))[None]
    expected = model.predict(image, ["cat", "dog"]).argmax(1)[0].numpy()
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "x_label.png")), expected)


def test_segment_refuses_bad_arguments(tmp_path, capsys):
    assert main(["segment", str(tmp_path / "none.png"), *MODEL_ARGS, "--classes", "a,b"]) == 2
    assert "no such file" in capsys.readouterr().err
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    assert main(["segment", str(tmp_path / "x.png"), *MODEL_ARGS, "--classes", "a,,b"]) == 2
    assert "comma-separated" in capsys.readouterr().err
    assert main(["segment", str(tmp_path / "x.png"), *MODEL_ARGS, "--classes", "a", "--weights",
                 str(tmp_path / "x.png")]) == 2
    assert "weights" in capsys.readouterr().err


def test_helpers():
    assert parse_classes(" cat , dog") == ["cat", "dog"]
    with pytest.raises(ValueError, match="twice"):
        parse_classes("cat,cat")
    colours = palette(256)
    assert len(set(colours)) == 256 and colours[0] != (0, 0, 0)
    files, problems = expand_images(["/definitely/missing/*.png"])
    assert files == [] and "no file matches" in problems[0]
