"""``ovseg-fast tune``: the random search, PnP-OVSS's tuner on a tiny random BLIP, the command."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from ovseg_fast.cli import main
from ovseg_fast.cli.tune import clip_reward, load_labelled_images, random_search, tune
from ovseg_fast.models import CLIPBackbone, create_model
from tests.helpers import tiny_clip
from tests.models.test_pnp_ovss import TINY_BLIP

pytestmark = pytest.mark.filterwarnings("ignore:.*RANDOM weights")
pytest.importorskip("gradient_free_optimizers")  # the optional 'tune' extra; its absence is tested below


def test_random_search_finds_the_planted_optimum():
    space = {"a": [0, 1, 2, 3, 4], "b": [0.1, 0.3, 0.5], "c": [None, "x"]}
    calls = []

    def objective(p):
        calls.append(p)
        return -((p["a"] - 3) ** 2) - 10 * abs(p["b"] - 0.3) - (p["c"] != "x")

    best, value, trials = random_search(objective, space, n_iter=80, seed=0, progress=False)
    assert best == {"a": 3, "b": 0.3, "c": "x"} and value == 0.0
    assert [t["params"] for t in trials] == calls
    assert all(t["reward"] == objective(t["params"]) for t in trials)
    again = random_search(objective, space, n_iter=80, seed=0, progress=False)
    assert again[2] == trials  # the seed fixes the trials


def test_tune_finds_the_planted_optimum_and_restores_the_config():
    torch.manual_seed(0)
    model = create_model("pnp_ovss_base", blip=TINY_BLIP, layer=1, head=1, crf=False)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    seen = []

    def reward(x, labels, lists):  # planted: a function of the settings, checked to see real labels
        assert labels.shape == (2, 64, 64) and labels.max() < 3
        cfg = model.config
        seen.append((cfg.threshold, cfg.blur_sigma, cfg.passes))
        return -abs(cfg.threshold - 0.6) - abs(cfg.blur_sigma - 0.02) - (cfg.passes != 2)

    space = {"threshold": [0.2, 0.4, 0.6, 0.8], "blur_sigma": [0.0, 0.02], "passes": [1, 2]}
    result = tune(
        model,
        images,
        [["cat", "background"], ["dog", "sofa", "background"]],
        reward_fn=reward,
        search_space=space,
        n_iter=60,
        seed=3,
        progress=False,
    )
    assert result["best"] == {"threshold": 0.6, "blur_sigma": 0.02, "passes": 2}
    assert result["best_reward"] == pytest.approx(0.0)
    assert len(result["trials"]) == len(seen) and len(set(seen)) == len(seen)
    assert model.config.threshold == 0.5 and model.config.passes == 4  # the defaults again


def test_clip_reward_equals_the_hand_computed_one():
    torch.manual_seed(0)
    clip = CLIPBackbone(tiny_clip(64), image_size=64).eval()
    images = torch.randn(1, 3, 64, 64)
    labels = torch.zeros(1, 64, 64, dtype=torch.long)
    labels[:, 16:48, 16:48] = 1
    r = clip_reward(clip, images, labels, [["background", "cat"]])
    # by hand: cos(kept) - cos(removed) for "cat" only
    black = -torch.tensor([0.48145466, 0.4578275, 0.40821073]) / torch.tensor([0.26862954, 0.26130258, 0.27577711])
    mask = (labels == 1)[:, None]
    kept = torch.where(mask, images, black.view(1, 3, 1, 1))
    removed = torch.where(mask, black.view(1, 3, 1, 1), images)
    with torch.no_grad():
        e = clip.encode_image(torch.cat([kept, removed]), normalize=True)
        t = clip.encode_text(["cat"])
    expected = float((e @ t.T)[0, 0] - (e @ t.T)[1, 0])
    assert r == pytest.approx(expected, rel=1e-5, abs=1e-6)


def _folder(tmp_path, labels=None):
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in ("a.png", "b.jpg"):
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(tmp_path / name)
    path = tmp_path / "labels.json"
    path.write_text(json.dumps(labels if labels is not None else {"a.png": ["cat"], "b.jpg": ["dog", "background"]}))
    return path


def test_tune_command_on_a_folder(tmp_path, capsys):
    labels = _folder(tmp_path)
    out = tmp_path / "best.json"
    argv = [
        "tune",
        "pnp_ovss_base",
        str(tmp_path),
        "--classes-from",
        str(labels),
        "--size",
        "64",
        "--n-iter",
        "3",
        "--seed",
        "1",
        "--set",
        f"blip={TINY_BLIP!r}",
        "--set",
        "crf=False",
        "--set",
        "layer=1",
        "--set",
        "head=1",
        "--clip",
        repr(tiny_clip(64)),
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert result["images"] == ["a.png", "b.jpg"] and result["seed"] == 1
    assert 1 <= len(result["trials"]) <= 3
    assert result["best_reward"] == max(t["reward"] for t in result["trials"])
    assert set(result["best"]) == {"layer", "head", "threshold", "blur_sigma", "passes", "drop_fraction"}
    assert result["best"]["layer"] in (0, 1) and result["search_space"]["head"] == [0, 1]
    assert "best reward" in capsys.readouterr().out


def test_tune_says_when_gradient_free_optimizers_is_missing(tmp_path, monkeypatch, capsys):
    labels = _folder(tmp_path)
    monkeypatch.setitem(sys.modules, "gradient_free_optimizers", None)  # import now raises ImportError
    assert main(["tune", "pnp_ovss_base", str(tmp_path), "--classes-from", str(labels)]) == 2
    err = capsys.readouterr().err
    assert "gradient-free-optimizers" in err and "pip install 'ovseg-fast[tune]'" in err
    with pytest.raises(ImportError, match="tune"):
        random_search(lambda p: 0.0, {"a": [1]}, n_iter=1)


@pytest.mark.parametrize(
    "labels, message",
    [
        ({"a.png": ["cat"], "missing.png": ["dog"]}, "lists 'missing.png', which is not in"),
        ({"a.png": []}, "non-empty list"),
        ({"a.png": "cat"}, "non-empty list"),
        ({"notes.txt": ["cat"]}, "is not an image file name"),
        (["a.png"], "must be a JSON object"),
    ],
)
def test_bad_labels_json(tmp_path, labels, message):
    path = _folder(tmp_path, labels)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_labelled_images(tmp_path, path, 64)


def test_bad_command_inputs(tmp_path, capsys):
    labels = _folder(tmp_path)
    assert main(["tune", "pnp_ovss_base", str(tmp_path / "nope"), "--classes-from", str(labels)]) == 2
    assert "IMAGES must be a folder" in capsys.readouterr().err
    assert main(["tune", "pnp_ovss_base", str(tmp_path), "--classes-from", str(tmp_path / "x.json")]) == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "broken.json").write_text("{")
    assert main(["tune", "pnp_ovss_base", str(tmp_path), "--classes-from", str(tmp_path / "broken.json")]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert main(["tune", "pnp_ovss_base", str(tmp_path), "--classes-from", str(labels), "--size", "50"]) == 2
    assert "--size must be a positive multiple of 16" in capsys.readouterr().err
    assert main(["tune", "clip", str(tmp_path), "--classes-from", str(labels), "--set", f"clip={tiny_clip(64)!r}"]) == 2
    assert "tunes PnP-OVSS models" in capsys.readouterr().err
    with pytest.raises(ValueError, match="one list of class names per image"):
        tune(
            create_model("pnp_ovss_base", blip=TINY_BLIP, layer=1, head=1),
            torch.randn(2, 3, 64, 64),
            [["cat"]],
            reward_fn=lambda *a: 0.0,
        )
