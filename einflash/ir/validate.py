"""Validation of a cascade: every rule a well-formed cascade obeys, with typed errors.

>>> from einflash.ir.cascade import Cascade
>>> validate(Cascade("empty", (), (), (), (), ()))
"""

from __future__ import annotations

import networkx as nx
import sympy

from ..errors import (
    CascadeError,
    CycleError,
    RankMismatchError,
    UnknownRankError,
    UnknownTensorError,
    UnsupportedOperatorError,
)
from .cascade import Cascade, Einsum, Role, loop_blocks
from .expr import Call, Param, Read, free_ranks, index_ranks, is_boolean
from .operators import OPERATORS, REDUCERS
from .ranks import PARALLEL, RankRole


def validate(c: Cascade, contract: bool = True) -> None:
    """Raise the first violated rule as a CascadeError subclass naming its line.

    ``contract``: the outputs must be attention outputs ``o[m, f]``; a gradient cascade, whose
    outputs are gradients of inputs of any shape, is validated with ``contract=False``.
    """
    _check_declarations(c)
    for e in c.einsums:
        _check_einsum(c, e)
    _check_acyclic(c)
    _check_order(c)
    if contract:
        _check_outputs(c)
    else:
        for o in c.outputs:
            if not c.has_tensor(o):
                raise UnknownTensorError(f"output {o!r} is not declared", c.source)


def _check_declarations(c: Cascade) -> None:
    seen: set[str] = set()
    for t in c.tensors:
        if t.name in seen:
            raise CascadeError(f"tensor {t.name!r} is declared twice", c.source)
        seen.add(t.name)
        for r in t.ranks:
            if not c.has_rank(r):
                raise UnknownRankError(
                    f"tensor {t.name!r} has rank {r!r}, which the cascade does not declare", c.source
                )
    for t in c.tensors:
        made = c.producers(t.name)
        if t.role is Role.INPUT and made:
            raise CascadeError(f"input {t.name!r} is assigned by an Einsum; inputs are read-only", c.where(made[0]))
        if t.role in (Role.INTERMEDIATE, Role.OUTPUT) and len(made) > 1:
            raise CascadeError(
                f"tensor {t.name!r} is assigned {len(made)} times; only states may be updated", c.where(made[1])
            )
    loops = [k for k, _ in loop_blocks(c.einsums) if k]
    if loops != list(range(1, len(loops) + 1)):
        raise CascadeError(
            f"the loops over n must be numbered 1, 2, ... in order, each one contiguous block; found {loops}",
            c.source,
        )


def _check_einsum(c: Cascade, e: Einsum) -> None:
    where = c.where(e)
    if not c.has_tensor(e.out):
        raise UnknownTensorError(f"Einsum assigns {e.out!r}, which is not declared", where)
    nodes = e.nodes()
    declared = {p.name for p in c.params}
    for x in nodes:
        if isinstance(x, Call):
            op = OPERATORS.get(x.op)
            if op is None:
                raise UnsupportedOperatorError(f"unknown operator {x.op!r}; supported: {sorted(OPERATORS)}", where)
            if len(x.args) != op.arity:
                raise UnsupportedOperatorError(f"{x.op} takes {op.arity} arguments, got {len(x.args)}", where)
        elif isinstance(x, Param) and x.name not in declared:
            raise CascadeError(f"parameter {x.name!r} is not declared; declared: {sorted(declared)}", where)
        elif isinstance(x, Read):
            _check_read(c, e, x, where)
    its = e.iteration_ranks
    for r in its:
        if not c.has_rank(r):
            raise UnknownRankError(f"rank {r!r} is not declared by any tensor", where)
    reduced: tuple[str, ...] = ()
    if e.reduce is not None:
        if e.reduce.op not in REDUCERS:
            raise UnsupportedOperatorError(f"unknown reducer {e.reduce.op!r}; supported: {sorted(REDUCERS)}", where)
        reduced = e.reduce.ranks
        if REDUCERS[e.reduce.op].lists:
            _check_list(c, e, where)
        body = its - frozenset(e.ranks)
        for r in reduced:
            if r not in body:
                raise UnknownRankError(
                    f"{e.reduce.op} reduces over rank {r!r}, which the expression "
                    f"({', '.join(sorted(body))}) does not have",
                    where,
                )
    expected = its - frozenset(reduced)
    if frozenset(e.ranks) != expected or c.tensor(e.out).ranks != e.ranks:
        raise RankMismatchError(
            f"{e.out!r} has ranks ({', '.join(e.ranks)}) but its right-hand side gives ({', '.join(sorted(expected))})",
            where,
        )
    if e.where is not None and not is_boolean(e.where):
        raise CascadeError("a mask must be a predicate (a comparison, or & | ~ of comparisons)", where)


