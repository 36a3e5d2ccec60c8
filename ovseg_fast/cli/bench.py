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

from ovseg_fast.cli.report import add_speedups, capability_class, format_table, machine_summary, plot, plot_title

__all__ = ["benchmark_files", "machine_block", "run_benchmarks"]


def _bench_dir() -> Path:
    import ovseg_fast.bench

    return Path(ovseg_fast.bench.__file__).resolve().parent


# Benchmarks run only when named: the models' rows time whole networks (and, for PnP-OVSS, a
# public-code-style loop of minutes per call), an hour or more on a 2-core machine, while the
# default run (every op, the drop-ins) takes minutes.
ON_REQUEST = ("models",)


def benchmark_files(ops: list[str]) -> list[Path]:
    """The ``bench/bench_<name>.py`` files of ``ops``; no names: every one but :data:`ON_REQUEST`."""
    available = {p.stem[len("bench_") :]: p for p in sorted(_bench_dir().glob("bench_*.py"))}
    if not ops:
        return [path for name, path in available.items() if name not in ON_REQUEST]
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
        calls = info.get("calls_per_round", 1)  # pytest-benchmark's statistics are per round
        median = stats["median"] / calls
        rows.append(
            {
                "op": info["op"],
                "case": info["case"],
                "mode": info["mode"],
                "provider": info["provider"],
                "median_s": median,
                "iqr_s": stats["iqr"] / calls,
                "rounds": stats["rounds"],
                "calls_per_round": calls,
                "paired_speedup": info.get("paired_speedup"),
                "paired_ovseg_fast_s": info.get("paired_ovseg_fast_s"),  # ovseg-fast's per-call median in those rounds
                "peak_memory_bytes": info.get("peak_memory"),
                "flops": flops,
                "gflops_per_s": (flops / median / 1e9) if flops else None,
                "efficiency": info.get("efficiency"),  # bench_models: GFLOP/s over this machine's dense-GEMM rate
            }
        )
    return rows


# The instruction-set extensions the kernel copies are compiled with (csrc/cpu_dispatch.h), read
# from /proc/cpuinfo when the extension cannot say (not loaded, or built before it could).
_CPU_FEATURES = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq")


def _proc_cpu_features() -> Optional[dict[str, bool]]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), None)
    return None if flags is None else {f: f in flags for f in _CPU_FEATURES}


def machine_block(info: dict[str, Any]) -> dict[str, Any]:
    """The ``machine`` entry of a saved run, from :func:`ovseg_fast.info.collect`: CPU model, threads,
    torch's capability, the kernel copy the extension ran (``kernel_capability``), the copy asked for
    (``requested_capability``, from ATEN_CPU_CAPABILITY) and the best one the CPU supports
    (``supported_capability``), the CPU's features, the capability class the run's ratios belong to
    (``capability_class``: avx512, avx2 or default) and whether torch used huge pages. Keys the
    extension does not report are None."""
    ext = info.get("extension", {})
    cpu = info["cpu"]
    requested = ext.get("requested_capability") or os.environ.get("ATEN_CPU_CAPABILITY") or cpu.get("torch_capability")
    machine = {
        **cpu,
        "platform": info.get("platform"),
        "kernel_capability": ext.get("kernel_capability"),
        "requested_capability": requested.upper() if requested else None,
        "supported_capability": ext.get("supported_capability"),
        "compiled_capabilities": ext.get("compiled_capabilities"),
        "cpu_features": ext.get("cpu_features") or _proc_cpu_features(),
        "masked_cpu_features": ext.get("masked_cpu_features") or [],
        "torch_huge_pages": os.environ.get("OVSEG_BENCH_THP", "1") != "0"
        or os.environ.get("THP_MEM_ALLOC_ENABLE") == "1",
    }
    machine["capability_class"] = capability_class(machine)
    return machine


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("bench", help="run benchmarks and print the ratio table")
    parser.add_argument(
        "ops", nargs="*", help=f"benchmarks to run (default: all but {', '.join(ON_REQUEST)}, which run when named)"
    )
    parser.add_argument("--json", help="save results, machine (with the CPU capability), versions and commit as JSON")
    parser.add_argument("--plot", help="save a PNG of the speed-ups, one panel per op")
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
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _git_commit(),
        "machine": machine_block(info),
        "versions": {k: info[k] for k in ("ovseg_fast", "python", "torch", "triton", "numpy")},
        "extension": info["extension"],
        "results": rows,
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"\nsaved {args.json}")
    if args.plot:
        try:
            plot(rows, Path(args.plot), plot_title(result))
            print(f"saved {args.plot}")
        except ValueError as exc:  # e.g. -k selected no provider to compare with; the JSON is saved
            print(f"ovseg-fast bench: --plot {args.plot}: nothing drawn: {exc}", file=sys.stderr)
    print(f"\nmachine: {machine_summary(result)}\nTorch huge pages: see bench/conftest.py.")
    return 0
