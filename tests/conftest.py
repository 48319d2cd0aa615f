"""Shared by every test: the gpu marker and seeded randomness."""

from __future__ import annotations

import pytest
import torch

import einflash  # noqa: F401  (on a machine without a GPU this turns Triton's interpreter on, before any test imports triton)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
