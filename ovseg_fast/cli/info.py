"""``ovseg-fast info``: the environment report of :mod:`ovseg_fast.info`."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    return subparsers.add_parser("info", help="environment report")


def run(args: argparse.Namespace) -> int:
    from ovseg_fast.info import main as info_main

    return info_main()
