"""The catalogue of examples/ for the tests: its folder and each file's module; declarations beside it."""

from __future__ import annotations

import pathlib

import einflash as ef
from einflash.demo import load_variant

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str):
    """The module of examples/<name>.py."""
    return load_variant(EXAMPLES / f"{name}.py")[0]


# Causal attention in linear form beside the catalogue's, which several layers test (rewrites, kernels, gradients).


@ef.attention
def plain_causal_linear(q, k, v):
    """Causal linear attention with no decay: the state is a plain running sum of kᵀv."""
    return ef.mask(q @ k, ef.n <= ef.m) @ v


@ef.attention
def anticausal_decay(q, k, v, decay: ef.Tensor["h"]):  # noqa: F821, UP037
    """Each query sees the keys from its own position on, decayed by their distance: the states run backwards."""
    return ef.mask((q @ k) * ef.exp((ef.n - ef.m) * ef.log(decay)), ef.n >= ef.m) @ v
