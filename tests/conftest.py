"""Test set-up shared by the whole suite.

Triton kernels are tested with Triton's interpreter on CPU tensors when no GPU is present, so
TRITON_INTERPRET must be set before any Triton kernel is defined (``ovseg_fast.kernels`` modules are
imported lazily, at first use, which is after this file runs).
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
