"""The variant catalogue: every example loads, validates and prints, and the reference
executor's output equals the independent torch formula of tests/formulas.py."""

from __future__ import annotations

import dataclasses
import functools

import formulas
import pytest
import torch
from catalogue import EXAMPLES, load_example

import einflash as ef
from einflash.ir.validate import validate

CATALOGUE = (
    "softmax",
    "causal",
    "sliding_window",
    "prefix_lm",
    "sink_window",
    "document_mask",
    "gqa",
    "alibi",
    "relative_bias",
    "lowrank_bias",
    "softcap",
    "sigmoid",
    "signed_softmax",
    "differential",
    "head_gate",
    "top_theta",
    "post_norm_threshold",
    "moba",
    "multi_token",
    "linear",
    "causal_linear",
    "gla",
    "agent",
    "mla_decode",
    "logsumexp_reducer",
    "t5_bias",
    "renorm_threshold",
    "sink_logit",
    "top_k",
    "stick_breaking",
)

# Odd sizes, none a multiple of another; Hq = 2·Hkv unless the example names its HEADS.
SQUARE = ef.Shape(B=2, Hq=4, M=37, N=37, E=16, F=8, Hkv=2)
FEW_QUERIES = dataclasses.replace(SQUARE, M=23, N=41)
MANY_QUERIES = dataclasses.replace(SQUARE, M=41, N=23)
SHAPES = {
    "gla": (SQUARE,),  # gates are read at query and key positions alike
    "document_mask": (SQUARE, FEW_QUERIES),  # query m's document is doc[m], a key position
    "mla_decode": (SQUARE, dataclasses.replace(SQUARE, M=1, N=41), dataclasses.replace(SQUARE, M=4, N=41)),
}
# Parameters that make the variant bite at these small sizes (the defaults are tested on SQUARE).
TUNED = {
    "sliding_window": {"window": 7},
    "prefix_lm": {"prefix": 5},
    "sink_window": {"window": 6, "sinks": 3},
    "softcap": {"cap": 1.5},
    "moba": {"block": 5},
    "post_norm_threshold": {"tau": 0.02},
    "renorm_threshold": {"tau": 0.9},
}


@functools.cache
def _example(name: str):
    return load_example(name)


def _op(name: str) -> ef.AttentionOp:
    return getattr(_example(name), name)


def _with_heads(name: str, shape: ef.Shape) -> ef.Shape:
    heads = getattr(_example(name), "HEADS", None)
    return shape if heads is None else dataclasses.replace(shape, Hq=heads[0], Hkv=heads[1])


def _inputs(name: str, shape: ef.Shape) -> dict[str, torch.Tensor]:
    """Random q, k, v and the example's own extra inputs, in float64, for the inputs it declares."""
    mod = _example(name)
    f64 = dict(dtype=torch.float64)
    made = {
        "q": torch.randn(shape.B, shape.Hq, shape.M, shape.E, **f64),
        "k": torch.randn(shape.B, shape.Hkv, shape.N, shape.E, **f64),
        "v": torch.randn(shape.B, shape.Hkv, shape.N, shape.F, **f64),
    }
    if hasattr(mod, "extra_inputs"):
        made.update(mod.extra_inputs(shape, dtype=torch.float64))
    return {t.name: made[t.name] for t in _op(name).cascade.inputs}


def _check(name: str, shape: ef.Shape, params: dict) -> torch.Tensor:
    inputs = _inputs(name, shape)
    got = _op(name).reference(**inputs, **params)
    want = getattr(formulas, name)(**inputs, **params)
    width = shape.E if name == "mla_decode" else shape.F
    assert got.dtype == torch.float64 and got.shape == (shape.B, shape.Hq, shape.M, width)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    return got


def _cases():
    for name in CATALOGUE:
        for i, shape in enumerate(SHAPES.get(name, (SQUARE, FEW_QUERIES, MANY_QUERIES))):
            yield pytest.param(name, shape, i > 0, id=f"{name}-{shape.M}x{shape.N}")


def test_catalogue_is_complete():
    assert sorted(p.stem for p in EXAMPLES.glob("*.py")) == sorted(CATALOGUE)
    assert all(callable(getattr(formulas, name, None)) for name in CATALOGUE)


@pytest.mark.parametrize("name", CATALOGUE)
def test_example_declares_one_valid_op(name):
    mod = _example(name)
    assert mod.__doc__ and mod.__doc__.strip()
    op = _op(name)
    assert isinstance(op, ef.AttentionOp) and op.cascade.name == name
    validate(op.cascade)
    lines = str(op.cascade).splitlines()
    assert lines[0].startswith(f"cascade {name}")
    assert [e.out for e in op.cascade.einsums] == [ln.split("[")[0].strip() for ln in lines[-len(op.cascade.einsums) :]]
    extras = {t.name for t in op.cascade.inputs} - {"q", "k", "v"}
    assert hasattr(mod, "extra_inputs") == bool(extras)
    if extras:
        made = mod.extra_inputs(_with_heads(name, SQUARE))
        assert set(made) == extras
        assert all(x.dtype == torch.float32 for x in made.values() if x.is_floating_point())


@pytest.mark.parametrize("name, shape, tuned", list(_cases()))
def test_reference_matches_formula(name, shape, tuned):
    params = dict(TUNED.get(name, {})) if tuned else {}
    if tuned and shape.M > shape.N and any(p.name == "scale" for p in _op(name).cascade.params):
        params["scale"] = 0.3
    _check(name, _with_heads(name, shape), params)


@pytest.mark.parametrize(
    "name, shape, params", [("sliding_window", MANY_QUERIES, {"window": 7}), ("top_theta", SQUARE, {})]
)
def test_fully_masked_rows_are_zero(name, shape, params):
    got = _check(name, shape, params)
    empty = (got == 0).all(dim=-1)
    assert empty.any() and not empty.all()


def test_library_softmax_is_the_hand_spelled_one():
    @ef.attention
    def library(q, k, v):
        return ef.softmax(q @ k * ef.scale, "n") @ v

    hand = _op("softmax").cascade
    assert library.cascade.key == hand.key
    assert library.cascade.canonical() == hand.canonical()
