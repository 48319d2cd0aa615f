"""Gradient cascades (IR): derived by reverse-mode differentiation, checked against torch.autograd through the
float64 reference executor for every one-pass catalogue variant and input; the max's zero gradient is proved;
the backward streams once per direction; the forward saves per-row states only (and accumulators where the
output cannot give them back); what cannot be differentiated says so."""

import dataclasses
import math
import re

import pytest
import torch
from catalogue import EXAMPLES, anticausal_decay, plain_causal_linear
from gradient_cases import FORWARD_ONLY, FULLY_MASKED, LOWERED, STAGED, TRAINED_OWN, TUNED, frozen, inputs, op

import einflash as ef
from einflash.compiler.analysis.key_passes import count_passes
from einflash.compiler.autodiff.derivatives import local_derivative
from einflash.compiler.autodiff.flash_form import (
    fold_scalar_chains,
    normalised_exponentials,
    row_reciprocals,
    scalars_after_sums,
)
from einflash.compiler.autodiff.gradient import finish, reference_partials, saved_states
from einflash.compiler.autodiff.parts import restrict
from einflash.errors import DifferentiationError
from einflash.ir.expr import Call, Read, call, walk
from einflash.ir.printer import format_expr
from einflash.ir.ranks import coord
from einflash.ir.reference import bind_extents, bind_params
from einflash.testing import reference_gradients

SHAPE = ef.Shape(B=2, Hq=2, M=9, N=11, E=8, F=8, Hkv=1)


def _cascade_gradients(name: str, given: dict, params: dict, d_o: torch.Tensor) -> dict:
    """Each input's gradient from the gradient cascade on the reference executor (states from the reference)."""
    o = op(name)
    g = o.backward.gradient
    c = o.forward.rewritten
    values = bind_params(c, params, bind_extents(c, given, params))
    saved = saved_states(g, c, given, values)
    parts = reference_partials(g, given, values, d_o, o.reference(**given, **params), saved)
    return finish(g, parts, {p.name: p.ranks for p in g.partials}, given, values=values)


def _assert_same(got: dict, want: dict, given: dict, skip: set[str] = frozenset()) -> None:
    for name, x in given.items():
        if name in skip:  # a frozen table: no gradient in the cascade
            continue
        if not x.is_floating_point():
            assert got[name] is None and want[name] is None, name
            continue
        assert got[name].shape == x.shape and got[name].dtype == x.dtype, name
        assert torch.isfinite(want[name]).all(), name
        torch.testing.assert_close(got[name], want[name], rtol=1e-9, atol=1e-11, msg=name)


def test_the_list_is_the_lowerable_catalogue():
    lowered = sorted(p.stem for p in EXAMPLES.glob("*.py") if op(p.stem).forward.error is None)
    assert lowered == sorted(LOWERED + STAGED + tuple(FORWARD_ONLY))


@pytest.mark.parametrize("name", sorted(FORWARD_ONLY))
def test_a_forward_only_variant_refuses_its_backward_with_a_typed_error(name):
    error = op(name).backward.error
    assert isinstance(error, DifferentiationError) and re.search(FORWARD_ONLY[name], str(error))


def test_a_reducer_without_a_derivative_says_how_to_declare_one():
    undeclared = ef.reducer(
        "logaddexp_undeclared", lambda a, b: ef.maximum(a, b) + ef.log(1 + ef.exp(-ef.abs(a - b))), identity=-math.inf
    )

    @ef.attention(name="lse_weights")
    def f(q, k, v):
        s = q @ k * ef.scale
        return ef.exp(s - s.reduce(undeclared, "n")) @ v

    assert isinstance(f.backward.error, DifferentiationError)
    given = inputs("softmax", SHAPE, torch.float32)
    f(**given)  # the forward still runs
    leaves = {k: v.clone().requires_grad_() for k, v in given.items()}
    with pytest.raises(DifferentiationError, match="derivative declared"):
        f(**leaves)


@pytest.mark.parametrize("name", LOWERED + TRAINED_OWN)
def test_gradient_cascade_is_autograd_of_the_reference(name):
    given, params = inputs(name, SHAPE, torch.float64), TUNED.get(name, {})
    d_o = torch.randn_like(op(name).reference(**given, **params))
    _assert_same(
        _cascade_gradients(name, given, params, d_o),
        reference_gradients(op(name), d_o, **given, **params),
        given,
        frozen(name),
    )


