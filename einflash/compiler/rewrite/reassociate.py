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
from ...ir.expr import Call, Expr, Merge, Read, free_ranks, walk
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

    Applies to a sum-of-products Einsum that reads, once and at its own
    coordinates, an intermediate that is itself a plain sum of products used
    nowhere else. The three factors are contracted in the order whose
    intermediate is smallest at long sequence lengths (ties: fewer FLOPs).
    """
    einsums = list(c.einsums)
    tensors = list(c.tensors)
    for i, e in enumerate(einsums):
        if not _plain_sum(e):
            continue
        fs = [(x, 1) for x in _operands(e.expr)]
        for f, k in fs:
            inner = _inner_contraction(c, einsums, f, k, e)
            if inner is None:
                continue
            j, a = inner
            if set(a.reduce.ranks) & e.iteration_ranks:
                continue  # the two reductions share a rank name; leave it alone
            parts = [g for g in fs if g != (f, k)] + [(x, 1) for x in _operands(a.expr)]
            if len(parts) != 3:
                continue
            best = _best_order(parts, set(e.ranks))
            if best is None:
                continue
            (fa, fb), rest = best
            pair_ranks = free_ranks(fa[0]) | free_ranks(fb[0])
            mid_ranks = rank_order(pair_ranks & (free_ranks(rest[0]) | set(e.ranks)))
            mid_reduced = rank_order(pair_ranks - set(mid_ranks))
            mid = fresh_name(c, "ctx", {t.name for t in tensors})
            mid_einsum = Einsum(mid, mid_ranks, product([fa, fb]), Reduction("sum", mid_reduced), line=a.line)
            mid_read = Read(mid, tuple(coord(r) for r in mid_ranks))
            outer = product([rest, (mid_read, 1)])
            outer_reduced = rank_order((free_ranks(outer)) - set(e.ranks))
            new_e = Einsum(
                e.out, e.ranks, outer, Reduction("sum", outer_reduced) if outer_reduced else None, line=e.line
            )
            einsums = einsums[:j] + einsums[j + 1 : i] + [mid_einsum, new_e] + einsums[i + 1 :]
            tensors = [t for t in tensors if t.name != a.out] + [TensorDecl(mid, mid_ranks)]
            return reassociate(replace(c, tensors=tuple(ordered_tensors(tensors, einsums)), einsums=tuple(einsums)))
    return c


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


def _inner_contraction(c: Cascade, einsums, f, k, consumer) -> tuple[int, Reducing] | None:
    if k != 1 or not isinstance(f, Read) or f.prev:
        return None
    j = next((j for j, x in enumerate(einsums) if x.out == f.tensor), None)
    if j is None:
        return None
    inner = einsums[j]
    if not _plain_sum(inner) or tuple(f.index) != tuple(coord(r) for r in inner.ranks):
        return None
    users = [x for x in einsums if any(r.tensor == f.tensor for r in x.reads())]
    if users != [consumer] or f.tensor in c.outputs:
        return None
    return j, inner


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
