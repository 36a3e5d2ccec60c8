"""Test set-up shared by the whole suite.

The Triton tests run where the kernels can (``tests.helpers.triton_device``): on CUDA tensors, with
the compiled kernels, when a GPU is present; otherwise on CPU tensors under Triton's interpreter,
which is switched on here. TRITON_INTERPRET must be set before any Triton kernel is defined
(``ovseg_fast.kernels`` modules are imported lazily, at first use, which is after this file runs).
An explicit TRITON_INTERPRET=0 is kept: with no GPU the Triton tests then skip, which is how a GPU
machine's semantics are simulated without one. Tests marked ``cuda`` skip when there is no GPU.
"""

from __future__ import annotations

import os

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
