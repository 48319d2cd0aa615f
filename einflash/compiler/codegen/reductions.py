"""Reducing Einsums as tile code: a reduction over one rank (``tl.sum``, a maximum or minimum that propagates
NaN, a user reducer's ``tl.reduce``), and a sum of products over one rank as a ``tl.dot`` of two 2-D operands.

The result of a reduction is present where some reduced element is: a reduction of the body's presence by
any, or, for a maximum (minimum) of finite values, the result compared with −inf (inf), which costs no
reduction of a boolean tile. A dot's operands hold 0 where absent; its result is present where both
operands' presences, each reduced over the contracted rank, hold.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, TypeAlias

from ...errors import LoweringError
from ...ir.algebra import factors, product
from ...ir.cascade import Reducing
from ...ir.expr import Const, Expr, call, free_ranks
from ...ir.operators import REDUCERS
from ...ir.ranks import PARALLEL
from .tile import Tile, bcast, literal, tile_axes

if TYPE_CHECKING:
    from .tilecode import TileCode

Factors: TypeAlias = list[tuple[Expr, int]]  # factors of a product with their exponents (ir.algebra.factors)
# the factors of a contraction over ``rank``: (row axis, left operand's), (column axis, right operand's), and those
# that do not vary along ``rank`` (they multiply the dot's result)
DotGroups: TypeAlias = tuple[tuple[str, Factors], tuple[str, Factors], Factors]


# The k-th largest along an axis of a 2-D tile, ties counted as torch.topk counts them: k − 1 times the largest
# is taken out, at one position (the first), then the largest left is the answer (−inf past the fiber's length).
# For a rank held whole (MoBA's key blocks); over n the rewrites make it a top list instead.
KTH_LARGEST = """@triton.jit
def _kth_largest(x, K: tl.constexpr, axis: tl.constexpr):
    if axis == 0:
        pos = tl.arange(0, x.shape[0])[:, None]
    else:
        pos = tl.arange(0, x.shape[1])[None, :]
    for _ in tl.static_range(K - 1):
        x = tl.where(pos == tl.expand_dims(tl.argmax(x, axis), axis), float("-inf"), x)
    return tl.max(x, axis)
"""


# A key tile's top list (the K largest of each row, descending; a tile narrower than K widened with −inf first),
# and the merge of two top lists into the K largest of both: the running form of a k-th largest over n.
TOP_LIST = """@triton.jit
def _top_list(x, K: tl.constexpr, LOG_K: tl.constexpr):
    for _ in tl.static_range(LOG_K):
        if x.shape[1] < K:
            x = tl.reshape(tl.join(x, tl.full(x.shape, float("-inf"), x.dtype)), (x.shape[0], 2 * x.shape[1]))
    return tl.topk(x, K, 1)


@triton.jit
def _merge_top(a, b):
    return tl.topk(tl.reshape(tl.join(a, b), (a.shape[0], 2 * a.shape[1])), a.shape[1], 1)
"""


def reduction(g: TileCode, e: Reducing, body: Tile) -> Tile:
    """``e``'s reduction of its evaluated ``body`` over its one rank."""
    red = e.reduce
    if red.op == "kth_largest" and len(red.ranks) == 1:
        return _kth_largest(g, e, body)
    if REDUCERS[red.op].lists:
        return _top_list(g, e, body)
    if len(red.ranks) != 1 or REDUCERS[red.op].combine is None:
        raise LoweringError(
            f"{e.out}: the one-pass template reduces over one rank with a reducer that "
            f"combines partial results (sum, max, min, user reducers), not {red.op} over "
            f"{red.ranks}"
        )
    rank = red.ranks[0]
    ident = REDUCERS[red.op].identity
    src = g.filled(body, ident)
    if body.present is None or rank not in body.pranks:  # loads mark padding absent; a dot's result does not
        src = _without_padding(g, src, rank, ident)
    if rank not in src.ranks:
        raise LoweringError(f"{e.out}: reduces over {rank}, which its tile does not have")
    axis = src.ranks.index(rank)
    # A maximum (minimum) of finite values is not −inf (inf) exactly where some is present: that test stands
    # for a reduction of the presence. Only for a presence that varies along both axes: a key-only one reduces
    # cheaply as it is, and testing the dot's maximum there instead makes ptxas serialise the wgmmas of 8-warp
    # kernels. A row of NaN (a NaN input) must then count as present, so that it gives NaN as the reference
    # does, not an empty row: that maximum propagates NaN (kernel_helpers); tl.max, which drops NaN, serves
    # the rest, where a NaN reaches the row's sum anyway (and the NaN-propagating form spills registers).
    by_value = (
        body.present is not None
        and rank in body.pranks
        and body.finite
        and red.op in ("max", "min")
        and len(body.pranks) > 1
    )
    fn = {"sum": "tl.sum", "max": "_max_nan" if by_value else "tl.max", "min": "_min_nan" if by_value else "tl.min"}
    # a user reducer folds with its combine, a generated @triton.jit helper (einflash.ir.user_ops)
    code = f"{fn[red.op]}({g.f32(src)}, {axis})" if red.op in fn else f"tl.reduce({g.f32(src)}, {axis}, _user_{red.op})"
    keep = tuple(r for r in src.ranks if r != rank)
    known = f"({g.prefix}{e.out} != {literal(ident)})" if by_value else None
    present, pranks = _presence_over(g, body, rank, known)
    finite = body.finite and red.op in ("sum", "max", "min")
    return Tile(code, keep, present, pranks, ident if present else None, finite=finite)


