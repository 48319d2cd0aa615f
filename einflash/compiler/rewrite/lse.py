"""The log-sum-exp output: the cascade's softmax over n, found in the IR, and its log-normaliser as an Einsum.

A softmax over n, as ``ef.softmax`` expands it (or as written by hand), is three Einsums:
``top = max_n x``, ``num = exp(x − top)``, ``den = Σ_n num``; its log-sum-exp is
``lse = top + log(den)``. :func:`with_lse` appends that Einsum as a second, per-row output
*before* the rewrites, so the pipeline carries it like any other value: the exponent in base 2
gives it ``top2·ln 2`` (natural log whatever the kernel's base), streaming puts it after the
loop, and the lowering computes it in the epilogue of the fused kernel or of the split-KV
combine from the final running states. A row with no unmasked key leaves ``top`` and ``den``
absent, hence ``lse`` absent, stored as −inf (``ROW_OUTPUT_ABSENT``, the log of an empty sum).

>>> import einflash as ef
>>> @ef.attention
... def plain(q, k, v):
...     return ef.softmax(q @ k * ef.scale, "n") @ v
>>> with_lse(plain.cascade).einsums[-1].out, with_lse(plain.cascade).outputs
('lse', ('o', 'lse'))
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TypeGuard

from ...errors import NormaliserError
from ...ir.cascade import Cascade, Einsum, Role, TensorDecl, reduces
from ...ir.expr import Call, Expr, Read, call
from ...ir.ranks import PARALLEL, STREAM, coord
from .names import fresh_name

LSE = "lse"  # the output's name (fresh_name picks another if the cascade uses it)


@dataclass(frozen=True)
class Softmax:
    """A softmax over ``rank``: ``top = max x``, ``den = Σ exp(x − top)``, both over ``rank``."""

    top: str
    den: str
    rank: str
    line: int | None


def softmaxes(c: Cascade) -> list[Softmax]:
    """Every softmax of the cascade, over any rank, in order of its sum."""
    found = []
    for e in c.einsums:
        red = e.reduce
        if (
            e.loop
            or red is None
            or red.op != "sum"
            or len(red.ranks) != 1
            or e.where is not None
            or not isinstance(e.expr, Read)
        ):
            continue
        num = c.producer(e.expr.tensor)
        if (
            num is None
            or num.reduce is not None
            or num.where is not None
            or not _is_call(num.expr, "exp")
            or not _is_call(num.expr.args[0], "sub")
        ):
            continue
        x, top = num.expr.args[0].args
        made = c.producer(top.tensor) if isinstance(top, Read) else None
        if (
            made is not None
            and made.reduce is not None
            and made.reduce.op == "max"
            and made.reduce.ranks == red.ranks
            and made.where is None
            and made.expr == x
        ):
            found.append(Softmax(made.out, e.out, red.ranks[0], e.line))
    return found


def _is_call(x: Expr, op: str) -> TypeGuard[Call]:
    return isinstance(x, Call) and x.op == op


def _per_row(c: Cascade, s: Softmax) -> bool:
    return s.rank == STREAM and tuple(r for r in c.tensor(s.den).ranks if r not in PARALLEL) == ("m",)


def with_lse(c: Cascade) -> Cascade:
    """``c`` with a second output ``lse[m] = top[m] + log(den[m])`` of its one softmax over n.

    Raises NormaliserError, saying what the cascade normalises with, when it has no softmax over n
    per query row, or several.
    """
    rows = [s for s in softmaxes(c) if _per_row(c, s)]
    if len(rows) != 1:
        raise NormaliserError(
            f"{c.name}: the log-sum-exp output needs one softmax over n of the scores of each "
            f"query row, and {_normaliser(c, rows)}"
        )
    s = rows[0]
    name = fresh_name(c, LSE)
    ranks = c.tensor(s.den).ranks
    at = tuple(coord(r) for r in ranks)
    lse = Einsum(name, ranks, call("add", Read(s.top, at), call("log", Read(s.den, at))), line=s.line)
    return replace(
        c,
        tensors=c.tensors + (TensorDecl(name, ranks, Role.OUTPUT),),
        einsums=c.einsums + (lse,),
        outputs=c.outputs + (name,),
    )


def _normaliser(c: Cascade, rows: list[Softmax]) -> str:
    """What ``c`` normalises with, for NormaliserError's message."""

    def at(line):
        return f" (line {line})" if line else ""

    if rows:
        return f"it has {len(rows)}: " + ", ".join(f"{s.den} = Σ_n exp(·){at(s.line)}" for s in rows)
    other = softmaxes(c)
    if other:
        return "its softmax is " + ", ".join(
            f"over {s.rank} of {s.top}[{','.join(r for r in c.tensor(s.top).ranks if r not in PARALLEL)}]{at(s.line)}"
            for s in other
        )
    sums = [e for e in c.einsums if reduces(e) and STREAM in e.reduce.ranks]
    kinds = ", ".join(f"{e.out} = {e.reduce.op}_n{at(e.line)}" for e in sums) or "none"
    return f"it has no softmax (its reductions over n: {kinds})"
