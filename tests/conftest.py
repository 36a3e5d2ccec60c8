"""Test set-up shared by the whole suite.

The Triton tests run where the kernels can (``tests.helpers.triton_device``): on CUDA tensors, with
the compiled kernels, when a GPU is present; otherwise on CPU tensors under Triton's interpreter,
which is switched on here. TRITON_INTERPRET must be set before any Triton kernel is defined
(``ovseg_fast.kernels`` modules are imported lazily, at first use, which is after this file runs).
An explicit TRITON_INTERPRET=0 is kept: with no GPU the Triton tests then skip, which is how a GPU
machine's semantics are simulated without one. Tests marked ``cuda`` skip when there is no GPU.

torch.compile's on-disk cache does not key compiled CPU kernels on ``ATEN_CPU_CAPABILITY`` (torch
2.14.1): a suite run emulating an AVX2 CPU on an AVX-512 one reused the AVX-512 run's kernels and
the compiled dense CRF module returned garbage labels. Unless ``TORCHINDUCTOR_CACHE_DIR`` is set,
each requested capability gets a cache of its own (as in bench/conftest.py).
"""

from __future__ import annotations

import os
import tempfile

if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    _capability = os.environ.get("ATEN_CPU_CAPABILITY", "").strip().lower() or "native"
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
        tempfile.gettempdir(), "ovseg_fast_tests_inductor", _capability
    )

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device; none here")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip_cuda)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield
