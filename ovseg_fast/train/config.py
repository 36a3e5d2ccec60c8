"""Training configs: TOML files naming the model, its overrides, the data, the schedule, evaluation.

A config file has these tables (every key optional except ``model.name``; defaults below)::

    [model]
    name = "ldvc"                  # a registered model (ovseg-fast models lists them)
    pretrained = "ViT-B-16.pt"     # CLIP checkpoint (path or name under $OVSEG_WEIGHTS_DIR); absent: random
    [model.overrides]              # fields of the model's config (create_model(name, **overrides))
    image_size = 512

    [data]
    dataset = "voc"                # a name of ovseg_fast.data.DATASETS
    root = "data/VOCdevkit/VOC2012"
    train_split = "aug"
    val_split = "val"
    zero_shot = true               # train on the seen classes, report seen/unseen mIoU and hIoU
    num_workers = 2
    [data.options]                 # constructor options of both splits (e.g. background = false)
    [data.train_options]           # ... of the training split only (e.g. num_samples for shapes)
    [data.val_options]
    [data.train_transform]         # ovseg_fast.data.TrainTransform arguments
    crop_size = 512
    [data.eval_transform]          # ovseg_fast.data.EvalTransform arguments
    scale = [2048, 512]

    [schedule]                     # AdamW, poly decay with linear warm-up (mmsegmentation's)
    iterations = 20000
    batch_size = 16                # the global batch: processes x accumulation x per-process batch
    accumulation = 1
    lr = 2e-4
    ...

    [eval]                         # periodic and final evaluation
    interval = 2000
    mode = "slide"
    ...

    [run]
    work_dir = "runs/voc_ldvc"     # checkpoint.pt, model.pt, log.jsonl, eval.json
    ...

Relative paths (``data.root``, ``model.pretrained``, ``run.work_dir``) are taken relative to the
current directory. Unknown tables or keys are errors naming the file and listing the known keys.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Any, Optional, Union

__all__ = [
    "DataConfig",
    "EvalConfig",
    "ModelConfig",
    "RunConfig",
    "ScheduleConfig",
    "TrainConfig",
    "load_config",
    "parse_override",
]


@dataclasses.dataclass
class ModelConfig:
    """``name``: registered model; ``pretrained``: CLIP checkpoint or None (random weights);
    ``overrides``: fields of the model's config; ``freeze``: parameters whose name contains one of
    these strings are not trained (on top of what the model freezes itself)."""

    name: str = ""
    pretrained: Optional[str] = None
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    freeze: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class DataConfig:
    """The dataset (``ovseg_fast.data.build_dataset``), its splits, the zero-shot setting, loading."""

    dataset: str = "shapes"
    root: Optional[str] = None
    train_split: str = "train"
    val_split: str = "val"
    zero_shot: bool = False
    num_workers: int = 0
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    train_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    val_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    train_transform: dict[str, Any] = dataclasses.field(default_factory=dict)
    eval_transform: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class ScheduleConfig:
    """AdamW with mmsegmentation's poly schedule: lr(t) = (lr - min_lr) (1 - t / T)^power + min_lr,
    multiplied during the first ``warmup_iters`` by a ramp from ``warmup_ratio`` to 1.
    ``clip_grad``: max global gradient norm (0: none). ``amp``: ``"bf16"``, ``"fp16"`` (GPU only) or
    ``"none"``. ``lr_mult``: {substring of a parameter name: lr multiplier} (first match wins)."""

    iterations: int = 20000
    batch_size: int = 16
    accumulation: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_iters: int = 1500
    warmup_ratio: float = 1e-6
    power: float = 1.0
    min_lr: float = 0.0
    clip_grad: float = 0.0
    amp: str = "bf16"
    seed: int = 0
    lr_mult: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class EvalConfig:
    """``interval``: evaluate every so many iterations (0: only at the end; the end is always
    evaluated); ``mode``/``crop``/``stride``: ``Segmentor.predict``'s; ``max_samples``: evaluate on the
    first so many validation samples only (0: all) during training (the final evaluation uses all)."""

    interval: int = 2000
    mode: str = "whole"
    crop: int = 512
    stride: int = 341
    max_samples: int = 0


@dataclasses.dataclass
class RunConfig:
    """``work_dir``: outputs; ``log_interval``: iterations between log lines; ``checkpoint_interval``:
    iterations between checkpoints (the last iteration always writes one); ``device``: ``"auto"``
    (the GPU of this process's LOCAL_RANK when there is one, else the CPU), ``"cpu"``, ``"cuda"``;
    ``threads``: torch's intra-op CPU threads (0: torch's default)."""

    work_dir: str = "runs/default"
    log_interval: int = 20
    checkpoint_interval: int = 1000
    device: str = "auto"
    threads: int = 0


@dataclasses.dataclass
class TrainConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    source: Optional[str] = None  # the file it was read from

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("source")
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> TrainConfig:
        """Builds and checks a config from nested tables (what a TOML file parses into)."""
        if not isinstance(raw, dict):
            raise TypeError(f"{source}: a config must be a table, got {type(raw).__name__}")
        sections = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
        unknown = sorted(set(raw) - set(sections))
        if unknown:
            raise ValueError(f"{source}: unknown table(s) {', '.join(unknown)}; known: {', '.join(sections)}")
        values = {}
        for name, field in sections.items():
            table = raw.get(name, {})
            section_cls = field.default_factory().__class__
            if not isinstance(table, dict):
                raise TypeError(f"{source}: [{name}] must be a table, got {type(table).__name__}")
            values[name] = _section(section_cls, table, f"{source} [{name}]")
        config = cls(**values, source=source)
        config.check()
        return config

    def check(self) -> None:
        """Value checks that need no model or data: one error naming the key."""
        src = self.source or "config"
        if not isinstance(self.model.name, str) or not self.model.name:
            raise ValueError(f"{src}: [model] name must name a registered model")
        s = self.schedule
        for key in ("iterations", "batch_size", "accumulation"):
            _positive_int(f"{src}: schedule.{key}", getattr(s, key))
        for key in ("warmup_iters", "seed"):
            _positive_int(f"{src}: schedule.{key}", getattr(s, key), minimum=0)
        for key in ("lr", "weight_decay", "warmup_ratio", "power", "min_lr", "clip_grad"):
            value = getattr(s, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{src}: schedule.{key} must be a number >= 0, got {value!r}")
        if s.lr <= 0:
            raise ValueError(f"{src}: schedule.lr must be > 0, got {s.lr}")
        if s.amp not in ("bf16", "fp16", "none"):
            raise ValueError(f"{src}: schedule.amp must be 'bf16', 'fp16' or 'none', got {s.amp!r}")
        if len(s.betas) != 2:
            raise ValueError(f"{src}: schedule.betas must be two numbers, got {s.betas!r}")
        for key, value in s.lr_mult.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{src}: schedule.lr_mult.{key} must be a number >= 0, got {value!r}")
        e = self.eval
        _positive_int(f"{src}: eval.interval", e.interval, minimum=0)
        _positive_int(f"{src}: eval.max_samples", e.max_samples, minimum=0)
        _positive_int(f"{src}: eval.crop", e.crop)
        _positive_int(f"{src}: eval.stride", e.stride)
        if e.mode not in ("whole", "slide"):
            raise ValueError(f"{src}: eval.mode must be 'whole' or 'slide', got {e.mode!r}")
        r = self.run
        _positive_int(f"{src}: run.log_interval", r.log_interval)
        _positive_int(f"{src}: run.checkpoint_interval", r.checkpoint_interval)
        if r.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"{src}: run.device must be 'auto', 'cpu' or 'cuda', got {r.device!r}")
        _positive_int(f"{src}: run.threads", r.threads, minimum=0)
        _positive_int(f"{src}: data.num_workers", self.data.num_workers, minimum=0)
        if not all(isinstance(f, str) and f for f in self.model.freeze):
            raise ValueError(f"{src}: model.freeze must list parameter-name substrings, got {self.model.freeze!r}")


def _positive_int(name: str, value: object, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _section(cls: type, table: dict[str, Any], where: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(fields)}")
    values = {}
    for key, value in table.items():
        default = getattr(cls(), key)
        if isinstance(default, dict) and not isinstance(value, dict):
            raise TypeError(f"{where}: {key} must be a table, got {type(value).__name__}")
        if isinstance(default, (tuple, list)) and not isinstance(value, (tuple, list)):
            raise TypeError(f"{where}: {key} must be an array, got {value!r}")
        if isinstance(default, tuple):
            value = tuple(value)
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        scalar = default is not None and not isinstance(default, (dict, tuple, list))
        if scalar and not isinstance(value, type(default)):
            raise TypeError(f"{where}: {key} must be a {type(default).__name__}, got {value!r}")
        values[key] = value
    return cls(**values)


def _toml():
    if sys.version_info >= (3, 11):
        import tomllib

        return tomllib
    try:  # pragma: no cover - Python < 3.11
        import tomli
    except ImportError as exc:  # pragma: no cover
        raise ImportError(f"reading TOML configs on Python < 3.11 needs tomli: pip install tomli ({exc})") from exc
    return tomli  # pragma: no cover


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"schedule.iterations=100"`` -> (["schedule", "iterations"], 100): the value is parsed as TOML
    (numbers, booleans, strings in quotes, arrays, inline tables); a bare word stays a string."""
    if "=" not in text:
        raise ValueError(f"an override must be KEY=VALUE (e.g. schedule.iterations=100), got {text!r}")
    key, value = text.split("=", 1)
    path = [p.strip() for p in key.strip().split(".")]
    if not all(path):
        raise ValueError(f"override key {key!r} must be dotted names (e.g. model.overrides.image_size)")
    try:
        parsed = _toml().loads(f"v = {value.strip()}")["v"]
    except Exception:
        parsed = value.strip()
    return path, parsed


def load_config(path: Union[str, os.PathLike], overrides: Optional[list[str]] = None) -> TrainConfig:
    """Reads a TOML config, applies ``overrides`` (``KEY=VALUE`` strings, see :func:`parse_override`)
    and checks it. A missing or malformed file is one error naming it."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a config file path, got {type(path).__name__}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config: no such file {path}")
    toml = _toml()
    try:
        raw = toml.loads(path.read_text(encoding="utf-8"))
    except (toml.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"config {path} is not valid TOML: {exc}") from exc
    for text in overrides or []:
        keys, value = parse_override(text)
        table = raw
        for k in keys[:-1]:
            table = table.setdefault(k, {})
            if not isinstance(table, dict):
                raise ValueError(f"override {text!r}: {k} is not a table")
        table[keys[-1]] = value
    return TrainConfig.from_dict(raw, str(path))
