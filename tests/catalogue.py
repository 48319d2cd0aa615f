"""The catalogue of examples/ for the tests: its folder and each file's module."""

from __future__ import annotations

import pathlib

from einflash.demo import load_variant

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str):
    """The module of examples/<name>.py."""
    return load_variant(EXAMPLES / f"{name}.py")[0]
