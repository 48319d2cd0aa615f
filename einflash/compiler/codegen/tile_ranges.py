"""Which key tiles a query tile visits (and which query tiles a key tile visits), and which evaluate the mask.

The loop of the one-pass kernel runs over ranges of key tiles (the backward's dK/dV kernel: of
query tiles, from the transposed plan). Ranges come from
the symbolic tile plan of the mask (``einflash.compiler.analysis.mask_tiles.tile_plan``): tiles proven empty are
never visited; tiles proven full run a body that skips the affine part of the
mask; the remaining tiles (cut by the mask or by the end of the sequence) run the
masked body. A mask with a conjunct that compares per-token data at the query and the key,
``x[m] == y[n]`` (document ids), gets its tiles classified at run time instead:
per-block ranges of x and y (with the affine part's plan) sort each query tile's key
tiles into lists of full and partial ones (``einflash.compiler.runtime.tile_lists``), and the kernel
visits the listed tiles only. Other data-dependent parts (score thresholds) are evaluated
in every body. Without a usable plan, every tile runs the masked body.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeGuard

import sympy

from ...ir.cascade import Cascade, Einsum, Role
from ...ir.expr import Call, Coord, Expr, Read, walk
from ...ir.ranks import STREAM, coord
from ..analysis.mask_tiles import (
    BM,
    BN,
    M0,
    M1,
    N0,
    N1,
    I,
    Interval,
    J,
    M,
    N,
    TilePlan,
    affine_part,
    conjuncts,
    tile_plan,
    transposed_plan,
)


@dataclass(frozen=True)
class KeyRange:
    lo: str  # first key position (a multiple of BLOCK_N), as a Triton expression
    hi: str  # end of the range, as a Triton expression
    masked: bool
    skip: frozenset = frozenset()  # mask conjuncts that hold on every tile of this range
    comment: str = ""
    skip_tile: str | None = None  # a condition on tile index `j` under which the tile is left out
    pipelined: bool = True  # False for ranges of a tile or two, where a software pipeline only adds set-up
    # With ``tile``, the loop runs over positions lo ≤ t < hi, and ``tile`` (an expression of t) is the key
    # tile visited at position t: a list of tiles made at run time, or runs of tiles laid end to end.
    tile: str | None = None

    def slots(self, body: list[str]) -> dict:
        """This range as a template's loop slot, with the code of its ``body``."""
        return dict(
            lo=self.lo,
            hi=self.hi,
            comment=self.comment,
            body="\n".join(body),
            skip_tile=self.skip_tile,
            pipelined=self.pipelined,
            tile=self.tile,
        )


@dataclass(frozen=True)
class BlockTest:
    """A mask conjunct ``f(m) == g(n)``: each side a function of one position, its coordinate and inputs read
    per token there (document ids ``doc[m] == doc[n]``, blocks ``m // 64 == n // 64``).

    A tile holds none of its pairs where the two sides' value ranges over the tile's rows and keys
    are disjoint, and all of them where both ranges are one and the same value.
    """

    query_side: Expr
    key_side: Expr


@dataclass(frozen=True)
class TileLists:
    """What classifies key tiles at run time: the block tests, and the mask's affine part (or None)."""

    tests: tuple[BlockTest, ...]
    affine: Expr | None
    integers: frozenset[str]


@dataclass(frozen=True)
class KeyPlan:
    """The loops of one query tile: scalar set-up code, then the ranges."""

    setup: tuple[str, ...]
    ranges: tuple[KeyRange, ...]
    plan: TilePlan | None = None
    lists: TileLists | None = None


def governing_mask(
    c: Cascade, loop: tuple[Einsum, ...], ranks: frozenset = frozenset({STREAM}), outputs: frozenset = frozenset()
) -> Expr | None:
    """A filter every reduction over ``ranks`` (and every Einsum named in ``outputs``) depends on, through it or
    another filter of the same affine part (one filter in a forward; a mask and the adjoints it masks in a
    backward, whose per-row filters of saved states are no mask of tiles). Of several affine parts (multi-token
    attention's shifted scores' `n − j ≤ m − i`, none, then the causal mask on their convolution), the first that
    governs, one with a tile plan before none: the others' conjuncts are then evaluated in every tile it visits."""
    filters = [(e.out, e.where) for e in loop if e.where is not None and ranks <= e.iteration_ranks]
    integers = frozenset(p.name for p in c.params if p.integer)
    parts = [affine_part(where, integers) for _, where in filters]
    for k in sorted(range(len(parts)), key=lambda k: parts[k] is None):  # a part that gives a tile plan first
        part = parts[k]
        if part not in parts[:k] and governs(
            loop, ranks, outputs, {o for (o, _), p in zip(filters, parts) if p == part}
        ):
            return filters[k][1]
    return None


