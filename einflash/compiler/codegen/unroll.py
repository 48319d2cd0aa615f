"""Ranks a kernel unrolls: small ranks beside the tile's two, one copy of the code per position.

A tile holds at most two ranks as axes (rows and keys, or a sequence and a head dim). A value recomputed at shifted
coordinates (``s_shifted[m, n, i, j]``, rewrite/shifted.py) or a reduction over ranks no ``tl.dot`` contracts
(``Σ_ij θ[h, i, j]·s_shifted[m, n, i, j]``) has more; their extra ranks have small extents, fixed per kernel (the
kernel's dims), so the tile code computes one instance per position (``s_shifted__1_2``, its coordinates
constants) and folds a reduction over them in order.

>>> from einflash.ir.cascade import Einsum, Reduction
>>> from einflash.ir.expr import Read
>>> from einflash.ir.ranks import coord
>>> m, n, i = coord("m"), coord("n"), coord("i")
>>> e = Einsum("c", ("m", "n"), Read("s", (m, n, i)), Reduction("sum", ("i", "j")))
>>> unrolled_ranks(e, None), [instance_name("s", p) for p in positions(("i",), {"i_extent": 3})]
(('i', 'j'), ['s__0', 's__1', 's__2'])
"""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import sympy

from ...errors import LoweringError
from ...ir.cascade import Cascade, Einsum
from ...ir.expr import Const, Expr, Read, at_positions
from ...ir.ranks import PARALLEL, SEQUENCE_RANKS, coord

MAX_INSTANCES = 64  # of one Einsum: each is a tile's code, so a kernel grows by as many copies


def unrolled_ranks(e: Einsum, c: Cascade) -> tuple[str, ...]:
    """The ranks of ``e`` unrolled: beyond m and n, those of an output of more than two tile ranks, and those of a
    reduction over several ranks or over an unrolled rank of a value it reads."""
    out = _beyond_two(e.ranks)
    if e.reduce is None:
        return out
    reduced = tuple(r for r in e.reduce.ranks if r not in SEQUENCE_RANKS)
    if len(e.reduce.ranks) > 1:
        return out + reduced
    wide = {r for x in e.reads() if c.has_tensor(x.tensor) for r in _beyond_two(_read_along(x, c))}
    return out + reduced if set(reduced) & wide else out


def _read_along(x: Read, c: Cascade) -> tuple[str, ...]:
    """The ranks of ``x``'s tensor that the read runs along: those whose index moves with a coordinate (a chunk's
    state ``hs[b, h, chunk, e, f]`` read at one chunk is a tile of e and f)."""
    ranks = c.tensor(x.tensor).ranks
    return tuple(r for r, i in zip(ranks, x.index) if sympy.sympify(i).free_symbols & {coord(q) for q in ranks})


def _beyond_two(ranks: tuple[str, ...]) -> tuple[str, ...]:
    """Of ranks with more than two beside batch and head, those other than m and n."""
    tile = [r for r in ranks if r not in PARALLEL]
    return tuple(r for r in tile if r not in SEQUENCE_RANKS) if len(tile) > 2 else ()


def positions(ranks: tuple[str, ...], dims: dict[str, int], out: str = "") -> list[dict[str, int]]:
    """Every position of ``ranks`` at the kernel's extents, the last rank fastest; raises LoweringError past
    MAX_INSTANCES (naming ``out``, the Einsum's result)."""
    extents = [dims[f"{r}_extent"] for r in ranks]
    if math.prod(extents) > MAX_INSTANCES:
        raise LoweringError(
            f"{out} has more than two tile ranks; the kernels unroll those beside m and n, here "
            f"{' × '.join(f'{r} ({x})' for r, x in zip(ranks, extents))} = {math.prod(extents)} copies of a tile's "
            f"code, at most {MAX_INSTANCES}: ranks beside the tile must be small (a convolution's window)"
        )
    return [dict(zip(ranks, p)) for p in itertools.product(*(range(x) for x in extents))]


def instance_name(tensor: str, at: dict[str, int]) -> str:
    """The name of ``tensor``'s instance at one position of its unrolled ranks."""
    return f"{tensor}__{'_'.join(str(v) for v in at.values())}"  # a variable name in the kernel


def instance(e: Einsum, at: dict[str, int]) -> Einsum:
    """``e`` at one position of its unrolled output ranks: those ranks dropped, their coordinates constants."""
    return replace(
        e,
        out=instance_name(e.out, at),
        ranks=tuple(r for r in e.ranks if r not in at),
        expr=at_position(e.expr, at),
        where=None if e.where is None else at_position(e.where, at),
    )


def read_at_position(r: Read, at: dict[str, int]) -> Read:
    """The read ``r`` with the coordinates of ``at``'s ranks in its index replaced by their values."""
    subs = {coord(x): v for x, v in at.items()}
    return replace(r, index=tuple(sympy.sympify(i).subs(subs) for i in r.index))


def at_position(x: Expr, at: dict[str, int]) -> Expr:
    """``x`` with the coordinates of ``at``'s ranks replaced by their values."""
    return at_positions(x, {r: Const(float(v)) for r, v in at.items()})
