"""Composing a gather before the kernel: a table read at an entry of an integer input becomes one table.

T5's bias reads ``table[h, bucket[n − m + M − 1]]``: per score element, a load of the bucket and then a load of
the table at it, the second waiting on the first. Both are functions of the offset alone, so the table read
through the buckets, ``table_at_bucket[h, d] = table[h, bucket[d]]``, is a table of the buckets' extent (M + N − 1
entries per head here) that the run time makes before the launch, once per call (one small gather in PyTorch); the
kernel then reads it at the offset, ``table_at_bucket[h, n − m + M − 1]``, one load per element as a
relative-position table is read. Kernels are generated from the composed cascade; a call makes each
``Composition`` from its inputs (``Composition.make``) and passes it beside them.

A read is composed where one of its index entries is a whole gathered entry ``G[e]`` of an integer input ``G``
of one rank, and its other entries hold no gather. The composed table has the read tensor's ranks, the gathered
one replaced by G's.

>>> import einflash as ef
>>> @ef.attention
... def t5(q, k, v, table: ef.Tensor["h r"], bucket: ef.Tensor["d"]):  # noqa: F722 -- rank names
...     return ef.softmax(q @ k + table[bucket[ef.n - ef.m + ef.M - 1]], "n") @ v
>>> composed, made = compose_gathers(t5.cascade)
>>> made
(Composition(name='table_at_bucket', table='table', index='bucket', axis=1),)
>>> [str(r) for e in composed.einsums for r in e.reads() if r.tensor.startswith("table")]
["Read(tensor='table_at_bucket', index=(h, M - m + n - 1), prev=False)"]
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import sympy
import torch

from ...ir.cascade import Cascade, Einsum, Role, TensorDecl
from ...ir.expr import Expr, Read, gathered_entries, transform
from .names import fresh_name


@dataclass(frozen=True)
class Composition:
    """``name`` is ``table`` read along its dimension ``axis`` at every entry of the 1-D integer input ``index``."""

    name: str
    table: str
    index: str
    axis: int

    def make(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The composed table from a call's inputs (the index's entries were checked within the table)."""
        return inputs[self.table].index_select(self.axis, inputs[self.index].reshape(-1).long()).contiguous()


def compose_gathers(c: Cascade) -> tuple[Cascade, tuple[Composition, ...]]:
    """``c`` with each composable read (see the module docstring) reading its composed table, and the tables to
    make; ``c`` itself and no composition where there is none."""
    made = compositions(c)
    return composed(c, made), made


def compositions(c: Cascade) -> tuple[Composition, ...]:
    """The composed tables of ``c``'s composable reads, one per (table, index, axis), named afresh in ``c``."""
    inputs = {t.name: t for t in c.inputs}
    made: dict[tuple[str, str, int], Composition] = {}
    for e in c.einsums:
        for x in e.reads():
            at = _composable(x, inputs)
            if at is not None and (x.tensor, *at[:2]) not in made:
                name = fresh_name(c, f"{x.tensor}_at_{at[0]}", {m.name for m in made.values()})
                made[x.tensor, at[0], at[1]] = Composition(name, x.tensor, at[0], at[1])
    return tuple(made.values())


def composed(c: Cascade, made: tuple[Composition, ...]) -> Cascade:
    """``c`` reading the composed tables ``made`` where it reads their tables through their indices (their
    declarations added where ``c`` has the table and the index)."""
    mine = tuple(m for m in made if c.has_tensor(m.table) and c.has_tensor(m.index) and not c.has_tensor(m.name))
    if not mine:
        return c
    einsums = tuple(read_composed(e, c, mine) for e in c.einsums)
    return replace(c, tensors=(*c.tensors, *(composed_decl(c, m) for m in mine)), einsums=einsums)


def composed_decl(c: Cascade, m: Composition) -> TensorDecl:
    """The declaration of a composed table: the table's ranks, the composed one the index's."""
    table, index = c.tensor(m.table), c.tensor(m.index)
    ranks = tuple(index.ranks[0] if j == m.axis else r for j, r in enumerate(table.ranks))
    return TensorDecl(m.name, ranks, Role.INPUT, table.layout)


def read_composed(e: Einsum, c: Cascade, made: tuple[Composition, ...]) -> Einsum:
    """``e`` reading the composed tables ``made`` where it reads a table through their index."""
    inputs = {t.name: t for t in c.inputs}
    by = {(m.table, m.index, m.axis): m for m in made}

    def swap(x: Expr) -> Expr | None:
        if not isinstance(x, Read):
            return None
        at = _composable(x, inputs)
        m = None if at is None else by.get((x.tensor, at[0], at[1]))
        if m is None or at is None:
            return None
        return replace(x, tensor=m.name, index=tuple(at[2] if j == m.axis else i for j, i in enumerate(x.index)))

    where = None if e.where is None else transform(e.where, swap)
    return replace(e, expr=transform(e.expr, swap), where=where)


def _composable(x: Read, inputs: dict[str, TensorDecl]) -> tuple[str, int, sympy.Expr] | None:
    """(the index input, the axis it indexes, the position it is read at) of a composable read, or None."""
    if x.tensor not in inputs:
        return None
    for axis, entry in enumerate(x.index):
        gathers = gathered_entries(sympy.sympify(entry))
        others = [i for j, i in enumerate(x.index) if j != axis]
        if len(gathers) != 1 or gathers[0][0] != entry or any(gathered_entries(sympy.sympify(i)) for i in others):
            continue
        through = gathers[0][1]
        index = inputs.get(through.tensor)
        if index is not None and len(index.ranks) == 1 and len(through.index) == 1:
            return index.name, axis, through.index[0]
    return None
