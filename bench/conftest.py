"""Settings every benchmark run shares, applied before any tensor exists.

Large outputs dominate several ops' time on CPU through first-touch page faults (a fresh 100 MB
tensor costs ~35 ms of faults here against ~3 ms to fill memory already mapped). numpy backs large
arrays with transparent huge pages by default; PyTorch does so only with
``THP_MEM_ALLOC_ENABLE=1``, read once at its first allocation. The benchmarks turn it on, so that
every provider (torch or numpy) pays the same, smaller page-fault cost and the table compares the
kernels rather than the page allocator. ``OVSEG_BENCH_THP=0`` measures torch's default instead.
"""

import os

if os.environ.get("OVSEG_BENCH_THP", "1") != "0":
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
