"""``ovseg-fast report``: a saved bench run as the README's Markdown ratio table; the table and plot
helpers ``ovseg-fast bench`` prints and draws with."""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

__all__ = ["add_speedups", "format_markdown", "format_table", "plot"]


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


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("report", help="print a saved bench JSON as a Markdown table")
    parser.add_argument("json", help="a file written by `ovseg-fast bench --json`")
    return parser


def run(args: argparse.Namespace) -> int:
    return _report(Path(args.json))
