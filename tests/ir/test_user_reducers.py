"""Reducers of the user's own: a log-add-exp reducer turns softmax into one reduction, and einflash
analyses, rewrites, hashes and runs it like its own reducers."""

from __future__ import annotations

import math
import re

import pytest
import torch
from catalogue import load_example

import einflash as ef
from einflash.compiler.analysis.key_passes import count_passes
from einflash.errors import DeclarationError, UnsupportedOperatorError
from einflash.ir.reference import run_reference

LOGADDEXP = load_example("logsumexp_reducer").LOGADDEXP


@ef.attention
def lse_softmax(q, k, v):
    """Softmax weights exp(s − logsumexp(s)), with the log-sum-exp a reduction of its own."""
    s = q @ k * ef.scale
    return ef.exp(s - s.reduce(LOGADDEXP, "n")) @ v


def _qkv(M=9, N=13, E=8):
    return torch.randn(2, 2, M, E), torch.randn(2, 2, N, E), torch.randn(2, 2, N, E)


def test_reference_is_softmax_attention():
    q, k, v = _qkv()
    want = torch.softmax(q.double() @ k.double().transpose(-1, -2) / math.sqrt(8), -1) @ v.double()
    torch.testing.assert_close(lse_softmax.reference(q, k, v), want)


def test_two_passes_as_written_one_after_streaming():
    assert count_passes(lse_softmax.cascade).passes == 2
    assert lse_softmax.explain().passes == 1
    assert "logaddexp" in str(lse_softmax.forward.rewritten)


def test_the_streamed_cascade_computes_the_same_chunk_by_chunk():
    q, k, v = _qkv(N=23)
    inputs = {"q": q, "k": k, "v": v}
    want = run_reference(lse_softmax.cascade, inputs)
    for chunk in (1, 4, 7):
        torch.testing.assert_close(run_reference(lse_softmax.forward.rewritten, inputs, chunk=chunk), want)


def test_the_definition_is_part_of_the_structural_hash():
    # the same function, written another way: another definition
    other = ef.reducer(
        "logaddexp_shifted",
        lambda a, b: ef.maximum(a, b) + ef.log(ef.exp(a - ef.maximum(a, b)) + ef.exp(b - ef.maximum(a, b))),
        identity=-math.inf,
    )

    def declare(r):
        def f(q, k, v):
            s = q @ k * ef.scale
            return ef.exp(s - s.reduce(r, "n")) @ v

        return ef.attention(f, name="lse").cascade

    assert declare(LOGADDEXP).key == declare(LOGADDEXP).key != declare(other).key


def test_defining_the_same_reducer_again_is_allowed_another_body_is_not():
    assert (
        ef.reducer(
            "logaddexp",
            lambda a, b: ef.maximum(a, b) + ef.log(1 + ef.exp(-ef.abs(a - b))),
            identity=-math.inf,
            derivative=lambda x, r: ef.exp(x - r),
        )
        is LOGADDEXP
    )
    with pytest.raises(DeclarationError, match="already defined"):
        ef.reducer("logaddexp", lambda a, b: a + b, identity=0.0)


@pytest.mark.parametrize(
    "combine, identity, words",
    [
        (lambda a, b: a + b + a * b * (a - b), 0.0, "must be commutative"),
        (lambda a, b: a + b, 1.0, "combine(x, identity) must be x"),
        (lambda a, b: (a + b) * 0.5, 0.0, "combine(x, identity) must be x"),
        (lambda a, b: a + b + a * a * b * b, 0.0, "must be associative"),
        (lambda a, b: ef.maximum(a, b) + ef.m, 0.0, "only its two operands"),
        (lambda a, b: ef.mask(a, a > b), 0.0, "elementwise"),
    ],
    ids=["not-commutative", "bad-identity", "mean", "not-associative", "coordinate", "filter"],
)
def test_broken_reducers_are_refused(combine, identity, words):
    with pytest.raises(DeclarationError, match=re.escape(words)):
        ef.reducer(f"broken_{abs(hash(words))}", combine, identity)


def test_built_in_names_are_taken():
    with pytest.raises(DeclarationError, match="built-in"):
        ef.reducer("max", lambda a, b: ef.maximum(a, b), -math.inf)


def test_unknown_reducer_names_are_refused():
    with pytest.raises(UnsupportedOperatorError, match="unknown reducer 'logsumexp'"):

        @ef.attention
        def unknown(q, k, v):
            s = q @ k
            return ef.exp(s - s.reduce("logsumexp", "n")) @ v
