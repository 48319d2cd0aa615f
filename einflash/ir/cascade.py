"""The cascade: tensors, Einsums and their dependency graph.

An Einsum computes ``out[ranks] = reduce_{r...} expr  :: where``: it evaluates
``expr`` at every point of its iteration space (the ranks of ``expr`` and of the
filter), keeps the points where the filter holds (the others are absent), and
reduces over the named ranks; an empty fiber gives an absent result. Einsums
flagged ``loop`` run once per chunk of the streamed rank ``n``: there ``n`` spans
the current chunk, reductions over ``n`` are chunk-local, and STATE tensors carry
running values from chunk to chunk (``Read(prev=True)`` is the value before the
chunk). Einsums after the loop see the final states.
"""

from __future__ import annotations

import enum
import hashlib
import itertools
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import TypeGuard

import networkx as nx
import sympy

from .expr import Expr, Read, free_ranks, gathered, reads, transform, walk
from .printer import format_cascade
from .ranks import Rank, coord
from .user_ops import DEFINITIONS, user_operators


class Role(enum.Enum):
    INPUT = "input"
    INTERMEDIATE = "intermediate"
    STATE = "state"
    OUTPUT = "output"


class Layout(enum.Enum):
    """How an input tensor is laid out in memory."""

    QUERY = "query"  # [B, Hq, M, d]: ranks (b, h, m, d)
    KEY = "key"  # [B, Hkv, N, d]: ranks (b, h, n, d); query head h reads kv head h // (Hq/Hkv)
    DECLARED = "declared"  # dimensions in the declared rank order, e.g. slope[h], bias[h, m, n]


# The inputs a call gives in one dtype, which the kernels' dots take: every other input keeps its own (fp32 gates
# beside bf16 q, k and v) and is converted where it enters a dot.
ATTENTION_INPUTS = ("q", "k", "v")

# A per-row output's absent elements (rows with no unmasked key) read as this: the log of an empty sum.
ROW_OUTPUT_ABSENT = float("-inf")


@dataclass(frozen=True)
class TensorDecl:
    name: str
    ranks: tuple[str, ...]
    role: Role = Role.INTERMEDIATE
    layout: Layout = Layout.DECLARED
    init: float | None = None  # the fill value kernels give a STATE before the first chunk


@dataclass(frozen=True)
class ParamDecl:
    """A scalar parameter; ``default`` may depend on extents (``scale`` = E**-1/2)."""

    name: str
    default: sympy.Expr | None = None
    integer: bool = False
    positive: bool = False  # checked at call time; lets rewrites move it out of a max
    boolean: bool = False  # declared bool: an integer that is 0 or 1, given as True or False


@dataclass(frozen=True)
class Reduction:
    op: str
    ranks: tuple[str, ...]
    arg: float | None = None  # k of kth_largest


@dataclass(frozen=True)
class Einsum:
    out: str
    ranks: tuple[str, ...]
    expr: Expr
    reduce: Reduction | None = None
    where: Expr | None = None
    # 0: runs once; k: runs per chunk of n in the cascade's k-th loop over n (True is the first: one-pass form)
    loop: int = 0
    line: int | None = field(default=None, compare=False)

    @property
    def iteration_ranks(self) -> frozenset[str]:
        its = free_ranks(self.expr)
        if self.where is not None:
            its |= free_ranks(self.where)
        return its | frozenset(self.ranks)

    def reads(self) -> list[Read]:
        out = list(reads(self.expr))
        if self.where is not None:
            out += list(reads(self.where))
        return out

    def nodes(self) -> list[Expr]:
        """Every node of the value and of the mask."""
        return [*walk(self.expr), *(walk(self.where) if self.where is not None else ())]


class Reducing(Einsum):
    """An Einsum with a reduction: the type :func:`reduces` narrows an Einsum to (none is made as such)."""

    reduce: Reduction


def loop_blocks(einsums) -> list[tuple[int, list[Einsum]]]:
    """``einsums`` in runs: (0, [an Einsum that runs once]) or (k, [the k-th loop's Einsums]), in order.

    >>> from einflash.ir.expr import Const
    >>> es = [Einsum(name, (), Const(1.0), loop=k) for name, k in [("a", 0), ("b", 1), ("c", 1), ("d", 2)]]
    >>> [(k, [e.out for e in b]) for k, b in loop_blocks(es)]
    [(0, ['a']), (1, ['b', 'c']), (2, ['d'])]
    """
    blocks: list[tuple[int, list[Einsum]]] = []
    for e in einsums:
        if e.loop and blocks and blocks[-1][0] == e.loop:
            blocks[-1][1].append(e)
        else:
            blocks.append((int(e.loop), [e]))
    return blocks


