"""Transposed tile plans (query tiles per key tile, what the backward's dK/dV kernel visits) against the
materialised mask on every tile of many small sizes."""

from __future__ import annotations

import itertools

import pytest
from test_tiles import SIZES, TILES, _band, _bottom_right, _example, _mask_of, _materialise

from einflash.compiler.analysis.mask_tiles import count_tiles, tile_plan, tile_rows, transposed_plan


def _truth(mask, BM: int, BN: int) -> tuple[list[set[int]], list[set[int]]]:
    """Per key tile: the sets of non-empty and of full query tiles."""
    nonempty, full = [], []
    for j in range(0, mask.shape[1], BN):
        cols = mask[:, j : j + BN]
        tiles = [cols[i : i + BM] for i in range(0, mask.shape[0], BM)]
        nonempty.append({i for i, t in enumerate(tiles) if t.any()})
        full.append({i for i, t in enumerate(tiles) if t.all()})
    return nonempty, full


def _tiles(spans) -> set[int]:
    return {i for lo, hi in spans for i in range(lo, hi)}


def _check(pred, integers, params, exact=True) -> int:
    plan = transposed_plan(pred, integers)
    assert plan.over == "m" and plan.exact is exact
    partial = 0
    for (M, N), (BM, BN) in itertools.product(SIZES, TILES):
        nonempty, full = _truth(_materialise(pred, M, N, params), BM, BN)
        cols = list(tile_rows(plan, M, N, BM, BN, **params))
        assert len(cols) == len(nonempty)
        for j, col in enumerate(cols):
            where = f"M={M} N={N} BM={BM} BN={BN} {params} key tile {j}"
            got_nonempty, got_full = _tiles(col.nonempty), _tiles(col.full)
            if exact:
                assert (got_nonempty, got_full) == (nonempty[j], full[j]), where
            else:
                assert got_nonempty >= nonempty[j] and got_full <= full[j], where
            partial += len(nonempty[j] - full[j])
        if exact:  # the same pairs as the plan of key tiles per query tile
            assert count_tiles(plan, M, N, BM, BN, **params) == count_tiles(
                tile_plan(pred, integers), M, N, BM, BN, **params
            )
    return partial


@pytest.mark.parametrize(
    "name, grid",
    [
        ("causal", [{}]),
        ("sliding_window", [{"window": w} for w in (-1, 0, 1, 3, 8, 40)]),
        ("prefix_lm", [{"prefix": p} for p in (-2, 0, 5, 17, 64)]),
        ("sink_window", [{"window": w, "sinks": s} for w, s in itertools.product((1, 3, 9), (0, 1, 6))]),
    ],
)
def test_catalogue_masks_are_exact_on_every_tile(name, grid):
    pred, integers = _example(name)
    assert sum(_check(pred, integers, params) for params in grid) > 0


def test_bottom_right_causal_uses_both_extents():
    assert _check(*_mask_of(_bottom_right), {}) > 0


def test_real_parameters_round_both_ways():
    """The band has m == 2n: eliminating n (weight 2) is conservative, never wrong."""
    pred, integers = _mask_of(_band)
    for lo, hi in ((1.5, 2.5), (0.0, 3.0), (-0.5, 7.25)):
        _check(pred, integers, {"lo": lo, "hi": hi}, exact=False)


def test_a_plan_prints_query_tiles_per_key_tile():
    text = str(transposed_plan(*_example("causal")))
    assert "query tiles i of key tile j (n0 = BN*j" in text and "exact" in text
