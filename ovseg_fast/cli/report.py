"""``ovseg-fast report``: saved bench runs as the README's Markdown ratio tables (one per CPU
capability class), optionally written into the README's slot for that class, and the speed-up plot.

A saved run (``ovseg-fast bench --json``) is a dict with ``results`` (rows: op, case, mode,
provider, median_s, peak_memory_bytes, ...), ``machine`` (CPU model, threads, the kernel copy the
extension ran and the capabilities requested and supported), ``versions``, ``date`` and ``commit``.
"""

from __future__ import annotations

import argparse
import json
import re
import textwrap
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

__all__ = [
    "CAPABILITY_CLASSES",
    "add_speedups",
    "capability_class",
    "class_title",
    "format_markdown",
    "format_report",
    "format_table",
    "load_run",
    "machine_summary",
    "plot",
    "plot_title",
    "readme_block",
    "replace_readme_slot",
    "speedup_figure",
]

# Capability class -> how headings name it. Ratios are only comparable within a class: the kernel
# copies (and torch's own baselines) differ in vector width between them.
CAPABILITY_CLASSES = {"avx512": "AVX-512", "avx2": "AVX2", "default": "baseline (no AVX2)"}


def _groups(rows: list[dict[str, Any]]):
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[(row["op"], row["case"], row["mode"])].append(row)
    return groups


def add_speedups(rows: list[dict[str, Any]]) -> None:
    """``speedup`` of ovseg-fast over each provider, within the same op, case and mode: the provider's
    ``paired_speedup`` (the median of its round-by-round time ratios to ovseg-fast's, from rounds run
    alternately, see ``bench/_common.py``) where the run measured one, else the ratio of the medians
    (runs saved before pairing, or a ``-k`` that left ovseg-fast's rounds out)."""
    for group in _groups(rows).values():
        ours = next((r for r in group if r["provider"] == "ovseg_fast"), None)
        for row in group:
            if ours is None:
                row["speedup"] = None
            elif row is ours:
                row["speedup"] = 1.0
            else:
                row["speedup"] = row.get("paired_speedup") or row["median_s"] / ours["median_s"]


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


def _normalized(name: Optional[str]) -> str:
    return re.sub(r"[^A-Z0-9]", "", (name or "").upper())


def capability_class(machine: dict[str, Any]) -> str:
    """``"avx512"``, ``"avx2"`` or ``"default"`` (else the lower-cased capability name): the class of
    the kernel copy ovseg-fast ran, or of torch's capability when the run had no extension (runs
    saved before the capability fields existed have at least ``kernel_capability``)."""
    name = _normalized(machine.get("kernel_capability") or machine.get("torch_capability"))
    if name.startswith("AVX512"):
        return "avx512"
    if name.startswith("AVX2"):
        return "avx2"
    if name in ("", "DEFAULT", "NOAVX"):
        return "default"
    return name.lower()


def class_title(cls: str) -> str:
    return CAPABILITY_CLASSES.get(cls, cls.upper())


def load_run(path: Path) -> dict[str, Any]:
    """Reads a file written by ``ovseg-fast bench --json``; SystemExit naming the file otherwise."""
    try:
        data = json.loads(Path(path).read_text())
        rows, machine, versions = data["results"], data["machine"], data["versions"]
        if not isinstance(rows, list) or not isinstance(machine, dict) or "torch" not in versions:
            raise ValueError("results, machine or versions has the wrong form")
        for row in rows:
            for key in ("op", "case", "mode", "provider", "median_s"):
                if key not in row:
                    raise KeyError(f"results row without {key!r}")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"ovseg-fast report: {path} is not a bench result ({type(exc).__name__}: {exc})") from None
    add_speedups(rows)
    return data


