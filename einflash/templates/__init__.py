"""Triton kernel templates with named hook slots, and the one helper that renders them.

Templates are real files (``*.py.jinja``) rendered by the compiler; they never drive it.

>>> "attention_fwd.py.jinja" in available()
True
"""

from __future__ import annotations

import functools
import pathlib

import jinja2

HERE = pathlib.Path(__file__).resolve().parent


@functools.cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def available() -> list[str]:
    return sorted(p.name for p in HERE.glob("*.py.jinja"))


def render(name: str, **slots) -> str:
    """Render template ``name`` with its hook slots filled; a missing slot is an error."""
    return _environment().get_template(name).render(**slots)