def _presence_over(g: TileCode, body: Tile, rank: str, known: str | None = None) -> tuple[str | None, tuple[str, ...]]:
    """Where a reduction of ``body`` over ``rank`` is present: where some element along the rank is (``known``: a
    test of the result that stands for that reduction of the presence)."""
    if body.present is None:
        return None, ()
    if rank not in body.pranks:
        return body.present, body.pranks
    return g.any_of(body.present, body.pranks, rank, known), tuple(x for x in body.pranks if x != rank)


def _without_padding(g: TileCode, src: Tile, rank: str, ident: float) -> Tile:
    """``src`` with the identity at a padded rank's padding: a dot's result holds 0 there and counts it present
    (its presence leaves head-dim padding out), and a max over it, or a sum of exp of it, would take it in
    (``max_c q·kbar[c]``); a presence along the rank need not exclude the padding (a mask on c)."""
    if rank in ("m", "n") or rank not in src.ranks or g.extent(rank) == g.dims[rank]:
        return src
    inside = bcast(f"(offs_{rank} < {g.extent(rank)})", (rank,), src.ranks)
    return replace(src, code=f"tl.where({inside}, {g.f32(src)}, {literal(ident)})", dtype="f32")


def _kth_largest(g: TileCode, e: Reducing, body: Tile) -> Tile:
    """The k-th largest over a rank the tile holds whole (absent elements as −inf, as the reference takes them; of
    fewer than k elements, −inf)."""
    rank = e.reduce.ranks[0]
    src = g.filled(body, float("-inf"))
    if rank in ("m", "n") or rank not in src.ranks or len(src.ranks) != 2:
        raise LoweringError(
            f"{e.out}: a k-th largest over {rank} runs over a rank each program holds whole (not m or n), in a 2-D "
            f"tile; this one's tile has ranks ({', '.join(src.ranks)})"
        )
    k = int(e.reduce.arg or 0)
    axis = src.ranks.index(rank)
    values = g.f32(_without_padding(g, src, rank, float("-inf")))
    keep = tuple(r for r in src.ranks if r != rank)
    present, pranks = _presence_over(g, body, rank)
    return Tile(f"_kth_largest({values}, {k}, {axis})", keep, present, pranks, float("-inf") if present else None)


def _top_list(g: TileCode, e: Reducing, body: Tile) -> Tile:
    """A top list over n of a 2-D tile over (m, n): the tile's own K largest of each row along the list rank, held
    as a power of two (entries past the true k are more of the row's largest, never read)."""
    (rank,) = e.reduce.ranks
    (listed,) = [r for r in e.ranks if r not in body.ranks and r not in PARALLEL]
    src = g.filled(body, float("-inf"))
    if src.ranks != ("m", rank):
        raise LoweringError(
            f"{e.out}: a top list over {rank} is made from a tile over (m, {rank}); this one's tile has ranks "
            f"({', '.join(src.ranks)})"
        )
    width = g.dims[listed]
    code = f"_top_list({g.f32(src)}, {width}, {width.bit_length() - 1})"
    present, pranks = _presence_over(g, body, rank)
    return Tile(code, ("m", listed), present, pranks, float("-inf") if present else None)