def _capabilities(machine: dict[str, Any]) -> str:
    """'AVX2 kernels (requested AVX512; this CPU supports AVX2; torch AVX2)', saying only what the
    run recorded."""
    kernels = machine.get("kernel_capability")
    notes = []
    requested, supported = machine.get("requested_capability"), machine.get("supported_capability")
    if requested and _normalized(requested) != _normalized(kernels):
        notes.append(f"requested {requested}")
    if supported:
        notes.append(f"this CPU supports up to {supported}")
    if machine.get("torch_capability"):
        notes.append(f"torch {machine['torch_capability']}")
    head = f"{kernels} kernels" if kernels else "no C++ extension (reference kernels)"
    return head + (f" ({'; '.join(notes)})" if notes else "")


def _commit(data: dict[str, Any]) -> str:
    commit = data.get("commit") or "?"
    if commit.endswith("-dirty"):
        return f"{commit[:7]} with uncommitted changes"
    return commit[:7]


def machine_summary(data: dict[str, Any]) -> str:
    """One sentence: CPU, threads, capabilities, torch, huge pages, date and commit of a saved run."""
    machine, versions = data["machine"], data["versions"]
    return (
        f"{machine.get('model', 'unknown CPU')}, {machine.get('threads', '?')} threads, {_capabilities(machine)}, "
        f"torch {versions['torch']}, torch huge pages {'on' if machine.get('torch_huge_pages') else 'off'}; "
        f"{str(data.get('date') or '?')[:10]}, the code of commit {_commit(data)}."
    )


def format_report(runs: list[tuple[Path, dict[str, Any]]]) -> str:
    """Markdown for ``ovseg-fast report``: one ``##`` heading per capability class (AVX-512 first),
    under it one ``###`` heading per run naming its machine, the ratio table and the run's summary."""
    by_class: dict[str, list[tuple[Path, dict[str, Any]]]] = defaultdict(list)
    for path, data in runs:
        by_class[capability_class(data["machine"])].append((path, data))
    order = [c for c in CAPABILITY_CLASSES if c in by_class] + sorted(set(by_class) - set(CAPABILITY_CLASSES))
    out = []
    for cls in order:
        out.append(f"## {class_title(cls)}")
        for path, data in by_class[cls]:
            machine = data["machine"]
            out += [
                "",
                f"### {machine.get('model', 'unknown CPU')}, {machine.get('threads', '?')} threads, "
                f"{machine.get('kernel_capability') or 'reference'} kernels ({path})",
                "",
                format_markdown(data["results"]),
                "",
                machine_summary(data),
                "",
            ]
    return "\n".join(out).rstrip() + "\n"


def readme_block(data: dict[str, Any], source: str) -> str:
    """What goes between a README slot's markers: where the table comes from, then the table."""
    sentence = (
        f"Latest {class_title(capability_class(data['machine']))} run of `ovseg-fast bench` (printed by "
        f"`ovseg-fast report {source}`), on {machine_summary(data)}"
    )
    wrapped = textwrap.fill(sentence, 100, break_long_words=False, break_on_hyphens=False)
    return f"{wrapped}\n\n{format_markdown(data['results'])}"


def _slot(cls: str) -> re.Pattern:
    return re.compile(rf"(<!-- BENCH-TABLE {re.escape(cls)} -->\n).*?(\n<!-- /BENCH-TABLE {re.escape(cls)} -->)", re.S)


def replace_readme_slot(text: str, cls: str, block: str) -> str:
    """``text`` with the content between ``<!-- BENCH-TABLE cls -->`` and ``<!-- /BENCH-TABLE cls -->``
    replaced by ``block``; ValueError if the slot is missing or appears twice."""
    found = _slot(cls).findall(text)
    if len(found) != 1:
        raise ValueError(
            f"expected one <!-- BENCH-TABLE {cls} --> ... <!-- /BENCH-TABLE {cls} --> slot, found {len(found)}"
        )
    return _slot(cls).sub(lambda m: m.group(1) + block.strip("\n") + m.group(2), text)


