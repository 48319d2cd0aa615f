"""A k-th largest over the keys as a top list, the form that streams.

The k-th largest of a row has no running form: the k-th largest of two chunks is not a function of theirs. The
k largest values seen so far have one: two such lists merge into the k largest of both. So
``tau[m] = kth_k over n of s[m, n]`` becomes a top list over a new LIST rank ``t``,
``tau_top[m, t] = top over n of s[m, n]`` (descending, −inf past the row's length), and ``tau[m] =
tau_top[m, k − 1]``; stream online then keeps ``tau_top`` as a running state (a BLOCK_M × k tile, merged with
each key tile's own top list), and the backward reads it as a saved state. A k-th largest over a rank each program
holds whole (MoBA's key blocks) is left as it is.

A test of the scores against their own k-th largest (``s ≥ tau``, top-k attention's mask) compares with a cut
between the k-th and the (k + 1)-th largest instead (the list is one longer for it): the same keys pass, but a
recomputation of the scores that rounds differently (the backward's dK/dV kernel contracts k·qᵀ, not q·kᵀ) no
longer drops the key at the k-th largest, whose score would otherwise be compared with itself. The cut is their
midpoint where it lies strictly above the (k + 1)-th (else the k-th itself: two adjacent floats), and −inf where
the row has no (k + 1)-th (every key passes).

>>> import einflash as ef
>>> @ef.attention
... def top2(q, k, v):
...     s = q @ k * ef.scale
...     return ef.softmax(ef.mask(s, s >= s.kth_largest(2, "n")), "n") @ v
>>> print(kth_largest_as_top_lists(top2.cascade))  # doctest: +ELLIPSIS
cascade top2  (...)
  ...
  kth_largest_n_top[m,t] = top3_n s[m,n]    # line 4
  kth_largest_n_cut[m] = where(kth_largest_n_top[m,2] == −∞, −∞, where(...))    # line 4
  masked[m,n] = s[m,n]  :: s[m,n] ≥ kth_largest_n_cut[m]    # line 4
  ...
"""

from __future__ import annotations

from dataclasses import replace

import sympy

from ...ir.cascade import Cascade, Einsum, Reduction, TensorDecl, plain_read
from ...ir.expr import Call, Const, Expr, Read, call, transform, walk
from ...ir.ranks import STREAM, Rank, RankRole
from .names import drop_unused, fresh_name, ordered_tensors


def kth_largest_as_top_lists(c: Cascade) -> Cascade:
    """Every k-th largest over n, not yet streamed, as a top list and a read of its k-th entry."""
    for e in c.einsums:
        if e.reduce is not None and e.reduce.op == "kth_largest" and e.reduce.ranks == (STREAM,) and not e.loop:
            return kth_largest_as_top_lists(_as_top_list(c, e))
    return c


def _as_top_list(c: Cascade, e: Einsum) -> Cascade:
    assert e.reduce is not None and e.reduce.arg is not None  # validated: kth_largest over n with its k
    k = int(e.reduce.arg)
    own = e.expr if e.where is None and c.is_plain(e.expr) else None
    tau = plain_read(c.tensor(e.out))
    tests = {x.out for x in c.consumers(e.out) if own is not None and any(_is_test(y, own, tau) for y in _nodes(x))}
    listed = _fresh_rank(c, "t")
    length = k + 1 if tests else k
    ranks = (*e.ranks, listed)
    top = TensorDecl(fresh_name(c, f"{e.out}_top"), ranks)
    made = Einsum(top.name, ranks, e.expr, Reduction("top", (STREAM,), float(length)), e.where, line=e.line)
    at = plain_read(top).index[:-1]
    kth = Read(top.name, (*at, sympy.Integer(k - 1)))
    einsums = [made, replace(e, expr=kth, reduce=None, where=None)]
    decls = [top]
    if tests:
        after = Read(top.name, (*at, sympy.Integer(k)))
        mid = call("mul", call("add", kth, after), Const(0.5))
        cut = TensorDecl(fresh_name(c, f"{e.out}_cut"), e.ranks)
        inner = call("where", call("gt", mid, after), mid, kth)
        expr = call("where", call("eq", after, Const(float("-inf"))), Const(float("-inf")), inner)
        einsums.append(Einsum(cut.name, e.ranks, expr, line=e.line))
        decls.append(cut)
    out = []
    for x in c.einsums:
        if x is e:
            out += einsums
        else:
            out.append(_cut_tests(x, own, tau, plain_read(decls[-1])) if own is not None and x.out in tests else x)
    return drop_unused(
        replace(
            c,
            ranks=(*c.ranks, Rank(listed, sympy.Integer(length), RankRole.LIST)),
            tensors=tuple(ordered_tensors([*c.tensors, *decls], out)),
            einsums=tuple(out),
        )
    )


def _cut_tests(x: Einsum, own: Expr, tau: Read, cut: Read) -> Einsum:
    """``x`` with its tests ``own ≥ tau`` (``tau ≤ own``) comparing with ``cut`` instead."""

    def swap(y: Expr) -> Expr | None:
        if _is_test(y, own, tau):
            assert isinstance(y, Call)  # _is_test matched a comparison
            return Call(y.op, tuple(cut if a == tau else a for a in y.args), y.merge)
        return None

    where = None if x.where is None else transform(x.where, swap)
    return replace(x, expr=transform(x.expr, swap), where=where)


def _is_test(y: Expr, own: Expr, tau: Read) -> bool:
    return isinstance(y, Call) and ((y.op == "ge" and y.args == (own, tau)) or (y.op == "le" and y.args == (tau, own)))


def _nodes(x: Einsum) -> list[Expr]:
    return [*walk(x.expr), *(walk(x.where) if x.where is not None else ())]


def _fresh_rank(c: Cascade, base: str) -> str:
    name, i = base, 2
    while c.has_rank(name):
        name, i = f"{base}{i}", i + 1
    return name