def _check_list(c: Cascade, e: Einsum, where: str) -> None:
    """A top list's Einsum lists along one LIST rank its body does not have, as long as its k."""
    body = free_ranks(e.expr) | (free_ranks(e.where) if e.where is not None else frozenset())
    lists = [r for r in e.ranks if c.has_rank(r) and c.rank(r).role is RankRole.LIST and r not in body]
    k = e.reduce.arg if e.reduce is not None else None
    if len(lists) != 1 or k is None or sympy.sympify(c.rank(lists[0]).extent) != int(k):
        raise CascadeError(
            f"{e.out}: a top list needs one LIST rank its body does not have, of extent k ({k}); got {lists}", where
        )


def _check_read(c: Cascade, e: Einsum, x: Read, where: str) -> None:
    if not c.has_tensor(x.tensor):
        raise UnknownTensorError(
            f"reads {x.tensor!r}, which is not declared; tensors: {sorted(t.name for t in c.tensors)}", where
        )
    decl = c.tensor(x.tensor)
    if len(x.index) != len(decl.ranks):
        raise RankMismatchError(
            f"{x.tensor!r} has {len(decl.ranks)} ranks ({', '.join(decl.ranks)}), read with {len(x.index)} indices",
            where,
        )
    for r in index_ranks(x.index):
        if not c.has_rank(r):
            raise UnknownRankError(f"index of {x.tensor!r} uses rank {r!r}, which is not declared", where)
    if x.prev and not (decl.role is Role.STATE and e.loop):
        raise CascadeError(f"only a loop Einsum may read the previous value of a state; {x.tensor!r}", where)


def _check_acyclic(c: Cascade) -> None:
    g = c.graph()
    try:
        cycle = nx.find_cycle(g)
    except nx.NetworkXNoCycle:
        return
    path = " → ".join(c.einsums[u].out for u, _ in cycle) + f" → {c.einsums[cycle[0][0]].out}"
    raise CycleError(f"the Einsums form a cycle: {path}", c.where(c.einsums[cycle[0][0]]))


def _check_order(c: Cascade) -> None:
    """Einsums run in order, so a value is assigned before it is read (states start from their init)."""
    assigned = {t.name for t in c.inputs}
    for e in c.einsums:
        for r in e.reads():
            if not r.prev and r.tensor not in assigned and c.tensor(r.tensor).role is not Role.STATE:
                raise CascadeError(
                    f"{e.out!r} reads {r.tensor!r} before the Einsum that assigns it; move that Einsum up", c.where(e)
                )
        assigned.add(e.out)


def _check_outputs(c: Cascade) -> None:
    """The first output is the attention output ``o[m, f]``; any further one is per row, ``lse[m]``."""
    for i, o in enumerate(c.outputs):
        if not c.has_tensor(o):
            raise UnknownTensorError(f"output {o!r} is not declared", c.source)
        ranks = [r for r in c.tensor(o).ranks if r not in PARALLEL]
        if i > 0 and ranks != ["m"]:
            raise RankMismatchError(
                f"output {o!r} after the first must be per query row, like lse[m]; it has ({', '.join(ranks)})",
                c.source,
            )
        if i == 0 and ("m" not in ranks or len(ranks) != 2):
            made = c.producer(o)
            raise RankMismatchError(
                f"the output must have the query rank m and one value rank, like o[m,f]; it has ({', '.join(ranks)})",
                c.where(made) if made else c.source,
            )