def governs(loop: tuple[Einsum, ...], ranks: frozenset, outputs: frozenset, names: set[str]) -> bool:
    """Whether every reduction over ``ranks`` in ``loop`` and every Einsum in ``outputs`` reads one of ``names``."""
    deps: dict[str, set[str]] = {}
    for e in loop:
        mine = {e.out} if e.out in names else set()
        for r in e.reads():
            if not r.prev:
                mine |= deps.get(r.tensor, set())
        deps[e.out] = mine
    return all(deps[e.out] for e in loop if (e.reduce is not None and set(e.reduce.ranks) & ranks) or e.out in outputs)


@dataclass(frozen=True)
class _Sweep:
    """How a kernel streams one sequence past a fixed tile of the other: names in the generated code."""

    tile: str  # tile size of the streamed rank
    extent: str  # its extent
    what: str  # "key" or "query"
    bounds: tuple[str, ...]  # set-up lines defining the fixed tile's first and last position and `whole`
    edge: str  # start of the streamed tiles cut by the end of the sequence (or of a cut fixed tile)
    edge_setup: tuple[str, ...]  # set-up lines the edge needs
    plan: Callable[[Expr, frozenset[str]], TilePlan | None]  # tile_plan or transposed_plan


_KEYS = _Sweep(
    "BLOCK_N",
    "N",
    "key",
    # rows of a packed program (decoding) cover every query position of their heads
    (
        "m0 = 0 if PACK else pid_m * BLOCK_M",
        "m1 = M - 1 if PACK else tl.minimum((pid_m + 1) * BLOCK_M, M) - 1",
        "whole = N // BLOCK_N",
    ),
    "(N // BLOCK_N) * BLOCK_N",
    (),
    tile_plan,
)
# A key tile cut by the end of the keys has no full query tile: keys past N must be absent in all of them.
_WHOLE_QUERIES = "whole = tl.where((pid_n + 1) * BLOCK_N > N, 0, M // BLOCK_M)"
_QUERIES = _Sweep(
    "BLOCK_M",
    "M",
    "query",
    ("n0 = pid_n * BLOCK_N", "n1 = tl.minimum((pid_n + 1) * BLOCK_N, N) - 1", _WHOLE_QUERIES),
    "whole * BLOCK_M",
    (_WHOLE_QUERIES,),
    transposed_plan,
)


def key_plan(c: Cascade, loop: tuple[Einsum, ...]) -> KeyPlan:
    """The key-tile loops of a query tile (see the module docstring)."""
    return _stream_plan(c, loop, _KEYS, governing_mask(c, loop), lists=True)


def query_plan(c: Cascade, loop: tuple[Einsum, ...], outputs: frozenset = frozenset()) -> KeyPlan:
    """The query-tile loops of a key tile, for kernels that keep a key tile and stream queries (dK/dV).

    Empty query tiles are skipped when every reduction over m or n in the loop, and every Einsum named
    in ``outputs`` (values stored per tile), depends on the mask. Per-token data conjuncts (document
    ids) are evaluated in every tile: run-time tile lists exist for key tiles of a query tile only.
    """
    pairs = frozenset({"m", "n"})
    return _stream_plan(c, loop, _QUERIES, governing_mask(c, loop, pairs, outputs), lists=False, ranks=pairs)