def dot_groups(e: Reducing, order: tuple[str, ...] | None) -> DotGroups | None:
    """Split ``e``'s sum-of-products body into (left, right, outer) factor lists for tl.dot; None when it is
    no contraction over one rank into a 2-D tile (tile axes in ``order``)."""
    if len(e.reduce.ranks) != 1:
        return None
    r = e.reduce.ranks[0]
    out = list(tile_axes([x for x in e.ranks if x not in PARALLEL], order))
    if len(out) != 2:
        return None
    x, y = out
    left: Factors = []
    right: Factors = []
    outer: Factors = []
    for f, k in factors(e.expr):
        fr = set(free_ranks(f)) - set(PARALLEL)
        if r not in fr:
            outer.append((f, k))
        elif fr <= {x, r} and x in fr:
            left.append((f, k))
        elif fr <= {y, r} and y in fr:
            right.append((f, k))
        elif fr == {r}:
            left.append((f, k))
        else:
            return None
    if not left or not right:
        return None
    return (x, left), (y, right), outer


def contraction(g: TileCode, e: Reducing, groups: DotGroups) -> Tile:
    """``e``'s sum of products as a tl.dot of the factors ``dot_groups`` split it into."""
    r = e.reduce.ranks[0]
    (x, left), (y, right), outer = groups
    outer = [(f, k) for f, k in outer if f != Const(1.0)]
    a = g.filled(g.expr(product(_reciprocals(left))), 0.0)
    b = g.filled(g.expr(product(_reciprocals(right))), 0.0)
    a_code = _operand(g, a, (x, r))
    b_code = _operand(g, b, (r, y))
    prec = ', input_precision="ieee"' if g.kernel.exact else ""
    if g.kernel.acc != "tl.float32":  # tl.dot accumulates in fp32 unless told otherwise
        prec += f", out_dtype={g.kernel.acc}"
    code = f"tl.dot({a_code}, {b_code}{prec})"
    # the result is present where some term of the sum is: reduce the operands' presence over r
    present, pranks, _ = g.presence([_reduced_presence(g, t, r) for t in (a, b)])
    out_ranks = tile_axes((x, y), g.kernel.order)
    if out_ranks != (x, y):
        code = f"tl.trans({code})"
    elif not outer:
        g.dots[e.out] = (a_code, b_code, prec)
    tile = Tile(code, out_ranks, present, pranks, 0.0 if present else None, finite=a.finite and b.finite)
    if outer:
        o = g.expr(product(outer))
        if o.present is not None:  # absent where the factor is; 0 there (the dot is finite)
            o = g.filled(o, 0.0)
            present, pranks, _ = g.presence((tile, o))
        tile = Tile(
            f"{code} * {bcast(g.f32(o), o.ranks, out_ranks)}",
            out_ranks,
            present,
            pranks,
            0.0 if present else None,
            "f32",
            finite=tile.finite and o.finite,
        )
    return tile


def _reduced_presence(g: TileCode, t: Tile, rank: str) -> Tile:
    """``t``'s presence reduced over ``rank`` by any, along the sequence axes only.

    Padding of a head dimension is left out: the operand holds 0 there, and
    stores mask padded positions, so it never reaches memory.
    """
    if t.present is None:
        return Tile("", ())
    code, keep = t.present, t.pranks
    for x in [rank] * (rank in keep) + [x for x in reversed(keep) if x not in ("m", "n", rank)]:
        code = g.any_of(code, keep, x)
        keep = tuple(y for y in keep if y != x)
    keep = tuple(x for x in keep if x in ("m", "n"))
    return Tile("", (), code if keep else None, keep)


def _operand(g: TileCode, t: Tile, want: tuple[str, str]) -> str:
    """A tile as a tl.dot operand with axes ``want``, in the dot dtype."""
    code = t.code if (t.dtype == "in" or g.kernel.exact) else f"{t.code}.to({g.kernel.dot_dtype})"
    # an indicator (MoBA's blocks) is an integer tile
    if g.kernel.exact and t.dtype in ("in", "declared", "int", "bool"):
        code = f"{t.code}.to({g.kernel.acc})"
    if len(t.ranks) == 1:
        raise LoweringError(f"a contraction operand over ({t.ranks[0]}) only; the template contracts 2-D tiles")
    return code if t.ranks == want else f"tl.trans({code})"


def _reciprocals(fs: Factors) -> Factors:
    """Divisors of an operand that have fewer ranks than it (a row's normaliser) as factors 1/d: one division
    per row, then a multiplication per element, instead of a division per element."""
    ranks = frozenset().union(*(free_ranks(f) for f, _ in fs))
    return [(call("div", Const(1.0), f), 1) if k < 0 and free_ranks(f) < ranks else (f, k) for f, k in fs]
