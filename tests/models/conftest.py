"""Shared by the model tests: random CLIP weights are the point here, so their warning is silenced."""

from __future__ import annotations

import warnings

import pytest


@pytest.fixture(autouse=True)
def _quiet_random_weights():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*RANDOM weights")
        yield
