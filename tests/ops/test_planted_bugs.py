"""The suite notices a wrong C++ kernel: each op's kernel-vs-reference tests, rerun with a bug planted in
that kernel (``OVSEG_PLANT_BUG=<kernel>``, see csrc/planted_bug.h), must fail.

The bug is read once per process by the extension, hence one pytest subprocess per kernel; they all
start together (most of each one's time is importing torch, which overlaps). That the same selections
pass without a bug is the normal run's business. The selections are a few fast tests each, cases
where the bug must show (e.g. not n_iters=0 or an all-masked 1x1 problem).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import require_backend

ROOT = Path(__file__).resolve().parents[2]

# (kernel planted, the op name for require_backend, test file, -k selection)
PLANTED = [
    (
        "sinkhorn",
        "sinkhorn",
        "test_sinkhorn.py",
        "test_kernel_forward_matches_reference and 3x37x13-cpu"
        " or test_reduced_precision_within_reference_error and cpu",
    ),
    (
        "routed_attention",
        "routed_attention",
        "test_routed_attention.py",
        "test_kernel_matches_reference and cpu-8x8 or test_kernel_contract_lse_and_cross_backend_backward and cpu"
        " or test_reduced_precision_within_reference_error and cpu-bf16",
    ),
    (
        "topk_gating",
        "topk_gating",
        "test_moe.py",
        "test_cpu_gating_contract_matches_reference and True-37x8x2"
        " or test_cpu_reduced_precision_within_reference_error",
    ),
    (
        "moe_dispatch",
        "moe_dispatch",
        "test_moe.py",
        "test_dispatch_matches_argsort_and_combine_matches_index_add and 10x4x2x3-cpu"
        " or test_dispatch_combine_gradients_match_reference and cpu",
    ),
    (
        "moe_combine",
        "moe_combine",
        "test_moe.py",
        "test_dispatch_matches_argsort_and_combine_matches_index_add and 10x4x2x3-cpu"
        " or test_dispatch_combine_gradients_match_reference and cpu",
    ),
    (
        "lpm_hcl",
        "lpm",
        "test_lpm.py",
        "test_cpu_hcl_matches_reference and c-shared-ln or test_reduced_precision_within_reference_error and cpu",
    ),
    (
        "lpm_logits",
        "lpm",
        "test_lpm.py",
        "test_kernel_logits_matches_reference and per_image_emb-ln-cpu"
        " or test_reduced_precision_within_reference_error and cpu",
    ),
    (
        "dense_crf",
        "dense_crf",
        "test_dense_crf.py",
        "test_cpu_kernel_matches_reference and 4-2x3x7x5 or test_cpu_kernel_matches_pydensecrf and astronaut-defaults",
    ),
]


@pytest.fixture(scope="module")
def planted_runs(tmp_path_factory):
    """Every kernel's run, started at once: {kernel: (process, path of its output)}."""
    out_dir = tmp_path_factory.mktemp("planted")
    env = {k: v for k, v in os.environ.items() if k != "OVSEG_BACKEND"}
    env["COLUMNS"] = "10000"  # the summary's "FAILED ... - AssertionError" lines are not cut to a terminal's width
    runs = {}
    for kernel, _, test_file, selection in PLANTED:
        cmd = [sys.executable, "-m", "pytest", f"tests/ops/{test_file}", "-k", selection]
        cmd += ["-p", "no:cacheprovider", "-q", "-rf", "--tb=short", "--no-header"]
        path = out_dir / f"{kernel}.txt"
        with open(path, "w") as log:  # a file, not a pipe: a full pipe would block a run nobody reads yet
            proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(env, OVSEG_PLANT_BUG=kernel), stdout=log, stderr=log)
        runs[kernel] = (proc, path)
    yield runs
    for proc, _ in runs.values():
        if proc.poll() is None:
            proc.kill()
        proc.wait()


@pytest.mark.parametrize(("kernel", "op"), [p[:2] for p in PLANTED], ids=[p[0] for p in PLANTED])
def test_planted_bug_is_caught(planted_runs, kernel, op):
    require_backend(op, "cpu")
    proc, path = planted_runs[kernel]
    proc.wait(timeout=300)
    out = path.read_text()
    summary = out.strip().splitlines()[-1] if out.strip() else ""
    failed = re.search(r"(\d+) failed", summary)
    # Every selected test fails, on a wrong value (a failed assert or assert_close), not on a crash, an
    # exception or a missing kernel (pytest.fail).
    assert proc.returncode == 1 and failed and "passed" not in summary and "error" not in summary, out[-4000:]
    reasons = [line for line in out.splitlines() if line.startswith("FAILED ")]
    assert len(reasons) == int(failed.group(1)) >= 2, out[-4000:]
    assert all(" - AssertionError" in line or " - assert " in line for line in reasons), "\n".join(reasons)
