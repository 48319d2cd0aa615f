"""Cascades in Einsum notation.

>>> from einflash.ir.cascade import Einsum, Reduction
>>> from einflash.ir.expr import Read, call
>>> from einflash.ir.ranks import coord
>>> m, n, e = coord("m"), coord("n"), coord("e")
>>> format_einsum(Einsum("s", ("m", "n"), call("mul", Read("q", (m, e)), Read("k", (n, e))), Reduction("sum", ("e",))))
's[m,n] = Σ_e q[m,e]·k[n,e]'
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

from sympy.core.function import AppliedUndef
from sympy.printing.str import StrPrinter

from .expr import Const, Coord, Expr, Merge, Param, Read, Size
from .operators import OPERATORS, REDUCERS
from .ranks import PARALLEL

if TYPE_CHECKING:  # the cascade prints itself with these functions: it imports this module, not the reverse
    from .cascade import Cascade, Einsum

_PRECEDENCE = {
    "or": 1,
    "and": 2,
    "not": 3,
    "lt": 4,
    "le": 4,
    "gt": 4,
    "ge": 4,
    "eq": 4,
    "ne": 4,
    "add": 5,
    "sub": 5,
    "mul": 6,
    "div": 6,
    "floordiv": 6,
    "mod": 6,
    "neg": 7,
}


class _IndexPrinter(StrPrinter):
    """sympy's own printing, with a gathered entry as the read it is (``bucket[n − m]``, not ``bucket(n − m)``)."""

    def _print_Function(self, expr):
        if isinstance(expr, AppliedUndef):
            return f"{expr.func}[{_index(expr.args)}]"
        return super()._print_Function(expr)


_PRINTER = _IndexPrinter()


def _index(index) -> str:
    names = [_PRINTER.doprint(i) for i in index]
    if all(p in names for p in PARALLEL):
        names = [x for x in names if x not in PARALLEL]
    return ",".join(names)


def _ranks(ranks) -> str:
    return _index(ranks)


def format_expr(x: Expr, parent: int = 0) -> str:
    if isinstance(x, Const):
        v = x.value
        if v == float("inf"):
            return "∞"
        if v == float("-inf"):
            return "−∞"
        return str(int(v)) if v == int(v) else repr(v)
    if isinstance(x, Param):
        return x.name
    if isinstance(x, Coord):
        return x.rank
    if isinstance(x, Size):
        return f"|{x.rank}|"
    if isinstance(x, Read):
        return f"{x.tensor}{'@prev' if x.prev else ''}{'@padded' if x.padded else ''}[{_index(x.index)}]"
    op = OPERATORS[x.op]
    mark = "∪" if x.merge is Merge.ANY else ""
    prec = _PRECEDENCE.get(x.op)
    if prec is not None and op.arity == 2:
        spaced = op.boolean or x.op in ("add", "sub") or mark
        sep = f" {op.symbol}{mark} " if spaced else op.symbol
        text = f"{format_expr(x.args[0], prec)}{sep}{format_expr(x.args[1], prec + (x.op in ('sub', 'div')))}"
        return f"({text})" if prec < parent else text
    if prec is not None:
        return f"{op.symbol}{format_expr(x.args[0], prec)}"
    return f"{x.op}{mark}(" + ", ".join(format_expr(a) for a in x.args) + ")"


def format_einsum(e: Einsum) -> str:
    rhs = format_expr(e.expr, 0 if e.reduce is None else 6)
    if e.reduce is not None:
        red = REDUCERS.get(e.reduce.op)
        sym = red.symbol if red else e.reduce.op
        arg = f"{int(e.reduce.arg)}" if e.reduce.arg is not None else ""
        rhs = f"{sym}{arg}_{''.join(e.reduce.ranks)} {rhs}"
    text = f"{e.out}[{_ranks(e.ranks)}] = {rhs}"
    if e.where is not None:
        text += f"  :: {format_expr(e.where)}"
    return text


def format_cascade(c: Cascade) -> str:
    """The cascade as a readable listing: inputs, parameters, then one Einsum a line."""
    lines = [f"cascade {c.name}" + (f"  ({c.source})" if c.source else "")]
    ins = "  ".join(f"{t.name}[{_ranks(t.ranks)}]" for t in c.inputs)
    lines.append(f"  inputs: {ins}")
    if c.params:
        ps = ", ".join(p.name + (f" = {p.default}" if p.default is not None else "") for p in c.params)
        lines.append(f"  params: {ps}")
    states = c.states
    if states:
        lines.append("  states: " + "  ".join(f"{t.name}[{_ranks(t.ranks)}]" for t in states))
    for k, block in itertools.groupby(c.einsums, key=lambda e: int(e.loop)):  # a loop's Einsums are contiguous
        if k:
            lines.append("  for each chunk of n:" if k == 1 else f"  for each chunk of n, again (loop {k}):")
        pad = "    " if k else "  "
        lines += [pad + format_einsum(e) + (f"    # line {e.line}" if e.line else "") for e in block]
    return "\n".join(lines)