def reduces(e: Einsum) -> TypeGuard[Reducing]:
    """Whether ``e`` reduces, said so that a type checker knows ``e.reduce`` is set where it does."""
    return e.reduce is not None


@dataclass(frozen=True)
class Cascade:
    """A validated-or-not cascade of Einsums; frozen, printable, hashable by structure."""

    name: str
    ranks: tuple[Rank, ...]
    tensors: tuple[TensorDecl, ...]
    params: tuple[ParamDecl, ...]
    einsums: tuple[Einsum, ...]
    outputs: tuple[str, ...] = ("o",)  # o[m, f], then any per-row ones (the log-sum-exp: einflash.compiler.rewrite.lse)
    source: str | None = field(default=None, compare=False)  # file of the declaring function

    # -- lookups ---------------------------------------------------------------------

    @cached_property
    def _tensors(self) -> dict[str, TensorDecl]:
        return {t.name: t for t in self.tensors}

    @cached_property
    def _ranks(self) -> dict[str, Rank]:
        return {r.name: r for r in self.ranks}

    def tensor(self, name: str) -> TensorDecl:
        return self._tensors[name]

    def has_tensor(self, name: str) -> bool:
        return name in self._tensors

    def rank(self, name: str) -> Rank:
        return self._ranks[name]

    def has_rank(self, name: str) -> bool:
        return name in self._ranks

    @cached_property  # read on every call's host path: once per cascade, not once per read
    def inputs(self) -> tuple[TensorDecl, ...]:
        return tuple(t for t in self.tensors if t.role is Role.INPUT)

    @cached_property
    def table_ranks(self) -> frozenset[str]:
        """Ranks of inputs that no Einsum iterates: read only at computed positions (``rel[n − m + M − 1]``), so
        their extents bound reads and are no tile's axis."""
        iterated = set().union(*(e.iteration_ranks for e in self.einsums)) if self.einsums else set()
        held = {r for t in self.inputs for r in t.ranks}
        return frozenset(held - iterated - {"b", "h"})

    @cached_property
    def computed_reads(self) -> frozenset[str]:
        """Inputs read somewhere at a position other than a coordinate (an offset, a constant)."""
        names = {t.name for t in self.inputs}
        return frozenset(
            r.tensor
            for e in self.einsums
            for r in e.reads()
            if r.tensor in names and not all(isinstance(i, sympy.Symbol) and i == coord(i.name) for i in r.index)
        )

    @cached_property
    def gathers(self) -> bool:
        """Whether an index gathers through an input's entries (``table[bucket[n − m]]``): its bounds depend on
        data, so every call checks them."""
        return any(next(gathered(r.index), None) is not None for e in self.einsums for r in e.reads())

    @cached_property
    def states(self) -> tuple[TensorDecl, ...]:
        return tuple(t for t in self.tensors if t.role is Role.STATE)

    def producers(self, name: str) -> list[Einsum]:
        return [e for e in self.einsums if e.out == name]

    def producer(self, name: str) -> Einsum | None:
        found = self.producers(name)
        return found[-1] if found else None

    def consumers(self, name: str) -> list[Einsum]:
        return [e for e in self.einsums if any(r.tensor == name for r in e.reads())]

    def depends_on(self, name: str, on: set[str]) -> bool:
        """Whether tensor ``name`` is one of ``on`` or is computed, directly or not, from one of them."""
        seen, todo = set(), [name]
        while todo:
            x = todo.pop()
            if x in on:
                return True
            p = self.producer(x)
            for r in p.reads() if p is not None else ():
                if r.tensor not in seen:
                    seen.add(r.tensor)
                    todo.append(r.tensor)
        return False

    def is_plain(self, x: Expr) -> TypeGuard[Read]:
        """Whether ``x`` reads a whole tensor at its own coordinates (not its value before the current chunk)."""
        return (
            isinstance(x, Read)
            and not x.prev
            and tuple(x.index) == tuple(coord(r) for r in self.tensor(x.tensor).ranks)
        )

    def where(self, einsum: Einsum) -> str:
        """'file:line' of an Einsum, for error messages."""
        src = self.source or self.name
        return f"{src}:{einsum.line}" if einsum.line else f"{src} (einsum {einsum.out!r})"

    # -- structure ---------------------------------------------------------------------

    def graph(self) -> nx.DiGraph:
        """Einsums as nodes (by position), an edge producer → consumer per tensor read.

        Reads of a state's previous value are loop-carried and left out, so the
        graph of a valid cascade is acyclic.
        """
        g = nx.DiGraph()
        for i, e in enumerate(self.einsums):
            g.add_node(i, einsum=e)
        for i, e in enumerate(self.einsums):
            for r in e.reads():
                if r.prev:
                    continue
                # a read refers to the latest producer before it, or to any producer if none precedes
                before = [j for j, p in enumerate(self.einsums[:i]) if p.out == r.tensor]
                src = before[-1] if before else next((j for j, p in enumerate(self.einsums) if p.out == r.tensor), None)
                if src is not None:
                    g.add_edge(src, i, tensor=r.tensor)
        return g

    def canonical(self) -> Cascade:
        """The same cascade with intermediates renamed t1, t2, ... in order of definition."""
        fixed = {t.name for t in self.tensors if t.role in (Role.INPUT, Role.OUTPUT)}
        # an input may itself be called t1: a fresh name equal to it would merge two tensors into one
        fresh = (f"t{i}" for i in itertools.count(1) if f"t{i}" not in fixed)
        names: dict[str, str] = {}
        for e in self.einsums:
            if e.out not in fixed and e.out not in names:
                names[e.out] = next(fresh)
        return rename_tensors(replace(self, name="cascade"), names)

    @cached_property
    def key(self) -> str:
        """Structural hash: equal for the same maths, whatever the names of intermediates."""
        return hashlib.sha256(canonical_text(self.canonical()).encode()).hexdigest()[:16]

    def __str__(self) -> str:
        return format_cascade(self)


