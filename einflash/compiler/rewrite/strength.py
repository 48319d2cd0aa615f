"""Rewrites that make the per-element arithmetic cheaper without changing the passes.

GPUs compute ``exp2`` natively (``exp(x)`` costs an extra multiply by log2 e), and a
multiply followed by a subtraction fuses into one FMA. So the online-softmax step
``exp(s·c − max_n(s·c))`` is cheapest as ``exp2(s·(c·log2 e) − max_n(s)·(c·log2 e))``,
with the row maximum taken before scaling. Three pure rewrites get there:

- :func:`scalars_before_masks`: ``(a·c :: p)`` becomes ``(a :: p)·c`` for a rank-free c;
- :func:`exponent_base2`: ``exp(x − max_n x)`` becomes ``exp2(x' − max_n x')``, ``x' = x·log2 e``, where x is a
  product the constant folds into (one rounding, as PyTorch's ``x``); any other x (a sum with a bias, an
  exponential) becomes ``exp2((x − max_n x)·log2 e)``: scaling first would round ``x·log2 e`` once more, by
  eps·|x| where only x − max matters, and overflow for |x| within a factor log2 e of the float32 maximum;
- :func:`scalars_out_of_max`: ``max_n(y·c)`` becomes ``max_n(y)·c`` for a positive c.

Each is checked by running both sides through the reference executor (tests/rewrites).
"""

from __future__ import annotations

import math
from dataclasses import replace

from ...ir.algebra import factors, product
from ...ir.cascade import Cascade, Einsum, Reduction, TensorDecl
from ...ir.expr import Call, Const, Expr, Param, Read, call, rank_free, reads, transform, walk
from ...ir.ranks import STREAM, coord
from .names import drop_unused, fresh_name, ordered_tensors

LOG2E = 1.0 / math.log(2.0)
LN2 = math.log(2.0)


def _positive(c: Cascade, x: Expr) -> bool:
    if isinstance(x, Const):
        return x.value > 0
    if isinstance(x, Param):
        return any(p.name == x.name and p.positive for p in c.params)
    if isinstance(x, Call) and x.op in ("mul", "div"):
        return all(_positive(c, a) for a in x.args)
    return isinstance(x, Call) and x.op in ("exp", "exp2", "sigmoid")


def _grouped(fs: list[tuple[Expr, int]]) -> Expr:
    """A product with its rank-free factors multiplied together first, so kernels compute them once."""
    tensors = [(f, k) for f, k in fs if not rank_free(f)]
    scalars = [(f, k) for f, k in fs if rank_free(f)]
    if not scalars:
        return product(tensors)
    if not tensors:
        return product(scalars)
    return call("mul", product(tensors), product(scalars))


def _fresh(c: Cascade, base: str, taken: set[str]) -> str:
    name = fresh_name(c, base, taken)
    taken.add(name)
    return name


def scalars_before_masks(c: Cascade) -> Cascade:
    """``s = a·c :: p`` → ``s_raw = a :: p``, ``s = s_raw·c`` (masking commutes with a rank-free scale)."""
    out, tensors = [], list(c.tensors)
    taken: set[str] = set()
    for e in c.einsums:
        fs = factors(e.expr)
        scal = [f for f in fs if rank_free(f[0])]
        rest = [f for f in fs if not rank_free(f[0])]
        if e.loop or e.where is None or e.reduce is not None or not scal or not rest:
            out.append(e)
            continue
        raw = _fresh(c, f"{e.out}_raw", taken)
        tensors.append(TensorDecl(raw, e.ranks))
        out.append(Einsum(raw, e.ranks, product(rest), where=e.where, line=e.line))
        out.append(
            Einsum(e.out, e.ranks, call("mul", Read(raw, tuple(coord(r) for r in e.ranks)), product(scal)), line=e.line)
        )
    return replace(c, einsums=tuple(out), tensors=tuple(ordered_tensors(tensors, out)))