def _stream_plan(
    c: Cascade,
    loop: tuple[Einsum, ...],
    s: _Sweep,
    mask: Expr | None,
    lists: bool,
    ranks: frozenset = frozenset({STREAM}),
) -> KeyPlan:
    edge, t = s.edge, s.tile
    if not any(e.where is not None and ranks <= e.iteration_ranks for e in loop):  # no mask on tile pairs
        return KeyPlan(
            s.edge_setup,
            (
                KeyRange("0", edge, False, comment=f"whole {s.what} tiles"),
                KeyRange(edge, s.extent, True, comment=f"the last {s.what} tile, cut by the end of the {s.what}s"),
            ),
        )
    everything = KeyPlan((), (KeyRange("0", s.extent, True, comment=f"every {s.what} tile, masked"),))
    if mask is None:
        return everything
    integers = frozenset(p.name for p in c.params if p.integer)
    pred = affine_part(mask, integers)
    tests = block_tests(c, mask) if lists else ()
    if tests:
        return _listed(mask, TileLists(tests, pred, integers), None if pred is None else tile_plan(pred, integers))
    if pred is None:
        return everything
    affine = conjuncts(pred)
    plan = s.plan(pred, integers)
    assert plan is not None, pred  # an affine part has a tile plan
    setup = list(s.bounds)
    full = []
    # full runs of which at most one exists in any query tile share a loop (the tile plan splits cases)
    for k, group in enumerate(exclusive_groups(plan.full)):
        setup += _interval(f"full{k}", *group)
        setup.append(f"full{k}_hi = tl.minimum(full{k}_hi, whole)")  # a tile cut by N is masked
        full.append(f"full{k}")
    ranges = [
        KeyRange(
            f"{name}_lo * {t}",
            f"{name}_hi * {t}",
            False,
            frozenset(affine),
            f"full {s.what} tiles: the mask holds everywhere ({name})",
        )
        for name in full
    ]
    # the full tiles' hull [f_lo, f_hi): when they are one contiguous run (always for a single band),
    # each visited range splits into a masked run before it and one after it, with no per-tile tests
    setup += [f"ntiles = tl.cdiv({s.extent}, {t})", "f_lo = ntiles", "f_hi = 0", "f_len = 0"]
    for name in full:
        setup += [
            f"f_lo = tl.where({name}_hi > {name}_lo, tl.minimum(f_lo, {name}_lo), f_lo)",
            f"f_hi = tl.where({name}_hi > {name}_lo, tl.maximum(f_hi, {name}_hi), f_hi)",
            f"f_len += tl.maximum({name}_hi - {name}_lo, 0)",
        ]
    setup += ["f_lo = tl.where(f_len > 0, f_lo, ntiles)", "f_hi = tl.where(f_len > 0, f_hi, ntiles)"]
    if len(full) > 1:  # one run of full tiles leaves no gap in its hull
        setup.append("gap = (f_len > 0) & (f_hi - f_lo != f_len)")
    in_full = " | ".join(f"(({name}_lo <= j) & (j < {name}_hi))" for name in full)
    seen: list[str] = []  # tiles of earlier visited ranges, already processed
    for k, iv in enumerate(plan.visit):
        # the visited tiles outside the full hull: the runs [lo, a) before it and [b, hi) after it, and, where
        # the full runs leave gaps (several groups), [a, gap_end) inside it, whose full tiles are left out
        v = f"visit{k}"
        setup += _interval(v, iv)
        setup += [
            f"{v}_a = tl.minimum(tl.maximum(f_lo, {v}_lo), {v}_hi)",
            f"{v}_b = tl.minimum(tl.maximum(f_hi, {v}_lo), {v}_hi)",
        ]
        runs = [(f"{v}_lo", f"{v}_a"), (f"{v}_b", f"{v}_hi")]
        skip = list(seen)
        if len(full) > 1:
            setup.append(f"{v}_g = tl.where(gap, {v}_b, {v}_a)")
            runs.insert(1, (f"{v}_a", f"{v}_g"))
            skip.append(f"(({v}_a <= j) & (j < {v}_g) & ({in_full}))")
        lines, tile = _runs(v, runs, t)
        setup += lines
        ranges.append(
            KeyRange(
                "0",
                f"{v}_count",
                True,
                comment=f"{s.what} tiles of {v} cut by the mask or the end of the {s.what}s",
                skip_tile=" | ".join(skip) or None,
                tile=tile,
            )
        )
        seen.append(f"(({v}_lo <= j) & (j < {v}_hi))")
    return KeyPlan(tuple(setup), tuple(ranges), plan)


def _runs(name: str, runs: list[tuple[str, str]], block: str = "BLOCK_N") -> tuple[list[str], str]:
    """Runs of key tiles ``[lo, hi)`` (this split's share of each) laid end to end for one loop over t.

    Returns the scalar code that sets ``name_count``, the number of tiles, and the expression of
    the tile at position t. One loop visits them all, software-pipelined: its tiles are known before it starts.
    """
    lines, before, tile = [], "0", ""
    for k, (lo, hi) in enumerate(runs):
        start, count = f"{name}_r{k}", f"{name}_n{k}"
        lines += [
            f"{start} = tl.maximum({lo}, split_lo // {block})",
            f"{count} = tl.maximum(tl.minimum({hi}, split_hi // {block}) - {start}, 0)",
        ]
        here = f"{start} + t - {name}_c{k}" if k else f"{start} + t"
        if k:
            lines.append(f"{name}_c{k} = {before}")
        tile = f"tl.where(t < {name}_c{k}, {tile}, {here})" if k else here
        before = f"{before} + {count}" if k else count
    lines.append(f"{name}_count = {before}")
    return lines, tile


