"""Buffer needs, FLOPs and bytes of a cascade, as sympy formulas.

Tile sizes are symbols: ``BM`` rows of m and ``BN`` keys of n per step,
``STAGES`` pipelined copies of each streamed input tile, ``b`` bytes per input
element; accumulators and states are fp32. All other ranks are held whole.

>>> import einflash as ef
>>> from einflash.compiler.rewrite.pipeline import optimise
>>> @ef.attention
... def plain(q, k, v):
...     return ef.softmax(q @ k * ef.scale, "n") @ v
>>> needs = buffer_needs(optimise(plain.cascade)[0])
>>> needs.smem
b*(BM*E + BN*E*STAGES + BN*F*STAGES)
>>> needs.grows_with_n
False
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass

import sympy

from ...backends.target import TileConfig
from ...ir.algebra import factors
from ...ir.cascade import Cascade, Einsum, Layout, Role
from ...ir.expr import Call, free_ranks, index_ranks
from ...ir.operators import OPERATORS
from ...ir.ranks import PARALLEL, STREAM, extent_symbol
from ...shape import Shape
from .key_passes import count_passes

BM, BN, STAGES, ELEM = (sympy.Symbol(s, integer=True, positive=True) for s in ("BM", "BN", "STAGES", "b"))
FP32 = 4


def _tile(c: Cascade, rank: str) -> sympy.Expr:
    if rank in PARALLEL:
        return sympy.Integer(1)
    return {"m": BM, "n": BN}.get(rank, c.rank(rank).extent)


def _tile_elems(c: Cascade, ranks) -> sympy.Expr:
    return sympy.Mul(*(_tile(c, r) for r in ranks))


def broadcast_reduction(e: Einsum) -> bool:
    """Whether ``e`` reduces a product that no matrix multiply computes: a factor varies along the reduced
    rank and both output ranks (GLA's decay ``exp(g[m,e] − g[n,e])`` inside ``Σ_e q·k·decay``).

    >>> import einflash as ef
    >>> from einflash.compiler.rewrite.pipeline import optimise
    >>> @ef.attention
    ... def plain(q, k, v):
    ...     return ef.softmax(q @ k * ef.scale, "n") @ v
    >>> any(broadcast_reduction(e) for e in optimise(plain.cascade)[0].einsums)
    False
    """
    if e.reduce is None:
        return False
    out = {r for r in e.ranks if r not in PARALLEL}
    if len(out) < 2:
        return False
    return any(set(e.reduce.ranks) & free_ranks(f) and out <= free_ranks(f) for f, _ in factors(e.expr))


@dataclass(frozen=True)
class BufferNeeds:
    """On-chip bytes of one program (one BM-row tile of queries) and whether they grow with N.

    ``smem``: input tiles (streamed ones multiplied by STAGES); ``registers``:
    fp32 tiles of intermediates and running states; ``fiber``: what a multi-pass
    cascade must keep between passes to avoid re-reading (a whole row of n).
    """

    smem: sympy.Expr
    registers: sympy.Expr
    fiber: sympy.Expr
    total: sympy.Expr
    grows_with_n: bool


@functools.lru_cache(maxsize=256)
def buffer_needs(c: Cascade) -> BufferNeeds:
    """On-chip buffers of ``c`` per program, as formulas (see BufferNeeds)."""
    pa = count_passes(c)
    # the ranks of each input's loaded tiles: its own, or where it is read at computed positions (rel[n − m]),
    # the coordinates its index runs along
    loaded: dict[str, set[tuple[str, ...]]] = {}
    for e in c.einsums:
        for r in e.reads():
            t = c.tensor(r.tensor)
            if t.role is Role.INPUT:
                ranks = t.ranks if t.name not in c.computed_reads else tuple(sorted(index_ranks(r.index)))
                loaded.setdefault(t.name, set()).add(ranks)
    smem = sympy.Integer(0)
    for tiles in loaded.values():
        for ranks in tiles:
            smem += ELEM * _tile_elems(c, ranks) * (STAGES if STREAM in ranks else 1)
    shapes = set()
    for e in c.einsums:
        if pa.pass_of(e.out) > 0 or c.tensor(e.out).role is Role.STATE:
            shapes.add(tuple(r for r in e.ranks if r not in PARALLEL))
            if broadcast_reduction(e):  # the whole iteration tile is held before it is reduced
                shapes.add(tuple(r for r in e.iteration_ranks if r not in PARALLEL))
    registers = sum((FP32 * _tile_elems(c, s) for s in shapes), sympy.Integer(0))
    fiber = sympy.Integer(0)
    for name, _, _ in pa.crossing:
        fiber += FP32 * sympy.Mul(
            *(c.rank(r).extent if r == STREAM else _tile(c, r) for r in c.tensor(name).ranks if r not in PARALLEL)
        )
    total = sympy.expand(smem + registers + fiber)
    n_extent = c.rank(STREAM).extent if c.has_rank(STREAM) else extent_symbol("N")
    return BufferNeeds(
        sympy.factor_terms(smem), sympy.factor_terms(registers), fiber, total, sympy.diff(total, n_extent) != 0
    )


@dataclass(frozen=True)
class Cost:
    """Arithmetic and compulsory memory traffic of one call (all batches and heads)."""

    flops: sympy.Expr
    transcendentals: sympy.Expr
    bytes: sympy.Expr


def _points(c: Cascade, e: Einsum) -> sympy.Expr:
    return sympy.Mul(*(c.rank(r).extent for r in e.iteration_ranks))


def _ops(e: Einsum) -> tuple[int, int]:
    calls = [x for x in e.nodes() if isinstance(x, Call)]
    trans = sum(1 for x in calls if OPERATORS[x.op].transcendental)
    return len(calls) + (1 if e.reduce is not None else 0), trans


@functools.lru_cache(maxsize=256)
def cost(c: Cascade) -> Cost:
    """FLOPs (a multiply-add counts 2), transcendental evaluations, and bytes read and written once.

    Key-layout inputs are read once per kv head (GQA shares them across the group);
    each extra pass over n reads the streamed inputs again.
    """
    flops = transc = sympy.Integer(0)
    for e in c.einsums:
        n_ops, n_trans = _ops(e)
        flops += _points(c, e) * n_ops
        transc += _points(c, e) * n_trans
    passes = max(1, count_passes(c).passes)
    hkv = extent_symbol("Hkv")
    nbytes = sympy.Integer(0)
    for t in c.inputs:
        elems = sympy.Mul(*(hkv if (t.layout is Layout.KEY and r == "h") else c.rank(r).extent for r in t.ranks))
        nbytes += ELEM * elems * (passes if STREAM in t.ranks else 1)
    for o in c.outputs:
        nbytes += ELEM * sympy.Mul(*(c.rank(r).extent for r in c.tensor(o).ranks))
    return Cost(sympy.expand(flops), sympy.expand(transc), sympy.expand(nbytes))


def tile_values(cfg: TileConfig, elem_bytes: int) -> dict[sympy.Symbol, int]:
    """The values of the tile symbols (BM, BN, STAGES) and of the element size ``b`` at one configuration."""
    return {BM: cfg.block_m, BN: cfg.block_n, STAGES: cfg.num_stages, ELEM: elem_bytes}


def declared_params(written: Cascade, shape: Shape, params: Mapping | None) -> dict:
    """The declaration's parameters at ``shape``: its defaults (formulas in E, M, N evaluated), then ``params``."""
    sizes = {extent_symbol(x): v for x, v in {"E": shape.E, "N": shape.N, "M": shape.M}.items()}
    defaults = {p.name: float(p.default.subs(sizes)) for p in written.params if p.default is not None}
    return defaults | dict(params or {})


def symbol_values(c: Cascade, extents: dict[str, int], params: dict[str, float], shape: Shape) -> dict:
    """The value of every symbol of ``c``'s formulas at these extents: its ranks' extents (formulas of others
    too, MoBA's key blocks), its parameters, and the kv heads."""
    subs = {extent_symbol("Hkv"): shape.Hkv}
    subs.update({extent_symbol(k): v for k, v in params.items()})
    for r in c.ranks:
        if isinstance(r.extent, sympy.Symbol):
            subs[r.extent] = extents[r.name]
    for r in c.ranks:  # extents defined by formulas (MoBA's key blocks)
        if not isinstance(r.extent, sympy.Symbol):
            subs[r.extent] = int(sympy.sympify(r.extent).subs(subs))
    return subs
