"""Buffers, FLOPs and bytes as formulas: a one-pass cascade needs tiles and per-row state only,
a multi-pass one a whole fiber of n; FLOPs lead with the two contractions; inputs along n are
read once per pass."""

from __future__ import annotations

import functools

import pytest
import sympy
from catalogue import load_example

import einflash as ef
from einflash.compiler.analysis.cost import BM, BN, ELEM, FP32, STAGES, buffer_needs, cost
from einflash.compiler.analysis.key_passes import count_passes
from einflash.ir.ranks import extent_symbol

B, H, HKV, M, N, E, F = (extent_symbol(s) for s in ("B", "H", "Hkv", "M", "N", "E", "F"))
D = sympy.Symbol("D", integer=True, positive=True)


@functools.cache
def _op(name: str) -> ef.AttentionOp:
    return getattr(load_example(name), name)


def _leading(expr: sympy.Expr, order: int) -> tuple[sympy.Expr, sympy.Expr]:
    """The terms of ``expr`` of degree ``order`` in the sizes M, N, D (E = F = D), and the rest."""
    terms = sympy.Add.make_args(sympy.expand(expr.subs({E: D, F: D})))
    lead = sum((t for t in terms if sympy.Poly(t, M, N, D).total_degree() == order), sympy.Integer(0))
    return lead, sympy.expand(expr.subs({E: D, F: D}) - lead)


def _degree(expr: sympy.Expr) -> int:
    return max((sympy.Poly(t, M, N, D).total_degree() for t in sympy.Add.make_args(sympy.expand(expr))), default=0)


# -- buffers ------------------------------------------------------------------------------------------


def test_streamed_softmax_buffers_do_not_grow_with_n():
    needs = buffer_needs(_op("softmax").forward.rewritten)
    # a q tile, and STAGES pipelined k and v tiles
    assert sympy.expand(needs.smem - ELEM * (BM * E + STAGES * BN * (E + F))) == 0
    # fp32 tiles: scores [BM, BN], the accumulator [BM, F], the row states [BM]
    assert sympy.expand(needs.registers - FP32 * BM * (BN + F + 1)) == 0
    assert needs.fiber == 0 and not needs.grows_with_n
    assert N not in needs.total.free_symbols and M not in needs.total.free_symbols
    assert sympy.expand(needs.total - needs.smem - needs.registers) == 0


def test_written_softmax_holds_a_fiber_of_n():
    c = _op("softmax").cascade
    needs = buffer_needs(c)
    assert needs.grows_with_n
    # s (pass 1 → 2) and num (pass 2 → 3): each a [BM, N] fp32 block kept between passes
    assert [name for name, _, _ in count_passes(c).crossing] == ["num", "s"]
    assert sympy.expand(needs.fiber - 2 * FP32 * BM * N) == 0
    assert sympy.diff(needs.total, N) == 2 * FP32 * BM


@pytest.mark.parametrize("name", ["softmax", "causal", "alibi", "differential", "mla_decode", "sigmoid", "gla"])
def test_one_pass_examples_have_n_free_buffers(name):
    needs = buffer_needs(_op(name).forward.rewritten)
    assert not needs.grows_with_n and N not in needs.total.free_symbols


def test_two_pass_post_normalisation_recomputes_its_scores_instead_of_keeping_a_fiber():
    # the second loop recomputes q·k per key tile (its kernel reads k twice) instead of keeping the row's scores
    c = _op("post_norm_threshold").forward.rewritten
    needs = buffer_needs(c)
    assert count_passes(c).passes == 2 and not count_passes(c).crossing
    assert not needs.grows_with_n and needs.fiber == 0


def test_linear_attention_state_is_d_by_d():
    needs = buffer_needs(_op("linear").forward.rewritten)
    assert not needs.grows_with_n
    # the running state ctx_acc is E×F, whatever M and N
    assert sympy.expand(needs.registers - FP32 * E * (BN + F + 1)) == 0


# -- FLOPs ---------------------------------------------------------------------------------------------


def test_softmax_flops_lead_with_the_two_contractions():
    """q·kᵀ and P·v: a multiply and an add at each (m, n, d) point, twice: 4·B·H·M·N·D."""
    flops = cost(_op("softmax").forward.rewritten).flops
    lead, rest = _leading(flops, 3)
    assert lead == 4 * B * H * M * N * D
    assert _degree(rest) <= 2  # per-score work (exp, max, subtract) and per-row work only
    assert sympy.limit(flops.subs({E: D, F: D, M: D, N: D}) / (4 * B * H * D**3), D, sympy.oo) == 1


def test_deferral_takes_the_division_out_of_the_value_contraction():
    """As written, num/den is evaluated at every (m, n, f): a divide more per point than after the rewrite."""
    lead, _ = _leading(cost(_op("softmax").cascade).flops, 3)
    assert lead == 5 * B * H * M * N * D


def test_one_exponential_per_score():
    trans = cost(_op("softmax").forward.rewritten).transcendentals
    lead, rest = _leading(trans, 2)
    assert lead == B * H * M * N and _degree(rest) <= 1


def test_linear_attention_flops_are_linear_in_each_sequence():
    flops = cost(_op("linear").forward.rewritten).flops
    assert sympy.degree(flops, M) == 1 and sympy.degree(flops, N) == 1
    assert sympy.expand(flops).coeff(M * N) == 0  # no term in M·N: nothing spans both sequences


# -- bytes ---------------------------------------------------------------------------------------------


def _bytes_per_pass(passes: int) -> sympy.Expr:
    """q read and o written once; k and v (with the kv heads) once per pass."""
    return ELEM * (B * H * M * E + passes * B * HKV * N * (E + F) + B * H * M * F)


@pytest.mark.parametrize(
    "name, which, passes",
    [
        ("softmax", "written", 3),
        ("softmax", "streamed", 1),
        ("causal", "streamed", 1),
        ("post_norm_threshold", "streamed", 2),
    ],
)
def test_inputs_along_n_are_read_once_per_pass(name, which, passes):
    op = _op(name)
    c = op.cascade if which == "written" else op.forward.rewritten
    assert count_passes(c).passes == passes
    assert sympy.expand(cost(c).bytes - _bytes_per_pass(passes)) == 0


def test_extra_inputs_count_once():
    c = _op("alibi").forward.rewritten
    assert sympy.expand(cost(c).bytes - _bytes_per_pass(1) - ELEM * H) == 0  # slope[h]
