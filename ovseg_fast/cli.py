"""The ``ovseg-fast`` command.

``ovseg-fast info``                 the environment report (same as ``python -m ovseg_fast.info``).
``ovseg-fast bench [OP ...]``       runs the benchmarks of the named ops (default: all) with
                                    pytest-benchmark, then prints per op, case and mode the median
                                    time of every provider, ovseg-fast's speed-up over it and the
                                    peak memory. ``--json PATH`` saves results, machine, versions and
                                    commit; ``--plot PATH`` draws the speed-ups as a PNG bar chart.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

__all__ = ["benchmark_files", "format_table", "main", "run_benchmarks"]


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


def _groups(rows: list[dict[str, Any]]):
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[(row["op"], row["case"], row["mode"])].append(row)
    return groups


def add_speedups(rows: list[dict[str, Any]]) -> None:
    """``speedup`` = provider median / ovseg-fast median, within the same op, case and mode."""
    for group in _groups(rows).values():
        ours = next((r for r in group if r["provider"] == "ovseg_fast"), None)
        for row in group:
            row["speedup"] = row["median_s"] / ours["median_s"] if ours else None


def format_table(rows: list[dict[str, Any]]) -> str:
    out = []
    for (op, case, mode), group in _groups(rows).items():
        out.append(f"\n{op} | {case} | {mode}")
        out.append(f"  {'provider':<22}{'median ms':>11}{'ovseg-fast speed-up':>21}{'peak MiB':>10}{'GFLOP/s':>9}")
        for row in sorted(group, key=lambda r: (r["provider"] != "ovseg_fast", r["median_s"])):
            peak = row["peak_memory_bytes"]
            out.append(
                f"  {row['provider']:<22}{row['median_s'] * 1e3:>11.3f}"
                f"{(format(row['speedup'], '.2f') + 'x') if row.get('speedup') else '-':>21}"
                f"{(format(peak / 2**20, '.1f')) if peak is not None else '-':>10}"
                f"{(format(row['gflops_per_s'], '.1f')) if row['gflops_per_s'] else '-':>9}"
            )
    return "\n".join(out)


def format_markdown(rows: list[dict[str, Any]]) -> str:
    """The ratio table as Markdown, one line per op, case and mode: ovseg-fast's median time and peak
    memory, then its speed-up over every other provider (``x`` = times faster)."""
    out = [
        "| op | case | mode | ovseg-fast ms | speed-up over | peak MiB (ovseg-fast / eager reference) |",
        "| --- | --- | --- | ---: | --- | --- |",
    ]

    def mib(row: Optional[dict[str, Any]]) -> str:
        peak = row and row["peak_memory_bytes"]
        return "-" if peak is None else f"{peak / 2**20:.1f}"

    for (op, case, mode), group in _groups(rows).items():
        ours = next((r for r in group if r["provider"] == "ovseg_fast"), None)
        if ours is None:
            continue
        ref = next((r for r in group if r["provider"] == "reference"), None)
        others = sorted((r for r in group if r is not ours and r.get("speedup")), key=lambda r: r["provider"])
        speedups = ", ".join(f"{r['provider']} {r['speedup']:.2f}x" for r in others) or "-"
        out.append(f"| {op} | {case} | {mode} | {ours['median_s'] * 1e3:.3g} | {speedups} | {mib(ours)} / {mib(ref)} |")
    return "\n".join(out)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _groups(rows)
    labels, bars = [], defaultdict(list)
    providers = sorted({r["provider"] for r in rows if r["provider"] != "ovseg_fast"})
    for (op, case, mode), group in groups.items():
        labels.append(f"{op}\n{case}\n{mode}")
        by_provider = {r["provider"]: r.get("speedup") for r in group}
        for p in providers:
            bars[p].append(by_provider.get(p) or 0.0)
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(labels)), 5))
    width = 0.8 / max(1, len(providers))
    for i, p in enumerate(providers):
        ax.bar([x + i * width for x in range(len(labels))], bars[p], width, label=f"vs {p}")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_ylabel("ovseg-fast speed-up (x, log scale)")
    ax.set_xticks([x + width * (len(providers) - 1) / 2 for x in range(len(labels))])
    ax.set_xticklabels(labels, fontsize=7)
    ax.legend()
    ax.set_title("ovseg-fast speed-up over each provider (median times, same run)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def _bench(args: argparse.Namespace) -> int:
    from ovseg_fast.info import collect

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


def _report(path: Path) -> int:
    try:
        data = json.loads(path.read_text())
        rows, machine, versions = data["results"], data["machine"], data["versions"]
    except (OSError, ValueError, KeyError) as exc:
        raise SystemExit(f"ovseg-fast report: {path} is not a bench result ({type(exc).__name__}: {exc})") from None
    add_speedups(rows)
    print(format_markdown(rows))
    print(
        f"\n{machine['model']}, {machine['threads']} threads, kernels {machine['kernel_capability']}, torch "
        f"{versions['torch']}, torch huge pages {'on' if machine.get('torch_huge_pages') else 'off'}; "
        f"{data.get('date', '?')}, commit {data.get('commit') or '?'}."
    )
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ovseg-fast", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="environment report")
    bench = sub.add_parser("bench", help="run benchmarks and print the ratio table")
    bench.add_argument("ops", nargs="*", help="ops to benchmark (default: all)")
    bench.add_argument("--json", help="save results, machine, versions and commit as JSON")
    bench.add_argument("--plot", help="save a PNG bar chart of the speed-ups")
    bench.add_argument("-k", help="pytest -k expression to select cases")
    report = sub.add_parser("report", help="print a saved bench JSON as a Markdown table")
    report.add_argument("json", help="a file written by `ovseg-fast bench --json`")
    args = parser.parse_args(argv)
    if args.command == "info":
        from ovseg_fast.info import main as info_main

        return info_main()
    if args.command == "report":
        return _report(Path(args.json))
    os.environ.setdefault("PYTHONWARNINGS", "ignore::UserWarning")
    return _bench(args)


if __name__ == "__main__":
    raise SystemExit(main())
