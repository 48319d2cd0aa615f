"""Named ranks (the dimensions of the cascade) with symbolic extents.

A rank is named by a short identifier; the same identifier, as a sympy integer
symbol, is the rank's coordinate inside index expressions, and its extent is a
sympy expression (usually an upper-case symbol: rank ``n`` has extent ``N``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from functools import cache

import sympy


class RankRole(enum.Enum):
    """What a rank means in the attention contract."""

    BATCH = "batch"
    HEAD = "head"
    QUERY = "query"  # m: the query sequence
    KEY = "key"  # n: the key/value sequence, the rank kernels stream over
    QK_DIM = "qk_dim"  # e: contracted by q·k
    V_DIM = "v_dim"  # f: the value (and output) head dimension
    OTHER = "other"  # ranks a declaration adds (agent tokens, low-rank dims, ...)
    LIST = "list"  # the positions of a top list (the k largest of a fiber, in order), which rewrites add


@dataclass(frozen=True)
class Rank:
    """A named rank.

    >>> Rank("n", extent_symbol("N"), RankRole.KEY).extent
    N
    """

    name: str
    extent: sympy.Expr
    role: RankRole = RankRole.OTHER


@cache
def coord(name: str) -> sympy.Symbol:
    """The coordinate symbol of rank ``name`` (a non-negative integer)."""
    return sympy.Symbol(name, integer=True, nonnegative=True)


@cache
def extent_symbol(name: str) -> sympy.Symbol:
    """The extent symbol ``name`` (a positive integer)."""
    return sympy.Symbol(name, integer=True, positive=True)


# Batch and head are "parallel" ranks: every query, key and value tensor has them,
# so the printer leaves them out and the analysis treats them as outer loops.
PARALLEL = ("b", "h")
STANDARD_RANKS = {
    "b": Rank("b", extent_symbol("B"), RankRole.BATCH),
    "h": Rank("h", extent_symbol("H"), RankRole.HEAD),
    "m": Rank("m", extent_symbol("M"), RankRole.QUERY),
    "n": Rank("n", extent_symbol("N"), RankRole.KEY),
    "e": Rank("e", extent_symbol("E"), RankRole.QK_DIM),
    "f": Rank("f", extent_symbol("F"), RankRole.V_DIM),
}
STREAM = "n"  # the rank kernels stream over and the pass analysis counts passes of
SEQUENCE_RANKS = ("m", "n")  # the query and key sequences, a kernel tile's two ranks


def new_rank(name: str, extent: sympy.Expr | None = None) -> Rank:
    """A rank a declaration introduces; its extent defaults to the upper-case name."""
    if name in STANDARD_RANKS:
        return STANDARD_RANKS[name]
    return Rank(name, extent if extent is not None else extent_symbol(name.upper()))


def rank_order(names) -> tuple[str, ...]:
    """Names sorted in the canonical order: standard ranks first, then the rest by name."""
    standard = list(STANDARD_RANKS)
    return tuple(sorted(set(names), key=lambda r: (standard.index(r) if r in standard else len(standard), r)))
