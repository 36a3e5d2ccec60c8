"""Settings every benchmark run shares, applied before any tensor exists.

Large outputs dominate several ops' time on CPU through first-touch page faults (a fresh 100 MB
tensor costs ~35 ms of faults here against ~3 ms to fill memory already mapped). numpy backs large
arrays with transparent huge pages by default; PyTorch does so only with
``THP_MEM_ALLOC_ENABLE=1``, read once at its first allocation. The benchmarks turn it on, so that
every provider (torch or numpy) pays the same, smaller page-fault cost and the table compares the
kernels rather than the page allocator. ``OVSEG_BENCH_THP=0`` measures torch's default instead.

torch.compile's on-disk cache does not key its compiled CPU kernels on ``ATEN_CPU_CAPABILITY``: a
``reference_compiled`` kernel compiled in a run that emulates an AVX2 CPU (``ATEN_CPU_CAPABILITY=avx2``,
as the README suggests) and loaded again by a native run on an AVX-512 CPU aborts the process (torch
2.14.1, measured). Unless ``TORCHINDUCTOR_CACHE_DIR`` is set, each requested capability gets a cache
of its own.
"""

import os
import tempfile

if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    _capability = os.environ.get("ATEN_CPU_CAPABILITY", "").strip().lower() or "native"
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
        tempfile.gettempdir(), "ovseg_fast_bench_inductor", _capability
    )

if os.environ.get("OVSEG_BENCH_THP", "1") != "0":
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