def _per_token_read(x: Expr, c: Cascade, rank: str) -> TypeGuard[Read]:
    """Whether ``x`` reads an input at plain (b, ``rank``) coordinates: one value per token of a sequence."""
    if not (isinstance(x, Read) and not x.prev and c.tensor(x.tensor).role is Role.INPUT):
        return False
    decl = c.tensor(x.tensor)
    return (
        len(decl.ranks) == 2
        and decl.ranks[0] == "b"
        and decl.ranks[1] in ("m", "n")
        and tuple(x.index) == (coord("b"), coord(rank))
    )


# exact on the integers a side holds: the run time's ranges of a side match what the kernel compares
_SIDE_OPS = frozenset({"add", "sub", "mul", "neg", "floordiv", "mod", "maximum", "minimum", "abs"})


def token_side(x: Expr, c: Cascade, rank: str) -> bool:
    """Whether ``x`` is a function of ``rank``'s position alone: its coordinate and inputs read per token there,
    with parameters, extents and constants, by integer arithmetic (the run time evaluates it per position)."""
    positional = False
    for y in walk(x):
        if isinstance(y, Coord):
            if y.rank != rank:
                return False
            positional = True
        elif isinstance(y, Read):
            if not _per_token_read(y, c, rank):
                return False
            positional = True
        elif isinstance(y, Call) and y.op not in _SIDE_OPS:
            return False
    return positional


def block_tests(c: Cascade, where: Expr) -> tuple[BlockTest, ...]:
    """The conjuncts of ``where`` that compare a function of the query's position with one of the key's."""
    integers = frozenset(p.name for p in c.params if p.integer)
    tests = []
    for p in conjuncts(where):
        if isinstance(p, Call) and p.op == "eq" and tile_plan(p, integers) is None:  # affine ones: the plan's
            a, b = p.args
            for q_side, k_side in ((a, b), (b, a)):
                if token_side(q_side, c, "m") and token_side(k_side, c, "n"):
                    tests.append(BlockTest(q_side, k_side))
                    break
    return tuple(tests)


def _listed(where: Expr, lists: TileLists, plan: TilePlan | None) -> KeyPlan:
    """Loops over the query tile's listed key tiles: the full ones, then the partial ones."""
    # a packed program (decoding) holds every query position of its heads: its tile list is row 0
    setup = (
        "qt = 0 if PACK else pid_m",
        "tiles_row = tiles_ptr + off_b * stride_tiles_0 + qt * stride_tiles_1",
        "counts_row = counts_ptr + off_b * stride_counts_0 + qt * stride_counts_1",
        "n_full = tl.load(counts_row)",
        "n_partial = tl.load(counts_row + stride_counts_2)",
    )
    listed = "tl.load(tiles_row + t * stride_tiles_2)"
    split = ("split_lo // BLOCK_N", "split_hi // BLOCK_N")  # a split takes its share of list positions
    return KeyPlan(
        setup,
        (
            KeyRange(
                f"tl.maximum(0, {split[0]})",
                f"tl.minimum(n_full, {split[1]})",
                False,
                frozenset(conjuncts(where)),
                "listed key tiles the whole mask holds on",
                tile=listed,
            ),
            KeyRange(
                f"tl.maximum(n_full, {split[0]})",
                f"tl.minimum(n_full + n_partial, {split[1]})",
                True,
                comment="listed key tiles the mask cuts",
                tile=listed,
            ),
        ),
        plan,
        lists,
    )


def _exclusive(a: sympy.Basic, b: sympy.Basic) -> bool:
    """Whether ``a`` and ``b`` provably never hold together: a conjunct of one negates a conjunct of the other."""
    parts_a = set(sympy.And.make_args(a)) | {a}
    return any(sympy.Not(x) in parts_a for x in set(sympy.And.make_args(b)) | {b})


