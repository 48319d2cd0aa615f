"""Mask conjuncts as range tests: two comparisons that bound one linear form of coordinates from both sides
become one unsigned comparison in the kernel (``n ≤ m ∧ m − n < w`` is ``(m − n) <u max(w, 0)``).

>>> from einflash.ir.expr import Coord, Param, call
>>> from einflash.ir.printer import format_expr
>>> m, n, w = Coord("m"), Coord("n"), Param("w")
>>> (form, bound), = range_pairs([call("le", n, m), call("lt", call("sub", m, n), w)], {"w"})[0]
>>> format_expr(form), bound == {w: 1, 1: -1}  # 0 ≤ m − n ≤ w − 1
('m − n', True)
"""

from __future__ import annotations

import itertools

from ...ir.expr import Call, Const, Coord, Expr, Merge, Param, Size


def linear_form(x: Expr, integers: set[str]) -> dict | None:
    """``x`` as integer coefficients of its leaves (coordinates, extents, integer parameters; 1 for the
    constant), or None where it is not such a linear form."""
    if isinstance(x, Const):
        return {1: int(x.value)} if float(x.value).is_integer() else None
    if isinstance(x, (Coord, Size)) or (isinstance(x, Param) and x.name in integers):
        return {x: 1}
    if not isinstance(x, Call) or x.merge is not Merge.ALL:
        return None
    parts = [p for a in x.args if (p := linear_form(a, integers)) is not None]
    if len(parts) != len(x.args):
        return None
    if x.op == "neg":
        return {k: -v for k, v in parts[0].items()}
    if x.op in ("add", "sub"):
        sign = 1 if x.op == "add" else -1
        out = dict(parts[0])
        for k, v in parts[1].items():
            out[k] = out.get(k, 0) + sign * v
        return {k: v for k, v in out.items() if v}
    if x.op == "mul" and any(set(p) <= {1} for p in parts):
        c = next(p.get(1, 0) for p in parts if set(p) <= {1})
        other = parts[1] if set(parts[0]) <= {1} else parts[0]
        return {k: c * v for k, v in other.items() if c * v}
    return None


def nonnegative_form(p: Expr, integers: set[str]) -> dict | None:
    """A comparison of linear forms as the form that it says is ≥ 0 (``a < b``: ``b − a − 1``), else None."""
    flip = {"le": 1, "lt": 1, "ge": -1, "gt": -1}
    if not (isinstance(p, Call) and p.op in flip):
        return None
    a, b = (linear_form(x, integers) for x in p.args)
    if a is None or b is None:
        return None
    lo, hi = (a, b) if flip[p.op] == 1 else (b, a)
    out = dict(hi)
    for k, v in lo.items():
        out[k] = out.get(k, 0) - v
    if p.op in ("lt", "gt"):
        out[1] = out.get(1, 0) - 1
    return {k: v for k, v in out.items() if v}


def range_pairs(parts: list[Expr], integers: set[str]) -> tuple[list[tuple[Expr, dict]], list[Expr]]:
    """Pairs of conjuncts that bound one linear form of coordinates from both sides (``n ≤ m ∧ m − n < w``:
    ``0 ≤ m − n ≤ w − 1``), as (the form, its upper bound), and the other conjuncts."""
    forms = [nonnegative_form(p, integers) for p in parts]
    ranges, used = [], set()
    for i, j in itertools.combinations(range(len(parts)), 2):
        a, b = forms[i], forms[j]
        if a is None or b is None or i in used or j in used:
            continue
        total = {k: a.get(k, 0) + b.get(k, 0) for k in set(a) | set(b)}
        total = {k: v for k, v in total.items() if v}
        if any(isinstance(k, Coord) for k in total):
            continue
        for x in (a, b):
            if any(isinstance(k, Coord) for k in x) and all(isinstance(k, Coord) or k == 1 for k in x):
                ranges.append((form_expr(x), total))
                used |= {i, j}
                break
    return ranges, [p for i, p in enumerate(parts) if i not in used]


def form_expr(coefficients: dict) -> Expr:
    """The IR expression of a linear form of coordinates (and a constant)."""

    def term(leaf, k: int) -> Expr:
        return Const(float(abs(k))) if leaf == 1 else leaf if abs(k) == 1 else Call("mul", (Const(float(abs(k))), leaf))

    (leaf, k), *rest = sorted(coefficients.items(), key=lambda kv: (kv[0] == 1, -kv[1]))
    out = term(leaf, k) if k > 0 else Call("neg", (term(leaf, k),))
    for leaf, k in rest:
        out = Call("add" if k > 0 else "sub", (out, term(leaf, k)))
    return out
