"""The static GPU check of the Triton kernels (``python -m ovseg_fast.kernels.report``), no GPU needed.

Each op's launchers are driven at the benchmark shapes on ``meta`` tensors, the recorded launches are
compiled for sm_80 (A100) and sm_90 (H100) with Triton's bundled ptxas, and the builds must: fit the
target's shared memory, not spill, run their float16 / bfloat16 / TF32 dots on tensor cores, and launch
at least one block per SM unless the kernel's docstring says why not (a ``Grid:`` paragraph).

The report runs once, in a subprocess (module fixture): it compiles the kernels, which is impossible in
this process once ``tests/conftest.py`` has switched on Triton's interpreter. Cost: compiling takes seconds
per build, so the test runs ``--subset``: the grid of EVERY recorded launch is checked (it needs no
compile), and of the builds only the maximal ones are compiled (``report.maximal_builds``: per kernel,
dtype, target, warps and pointer types, the builds no other build exceeds in every tile / unrolled count /
feature flag / stage count; a smaller build is checked through the maximal one that covers it), in two
processes, in float32 (IEEE and TF32) and bfloat16 (float16 compiles the same tensor-core code).
``test_a_planted_oversized_tile_is_caught`` shows such a selection still compiles and fails a kernel
whose largest build does not fit.

Cache: build figures go to ``$OVSEG_STATIC_CACHE`` when set, else to pytest's cache directory
(``.pytest_cache/d/ovseg_static_gpu``, Triton's binaries in its ``triton/`` subdirectory): a CI machine
starts cold unless it keeps that directory. Measured on 2 cores shared with other jobs (load 8-11, 3 Dec
2026; 331 launches x 2 targets, 164 of 344 builds compiled): cold (fresh build and Triton caches) 15 min
wall, while a second compile job ran beside it (the former ``--subset``, 174 builds, took ~35 min);
warm 20 s. The subset's findings were the same 54 as the full run's (every build compiled, 21 min for its
170 uncached builds).
``python -m ovseg_fast.kernels.report`` (no ``--subset``) compiles every build of every launch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ovseg_fast.kernels import report

pytest.importorskip("triton")

OPS = ("lpm", "moe", "routed_attention", "sinkhorn")
DTYPES = ("float32", "tf32", "bfloat16")


def _cache_dir(request, tmp_path_factory) -> Path:
    if os.environ.get("OVSEG_STATIC_CACHE"):
        return Path(os.environ["OVSEG_STATIC_CACHE"])
    cache = getattr(request.config, "cache", None)  # None under -p no:cacheprovider
    return Path(cache.mkdir("ovseg_static_gpu")) if cache is not None else tmp_path_factory.mktemp("static_gpu")


def _compile_env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITON_CACHE_DIR")}


@pytest.fixture(scope="module")
def static_report(request, tmp_path_factory) -> tuple[int, str, list[dict]]:
    """One run of the report over every op (one import of torch and Triton, one recording)."""
    out = tmp_path_factory.mktemp("static") / "rows.json"
    cmd = [sys.executable, "-m", "ovseg_fast.kernels.report", "--subset", "--jobs", "2", "--details",
           "--cache-dir", str(_cache_dir(request, tmp_path_factory)), "--json", str(out)]  # fmt: skip
    for dt in DTYPES:
        cmd += ["--dtype", dt]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_compile_env(), timeout=3600)
    rows = json.loads(out.read_text()) if out.is_file() else []
    return proc.returncode, proc.stdout + proc.stderr, rows


@pytest.mark.slow
@pytest.mark.timeout(1800)  # the first op's setup runs the report: cold, it outlasts the suite's 600 s per test
@pytest.mark.parametrize("op", OPS)
def test_kernels_fit_do_not_spill_use_tensor_cores_and_fill_the_gpu(op, static_report):
    _, log, all_rows = static_report
    rows = [r for r in all_rows if r["op"] == op]
    assert rows, f"the report wrote no rows for {op}:\n{log[-4000:]}"
    kernels = {r["kernel"] for r in rows}
    assert {r["target"] for r in rows} == {"sm_80", "sm_90"}
    assert {r["dtype"] for r in rows} == set(DTYPES)
    # every (kernel, dtype, target) has a build of its own compiled; the other rows are covered by one
    built = {(r["kernel"], r["dtype"], r["target"]) for r in rows if r["compiled"]}
    assert built == {(r["kernel"], r["dtype"], r["target"]) for r in rows}
    errors = [
        f"{r['kernel']} {r['dtype']} {r['case']} {r['target']}: {kind}: {msg}"
        for r in rows
        for kind, msg in r["findings"]
        if kind in report.ERRORS
    ]
    assert not errors, f"{op}: {len(errors)} findings over {len(kernels)} kernels:\n" + "\n".join(errors)
    for r in rows:
        assert r["blocks_per_sm"] >= 1, f"{r['kernel']} {r['target']}: no block fits on an SM"
        if r["dtype"] in ("bfloat16", "tf32") and r["dots"] != "-":
            assert "fma" not in r["dots"], f"{r['kernel']} {r['dtype']} {r['target']}: {r['dots']}"
            assert r["hmma"] or r["hgmma"], f"{r['kernel']} {r['dtype']} {r['target']}: no HMMA/HGMMA"


_PLANTED = """
import json, sys
from ovseg_fast.kernels import lpm, report

gemm_config = lpm._gemm_config

