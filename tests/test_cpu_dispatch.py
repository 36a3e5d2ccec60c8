"""The C++ kernels never run a copy the CPU cannot execute (csrc/cpu_dispatch.h).

ATen takes ATEN_CPU_CAPABILITY at its word, so ``avx512`` on an AVX2-only CPU used to end in SIGILL.
Every test here runs on any x86 CPU: OVSEG_CPU_MASK hides the features of the best copy this CPU
supports, so the fallback is exercised on AVX-512 machines (falling back to AVX2) and on AVX2-only
machines (falling back to DEFAULT) alike.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from ovseg_fast import _extension
from tests.helpers import child_env, require_backend

pytestmark = pytest.mark.skipif(not _extension.extension_loaded(), reason="the C++ extension is not loaded")

_RANK = sorted(_extension.CAPABILITY_RANK, key=_extension.CAPABILITY_RANK.get)
_FEATURES = {"AVX2": ["avx2", "fma", "f16c"], "AVX512": ["avx512f", "avx512bw", "avx512vl", "avx512dq"]}

# The user's command from the report, plus the copy that ran and a check against the reference.
_USER_CODE = textwrap.dedent(
    """
    import warnings
    warnings.simplefilter("always")
    import torch, ovseg_fast.ops as o
    x = torch.randn(2, 8, 4)
    q = o.sinkhorn(x)
    with o.use_backend("reference"):
        torch.testing.assert_close(q, o.sinkhorn(x), rtol=1e-4, atol=1e-6)
    print(float(q.sum()))
    import ovseg_fast._C as ext
    print(ext.kernel_capability())
    """
)


def _cpu_best() -> str:
    return _extension.extension().supported_capability(apply_mask=False)


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], env=child_env(**env), capture_output=True, text=True, timeout=300
    )


def _fallback_warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "asks for" in line and "kernels but" in line]


def test_supported_capability_follows_the_cpu_and_the_mask():
    ext = _extension.extension()
    best = _cpu_best()
    features = ext.cpu_features()
    assert set(features) == {f for fs in _FEATURES.values() for f in fs}
    expected = "DEFAULT"
    if all(features[f] for f in _FEATURES["AVX2"]):
        expected = "AVX512" if all(features[f] for f in _FEATURES["AVX512"]) else "AVX2"
    assert ext.supported_capability() == best == expected
    # What this process runs never exceeds what the CPU supports.
    assert _RANK.index(ext.kernel_capability()) <= _RANK.index(best)

    # The mask is parsed case- and space-insensitively and hides the named features.
    out = _run(
        "import ovseg_fast._C as e; print(e.supported_capability(), e.supported_capability(apply_mask=False), "
        "sorted(e.masked_cpu_features()), e.cpu_features()['avx2'])",
        OVSEG_CPU_MASK=" AVX2 , fma,",
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["DEFAULT", best, "['avx2',", "'fma']", "False"]


def test_request_above_what_the_cpu_supports_falls_back_with_one_warning():
    """The best copy this CPU supports is requested while its features are hidden: the next copy down
    runs, gives the reference's result, and one warning names what is missing."""
    require_backend("sinkhorn", "cpu")
    best = _cpu_best()
    if best == "DEFAULT":
        pytest.skip("this CPU supports only the DEFAULT copy: there is no lower copy to fall back to")
    lower = _RANK[_RANK.index(best) - 1]
    hidden = _FEATURES[best][0]
    out = _run(_USER_CODE, ATEN_CPU_CAPABILITY=best.lower(), OVSEG_CPU_MASK=hidden)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-1] == lower
    warned = _fallback_warnings(out.stderr)
    assert len(warned) == 1, out.stderr[-3000:]
    assert f"asks for {best} kernels" in warned[0] and hidden in warned[0] and f"running the {lower} copy" in warned[0]


def test_user_command_with_avx512_requested_prints_a_result_and_a_warning():
    """The report's command: ``ATEN_CPU_CAPABILITY=avx512 python -c "... o.sinkhorn(torch.randn(2, 8, 4))"``.
    On a CPU without AVX-512 it is run as is (torch's own kernels are saved too: the variable is lowered
    before torch reads it); on an AVX-512 CPU, OVSEG_CPU_MASK hides avx512f to stand in for such a CPU."""
    require_backend("sinkhorn", "cpu")
    best = _cpu_best()
    if best == "DEFAULT":
        pytest.skip("this CPU lacks AVX2 as well: the AVX2 fallback of this test cannot run")
    env = {"ATEN_CPU_CAPABILITY": "avx512"}
    if best == "AVX512":
        env["OVSEG_CPU_MASK"] = "avx512f"
    # softmax is one of torch's kernels whose AVX-512 copy dies on an AVX2-only CPU.
    out = _run(_USER_CODE + "print(float(torch.randn(100).softmax(-1).sum()))\n", **env)
    assert out.returncode == 0, f"exit {out.returncode}: {out.stderr[-3000:]}"
    lines = out.stdout.split()
    assert float(lines[-3]) == pytest.approx(2.0 * 8, rel=1e-4)  # a (2, 8, 4) plan: every row sums to 1
    assert lines[-2] == "AVX2"
    assert float(lines[-1]) == pytest.approx(1.0, rel=1e-5)
    assert len(_fallback_warnings(out.stderr)) == 1, out.stderr[-3000:]


def test_info_shows_requested_supported_and_chosen():
    best = _cpu_best()
    if best == "DEFAULT":
        pytest.skip("this CPU supports only the DEFAULT copy: nothing to lower")
    out = _run("from ovseg_fast.info import main; main()", OVSEG_CPU_MASK=_FEATURES[best][0])
    assert out.returncode == 0, out.stderr[-3000:]
    lower = _RANK[_RANK.index(best) - 1]
    line = next(line for line in out.stdout.splitlines() if line.startswith("kernel capability:"))
    assert f"supported by this CPU {lower}, chosen {lower}" in line
    assert f"OVSEG_CPU_MASK hides {_FEATURES[best][0]}" in line
