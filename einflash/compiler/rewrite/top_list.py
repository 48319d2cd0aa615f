"""A k-th largest over the keys as a top list, the form that streams.

The k-th largest of a row has no running form: the k-th largest of two chunks is not a function of theirs. The
k largest values seen so far have one: two such lists merge into the k largest of both. So
``tau[m] = kth_k over n of s[m, n]`` becomes a top list over a new LIST rank ``t``,
``tau_top[m, t] = top over n of s[m, n]`` (descending, −inf past the row's length), and ``tau[m] =
tau_top[m, k − 1]``; stream online then keeps ``tau_top`` as a running state (a BLOCK_M × k tile, merged with
each key tile's own top list), and the backward reads it as a saved state. A k-th largest over a rank each program
holds whole (MoBA's key blocks) is left as it is.

A test of the scores against their own k-th largest (top-k attention's mask ``s ≥ tau``, or the strict ``s > tau``)
compares with a *cut* instead, a threshold strictly between the last score that passes and the first that does not
(the list is one longer for it): the same keys pass, but a recomputation of the scores that rounds differently (the
backward's dK/dV kernel contracts k·qᵀ, not q·kᵀ) no longer drops or adds the key at the k-th largest, whose score
would otherwise be compared with itself. The cut is the midpoint of the two scores (halves summed: no overflow),
or the passing one where they are adjacent floats. Where they tie, or the row has no score below the k-th, it lies
a slack below the passing score (above, for the strict test), 2⁻¹² of the row's largest magnitude: a score within
that of a tie falls with the tie. With no k-th largest (fewer than k scores) every score passes ``≥`` and every
finite one passes ``>``.

>>> import einflash as ef
>>> @ef.attention
... def top2(q, k, v):
...     s = q @ k * ef.scale
...     return ef.softmax(ef.mask(s, s >= s.kth_largest(2, "n")), "n") @ v
>>> print(kth_largest_as_top_lists(top2.cascade))  # doctest: +ELLIPSIS
cascade top2  (...)
  ...
  kth_largest_n_top[m,t] = top3_n s[m,n]    # line 4
  kth_largest_n_cut[m] = where(...)    # line 4
  masked[m,n] = s[m,n]  :: s[m,n] ≥ kth_largest_n_cut[m]    # line 4
  ...
"""

from __future__ import annotations

from dataclasses import replace

import sympy

from ...ir.cascade import Cascade, Einsum, Reduction, TensorDecl, plain_read
from ...ir.expr import Call, Const, Expr, Read, call, transform
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
    found = {x.out: {_test_of(y, own, tau) for y in x.nodes()} - {None} for x in c.consumers(e.out) if own is not None}
    tests = {x for x, kinds in found.items() if kinds}
    kinds = set().union(*found.values())
    listed = fresh_name(c, "t", {r.name for r in c.ranks})
    length = k + 1 if tests else k
    ranks = (*e.ranks, listed)
    top = TensorDecl(fresh_name(c, f"{e.out}_top"), ranks)
    made = Einsum(top.name, ranks, e.expr, Reduction("top", (STREAM,), float(length)), e.where, line=e.line)
    at = plain_read(top).index[:-1]

    def entry(i: int) -> Read:
        return Read(top.name, (*at, sympy.Integer(i)))

    einsums = [made, replace(e, expr=entry(k - 1), reduce=None, where=None)]
    decls = [top]
    cuts: dict[bool, Read] = {}
    for strict in (False, True):
        if ("gt" if strict else "ge") in kinds:
            cut = TensorDecl(fresh_name(c, f"{e.out}_{'above' if strict else 'cut'}"), e.ranks)
            einsums.append(Einsum(cut.name, e.ranks, _cut(entry, k, strict), line=e.line))
            decls.append(cut)
            cuts[strict] = plain_read(cut)
    out = []
    for x in c.einsums:
        if x is e:
            out += einsums
        else:
            out.append(_cut_tests(x, own, tau, cuts) if own is not None and x.out in tests else x)
    return drop_unused(
        replace(
            c,
            ranks=(*c.ranks, Rank(listed, sympy.Integer(length), RankRole.LIST)),
            tensors=tuple(ordered_tensors([*c.tensors, *decls], out)),
            einsums=tuple(out),
        )
    )


INF = Const(float("inf"))
NEG_INF = Const(float("-inf"))
FLOAT32_LOWEST = Const(-3.4028234663852886e38)  # the lowest finite score: −inf fails a strict test against it
SLACK = Const(2.0**-12)


def _cut(entry, k: int, strict: bool) -> Expr:
    """The threshold ``s ≥ cut`` tests for ``s ≥ tau`` (``strict``: ``s > tau``); ``entry(i)`` reads the list."""
    kth = entry(k - 1)
    slack = call("mul", call("add", call("abs", entry(0)), call("abs", kth)), SLACK)
    if strict:
        if k == 1:  # nothing lies above the largest
            return INF
        above = entry(k - 2)
        mid = call("add", call("mul", above, Const(0.5)), call("mul", kth, Const(0.5)))
        apart = call("where", call("gt", mid, kth), mid, above)
        tied = call("where", call("eq", kth, NEG_INF), FLOAT32_LOWEST, call("add", kth, slack))
        return call("where", call("gt", above, kth), apart, tied)
    after = entry(k)
    mid = call("add", call("mul", kth, Const(0.5)), call("mul", after, Const(0.5)))
    apart = call("where", call("gt", mid, after), mid, kth)
    below = call("and", call("gt", kth, after), call("gt", after, NEG_INF))
    return call("where", below, apart, call("sub", kth, slack))


def _cut_tests(x: Einsum, own: Expr, tau: Read, cuts: dict[bool, Read]) -> Einsum:
    """``x`` with its tests of ``own`` against ``tau`` comparing with the cuts instead (``s ≥ cut``)."""

    def swap(y: Expr) -> Expr | None:
        kind = _test_of(y, own, tau)
        if kind is None:
            return None
        assert isinstance(y, Call)  # _test_of matched a comparison
        cut = cuts[kind == "gt"]
        return Call("ge", (own, cut), y.merge)

    where = None if x.where is None else transform(x.where, swap)
    return replace(x, expr=transform(x.expr, swap), where=where)


def _test_of(y: Expr, own: Expr, tau: Read) -> str | None:
    """ "ge" for ``own ≥ tau`` (``tau ≤ own``), "gt" for ``own > tau`` (``tau < own``), else None."""
    if not isinstance(y, Call):
        return None
    if (y.op == "ge" and y.args == (own, tau)) or (y.op == "le" and y.args == (tau, own)):
        return "ge"
    if (y.op == "gt" and y.args == (own, tau)) or (y.op == "lt" and y.args == (tau, own)):
        return "gt"
    return None