@pytest.mark.parametrize("name, M, N, params", FULLY_MASKED, ids=[c[0] for c in FULLY_MASKED])
def test_rows_that_see_no_key_get_zero_gradients(name, M, N, params):
    given = inputs(name, ef.Shape(B=1, Hq=4, M=M, N=N, E=8, F=8, Hkv=2), torch.float64)
    d_o = torch.randn_like(op(name).reference(**given, **params))
    got = _cascade_gradients(name, given, params, d_o)
    empty = (op(name).reference(**given, **params) == 0).all(-1)
    assert empty.any() and not empty.all()
    assert (got["q"][empty] == 0).all()
    _assert_same(got, reference_gradients(op(name), d_o, **given, **params), given)


SHIFTED = {
    "softmax": ["top2_raw"],
    "causal": ["max_n2_raw"],
    "softcap": ["max_n2"],
    "signed_softmax": ["max_n"],
    "differential": ["max_n22_raw", "max_n222_raw"],
    "sigmoid": [],
    "causal_linear": [],
    "gla": [],
}


@pytest.mark.parametrize("name", sorted(SHIFTED))
def test_maxima_get_no_gradient_by_proof(name):
    """Each max over n is proved shift-invariant: every sum over n reading it has a correction factor and the
    output does not change under the rescaling; normalisers without a max have nothing to prove."""
    g = op(name).backward.gradient
    assert [p.reduction for p in g.invariant] == SHIFTED[name]
    for proof in g.invariant:
        assert proof.op == "max" and proof.factors and "invariant" in str(proof)


def test_a_max_over_the_head_dimension_is_proved_invariant_over_it():
    """A softmax over e (a feature map) shifts by its max over e, and the sum over e takes the factor; q's gradient,
    made after dQ's sum over the keys, is the dQ kernel's. A max over e the output reads is refused."""
    g = op("softmax_features").backward.gradient
    assert [(p.reduction, p.rank, p.factors[0][0]) for p in g.invariant] == [
        ("max_e", "e", "sum_e"),
        ("max_e2", "e", "sum_e2"),
    ]
    assert "max over e; the output does not change when it shifts" in str(g.invariant[0])
    assert {p.input: p.kernel for p in g.partials} == {"q": "q", "k": "kv", "v": "kv"}

    @ef.attention
    def plus_row_max(q, k, v):
        return ef.softmax(q @ k * ef.scale, "n") @ v + q.max("e")

    assert isinstance(plus_row_max.backward.error, DifferentiationError)
    assert "invariant to shifts of max_e (a max over e)" in str(plus_row_max.backward.error)


def test_an_output_that_reads_the_max_is_not_differentiated():
    @ef.attention
    def plus_max(q, k, v):
        s = q @ k * ef.scale
        return ef.softmax(s, "n") @ v + s.max("n")

    assert plus_max.forward.error is None  # the forward runs
    assert isinstance(plus_max.backward.error, DifferentiationError)
    assert "invariant to shifts" in str(plus_max.backward.error)
    q = torch.randn(1, 1, 5, 16, requires_grad=True)
    with pytest.raises(DifferentiationError, match="plus_max: no backward"):
        plus_max(q, q, q)


