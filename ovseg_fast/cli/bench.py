"""``ovseg-fast bench``: runs ``bench/bench_<op>.py`` with pytest-benchmark and collects one row per
measurement, then prints the ratio table and optionally saves the run as JSON and a plot."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

from ovseg_fast.cli.report import add_speedups, format_table, plot

__all__ = ["benchmark_files", "run_benchmarks"]


def _bench_dir() -> Path:
    import ovseg_fast.bench

    return Path(ovseg_fast.bench.__file__).resolve().parent


def benchmark_files(ops: list[str]) -> list[Path]:
    available = {p.stem[len("bench_") :]: p for p in sorted(_bench_dir().glob("bench_*.py"))}
    if not ops:
        return list(available.values())
    unknown = [op for op in ops if op not in available]
    if unknown:
        raise SystemExit(f"ovseg-fast bench: no benchmark for {', '.join(unknown)}; choose from {', '.join(available)}")
    return [available[op] for op in ops]


def _git_commit() -> Optional[str]:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=_bench_dir(), capture_output=True, text=True, check=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=_bench_dir(), capture_output=True, text=True, timeout=10
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def run_benchmarks(files: list[Path], extra_pytest_args: list[str]) -> list[dict[str, Any]]:
    """Runs pytest-benchmark on ``files`` (progress on the terminal) and returns one row per measurement.

    Each file runs in a process of its own, so that what one op leaves behind (a heap grown by a
    600 MiB reference, compiled graphs, allocator state) does not colour the next op's timings.
    """
    benchmarks, failed = [], []
    for path in files:
        with tempfile.TemporaryDirectory() as tmp:
            raw = Path(tmp) / "raw.json"
            cmd = [
                sys.executable,
                "-m",
                "pytest",
                str(path),
                "-v",
                "-p",
                "no:cacheprovider",
                f"--benchmark-json={raw}",
                "--benchmark-columns=median,iqr,rounds",
                "--benchmark-sort=name",
                "--rootdir",
                str(_bench_dir()),
                *extra_pytest_args,
            ]
            print("running:", " ".join(cmd), flush=True)
            code = subprocess.call(cmd)
            if code == 5:  # pytest: no test collected (a -k that selects nothing in this file)
                continue
            if code != 0:
                failed.append(f"{path.name} (pytest exit {code})")
            if raw.exists():
                benchmarks += json.loads(raw.read_text())["benchmarks"]
    if not benchmarks:
        raise SystemExit(f"ovseg-fast bench: the benchmarks failed: {', '.join(failed) or 'nothing was measured'}")
    if failed:
        print(f"ovseg-fast bench: warning: {', '.join(failed)}; the table shows what was measured", file=sys.stderr)
    rows = []
    for bench in benchmarks:
        info = bench["extra_info"]
        stats = bench["stats"]
        flops = info.get("flops")
        rows.append(
            {
                "op": info["op"],
                "case": info["case"],
                "mode": info["mode"],
                "provider": info["provider"],
                "median_s": stats["median"],
                "iqr_s": stats["iqr"],
                "rounds": stats["rounds"],
                "peak_memory_bytes": info.get("peak_memory"),
                "flops": flops,
                "gflops_per_s": (flops / stats["median"] / 1e9) if flops else None,
            }
        )
    return rows


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("bench", help="run benchmarks and print the ratio table")
    parser.add_argument("ops", nargs="*", help="ops to benchmark (default: all)")
    parser.add_argument("--json", help="save results, machine, versions and commit as JSON")
    parser.add_argument("--plot", help="save a PNG bar chart of the speed-ups")
    parser.add_argument("-k", help="pytest -k expression to select cases")
    return parser


def run(args: argparse.Namespace) -> int:
    from ovseg_fast.info import collect

    os.environ.setdefault("PYTHONWARNINGS", "ignore::UserWarning")
    files = benchmark_files(args.ops)
    extra = ["-k", args.k] if args.k else []
    rows = run_benchmarks(files, extra)
    add_speedups(rows)
    print(format_table(rows))
    info = collect()
    machine = {
        **info["cpu"],
        "platform": info["platform"],
        "kernel_capability": info["extension"].get("kernel_capability"),
        "torch_huge_pages": os.environ.get("OVSEG_BENCH_THP", "1") != "0"
        or os.environ.get("THP_MEM_ALLOC_ENABLE") == "1",
    }
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _git_commit(),
        "machine": machine,
        "versions": {k: info[k] for k in ("ovseg_fast", "python", "torch", "triton", "numpy")},
        "extension": info["extension"],
        "results": rows,
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"\nsaved {args.json}")
    if args.plot:
        plot(rows, Path(args.plot))
        print(f"saved {args.plot}")
    print(
        f"\nmachine: {machine['model']}, {machine['threads']} threads, kernels {machine['kernel_capability']}, "
        f"torch huge pages {'on' if machine['torch_huge_pages'] else 'off'} (see bench/conftest.py)"
    )
    return 0
