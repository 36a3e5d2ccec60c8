"""The trainer: configs, schedule, atomic checkpoints, exact resume after a kill, bad samples, DDP on gloo."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ovseg_fast.data import BadSampleError
from ovseg_fast.train.config import TrainConfig, load_config, parse_override
from ovseg_fast.train.trainer import Trainer, atomic_save, build_model, load_weights, poly_warmup
from tests.helpers import run_gloo_workers
from tests.train.helpers import train_losses, write_tiny_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _quiet_random_weights():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*RANDOM weights")
        yield


def test_config_reads_overrides_and_refuses_mistakes(tmp_path):
    path = write_tiny_config(tmp_path / "c.toml", tmp_path / "run")
    c = load_config(path, ["schedule.iterations=7", "model.overrides.image_size=64", "run.work_dir='x'"])
    assert c.schedule.iterations == 7 and c.model.overrides["image_size"] == 64 and c.run.work_dir == "x"
    assert c.schedule.lr == 1e-3 and c.data.train_options == {"num_samples": 32}
    assert parse_override("eval.mode=slide") == (["eval", "mode"], "slide")
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_override("schedule.iterations")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_config(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("[model\nname=")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_config(tmp_path / "bad.toml")
    with pytest.raises(ValueError, match="unknown table"):
        TrainConfig.from_dict({"model": {"name": "clip"}, "optim": {}})
    with pytest.raises(ValueError, match=r"unknown key\(s\) iters; known: iterations"):
        TrainConfig.from_dict({"model": {"name": "clip"}, "schedule": {"iters": 3}})
    with pytest.raises(TypeError, match="batch_size must be a int"):
        TrainConfig.from_dict({"model": {"name": "clip"}, "schedule": {"batch_size": "16"}})
    with pytest.raises(ValueError, match="amp must be"):
        TrainConfig.from_dict({"model": {"name": "clip"}, "schedule": {"amp": "fp8"}})
    with pytest.raises(ValueError, match="name must name"):
        TrainConfig.from_dict({})


def test_poly_schedule_with_linear_warmup():
    kw = dict(iterations=100, warmup_iters=10, warmup_ratio=1e-6, power=1.0, lr=1e-3, min_lr=0.0)
    assert poly_warmup(0, **kw) == pytest.approx(1e-3 * 1e-6)
    assert poly_warmup(5, **kw) == pytest.approx(1e-3 * 0.95 * (1 - 0.5 * (1 - 1e-6)))
    assert poly_warmup(10, **kw) == pytest.approx(1e-3 * 0.9)
    assert poly_warmup(100, **kw) == 0.0
    kw.update(power=0.9, min_lr=1e-4, warmup_iters=0)
    assert poly_warmup(50, **kw) == pytest.approx(9e-4 * 0.5**0.9 + 1e-4)


def test_atomic_save_leaves_the_old_file_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    atomic_save({"step": 1}, path)

    def broken_save(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt  # killed in the middle of writing

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_train_writes_outputs_and_weights_load(tmp_path):
    config = load_config(write_tiny_config(tmp_path / "c.toml", tmp_path / "run"))
    record = Trainer(config, progress=False).run()
    run = tmp_path / "run"
    assert {p.name for p in run.iterdir()} == {"checkpoint.pt", "model.pt", "log.jsonl", "eval.json"}
    assert [s for s, _ in train_losses(run)] == [1, 2, 3, 4]
    assert 0 <= record["miou"] <= 1 and set(record["iou"]) == {"background", *(
        f"{c} {k}" for c in ("red", "green", "blue") for k in ("circle", "square", "triangle"))}
    ckpt = torch.load(run / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] == 4 and len(ckpt["rng"]) == 1
    from ovseg_fast.train.trainer import build_model

    model = build_model(config)
    load_weights(model, run / "model.pt")
    assert torch.equal(model.state_dict()["backbone.clip.visual.proj"], ckpt["model"]["backbone.clip.visual.proj"])
    with pytest.raises(ValueError, match="does not fit"):
        load_weights(torch.nn.Linear(2, 2), run / "model.pt")
    with pytest.raises(FileNotFoundError, match="resume: no checkpoint"):
        Trainer(config, resume=tmp_path / "nope.pt")


_KILLED_RUN = """
import os, signal, sys, warnings
warnings.simplefilter("ignore")
from ovseg_fast.train.config import load_config
from ovseg_fast.train.trainer import Trainer

def kill_at_3(trainer, step, record):
    if step == 3:  # after the checkpoint of iteration 2, before the one of iteration 4
        os.kill(os.getpid(), signal.SIGKILL)