def exclusive_groups(intervals: tuple[Interval, ...]) -> list[list[Interval]]:
    """``intervals`` in groups whose conditions exclude one another pairwise (so one loop serves a group).

    >>> x = sympy.Symbol("x")
    >>> ivs = (Interval(0, 1, x > 0), Interval(0, 2, x <= 0), Interval(1, 3, sympy.true))
    >>> [len(g) for g in exclusive_groups(ivs)]
    [2, 1]
    """
    groups: list[list[Interval]] = []
    for iv in intervals:
        home = next((g for g in groups if all(_exclusive(iv.when, other.when) for other in g)), None)
        if home is None:
            groups.append([iv])
        else:
            home.append(iv)
    return groups


def _interval(name: str, *cases: Interval) -> list[str]:
    """Scalar code for ``name_lo``, ``name_hi``: the interval of whichever case holds (empty if none does)."""
    if len(cases) == 1 and cases[0].when is sympy.true:
        return [f"{name}_lo = {to_triton(cases[0].lo)}", f"{name}_hi = tl.maximum({to_triton(cases[0].hi)}, {name}_lo)"]
    lines, lo, hi = [], "0", "0"
    for k, iv in reversed(list(enumerate(cases))):
        on = f"{name}_on{k}"
        lines.append(f"{on} = {to_triton(iv.when)}")
        lo = f"tl.where({on}, {to_triton(iv.lo)}, {lo})"
        hi = f"tl.where({on}, {to_triton(iv.hi)}, {hi})"
    return lines[::-1] + [f"{name}_lo = {lo}", f"{name}_hi = tl.maximum({hi}, {name}_lo)"]


_NAMES = {BM: "BLOCK_M", BN: "BLOCK_N", M: "M", N: "N", M0: "m0", M1: "m1", I: "pid_m", N0: "n0", N1: "n1", J: "pid_n"}


def to_triton(x: sympy.Basic, names: Mapping[sympy.Basic, str] | None = None) -> str:
    """An integer formula of the tile plan as a Triton scalar expression (floor division exact); ``names`` gives
    the code of symbols of its own (a coordinate's tile of positions)."""
    if names and x in names:
        return names[x]
    if x in _NAMES:
        return _NAMES[x]
    if x is sympy.true:
        return "True"
    if x is sympy.false:
        return "False"
    if x.is_Integer:
        return str(int(x))
    if x.is_Symbol:
        return f"p_{x.name}"
    if isinstance(x, (sympy.floor, sympy.ceiling)):
        num, den = sympy.fraction(sympy.together(x.args[0]))
        if den == 1:
            return to_triton(num, names)
        if isinstance(x, sympy.floor):
            return f"_floor_div({to_triton(num, names)}, {to_triton(den, names)})"
        return f"(-_floor_div(-({to_triton(num, names)}), {to_triton(den, names)}))"
    if isinstance(x, sympy.Mod):  # floor-mod, as sympy and Python mean it (Triton's % truncates)
        a, b = (to_triton(y, names) for y in x.args)
        return f"({a} - _floor_div({a}, {b}) * {b})"
    if isinstance(x, (sympy.Min, sympy.Max)):
        fn = "tl.minimum" if isinstance(x, sympy.Min) else "tl.maximum"
        args = [to_triton(a, names) for a in x.args]
        out = args[0]
        for a in args[1:]:
            out = f"{fn}({out}, {a})"
        return out
    if x.is_Add:
        return "(" + " + ".join(to_triton(a, names) for a in x.args) + ")"
    if x.is_Mul:
        return "(" + " * ".join(to_triton(a, names) for a in x.args) + ")"
    if isinstance(x, sympy.Rel):
        op = {
            sympy.LessThan: "<=",
            sympy.StrictLessThan: "<",
            sympy.GreaterThan: ">=",
            sympy.StrictGreaterThan: ">",
            sympy.Equality: "==",
            sympy.Unequality: "!=",
        }[type(x)]
        return f"({to_triton(x.lhs, names)} {op} {to_triton(x.rhs, names)})"
    if isinstance(x, sympy.And):
        return "(" + " & ".join(to_triton(a, names) for a in x.args) + ")"
    if isinstance(x, sympy.Or):
        return "(" + " | ".join(to_triton(a, names) for a in x.args) + ")"
    if isinstance(x, sympy.Not):
        return f"({to_triton(x.args[0], names)} == 0)"
    raise ValueError(f"no Triton form for {x}")
