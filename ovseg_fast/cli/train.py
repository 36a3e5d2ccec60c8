"""``ovseg-fast train CONFIG``: trains the model a TOML config describes (see ``configs/``).

``--resume [CHECKPOINT]`` continues a run (default: ``<work_dir>/checkpoint.pt``) exactly where its
checkpoint was written; ``--skip-bad`` counts and skips corrupt samples instead of stopping;
``--set KEY=VALUE`` overrides a config key (``--set schedule.iterations=100``). Several processes
or machines: ``torchrun --nproc-per-node=N --no-python ovseg-fast train CONFIG`` (DDP; gloo on CPUs,
NCCL on GPUs; rank 0 logs and writes checkpoints).
"""

from __future__ import annotations

import argparse
import os
import sys


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train", help="train a model from a TOML config", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", help="the TOML config file (e.g. configs/shapes_clip.toml)")
    parser.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                        help="continue from CHECKPOINT (default: <work_dir>/checkpoint.pt)")
    parser.add_argument("--skip-bad", action="store_true", help="count and skip bad samples instead of stopping")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="override a config key, e.g. --set schedule.iterations=100 (repeatable)")
    parser.add_argument("--work-dir", help="output folder (overrides run.work_dir)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def describe_inputs(config) -> list[str]:
    """Notes printed before a run about what is synthetic or random, so nobody mistakes the output."""
    notes = []
    if config.data.dataset == "shapes":
        notes.append("data: the synthetic 'shapes' dataset, generated in memory (no download)")
    if config.model.pretrained is None:
        notes.append(f"model {config.model.name!r}: no CLIP checkpoint (model.pretrained), so RANDOM initial weights")
    return notes


def run(args: argparse.Namespace) -> int:
    from ovseg_fast.train.config import load_config
    from ovseg_fast.train.evaluate import format_metrics
    from ovseg_fast.train.trainer import Trainer

    overrides = list(args.overrides)
    if args.work_dir:
        overrides.append(f"run.work_dir={args.work_dir!r}")
    try:
        config = load_config(args.config, overrides)
        trainer = Trainer(config, resume=args.resume, skip_bad=args.skip_bad, progress=not args.no_progress)
    except (OSError, ValueError, TypeError) as exc:
        print(f"ovseg-fast train: {exc}", file=sys.stderr)
        return 2
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        for note in describe_inputs(config):
            print(f"note: {note}", file=sys.stderr)
    try:
        record = trainer.run()
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"ovseg-fast train: {exc}", file=sys.stderr)
        return 2
    if trainer.rank == 0:
        print(f"trained {config.model.name} for {trainer.step} iterations; outputs in {trainer.work_dir}")
        print(format_metrics(record))
    return 0

