"""Symbolic algebra on map expressions: factor lists, sympy translation both ways, and the
correction-factor test that decides whether a running state can be rescaled online.

>>> from einflash.ir.expr import Read, call
>>> from einflash.ir.ranks import coord
>>> m, n = coord("m"), coord("n")
>>> body = call("exp", call("sub", Read("s", (m, n)), Read("top", (m,))))
>>> correction(body, {"top"}, reduced={"n"})
Call(op='exp', args=(Call(op='sub', args=(Read(tensor='top', index=(m,), prev=True),
    Read(tensor='top', index=(m,), prev=False)), merge=<Merge.ALL: '∩'>),), merge=<Merge.ALL: '∩'>)
"""

from __future__ import annotations

from typing import TypeAlias

import sympy

from .expr import Call, Const, Coord, Expr, Merge, Param, Read, Size, call, free_ranks, to_sympy


def factors(x: Expr) -> list[tuple[Expr, int]]:
    """``x`` as a product of factors with exponents ±1 (through mul, div and neg)."""
    if isinstance(x, Call) and x.merge is Merge.ALL:
        if x.op == "mul":
            return factors(x.args[0]) + factors(x.args[1])
        if x.op == "div":
            return factors(x.args[0]) + [(f, -e) for f, e in factors(x.args[1])]
        if x.op == "neg":
            return [(Const(-1.0), 1)] + factors(x.args[0])
    return [(x, 1)]


def product(fs: list[tuple[Expr, int]]) -> Expr:
    """Rebuild a product from factors: numerators multiplied, then each denominator divided."""
    num = [f for f, e in fs if e > 0]
    den = [f for f, e in fs if e < 0]
    out: Expr = num[0] if num else Const(1.0)
    for f in num[1:]:
        out = call("mul", out, f)
    for f in den:
        out = call("div", out, f)
    return out


# a leaf, or a state's read as (tensor, index, "old" or "new")
_Key: TypeAlias = Read | Param | Coord | Size | tuple[str, tuple[sympy.Expr, ...], str]


class _Leaves:
    """Sympy symbols for expression leaves; states get separate old and new symbols (a read of a state's
    previous value is its old one). A tensor in ``scaled`` is one symbol, multiplied in the new phase by its
    factor (a sum over n rescaled when the states shift)."""

    def __init__(self, states: set[str], scaled: dict[str, Expr] | None = None):
        self.states = states
        self.scaled = scaled or {}
        self.symbols: dict[_Key, sympy.Symbol] = {}
        self.phase = "new"

    def __call__(self, x: Expr) -> sympy.Expr:
        key: _Key
        if isinstance(x, Read) and x.tensor in self.states:
            key = (x.tensor, x.index, "old" if x.prev else self.phase)
        elif isinstance(x, (Read, Param, Coord, Size)):
            key = x
        else:
            raise TypeError(x)
        if key not in self.symbols:
            self.symbols[key] = sympy.Symbol(f"x{len(self.symbols)}", real=True)
        if self.phase == "new" and isinstance(x, Read) and x.tensor in self.scaled and not x.prev:
            return self.symbols[key] * to_sympy(self.scaled[x.tensor], self)
        return self.symbols[key]


def correction(body: Expr, states: set[str], reduced: set[str], scaled: dict[str, Expr] | None = None) -> Expr | None:
    """The factor r with ``body(new states) = r · body(old states)`` at every point, or None.

    ``r`` must not depend on the reduced ranks: then a running sum of ``body`` over
    earlier chunks is brought up to date by multiplying it by ``r``. ``r`` is given
    as an expression over ``Read(state, prev=True)`` (old) and ``Read(state)`` (new).
    Returns ``Const(1)`` when ``body`` reads none of the states. ``scaled``: tensors the body reads that the
    shift rescales by a known factor (sums over n computed from the states, in a pass before this one).
    """
    leaves = _Leaves(states, scaled)
    new = to_sympy(body, leaves)
    leaves.phase = "old"
    old = to_sympy(body, leaves)
    if new == old:
        return Const(1.0)
    ratio = sympy.powsimp(sympy.simplify(new / old), force=True)
    return _in_ir(sympy.simplify(ratio), leaves, reduced)


def ratio(numerator: Expr, denominator: Expr, constant_along: set[str]) -> Expr | None:
    """``numerator / denominator`` simplified, as an expression that does not vary along the ranks
    ``constant_along``, or None where it does (or has no IR form).

    >>> from einflash.ir.expr import Read, call
    >>> from einflash.ir.ranks import coord
    >>> m, n = coord("m"), coord("n")
    >>> e = call("exp", call("sub", Read("s", (m, n)), Read("lse", (m,))))
    >>> ratio(call("neg", e), e, {"n"})
    Const(value=-1.0)
    >>> ratio(Read("s", (m, n)), e, {"n"}) is None
    True
    """
    leaves = _Leaves(set())
    r = sympy.simplify(to_sympy(numerator, leaves) / to_sympy(denominator, leaves))
    return None if r.has(sympy.zoo, sympy.nan) else _in_ir(r, leaves, constant_along)


