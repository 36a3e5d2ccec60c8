"""The static GPU check of the Triton kernels (``python -m ovseg_fast.kernels.report``), no GPU needed.

Each op's launchers are driven at the benchmark shapes on ``meta`` tensors, every recorded launch is
compiled for sm_80 (A100) and sm_90 (H100) with Triton's bundled ptxas, and the builds must: fit the
target's shared memory, not spill, run their float16 / bfloat16 / TF32 dots on tensor cores, and launch
at least one block per SM unless the kernel's docstring says why not (a ``Grid:`` paragraph).

The report runs once, in a subprocess (module fixture): it compiles the kernels, which is impossible in
this process once ``tests/conftest.py`` has switched on Triton's interpreter. Cost: compiling takes
seconds per build (over a minute for the largest MoE gating build), so the test checks the
representative launches (``--subset``: per kernel and dtype the largest-tile and the smallest-grid
launch; 174 builds) in float32 (IEEE and TF32) and bfloat16 (float16 compiles the same tensor-core code),
and every build's figures are cached under ``~/.cache/ovseg_fast/static_gpu`` by source hash (Triton keeps
the binaries in its own cache). Measured on 2 shared cores at load ~8-14: cold ~35 min, warm 27 s.
``python -m ovseg_fast.kernels.report`` checks every launch in every dtype.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ovseg_fast.kernels import report

pytest.importorskip("triton")

OPS = ("lpm", "moe", "routed_attention", "sinkhorn")
DTYPES = ("float32", "tf32", "bfloat16")


@pytest.fixture(scope="module")
def static_report(tmp_path_factory) -> tuple[int, str, list[dict]]:
    """One run of the report over every op (one import of torch and Triton, one recording)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path_factory.mktemp("static") / "rows.json"
    cmd = [sys.executable, "-m", "ovseg_fast.kernels.report", "--subset", "--details", "--json", str(out)]
    for dt in DTYPES:
        cmd += ["--dtype", dt]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    rows = json.loads(out.read_text()) if out.is_file() else []
    return proc.returncode, proc.stdout + proc.stderr, rows


@pytest.mark.slow
@pytest.mark.parametrize("op", OPS)
def test_kernels_fit_do_not_spill_use_tensor_cores_and_fill_the_gpu(op, static_report):
    _, log, all_rows = static_report
    rows = [r for r in all_rows if r["op"] == op]
    assert rows, f"the report wrote no rows for {op}:\n{log[-4000:]}"
    kernels = {r["kernel"] for r in rows}
    assert {r["target"] for r in rows} == {"sm_80", "sm_90"}
    assert {r["dtype"] for r in rows} == set(DTYPES)
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