def exponent_base2(c: Cascade) -> Cascade:
    """``exp(x − max_n x)`` → ``exp2(x' − max_n x')`` with ``x' = x·log2 e``, when that is every use of the max
    in the first output's computation; a further output (the log-sum-exp) reads the max as ``max_n x'·ln 2``."""
    for e in c.einsums:
        red = e.reduce
        if e.loop or red is None or red.op != "max" or red.ranks != (STREAM,) or e.where is not None:
            continue
        if not c.is_plain(e.expr):
            continue
        x = e.expr
        pattern = call("exp", call("sub", x, Read(e.out, tuple(coord(r) for r in e.ranks))))
        if not _only_in(_first_output(c), e.out, pattern):
            continue
        taken: set[str] = set()
        x2 = _fresh(c, f"{x.tensor}2", taken)
        top2 = _fresh(c, f"{e.out}2", taken)
        made = c.producer(x.tensor)
        body = made.expr if (made is not None and made.where is None and made.reduce is None and not made.loop) else x
        if not _scales_exactly(body):
            shifted = call("exp2", call("mul", pattern.args[0], Const(LOG2E)))
            shifted_in = tuple(
                replace(f, expr=transform(f.expr, lambda y: shifted if y == pattern else None))  # noqa: B023 -- called before transform returns
                for f in c.einsums
            )
            return exponent_base2(replace(c, einsums=shifted_in))
        scaled = _grouped(factors(body) + [(Const(LOG2E), 1)])
        x2_read = Read(x2, x.index)
        top2_read = Read(top2, tuple(coord(r) for r in e.ranks))
        new = call("exp2", call("sub", x2_read, top2_read))
        natural = _in_natural_log(e.out, top2)
        einsums = []
        for f in c.einsums:
            if f is e:
                einsums.append(Einsum(x2, c.tensor(x.tensor).ranks, scaled, line=made.line if made else e.line))
                einsums.append(Einsum(top2, e.ranks, x2_read, Reduction("max", red.ranks), line=e.line))
                continue
            sub = transform(f.expr, lambda y: new if y == pattern else None)  # noqa: B023 -- called before transform returns
            sub = transform(sub, natural)
            einsums.append(replace(f, expr=sub))
        tensors = list(c.tensors) + [TensorDecl(x2, c.tensor(x.tensor).ranks), TensorDecl(top2, e.ranks)]
        c = replace(c, einsums=tuple(einsums), tensors=tuple(ordered_tensors(tensors, einsums)))
        return exponent_base2(drop_unused(c))
    return c


BOUNDED = frozenset({"tanh", "sigmoid", "sin", "cos"})  # calls whose value stays within [−1, 1]


def _scales_exactly(body: Expr) -> bool:
    """Whether ``body·log2 e`` rounds as ``body`` does: a product (log2 e joins its constants) whose factors are
    reads and bounded calls (no overflow of the scaled value before the maximum is subtracted)."""
    return all(
        rank_free(f) or isinstance(f, Read) or (isinstance(f, Call) and f.op in BOUNDED) for f, _ in factors(body)
    )


def scalars_out_of_max(c: Cascade) -> Cascade:
    """``t = max_n(y·c)`` → ``t_raw = max_n y``, ``t = t_raw·c`` for a positive rank-free c."""
    out, tensors = [], list(c.tensors)
    taken: set[str] = set()
    for e in c.einsums:
        red = e.reduce
        made = c.producer(e.expr.tensor) if isinstance(e.expr, Read) else None
        fs: list[tuple[Expr, int]] = []
        if (
            not e.loop
            and red is not None
            and red.op == "max"
            and e.where is None
            and made is not None
            and made.reduce is None
            and made.where is None
            and not made.loop
            and c.is_plain(e.expr)
        ):
            fs = factors(made.expr)
        scal = [f for f in fs if rank_free(f[0])]
        rest = [f for f in fs if not rank_free(f[0])]
        if not scal or not rest or not all(_positive(c, f) and k == 1 for f, k in scal):
            out.append(e)
            continue
        raw = _fresh(c, f"{e.out}_raw", taken)
        tensors.append(TensorDecl(raw, e.ranks))
        out.append(Einsum(raw, e.ranks, product(rest), red, line=e.line))
        out.append(
            Einsum(e.out, e.ranks, call("mul", Read(raw, tuple(coord(r) for r in e.ranks)), product(scal)), line=e.line)
        )
    return drop_unused(replace(c, einsums=tuple(out), tensors=tuple(ordered_tensors(tensors, out))))


def _in_natural_log(name: str, base2: str):
    """A transform reading the max ``name`` as ``base2·ln 2``: the same value, from the max in base 2."""

    def fn(y: Expr) -> Expr | None:
        if isinstance(y, Read) and y.tensor == name:
            return call("mul", Read(base2, y.index), Const(LN2))
        return None

    return fn


def _first_output(c: Cascade) -> Cascade:
    """``c`` without the Einsums only its further outputs need (the log-sum-exp of einflash.compiler.rewrite.lse)."""
    return drop_unused(replace(c, outputs=c.outputs[:1]))


def _only_in(c: Cascade, name: str, pattern: Expr) -> bool:
    """Whether every read of ``name`` sits inside an occurrence of ``pattern``."""
    if name in c.outputs:
        return False
    for e in c.einsums:
        exprs = [e.expr] + ([e.where] if e.where is not None else [])
        for x in exprs:
            total = sum(1 for r in reads(x) if r.tensor == name)
            inside = sum(1 for y in walk(x) if y == pattern)
            if total != inside:
                return False
    return True
