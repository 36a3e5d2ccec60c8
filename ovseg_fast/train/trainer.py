"""The training loop: one process or many through ``torchrun`` (DistributedDataParallel).

One iteration consumes one *global batch* of ``schedule.batch_size`` samples, split over the
``world`` processes and ``schedule.accumulation`` micro-steps (each process runs ``batch_size /
(world * accumulation)`` samples per micro-step). The global batches are fixed by the seed: epoch
``e`` is a permutation of the training set drawn from ``seed + e``, cut into consecutive global
batches (the incomplete tail dropped), and sample ``j`` of a global batch goes to micro-step
``j // (world * b)``, process ``j % world``. Each sample's augmentation is seeded by (seed, epoch,
index) (:class:`ovseg_fast.data.Augmented`). So the samples, their augmentation and, up to floating
point summation order, the gradients do not depend on the number of processes, and a resumed run
continues exactly where the checkpoint was written.

Per iteration: the model's losses (``Segmentor.loss``: a dict of named terms, summed) scaled by
1 / accumulation, backward (DDP synchronises gradients on the last micro-step only), optional
gradient clipping by global norm, AdamW, the poly/warm-up schedule. Mixed precision autocasts the
forward to bfloat16 (CPU or GPU) or float16 (GPU, with a gradient scaler).

Outputs in ``run.work_dir`` (rank 0 writes): ``checkpoint.pt`` (model, optimizer, scheduler, scaler,
every rank's RNG states, step; written to a temporary file and renamed, so a killed run leaves the
previous checkpoint intact), ``model.pt`` (the final weights), ``log.jsonl`` (one JSON object per
log line and per evaluation), ``eval.json`` (the last evaluation).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from torch import Tensor, nn

from ovseg_fast.train.config import TrainConfig
from ovseg_fast.train.evaluate import evaluate, format_metrics, metrics_record

__all__ = ["Trainer", "atomic_save", "build_data", "build_model", "init_distributed", "load_weights", "poly_warmup"]

CHECKPOINT = "checkpoint.pt"
WEIGHTS = "model.pt"
LOG = "log.jsonl"


def poly_warmup(step: int, *, iterations: int, warmup_iters: int, warmup_ratio: float, power: float,
                lr: float, min_lr: float) -> float:
    """mmsegmentation's learning rate at iteration ``step`` (0-based): poly decay
    ``(lr - min_lr) (1 - step / iterations)^power + min_lr``, times a linear ramp from
    ``warmup_ratio`` to 1 over the first ``warmup_iters`` iterations."""
    value = (lr - min_lr) * (1 - min(step, iterations) / iterations) ** power + min_lr
    if step < warmup_iters:
        value *= 1 - (1 - step / warmup_iters) * (1 - warmup_ratio)
    return value


def atomic_save(obj: Any, path: Union[str, os.PathLike]) -> None:
    """``torch.save`` to a temporary file in the same folder, flushed to disk, then renamed over
    ``path``: a reader sees the old file or the new one, never a partial one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_weights(model: nn.Module, path: Union[str, os.PathLike]) -> None:
    """Loads the weights of a training output into ``model``: ``model.pt``, a ``checkpoint.pt``
    (its ``"model"`` entry) or a plain state dict. Mismatched keys or shapes are one error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights: no such file {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ValueError(f"weights: cannot read {path} as a torch checkpoint: {exc}") from exc
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"weights: {path} holds no state dict of tensors")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"weights: {path} does not fit the model {type(model).__name__}: {exc}") from exc


def _dist_info() -> tuple[int, int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        return rank, world, int(os.environ.get("LOCAL_RANK", rank))
    return 0, 1, 0


def init_distributed(device: str) -> bool:
    """Joins the process group torchrun describes (``WORLD_SIZE`` > 1) unless one exists; returns
    whether this call created it (and so must destroy it)."""
    if not torch.distributed.is_available() or torch.distributed.is_initialized():
        return False
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    use_cuda = device != "cpu" and torch.cuda.is_available()
    torch.distributed.init_process_group(backend="nccl" if use_cuda else "gloo")
    return True


def build_model(config: TrainConfig) -> nn.Module:
    """The model a config names: ``create_model(model.name, pretrained=model.pretrained,
    **model.overrides)`` with the parameters ``model.freeze`` names frozen."""
    from ovseg_fast.models import create_model

    c = config.model
    model = create_model(c.name, pretrained=c.pretrained, **c.overrides)
    if not getattr(model, "trains_from_labels", True):
        raise ValueError(
            f"{config.source}: {c.name} does not learn from label maps, which is what ovseg-fast train does "
            f"(a cross-entropy on the dataset's masks would not be {c.name}'s training): train it through its "
            f"own training_step (see the README's example); eval and segment take it as any model"
        )
    if c.freeze:
        names = [n for n, _ in model.named_parameters()]
        for key in c.freeze:
            if not any(key in n for n in names):
                raise ValueError(f"{config.source}: model.freeze {key!r} matches no parameter of {c.name}")
        for name, p in model.named_parameters():
            if any(key in name for key in c.freeze):
                p.requires_grad_(False)
    return model


class _GlobalBatches:
    """The batch sampler of one process: for each iteration from ``start`` on, ``accumulation``
    micro-batches of (epoch, index) pairs (see the module docstring for the order)."""

    def __init__(self, size: int, batch_size: int, accumulation: int, world: int, rank: int, seed: int,
                 start: int, iterations: int) -> None:
        self.size, self.batch_size, self.accumulation = size, batch_size, accumulation
        self.world, self.rank, self.seed = world, rank, seed
        self.start, self.iterations = start, iterations
        self.per_epoch = size // batch_size
        if self.per_epoch == 0:
            raise ValueError(f"the training set has {size} samples, fewer than one global batch of {batch_size}")

    def __len__(self) -> int:
        return (self.iterations - self.start) * self.accumulation

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        micro = self.batch_size // (self.world * self.accumulation)
        perm, perm_epoch = None, -1
        for step in range(self.start, self.iterations):
            epoch, k = divmod(step, self.per_epoch)
            if epoch != perm_epoch:
                g = torch.Generator().manual_seed(self.seed + epoch)
                perm, perm_epoch = torch.randperm(self.size, generator=g).tolist(), epoch
            batch = perm[k * self.batch_size : (k + 1) * self.batch_size]
            for m in range(self.accumulation):
                chunk = batch[m * self.world * micro : (m + 1) * self.world * micro]
                yield [(epoch, i) for i in chunk[self.rank :: self.world]]


class _EpochIndexed(torch.utils.data.Dataset):
    """Routes the sampler's (epoch, index) pairs to ``Augmented`` (epoch set per sample, so workers
    need no shared state)."""

    def __init__(self, augmented) -> None:
        self.augmented = augmented

    def __len__(self) -> int:
        return len(self.augmented)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        self.augmented.set_epoch(epoch)
        return self.augmented[index]


def build_data(config: TrainConfig, *, skip_bad: bool = False, train: bool = True):
    """(train set or None, validation set, training class names, evaluation class names, seen, unseen)
    of a config: the datasets wrapped with their transforms (:class:`ovseg_fast.data.Augmented`)."""
    from ovseg_fast.data import Augmented, EvalTransform, RestrictClasses, TrainTransform, build_dataset
    from ovseg_fast.data.common import zero_shot_split

    d = config.data
    val = build_dataset(d.dataset, d.val_split, d.root, **{**d.options, **d.val_options})
    eval_names = tuple(val.class_names)
    seen = unseen = None
    if d.zero_shot:
        key = getattr(val, "key", d.dataset)
        seen, unseen = zero_shot_split(key)
    val_set = Augmented(val, EvalTransform(**d.eval_transform), skip_bad=skip_bad)
    train_set, train_names = None, eval_names
    if train:
        raw = build_dataset(d.dataset, d.train_split, d.root, **{**d.options, **d.train_options})
        if tuple(raw.class_names) != eval_names:
            raise ValueError(f"{config.source}: the train and val splits have different class lists")
        if seen is not None:
            raw = RestrictClasses(raw, seen)  # inductive zero-shot: unseen pixels are ignored in training
        train_names = tuple(raw.class_names)
        train_set = Augmented(raw, TrainTransform(**d.train_transform), seed=config.schedule.seed, skip_bad=skip_bad)
    return train_set, val_set, train_names, eval_names, seen, unseen


class Trainer:
    """Trains the model a :class:`TrainConfig` describes (see the module docstring).

    Args:
        config: the config.
        resume: a checkpoint to continue from (``True``: ``work_dir/checkpoint.pt``).
        skip_bad: count and skip bad samples instead of stopping at the first.
        progress: show a tqdm progress bar (rank 0).
        callbacks: functions ``f(trainer, step, record)`` called on every rank after each iteration
            (``step`` 1-based, ``record`` the iteration's averaged losses).
    """

    def __init__(
        self,
        config: TrainConfig,
        *,
        resume: Union[bool, str, os.PathLike, None] = None,
        skip_bad: bool = False,
        progress: bool = True,
        callbacks: Optional[list[Callable[[Trainer, int, dict], None]]] = None,
    ) -> None:
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        self.config = config
        self.skip_bad = bool(skip_bad)
        self.progress = progress
        self.callbacks = list(callbacks or [])
        self.work_dir = Path(config.run.work_dir)
        self.resume = self.work_dir / CHECKPOINT if resume is True else (Path(resume) if resume else None)
        if self.resume is not None and not self.resume.is_file():
            raise FileNotFoundError(f"resume: no checkpoint {self.resume}")
        self.step = 0
        self.skipped = 0
        self.history: list[dict[str, Any]] = []

    # -- setup ----------------------------------------------------------------------------------
    def _device(self) -> torch.device:
        want = self.config.run.device
        _, _, local = _dist_info()
        if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
            if not torch.cuda.is_available():
                raise RuntimeError("run.device is 'cuda' but no CUDA device is available")
            torch.cuda.set_device(local % torch.cuda.device_count())
            return torch.device("cuda", local % torch.cuda.device_count())
        return torch.device("cpu")

    def _amp_dtype(self, device: torch.device) -> Optional[torch.dtype]:
        amp = self.config.schedule.amp
        if amp == "none":
            return None
        if amp == "fp16" and device.type != "cuda":
            raise ValueError("schedule.amp = 'fp16' needs a GPU; use 'bf16' (or 'none') on the CPU")
        return torch.bfloat16 if amp == "bf16" else torch.float16

    def _param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        s = self.config.schedule
        trainable = {id(p) for p in model.trainable_parameters()}
        groups: dict[float, list[nn.Parameter]] = {}
        for name, p in model.named_parameters():
            if id(p) not in trainable:
                continue
            mult = next((m for key, m in s.lr_mult.items() if key in name), 1.0)
            groups.setdefault(float(mult), []).append(p)
        if not groups:
            raise ValueError(
                f"model {self.config.model.name!r} has no trainable parameters (trainable_parameters() is empty)"
            )
        return [{"params": ps, "lr_mult": m} for m, ps in groups.items()]

    def setup(self) -> None:
        c, s = self.config, self.config.schedule
        self.owns_group = init_distributed(c.run.device)
        self.rank, self.world, _ = _dist_info()
        if s.batch_size % (self.world * s.accumulation):
            raise ValueError(
                f"schedule.batch_size {s.batch_size} must be divisible by processes x accumulation "
                f"({self.world} x {s.accumulation})"
            )
        self.device = self._device()
        self.amp = self._amp_dtype(self.device)
        # Same seed on every rank: the same initial weights (DDP broadcasts rank 0's anyway).
        torch.manual_seed(s.seed)
        random.seed(s.seed)
        np.random.seed(s.seed % 2**32)  # noqa: NPY002 - the global stream third-party code draws from
        if c.run.threads:
            torch.set_num_threads(c.run.threads)
        model = build_model(c)
        self.model = model.to(self.device)
        data = build_data(c, skip_bad=self.skip_bad)
        self.train_set, self.val_set, self.class_names, self.eval_names, self.seen, self.unseen = data
        self.optimizer = torch.optim.AdamW(self._param_groups(model), lr=s.lr, betas=tuple(s.betas),
                                           weight_decay=s.weight_decay)
        base = dict(iterations=s.iterations, warmup_iters=s.warmup_iters, warmup_ratio=s.warmup_ratio,
                    power=s.power, lr=s.lr, min_lr=s.min_lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, [lambda t, m=g["lr_mult"]: m * poly_warmup(t, **base) / s.lr for g in
                             self.optimizer.param_groups])
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == torch.float16)
        self.ddp = None
        if self.world > 1:
            # Unused parameters happen legitimately (routed experts, prompts of skipped layers).
            kwargs = {"device_ids": [self.device.index]} if self.device.type == "cuda" else {}
            self.ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True, **kwargs)
        if self.resume is not None:
            self._load_checkpoint(self.resume)
        if self.rank == 0:
            self.work_dir.mkdir(parents=True, exist_ok=True)

    # -- checkpoints ----------------------------------------------------------------------------
    def _rng_state(self) -> dict[str, Any]:
        # numpy's legacy global stream is saved because third-party code may draw from it.
        numpy_state = np.random.get_state()  # noqa: NPY002
        state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def _set_rng_state(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        np.random.set_state(state["numpy"])  # noqa: NPY002
        random.setstate(state["python"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])

    def save_checkpoint(self) -> None:
        """Writes ``checkpoint.pt`` atomically (a collective: every rank sends its RNG state)."""
        rng = [self._rng_state()]
        if self.world > 1:
            gathered: list[Any] = [None] * self.world
            torch.distributed.all_gather_object(gathered, rng[0])
            rng = gathered
        if self.rank == 0:
            state = {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "rng": rng,
                "step": self.step,
                "skipped": self.skipped,
                "world": self.world,
                "config": self.config.as_dict(),
                "class_names": list(self.class_names),
            }
            atomic_save(state, self.work_dir / CHECKPOINT)

    def _load_checkpoint(self, path: Path) -> None:
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:
            raise ValueError(f"resume: cannot read {path} as a checkpoint: {exc}") from exc
        needed = ("model", "optimizer", "scheduler", "rng", "step")
        if not isinstance(state, dict) or any(k not in state for k in needed):
            raise ValueError(f"resume: {path} is not a training checkpoint (needs {', '.join(needed)})")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.skipped = int(state.get("skipped", 0))
        rng = state["rng"]
        if len(rng) != self.world:
            # Another process count: the data order is unchanged, only the model's own randomness
            # (dropout, noisy gating) differs from an uninterrupted run.
            print(f"resume: the checkpoint was written by {len(rng)} processes, this run has {self.world}; "
                  "the RNG streams of the model are reseeded", file=sys.stderr)
            torch.manual_seed(self.config.schedule.seed + self.step * 1000 + self.rank)
        else:
            self._set_rng_state(rng[self.rank])

    # -- the loop -------------------------------------------------------------------------------
    def _loader(self) -> torch.utils.data.DataLoader:
        from ovseg_fast.data import collate

        s = self.config.schedule
        sampler = _GlobalBatches(len(self.train_set), s.batch_size, s.accumulation, self.world, self.rank, s.seed,
                                 self.step, s.iterations)
        workers = self.config.data.num_workers
        return torch.utils.data.DataLoader(
            _EpochIndexed(self.train_set), batch_sampler=sampler, collate_fn=collate, num_workers=workers,
            prefetch_factor=4 if workers else None,
            # Its own generator: creating the iterator must not draw from the global stream, or a
            # resumed run's model randomness would be one draw off an uninterrupted run's.
            generator=torch.Generator().manual_seed(s.seed),
        )

    def _log(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self.rank == 0:
            with open(self.work_dir / LOG, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def _reduce(self, values: dict[str, float]) -> dict[str, float]:
        if self.world == 1 or not values:
            return values
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return {k: float(v) / self.world for k, v in zip(keys, t.tolist())}

    def train_step(self, micro_batches: list[Optional[dict[str, Any]]]) -> dict[str, float]:
        """One iteration on this process's micro-batches; returns the losses averaged over processes."""
        s = self.config.schedule
        model = self.ddp if self.ddp is not None else self.model
        model.train()
        totals: dict[str, float] = {}
        skipped = 0
        for m, batch in enumerate(micro_batches):
            skipped += batch["skipped"]
            last = m == len(micro_batches) - 1
            sync = contextlib.nullcontext() if (last or self.ddp is None) else self.ddp.no_sync()
            with sync:
                if "image" not in batch:
                    if self.ddp is not None:
                        raise RuntimeError(
                            "every sample of a micro-batch was bad on one process: with several processes a "
                            "micro-batch must keep at least one sample (use a larger batch or fix the data)"
                        )
                    continue
                images = batch["image"].to(self.device, non_blocking=True)
                targets = batch["mask"].to(self.device, non_blocking=True)
                autocast = (torch.autocast(self.device.type, dtype=self.amp) if self.amp is not None
                            else contextlib.nullcontext())
                with autocast:
                    outputs = model(images, list(self.class_names))
                losses = self.model.loss(outputs, targets)
                if not isinstance(losses, dict) or not losses:
                    raise TypeError(f"{type(self.model).__name__}.loss must return a dict of named losses")
                loss = sum(losses.values()) / len(micro_batches)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"iteration {self.step + 1}: the loss is {float(loss)} ({losses})")
                self.scaler.scale(loss).backward()
            for k, v in losses.items():
                totals[k] = totals.get(k, 0.0) + float(v.detach()) / len(micro_batches)
        totals["loss"] = sum(v for k, v in totals.items())
        if s.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            totals["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, s.clip_grad))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        counted = torch.tensor([skipped], dtype=torch.int64, device=self.device)
        if self.world > 1:
            torch.distributed.all_reduce(counted)
        self.skipped += int(counted.item())
        return self._reduce(totals)

    def run_evaluation(self, *, final: bool = False) -> dict[str, Any]:
        e = self.config.eval
        metrics, skipped = evaluate(
            self.model, self.val_set, self.eval_names, seen=self.seen, unseen=self.unseen, mode=e.mode,
            crop=e.crop, stride=e.stride, device=self.device, amp=self.amp,
            max_samples=0 if final else e.max_samples, progress=self.progress,
        )
        record = metrics_record(metrics, self.eval_names, step=self.step, kind="eval", skipped=skipped)
        self._log(record)
        if self.rank == 0:
            (self.work_dir / "eval.json").write_text(json.dumps(record, indent=1))
            if self.progress:
                print(f"\nevaluation at iteration {self.step}:\n{format_metrics(metrics)}", file=sys.stderr)
        return record

    def run(self) -> dict[str, Any]:
        """Trains to ``schedule.iterations`` (from the checkpoint when resuming), evaluates, writes
        ``model.pt``; returns the final evaluation record."""
        self.setup()
        c, s = self.config, self.config.schedule
        try:
            bar = None
            if self.progress and self.rank == 0:
                from tqdm import tqdm

                bar = tqdm(total=s.iterations, initial=self.step, desc="train", unit="it", dynamic_ncols=True)
            pending: list = []
            window_start, window_steps = time.perf_counter(), 0
            for micro in self._loader():
                pending.append(micro)
                if len(pending) < s.accumulation:
                    continue
                record = self.train_step(pending)
                pending = []
                self.step += 1
                window_steps += 1
                record = {"step": self.step, "lr": self.optimizer.param_groups[0]["lr"], **record}
                for cb in self.callbacks:
                    cb(self, self.step, record)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
                if self.step % c.run.log_interval == 0 or self.step == s.iterations:
                    elapsed = time.perf_counter() - window_start
                    self._log({**record, "kind": "train", "it_per_s": window_steps / max(elapsed, 1e-9),
                               "skipped": self.skipped})
                    window_start, window_steps = time.perf_counter(), 0
                if self.step % c.run.checkpoint_interval == 0 or self.step == s.iterations:
                    self.save_checkpoint()
                if c.eval.interval and self.step % c.eval.interval == 0 and self.step != s.iterations:
                    self.run_evaluation()
            if bar is not None:
                bar.close()
            if self.skipped and self.rank == 0:
                print(f"skipped {self.skipped} bad training samples (--skip-bad)", file=sys.stderr)
            result = self.run_evaluation(final=True)
            if self.rank == 0:
                atomic_save(self.model.state_dict(), self.work_dir / WEIGHTS)
            return result
        finally:
            if self.world > 1:
                torch.distributed.barrier()
            if self.owns_group:
                torch.distributed.destroy_process_group()

