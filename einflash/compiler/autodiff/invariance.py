"""The reductions that get no gradient, and the proof that they need none.

A max (or min) over n whose shift leaves the output unchanged gets no gradient. That is proved, not
assumed: every sum over n that reads it must be rescaled by a correction factor (``algebra.correction``)
when it shifts, and the output must be invariant under those rescalings (checked by sympy). The same proof over
another rank covers a max over it (a softmax over the head dimension, ``ef.softmax(q, "e")``): the sums over that
rank take the factors.

A reduction whose value reaches the output only through tests (a mask ``s ≥ kth_largest``, a comparison inside
a ``where``) gets none either: a test is piecewise constant, so its derivative is 0 almost everywhere, as
autograd takes a comparison's. Its value is then a constant of the proof of the others.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NoReturn

import sympy

from ...errors import DifferentiationError
from ...ir.algebra import correction
from ...ir.cascade import Cascade, Reducing, Role
from ...ir.expr import Call, Expr, Read, reads, to_sympy
from ...ir.operators import OPERATORS
from ...ir.printer import format_expr
from ...ir.ranks import STREAM, coord
from ...ir.user_ops import DEFINITIONS
from ..rewrite.online import inline_body
from .derivatives import ONE, reduction_derivative


@dataclass(frozen=True)
class Invariance:
    """Why a reduction over a rank (n, or another) gets no gradient: each sum over that rank reading it is rescaled
    by a factor."""

    reduction: str
    op: str
    line: int | None
    factors: tuple[tuple[str, str], ...]  # (sum over the rank, its correction factor as text)
    tested: bool = False  # read only by tests: no shift of it that is small enough changes the output
    rank: str = STREAM

    def __str__(self) -> str:
        at = f" (line {self.line})" if self.line else ""
        if self.tested:
            return (
                f"{self.reduction}{at}: {self.op} over {self.rank}; only tests (masks, comparisons) read it, and a "
                f"test does not change under a small enough shift of it: no gradient, as autograd gives a comparison"
            )
        sums = " and ".join(s for s, _ in self.factors) or "no sum"
        factors = sorted({f for _, f in self.factors})
        return (
            f"{self.reduction}{at}: {self.op} over {self.rank}; the output does not change when it shifts: {sums} "
            f"{'is' if len(self.factors) == 1 else 'are'} rescaled by {' and '.join(factors) or '1'} and the "
            f"output is invariant under that rescaling"
        )


def _row_constant(c: Cascade, name: str, rank: str) -> bool:
    """An input that does not vary along ``rank`` (a per-head sink logit along n)."""
    t = c.tensor(name)
    return t.role is Role.INPUT and rank not in t.ranks


def invariant_reductions(
    c: Cascade, late: list[Reducing], rank: str = STREAM
) -> tuple[frozenset[str], tuple[Invariance, ...]]:
    """Non-sum reductions over ``rank`` (``late``: every reduction over it) whose shift provably leaves the output
    unchanged, with the values computed from them: their adjoints are zero. Raises DifferentiationError when the
    proof fails."""
    shifted = [e for e in late if reduction_derivative(e) is None]
    tested = [e for e in shifted if only_tested(c, e.out)]
    for reduction in tested:
        _no_self_test(c, reduction)
    shifted = [e for e in shifted if e not in tested]
    zero = set().union(*(_tested_values(c, e.out) for e in tested))
    skipped = tuple(Invariance(e.out, e.reduce.op, e.line, (), tested=True, rank=rank) for e in tested)
    if not shifted:
        return frozenset(zero), skipped
    derived = {e.out for e in shifted}
    for e in c.einsums:  # row values computed from them and constants of the row (top2 = top2_raw·scale·log2 e,
        # max(top, sink[h]))
        read = e.reads()
        if (
            rank not in e.iteration_ranks
            and e.out not in derived
            and any(r.tensor in derived for r in read)
            and all(r.tensor in derived or _row_constant(c, r.tensor, rank) for r in read)
        ):
            derived.add(e.out)
    late_names = {e.out for e in late}
    pair_maps = {e.out for e in c.einsums if e.reduce is None and rank in e.iteration_ranks}

    def fail(why: str) -> NoReturn:
        names = ", ".join(f"{e.out} (a {e.reduce.op} over {rank})" for e in shifted)
        own = [e.reduce.op for e in shifted if e.reduce.op in DEFINITIONS]
        hint = (
            f"; a reducer of your own ({', '.join(own)}) is differentiable with its derivative declared: "
            f"ef.reducer(..., derivative=...)"
            if own
            else ""
        )
        raise DifferentiationError(
            f"{c.name}: cannot prove that the output is invariant to shifts of {names} "
            f"({why}); the gradient through a reduction over {rank} other than a sum is "
            f"implemented only where that invariance holds (the max of a softmax){hint}"
        )

    factors: dict[str, Expr] = {}
    bodies: dict[str, Expr] = {}
    row_maps = {e.out for e in c.einsums if rank not in e.iteration_ranks and e.reduce is None}
    for e in late:
        # the row values computed from the shifted reductions are written out in them, in the sums as in the
        # output below, so that a shift moves them as it does (max(top, sink) moves with top only above the sink);
        # so are those computed from sums of an earlier pass, which the shift rescales by their factors
        body = inline_body(c, e, late_names, pair_maps | row_maps)
        used = {r.tensor for r in reads(body) if r.tensor in derived}
        rescaled = {r.tensor: factors[r.tensor] for r in reads(body) if r.tensor in factors}
        hidden = [
            r.tensor
            for r in reads(body)
            if r.tensor not in derived | set(factors)
            and c.tensor(r.tensor).role is not Role.INPUT
            and c.depends_on(r.tensor, derived)
        ]
        if hidden:
            fail(f"{e.out} reads {hidden[0]}, which depends on them through a reduction")
        if e.reduce.op != "sum" and reduction_derivative(e) is None:
            if used - {e.out}:
                fail(f"{e.out} is a {e.reduce.op} of values that depend on them")
            continue
        r = correction(body, used, {rank}, rescaled) if used or rescaled else ONE
        if r is None:
            fail(f"{e.out} is not rescaled by a factor independent of {rank} when they shift")
        if e.reduce.op != "sum" and r != ONE:  # a reducer of your own: its result need not scale with its body
            fail(f"{e.out} is a {e.reduce.op} of values that a shift rescales")
        factors[e.out], bodies[e.out] = r, body
    out = c.producer(c.outputs[0])
    assert out is not None, c.outputs[0]  # a valid cascade computes its output
    expr = (
        inline_body(c, out, late_names, row_maps)
        if out.out not in late_names
        else Read(out.out, tuple(coord(r) for r in out.ranks))
    )
    # what a shift moves: the shifted values and the sums it rescales (a sum over the rank that it leaves as it is, a
    # contraction q·k over e beside a softmax over e, moves nothing that reads it)
    moved = derived | {s for s, f in factors.items() if f != ONE}
    for r in reads(expr):
        if (
            r.tensor not in late_names | derived
            and c.tensor(r.tensor).role is not Role.INPUT
            and c.depends_on(r.tensor, moved)
        ):
            fail(f"the output reads {r.tensor}, a reduction of values that depend on them")
    symbols: dict = {}

    def leaf(phase: str):
        def fn(x):
            key = x
            if isinstance(x, Read) and x.tensor in derived:
                key = (x.tensor, x.index, "old" if (phase == "old" or x.prev) else "new")
            elif isinstance(x, Read):
                key = Read(x.tensor, x.index)
            if key not in symbols:
                symbols[key] = sympy.Symbol(f"z{len(symbols)}", real=True)
            sym = symbols[key]
            if phase == "new" and isinstance(x, Read) and x.tensor in factors and not x.prev:
                return sym * to_sympy(factors[x.tensor], leaf("factor"))
            return sym

        return fn

    old = to_sympy(expr, leaf("old"))
    new = to_sympy(expr, leaf("new"))
    # a maximum (minimum) of row values is one value wherever it appears: naming each one lets sympy cancel the
    # exponentials of it (exp(sink − max(top, sink)) against the correction exp(max_old − max_new))
    extrema = {x: sympy.Symbol(f"x{i}", real=True) for i, x in enumerate((old - new).atoms(sympy.Max, sympy.Min))}
    if sympy.simplify((new - old).xreplace(extrema)) != 0:
        fail(f"the output changes when the sums over {rank} are rescaled")

    proofs = []
    for e in shifted:
        mine = {x.out for x in c.einsums if x.out in derived and (x.out == e.out or c.depends_on(x.out, {e.out}))}
        readers = [
            (s, format_expr(r))
            for s, r in factors.items()
            if r != ONE and any(t.tensor in mine for t in reads(bodies[s]))
        ]
        proofs.append(Invariance(e.out, e.reduce.op, e.line, tuple(readers), rank=rank))
    return frozenset(derived | zero), skipped + tuple(proofs)


def only_tested(c: Cascade, name: str) -> bool:
    """Whether ``name`` reaches the output only through tests: every Einsum that reads it reads it in its mask or
    under a comparison, or is a map of it that is itself only tested (``kth = top[m, k − 1]``)."""
    if name in c.outputs:
        return False
    for x in c.consumers(name):
        passed_on = x.reduce is None and x.where is None and only_tested(c, x.out)
        if not passed_on and any(r.tensor == name for r in _value_reads(x.expr)):
            return False
    return True


def _no_self_test(c: Cascade, e: Reducing) -> None:
    """Refuse a test of a value against its own reduction (``s ≥ s.max("n")``): the reduction's value is one of the
    value's own elements, which the backward recomputes in another order (k·qᵀ, not q·kᵀ), so that element falls
    on either side of the saved threshold. A top list's tests compare with a cut between two scores instead
    (einflash.compiler.rewrite.top_list)."""
    if e.where is not None or not c.is_plain(e.expr):
        return
    assert isinstance(e.expr, Read)  # is_plain
    same, body = _values_of(c, e.out), _values_of(c, e.expr.tensor)
    for x in [y for t in same for y in c.consumers(t)]:
        for y in x.nodes():
            if not (isinstance(y, Call) and OPERATORS[y.op].boolean and len(y.args) == 2):
                continue
            tensors = {a.tensor if isinstance(a, Read) else None for a in y.args}
            if tensors & body and tensors & same:
                raise DifferentiationError(
                    f"{c.where(x)}: a test of a value against its own {e.reduce.op} over n; the backward "
                    f"recomputes the scores in another order, and the element that is the {e.reduce.op} may fall on "
                    f'either side of it: test against a margin (s > s.max("n") - δ), or train with '
                    f"backend='reference'"
                )


def _values_of(c: Cascade, name: str) -> set[str]:
    """``name`` and the maps that are it, read at any position or scaled by constants and parameters (``s`` of
    ``dot_e``: the scale is taken out of a maximum)."""
    out = {name}
    for x in c.consumers(name):
        if x.reduce is None and x.where is None and _scales(x.expr, name):
            out |= _values_of(c, x.out)
    return out


def _scales(x: Expr, name: str) -> bool:
    if isinstance(x, Read):
        return x.tensor == name
    return (
        isinstance(x, Call)
        and x.op == "mul"
        and sum(_scales(a, name) for a in x.args) == 1
        and all(_scales(a, name) or not list(reads(a)) for a in x.args)
    )


def _tested_values(c: Cascade, name: str) -> set[str]:
    """``name`` and the maps of it that only tests read."""
    out = {name}
    for x in c.consumers(name):
        if x.reduce is None and x.where is None and only_tested(c, x.out):
            out |= _tested_values(c, x.out)
    return out


def _value_reads(x: Expr) -> list[Read]:
    """The reads of ``x`` whose values it uses, not those only compared (under a boolean operator)."""
    if isinstance(x, Read):
        return [x]
    if isinstance(x, Call):
        if OPERATORS[x.op].boolean:
            return []
        return [r for a in x.args for r in _value_reads(a)]
    return []
