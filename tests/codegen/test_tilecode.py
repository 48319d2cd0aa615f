"""Pure helpers of the tile code: linear forms of comparisons, and the conjunct pairs that become range tests."""

from einflash.compiler.tilecode import _linear, _nonnegative, _ranges
from einflash.ir.expr import Const, Coord, Param, call

M, N, W = Coord("m"), Coord("n"), Param("window")
INTEGERS = {"window"}


def test_comparisons_as_the_linear_form_they_bound_below_by_zero():
    assert _linear(call("sub", M, call("mul", Const(2.0), N)), INTEGERS) == {M: 1, N: -2}
    assert _linear(call("mul", M, N), INTEGERS) is None  # not linear
    assert _linear(Const(0.5), INTEGERS) is None  # not an integer
    assert _linear(Param("scale"), INTEGERS) is None  # not an integer parameter
    assert _nonnegative(call("le", N, M), INTEGERS) == {M: 1, N: -1}  # m − n ≥ 0
    assert _nonnegative(call("lt", call("sub", M, N), W), INTEGERS) == {W: 1, M: -1, N: 1, 1: -1}  # w − m + n − 1 ≥ 0
    assert _nonnegative(call("gt", M, N), INTEGERS) == {M: 1, N: -1, 1: -1}


def test_a_coordinate_difference_bounded_on_both_sides_is_one_range():
    causal, window = call("le", N, M), call("lt", call("sub", M, N), W)
    (form, bound), = _ranges([causal, window], INTEGERS)[0]
    assert bound == {W: 1, 1: -1}  # 0 ≤ m − n ≤ window − 1
    assert _linear(form, INTEGERS) == {M: 1, N: -1}
    assert _ranges([causal, window], INTEGERS)[1] == []
    # a bound that varies along a coordinate, or a single conjunct, stays as written
    other = call("lt", M, call("add", N, M))
    assert _ranges([causal, other], INTEGERS) == ([], [causal, other])
    assert _ranges([causal], INTEGERS) == ([], [causal])
