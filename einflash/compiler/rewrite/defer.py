"""FuseMax's deferral: factors that wait for a full reduction over n move out of a sum over n.

``Σ_n num/den·v`` becomes ``(Σ_n num·v)/den``: multiplication distributes over the sum, and the division
by the row normaliser then happens once per row after the contraction, not once per element before it,
which removes a pass (the sum can run while ``den`` is still being reduced).

>>> import einflash as ef
>>> from einflash.compiler.analysis.key_passes import count_passes
>>> @ef.attention
... def naive(q, k, v):
...     s = q @ k
...     num = ef.exp(s - s.max("n"))
...     return num / num.sum("n") @ v
>>> count_passes(naive.cascade).passes, count_passes(defer_normalisation(naive.cascade)).passes
(3, 2)
"""

from __future__ import annotations

from dataclasses import replace

from ...ir.algebra import factors, product
from ...ir.cascade import Cascade, Einsum, TensorDecl
from ...ir.expr import Read, free_ranks, reads
from ...ir.ranks import STREAM, coord, rank_order
from ..analysis.key_passes import late_tensors
from .names import fresh_name, ordered_tensors


def defer_normalisation(c: Cascade) -> Cascade:
    """Move late factors out of sums over n; a sum ``o`` becomes ``o_acc`` then ``o = o_acc·factors``.

    A factor moves when it has none of the reduced ranks and reads a value that
    needs a full reduction over n; multiplication distributes over the sum, so
    both sides are equal (an empty fiber is absent on both sides).
    """
    late = late_tensors(c)
    out: list[Einsum] = []
    tensors = list(c.tensors)
    for e in c.einsums:
        red = e.reduce
        if e.loop or red is None or red.op != "sum" or STREAM not in red.ranks or e.where is not None:
            out.append(e)
            continue
        fs = factors(e.expr)
        moved = [
            (f, k) for f, k in fs if not (free_ranks(f) & set(red.ranks)) and any(r.tensor in late for r in reads(f))
        ]
        if not moved:
            out.append(e)
            continue
        kept = [(f, k) for f, k in fs if (f, k) not in moved]
        body = product(kept)
        acc_ranks = rank_order(free_ranks(body) - set(red.ranks))
        acc = fresh_name(c, f"{e.out}_acc")
        tensors.append(TensorDecl(acc, acc_ranks))
        out.append(Einsum(acc, acc_ranks, body, red, line=e.line))
        acc_read = Read(acc, tuple(coord(r) for r in acc_ranks))
        out.append(Einsum(e.out, e.ranks, product([(acc_read, 1)] + moved), line=e.line))
    return replace(c, tensors=tuple(ordered_tensors(tensors, out)), einsums=tuple(out))
