"""Key tiles classified at run time, for masks on per-token data (document ids).

For every batch b and query tile i, each key tile j is empty, partial or full under the mask.
The affine part of the mask is classified by its symbolic tile plan; each block test
``x[b, m] == y[b, n]`` by the ranges of x over the tile's rows and of y over its keys: disjoint
ranges hold no equal pair, two equal one-value ranges hold only equal pairs. A tile is full
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

from ...ir.expr import Expr, Param, walk
from ..analysis.mask_tiles import tile_plan, tile_rows
from ..codegen.tile_ranges import BlockTest, TileLists


def _ranges(values: torch.Tensor, length: int, block: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block of ``block`` positions of ``values[:, :length]``: the least and the greatest value."""
    x = values[:, :length]
    pad = tiles * block - length
    hi, lo = (
        (torch.iinfo(x.dtype).max, torch.iinfo(x.dtype).min)
        if not x.is_floating_point()
        else (float("inf"), float("-inf"))
    )
    least = torch.nn.functional.pad(x, (0, pad), value=hi).view(x.shape[0], tiles, block).amin(-1)
    most = torch.nn.functional.pad(x, (0, pad), value=lo).view(x.shape[0], tiles, block).amax(-1)
    return least, most


def _test_classes(
    test: BlockTest, inputs: Mapping[str, torch.Tensor], M: int, N: int, BM: int, BN: int, Tq: int, Tk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(some pair equal, every pair equal) per [B, Tq, Tk] tile for one block test."""
    q_values, k_values = inputs[test.query_side.tensor], inputs[test.key_side.tensor]
    if q_values.shape[1] < M or k_values.shape[1] < N:  # reads past the tensor's end: leave the test to the kernel
        shape = (max(q_values.shape[0], k_values.shape[0]), Tq, Tk)
        return (
            torch.ones(shape, dtype=torch.bool, device=q_values.device),
            torch.zeros(shape, dtype=torch.bool, device=q_values.device),
        )
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
    device = next(iter(inputs.values())).device
    some = torch.ones(B, Tq, Tk, dtype=torch.bool, device=device)
    every = torch.ones_like(some)
    if lists.affine is not None:
        named = sorted(p for p in params if p in _param_names(lists.affine))
        a_some, a_every = _affine_classes(
            lists.affine, lists.integers, M, N, BM, BN, tuple((p, params[p]) for p in named)
        )
        some, every = some & a_some.to(device), every & a_every.to(device)
    for test in lists.tests:
        t_some, t_every = _test_classes(test, inputs, M, N, BM, BN, Tq, Tk)
        some, every = some & t_some, every & t_every
    if N % BN:  # the last key tile is cut by the end of the keys: only a masked body checks n < N
        every[:, :, -1] = False
    partial = some & ~every
    j = torch.arange(Tk, device=device)
    order = torch.where(every, j, torch.where(partial, Tk + j, 2 * Tk + j)).argsort(dim=-1)
    counts = torch.stack([every.sum(-1), partial.sum(-1)], dim=-1)
    return order.to(torch.int32).contiguous(), counts.to(torch.int32).contiguous()


@functools.cache
def _param_names(affine: Expr) -> frozenset[str]:
    return frozenset(x.name for x in walk(affine) if isinstance(x, Param))
