"""FuseMax's pass rule on the variant catalogue: passes as written and after the rewrite pipeline,
the reasons each extra pass exists, and the values that cross from one pass to the next."""

from __future__ import annotations

import functools

import pytest
from catalogue import EXAMPLES, load_example

import einflash as ef
from einflash.compiler.analysis.key_passes import count_passes
from einflash.ir.cascade import Role

# Passes over n (as written, after the pipeline), from docs/design.md §3. A softmax-normalised variant
# written naively is 3 (max; sum of exp; normalise and contract with v), FuseMax's count;
# variants without a row normaliser are 1. MoBA's routing needs a sum over n (the block means)
# before its softmax can start: 4 as written.
PASSES = {
    "softmax": (3, 1),
    "causal": (3, 1),
    "sliding_window": (3, 1),
    "prefix_lm": (3, 1),
    "sink_window": (3, 1),
    "document_mask": (3, 1),
    "gqa": (3, 1),
    "alibi": (3, 1),
    "relative_bias": (3, 1),
    "t5_bias": (3, 1),
    "lowrank_bias": (3, 1),
    "softcap": (3, 1),
    "sigmoid": (1, 1),
    "signed_softmax": (3, 1),
    "differential": (3, 1),
    "head_gate": (3, 1),
    "top_theta": (3, 1),
    "post_norm_threshold": (3, 2),
    "renorm_threshold": (4, 2),
    "sink_logit": (2, 1),
    "moba": (4, 2),
    "multi_token": (3, 1),
    "linear": (3, 1),
    "causal_linear": (1, 1),
    "gla": (1, 1),
    "agent": (3, 1),
    "mla_decode": (3, 1),
    "logsumexp_reducer": (2, 1),
    "top_k": (4, 2),
    "stick_breaking": (1, 1),
}
# Where the pipeline does not reach docs/design.md §3's count yet (none now). Strict: reaching it must update this
# table.
BEHIND_CATALOGUE: dict[str, str] = {}


@functools.cache
def _op(name: str) -> ef.AttentionOp:
    return getattr(load_example(name), name)


def test_table_covers_the_catalogue():
    assert sorted(PASSES) == sorted(p.stem for p in EXAMPLES.glob("*.py"))


@pytest.mark.parametrize("name", sorted(PASSES))
def test_passes_as_written(name):
    assert count_passes(_op(name).cascade).passes == PASSES[name][0]


def _after(name: str):
    if name in BEHIND_CATALOGUE:
        return pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=BEHIND_CATALOGUE[name]))
    return name


@pytest.mark.parametrize("name", [_after(n) for n in sorted(PASSES)])
def test_passes_after_the_pipeline(name):
    assert count_passes(_op(name).forward.rewritten).passes == PASSES[name][1]


@pytest.mark.parametrize("name", sorted(PASSES))
def test_the_pipeline_never_adds_passes(name):
    op = _op(name)
    counts = [count_passes(op.cascade).passes] + [count_passes(s.cascade).passes for s in op.forward.steps]
    assert counts == sorted(counts, reverse=True)


# -- reasons ------------------------------------------------------------------------------------------


def _reason_fields(r):
    return r.index, r.consumer, r.waits_for, r.reduced, r.reduction


def test_reasons_of_the_naive_softmax():
    c = _op("softmax").cascade
    pa = count_passes(c)
    assert [_reason_fields(r) for r in pa.reasons] == [(2, "num", "top", "top", "max"), (3, "o", "den", "den", "sum")]
    for r in pa.reasons:  # lines are those of the user's statements
        assert r.consumer_line == c.producer(r.consumer).line
        assert r.reduction_line == c.producer(r.reduced).line
    assert str(pa.reasons[0]) == (
        f"pass 2: num (line {c.producer('num').line}) iterates n again and reads top, "
        f"a max over all of n (line {c.producer('top').line}) that is complete only "
        f"after pass 1"
    )


