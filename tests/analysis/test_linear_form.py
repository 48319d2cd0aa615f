"""The linear form: the catalogue's linear variants recognised (their state, causal or not), every other variant
not, weights that are not linear refused (a function of the scores, a normaliser, a window, a decay that does not
split), and the chunked plan's crossover against the quadratic form's FLOPs."""

import pathlib

import pytest
from catalogue import load_example

import einflash as ef
from einflash.compiler.analysis.linear_form import C, E, F, N, linear_form

EXAMPLES = sorted(p.stem for p in (pathlib.Path(__file__).parents[2] / "examples").glob("*.py"))
LINEAR = {"causal_linear": True, "gla": True, "linear": False}  # causal or not


@pytest.mark.parametrize("name", EXAMPLES)
def test_the_catalogue_s_linear_variants_and_no_other(name):
    form = linear_form(getattr(load_example(name), name).cascade)
    assert (form is not None) == (name in LINEAR)
    if form is not None:
        assert form.state == ("e", "f") and form.causal == LINEAR[name]
        assert form.separated == (name != "linear")  # a decay, or GLA's gates, split into query and key parts


@ef.attention
def windowed(q, k, v):
    return ef.mask(q @ k, (ef.n <= ef.m) & (ef.m - ef.n < 64)) @ v


@ef.attention
def normalised(q, k, v):
    w = ef.mask(q @ k, ef.n <= ef.m)
    return (w @ v) / w.sum("n")


@ef.attention
def through_a_map(q, k, v):
    return ef.sigmoid(q @ k) @ v


@ef.attention
def mixed_decay(q, k, v):
    return ((q @ k) * ef.exp(-0.01 * ef.m * ef.n)) @ v


@pytest.mark.parametrize("op", [windowed, normalised, through_a_map, mixed_decay], ids=lambda op: op.name)
def test_weights_that_are_not_linear_or_leave_no_single_state_are_not_taken_for_it(op):
    assert linear_form(op.cascade) is None


@pytest.mark.parametrize("name", sorted(LINEAR))
def test_the_crossover_is_where_the_chunked_plan_stops_taking_more_flops(name):
    form = linear_form(getattr(load_example(name), name).cascade)
    at = form.crossover(chunk=64, e=128, f=64)

    def fewer(n: int) -> bool:
        sizes = {N: n, C: 64, E: 128, F: 64}
        return form.chunked_flops.subs(sizes) <= form.quadratic_flops.subs(sizes)

    assert fewer(at) and not fewer(at - 1)


def test_explain_reports_the_state_and_the_plan():
    text = str(load_example("causal_linear").causal_linear.explain())
    assert "linear form" in text and "chunked plan" in text and "65,536 B per head" in text
    assert "linear form" not in str(load_example("softmax").softmax.explain())
