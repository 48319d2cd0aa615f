"""Map expressions: the right-hand sides of Einsums.

Leaves are constants, scalar parameters, rank coordinates used as data
(``n - m``), rank extents used as data (``log N``) and tensor reads whose
indices are sympy expressions of rank coordinates (``s[m - i, n - j]``,
``sel[m, floor(n / 64)]``). Inner nodes are operator calls.

Values may be *absent* (masked out). A call with ``Merge.ALL`` is absent where
any argument is; a call with ``Merge.ANY`` (used by running-state updates) treats
an absent argument as the operator's identity and is absent only where all are.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TypeAlias

import sympy
from sympy.core.function import AppliedUndef

from .operators import OPERATORS
from .ranks import coord, extent_symbol


class Merge(enum.Enum):
    ALL = "∩"
    ANY = "∪"


@dataclass(frozen=True)
class Const:
    value: float


@dataclass(frozen=True)
class Param:
    """A scalar parameter bound at call time (softcap c, window W, ``scale``)."""

    name: str


@dataclass(frozen=True)
class Coord:
    """The coordinate of a rank used as data, as in ALiBi's ``n - m``."""

    rank: str


@dataclass(frozen=True)
class Size:
    """The extent of a rank used as data, as in sigmoid attention's ``-log N``."""

    rank: str


@dataclass(frozen=True, repr=False)
class Read:
    """``tensor[index]``; ``prev`` reads a running state's value before this chunk. A ``padded`` read of an input
    finds absent elements outside the input, where any other read outside it is an error: rewrites make them
    when they recompute a value at shifted coordinates (``s[m − i, n − j]`` from ``q[m − i]``, ``k[n − j]``)."""

    tensor: str
    index: tuple[sympy.Expr, ...]
    prev: bool = False
    padded: bool = False

    def __repr__(self) -> str:
        # ``padded`` only where set: canonical texts, and so the cache keys of shipped kernels, stay as they were
        pad = ", padded=True" if self.padded else ""
        return f"Read(tensor={self.tensor!r}, index={self.index!r}, prev={self.prev!r}{pad})"


@dataclass(frozen=True)
class Call:
    op: str
    args: tuple[Expr, ...]
    merge: Merge = Merge.ALL


Expr: TypeAlias = Const | Param | Coord | Size | Read | Call
LEAVES = (Const, Param, Coord, Size, Read)


def call(op: str, *args: Expr, merge: Merge = Merge.ALL) -> Call:
    """Build a call node.

    >>> call("exp", Param("x"))
    Call(op='exp', args=(Param(name='x'),), merge=<Merge.ALL: '∩'>)
    """
    return Call(op, tuple(args), merge)


def walk(expr: Expr) -> Iterator[Expr]:
    """Every node of ``expr``, parents before children."""
    yield expr
    if isinstance(expr, Call):
        for a in expr.args:
            yield from walk(a)


def reads(expr: Expr) -> Iterator[Read]:
    """Every read in ``expr``, with the reads an index gathers through (``table[bucket[n − m]]``: both)."""
    for x in walk(expr):
        if isinstance(x, Read):
            yield x
            yield from gathered(x.index)


def gathered(index: tuple[sympy.Expr, ...]) -> Iterator[Read]:
    """The reads inside an index, at any depth: a gather by an integer input is ``bucket(n − m)`` in an index.

    >>> from .ranks import coord
    >>> list(gathered((sympy.Function("bucket")(coord("n") - coord("m")),)))
    [Read(tensor='bucket', index=(-m + n,), prev=False)]
    """
    for i in index:
        for _, read in gathered_entries(sympy.sympify(i)):
            yield read


def gathered_entries(x: sympy.Expr) -> list[tuple[sympy.Expr, Read]]:
    """Each gathered entry of an index formula (``bucket(n − m)``) with the read it stands for, in one order."""
    return [(f, Read(str(f.func), tuple(f.args))) for f in sorted(x.atoms(AppliedUndef), key=str)]


def index_ranks(index: tuple[sympy.Expr, ...]) -> frozenset[str]:
    """Rank coordinates an index mentions (parameter symbols such as a block size are not ranks)."""
    return frozenset(s.name for i in index for s in sympy.sympify(i).free_symbols if s == coord(s.name))


def free_ranks(expr: Expr) -> frozenset[str]:
    """The ranks an expression varies along.

    >>> from .ranks import coord
    >>> sorted(free_ranks(call("sub", Coord("n"), Read("x", (coord("m"),)))))
    ['m', 'n']
    """
    out: set[str] = set()
    for x in walk(expr):
        if isinstance(x, Coord):
            out.add(x.rank)
        elif isinstance(x, Read):
            out |= index_ranks(x.index)
    return frozenset(out)


def rank_free(x: Expr) -> bool:
    """Whether ``x`` is the same everywhere: no coordinate, no tensor read (constants, parameters, extents).

    >>> from .ranks import coord
    >>> rank_free(Call("mul", (Const(2.0), Param("scale")))), rank_free(Coord("m"))
    (True, False)
    """
    return not free_ranks(x) and not any(isinstance(y, Read) for y in walk(x))


def transform(expr: Expr, fn: Callable[[Expr], Expr | None]) -> Expr:
    """Rebuild ``expr`` bottom-up; ``fn`` returns a replacement or None to keep a node."""
    if isinstance(expr, Call):
        args = tuple(transform(a, fn) for a in expr.args)
        expr = Call(expr.op, args, expr.merge) if args != expr.args else expr
    new = fn(expr)
    return expr if new is None else new


def at_positions(expr: Expr, positions: Mapping[str, Expr]) -> Expr:
    """``expr`` with the coordinates of some ranks moved, all at once: each rank's coordinate, used as data and in
    every read's index, becomes its position, an expression of coordinates, constants and integer parameters.

    >>> from .ranks import coord
    >>> moved = at_positions(call("sub", Read("g", (coord("m"),)), Coord("n")), {"m": Coord("n"), "n": Param("p")})
    >>> moved.args
    (Read(tensor='g', index=(n,), prev=False), Param(name='p'))
    """

    def index_form(y: Expr) -> sympy.Expr:
        if isinstance(y, Coord):
            return coord(y.rank)
        if isinstance(y, Param):
            return extent_symbol(y.name)  # as an integer parameter is in an index
        raise TypeError(f"a position is made of coordinates, constants and integer parameters, not {y}")

    moves = {coord(r): to_sympy(x, index_form) for r, x in positions.items()}

    def move(y: Expr) -> Expr | None:
        if isinstance(y, Coord) and y.rank in positions:
            return positions[y.rank]
        if isinstance(y, Read):
            index = tuple(sympy.sympify(i).xreplace(moves) for i in y.index)
            return None if index == y.index else Read(y.tensor, index, y.prev, y.padded)
        return None

    return transform(expr, move)


def is_boolean(expr: Expr) -> bool:
    return isinstance(expr, Call) and (OPERATORS[expr.op].boolean if expr.op in OPERATORS else False)


def to_sympy(expr: Expr, leaf: Callable[[Expr], sympy.Expr]) -> sympy.Expr:
    """Translate to sympy; ``leaf`` maps Read, Param, Coord and Size nodes to sympy values."""
    if isinstance(expr, Const):
        return sympy.oo * sympy.sign(expr.value) if abs(expr.value) == float("inf") else sympy.nsimplify(expr.value)
    if isinstance(expr, Call):
        return OPERATORS[expr.op].sympy(*(to_sympy(a, leaf) for a in expr.args))
    return leaf(expr)
