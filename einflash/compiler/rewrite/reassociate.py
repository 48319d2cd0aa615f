"""Reassociation: a chain of contractions re-ordered so that no intermediate spans both sequence ranks.

Linear attention written as ``(q·kᵀ)·v`` holds an M×N intermediate; ``q·(kᵀ·v)`` holds an E×F one. Of the
three orders of a three-factor contraction, the one whose intermediate is smallest at long sequence
lengths is chosen (ties: fewer FLOPs).
"""

from __future__ import annotations

import itertools
from dataclasses import replace
from typing import TypeGuard

from ...ir.algebra import product
from ...ir.cascade import Cascade, Einsum, Reducing, Reduction, TensorDecl
from ...ir.expr import Call, Const, Expr, Merge, Read, free_ranks, walk
from ...ir.ranks import coord, rank_order
from .names import fresh_name, ordered_tensors

# -- reassociation ------------------------------------------------------------------------------

# Extents at which contraction orders are compared: long sequences, usual head dims.
_REFERENCE_EXTENT = {"m": 4096, "n": 4096, "e": 128, "f": 128, "b": 1, "h": 1}
_OTHER_EXTENT = 64


def _size(ranks) -> int:
    out = 1
    for r in ranks:
        out *= _REFERENCE_EXTENT.get(r, _OTHER_EXTENT)
    return out


def reassociate(c: Cascade) -> Cascade:
    """Reorder ``Z = Σ (Σ P·Q)·B`` when another order needs a smaller intermediate.

    Applies to a plain sum of products (the inner contraction) every one of whose readers is a sum-of-products
    Einsum that reads it once, at its own coordinates, and gains by another order: the three factors (the inner
    contraction's two and the reader's other one; a plain sum of the inner contraction, ``a.sum("n")``, has
    the factor 1) are contracted in the order whose intermediate is smallest at long sequence lengths (ties:
    fewer FLOPs). Normalised linear attention reads ``a = φ(q)·φ(k)ᵀ`` twice, in ``a·v`` and in ``a.sum("n")``:
    both become reads of summaries of the keys, ``φ(q)·(φ(k)ᵀ·v)`` and ``φ(q)·Σ_n φ(k)``.
    """
    einsums = list(c.einsums)
    for j, a in enumerate(einsums):
        if not _plain_sum(a) or a.out in c.outputs:
            continue
        users = [i for i, e in enumerate(einsums) if any(r.tensor == a.out for r in e.reads())]
        taken: set[str] = set()
        plans = {}
        for i in users:
            plan = _reordered(c, einsums[i], a, taken)
            if plan is None:
                break
            plans[i] = plan
            taken.add(plan[0].out)
        if not users or len(plans) != len(users):
            continue
        out = []
        for i, e in enumerate(einsums):
            out += list(plans[i]) if i in plans else [] if i == j else [e]
        tensors = [t for t in c.tensors if t.name != a.out] + [TensorDecl(m.out, m.ranks) for m, _ in plans.values()]
        return reassociate(replace(c, tensors=tuple(ordered_tensors(tensors, out)), einsums=tuple(out)))
    return c


def _reordered(c: Cascade, e: Einsum, a: Reducing, taken: set[str]) -> tuple[Einsum, Einsum] | None:
    """``e``, a reader of the inner contraction ``a``, as an intermediate of two of the three factors and the
    contraction of it with the third, where that order beats the written one; else None."""
    if not _plain_sum(e) or set(a.reduce.ranks) & e.iteration_ranks:  # two reductions sharing a rank: left alone
        return None
    fs = _operands(e.expr)
    own = tuple(coord(r) for r in a.ranks)
    mine = [f for f in fs if isinstance(f, Read) and f.tensor == a.out]
    if len(mine) != 1 or mine[0].prev or tuple(mine[0].index) != own:
        return None
    if any(r.tensor == a.out for f in fs if f is not mine[0] for r in walk(f) if isinstance(r, Read)):
        return None
    others = [(f, 1) for f in fs if f is not mine[0]] or [(Const(1.0), 1)]
    parts = others + [(x, 1) for x in _operands(a.expr)]
    if len(parts) != 3:
        return None
    best = _best_order(parts, set(e.ranks))
    if best is None:
        return None
    (fa, fb), rest = best
    pair_ranks = free_ranks(fa[0]) | free_ranks(fb[0])
    mid_ranks = rank_order(pair_ranks & (free_ranks(rest[0]) | set(e.ranks)))
    mid_reduced = rank_order(pair_ranks - set(mid_ranks))
    mid = fresh_name(c, "ctx", taken)
    mid_einsum = Einsum(mid, mid_ranks, product(_without_ones([fa, fb])), Reduction("sum", mid_reduced), line=a.line)
    outer = product(_without_ones([rest, (Read(mid, tuple(coord(r) for r in mid_ranks)), 1)]))
    outer_reduced = rank_order((free_ranks(outer)) - set(e.ranks))
    return mid_einsum, Einsum(
        e.out, e.ranks, outer, Reduction("sum", outer_reduced) if outer_reduced else None, line=e.line
    )


def _without_ones(fs: list[tuple[Expr, int]]) -> list[tuple[Expr, int]]:
    """The factors other than the constant 1 (all of them, where that leaves none)."""
    return [f for f in fs if f[0] != Const(1.0)] or fs


def _operands(x: Expr) -> list[Expr]:
    """The operands of a product as written (a quotient stays one operand)."""
    if isinstance(x, Call) and x.op == "mul" and x.merge is Merge.ALL:
        return _operands(x.args[0]) + _operands(x.args[1])
    return [x]


def _plain_sum(e: Einsum) -> TypeGuard[Reducing]:
    return (
        not e.loop
        and e.reduce is not None
        and e.reduce.op == "sum"
        and e.where is None
        and all(not (isinstance(x, Call) and x.merge is Merge.ANY) for x in walk(e.expr))
    )


def _best_order(parts, out_ranks: set[str]):
    """The pair to contract first (and the remaining factor), if it beats the written order."""

    def cost(pair, rest):
        a, b = free_ranks(pair[0][0]), free_ranks(pair[1][0])
        keep = (a | b) & (free_ranks(rest[0]) | out_ranks)
        return (_size(keep), _size(a | b) + _size(keep | free_ranks(rest[0])))

    options = []
    for pair in itertools.combinations(range(3), 2):
        rest = parts[({0, 1, 2} - set(pair)).pop()]
        options.append((cost((parts[pair[0]], parts[pair[1]]), rest), pair, rest))
    written = next(o for o in options if o[1] == (1, 2))  # the inner contraction's two factors
    best = min(options, key=lambda o: o[0])
    if best[0] >= written[0]:
        return None
    return (parts[best[1][0]], parts[best[1][1]]), best[2]
