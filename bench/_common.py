"""Shared machinery of the benchmarks in ``bench/`` (shipped as ``ovseg_fast.bench``).

Every benchmark file compares *providers* of one op on named shapes ("cases"), in one process, so
the ratios between providers are meaningful on a noisy machine even when absolute times are not:

- ``reference``           the plain-PyTorch reference, eager;
- ``reference_compiled``  the same under ``torch.compile``;
- ``ovseg_fast``          the public op with automatic backend choice (the C++ kernel on CPU);
- peers named in the op's issue (e.g. ``pot``, ``flex_attention``, ``sdpa_dense``).

Each measurement records, in pytest-benchmark's ``extra_info``: op, case, mode (``fwd`` or
``fwd_bwd``), provider, FLOPs of the op (for GFLOP/s), the peak memory one call adds beyond its
inputs, the calls per timed round (pytest-benchmark's statistics can be per round, see
:func:`record`) and, where ovseg-fast's call is short, for every other provider ``paired_speedup``:
the provider's time over ovseg-fast's in rounds run alternately. ``ovseg-fast bench`` turns the JSON
into the ratio table (:mod:`ovseg_fast.cli`), whose speed-ups are these paired ratios where there are
some and the ratios of the medians elsewhere.

Why paired: this VM (like any shared machine) goes through phases of seconds in which one piece of
code runs 20-50% slower and another does not (measured: the plain Sinkhorn loop at 0.50 or 0.77 ms
between phases while ovseg-fast's op stayed at 0.10 ms, and the other way round). Providers timed
one after the other each see whichever phase they fall in, so the ratio of their medians moves by
that much from run to run; rounds of two providers run alternately see the same phases, and the
median of the round-by-round ratios does not. Only short calls are paired: a round of a long call is
one call, and it would follow the other provider's call and its memory traffic (``_PAIR_BELOW_SECONDS``).

Peak memory is measured as the rise of the process's peak resident set (``VmHWM``, reset through
``/proc/self/clear_refs``) during one call. PyTorch keeps no CPU allocator statistics, so this is the
honest CPU measure. For that one call glibc's mmap threshold drops to 64 KiB and the heap is trimmed,
so every tensor the call makes is fresh memory rather than a reused heap chunk; it is None where
/proc is not available. Timing runs with the threshold glibc's own dynamic policy settles at in a
long-running process (32 MiB), so neither side pays a page fault per tensor per call.
"""

from __future__ import annotations

import ctypes
import gc
import math
import os
import statistics
import time
from typing import Callable, Optional

import torch

__all__ = ["PROVIDER_ORDER", "compiled", "peak_memory_bytes", "record", "setup_threads"]

PROVIDER_ORDER = ("ovseg_fast", "reference", "reference_compiled")
_TARGET_SECONDS = float(os.environ.get("OVSEG_BENCH_SECONDS", "0.6"))
_MAX_ROUNDS = int(os.environ.get("OVSEG_BENCH_MAX_ROUNDS", "50"))
_MIN_ROUNDS = 5
_MIN_ROUND_SECONDS = 1e-3
_WARMUP_SECONDS = 1.5
_MAX_WARMUP_CALLS = 1000
# Providers of a case whose ovseg-fast call is shorter than this alternate their rounds with it (see
# record). Longer calls are timed in rounds of one call, few of them, each of which would follow the
# other provider's call and its memory traffic: measured, a 0.10 s dense CRF call took 0.12-0.14 s
# right after pydensecrf2's even after an untimed call, and SwAV's 7 ms Sinkhorn took 25 ms once in
# six calls after the loop's 49 MB temporaries. Calls this short run several to a round, after an
# untimed call, and phases of seconds span many rounds.
_PAIR_BELOW_SECONDS = 2e-3
# Paired rounds of calls shorter than this start with one untimed call: the round follows the other
# provider's, which evicted this one's data from the caches.
_WARM_CALL_BELOW_SECONDS = 1.0


def setup_threads() -> int:
    """All providers run with the same thread count (``OVSEG_BENCH_THREADS``, default all cores)."""
    threads = int(os.environ.get("OVSEG_BENCH_THREADS", str(os.cpu_count() or 1)))
    torch.set_num_threads(threads)
    return threads


def compiled(fn: Callable) -> Callable:
    """``torch.compile(fn)`` for one case: static shapes, from a clean Dynamo cache.

    The benchmarks compile the same Python function once per case; without a reset Dynamo would
    treat the second case's shapes as dynamic and recompile a symbolic-shape graph, which is slower
    than what a user compiling for their one shape gets (and, for FlexAttention on CPU in torch
    2.14.1, emits C++ that does not compile).
    """
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MEASURE_MMAP_THRESHOLD = 64 * 1024
_TIMING_MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


_LIBC = _libc()


def _set_mmap_threshold(nbytes: int) -> None:
    if _LIBC is not None:
        _LIBC.mallopt(_M_MMAP_THRESHOLD, nbytes)
        _LIBC.mallopt(_M_TRIM_THRESHOLD, 2 * nbytes)
        _LIBC.malloc_trim(0)


_set_mmap_threshold(_TIMING_MMAP_THRESHOLD)