def test_a_shifted_read_of_a_learnable_input_is_not_differentiated():
    @ef.attention
    def shifted(q, k, v, bias: ef.Tensor["h m n"]):
        return ef.softmax(q @ k * ef.scale + bias[ef.m, ef.n // 2], "n") @ v

    # q, k and v have their gradients; the bias is frozen, and a call that asks for its gradient is refused
    assert shifted.backward.error is None
    assert set(shifted.backward.gradient.inputs_with_gradient()) == {"q", "k", "v"}
    assert [name for name, _ in shifted.backward.gradient.frozen] == ["bias"]
    q = torch.randn(1, 1, 6, 16, requires_grad=True)
    with pytest.raises(DifferentiationError, match=r"bias requires grad, but .*:\d+ reads bias at .*a frozen table"):
        shifted(q, q, q, torch.randn(1, 6, 6, requires_grad=True))


@pytest.mark.parametrize("name", LOWERED)
def test_the_backward_streams_once_per_direction_and_once_per_key_term(name):
    """Deferral carries over to the adjoint: the row terms reduce over f only, so dQ streams n once and
    dK/dV streams m once; a multi-pass forward's key terms (adjoints of its earlier passes' sums) take one
    pass over n each level, made by the keys kernels."""
    g = op(name).backward.gradient.cascade
    keys = len(op(name).backward.parts.keys)
    assert keys == (name in ("post_norm_threshold", "renorm_threshold"))
    assert count_passes(g, "n").passes == 1 + keys
    assert count_passes(g, "m").passes == 1


def test_softmax_saves_only_per_row_states():
    g = op("softmax").backward.gradient
    assert [(s.name, s.ranks) for s in g.saved] == [("top2_raw", ("b", "h", "m")), ("den", ("b", "h", "m"))]
    assert g.output == "o"  # the row term Σ_f d_o·o/den reads the output, not the accumulator
    # in FlashAttention's form the pair kernels read two row terms that the rows kernel computes from the saved
    # states: lse2 = max + log2 den, and Σ_f d_o·−o (the row sum cancelled); see the next test
    parts = op("softmax").backward.parts
    assert parts.row_terms == ("lse2", "d_den__scaled")
    assert format_expr(parts.rows.producer("lse2").expr) == "top2[m] + log(den[m])·1.4426950408889634"
    assert format_expr(parts.rows.producer("d_den__scaled").expr) == "d_o[m,f]·-1·o[m,f]"


@pytest.mark.parametrize("name", LOWERED)
@pytest.mark.parametrize("needed", [None, ("q",), ("k",)], ids=["all", "q", "k"])
def test_backward_rewrites_keep_the_gradient(name, needed):
    """FlashAttention's form, row reciprocals, folded scalar chains and scalars after sums
    (einflash.compiler.runtime.backward), both sides run on the reference executor: the same partials. Scalars
    move after a sum only where the summand has no other reader, as in the gradients of q or k alone."""
    given, params = inputs(name, SHAPE, torch.float64), TUNED.get(name, {})
    o = op(name)
    g, c = o.backward.gradient, o.forward.rewritten
    if needed is not None:
        g = restrict(g, frozenset(needed))
    values = bind_params(c, params, bind_extents(c, given, params))
    saved = saved_states(g, c, given, values)
    out = o.reference(**given, **params)
    d_o = torch.randn_like(out)
    want = reference_partials(g, given, values, d_o, out, saved)
    rewritten = dataclasses.replace(
        g, cascade=scalars_after_sums(fold_scalar_chains(row_reciprocals(normalised_exponentials(g.cascade))))
    )
    got = reference_partials(rewritten, given, values, d_o, out, saved)
    assert got.keys() == want.keys()
    for p in want:
        torch.testing.assert_close(got[p], want[p], rtol=1e-12, atol=1e-12, msg=p)


def test_scalars_move_after_the_sums_of_q_and_k():
    parts = op("causal").backward.parts
    for part, name in ((parts.kv, "d_k"), (parts.q, "d_q")):
        assert format_expr(part.producer(name).expr) == f"{name}__sum[{'n' if name == 'd_k' else 'm'},e]·scale"
        assert format_expr(part.producer("d_s_raw").expr) == "d_exp__scaled[m,n]·p[m,n]"


def test_the_dkdv_kernel_divides_by_no_row_and_its_constants_cancel():
    kv = op("softmax").backward.parts.kv
    pair = [e for e in kv.einsums if {"m", "n"} <= set(e.iteration_ranks)]
    assert not any(isinstance(x, Call) and x.op == "div" for e in pair for x in walk(e.expr))
    d_dot = kv.producer("d_dot_e")
    assert format_expr(d_dot.expr) == "d_num__scaled[m,n]·p[m,n]"  # ln 2 · log2 e = 1; the scale after the sum
    assert format_expr(kv.producer("p").expr) == "exp2(s2[m,n] − lse2[m])"


def test_outputs_that_mix_streams_save_their_accumulators():
    """o = acc₁/den₁ − λ·acc₂/den₂ cannot give back each stream's normalised output: both are saved."""
    saved = [s.name for s in op("differential").backward.gradient.saved]
    assert {"dot_n_acc", "dot_n2_acc"} <= set(saved)


@pytest.mark.parametrize(
    "operator, derivative",
    [
        ("sigmoid", "y[m] − y[m]·y[m]"),
        ("tanh", "1 − y[m]·y[m]"),
        ("exp", "y[m]"),
        ("exp2", "0.6931471805599453·y[m]"),
        ("log", "1/x[m]"),
        ("abs", "sign(x[m])"),
        ("relu", "where(x[m] > 0, 1, 0)"),
    ],
)
def test_operator_derivatives_are_written_with_the_operators_value(operator, derivative):
    x, y = Read("x", (coord("m"),)), Read("y", (coord("m"),))
    assert format_expr(local_derivative(call(operator, x), 0, y)) == derivative


@ef.attention
def _featured(q, k, v, decay: ef.Tensor["h"]):  # noqa: F821
    """Feature maps on both sides beside a decay: A = relu(q) + 1, B = exp(k / 2)."""
    return ef.mask((ef.relu(q) + 1.0) @ ef.exp(k * 0.5) * ef.exp((ef.m - ef.n) * ef.log(decay)), ef.n <= ef.m) @ v


@pytest.mark.parametrize("which", ["causal_linear", "plain", "featured", "anticausal"])
def test_the_chunked_gradient_is_the_cascades_gradient(which):
    """The three derived attentions (run by the reference executor) and the chain rule through A, B and the decay's
    exponent give the gradient autograd takes of the cascade as written: GQA 4:2, float64; under the mask n ≥ m
    the derived attentions' masks trade places."""
    from einflash.compiler.autodiff.chunked import chunked_gradient, chunked_gradients
    from einflash.ir.reference import run_reference

    attention = {
        "causal_linear": op("causal_linear"),
        "plain": plain_causal_linear,
        "featured": _featured,
        "anticausal": anticausal_decay,
    }[which]
    torch.manual_seed(0)
    f64 = {"dtype": torch.float64}
    given = {
        "q": torch.randn(1, 4, 13, 5, **f64),
        "k": torch.randn(1, 2, 13, 5, **f64),
        "v": torch.randn(1, 2, 13, 3, **f64),
    }
    if which != "plain":
        given["decay"] = 0.8 + 0.2 * torch.rand(4, **f64)
    leaves = {n: x.clone().requires_grad_() for n, x in given.items()}
    out = run_reference(attention.cascade, leaves)
    d_o = torch.randn_like(out)
    out.backward(d_o)
    g = chunked_gradient(attention.cascade)
    assert g is not None
    got = chunked_gradients(g, given, {}, d_o, lambda c, t, dtype: run_reference(c, t), frozenset(given))
    for n, x in leaves.items():
        torch.testing.assert_close(got[n], x.grad, rtol=1e-10, atol=1e-10, msg=n)


@ef.attention
def _normalised_linear(q, k, v):
    """Linear attention normalised by its weights' row sums: two summaries of the keys (E×F and E)."""
    a = ef.einsum("m e, n e -> m n", ef.relu(q) + 1.0, ef.relu(k) + 1.0)
    return (a @ v) / a.sum("n")


@pytest.mark.parametrize("name", [*STAGED, "normalised_linear"])
def test_the_stages_gradient_is_the_cascades_gradient(name):
    """Both stages differentiated by autograd on the reference (the summaries handed on as the query stage's inputs)
    give the gradient autograd takes of the cascade as written, whose weights are M×N: GQA 4:2, float64."""
    from einflash.compiler.autodiff.stages import stage_gradients

    attention = _normalised_linear if name == "normalised_linear" else op(name)
    shape = ef.Shape(B=2, Hq=4, M=11, N=13, E=8, F=6, Hkv=2)
    given = inputs("softmax", shape, torch.float64) | (
        {"agent": torch.randn(2, 4, 3, 8, dtype=torch.float64)} if name == "agent" else {}
    )
    d_o = torch.randn_like(attention.reference(**given))
    want = reference_gradients(attention, d_o, **given)
    c = attention.forward.rewritten
    values = bind_params(c, {}, bind_extents(c, given, {}))
    got = stage_gradients(attention.forward.stages, given, values, d_o, frozenset(given) - {"v"})
    assert got["v"] is None
    for n in set(given) - {"v"}:
        torch.testing.assert_close(got[n], want[n], rtol=1e-10, atol=1e-10, msg=n)


def test_gates_over_the_contracted_rank_have_no_chunked_gradient():
    """GLA's factor of both sides runs over e: its gradient is the quadratic backward's."""
    from einflash.compiler.autodiff.chunked import chunked_gradient

    assert chunked_gradient(op("gla").cascade) is None
    assert chunked_gradient(op("causal").cascade) is None


def test_explain_says_how_the_two_stages_train():
    """explain() names the backward of two stages (torch's autograd over them) and MoBA's refusal."""
    from einflash.compiler.explain import STAGES_BACKWARD

    assert op("linear").explain().backward == {"error": None, "plan": STAGES_BACKWARD}
    assert "backend='reference'" in op("moba").explain().backward["error"]
    assert "autograd on the reference executor" in str(op("agent").explain())