def rename_tensors(c: Cascade, names: dict[str, str]) -> Cascade:
    """Rename tensors everywhere they occur (declarations, reads, outputs)."""

    def fix(x):
        return replace(x, tensor=names.get(x.tensor, x.tensor)) if isinstance(x, Read) else None

    def fix_einsum(e: Einsum) -> Einsum:
        return replace(
            e,
            out=names.get(e.out, e.out),
            expr=transform(e.expr, fix),
            where=None if e.where is None else transform(e.where, fix),
        )

    return replace(
        c,
        tensors=tuple(replace(t, name=names.get(t.name, t.name)) for t in c.tensors),
        einsums=tuple(fix_einsum(e) for e in c.einsums),
        outputs=tuple(names.get(o, o) for o in c.outputs),
    )


def plain_read(decl: TensorDecl, prev: bool = False) -> Read:
    """A read of a whole tensor at its own ranks."""
    return Read(decl.name, tuple(coord(r) for r in decl.ranks), prev)


def canonical_text(c: Cascade) -> str:
    """Every field that changes the maths, unambiguously; no names of intermediates, no lines."""
    parts = [
        "ranks:" + ";".join(f"{r.name}={sympy.srepr(r.extent)}:{r.role.value}" for r in c.ranks),
        "tensors:" + ";".join(f"{t.name}{t.ranks}{t.role.value}{t.layout.value}{t.init}" for t in c.tensors),
        "params:"
        + ";".join(
            f"{p.name}={sympy.srepr(p.default) if p.default is not None else ''}{p.integer}{p.positive}"
            for p in c.params
        ),
        "outputs:" + ",".join(c.outputs),
    ]
    users = user_operators(
        [x for e in c.einsums for x in (e.expr, e.where) if x is not None],
        [e.reduce.op for e in c.einsums if e.reduce is not None],
    )
    if users:  # the definitions of user reducers are part of the maths
        parts.append("operators:" + ";".join(f"{name}={DEFINITIONS[name]!r}" for name in users))
    for e in c.einsums:
        # the first loop reads True and no loop False, as when a cascade had one loop: shipped caches keep their keys
        loop = {0: "False", 1: "True"}.get(int(e.loop), str(int(e.loop)))
        parts.append(f"{e.out}{e.ranks}={e.expr!r}|{e.reduce!r}|{e.where!r}|{loop}")
    return "\n".join(parts)
