"""Shared fixtures: seeded randomness, the gpu marker, and the examples as a fixture."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest
import torch

import einflash  # noqa: F401  (on a machine without a GPU this turns Triton's interpreter on, before any test imports triton)

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


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


def load_example(name: str):
    """The module of examples/<name>.py."""
    spec = importlib.util.spec_from_file_location(f"einflash_example_{name}", EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