def _in_ir(x: sympy.Expr, leaves: _Leaves, reduced: set[str]) -> Expr | None:
    """``x`` back in the IR, or None where it reads a leaf varying along ``reduced`` or has no IR form."""
    back: dict[sympy.Symbol, Expr] = {}
    for key, sym in leaves.symbols.items():
        if isinstance(key, tuple):
            name, index, phase = key
            back[sym] = Read(name, index, prev=(phase == "old"))
        else:
            if isinstance(key, (Read, Coord)) and free_ranks(key) & reduced and sym in x.free_symbols:
                return None
            back[sym] = key
    if any(s not in back for s in x.free_symbols):
        return None
    try:
        return from_sympy(x, back)
    except ValueError:  # a factor (a Piecewise of more cases...) with no IR form
        return None


def from_sympy(x: sympy.Expr, leaves: dict[sympy.Symbol, Expr]) -> Expr:
    """Translate a sympy expression back into the IR: +, ·, integer and square-root powers, exp, log, tanh,
    abs, sign, maxima and minima, numeric constants, steps (Heaviside) and two-way selections (Piecewise)."""
    if x in leaves:
        return leaves[x]
    if x.is_Number:
        return Const(float(x))
    if isinstance(x, sympy.exp):
        return call("exp", from_sympy(x.args[0], leaves))
    if isinstance(x, sympy.log):
        return call("log", from_sympy(x.args[0], leaves))
    if x.is_Add:
        terms = list(x.args)
        out = from_sympy(terms[0], leaves)
        for t in terms[1:]:
            if t.could_extract_minus_sign():
                out = call("sub", out, from_sympy(-t, leaves))
            else:
                out = call("add", out, from_sympy(t, leaves))
        return out
    if x.is_Mul:
        num, den = sympy.fraction(x)
        if den != 1:
            return call("div", from_sympy(num, leaves), from_sympy(den, leaves))
        coeff, rest = x.as_coeff_Mul()
        if coeff == -1:
            return call("neg", from_sympy(rest, leaves))
        fs = [from_sympy(a, leaves) for a in x.args]
        out = fs[0]
        for f in fs[1:]:
            out = call("mul", out, f)
        return out
    if x.is_Pow and x.base == 2:
        return call("exp2", from_sympy(x.exp, leaves))
    if x.is_Pow and x.exp.is_Integer:
        base = from_sympy(x.base, leaves)
        k = int(x.exp)
        out = base
        for _ in range(abs(k) - 1):
            out = call("mul", out, base)
        return call("div", Const(1.0), out) if k < 0 else out
    return _from_sympy_function(x, leaves)


def _from_sympy_function(x: sympy.Expr, leaves: dict[sympy.Symbol, Expr]) -> Expr:
    """The rest of :func:`from_sympy`: constants, functions and selections derivatives produce."""
    if x.is_number:  # log(2), sqrt(2)/2, ...
        return Const(float(x))
    unary = {sympy.tanh: "tanh", sympy.Abs: "abs", sympy.sign: "sign"}
    for cls, op in unary.items():
        if isinstance(x, cls):
            return call(op, from_sympy(x.args[0], leaves))
    if x.is_Pow and x.exp == sympy.Rational(1, 2):
        return call("sqrt", from_sympy(x.base, leaves))
    if x.is_Pow and x.exp == sympy.Rational(-1, 2):
        return call("div", Const(1.0), call("sqrt", from_sympy(x.base, leaves)))
    for cls, op in ((sympy.Max, "maximum"), (sympy.Min, "minimum")):  # a sink logit in a row's maximum
        if isinstance(x, cls):
            args = [from_sympy(a, leaves) for a in x.args]
            out = args[0]
            for a in args[1:]:
                out = call(op, out, a)
            return out
    if isinstance(x, sympy.Heaviside):  # a step: 0 at the origin, as torch's relu and maximum take it
        return call("where", call("gt", from_sympy(x.args[0], leaves), Const(0.0)), Const(1.0), Const(0.0))
    if isinstance(x, sympy.Piecewise) and len(x.args) == 2 and x.args[1].cond == sympy.true:
        (a, cond), (b, _) = x.args
        return call("where", from_sympy(cond, leaves), from_sympy(a, leaves), from_sympy(b, leaves))
    comparisons = {
        sympy.StrictGreaterThan: "gt",
        sympy.GreaterThan: "ge",
        sympy.StrictLessThan: "lt",
        sympy.LessThan: "le",
    }
    if type(x) in comparisons:
        return call(comparisons[type(x)], from_sympy(x.lhs, leaves), from_sympy(x.rhs, leaves))
    raise ValueError(f"cannot translate {x} back into the IR")
