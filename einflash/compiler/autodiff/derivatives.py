"""Derivatives of map expressions: each operator's local derivative from its sympy form, and the chain rule over
an expression's tree; the derivative of a reduction by one of its elements.

Local derivatives are written through the operator's own value where that is shorter or a polynomial of
it (σ' = σ − σ², tanh' = 1 − tanh², exp' = exp), so kernels reuse the forward value and stay finite where
the textbook form overflows.
"""

from __future__ import annotations

import functools

import sympy

from ...errors import DifferentiationError
from ...ir.algebra import from_sympy
from ...ir.cascade import Reducing, TensorDecl, plain_read
from ...ir.expr import Call, Const, Expr, Merge, Param, Read, call, transform
from ...ir.operators import OPERATORS
from ...ir.user_ops import DEFINITIONS

ZERO, ONE = Const(0.0), Const(1.0)


# -- derivatives of operators ---------------------------------------------------------------


@functools.cache
def _local_derivative(op: str, i: int) -> tuple[sympy.Expr, tuple[sympy.Symbol, ...], sympy.Symbol]:
    """∂op/∂(argument i) as sympy over argument symbols ``xs`` and the operator's value ``y``."""
    arity = OPERATORS[op].arity
    xs = tuple(
        sympy.Symbol(f"x{j}") if (op == "where" and j == 0) else sympy.Symbol(f"x{j}", real=True) for j in range(arity)
    )
    y = sympy.Symbol("y", real=True)
    f = OPERATORS[op].sympy(*xs)
    d = sympy.diff(f, xs[i]).replace(sympy.DiracDelta, lambda *_: sympy.Integer(0))
    d = _through_value(d, f, xs, y)
    numbers = {a: sympy.Float(a.evalf(17)) for a in d.atoms(sympy.Function, sympy.Pow) if a.is_number}
    return d.xreplace(numbers), xs, y


def _through_value(d: sympy.Expr, f: sympy.Expr, xs, y: sympy.Symbol) -> sympy.Expr:
    """``d`` written with the operator's value ``y`` where that is shorter, or (for one argument) where
    ``d`` is a polynomial of degree ≤ 2 in the value (σ' = σ − σ²)."""
    via = d.subs(f, y)
    if via != d and not via.has(*xs):
        return via
    shorter = via if via != d and sympy.count_ops(via) <= sympy.count_ops(d) else d
    if len(xs) != 1 or not d.has(xs[0]):
        return shorter
    x = xs[0]
    points = (sympy.Rational(3, 10), sympy.Rational(11, 10), sympy.Rational(-7, 10))
    try:
        rows = sympy.Matrix([[1, f.subs(x, p), f.subs(x, p) ** 2] for p in points]).evalf(30)
        rhs = sympy.Matrix([d.subs(x, p) for p in points]).evalf(30)
        coef = [sympy.nsimplify(float(cf), rational=True, tolerance=1e-12) for cf in rows.LUsolve(rhs)]
    except (ValueError, ZeroDivisionError, TypeError):
        return shorter
    poly = coef[0] + coef[1] * y + coef[2] * y**2
    if sympy.simplify(d - poly.subs(y, f)) == 0:
        return poly
    return shorter


def simplified_mul(a: Expr, b: Expr) -> Expr:
    if a == ONE:
        return b
    if b == ONE:
        return a
    if ZERO in (a, b):
        return ZERO
    if isinstance(a, Const) and isinstance(b, Const):
        return Const(a.value * b.value)
    for x, other in ((a, b), (b, a)):  # x·where(c, 1, 0) = where(c, x, 0)
        if isinstance(other, Call) and other.op == "where" and ONE in other.args[1:] and ZERO in other.args[1:]:
            picked = tuple(x if arg == ONE else ZERO for arg in other.args[1:])
            return call("where", other.args[0], *picked)
    return call("mul", a, b)


def simplified_add(a: Expr, b: Expr) -> Expr:
    if a == ZERO:
        return b
    if b == ZERO:
        return a
    return call("add", a, b)


def local_derivative(node: Call, i: int, value: Expr) -> Expr:
    """∂node/∂node.args[i] as an IR expression; ``value`` is the node's value (a read of it where one exists).

    >>> from einflash.ir.ranks import coord
    >>> x = Read("x", (coord("m"),))
    >>> from einflash.ir.printer import format_expr
    >>> format_expr(local_derivative(call("sigmoid", x), 0, Read("y", (coord("m"),))))
    'y[m] − y[m]·y[m]'
    """
    d, xs, y = _local_derivative(node.op, i)
    leaves = dict(zip(xs, node.args)) | {y: value}
    return from_sympy(d, leaves)


def partial_derivatives(expr: Expr, value: Expr | None = None) -> dict[Read, Expr]:
    """∂expr/∂leaf for every tensor read in ``expr``, by the chain rule over its tree.

    ``value`` is a read of the whole expression's value (the Einsum's output) where it exists.
    Predicates (comparisons, a where's condition) have no derivative.

    >>> from einflash.ir.ranks import coord
    >>> from einflash.ir.printer import format_expr
    >>> s = Read("s", (coord("m"), coord("n")))
    >>> {r.tensor: format_expr(d) for r, d in partial_derivatives(call("exp2", call("mul", s, Const(3.0))),
    ...                                                            Read("p", s.index)).items()}
    {'s': '0.6931471805599453·p[m,n]·3'}
    """
    out: dict[Read, Expr] = {}

    def visit(node: Expr, adjoint: Expr, own: Expr) -> None:
        if isinstance(node, Read):
            out[node] = simplified_add(out.get(node, ZERO), adjoint)
            return
        if not isinstance(node, Call) or OPERATORS[node.op].boolean:
            return
        if node.merge is not Merge.ALL:
            raise DifferentiationError(
                f"{node.op}∪ merges absent values; the gradient of a running-state update "
                f"is not defined (differentiate the cascade before it is streamed)"
            )
        for i, arg in enumerate(node.args):
            if node.op == "where" and i == 0:
                continue
            local = local_derivative(node, i, own)
            if local != ZERO:
                visit(arg, simplified_mul(adjoint, local), arg)

    visit(expr, ONE, value if value is not None else expr)
    return {r: d for r, d in out.items() if d != ZERO}


# -- derivatives of reductions ---------------------------------------------------------------


def reduction_derivative(e: Reducing) -> Expr | None:
    """∂(e's reduction)/∂(one reduced element), as an expression of e's body and its result: 1 for a sum, a
    user reducer's declared derivative; None for the rest (max, min, kth largest: see
    einflash.compiler.autodiff.invariance)."""
    if e.reduce.op == "sum":
        return Const(1.0)
    d = DEFINITIONS.get(e.reduce.op)
    if d is None or d.derivative is None:
        return None
    result = plain_read(TensorDecl(e.out, e.ranks))
    return transform(d.derivative, lambda x: (e.expr if x.name == "a" else result) if isinstance(x, Param) else None)
