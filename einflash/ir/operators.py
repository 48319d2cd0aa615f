"""Operators of map expressions and reductions, with the algebra the rewrites use.

An operator knows how to compute itself three ways (torch for the reference
executor, a Triton expression for kernels, sympy for symbolic reasoning and
derivatives) and carries the facts the rewrites need: identity elements of
reductions, which maps distribute over which reductions, and which maps turn a
sum into a product (``exp(a + b) = exp(a) * exp(b)``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import sympy
import torch


@dataclass(frozen=True)
class Operator:
    """A map operator.

    ``triton`` is a format string over the argument expressions. ``linear_in``
    lists the argument positions in which the operator is linear (so it
    distributes over a sum reduction of that argument). ``homomorphism`` names
    the pair (a, b) with ``f(x a y) = f(x) b f(y)``.

    >>> OPERATORS["exp"].homomorphism
    ('add', 'mul')
    """

    name: str
    arity: int
    torch: Callable = field(compare=False, repr=False)
    triton: str = field(compare=False, repr=False)
    sympy: Callable = field(compare=False, repr=False)
    symbol: str | None = None  # infix symbol for the printer
    boolean: bool = False  # result is a predicate
    linear_in: tuple[int, ...] = ()
    homomorphism: tuple[str, str] | None = None
    positive: bool = False  # result is > 0 wherever it is defined
    transcendental: bool = False  # counted apart in FLOPs (SFU work on GPUs)
    triton_fp32: str | None = field(default=None, compare=False, repr=False)  # where fp32 needs more accuracy
    triton_int: str | None = field(default=None, compare=False, repr=False)  # on integer operands, where it differs


def _merge_top(a, b):
    both = torch.cat(torch.broadcast_tensors(a, b), dim=-1)
    return both.topk(a.shape[-1], dim=-1).values


def _sign(x):
    return torch.sign(x)


def _piecewise(c, a, b):
    return sympy.Piecewise((a, c), (b, True))


_OPS = [
    Operator("add", 2, torch.add, "({0} + {1})", lambda a, b: a + b, "+", linear_in=(0, 1)),
    Operator("sub", 2, torch.sub, "({0} - {1})", lambda a, b: a - b, "−", linear_in=(0, 1)),
    Operator("mul", 2, torch.mul, "({0} * {1})", lambda a, b: a * b, "·", linear_in=(0, 1)),
    Operator("div", 2, torch.div, "({0} / {1})", lambda a, b: a / b, "/", linear_in=(0,)),
    # floor division and its remainder (Python's ``//`` and ``%``: the remainder has the divisor's sign). Triton's
    # own ``//`` and ``%`` truncate toward zero on integers (as C does), so integer operands take ``triton_int``.
    Operator(
        "floordiv",
        2,
        torch.floor_divide,
        "tl.floor({0} / {1})",
        lambda a, b: sympy.floor(a / b),
        "//",
        triton_int="_floor_div({0}, {1})",
    ),
    Operator(
        "mod",
        2,
        torch.remainder,
        "({0} - tl.floor({0} / {1}) * {1})",
        sympy.Mod,
        "%",
        triton_int="((({0} % {1}) + {1}) % {1})",
    ),
    Operator("neg", 1, torch.neg, "(-{0})", lambda a: -a, "−", linear_in=(0,)),
    # NaN propagates, as in torch (and the reference): Triton's default maximum returns the other operand
    Operator("maximum", 2, torch.maximum, "tl.maximum({0}, {1}, propagate_nan=tl.PropagateNan.ALL)", sympy.Max),
    Operator("minimum", 2, torch.minimum, "tl.minimum({0}, {1}, propagate_nan=tl.PropagateNan.ALL)", sympy.Min),
    Operator(
        "exp", 1, torch.exp, "tl.exp({0})", sympy.exp, homomorphism=("add", "mul"), positive=True, transcendental=True
    ),
    Operator(
        "exp2",
        1,
        torch.exp2,
        "tl.exp2({0})",
        lambda a: 2**a,
        homomorphism=("add", "mul"),
        positive=True,
        transcendental=True,
    ),
    Operator("log", 1, torch.log, "tl.log({0})", sympy.log, homomorphism=("mul", "add"), transcendental=True),
    Operator("sqrt", 1, torch.sqrt, "tl.sqrt({0})", sympy.sqrt, transcendental=True),
    # Triton has no tanh. 2·σ(2x) − 1 is stable at both ends but loses low bits near 0,
    # which only fp32 kernels can see; they use an expm1-based form (a template helper).
    Operator(
        "tanh",
        1,
        torch.tanh,
        "(2.0 * tl.sigmoid(2.0 * {0}) - 1.0)",
        sympy.tanh,
        transcendental=True,
        triton_fp32="_tanh_fp32({0})",
    ),
    Operator(
        "sigmoid",
        1,
        torch.sigmoid,
        "tl.sigmoid({0})",
        lambda a: 1 / (1 + sympy.exp(-a)),
        positive=True,
        transcendental=True,
    ),
    Operator(
        "relu", 1, torch.relu, "tl.maximum({0}, 0.0, propagate_nan=tl.PropagateNan.ALL)", lambda a: sympy.Max(a, 0)
    ),
    Operator("abs", 1, torch.abs, "tl.abs({0})", sympy.Abs),
    Operator("sign", 1, _sign, "tl.where({0} > 0, 1.0, tl.where({0} < 0, -1.0, 0.0))", sympy.sign),
    Operator("where", 3, torch.where, "tl.where({0}, {1}, {2})", _piecewise),
    Operator("lt", 2, torch.lt, "({0} < {1})", sympy.StrictLessThan, "<", boolean=True),
    Operator("le", 2, torch.le, "({0} <= {1})", sympy.LessThan, "≤", boolean=True),
    Operator("gt", 2, torch.gt, "({0} > {1})", sympy.StrictGreaterThan, ">", boolean=True),
    Operator("ge", 2, torch.ge, "({0} >= {1})", sympy.GreaterThan, "≥", boolean=True),
    Operator("eq", 2, torch.eq, "({0} == {1})", sympy.Eq, "==", boolean=True),
    Operator("ne", 2, torch.ne, "({0} != {1})", sympy.Ne, "≠", boolean=True),
    Operator("and", 2, torch.logical_and, "({0} & {1})", sympy.And, "∧", boolean=True),
    Operator("or", 2, torch.logical_or, "({0} | {1})", sympy.Or, "∨", boolean=True),
    Operator("not", 1, torch.logical_not, "({0} == 0)", sympy.Not, "¬", boolean=True),
    # Two top lists (along their last axis) merged into the largest of both, as long as either: not elementwise, so
    # the reference moves the LIST rank last before it applies it, and kernels hold the rank whole.
    Operator("merge_top", 2, _merge_top, "_merge_top({0}, {1})", sympy.Function("merge_top")),
]
OPERATORS: dict[str, Operator] = {op.name: op for op in _OPS}


@dataclass(frozen=True)
class Reducer:
    """A reduction operator: a binary map with an identity element.

    ``combine`` names the binary map operator that folds two partial results (what a
    running state's update applies); ``kth_largest`` (top-k routing) has none: it keeps the
    k-th largest value of a whole fiber, so it has no running form. A ``lists`` reducer
    (``top``, made by a rewrite, never declared) keeps the k largest values of the fiber, in
    descending order along its output's one LIST rank; its combine merges two such lists,
    which is the running form a k-th largest over the keys streams with.

    >>> REDUCERS["max"].identity
    -inf
    """

    name: str
    identity: float
    combine: str | None = None
    symbol: str = ""
    linear: bool = False  # a sum: corrections distribute over it
    lists: bool = False  # a top list along a LIST rank of the output (the rank the body does not have)


REDUCERS: dict[str, Reducer] = {
    "sum": Reducer("sum", 0.0, "add", "Σ", linear=True),
    "max": Reducer("max", float("-inf"), "maximum", "max"),
    "min": Reducer("min", float("inf"), "minimum", "min"),
    # The k-th largest value of the fiber (top-k routing); k is the reduction's argument.
    "kth_largest": Reducer("kth_largest", float("-inf"), None, "kth"),
    # The k largest of the fiber in descending order (−inf past the fiber's length); k is the reduction's argument.
    "top": Reducer("top", float("-inf"), "merge_top", "top", lists=True),
}
