"""Recomputing a value read at shifted coordinates, so that no Einsum reads a score outside its own tile.

Multi-token attention convolves the score tile, ``conv[m, n] = Σ_ij θ[h, i, j]·s[m − i, n − j]``: read as
written, the score at ``n − j`` belongs to an earlier chunk of keys and the cascade cannot stream. The score is
cheap to recompute where it is read, ``s[m − i, n − j] = scale·q[m − i]·k[n − j]``: this step gives the read
value a copy over the read's own coordinates (``s_shifted[m, n, i, j]``), its formula the original's at the
shifted ones, down to the inputs, which it reads there. Outside the original's extent (``m − i < 0``) the read
found absent elements; the copy finds them too: its reads of inputs are *padded* (absent outside the input, not
an error) and, where no padded read already makes it absent there, its filter keeps the shifted coordinates in
range. What it cannot recompute pointwise (a value reduced over the sequence ranks, a running state) it leaves as
it was, for the pass analysis to explain.

The copies carry the shift's ranks (``i``, ``j``); kernels unroll them, each a small fixed extent.

>>> import einflash as ef
>>> @ef.attention
... def smeared(q, k, v, w: ef.Tensor["h i"]):
...     i = ef.rank("i")
...     s = q @ k * ef.scale
...     return ef.softmax((w * s[ef.m - i, ef.n]).sum("i"), "n") @ v
>>> print(recompute_shifted(smeared.cascade))  # doctest: +ELLIPSIS
cascade smeared  (...)
  inputs: q[m,e]  k[n,e]  v[n,f]  w[h,i]
  params: scale = 1/sqrt(E)
  dot_e_shifted[m,n,i] = Σ_e q@padded[-i + m,e]·k[n,e]    # line 4
  s_shifted[m,n,i] = dot_e_shifted[m,n,i]·scale    # line 4
  dot_i[m,n] = Σ_i w[h,i]·s_shifted[m,n,i]    # line 5
  ...
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import sympy

from ...ir.algebra import from_sympy
from ...ir.cascade import Cascade, Einsum, Role, TensorDecl
from ...ir.expr import (
    Call,
    Const,
    Coord,
    Expr,
    Merge,
    Param,
    Read,
    Size,
    call,
    gathered_entries,
    index_ranks,
    transform,
)
from ...ir.ranks import SEQUENCE_RANKS, coord, extent_symbol, rank_order
from .names import drop_unused, fresh_name, ordered_tensors


def recompute_shifted(c: Cascade) -> Cascade:
    """Replace every read of an intermediate at shifted sequence coordinates by a read of a recomputed copy (see
    the module docstring); reads it cannot recompute stay."""
    for at, e in enumerate(c.einsums):
        for r in e.reads():
            if not _shifted(c, r):
                continue
            copies = _Copies(c)
            plain = copies.read(r)
            if plain is None:
                continue
            swap = lambda x, r=r, plain=plain: plain if x == r else None  # noqa: E731 -- that read, all over e
            user = replace(
                e,
                expr=transform(e.expr, swap),
                where=None if e.where is None else transform(e.where, swap),
            )
            einsums = [*c.einsums[:at], *copies.einsums, user, *c.einsums[at + 1 :]]
            tensors = ordered_tensors([*c.tensors, *copies.decls], einsums)
            return recompute_shifted(drop_unused(replace(c, einsums=tuple(einsums), tensors=tuple(tensors))))
    return c


def _shifted(c: Cascade, r: Read) -> bool:
    """Whether ``r`` reads an intermediate at sequence coordinates other than its own (and nothing else moved)."""
    decl = c.tensor(r.tensor)
    if decl.role is not Role.INTERMEDIATE or r.prev or any(gathered_entries(sympy.sympify(i)) for i in r.index):
        return False
    moved = [rank for rank, i in zip(decl.ranks, r.index) if sympy.sympify(i) != coord(rank)]
    return bool(moved) and set(moved) <= set(SEQUENCE_RANKS)


@dataclass
class _Copies:
    """The recomputed copies one shifted read needs, in the order they must run."""

    c: Cascade
    einsums: list[Einsum] = field(default_factory=list)
    decls: list[TensorDecl] = field(default_factory=list)
    made: dict = field(default_factory=dict)  # (tensor, index) -> the plain read of its copy
    # a copy -> {rank: shifted coordinate} where it is absent outside the original's extent already
    absent_outside: dict = field(default_factory=dict)

    def read(self, r: Read) -> Read | None:
        """A plain read of ``r``'s tensor recomputed at ``r``'s index; None where it is not recomputable."""
        key = (r.tensor, r.index)
        if key in self.made:
            return self.made[key]
        decl = self.c.tensor(r.tensor)
        src = self.c.producer(r.tensor)
        ranks = rank_order(index_ranks(r.index))
        if src is None or decl.role is not Role.INTERMEDIATE or src.loop or r.prev:
            return None
        if src.reduce is not None and set(src.reduce.ranks) & (set(SEQUENCE_RANKS) | set(ranks)):
            return None  # a reduction over the sequence (a row's sum) is no pointwise recomputation
        sigma = {coord(rank): sympy.sympify(i) for rank, i in zip(decl.ranks, r.index)}
        moved = {rank: sigma[coord(rank)] for rank in decl.ranks if sigma[coord(rank)] != coord(rank)}
        expr = self._at(src.expr, sigma)
        where = None if src.where is None else self._at(src.where, sigma)
        if expr is None or (src.where is not None and where is None):
            return None
        name = fresh_name(self.c, f"{r.tensor}_shifted", {d.name for d in self.decls})
        outside = {rank: x for rank, x in moved.items() if self._absent_outside(expr, rank, x)}
        for rank, x in moved.items():
            if rank not in outside:
                where = _and(where, self._in_range(rank, x))
        self.einsums.append(Einsum(name, ranks, expr, src.reduce, where, line=src.line))
        self.decls.append(TensorDecl(name, ranks))
        self.absent_outside[name] = moved  # absent outside by the filter, or by a padded read
        self.made[key] = Read(name, tuple(coord(x) for x in ranks))
        return self.made[key]

    def _at(self, x: Expr, sigma: dict) -> Expr | None:
        """``x`` with the coordinates moved by ``sigma``; None where a read it needs is not recomputable."""
        failed = []

        def move(y: Expr) -> Expr | None:
            if isinstance(y, Coord) and coord(y.rank) in sigma:
                return self._ir(sigma[coord(y.rank)])
            if not isinstance(y, Read):
                return None
            index = tuple(sympy.sympify(i).subs(sigma, simultaneous=True) for i in y.index)
            if index == tuple(sympy.sympify(i) for i in y.index):
                return None
            role = self.c.tensor(y.tensor).role
            if role is Role.INPUT:
                return Read(y.tensor, index, padded=True)
            got = self.read(Read(y.tensor, index)) if role is Role.INTERMEDIATE else None
            if got is None:
                failed.append(y)
                return y
            return got

        out = transform(x, move)
        return None if failed else out

    def _absent_outside(self, x: Expr, rank: str, shifted: sympy.Expr) -> bool:
        """Whether ``x`` is absent wherever ``shifted`` leaves ``rank``'s extent: it reads, through operators that
        are absent where an operand is, a padded input along ``rank`` or a copy absent there, at ``shifted``."""
        if isinstance(x, Call):
            return x.merge is Merge.ALL and any(self._absent_outside(a, rank, shifted) for a in x.args)
        if not isinstance(x, Read):
            return False
        if x.padded:
            ranks = self.c.tensor(x.tensor).ranks
            return any(own == rank and sympy.sympify(i) == shifted for own, i in zip(ranks, x.index))
        return self.absent_outside.get(x.tensor, {}).get(rank) == shifted

    def _ir(self, x: sympy.Expr) -> Expr:
        """An index formula as a map expression: coordinates, extents and integer parameters."""
        leaves: dict[sympy.Basic, Expr] = {coord(r.name): Coord(r.name) for r in self.c.ranks}
        leaves |= {r.extent: Size(r.name) for r in self.c.ranks if isinstance(r.extent, sympy.Symbol)}
        leaves |= {extent_symbol(p.name): Param(p.name) for p in self.c.params if p.integer}
        return from_sympy(x, leaves)

    def _in_range(self, rank: str, x: sympy.Expr) -> Expr:
        """``0 ≤ x < extent of rank``."""
        extent = self.c.rank(rank).extent
        return call("and", call("ge", self._ir(x), Const(0.0)), call("lt", self._ir(x), self._ir(extent)))


def _and(a: Expr | None, b: Expr) -> Expr:
    return b if a is None else call("and", a, b)
