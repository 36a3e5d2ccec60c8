"""``ovseg-fast profile MODEL``: parameters, GFLOPs, latency/FPS, peak memory and efficiency of one
forward (``--train``: and of one training step) of a registered model
(:func:`ovseg_fast.models.profile.profile`), printed as Markdown tables beside ZegCLIP's quoted row;
``--json`` saves the results."""

from __future__ import annotations

import argparse
import ast
import datetime
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

_DTYPES = ("float32", "bfloat16")


def _override(text: str) -> tuple[str, Any]:
    """``key=value``; the value is a Python literal (number, tuple, dict, ...) or else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"--set takes key=value, got {text!r}")
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        parsed = value
    return key.strip(), parsed


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "profile",
        help="params, GFLOPs, latency/FPS, peak memory and efficiency of a model",
        description=__doc__,
    )
    parser.add_argument("model", help="registered model name (see ovseg-fast models / ovseg_fast.models.list_models)")
    parser.add_argument("--size", type=int, default=512, help="input side in pixels (default 512)")
    parser.add_argument("--classes", type=int, default=20, help="number of classes (default 20, VOC)")
    parser.add_argument("--batch", type=int, default=1, help="images per forward (default 1)")
    parser.add_argument(
        "--compare", choices=["reference"], help="also time it with every ovseg-fast op on its reference backend"
    )
    parser.add_argument(
        "--dtype",
        nargs="+",
        choices=_DTYPES,
        default=["float32"],
        help="float32 and/or bfloat16 (CPU autocast); several are profiled one after the other",
    )
    parser.add_argument("--depth", type=int, default=3, help="levels of the per-module GFLOPs breakdown (default 3)")
    parser.add_argument("--pretrained", help="checkpoint file (or a name under $OVSEG_WEIGHTS_DIR); default: random")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        type=_override,
        default=[],
        metavar="KEY=VALUE",
        help="model config override, a Python literal or a string (repeatable), e.g. --set image_size=224",
    )
    parser.add_argument(
        "--train",
        action="store_true",
        help="also profile one training step (forward, losses, backward, AdamW step) on random targets",
    )
    parser.add_argument("--min-seconds", type=float, default=2.0, help="least time spent on timed forwards")
    parser.add_argument("--json", help="save the results as JSON (written atomically)")
    return parser


def write_json_atomic(path: Path, data: Any) -> None:
    """Writes ``data`` as JSON to ``path`` through a temporary file in the same directory and
    ``os.replace``, so a reader never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run(args: argparse.Namespace) -> int:
    import torch

    from ovseg_fast.cli.bench import machine_block
    from ovseg_fast.info import collect
    from ovseg_fast.models.profile import format_profile, profile

    overrides = dict(args.overrides)

    def progress(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    results = []
    for name in args.dtype:
        results.append(
            profile(
                args.model,
                size=args.size,
                classes=args.classes,
                batch=args.batch,
                compare=args.compare,
                dtype=getattr(torch, name),
                depth=args.depth,
                pretrained=args.pretrained,
                min_seconds=args.min_seconds,
                train=args.train,
                progress=progress,
                **overrides,
            )
        )
    print(format_profile(results))
    if args.json:
        info = collect()
        data = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": ["ovseg-fast", "profile", *sys.argv[2:]] if sys.argv[1:2] == ["profile"] else None,
            "machine": machine_block(info),
            "versions": {k: info[k] for k in ("ovseg_fast", "python", "torch", "numpy")},
            "overrides": {k: repr(v) for k, v in overrides.items()},
            "results": [r.to_dict() for r in results],
        }
        write_json_atomic(Path(args.json), data)
        print(f"\nsaved {args.json}", file=sys.stderr)
    return 0
