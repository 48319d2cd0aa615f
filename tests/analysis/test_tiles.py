"""Tile plans of affine masks against the materialised mask: every tile of many small sizes,
and the counts of a long causal sequence without materialising anything."""

from __future__ import annotations

import functools
import itertools
import time
from fractions import Fraction

import pytest
import torch
from catalogue import load_example

import einflash as ef
from einflash.compiler.analysis.mask_tiles import (
    ROW_BOUNDS,
    I,
    Interval,
    TilePlan,
    _compiled,
    affine_form,
    count_tiles,
    is_affine,
    tile_plan,
    tile_rows,
)
from einflash.errors import DeclarationError, MissingInputError, ShapeError
from einflash.ir.expr import Call, Const, Coord, Expr, Param, Read, Size, call
from einflash.ir.operators import OPERATORS
from einflash.ir.ranks import coord

SIZES = [(1, 1), (7, 13), (13, 7), (16, 16), (33, 20), (20, 33)]  # (M, N): M ≠ N, odd, not multiples of tiles
TILES = [(1, 1), (4, 4), (4, 8), (8, 4), (3, 5), (16, 16)]  # (BM, BN)


def _mask_of(op) -> tuple[Expr, frozenset[str]]:
    c = op.cascade
    return next(e.where for e in c.einsums if e.where is not None), frozenset(p.name for p in c.params if p.integer)


@functools.cache
def _example(name: str) -> tuple[Expr, frozenset[str]]:
    return _mask_of(getattr(load_example(name), name))


@ef.attention
def _bottom_right(q, k, v):
    return ef.softmax(ef.mask(q @ k * ef.scale, ef.n <= ef.m + (ef.N - ef.M)), "n") @ v


@ef.attention
def _band(q, k, v, lo: float = 1.5, hi: float = 2.5):
    """A band with real-valued edges and ~, ==, != in it: rounding must be right on both sides."""
    return (
        ef.softmax(
            ef.mask(
                q @ k * ef.scale, ~(ef.m - ef.n > hi) & (ef.n - ef.m < lo) & (ef.n != ef.m - 1) | (ef.m == 2 * ef.n)
            ),
            "n",
        )
        @ v
    )


def _materialise(pred: Expr, M: int, N: int, params: dict) -> torch.Tensor:
    """The [M, N] boolean mask, evaluated point by point with the operators' torch forms."""

    def ev(x):
        if isinstance(x, Call):
            return OPERATORS[x.op].torch(*(torch.as_tensor(ev(a)) for a in x.args))
        if isinstance(x, Coord):
            return torch.arange(M)[:, None] if x.rank == "m" else torch.arange(N)[None, :]
        if isinstance(x, Size):
            return {"m": M, "n": N}[x.rank]
        return params[x.name] if isinstance(x, Param) else x.value

    return torch.broadcast_to(ev(pred), (M, N))


def _truth(mask: torch.Tensor, BM: int, BN: int) -> tuple[list[set[int]], list[set[int]]]:
    """Per query tile: the sets of non-empty and of full key tiles."""
    nonempty, full = [], []
    for i in range(0, mask.shape[0], BM):
        rows = mask[i : i + BM]
        tiles = [rows[:, j : j + BN] for j in range(0, mask.shape[1], BN)]
        nonempty.append({j for j, t in enumerate(tiles) if t.any()})
        full.append({j for j, t in enumerate(tiles) if t.all()})
    return nonempty, full


def _tiles(spans) -> set[int]:
    return {j for lo, hi in spans for j in range(lo, hi)}


def _assert_disjoint_runs(plan: TilePlan, M: int, N: int, BM: int, BN: int, params: dict, i: int) -> None:
    """The kernel loops over the full runs one after another: no tile may be in two of them."""
    env = {
        "M": M,
        "N": N,
        "BM": BM,
        "BN": BN,
        "m0": i * BM,
        "m1": min((i + 1) * BM, M) - 1,
        **{k: Fraction(v) for k, v in params.items()},
    }
    runs = [span for f in _compiled(plan).full if (span := f(env)) is not None]
    assert sum(max(0, hi - lo) for lo, hi in runs) == len(_tiles(runs))


