"""A tiny training config (a 1-layer CLIP trained whole on 32x32 shapes) for the trainer tests."""

from __future__ import annotations

import json
from pathlib import Path

from tests.helpers import tiny_clip


def _toml_value(value) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)


def write_tiny_config(path: Path, work_dir: Path, **schedule) -> Path:
    """A TOML config of 4 iterations of batch 4, a checkpoint every 2, no periodic evaluation."""
    sched = {"iterations": 4, "batch_size": 4, "lr": 1e-3, "warmup_iters": 1, "amp": "none", **schedule}
    text = f"""
[model]
name = "clip"
freeze = ["token_embedding"]
[model.overrides]
image_size = 32
templates = ["{{}}"]
frozen = false
clip = {_toml_value(tiny_clip(32, layers=1, text_layers=1, context_length=16))}

[data]
dataset = "shapes"
options = {{ image_size = 32 }}
train_options = {{ num_samples = 32 }}
val_options = {{ num_samples = 4 }}
train_transform = {{ crop_size = 32, scale = [32, 32], ratio_range = [1.0, 1.5] }}
eval_transform = {{ scale = [32, 32] }}

[schedule]
{chr(10).join(f"{k} = {_toml_value(v)}" for k, v in sched.items())}

[eval]
interval = 0

[run]
work_dir = {json.dumps(str(work_dir))}
log_interval = 1
checkpoint_interval = 2
threads = 1
"""
    path.write_text(text)
    return path


def train_losses(work_dir: Path) -> list[tuple[int, float]]:
    """(step, loss) of every train line of a run's log.jsonl."""
    lines = (work_dir / "log.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines) if r["kind"] == "train"]