Trainer(load_config(sys.argv[1]), progress=False, callbacks=[kill_at_3]).run()
"""


@pytest.mark.slow
def test_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path):
    # The uninterrupted run.
    full = load_config(write_tiny_config(tmp_path / "full.toml", tmp_path / "full", iterations=6, accumulation=2))
    Trainer(full, progress=False).run()
    # The same run killed (SIGKILL) during iteration 3, then resumed from its checkpoint of iteration 2.
    path = write_tiny_config(tmp_path / "killed.toml", tmp_path / "killed", iterations=6, accumulation=2)
    script = tmp_path / "killed.py"
    script.write_text(textwrap.dedent(_KILLED_RUN))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))}
    proc = subprocess.run([sys.executable, str(script), str(path)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    killed = tmp_path / "killed"
    assert torch.load(killed / "checkpoint.pt", weights_only=False)["step"] == 2
    assert not (killed / "model.pt").exists()
    Trainer(load_config(path), resume=True, progress=False).run()

    expected = train_losses(tmp_path / "full")
    got = train_losses(killed)
    assert [s for s, _ in got] == [1, 2, 3, 4, 5, 6]  # the killed iteration 3 never logged
    assert [loss for _, loss in got] == [loss for _, loss in expected]
    a = torch.load(tmp_path / "full" / "model.pt")
    b = torch.load(killed / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def _voc_with_a_corrupt_image(root: Path) -> Path:
    rng = np.random.default_rng(0)
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClass").mkdir()
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{i}.jpg")
        Image.fromarray(rng.integers(0, 21, (32, 32), dtype=np.uint8)).save(root / "SegmentationClass" / f"{i}.png")
    (root / "JPEGImages" / "3.jpg").write_bytes(b"truncated")
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    for split in ("train", "val"):
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(map(str, range(8))))
    return root


def test_bad_sample_stops_with_its_name_or_is_skipped(tmp_path):
    voc = _voc_with_a_corrupt_image(tmp_path / "VOC2012")
    path = write_tiny_config(tmp_path / "c.toml", tmp_path / "run", iterations=2, batch_size=8)
    overrides = ["data.dataset='voc'", f"data.root='{voc}'", "data.options={}", "data.train_options={}",
                 "data.val_options={}"]
    config = load_config(path, overrides)
    with pytest.raises(BadSampleError, match=r"3\.jpg: cannot read the image"):
        Trainer(config, progress=False).run()
    trainer = Trainer(load_config(path, [*overrides, "run.work_dir='%s'" % (tmp_path / "skip")]), skip_bad=True,
                      progress=False)
    record = trainer.run()
    assert trainer.skipped == 2  # the corrupt image, once per iteration (batch = the whole set)
    assert record["skipped"] == 1  # and once in the evaluation
    assert len(record["iou"]) == 20


_GLOO_WORKER = """
import sys, warnings
warnings.simplefilter("ignore")
import torch, torch.distributed as dist
rank, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
from ovseg_fast.train.config import load_config
from ovseg_fast.train.trainer import Trainer
records = []
trainer = Trainer(load_config(sys.argv[4] if len(sys.argv) > 4 else CONFIG), progress=False,
                  callbacks=[lambda t, step, r: records.append(r["loss"])])
result = trainer.run()
torch.save({"losses": records, "miou": result["miou"], "weights": trainer.model.state_dict()}, f"{out}.{rank}")
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.slow
@pytest.mark.distributed
def test_two_gloo_processes_equal_one_with_the_same_global_batch(tmp_path):
    one = load_config(write_tiny_config(tmp_path / "one.toml", tmp_path / "one", iterations=3, batch_size=4))
    ref: list[float] = []
    Trainer(one, progress=False, callbacks=[lambda t, step, r: ref.append(r["loss"])]).run()
    ref_weights = torch.load(tmp_path / "one" / "model.pt")
    two = write_tiny_config(tmp_path / "two.toml", tmp_path / "two", iterations=3, batch_size=4)
    results = run_gloo_workers(_GLOO_WORKER.replace("CONFIG", repr(str(two))), tmp_path)
    for r in results:
        # Gradients are summed in another order (all-reduce of two half batches): float32 rounding.
        np.testing.assert_allclose(r["losses"], ref, rtol=1e-4)
        for k, v in ref_weights.items():
            # Adam divides by sqrt(v): an entry whose gradient is ~0 moves by up to lr per step on
            # rounding noise alone, so weights agree to lr x iterations, not to float32 precision.
            torch.testing.assert_close(r["weights"][k], v, rtol=0, atol=3 * 1e-3)
    assert results[0]["miou"] == results[1]["miou"]
    assert (tmp_path / "two" / "checkpoint.pt").exists()


def test_a_model_that_does_not_learn_from_label_maps_is_refused(tmp_path):
    # PixelCLIP learns from unlabeled masks: a cross-entropy on label maps would silently be another method.
    config = write_tiny_config(tmp_path / "pixelclip.toml", tmp_path / "run")
    text = config.read_text().replace('name = "clip"', 'name = "pixelclip"').replace("frozen = false\n", "")
    config.write_text(text)
    with pytest.raises(ValueError, match=r"pixelclip does not learn from label maps.*own training_step"):
        build_model(load_config(config))


def test_shipped_configs_load_and_name_known_models_and_data():
    from ovseg_fast.data import DATASETS
    from ovseg_fast.models import list_models

    configs = sorted((ROOT / "configs").glob("*.toml"))
    assert {p.name for p in configs} >= {"shapes_clip.toml", "shapes_ldvc.toml", "voc_ldvc.toml", "voc_rpn.toml"}
    for path in configs:
        config = load_config(path)
        assert config.model.name in list_models(), path
        assert config.data.dataset in DATASETS, path


@pytest.mark.slow
def test_shapes_clip_loss_falls(tmp_path):
    overrides = ["schedule.iterations=40", "schedule.warmup_iters=5", "eval.interval=0", "run.log_interval=1",
                 "data.val_options={num_samples=4}", f"run.work_dir='{tmp_path}'"]
    Trainer(load_config(ROOT / "configs" / "shapes_clip.toml", overrides), progress=False).run()
    losses = [loss for _, loss in train_losses(tmp_path)]
    assert len(losses) == 40
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:10])


@pytest.mark.slow
def test_shapes_ldvc_loss_falls(tmp_path):
    # The config README.md's measured shapes run uses: LDVC with the tiny CLIP's image tower trained.
    overrides = ["schedule.iterations=40", "schedule.warmup_iters=5", "eval.interval=0", "run.log_interval=1",
                 "data.val_options={num_samples=4}", f"run.work_dir='{tmp_path}'"]
    config = load_config(ROOT / "configs" / "shapes_ldvc.toml", overrides)
    assert config.model.overrides["frozen"] is False
    Trainer(config, progress=False).run()
    losses = [loss for _, loss in train_losses(tmp_path)]
    assert len(losses) == 40
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:10])