def _check(pred: Expr, integers: frozenset[str], params: dict, exact: bool = True) -> tuple[int, int]:
    """Compare the plan with the materialised mask over SIZES × TILES.

    Returns the partial tiles seen and the tiles a conservative plan misclassifies (safely)."""
    plan = tile_plan(pred, integers)
    assert plan.exact is exact
    partial = slack = 0
    for (M, N), (BM, BN) in itertools.product(SIZES, TILES):
        nonempty, full = _truth(_materialise(pred, M, N, params), BM, BN)
        rows = list(tile_rows(plan, M, N, BM, BN, **params))
        assert len(rows) == len(nonempty)
        for i, row in enumerate(rows):
            _assert_disjoint_runs(plan, M, N, BM, BN, params, i)
            got_nonempty, got_full = _tiles(row.nonempty), _tiles(row.full)
            where = f"M={M} N={N} BM={BM} BN={BN} {params} query tile {i}"
            if exact:
                assert (got_nonempty, got_full) == (nonempty[i], full[i]), where
            else:  # never skip a tile that holds a point, never leave a mixed tile unmasked
                assert got_nonempty >= nonempty[i] and got_full <= full[i], where
            partial += len(nonempty[i] - full[i])
            slack += len(got_nonempty - nonempty[i]) + len(full[i] - got_full)
        counts = count_tiles(plan, M, N, BM, BN, **params)
        empty, n_full = counts.total - sum(map(len, nonempty)), sum(map(len, full))
        assert counts.total == len(nonempty) * -(-N // BN)
        if exact:
            assert (counts.empty, counts.full) == (empty, n_full)
        else:
            assert counts.empty <= empty and counts.full <= n_full
    return partial, slack


@pytest.mark.parametrize(
    "name, grid",
    [
        ("causal", [{}]),
        ("sliding_window", [{"window": w} for w in (-1, 0, 1, 3, 8, 40)]),
        ("prefix_lm", [{"prefix": p} for p in (-2, 0, 5, 17, 64)]),
        ("sink_window", [{"window": w, "sinks": s} for w, s in itertools.product((1, 3, 9, 40), (0, 1, 6, 21))]),
    ],
)
def test_catalogue_masks_are_exact_on_every_tile(name, grid):
    pred, integers = _example(name)
    assert sum(_check(pred, integers, params)[0] for params in grid) > 0  # the sizes do cut tiles


def test_bottom_right_causal_uses_both_extents():
    pred, integers = _mask_of(_bottom_right)
    assert _check(pred, integers, {})[0] > 0


def test_real_parameters_round_both_ways():
    pred, integers = _mask_of(_band)
    assert integers == frozenset()
    for lo, hi in ((1.5, 2.5), (0.0, 3.0), (-0.5, 7.25), (2.0, -1.0)):
        _check(pred, integers, {"lo": lo, "hi": hi})


def test_sink_window_full_tiles_need_both_disjuncts():
    """Query rows 8..11 against keys 0..7 with W = 8, S = 6: neither the window nor the sinks
    covers the tile alone, together they do; the plan must call it full."""
    pred, integers = _example("sink_window")
    causal, (window, sinks) = pred.args[0], pred.args[1].args
    params = {"window": 8, "sinks": 6}
    for alone in (call("and", causal, window), call("and", causal, sinks)):
        assert not _materialise(alone, 12, 8, params)[8:].all()
    assert _materialise(pred, 12, 8, params)[8:].all()
    row = list(tile_rows(tile_plan(pred, integers), M=12, N=8, BM=4, BN=8, **params))[2]
    assert row.full == ((0, 1),)


def test_non_unit_row_weights_are_safe():
    """3m = 2n + 1 holds on a lattice (n ≡ 1 mod 3); a block of rows projects onto every n in
    between, so with one key per tile some empty tiles are visited: safe, and reported."""
    m, n = Coord("m"), Coord("n")
    pred = call("eq", call("mul", Const(3.0), m), call("add", call("mul", Const(2.0), n), Const(1.0)))
    assert _check(pred, frozenset(), {}, exact=False)[1] > 0


def test_causal_long_sequence_counts_fast():
    plan = tile_plan(*_example("causal"))
    start = time.perf_counter()
    counts = count_tiles(plan, M=8192, N=8192, BM=128, BN=128)
    big = count_tiles(plan, M=1 << 20, N=1 << 20, BM=64, BN=64)
    assert time.perf_counter() - start < 2.0
    assert (counts.empty, counts.partial, counts.full, counts.total) == (2016, 64, 2016, 4096)
    t = (1 << 20) // 64  # square tiles on a square grid: the diagonal is partial, the halves split the rest
    assert (big.empty, big.partial, big.full) == (t * (t - 1) // 2, t, t * (t - 1) // 2)


def test_formulas_in_the_row_index_match_the_evaluation():
    """Substituting ROW_BOUNDS gives lo_j(i), hi_j(i) in sympy; they agree with tile_rows."""
    pred, integers = _example("sink_window")
    plan = tile_plan(pred, integers)
    values = {"M": 37, "N": 29, "BM": 8, "BN": 4, "window": 6, "sinks": 3}

    def spans(ivs: tuple[Interval, ...], i: int) -> set[int]:
        def at(x):
            x = x.subs(ROW_BOUNDS)
            return x.subs({s: i if s == I else values[s.name] for s in x.free_symbols})

        return {j for iv in ivs if at(iv.when) for j in range(int(at(iv.lo)), int(at(iv.hi)))}

    for i, row in enumerate(tile_rows(plan, **values)):
        assert spans(plan.visit, i) == _tiles(row.nonempty) and spans(plan.full, i) == _tiles(row.full)


def test_plan_prints_its_bounds():
    text = str(tile_plan(*_example("sliding_window")))
    assert "non-empty [Max(0, floor((m0 - window + 1)/BN))" in text and text.endswith("exact")


@pytest.mark.parametrize("name", ["document_mask", "top_theta"])
def test_data_dependent_masks_have_no_plan(name):
    pred, integers = _example(name)
    assert not is_affine(pred) and tile_plan(pred, integers) is None


@pytest.mark.parametrize(
    "pred",
    [
        call("le", call("mul", Coord("m"), Coord("n")), Const(4.0)),  # a product of coordinates
        call("eq", call("floordiv", Coord("m"), Const(64.0)), call("floordiv", Coord("n"), Const(64.0))),
        call("le", Coord("n"), call("mul", Param("stride"), Coord("m"))),  # a weight that is a parameter
        call("le", Coord("h"), Coord("m")),  # another rank
        call("le", Read("x", (coord("m"),)), Coord("n")),
        call("le", Coord("n"), Const(float("inf"))),
        call("le", call("abs", Coord("n")), Coord("m")),
    ],
)
def test_non_affine_predicates(pred):
    assert affine_form(pred) is None and not is_affine(pred)


def test_constant_predicates():
    m, n = Coord("m"), Coord("n")
    always, never = call("ge", Const(3.0), Const(2.0)), call("and", call("lt", n, m), call("lt", m, n))
    assert count_tiles(tile_plan(always), M=9, N=10, BM=4, BN=4).full == 9
    assert count_tiles(tile_plan(never), M=9, N=10, BM=4, BN=4).empty == 9
    assert tile_plan(never).visit == () and tile_plan(always).cut == ()
    assert count_tiles(tile_plan(always), M=0, N=10, BM=4, BN=4).total == 0


def test_bad_calls_raise():
    plan = tile_plan(*_example("sliding_window"))
    with pytest.raises(MissingInputError, match="window"):
        count_tiles(plan, M=8, N=8, BM=4, BN=4)
    with pytest.raises(MissingInputError, match="an int"):
        count_tiles(plan, M=8, N=8, BM=4, BN=4, window=2.5)
    with pytest.raises(ShapeError, match="BN"):
        count_tiles(plan, M=8, N=8, BM=4, BN=0, window=2)
    with pytest.raises(DeclarationError, match="BN"):
        tile_plan(call("le", Coord("n"), Param("BN")))


# -- key tiles listed at run time (masks on per-token data) --------------------------------------


def _listed(M, N, BM, BN, doc: torch.Tensor, pack: bool = False) -> tuple[list[list[set[int]]], list[list[set[int]]]]:
    """tile_lists for the document mask, as per (batch, query tile) sets of full and of partial key tiles."""
    from einflash.compiler.codegen.forward import sections
    from einflash.compiler.codegen.tile_ranges import key_plan
    from einflash.compiler.runtime.tile_lists import tile_lists

    c = load_example("document_mask").document_mask.forward.rewritten
    lists = key_plan(c, sections(c).loop).lists
    tiles, counts = tile_lists(lists, {"doc": doc}, {}, doc.shape[0], M, N, BM, BN, pack)
    full = [[set(tiles[b, i, :f].tolist()) for i, (f, _) in enumerate(counts[b].tolist())] for b in range(doc.shape[0])]
    partial = [
        [set(tiles[b, i, f : f + p].tolist()) for i, (f, p) in enumerate(counts[b].tolist())]
        for b in range(doc.shape[0])
    ]
    return full, partial


def _document_truth(doc: torch.Tensor, M: int, N: int, BM: int, BN: int):
    """Per (batch, query tile): the non-empty key tiles, and the full ones not cut by the end of the keys."""
    truths = []
    for d in doc:
        mask = (d[:M, None] == d[None, :N]) & (torch.arange(N)[None, :] <= torch.arange(M)[:, None])
        nonempty, full = _truth(mask, BM, BN)
        cut = -(-N // BN) - 1 if N % BN else None
        truths.append((nonempty, [f - {cut} for f in full]))
    return truths


@pytest.mark.parametrize("M, N, BM, BN", [(37, 45, 16, 32), (45, 45, 8, 8), (64, 64, 16, 16), (20, 33, 4, 8)])
def test_listed_tiles_are_safe_for_any_document_ids(M, N, BM, BN):
    """Unsorted ids: every non-empty tile is listed, and a tile listed full is full."""
    doc = torch.randint(0, 4, (2, max(M, N)))
    full, partial = _listed(M, N, BM, BN, doc)
    for b, (nonempty, truly_full) in enumerate(_document_truth(doc, M, N, BM, BN)):
        for i in range(len(nonempty)):
            assert not full[b][i] & partial[b][i]
            assert nonempty[i] <= full[b][i] | partial[b][i]
            assert full[b][i] <= truly_full[i]


@pytest.mark.parametrize("BM, BN", [(8, 8), (8, 16), (16, 8)])
def test_listed_tiles_are_exact_for_documents_aligned_to_tiles(BM, BN):
    """Documents of 16 tokens: each tile lies in one document, so the ranges decide every tile exactly."""
    M = N = 64
    doc = (torch.arange(N) // 16).expand(2, N).contiguous()
    full, partial = _listed(M, N, BM, BN, doc)
    for b, (nonempty, truly_full) in enumerate(_document_truth(doc, M, N, BM, BN)):
        assert [f | p for f, p in zip(full[b], partial[b])] == nonempty
        assert full[b] == truly_full


def test_listed_tiles_of_a_packed_program_cover_all_its_rows():
    doc = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, 2, 2]])
    full, partial = _listed(3, 10, 16, 4, doc, pack=True)
    assert len(full[0]) == 1 and full[0][0] == set() and partial[0][0] == {0}  # rows 0-2 see keys 0-2 only


def _explained_tiles(mask, M=512, N=640, c=64) -> dict:
    @ef.attention
    def masked(q, k, v, c: int = c):
        return ef.softmax(ef.mask(q @ k * ef.scale, mask(c)), "n") @ v

    return masked.explain(ef.Shape(1, 2, M, N, 64)).tiles


def _brute_tiles(mask: torch.Tensor, BM: int, BN: int) -> tuple[int, int]:
    """(non-empty, full) tiles of an [M, N] mask."""
    blocks = [mask[i : i + BM, j : j + BN] for i in range(0, mask.shape[0], BM) for j in range(0, mask.shape[1], BN)]
    return sum(bool(b.any()) for b in blocks), sum(bool(b.all()) for b in blocks)


@pytest.mark.parametrize(
    "name, declared, brute",
    [
        ("block diagonal", lambda c: ef.n // c == ef.m // c, lambda m, n, c: n // c == m // c),
        (
            "chunked local causal",
            lambda c: (ef.m // c == ef.n // c) & (ef.n <= ef.m),
            lambda m, n, c: (m // c == n // c) & (n <= m),
        ),
    ],
)
def test_explain_counts_the_tiles_of_masks_on_positions(name, declared, brute):
    t = _explained_tiles(declared)
    m, n = torch.arange(512)[:, None], torch.arange(640)[None, :]
    assert (t["partial"] + t["full"], t["full"]) == _brute_tiles(brute(m, n, 64), t["block_m"], t["block_n"])
    assert t["tested_in_every_tile"] == []


def test_explain_does_not_call_tiles_full_that_the_rest_of_the_mask_still_cuts():
    t = _explained_tiles(lambda c: ((ef.m - ef.n) % 3 == 0) & (ef.n <= ef.m))
    causal = _explained_tiles(lambda c: ef.n <= ef.m)
    assert (t["empty"], t["partial"] + t["full"]) == (causal["empty"], causal["partial"] + causal["full"])
    assert t["full"] == 0 and not t["exact"] and t["tested_in_every_tile"] == ["(m − n)%3 == 0"]


@pytest.mark.parametrize("documents", [1, 5, 40])
def test_explain_counts_the_pairs_and_tiles_of_given_document_ids(documents):
    """With document ids, explain classifies the tiles as the run time does and counts the pairs the mask keeps
    and the tiles holding one, each against the materialised mask."""

    @ef.attention
    def docs(q, k, v, doc: ef.Tensor["b n"]):
        return ef.softmax(ef.mask(q @ k, (doc[ef.m] == doc[ef.n]) & (ef.n <= ef.m)), "n") @ v

    g = torch.Generator().manual_seed(documents)
    ids = torch.randint(0, documents, (2, 700), generator=g).sort(dim=-1).values
    t = docs.explain(ef.Shape(2, 4, 700, 700, 64), inputs={"doc": ids}).tiles
    m, n = torch.arange(700)[:, None], torch.arange(700)[None, :]
    masks = [(row[:, None] == row[None, :]) & (n <= m) for row in ids]
    assert t["pairs"] == sum(int(x.sum()) for x in masks) and t["all_pairs"] == 2 * 700 * 700
    brute = [_brute_tiles(x, t["block_m"], t["block_n"]) for x in masks]
    assert t["tiles_with_pairs"] == sum(nonempty for nonempty, _ in brute)
    assert t["partial"] + t["full"] >= t["tiles_with_pairs"] and t["full"] <= sum(full for _, full in brute)
    with pytest.raises(ef.errors.ParameterError, match="inputs maps names"):
        docs.explain(inputs={"ids": ids})
