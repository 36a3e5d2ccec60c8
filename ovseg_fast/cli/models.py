"""``ovseg-fast models [NAME ...]``: the registered models and their configs (field, type, default),
the keys ``create_model(name, **overrides)`` and ``ovseg-fast profile --set KEY=VALUE`` accept."""

from __future__ import annotations

import argparse
import dataclasses
import sys


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("models", help="registered models and their config fields", description=__doc__)
    parser.add_argument("names", nargs="*", help="models to show (default: all)")
    return parser


def format_model(name: str) -> str:
    """One model: its name, its config's first docstring line, then ``field: type = default`` lines."""
    from ovseg_fast.models import model_config

    config = model_config(name)
    doc = (type(config).__doc__ or "").strip().splitlines()
    if doc and doc[0].startswith(type(config).__name__ + "("):
        doc = []  # the signature dataclasses write when a config has no docstring
    lines = [f"{name}: {type(config).__name__}" + (f" - {doc[0]}" if doc else "")]
    for field in dataclasses.fields(config):
        kind = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))
        lines.append(f"  {field.name}: {kind} = {getattr(config, field.name)!r}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from ovseg_fast.models import list_models

    known = list_models()
    unknown = [n for n in args.names if n not in known]
    if unknown:
        names = ", ".join(unknown)
        print(f"ovseg-fast models: unknown model {names}; known models: {', '.join(known)}", file=sys.stderr)
        return 2
    print("\n\n".join(format_model(name) for name in args.names or known))
    return 0