def plot_title(data: dict[str, Any]) -> str:
    machine = data["machine"]
    return (
        f"ovseg-fast speed-up, {class_title(capability_class(machine))} class: {machine.get('model', 'unknown CPU')}, "
        f"{machine.get('threads', '?')} threads, {_capabilities(machine)}\n"
        f"torch {data['versions']['torch']}, {str(data.get('date') or '?')[:10]}, commit {_commit(data)}; "
        "bars start at 1x: right = ovseg-fast faster, left (red) = slower"
    )


def speedup_figure(rows: list[dict[str, Any]], title: Optional[str] = None):
    """A matplotlib Figure with one panel per op: per case and mode (the y labels) one horizontal bar
    per other provider, drawn from the 1x line to ovseg-fast's speed-up over it on a shared log x
    axis, labelled with the ratio (in red where ovseg-fast is slower). ``rows`` need ``speedup``
    (see :func:`add_speedups`); groups without an ovseg_fast row are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, NullLocator

    per_op: dict[str, dict[tuple[str, str], dict[str, float]]] = defaultdict(dict)
    for (op, case, mode), group in _groups(rows).items():
        ratios = {r["provider"]: r["speedup"] for r in group if r["provider"] != "ovseg_fast" and r.get("speedup")}
        if ratios:
            per_op[op][(case, mode)] = ratios
    if not per_op:
        raise ValueError("no op has both an ovseg_fast row and another provider's row to compare with")
    # The package's own baselines first (dark and light blue), then the peers; no red, which the plot
    # keeps for "ovseg-fast is slower".
    present = {p for cases in per_op.values() for ratios in cases.values() for p in ratios}
    own = [p for p in ("reference", "reference_compiled") if p in present]
    providers = own + sorted(present - set(own))
    tab20 = plt.get_cmap("tab20").colors
    peer_palette = [tab20[i] for i in (2, 4, 8, 14, 16, 18, 10, 12)]
    colors = {"reference": tab20[0], "reference_compiled": tab20[1]}
    for i, p in enumerate(p for p in providers if p not in colors):
        colors[p] = peer_palette[i % len(peer_palette)]
    values = [v for cases in per_op.values() for ratios in cases.values() for v in ratios.values()]
    lo, hi = min(0.5, min(values) / 1.6), max(2.0, max(values) * 1.8)

    # One bar slot per provider and case, plus a gap per case. Panels go largest first, so the two
    # panels sharing a row (and its height) need about as many slots.
    def panel_slots(op: str) -> int:
        return sum(len(r) + 1 for r in per_op[op].values())

    ops = sorted(per_op, key=panel_slots, reverse=True)
    ncols = 1 if len(ops) == 1 else 2
    nrows = -(-len(ops) // ncols)
    slots = [panel_slots(op) for op in ops]
    row_heights = [max(slots[i * ncols : (i + 1) * ncols]) for i in range(nrows)]
    fig_height = 0.8 + 0.17 * sum(row_heights) + 0.5 * nrows
    fig, axes = plt.subplots(
        nrows,
        ncols,
        figsize=(7.2 * ncols, fig_height),
        gridspec_kw={"height_ratios": row_heights},
        squeeze=False,
    )
    for ax in axes.flat[len(ops) :]:
        ax.remove()
    ticks = [t for t in (0.25, 0.5, 1, 2, 5, 10, 20, 50, 100, 200) if lo <= t <= hi]
    for index, (ax, op) in enumerate(zip(axes.flat, ops)):
        y, yticks, ylabels = 0.0, [], []
        for (case, mode), ratios in per_op[op].items():
            first = y
            for provider in providers:
                if provider not in ratios:
                    continue
                ratio = ratios[provider]
                ax.barh(y, ratio - 1, left=1, height=0.8, color=colors[provider], edgecolor="none")
                win = ratio >= 1
                ax.text(
                    ratio * (1.04 if win else 1 / 1.04),
                    y,
                    f"{ratio:.2f}x",
                    va="center",
                    ha="left" if win else "right",
                    fontsize=7.5,
                    color="black" if win else "#c00000",
                    fontweight="normal" if win else "bold",
                )
                y += 1
            yticks.append((first + y - 1) / 2)
            ylabels.append(f"{textwrap.fill(case, 30)}\n{mode}")
            y += 1  # a gap between cases
        ax.set_xscale("log")
        ax.set_xlim(lo, hi)
        ax.axvspan(lo, 1, color="#c00000", alpha=0.06, linewidth=0)
        ax.axvline(1, color="black", linewidth=1)
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(axis="x", color="#dddddd", linewidth=0.6)
        ax.set_axisbelow(True)
        ax.set_yticks(yticks)
        ax.set_yticklabels(ylabels, fontsize=8)
        # Bars as thick as in the row's tallest panel; a shorter panel leaves its bottom empty.
        ax.set_ylim(row_heights[index // ncols] - 1, -1)
        ax.tick_params(axis="x", labelsize=8)
        ax.set_title(op, fontsize=10, fontweight="bold", loc="left")
    handles = [Patch(color=colors[p], label=f"vs {p}") for p in providers]
    fig.legend(
        handles=handles,
        loc="upper center",
        ncol=min(len(providers), 7),
        fontsize=8,
        frameon=False,
        bbox_to_anchor=(0.5, 1 - 0.5 / fig_height),
    )
    fig.suptitle(
        title or "ovseg-fast speed-up over each provider (same run; paired rounds where calls are short)",
        fontsize=9.5,
        y=1 - 0.08 / fig_height,
        va="top",
    )
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.7 / fig_height), h_pad=1.0, w_pad=1.5)
    # tight_layout reserves room for the suptitle on top of the rect, which already leaves it; the
    # axes top (below the panel titles) goes under the legend instead.
    fig.subplots_adjust(top=1 - 1.05 / fig_height)
    return fig


def plot(rows: list[dict[str, Any]], path: Path, title: Optional[str] = None) -> Path:
    """Saves :func:`speedup_figure` as a PNG at ``path`` (parents created) and returns ``path``."""
    import matplotlib.pyplot as plt

    fig = speedup_figure(rows, title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "report", help="print saved bench JSONs as Markdown tables, one section per CPU capability class"
    )
    parser.add_argument("json", nargs="+", help="files written by `ovseg-fast bench --json`")
    parser.add_argument(
        "--readme",
        help="also write each run's table into this Markdown file's <!-- BENCH-TABLE <class> --> slot "
        "(avx512, avx2), replacing what is there",
    )
    parser.add_argument("--plot", help="save the speed-up plot of the (single) run as a PNG")
    return parser


def run(args: argparse.Namespace) -> int:
    runs = [(Path(p), load_run(Path(p))) for p in args.json]
    if args.plot and len(runs) > 1:
        raise SystemExit("ovseg-fast report: --plot draws one run; pass a single FILE.json")
    print(format_report(runs), end="")
    if args.readme:
        readme = Path(args.readme)
        classes = [capability_class(data["machine"]) for _, data in runs]
        twice = sorted({c for c in classes if classes.count(c) > 1})
        if twice:
            raise SystemExit(f"ovseg-fast report: --readme: several runs of class {twice}; pass one per class")
        try:
            text = readme.read_text()
        except OSError as exc:
            raise SystemExit(f"ovseg-fast report: --readme {readme}: {exc}") from None
        for (path, data), cls in zip(runs, classes):
            try:
                text = replace_readme_slot(text, cls, readme_block(data, str(path)))
            except ValueError as exc:
                raise SystemExit(f"ovseg-fast report: --readme {readme}: {exc}") from None
        readme.write_text(text)
        print(f"\nwrote the {', '.join(class_title(c) for c in classes)} table(s) into {readme}")
    if args.plot:
        path, data = runs[0]
        try:
            plot(data["results"], Path(args.plot), plot_title(data))
        except ValueError as exc:
            raise SystemExit(f"ovseg-fast report: --plot: {path}: {exc}") from None
        print(f"saved {args.plot}")
    return 0
