"""The ``ovseg-fast`` command: the machine block of saved runs, reports per CPU capability class, the
README slots and the per-op plot. Rows are synthesized; real benchmarks run in test_foundation's
slow end-to-end test."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ovseg_fast.cli import main
from ovseg_fast.cli.bench import machine_block
from ovseg_fast.cli.report import (
    add_speedups,
    capability_class,
    format_report,
    load_run,
    readme_block,
    replace_readme_slot,
    speedup_figure,
)

README = Path(__file__).resolve().parents[1] / "README.md"

# op -> [(case, mode, {provider: median seconds})]; ovseg_fast loses to the compiled reference once.
_CASES = {
    "sinkhorn": [
        ("swav B=1 N=4096 K=3000", "fwd", {"ovseg_fast": 0.02, "reference": 0.2, "pot": 0.16}),
        ("swav B=1 N=4096 K=3000", "fwd_bwd", {"ovseg_fast": 0.05, "reference": 0.4}),
    ],
    "lpm": [("coco-stuff B=8 C=171", "fwd", {"ovseg_fast": 0.073, "reference": 0.048, "reference_compiled": 0.059})],
    "dense_crf": [("astronaut 512x512 C=21", "fwd", {"ovseg_fast": 0.16, "pydensecrf2": 0.9})],
}


def _rows() -> list[dict]:
    rows = []
    for op, cases in _CASES.items():
        for case, mode, medians in cases:
            for provider, median in medians.items():
                rows.append(
                    {
                        "op": op,
                        "case": case,
                        "mode": mode,
                        "provider": provider,
                        "median_s": median,
                        "iqr_s": 0.0,
                        "rounds": 5,
                        "peak_memory_bytes": 2**21,
                        "flops": None,
                        "gflops_per_s": None,
                    }
                )
    return rows


def _info(extension: dict, torch_capability: str = "AVX2") -> dict:
    """The part of ovseg_fast.info.collect() the bench command reads."""
    return {
        "platform": "Linux-x86_64",
        "cpu": {"model": "Test CPU", "torch_capability": torch_capability, "threads": 2, "cores": 2},
        "extension": extension,
    }


def _run(model: str, kernels: str, supported: str, requested: str = "") -> dict:
    info = _info(
        {
            "loaded": True,
            "kernel_capability": kernels,
            "requested_capability": requested or kernels,
            "supported_capability": supported,
            "cpu_features": {"avx2": True, "avx512f": supported == "AVX512"},
            "masked_cpu_features": [],
            "compiled_capabilities": ["DEFAULT", "AVX2", "AVX512"],
        },
        torch_capability=kernels,
    )
    info["cpu"]["model"] = model
    return {
        "date": "2026-12-03T12:00:00+00:00",
        "commit": "0123456789abcdef0123456789abcdef01234567-dirty",
        "machine": machine_block(info),
        "versions": {"torch": "2.14.1", "ovseg_fast": "0.1.0", "python": "3.11", "triton": "-", "numpy": "2"},
        "results": _rows(),
    }


def _save(tmp_path: Path, name: str, run: dict) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(run))
    return path


def test_machine_block_records_requested_supported_and_chosen_capability(monkeypatch):
    run = _run("AMD EPYC", kernels="AVX2", supported="AVX2", requested="AVX512")
    machine = json.loads(json.dumps(run))["machine"]  # what a saved file holds
    assert machine["model"] == "AMD EPYC" and machine["threads"] == 2
    assert machine["kernel_capability"] == "AVX2"
    assert machine["requested_capability"] == "AVX512"
    assert machine["supported_capability"] == "AVX2"
    assert machine["torch_capability"] == "AVX2"
    assert machine["cpu_features"] == {"avx2": True, "avx512f": False}
    assert machine["capability_class"] == "avx2"


def test_machine_block_without_extension_capability_keys(monkeypatch):
    # An extension that is not loaded (or predates the capability keys) reports none of them: the
    # block still says what torch ran, what was asked for and, on Linux, the CPU's own feature bits.
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx512")
    machine = machine_block(_info({"loaded": False, "error": "disabled"}, torch_capability="AVX2"))
    assert machine["kernel_capability"] is None and machine["supported_capability"] is None
    assert machine["requested_capability"] == "AVX512"
    assert machine["capability_class"] == "avx2"
    if Path("/proc/cpuinfo").exists():
        assert set(machine["cpu_features"]) >= {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq"}
        assert all(isinstance(v, bool) for v in machine["cpu_features"].values())


@pytest.mark.parametrize(
    ("machine", "expected"),
    [
        ({"kernel_capability": "AVX512", "torch_capability": "AVX512"}, "avx512"),
        ({"kernel_capability": "AVX2", "torch_capability": "AVX512"}, "avx2"),  # the kernels decide
        ({"kernel_capability": "DEFAULT"}, "default"),
        ({"kernel_capability": None, "torch_capability": "AVX2"}, "avx2"),  # no extension
        ({"kernel_capability": "avx-512"}, "avx512"),
        ({}, "default"),
    ],
)
def test_capability_class(machine, expected):
    assert capability_class(machine) == expected


def test_report_groups_runs_by_capability_class(tmp_path, capsys):
    avx2 = _save(tmp_path, "avx2.json", _run("AMD EPYC 7B13", "AVX2", "AVX2", requested="AVX512"))
    avx512 = _save(tmp_path, "avx512.json", _run("AMD EPYC 9B14", "AVX512", "AVX512"))
    assert main(["report", str(avx2), str(avx512)]) == 0
    out = capsys.readouterr().out
    headings = [line for line in out.splitlines() if line.startswith("#")]
    assert headings == [
        "## AVX-512",
        f"### AMD EPYC 9B14, 2 threads, AVX512 kernels ({avx512})",
        "## AVX2",
        f"### AMD EPYC 7B13, 2 threads, AVX2 kernels ({avx2})",
    ]
    avx2_section = out[out.index("## AVX2") :]
    assert "| sinkhorn | swav B=1 N=4096 K=3000 | fwd | 20 | pot 8.00x, reference 10.00x | 2.0 / 2.0 |" in avx2_section
    assert "| lpm | coco-stuff B=8 C=171 | fwd | 73 | reference 0.66x, reference_compiled 0.81x |" in avx2_section
    assert (
        "AMD EPYC 7B13, 2 threads, AVX2 kernels (requested AVX512; this CPU supports up to AVX2; torch AVX2), "
        "torch 2.14.1, torch huge pages on; 2026-12-03, the code of commit 0123456 with uncommitted changes."
    ) in avx2_section


def test_report_reads_runs_saved_before_the_capability_fields(tmp_path, capsys):
    run = _run("Intel Xeon", "AVX512", "AVX512")
    run["machine"] = {"model": "Intel Xeon", "threads": 2, "kernel_capability": "AVX512", "torch_huge_pages": True}
    assert main(["report", str(_save(tmp_path, "old.json", run))]) == 0
    out = capsys.readouterr().out
    assert out.startswith("## AVX-512\n") and "Intel Xeon, 2 threads, AVX512 kernels, torch 2.14.1" in out


def test_report_rejects_files_that_are_not_bench_results(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"results": [{"op": "sinkhorn"}], "machine": {}, "versions": {"torch": "2"}}))
    with pytest.raises(SystemExit, match=r"bad\.json is not a bench result.*'case'"):
        main(["report", str(bad)])
    with pytest.raises(SystemExit, match=r"missing\.json is not a bench result"):
        main(["report", str(tmp_path / "missing.json")])


def test_readme_has_one_slot_per_capability_class():
    text = README.read_text()
    for cls in ("avx512", "avx2"):
        assert text.count(f"<!-- BENCH-TABLE {cls} -->") == 1 and text.count(f"<!-- /BENCH-TABLE {cls} -->") == 1
    assert text.index("<!-- /BENCH-TABLE avx512 -->") < text.index("<!-- BENCH-TABLE avx2 -->")


def test_report_writes_each_run_into_its_readme_slot(tmp_path, capsys):
    readme = tmp_path / "README.md"
    original = README.read_text()
    readme.write_text(original)
    avx2_run = _run("AMD EPYC 7B13", "AVX2", "AVX2")
    avx2 = _save(tmp_path, "avx2.json", avx2_run)
    assert main(["report", str(avx2), "--readme", str(readme)]) == 0
    text = readme.read_text()
    start = text.index("<!-- BENCH-TABLE avx2 -->\n") + len("<!-- BENCH-TABLE avx2 -->\n")
    slot = text[start : text.index("\n<!-- /BENCH-TABLE avx2 -->")]
    add_speedups(avx2_run["results"])
    assert slot == readme_block(avx2_run, str(avx2))
    sentence = " ".join(slot.split("\n\n")[0].split())  # wrapped at 100 columns in the file
    assert sentence.startswith(f"Latest AVX2 run of `ovseg-fast bench` (printed by `ovseg-fast report {avx2}`), on")
    assert "| sinkhorn | swav B=1 N=4096 K=3000 | fwd_bwd | 50 | reference 8.00x | 2.0 / 2.0 |" in slot
    # Everything outside the AVX2 slot, the AVX-512 table included, is untouched.
    old_start = original.index("<!-- BENCH-TABLE avx2 -->\n") + len("<!-- BENCH-TABLE avx2 -->\n")
    old_end = original.index("\n<!-- /BENCH-TABLE avx2 -->")
    assert text[:start] == original[:old_start] and text[start + len(slot) :] == original[old_end:]
    # A second write replaces the slot again instead of appending.
    assert main(["report", str(avx2), "--readme", str(readme)]) == 0
    assert readme.read_text() == text
    capsys.readouterr()


def test_readme_slot_errors_name_the_problem(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# no slots\n")
    avx2 = _save(tmp_path, "avx2.json", _run("AMD EPYC", "AVX2", "AVX2"))
    with pytest.raises(SystemExit, match=r"--readme .*README\.md: expected one <!-- BENCH-TABLE avx2 -->.*found 0"):
        main(["report", str(avx2), "--readme", str(readme)])
    other = _save(tmp_path, "other.json", _run("Intel Core", "AVX2", "AVX2"))
    with pytest.raises(SystemExit, match=r"several runs of class \['avx2'\]"):
        main(["report", str(avx2), str(other), "--readme", str(README)])
    with pytest.raises(ValueError, match="found 2"):
        replace_readme_slot("<!-- BENCH-TABLE avx2 -->\na\n<!-- /BENCH-TABLE avx2 -->\n" * 2, "avx2", "b")


def test_plot_has_one_panel_per_op_with_case_and_mode_labels():
    import matplotlib.pyplot as plt

    rows = _rows()
    add_speedups(rows)
    fig = speedup_figure(rows, "Test CPU, AVX2")
    try:
        axes = fig.axes
        assert [ax.get_title(loc="left") for ax in axes] == list(_CASES)
        sinkhorn, lpm, _ = axes
        assert [t.get_text() for t in sinkhorn.get_yticklabels()] == [
            "swav B=1 N=4096 K=3000\nfwd",
            "swav B=1 N=4096 K=3000\nfwd_bwd",
        ]
        for ax in axes:
            assert ax.get_xscale() == "log"
            assert any(list(line.get_xdata()) == [1, 1] for line in ax.get_lines()), "the 1x line"
        # One bar per other provider, starting at 1x and ending at the speed-up.
        ends = sorted(round(p.get_x() + p.get_width(), 3) for p in sinkhorn.patches if p.get_x() == 1)
        assert ends == [8.0, 8.0, 10.0]
        # ovseg-fast's losses are labelled in red, its wins in black.
        labels = {t.get_text(): t.get_color() for t in lpm.texts}
        assert labels == {"0.66x": "#c00000", "0.81x": "#c00000"}
        assert {t.get_color() for t in sinkhorn.texts} == {"black"}
        assert fig.get_suptitle() == "Test CPU, AVX2"
        assert [t.get_text() for t in fig.legends[0].get_texts()] == [
            "vs reference",
            "vs reference_compiled",
            "vs pot",
            "vs pydensecrf2",
        ]
    finally:
        plt.close(fig)


def test_report_plot_writes_a_png_titled_with_machine_and_capability(tmp_path, capsys):
    run = _save(tmp_path, "avx2.json", _run("AMD EPYC 7B13", "AVX2", "AVX2"))
    png = tmp_path / "plots" / "avx2.png"
    assert main(["report", str(run), "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()
    with pytest.raises(SystemExit, match="--plot draws one run"):
        main(["report", str(run), str(run), "--plot", str(png)])
    lonely = _run("AMD EPYC 7B13", "AVX2", "AVX2")
    lonely["results"] = [r for r in lonely["results"] if r["provider"] == "ovseg_fast"]
    with pytest.raises(SystemExit, match=r"--plot: .*lonely\.json: no op has both an ovseg_fast row"):
        main(["report", str(_save(tmp_path, "lonely.json", lonely)), "--plot", str(png)])


def test_plot_without_anything_to_compare_says_so():
    rows = [r for r in _rows() if r["provider"] == "reference"]
    add_speedups(rows)
    with pytest.raises(ValueError, match="no op has both an ovseg_fast row"):
        speedup_figure(rows)


def test_module_entry_point_lists_every_command():
    out = subprocess.run(
        [sys.executable, "-m", "ovseg_fast.cli", "--help"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    for command in ("info", "bench", "report"):
        assert f"    {command} " in out.stdout


def test_load_run_adds_speedups(tmp_path):
    data = load_run(_save(tmp_path, "run.json", _run("AMD EPYC", "AVX2", "AVX2")))
    ref = next(r for r in data["results"] if r["op"] == "dense_crf" and r["provider"] == "pydensecrf2")
    assert ref["speedup"] == pytest.approx(0.9 / 0.16)
    assert "## AVX2" in format_report([(Path("run.json"), data)])