def test_pass_of_each_einsum():
    pa = count_passes(_op("softmax").cascade)
    assert dict(pa.einsum_pass) == {"dot_e": 1, "s": 1, "top": 1, "num": 2, "den": 2, "o": 3}
    assert pa.pass_of("num") == 2


def test_values_crossing_passes():
    """s is made in pass 1 and read in pass 2; num in pass 2 and read in pass 3."""
    assert count_passes(_op("softmax").cascade).crossing == (("num", 2, 3), ("s", 1, 2))
    assert count_passes(_op("softmax").forward.rewritten).crossing == ()


def test_moba_waits_for_its_routing_sum():
    """The keys' block means (a sum over n) decide which keys a query sees: the scores wait for them."""
    c = _op("moba").cascade
    first = count_passes(c).reasons[0]
    assert _reason_fields(first) == (2, "s", "sel", "sum_n", "sum")
    assert first.reduction_line == c.producer("sum_n").line
    assert c.producer("sum_n").reduce.ranks == ("n",)
    assert str(first).startswith(
        f"pass 2: s (line {c.producer('s').line}) iterates n again and reads sel, "
        f"which needs sum_n, a sum over all of n"
    )


def test_moba_after_the_pipeline_still_waits_for_the_routing():
    streamed = _op("moba").forward.rewritten
    pa = count_passes(streamed)
    first = pa.reasons[0]
    assert (first.index, first.waits_for, first.reduction) == (2, "sel", "sum")
    assert streamed.tensor(first.reduced).role is Role.STATE  # the block means are a running sum now
    # the routed softmax is a second loop with its own running max and sum: 2 passes, as the brief counts
    assert pa.passes == 2
    assert {e.loop for e in streamed.einsums if e.loop} == {1, 2}


def test_post_norm_threshold_keeps_a_second_pass_after_a_running_max_and_sum():
    streamed = _op("post_norm_threshold").forward.rewritten
    pa = count_passes(streamed)
    assert pa.passes == 2 and len(pa.reasons) == 1
    r = pa.reasons[0]
    assert r.index == 2 and r.reduction == "max"
    assert streamed.tensor(r.reduced).role is Role.STATE
    # each loop is one pass: the scores are recomputed in the second, which accumulates o
    for e in streamed.einsums:
        if e.loop:
            assert pa.pass_of(e.out) == e.loop
    assert pa.pass_of("o") == 2 and streamed.tensor("o").role is Role.STATE


def test_a_loop_is_one_pass():
    streamed = _op("differential").forward.rewritten
    pa = count_passes(streamed)
    assert pa.passes == 1 and pa.reasons == ()
    for e in streamed.einsums:
        assert pa.pass_of(e.out) == (1 if e.loop else 0)


# -- the shapes of the linear forms -------------------------------------------------------------------


def _spans_both_sequences(name: str, c) -> list[str]:
    return [t.name for t in c.tensors if {"m", "n"} <= set(t.ranks) and t.role is not Role.INPUT]


def test_linear_attention_has_no_m_by_n_intermediate_after_the_pipeline():
    op = _op("linear")
    assert _spans_both_sequences("linear", op.cascade) == ["a"]
    assert _spans_both_sequences("linear", op.forward.rewritten) == []
    assert count_passes(op.forward.rewritten).passes == 1


def test_agent_attention_streams_n_once_and_never_iterates_it_for_the_agents_softmax():
    op = _op("agent")
    streamed = op.forward.rewritten
    pa = count_passes(streamed)
    assert pa.passes == 1
    assert _spans_both_sequences("agent", streamed) == []
    for e in streamed.einsums:  # the queries' softmax over the agents a does not touch n
        if "m" in e.ranks:
            assert pa.pass_of(e.out) == 0
    # over the agent rank, the queries' softmax as written is the naive 3-pass cascade
    assert count_passes(op.cascade, rank="a").passes == 3
