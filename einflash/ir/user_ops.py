"""User-defined reducers: a binary combine written with einflash's operators, its identity, and optionally
its derivative.

A reducer folds a fiber with ``combine(a, b)``; with an identity element and a combine that is
commutative and associative it folds in any order and in chunks, so a reduction over the key
sequence can become a running state, as max and sum do. Registering one adds the combine to the
operator table (computed in torch, Triton and sympy from its body) and the reducer to the reducer
table, under its name; a cascade that uses it hashes its definition, so two definitions under one
name never share a kernel or a cache entry.

A reducer's gradient needs its *derivative*: ∂(R_i x_i)/∂x_j as a function of the element x_j and the
result r (1 for a sum, ``exp(x − r)`` for log-add-exp), written over Param a (the element) and Param b
(the result). It is checked against the combine's own derivative on sample fibers.

>>> from einflash.ir.expr import Param, call
>>> body = call("maximum", Param("a"), Param("b"))
>>> define_reducer("biggest", body, float("-inf")).identity
-inf
>>> triton_helper("biggest").splitlines()[1]
'def _user_biggest(a, b):'
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from ..errors import DeclarationError
from .expr import Call, Const, Expr, Param, to_sympy, walk
from .operators import OPERATORS, REDUCERS, Operator, Reducer

ARGS = ("a", "b")
_PROBES = (-3.0, -0.5, 0.0, 0.75, 2.5)


@dataclass(frozen=True)
class Definition:
    body: Expr  # over Param("a") and Param("b")
    identity: float
    derivative: Expr | None = None  # over Param("a"), an element, and Param("b"), the result


DEFINITIONS: dict[str, Definition] = {}


def _guarded(identity: float, a, b, value):
    """``value`` where both operands are real values; where one is the identity, the other (the identity law).

    Absent elements reach a reducer as its identity, and a combine written for values need not be defined
    there (log-add-exp of −∞ and −∞ is NaN): the law gives the result instead.
    """
    return torch.where(a == identity, b, torch.where(b == identity, a, value))


def _evaluate(x: Expr, a, b):
    """``x`` at operands a and b, with the operators' torch forms."""
    if isinstance(x, Const):
        return torch.tensor(x.value, dtype=torch.float64)
    if isinstance(x, Param):
        return a if x.name == "a" else b
    assert isinstance(x, Call), x  # define_reducer lets no other node into a reducer
    return OPERATORS[x.op].torch(*(_evaluate(y, a, b) for y in x.args))


def _check_laws(name: str, body: Expr, identity: float) -> None:
    """The laws that let a reduction fold in chunks, on probe values; a DeclarationError names the first broken."""

    def f(x, y):
        return float(_evaluate(body, torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)))

    def same(x, y):
        return x == y or math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12)

    for x in _PROBES:
        if not same(f(x, identity), x) or not same(f(identity, x), x):
            raise DeclarationError(
                f"reducer {name!r}: combine(x, identity) must be x, but combine({x}, {identity}) = {f(x, identity)}"
            )
    for x, y in itertools.product(_PROBES, repeat=2):
        if not same(f(x, y), f(y, x)):
            raise DeclarationError(
                f"reducer {name!r}: combine must be commutative, but combine({x}, {y}) = "
                f"{f(x, y)} and combine({y}, {x}) = {f(y, x)}"
            )
    for x, y, z in itertools.product(_PROBES[:3], _PROBES[2:], _PROBES[1:4]):
        if not same(f(f(x, y), z), f(x, f(y, z))):
            raise DeclarationError(
                f"reducer {name!r}: combine must be associative, but it groups ({x}, {y}, {z}) "
                f"into {f(f(x, y), z)} and {f(x, f(y, z))}"
            )


