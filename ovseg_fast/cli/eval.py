"""``ovseg-fast eval CONFIG --weights W``: evaluates trained weights on the config's validation split.

Prints pAcc, mIoU, mIoU(seen), mIoU(unseen) and hIoU (the last three when the config's data has
``zero_shot = true``); ``--json PATH`` writes them with the per-class IoU. ``--mode whole|slide``
overrides ``eval.mode``. Under ``torchrun`` every process evaluates its share and the confusion
matrices are all-reduced.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "eval", help="evaluate weights on a config's validation split", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", help="the TOML config file")
    parser.add_argument("--weights", help="trained weights: model.pt or checkpoint.pt of a training run "
                        "(absent: the model as built, e.g. training-free clip with model.pretrained)")
    parser.add_argument("--mode", choices=("whole", "slide"), help="inference mode (default: eval.mode)")
    parser.add_argument("--json", metavar="PATH", help="write the metrics and per-class IoU as JSON")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="override a config key (repeatable)")
    parser.add_argument("--skip-bad", action="store_true", help="count and skip bad samples instead of stopping")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def run(args: argparse.Namespace) -> int:
    import torch

    from ovseg_fast.cli.train import describe_inputs
    from ovseg_fast.train.config import load_config
    from ovseg_fast.train.evaluate import evaluate, format_metrics, metrics_record
    from ovseg_fast.train.trainer import build_data, build_model, init_distributed, load_weights

    overrides = list(args.overrides) + ([f"eval.mode={args.mode!r}"] if args.mode else [])
    try:
        config = load_config(args.config, overrides)
        owns_group = init_distributed(config.run.device)
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        if rank == 0:
            notes = describe_inputs(config)
            if args.weights is None:
                notes.append("no --weights: evaluating the model as built")
            for note in notes:
                print(f"note: {note}", file=sys.stderr)
        if config.run.threads:
            torch.set_num_threads(config.run.threads)
        model = build_model(config)
        if args.weights is not None:
            load_weights(model, args.weights)
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if (
            config.run.device != "cpu" and torch.cuda.is_available()) else torch.device("cpu")
        model.to(device)
        _, val_set, _, names, seen, unseen = build_data(config, skip_bad=args.skip_bad, train=False)
        amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.schedule.amp)
        if amp == torch.float16 and device.type != "cuda":
            amp = None
        e = config.eval
        metrics, skipped = evaluate(model, val_set, names, seen=seen, unseen=unseen, mode=e.mode, crop=e.crop,
                                    stride=e.stride, device=device, amp=amp, progress=not args.no_progress)
    except (OSError, ValueError, TypeError) as exc:
        print(f"ovseg-fast eval: {exc}", file=sys.stderr)
        return 2
    try:
        if rank == 0:
            print(format_metrics(metrics))
            if skipped:
                print(f"skipped {skipped} bad samples (--skip-bad)", file=sys.stderr)
            if args.json:
                record = metrics_record(metrics, names, weights=args.weights, config=str(args.config),
                                        mode=e.mode, skipped=skipped)
                with open(args.json, "w", encoding="utf-8") as f:
                    json.dump(record, f, indent=1)
    finally:
        if owns_group:
            torch.distributed.destroy_process_group()
    return 0
