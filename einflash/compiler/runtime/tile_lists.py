"""Key tiles classified at run time, for masks on per-token data (document ids) and on functions of one
position (blocks, ``m // 64 == n // 64``).

For every batch b and query tile i, each key tile j is empty, partial or full under the mask.
The affine part of the mask is classified by its symbolic tile plan; each block test
``f(m) == g(n)`` by the ranges of f over the tile's rows and of g over its keys (f and g evaluated at
every position, reading per-token inputs such as ``doc[b, m]``): disjoint ranges hold no equal pair,
two equal one-value ranges hold only equal pairs. A tile is full
when every part says full, empty when some part says empty. The kernel gets, per (b, i), the
indices of its full tiles followed by those of its partial tiles, and the two counts:

    tiles  int32 [B, Tq, Tk]   counts  int32 [B, Tq, 2]

This is the only place where einflash looks at mask data per tile, and it looks at blocks
(Tq·Tk small values per batch), never at the [M, N] mask.

>>> import torch
>>> from einflash.compiler.codegen.tile_ranges import BlockTest, TileLists
>>> from einflash.ir.expr import Read
>>> from einflash.ir.ranks import coord
>>> doc = torch.tensor([[0, 0, 1, 1, 1, 2]])
>>> test = BlockTest(Read("doc", (coord("b"), coord("m"))), Read("doc", (coord("b"), coord("n"))))
>>> tiles, counts = tile_lists(TileLists((test,), None, frozenset()), {"doc": doc}, {}, 1, 6, 6, 2, 2)
>>> counts[0].tolist(), tiles[0, 1, :3].tolist()  # rows 2-3: key tile 1 full, 2 partial, 0 empty
([[1, 0], [1, 1], [0, 2]], [1, 2, 0])
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import torch

from ...backends.target import TileConfig
from ...ir.cascade import Cascade
from ...ir.expr import Call, Const, Coord, Expr, Param, Read, Size, reads, walk
from ...ir.operators import OPERATORS
from ...ir.printer import format_expr
from ...ir.ranks import STREAM
from ..analysis.mask_tiles import TileCounts, affine_part, conjuncts, count_tiles, tile_plan, tile_rows
from ..codegen.tile_ranges import BlockTest, TileLists, block_tests


def _ranges(values: torch.Tensor, length: int, block: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block of ``block`` positions of ``values[:, :length]``: the least and the greatest value."""
    x = values[:, :length]
    if length == 0:
        return x, x
    # the last block is filled up with its own last value, which moves neither its least nor its greatest
    x = torch.cat([x, x[:, -1:].expand(-1, tiles * block - length)], dim=1).reshape(x.shape[0], tiles, block)
    least, most = x.amin(-1), x.amax(-1)
    return least, most


def _side_values(
    side: Expr, inputs: Mapping[str, torch.Tensor], params: Mapping[str, float], length: int, sizes: dict, device
) -> torch.Tensor | None:
    """A block test's side at positions 0..length-1, [B or 1, length]; None where it cannot be evaluated here
    (a per-token input shorter than the sequence, a division by zero, an extent other than M or N)."""

    def value(x: Expr) -> torch.Tensor | float | None:
        if isinstance(x, Const):
            return x.value
        if isinstance(x, Param):
            return params[x.name]
        if isinstance(x, Size):
            return sizes.get(x.rank)
        if isinstance(x, Coord):
            return torch.arange(length, device=device)[None, :]
        if isinstance(x, Read):
            data = inputs[x.tensor]
            return data[:, :length] if data.shape[1] >= length else None
        assert isinstance(x, Call), x
        values = [value(a) for a in x.args]
        if any(a is None for a in values):
            return None
        args = [torch.as_tensor(a, device=device) for a in values]
        if x.op in ("floordiv", "mod") and bool((args[1] == 0).any()):
            return None
        return OPERATORS[x.op].torch(*args)

    out = value(side)  # a tensor: a side reads its coordinate or a per-token input (token_side)
    return None if out is None else torch.as_tensor(out).expand(-1, length)


def _sides(test: BlockTest, inputs: Mapping[str, torch.Tensor], params: Mapping[str, float], M: int, N: int, device):
    """A block test's query side at positions 0..M-1 and key side at 0..N-1 (each None where not evaluable)."""
    sizes = {"m": M, "n": N}
    return (
        _side_values(test.query_side, inputs, params, M, sizes, device),
        _side_values(test.key_side, inputs, params, N, sizes, device),
    )