def _check_derivative(name: str, body: Expr, derivative: Expr) -> None:
    """The declared derivative against the combine's, through a fold of sample fibers (float64 autograd)."""
    for fiber in (_PROBES, _PROBES[::-1][:3], (0.5, 0.5, -1.0, 2.0)):
        xs = torch.tensor(fiber, dtype=torch.float64, requires_grad=True)
        r = xs[0]
        for i in range(1, len(fiber)):
            r = _evaluate(body, r, xs[i])
        (want,) = torch.autograd.grad(r, xs)
        got = _evaluate(derivative, xs.detach(), r.detach())
        if not torch.allclose(got, want, rtol=1e-6, atol=1e-9):
            raise DeclarationError(
                f"reducer {name!r}: its derivative does not match its combine's: on the fiber "
                f"{list(fiber)} the declared one gives {got.tolist()}, the combine's "
                f"{want.tolist()}"
            )


def define_reducer(name: str, body: Expr, identity: float, derivative: Expr | None = None) -> Reducer:
    """Register the reducer ``name`` folding with ``body`` (over Param a and Param b), with its ``derivative``
    (over Param a, an element, and Param b, the result) when given; see the module docstring."""
    if not name.isidentifier():
        raise DeclarationError(f"a reducer's name must be an identifier, got {name!r}")
    known = DEFINITIONS.get(name)
    if known is not None:
        if known == Definition(body, identity, derivative):
            return REDUCERS[name]
        raise DeclarationError(
            f"reducer {name!r} is already defined with another combine, identity or "
            f"derivative; give the new one another name"
        )
    if name in OPERATORS or name in REDUCERS:
        raise DeclarationError(f"{name!r} is a built-in operator or reducer; give the reducer another name")
    for what, x in [("combine", y) for y in walk(body)] + [("derivative", y) for y in walk(derivative or Const(0))]:
        if not (isinstance(x, (Call, Const)) or (isinstance(x, Param) and x.name in ARGS)):
            raise DeclarationError(
                f"reducer {name!r}: its {what} may use only its two operands, numbers and "
                f"einflash operators, got {type(x).__name__} {x}"
            )
    _check_laws(name, body, identity)
    if derivative is not None:
        _check_derivative(name, body, derivative)
    ops = [OPERATORS[x.op] for x in walk(body) if isinstance(x, Call)]
    OPERATORS[name] = Operator(
        name,
        2,
        lambda a, b: _guarded(identity, a, b, _evaluate(body, a, b)),
        f"_user_{name}({{0}}, {{1}})",
        lambda a, b: to_sympy(body, lambda p: a if p == Param("a") else b),
        transcendental=any(op.transcendental for op in ops),
    )
    REDUCERS[name] = Reducer(name, identity, name, name)
    DEFINITIONS[name] = Definition(body, identity, derivative)
    return REDUCERS[name]


def _triton(x: Expr) -> str:
    if isinstance(x, Const):
        return repr(x.value) if math.isfinite(x.value) else f'float("{x.value}")'
    if isinstance(x, Param):
        return x.name
    assert isinstance(x, Call), x  # define_reducer lets no other node into a reducer
    return OPERATORS[x.op].triton.format(*(_triton(y) for y in x.args))


def triton_helper(name: str) -> str:
    """The ``@triton.jit`` function a kernel calls for the combine of user reducer ``name``."""
    d = DEFINITIONS[name]
    identity = _triton(Const(d.identity))
    return (
        f"@triton.jit\ndef _user_{name}(a, b):\n    # where an operand is the identity, the other (the identity law)\n"
        f"    value = {_triton(d.body)}\n"
        f"    return tl.where(a == {identity}, b, tl.where(b == {identity}, a, value))\n"
    )


def user_operators(exprs, reductions) -> list[str]:
    """The user-defined operators that ``exprs`` call or ``reductions`` (reducer names) fold with, each once,
    every one after those its own combine calls."""
    order: list[str] = []

    def add(name: str) -> None:
        if name not in order:
            for inner in _called(DEFINITIONS[name].body):
                add(inner)
            order.append(name)

    for name in [n for e in exprs for n in _called(e)] + [r for r in reductions if r in DEFINITIONS]:
        add(name)
    return order


def _called(x: Expr) -> list[str]:
    return [y.op for y in walk(x) if isinstance(y, Call) and y.op in DEFINITIONS]
