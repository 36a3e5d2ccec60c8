"""The ``ovseg-fast`` command.

``ovseg-fast info``                 the environment report (same as ``python -m ovseg_fast.info``).
``ovseg-fast bench [OP ...]``       runs the benchmarks of the named ops (default: every op and
                                    drop-in; ``models`` runs when named) with pytest-benchmark,
                                    then prints per op, case and mode the median
                                    time of every provider, ovseg-fast's speed-up over it and the
                                    peak memory. ``--json PATH`` saves results, machine, versions and
                                    commit and the CPU capability; ``--plot PATH`` draws the
                                    speed-ups as a PNG, one panel per op.
``ovseg-fast report FILE.json ...`` prints saved runs as the README's Markdown ratio tables, one
                                    section per CPU capability class (AVX-512, AVX2); ``--readme
                                    README.md`` writes each into its class's slot, ``--plot PATH``
                                    redraws a run's speed-ups.
``ovseg-fast models [NAME ...]``    the registered models and their config fields and defaults.
``ovseg-fast train CONFIG``         trains a model from a TOML config (configs/); --resume, --skip-bad,
                                    --set KEY=VALUE; several processes through torchrun.
``ovseg-fast eval CONFIG --weights W``  pAcc, mIoU, mIoU(seen/unseen), hIoU on the config's val split.
``ovseg-fast segment IMAGE... --model M --classes "a,b"``  label and overlay PNGs per image.
``ovseg-fast convert MODEL IN OUT`` a model's published checkpoint (e.g. ``pixelclip`` .pth of the
                                    authors' code) -> a safetensors file ``create_model(MODEL,
                                    pretrained=OUT)`` loads, checked strictly first.
``ovseg-fast tune MODEL IMAGES``    PnP-OVSS hyperparameters by the paper's CLIP reward and random
                                    search over a folder of images (``--classes-from labels.json``).

Each command is a module of this package exposing ``add_parser(subparsers)`` and ``run(args)``;
adding a command is adding its module and naming it in ``_COMMANDS``.
"""

from __future__ import annotations

import argparse
import importlib
from typing import Optional

from ovseg_fast.cli.bench import benchmark_files, run_benchmarks
from ovseg_fast.cli.report import add_speedups, format_markdown, format_table, plot

__all__ = ["add_speedups", "benchmark_files", "format_markdown", "format_table", "main", "plot", "run_benchmarks"]

# Module names under ovseg_fast.cli, in the order `ovseg-fast --help` lists them.
_COMMANDS = ("info", "bench", "report", "profile", "models", "convert", "tune", "train", "eval", "segment")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ovseg-fast", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in _COMMANDS:
        module = importlib.import_module(f"ovseg_fast.cli.{name}")
        module.add_parser(sub).set_defaults(_run=module.run)
    args = parser.parse_args(argv)
    return args._run(args)