def _test_classes(
    test: BlockTest,
    inputs: Mapping[str, torch.Tensor],
    params: Mapping[str, float],
    M: int,
    N: int,
    BM: int,
    BN: int,
    Tq: int,
    Tk: int,
    device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(some pair equal, every pair equal) per [B, Tq, Tk] tile for one block test."""
    q_values, k_values = _sides(test, inputs, params, M, N, device)
    if q_values is None or k_values is None:  # a side the run time cannot evaluate: leave the test to the kernel
        unknown = torch.ones(1, Tq, Tk, dtype=torch.bool, device=device)
        return unknown, ~unknown
    q_lo, q_hi = _ranges(q_values, M, BM, Tq)
    k_lo, k_hi = _ranges(k_values, N, BN, Tk)
    q_lo, q_hi, k_lo, k_hi = q_lo[:, :, None], q_hi[:, :, None], k_lo[:, None, :], k_hi[:, None, :]
    some = (q_hi >= k_lo) & (k_hi >= q_lo)
    every = (q_lo == q_hi) & (k_lo == k_hi) & (q_lo == k_lo)
    return some, every


@functools.lru_cache(maxsize=256)
def _affine_classes(
    affine: Expr, integers: frozenset[str], M: int, N: int, BM: int, BN: int, params: tuple
) -> tuple[torch.Tensor, ...]:
    """(non-empty, full) per [Tq, Tk] tile of the mask's affine part, from its symbolic plan (on the CPU)."""
    plan = tile_plan(affine, integers)
    assert plan is not None, affine  # an affine part has a tile plan
    rows = list(tile_rows(plan, M, N, BM, BN, **dict(params)))
    some = torch.zeros(len(rows), -(-N // BN), dtype=torch.bool)
    every = torch.zeros_like(some)
    for i, row in enumerate(rows):
        for lo, hi in row.nonempty:
            some[i, lo:hi] = True
        for lo, hi in row.full:
            every[i, lo:hi] = True
    return some, every


def tile_lists(
    lists: TileLists,
    inputs: Mapping[str, torch.Tensor],
    params: Mapping[str, float],
    B: int,
    M: int,
    N: int,
    BM: int,
    BN: int,
    pack: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (tiles, counts) of the module docstring; with ``pack``, one query tile holds all M rows."""
    if pack:
        BM = max(M, 1)
    Tq, Tk = -(-M // BM), -(-N // BN)
    device = next(iter(inputs.values())).device if inputs else torch.device("cpu")
    some = torch.ones(B, Tq, Tk, dtype=torch.bool, device=device)
    every = torch.ones_like(some)
    if lists.affine is not None:
        named = sorted(p for p in params if p in _param_names(lists.affine))
        a_some, a_every = _affine_classes(
            lists.affine, lists.integers, M, N, BM, BN, tuple((p, params[p]) for p in named)
        )
        some, every = some & a_some.to(device), every & a_every.to(device)
    for test in lists.tests:
        t_some, t_every = _test_classes(test, inputs, params, M, N, BM, BN, Tq, Tk, device)
        some, every = some & t_some, every & t_every
    if N % BN:  # the last key tile is cut by the end of the keys: only a masked body checks n < N
        every[:, :, -1] = False
    partial = some & ~every
    j = torch.arange(Tk, device=device)
    order = torch.where(every, j, torch.where(partial, Tk + j, 2 * Tk + j)).argsort(dim=-1)
    counts = torch.stack([every.sum(-1), partial.sum(-1)], dim=-1)
    return order.to(torch.int32).contiguous(), counts.to(torch.int32).contiguous()


def kept_pairs(
    lists: TileLists,
    inputs: Mapping[str, torch.Tensor],
    params: Mapping[str, float],
    B: int,
    M: int,
    N: int,
    BM: int,
    BN: int,
) -> tuple[int, int] | None:
    """The (query, key) pairs that a mask made of ``lists``' block tests and affine part keeps, and the (query
    tile, key tile) pairs that hold at least one of them: the tiles an ideal classification visits. Summed over the
    batch, evaluated BM rows at a time (never the whole [M, N] mask); None where a test's side cannot be evaluated.

    >>> from einflash.compiler.codegen.tile_ranges import BlockTest, TileLists
    >>> from einflash.ir.expr import Coord, Read, call
    >>> from einflash.ir.ranks import coord
    >>> doc = torch.tensor([[0, 0, 1, 1, 1, 2]])
    >>> same = BlockTest(Read("doc", (coord("b"), coord("m"))), Read("doc", (coord("b"), coord("n"))))
    >>> causal = call("le", Coord("n"), Coord("m"))
    >>> kept_pairs(TileLists((same,), causal, frozenset()), {"doc": doc}, {}, 1, 6, 6, 2, 2)  # 3 + 6 + 1 pairs
    (10, 4)
    """
    device = next(iter(inputs.values())).device if inputs else torch.device("cpu")
    sides = [_sides(test, inputs, params, M, N, device) for test in lists.tests]
    if any(q_values is None or k_values is None for q_values, k_values in sides):
        return None
    rows = None
    if lists.affine is not None:  # one key range per row: the plan at tiles of one row and one key
        plan = tile_plan(lists.affine, lists.integers)
        assert plan is not None, lists.affine  # an affine part has a tile plan
        rows = tile_rows(plan, M, N, 1, 1, **{p: params[p] for p in _param_names(lists.affine)})
    Tk = -(-N // BN)
    pairs = ideal = 0
    for r0 in range(0, M, BM):
        height = min(BM, M - r0)
        keep = torch.ones(B, height, Tk * BN, dtype=torch.bool, device=device)
        keep[:, :, N:] = False
        if rows is not None:
            allowed = torch.zeros(height, Tk * BN, dtype=torch.bool)
            for i, row in zip(range(height), rows):
                for lo, hi in row.nonempty:
                    allowed[i, lo:hi] = True
            keep &= allowed.to(device)
        for q_values, k_values in sides:
            keep[:, :, :N] &= q_values[:, r0 : r0 + height, None] == k_values[:, None, :N]
        pairs += int(keep.sum())
        ideal += int(keep.reshape(B, height, Tk, BN).any(dim=3).any(dim=1).sum())
    return pairs, ideal


@functools.cache
def _param_names(affine: Expr) -> frozenset[str]:
    return frozenset(x.name for x in walk(affine) if isinstance(x, Param))


def mask_tiles_at(
    c: Cascade, ext: dict[str, int], params: dict, cfg: TileConfig, inputs: Mapping[str, torch.Tensor] | None
) -> tuple[dict | None, list[list[tuple[int, int]]]]:
    """The mask's tile counts at the tiles of ``cfg``: exact where the mask is affine or compares functions of
    positions (``m // 64 == n // 64``, classified here as the run time does); otherwise the affine part's
    counts, with its full tiles counted as visited and masked, since the rest of the mask decides there.
    With them, each query tile's (visited, partial) key tiles: one list, or one per batch entry where the
    classification reads per-token data (None for the counts, every tile full, without a mask).

    With ``inputs`` holding the per-token data its tests read (document ids), the tiles as the run time classifies
    them for that data (summed over its batch), the pairs the mask keeps and the tiles that hold one."""
    M, N, BM, BN = ext["m"], ext["n"], cfg.block_m, cfg.block_n
    integers = frozenset(p.name for p in c.params if p.integer)
    for e in c.einsums:
        if e.where is None or STREAM not in e.iteration_ranks:
            continue
        pred = affine_part(e.where, integers)
        rest = [p for p in conjuncts(e.where) if tile_plan(p, integers) is None]
        tests = block_tests(c, e.where)
        read = {r.tensor for t in tests for r in (*reads(t.query_side), *reads(t.key_side))}
        data = None if inputs is None or not read <= inputs.keys() else {n: inputs[n] for n in read}
        # every conjunct the plan cannot take is a block test that the run time evaluates here
        classified = len(tests) == len(rest) and (not read or data is not None)
        if pred is None and not (rest and classified):
            continue
        named = {x.name for x in walk(e.where) if isinstance(x, Param)}
        used = {p.name: (int(params[p.name]) if p.integer else params[p.name]) for p in c.params if p.name in named}
        plan = None if pred is None else tile_plan(pred, integers)
        kept = None
        if rest and classified:
            lists = TileLists(tests, pred, integers)
            batch = next(iter(data.values())).shape[0] if data else 1
            _, counts = tile_lists(lists, data or {}, used, batch, M, N, BM, BN)
            full, partial = int(counts[..., 0].sum()), int(counts[..., 1].sum())
            total = batch * -(-M // BM) * -(-N // BN)
            tiles = TileCounts(total - full - partial, partial, full, total)
            rows = [[(f + p, p) for f, p in per_batch] for per_batch in counts.tolist()]
            if data:
                kept = kept_pairs(lists, data, used, batch, M, N, BM, BN)
        else:
            assert plan is not None, pred  # an affine part has a tile plan
            tiles = count_tiles(plan, M=M, N=N, BM=BM, BN=BN, **used)
            rows = [[r.counts() for r in tile_rows(plan, M, N, BM, BN, **used)]]
            if rest:  # a tile full under the affine part is still masked by the rest
                tiles = TileCounts(tiles.empty, tiles.partial + tiles.full, 0, tiles.total)
                rows = [[(v, v) for v, _ in rows[0]]]
        return {
            "empty": tiles.empty,
            "partial": tiles.partial,
            "full": tiles.full,
            "total": tiles.total,
            "block_m": BM,
            "block_n": BN,
            # the counts are the mask's own non-empty and full tiles (else: the tiles the kernel visits)
            "exact": not rest and plan is not None and plan.exact,
            "tested_in_every_tile": [] if classified else [format_expr(p) for p in rest],
            **(
                {}
                if kept is None
                else {"batch": batch, "pairs": kept[0], "all_pairs": batch * M * N, "tiles_with_pairs": kept[1]}
            ),
        }, rows
    # without a mask, every key tile is visited, and the last is cut by the end of the keys
    return None, [[(-(-N // BN), int(N % BN != 0))] * -(-M // BM)]
