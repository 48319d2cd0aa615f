"""Pure helpers of the tile code: linear forms of comparisons, and the conjunct pairs that become range tests."""

from einflash.compiler.codegen.range_tests import linear_form, nonnegative_form, range_pairs
from einflash.ir.expr import Const, Coord, Param, call

M, N, W = Coord("m"), Coord("n"), Param("window")
INTEGERS = {"window"}


def test_comparisons_as_the_linear_form_they_bound_below_by_zero():
    assert linear_form(call("sub", M, call("mul", Const(2.0), N)), INTEGERS) == {M: 1, N: -2}
    assert linear_form(call("mul", M, N), INTEGERS) is None  # not linear
    assert linear_form(Const(0.5), INTEGERS) is None  # not an integer
    assert linear_form(Param("scale"), INTEGERS) is None  # not an integer parameter
    assert nonnegative_form(call("le", N, M), INTEGERS) == {M: 1, N: -1}  # m − n ≥ 0
    assert nonnegative_form(call("lt", call("sub", M, N), W), INTEGERS) == {
        W: 1,
        M: -1,
        N: 1,
        1: -1,
    }  # w − m + n − 1 ≥ 0
    assert nonnegative_form(call("gt", M, N), INTEGERS) == {M: 1, N: -1, 1: -1}


def test_a_coordinate_difference_bounded_on_both_sides_is_one_range():
    causal, window = call("le", N, M), call("lt", call("sub", M, N), W)
    ((form, bound),) = range_pairs([causal, window], INTEGERS)[0]
    assert bound == {W: 1, 1: -1}  # 0 ≤ m − n ≤ window − 1
    assert linear_form(form, INTEGERS) == {M: 1, N: -1}
    assert range_pairs([causal, window], INTEGERS)[1] == []
    # a bound that varies along a coordinate, or a single conjunct, stays as written
    other = call("lt", M, call("add", N, M))
    assert range_pairs([causal, other], INTEGERS) == ([], [causal, other])
    assert range_pairs([causal], INTEGERS) == ([], [causal])
