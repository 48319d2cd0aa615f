"""Masks that spread a value along a new rank, summed away, as products with an indicator.

MoBA's block means ``kbar[c, e] = Σ_n (k[n, e] :: n // block == c)`` mask k over a rank the key does not have:
held as written, the masked value spans n, e and c at once. The sum is a contraction instead, ``Σ_n k[n, e]·ind[n,
c]`` with ``ind = where(n // block == c, 1, 0)`` (a tl.dot of two 2-D tiles), present where some key passes the
mask, which a count of the passing keys says: ``kbar = Σ_n k·ind :: Σ_n ind > 0``. Exact where the masked value is
present everywhere (made of inputs, parameters and constants) and every consumer is a sum over the masked value
as a factor; anything else is left as written.

>>> import einflash as ef
>>> @ef.attention
... def block_means(q, k, v, block: int = 4):
...     c = ef.rank("c", ef.ceil_div(ef.N, block))
...     kbar = ef.mask(k, ef.n // block == c).sum("n")
...     return ef.softmax(q @ k * ef.scale + (q @ kbar)[ef.m, ef.n // block], "n") @ v
>>> print(sums_as_indicators(block_means.cascade))  # doctest: +ELLIPSIS
cascade block_means  (...)
  ...
  indicator[n,c] = where(n//block == c, 1, 0)    # line 4
  kbar_raw[e,c] = Σ_n k[n,e]·indicator[n,c]    # line 4
  kbar_count[c] = Σ_n indicator[n,c]    # line 4
  kbar[e,c] = kbar_raw[e,c]  :: kbar_count[c] > 0    # line 4
  ...
"""

from __future__ import annotations

from dataclasses import replace

from ...ir.algebra import factors, product
from ...ir.cascade import Cascade, Einsum, Reduction, Role, TensorDecl, plain_read
from ...ir.expr import Const, Expr, Read, call, free_ranks, walk
from ...ir.ranks import PARALLEL, rank_order
from .names import drop_unused, fresh_name, ordered_tensors


def sums_as_indicators(c: Cascade) -> Cascade:
    """Rewrite every sum of a value masked along a rank it does not have (see the module docstring)."""
    for e in c.einsums:
        users = c.consumers(e.out)
        if e.where is None or e.reduce is not None or e.loop or not users or e.out in c.outputs:
            continue
        new = set(free_ranks(e.where)) - set(free_ranks(e.expr)) - set(PARALLEL)
        spread = set(free_ranks(e.where))
        if not new or not _present_everywhere(c, e) or not all(_sums_it(c, u, e.out, spread) for u in users):
            continue
        return sums_as_indicators(_rewrite(c, e, users))
    return c


def _present_everywhere(c: Cascade, e: Einsum) -> bool:
    """Whether ``e``'s value, before its mask, has no absent element (see :func:`_present`)."""
    return _present(c, e.expr)


def _present(c: Cascade, x: Expr) -> bool:
    """Whether ``x`` has no absent element: made of inputs at their own coordinates, parameters and constants."""
    return all(
        not isinstance(y, Read) or (c.tensor(y.tensor).role is Role.INPUT and y == plain_read(c.tensor(y.tensor)))
        for y in walk(x)
    )


def _sums_it(c: Cascade, user: Einsum, name: str, spread: set[str]) -> bool:
    """Whether ``user`` sums, over a rank of the mask (``spread``), a product in which ``name``, read whole, is one
    factor."""
    if user.reduce is None or user.reduce.op != "sum" or user.where is not None or not spread & set(user.reduce.ranks):
        return False
    read = plain_read(c.tensor(name))
    found = [f for f, k in factors(user.expr) if f == read and k == 1]
    # another factor that may be absent would leave a term absent where the indicator makes it 0
    others = all(_present(c, f) for f, _ in factors(user.expr) if f != read)
    return (
        others and len(found) == 1 and sum(1 for x in walk(user.expr) if isinstance(x, Read) and x.tensor == name) == 1
    )


def _rewrite(c: Cascade, masked: Einsum, users: list[Einsum]) -> Cascade:
    assert masked.where is not None  # sums_as_indicators picks masked values
    taken: set[str] = set()

    def fresh(base: str) -> str:
        name = fresh_name(c, base, taken)
        taken.add(name)
        return name

    ind_ranks = rank_order(free_ranks(masked.where))
    ind = Einsum(fresh("indicator"), ind_ranks, call("where", masked.where, Const(1.0), Const(0.0)), line=masked.line)
    decls = [TensorDecl(ind.out, ind_ranks)]
    read = plain_read(c.tensor(masked.out))
    out: list[Einsum] = []
    for e in c.einsums:
        if e is masked:
            out.append(ind)
            continue
        if e not in users:
            out.append(e)
            continue
        body = product(
            [(masked.expr, 1) if f == read else (f, k) for f, k in factors(e.expr)] + [(plain_read(decls[0]), 1)]
        )
        raw = replace(e, out=fresh(f"{e.out}_raw"), expr=body)
        count_ranks = tuple(r for r in e.ranks if r in ind_ranks or r in PARALLEL)
        count = Einsum(
            fresh(f"{e.out}_count"),
            count_ranks,
            plain_read(decls[0]),
            Reduction("sum", tuple(r for r in e.reduce.ranks if r in ind_ranks)) if e.reduce else None,
            line=e.line,
        )
        decls += [TensorDecl(raw.out, e.ranks), TensorDecl(count.out, count_ranks)]
        present = call("gt", Read(count.out, plain_read(decls[-1]).index), Const(0.0))
        out += [raw, count, Einsum(e.out, e.ranks, plain_read(decls[-2]), where=present, line=e.line)]
    tensors = ordered_tensors([*c.tensors, *decls], out)
    return drop_unused(replace(c, einsums=tuple(out), tensors=tuple(tensors)))
