"""Edge cases of recomputed shifted reads (multi-token attention's form) and of routed key tiles (MoBA's), each
kernel checked against the float64 reference (docs/design.md §7), or refused naming the declaration's line."""

import pytest
import torch

import einflash as ef
from einflash.compiler.rewrite.indicator import sums_as_indicators
from einflash.compiler.schedule import Schedule
from einflash.errors import LoweringError
from einflash.ir.reference import run_reference
from einflash.testing import check

pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
]
TILES = Schedule(16, 16, 4, 1)


def _qkv(M: int = 40, E: int = 16, H: int = 2):
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(1, H, M, E, generator=g) for _ in range(3))


def _assert_right(op, *args, **kwargs):
    verdict = check(op, op(*args, **kwargs, schedule=TILES), *args, **kwargs)
    assert verdict.ok, verdict


@ef.attention
def routed_and_not(q, k, v, block: int = 8):
    """Two softmaxes in one pass over the keys, only the first routed: no key tile may be left out for the other."""
    c = ef.rank("c", ef.ceil_div(ef.N, block))
    kbar = ef.mask(k, ef.n // block == c).sum("n")
    g = q @ kbar
    sel = (g >= 0) | (c == ef.m // block)
    s = q @ k * ef.scale
    a = ef.softmax(ef.mask(s, sel[ef.m, ef.n // block] & (ef.n <= ef.m)), "n") @ v
    b = ef.softmax(ef.mask(s * g.max("c"), ef.n <= ef.m), "n") @ v
    return a + b


def test_key_tiles_are_left_out_only_where_every_reduction_is_routed():
    _assert_right(routed_and_not, *_qkv(64))


@ef.attention
def masked_twice(q, k, v, block: int = 8):
    c = ef.rank("c", ef.ceil_div(ef.N, block))
    kbar = (ef.mask(k, ef.n // block == c) * ef.mask(k, ef.n < 20)).sum("n")
    b = ef.mask(q @ kbar, c < ef.m // block).max("c")
    return (ef.softmax(ef.mask(q @ k * ef.scale, ef.n <= ef.m), "n") @ v) * b


def test_a_sum_with_another_factor_that_may_be_absent_keeps_its_mask():
    """Blocks past key 20 have no term: absent as written, where an indicator would make them 0."""
    c = masked_twice.cascade
    assert sums_as_indicators(c) == c
    q, k, v = (x.double() for x in _qkv(40))
    torch.testing.assert_close(
        run_reference(masked_twice.forward.rewritten, {"q": q, "k": k, "v": v}),
        run_reference(c, {"q": q, "k": k, "v": v}),
    )


@ef.attention
def first_key_bias(q, k, v):
    e = ef.rank("e")
    first = q @ k[0, e] * ef.scale
    return ef.softmax(ef.mask(q @ k * ef.scale - first, ef.n <= ef.m), "n") @ v


def test_a_key_read_at_a_constant_position_lowers():
    _assert_right(first_key_bias, *_qkv(37))


@ef.attention
def smeared_scaled_queries(q, k, v, w: ef.Tensor["h i"]):
    """A value computed before the key loop (q·2), read at shifted rows inside it."""
    i, e = ef.rank("i"), ef.rank("e")
    scaled = q * 2.0
    s = scaled[ef.m - i, e] @ k * ef.scale
    return ef.softmax(ef.mask((w * s).sum("i"), ef.n <= ef.m), "n") @ v


def test_a_value_unrolled_before_the_key_loop_is_read_inside_it():
    _assert_right(smeared_scaled_queries, *_qkv(37), w=torch.randn(2, 3))


@ef.attention
def convolved_relative(q, k, v, theta: ef.Tensor["h i j"], rel: ef.Tensor["r"]):  # noqa: F821 -- a rank name
    i, j = ef.rank("i"), ef.rank("j")
    s = ef.mask(q @ k * ef.scale + rel[ef.n - ef.m + ef.M - 1], ef.n <= ef.m)
    conv = (theta * s[ef.m - i, ef.n - j]).sum("i j")
    return ef.softmax(ef.mask(conv, ef.n <= ef.m), "n") @ v


def test_a_table_read_at_recomputed_positions_is_refused_at_its_line():
    q, k, v = _qkv(20)
    with pytest.raises(LoweringError, match="reads a table") as refused:
        convolved_relative(q, k, v, theta=torch.randn(2, 2, 2), rel=torch.randn(39), schedule=TILES)
    assert refused.value.where is not None and refused.value.where.startswith(__file__)


@ef.attention
def gathered_row_bias(q, k, v, w: ef.Tensor["e c"], width: int = 1):
    """A computed [m, c] tile present on some rows only, read at the key's block as a bias: rows where it is absent
    have no score at all."""
    g = ef.mask(q @ w, ef.m >= 3)
    return ef.softmax(q @ k * ef.scale + g[ef.m, ef.n // width], "n") @ v


def test_a_gathered_tile_keeps_a_presence_that_varies_along_its_rows_only():
    q, k, v = _qkv(37)
    _assert_right(gathered_row_bias, q, k, v, w=torch.randn(16, 5), width=8)


@ef.attention
def block_gate(q, k, v, block: int = 4):
    c = ef.rank("c", ef.ceil_div(ef.N, block))
    g = q @ ef.mask(k, ef.n // block == c).sum("n")
    return ef.softmax(q @ k * ef.scale * ef.exp(ef.mask(g, c != 1).max("c")), "n") @ v


def test_a_mask_along_a_held_rank_leaves_its_padding_out():
    # 12 keys in blocks of 4: 3 blocks held in a tile of 4; the mask c ≠ 1 holds at the padded 4th, whose gate (a
    # dot with the zero padding) is 0, above every real gate here: the maximum must not take it
    g = torch.Generator().manual_seed(0)
    q = -torch.rand(1, 2, 8, 16, generator=g) - 0.5
    k = torch.rand(1, 2, 12, 16, generator=g) + 0.5
    v = torch.randn(1, 2, 12, 16, generator=g)
    _assert_right(block_gate, q, k, v)