def _status_bytes(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def peak_memory_bytes(fn: Callable[[], object]) -> Optional[int]:
    """Bytes the peak resident set rises by during one call of ``fn`` (its result included)."""
    gc.collect()
    _set_mmap_threshold(_MEASURE_MMAP_THRESHOLD)
    try:
        base = _status_bytes("VmRSS:")
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
        except OSError:
            return None
        result = fn()
        peak = _status_bytes("VmHWM:")
        del result
    finally:
        _set_mmap_threshold(_TIMING_MMAP_THRESHOLD)
    if base is None or peak is None:
        return None
    return max(0, peak - base)


# ovseg-fast's callables of the (op, case) it was last measured on, by mode, with their time per
# call: the other providers of that case and mode alternate their rounds with them when that is short.
# A file's parametrisation lists ovseg_fast first, so its test runs before the other providers' of the
# same case and mode (the mode may vary fastest).
_ANCHOR: dict[tuple[str, str, str], tuple[Callable[[], object], float]] = {}


def _rounds_of(calls: list[float]) -> tuple[float, int]:
    """One call's time and the calls per round. The call's time is the median of the last few calls:
    one slow call would cut the rounds to the minimum and leave the median to a handful of samples."""
    once = max(statistics.median(calls[-5:]), 1e-6)
    return once, max(1, math.ceil(_MIN_ROUND_SECONDS / once))


def record(
    benchmark,
    fn: Callable[[], object],
    *,
    op: str,
    case: str,
    mode: str,
    provider: str,
    flops: Optional[int] = None,
    warmup: int = 2,
) -> None:
    """Times ``fn`` with pytest-benchmark (rounds sized to ~0.6 s) and records what the table needs.

    A call shorter than ``_MIN_ROUND_SECONDS`` is repeated within each round (as pytest-benchmark's
    own calibration does): timed one call at a time, a call of tens of microseconds also measures
    the timer and the cold caches the harness leaves between rounds, the same for every provider,
    which squeezes their ratios towards 1.

    Where ovseg-fast's call on the same op, case and mode (the one its own ``record`` timed last)
    is shorter than ``_PAIR_BELOW_SECONDS``, every other provider runs each of its rounds right after
    a round of ovseg-fast's call, in the untimed set-up of the round, and records the median over
    rounds of (its per-call time / ovseg-fast's) as ``paired_speedup`` (and ovseg-fast's median
    per-call time in those rounds as ``paired_ovseg_fast_s``); pytest-benchmark's statistics are then
    per round (it allows a set-up only with one call per round), ``extra_info["calls_per_round"]``
    converts them to per call. A paired round of a call shorter than ``_WARM_CALL_BELOW_SECONDS``
    starts with one untimed call, ovseg-fast's and the provider's alike. ``warmup`` is the least
    number of untimed calls first (0: none, for references that take seconds).
    """
    # The first calls compile (torch.compile) or fill caches, and in a fresh process the first
    # large allocations are slow to fault in (on this VM a 100 MB output can take 3-7x its steady
    # time for the first second, and a 95 ms dense CRF call took up to 185 ms in its process's first
    # 1.3 s, then 92-105 ms): warm-up lasts at least _WARMUP_SECONDS as well as ``warmup`` calls,
    # counted from the end of the first call, which can take seconds on its own (compiling, or a
    # process's first custom-op call) and never sizes the rounds.
    times: list[float] = []
    if warmup:
        fn()
    deadline = time.perf_counter() + _WARMUP_SECONDS
    while len(times) < max(warmup, 1) or (warmup and len(times) < _MAX_WARMUP_CALLS and time.perf_counter() < deadline):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    once, iterations = _rounds_of(times)
    rounds = int(min(_MAX_ROUNDS, max(_MIN_ROUNDS, _TARGET_SECONDS / (once * iterations))))
    key = (op, case, mode)
    anchor, anchor_once = _ANCHOR.get(key, (None, 0.0)) if provider != "ovseg_fast" else (None, 0.0)
    if provider == "ovseg_fast":
        for other in [k for k in _ANCHOR if k[:2] != key[:2]]:
            del _ANCHOR[other]  # only the current case's: their closures keep its inputs alive
        _ANCHOR[key] = (fn, once)
    paired = anchor is not None and anchor_once < _PAIR_BELOW_SECONDS
    benchmark.group = f"{op} | {case} | {mode}"
    benchmark.extra_info.update(
        op=op,
        case=case,
        mode=mode,
        provider=provider,
        flops=flops,
        peak_memory=peak_memory_bytes(fn),
        calls_per_round=iterations if paired else 1,
    )

    def call() -> None:
        # pytest-benchmark would keep each round's result alive through the next call, so that call's
        # outputs could never reuse the memory just freed (on this VM, fresh memory is slow to fault in)
        fn()

    if not paired:
        benchmark.pedantic(call, rounds=rounds, iterations=iterations, warmup_rounds=0)
        return

    anchor_iterations = _rounds_of([anchor_once])[1]
    per_call: list[float] = []
    anchor_per_call: list[float] = []

    def set_up_round() -> None:
        anchor()
        start = time.perf_counter()
        for _ in range(anchor_iterations):
            anchor()
        anchor_per_call.append((time.perf_counter() - start) / anchor_iterations)
        if once < _WARM_CALL_BELOW_SECONDS:
            fn()

    def timed_round() -> None:
        start = time.perf_counter()
        for _ in range(iterations):
            call()
        per_call.append((time.perf_counter() - start) / iterations)

    benchmark.pedantic(timed_round, setup=set_up_round, rounds=rounds, iterations=1, warmup_rounds=0)
    benchmark.extra_info["paired_speedup"] = statistics.median([p / a for p, a in zip(per_call, anchor_per_call)])
    benchmark.extra_info["paired_ovseg_fast_s"] = statistics.median(anchor_per_call)