def planted(m, n, k, r, g, dot, sms):
    bm, bn, bk, splits, warps, stages = gemm_config(m, n, k, r, g, dot, sms)
    # the weight gradient of the benchmark's head: BLOCK_K 256 in 5 stages, 64 KiB of bf16 operands per stage
    # (a tile that spills instead, 128 x 256, takes ptxas minutes: too slow for a test)
    return (64, 64, 256, splits, 4, 5) if (m, n) == (512, 512) else (bm, bn, bk, splits, warps, stages)

lpm._gemm_config = planted
rows = report.run_report(("lpm",), ("bfloat16",), (90,), kernels=["_gemm_kernel"], subset=True, jobs=2)
json.dump(rows, sys.stdout)
"""


@pytest.mark.slow
def test_a_planted_oversized_tile_is_caught(tmp_path):
    """The subset still compiles, and fails, a kernel's largest build when it does not fit: LPM's GEMM launcher
    is made to pick an oversized tile for one launch. (Spills and FFMA dots of a compiled build are flagged by
    the same ``findings``, see ``test_findings_and_occupancy_rules``.)"""
    env = {**_compile_env(), "OVSEG_STATIC_CACHE": str(tmp_path), "TRITON_CACHE_DIR": str(tmp_path / "triton")}
    proc = subprocess.run([sys.executable, "-c", _PLANTED], capture_output=True, text=True, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(proc.stdout)
    planted = [r for r in rows if r["compiled"] and r["stages"] == 5]
    assert planted, "the planted 64 x 64 x 256, 5-stage build was not compiled"
    assert all(r["smem"] > report.TARGETS[90].smem_per_block for r in planted)
    assert all("smem" in {k for k, _ in r["findings"]} for r in planted)
    others = [r for r in rows if r["stages"] != 5]
    assert others and not any(k == "smem" for r in others for k, _ in r["findings"])


def test_lpm_configs_fill_the_gpu():
    """The LPM launch configurations the report checks: the weight-gradient GEMM of the benchmark's head
    (one 512 x 512 output, 8 images x 1024 pixels reduced) splits K to reach an H100's 132 SMs, and the
    text branch (8 x 20 rows) leaves the one-tile-per-row LayerNorm for 64-wide tiles that do."""
    lpm = report.importlib.import_module("ovseg_fast.kernels.lpm")
    bm, bn, _, splits, _, _ = lpm._gemm_config(512, 512, 1024, 8, 1, lpm.DOT_BF16, 132)
    assert (bm, bn, splits) == (64, 64, 3)
    assert lpm._gemm_config(512, 512, 1024, 8, 1, lpm.DOT_BF16, 8)[3] == 1  # enough tiles already
    bm, bn, bk, _, stages = lpm._linear_ln_config(8, 20, 512, lpm.DOT_IEEE, 512, 132)
    assert 8 * -(-20 // bm) * (512 // bn) >= 132 and bk == 16 and stages == 2
    assert lpm._linear_ln_config(8, 1024, 512, lpm.DOT_IEEE, 512, 132) == (16, 512, 8, 8, 2)


def test_findings_and_occupancy_rules():
    """The rules the CI test asserts, on hand-made build figures."""
    h100 = report.TARGETS[90]

    class K:
        class fn:
            __doc__ = "A kernel.\n\nGrid: one block per image; images are few by construction.\n"

    class NoDoc:
        class fn:
            __doc__ = "A kernel."

    launch = report.Launch("op", "case", "bfloat16", K, (), {}, (4, 1, 1))
    big = {"regs": 255, "spill": 64, "smem": 268_544, "warps": 4, "dots": [{"dtype": "bf16", "unit": "fma"}]}
    kinds = {k for k, _ in report.findings(launch, {**big, "hmma": 0, "hgmma": 0}, h100)}
    assert kinds == {"smem", "spill", "fma", "grid-documented"}
    launch = report.Launch("op", "case", "bfloat16", NoDoc, (), {}, (4, 1, 1))
    ok = {"regs": 128, "spill": 0, "smem": 65_536, "warps": 4, "dots": [{"dtype": "bf16", "unit": "mma"}]}
    assert [k for k, _ in report.findings(launch, {**ok, "hmma": 8, "hgmma": 0}, h100)] == ["grid"]
    # 128 registers x 128 threads: 4 blocks by registers; 65 KB + 1 KB reserved: 3 by shared memory
    assert report.occupancy(ok, h100) == (3, 3 * 4 / 64)
    assert report.occupancy(big, h100)[0] == 0


def test_dot_lowering_is_read_from_the_ttgir():
    ttgir = (
        "#blocked = #ttg.blocked<{sizePerThread = [1, 4]}>\n"
        "#mma = #ttg.nvidia_mma<{versionMajor = 2}>\n"
        "%0 = tt.dot %a, %b, %c : tensor<16x32xf32, #ttg.dot_op<{opIdx = 0, parent = #blocked}>> * "
        "tensor<32x64xf32, #x> -> tensor<16x64xf32, #blocked>\n"
        "%1 = tt.dot %a, %b, %c : tensor<16x32xbf16, #ttg.dot_op<{opIdx = 0, parent = #mma}>> * "
        "tensor<32x64xbf16, #x> -> tensor<16x64xf32, #mma>\n"
        "%2 = ttng.warp_group_dot %a, %b, %c : !ttg.memdesc<64x32xbf16, #s> * !ttg.memdesc<32x64xbf16, #s> "
        "-> tensor<64x64xf32, #mma1>\n"
    )
    dots = report._dots(ttgir)
    assert [(d["dtype"], d["unit"]) for d in dots] == [("f32", "fma"), ("bf16", "mma"), ("bf16", "wgmma")]
