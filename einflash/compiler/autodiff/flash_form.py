"""Rewrites of a derived gradient cascade into FlashAttention's form, each checked through the reference.

- :func:`normalised_exponentials`: a softmax's exponentials divided by their row sum where they are made
  (``p = exp2(s − lse2)``), so each pair of a tile takes one subtraction and no products by ``1/den``;
- :func:`row_reciprocals`: divisions by a row tensor as products with its reciprocal, computed once per row;
- :func:`inline_row_products`: row-level products written into the contractions that read them;
- :func:`fold_scalar_chains`: chains of constant factors (``ln 2``, ``log2 e``, the scale) folded into one;
- :func:`scalars_after_sums`: rank-free factors of a summand applied once after the sum.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import TypeGuard

from ...ir.algebra import factors, product
from ...ir.cascade import Cascade, Einsum, TensorDecl, plain_read
from ...ir.expr import Call, Const, Expr, Merge, Read, call, free_ranks, rank_free, reads, transform, walk
from ...ir.ranks import PARALLEL, STREAM
from ...ir.validate import validate
from ..rewrite.names import fresh_name
from ..rewrite.strength import LOG2E
from .gradient import prune


def inline_row_products(c: Cascade) -> Cascade:
    """Row-level products (``d_o·(1/den)``) written into the Einsums that read them, so that a contraction takes
    the row factor out of the dot and keeps the loaded operand as it is (no product tile to stage)."""
    products = {
        e.out: e.expr
        for e in c.einsums
        if e.reduce is None
        and e.where is None
        and e.out not in c.outputs
        and STREAM not in e.iteration_ranks
        and isinstance(e.expr, Call)
        and e.expr.op in ("mul", "div")
    }

    def sub(x):
        if c.is_plain(x) and x.tensor in products:
            return transform(products[x.tensor], sub)
        return None

    einsums = tuple(
        replace(e, expr=transform(e.expr, sub), where=None if e.where is None else transform(e.where, sub))
        for e in c.einsums
        if e.out not in products
    )
    return prune(replace(c, einsums=einsums))


def _row_tensor(c: Cascade, name: str) -> bool:
    return tuple(r for r in c.tensor(name).ranks if r not in PARALLEL) == ("m",)


def _is_reciprocal(e: Einsum) -> bool:
    x = e.expr
    return (
        e.reduce is None
        and e.where is None
        and isinstance(x, Call)
        and x.op == "div"
        and x.args[0] == Const(1.0)
        and isinstance(x.args[1], Read)
    )


def precomputed_row_map(e: Einsum) -> bool:
    """Whether a row map the pair kernels read is computed once per row by the rows kernel: a reciprocal, or one
    that takes a logarithm (a libdevice call of some thirty instructions for each row of every tile pair)."""
    return _is_reciprocal(e) or (e.reduce is None and any(isinstance(x, Call) and x.op == "log" for x in walk(e.expr)))


def row_reciprocals(c: Cascade) -> Cascade:
    """Divisions by a row tensor (``x / den[m]``) in Einsums that iterate more than rows, as products with
    the row's reciprocal ``den__recip[m] = 1 / den[m]``: an Einsum of its own, placed after ``den``'s
    producer, which ``cut`` has the rows kernel precompute. The dK/dV kernel then multiplies where it
    divided once per query row in every tile of keys.
    """
    recips: dict[str, str] = {}
    taken: set[str] = set()

    def sub(x):
        if isinstance(x, Call) and x.op == "div" and c.is_plain(x.args[1]):
            den = x.args[1]
            if _row_tensor(c, den.tensor):
                if den.tensor not in recips:
                    recips[den.tensor] = fresh_name(c, f"{den.tensor}__recip", taken)
                    taken.add(recips[den.tensor])
                num = transform(x.args[0], sub)
                read = Read(recips[den.tensor], den.index)
                return read if num == Const(1.0) else call("mul", num, read)
        return None

    einsums = []
    for e in c.einsums:
        rows_only = {r for r in e.iteration_ranks if r not in PARALLEL} == {"m"}
        einsums.append(e if rows_only or _is_reciprocal(e) else replace(e, expr=transform(e.expr, sub)))
    if not recips:
        return c
    tensors = list(c.tensors)
    for den, name in recips.items():
        decl = c.tensor(den)
        tensors.append(TensorDecl(name, decl.ranks))
        recip = Einsum(name, decl.ranks, call("div", Const(1.0), plain_read(decl)))
        producer = c.producer(den)
        at = 0 if producer is None else next(i for i, e in enumerate(einsums) if e.out == den) + 1
        einsums.insert(at, recip)
    out = replace(c, tensors=tuple(tensors), einsums=tuple(einsums))
    validate(out, contract=False)
    return out


def _without(fs: list, factor: Expr, exponent: int) -> list | None:
    """The factors ``fs`` less one occurrence of ``factor``**``exponent`` (None: it has none)."""
    i = next((i for i, (f, k) in enumerate(fs) if f == factor and k == exponent), None)
    return None if i is None else [fk for fk in fs[:i] + fs[i + 1 :] if fk[0] != Const(1.0)]


def normalised_exponentials(c: Cascade) -> Cascade:
    """A softmax's gradient in FlashAttention's form: its exponentials divided by their row sum where they are
    made, not where they are read.

    The derived gradient reads ``num[m,n] = exp2(x)`` only with the row divisor ``den``: through
    ``d_o_acc = g/den`` in ``d_v = Σ_m d_o_acc·num``, and through ``num``'s adjoint
    ``d_num = Σ_f d_o_acc·v +∪ d_den`` in ``d_x = d_num·…·num``. With ``p = exp2(x − log2 den) = num/den``
    and the adjoint scaled by ``den`` these read ``d_v = Σ_m g·p``, ``d_num·den = Σ_f g·v +∪ d_den·den`` and
    ``d_x = (d_num·den)·…·p``, where ``d_den·den`` is ``d_den``'s reduction with ``1/den`` cancelled (``Σ_f
    d_o·−o``): each pair of a tile then takes one subtraction and no products by ``1/den``. Cascades without
    this structure come back unchanged.
    """
    for dn in c.einsums:
        found = _normalised_match(c, dn)
        if found is not None:
            return found
    return c


def _computed_factors(c: Cascade, x: Expr, exponent: int) -> Iterator[tuple[Read, Einsum]]:
    """The factors of ``x`` with that exponent that read a computed tensor at its own coordinates, each with
    the Einsum computing it."""
    for f, k in factors(x):
        if k == exponent and c.is_plain(f) and (made := c.producer(f.tensor)) is not None:
            yield f, made


def _normalised_match(c: Cascade, dn: Einsum) -> Cascade | None:
    """``normalised_exponentials`` around the adjoint ``dn`` (``d_num = y +∪ d_den``), or None where it does not
    have the structure."""
    x = dn.expr
    if not (dn.reduce is None and dn.where is None and isinstance(x, Call) and x.op == "add" and x.merge is Merge.ANY):
        return None
    terms = [a.tensor for a in x.args if c.is_plain(a)]
    if len(terms) != len(x.args):
        return None
    y, r = terms
    if _row_tensor(c, y):
        y, r = r, y
    dp, rp = c.producer(y), c.producer(r)
    if (
        not _row_tensor(c, r)
        or dp is None
        or rp is None
        or rp.reduce is None
        or rp.reduce.op != "sum"
        or dp.reduce is None
        or dp.reduce.op != "sum"
        or len(c.producers(y)) != 1
        or len(c.producers(r)) != 1
    ):
        return None
    # y = Σ_f acc·v with acc = g/den
    scaled = next(((f, p) for f, p in _computed_factors(c, dp.expr, 1) if p.reduce is None), None)
    if scaled is None:
        return None
    acc, pa = scaled
    den = next((f for f, k in factors(pa.expr) if k == -1 and c.is_plain(f) and _row_tensor(c, f.tensor)), None)
    if den is None or pa.where is not None or len(c.producers(acc.tensor)) != 1:
        return None
    g_factors = _without(factors(pa.expr), den, -1)
    r_scaled = _without(factors(rp.expr), den, -1)  # d_den's summand with 1/den cancelled
    # num's only readers: the adjoint's one product and d_v = Σ_m acc·num
    users = c.consumers(dn.out)
    if len(users) != 1 or users[0].reduce is not None or g_factors is None or r_scaled is None:
        return None
    g = product(g_factors)
    dx = users[0]
    exponential = next(
        (
            (f, p, p.expr)
            for f, p in _computed_factors(c, dx.expr, 1)
            if f.tensor != dn.out and isinstance(p.expr, Call) and p.expr.op == "exp2"
        ),
        None,
    )
    if exponential is None or _without(factors(dx.expr), plain_read(c.tensor(dn.out)), 1) is None:
        return None
    num, pn, exp2 = exponential
    dv = [e for e in c.consumers(num.tensor) if e is not dx]
    rest = None if len(dv) != 1 else _without(factors(dv[0].expr), num, 1)  # d_v's summand without num
    if (
        len(c.producers(num.tensor)) != 1
        or pn.reduce is not None
        or rest is None
        or dv[0].reduce is None
        or _without(rest, acc, 1) is None
    ):
        return None
    if (
        {e.out for e in c.consumers(acc.tensor)} != {y, dv[0].out}
        or c.consumers(y) != [dn]
        or c.consumers(r) != [dn]
        or any(dn.out == o or num.tensor == o for o in c.outputs)
    ):
        return None
    taken: set[str] = set()

    def name(base: str) -> str:
        taken.add(fresh := fresh_name(c, base, taken))
        return fresh

    p, y2, r2, dn2 = name("p"), name(f"{y}__scaled"), name(f"{r}__scaled"), name(f"{dn.out}__scaled")
    lse = name("lse2")
    log2_den = call("mul", call("log", den), Const(LOG2E))
    arg = exp2.args[0]
    if isinstance(arg, Call) and arg.op == "mul" and isinstance(arg.args[1], Const) and _is_shift(diff := arg.args[0]):
        # exp2((x − max)·log2 e): the row's part joins the log-sum-exp, x·log2 e stays per pair (one FMA)
        arg = call("sub", call("mul", diff.args[0], arg.args[1]), call("mul", diff.args[1], arg.args[1]))
    if _is_shift(arg) and free_ranks(arg.args[1]) <= set(c.tensor(den.tensor).ranks):
        lse_expr, exponent = call("add", arg.args[1], log2_den), arg.args[0]
    else:
        lse_expr, exponent = log2_den, arg
    lse_read = plain_read(TensorDecl(lse, c.tensor(den.tensor).ranks))
    shifted = call("sub", exponent, lse_read)
    if _steep(c, exponent):
        # p ≤ 1 exactly; the backward recomputes the scores in another order than the forward, and through an
        # exponential of them (exp(exp(s)) ≈ 1e15) a last-bit difference moves the exponent by ~1e8: p = inf
        shifted = call("minimum", shifted, Const(0.0))
    renamed = {num.tensor: p, acc.tensor: None, y: y2, r: r2, dn.out: dn2}

    def sub(x):
        if isinstance(x, Read) and x.tensor in renamed:
            new = renamed[x.tensor]
            return g if new is None else Read(new, x.index, x.prev)
        return None

    lse_einsum = Einsum(lse, c.tensor(den.tensor).ranks, lse_expr, line=pn.line)
    rewritten = {
        pn.out: replace(pn, out=p, expr=call("exp2", shifted)),
        dp.out: replace(dp, out=y2, expr=transform(dp.expr, sub)),
        rp.out: replace(rp, out=r2, expr=product(r_scaled)),
        dn.out: replace(dn, out=dn2, expr=transform(dn.expr, sub)),
    }
    einsums = [rewritten.get(e.out, replace(e, expr=transform(e.expr, sub))) for e in c.einsums if e.out != acc.tensor]
    # lse2 after what it reads, p after lse2: both before p's readers, which come after the adjoint (it reads den)
    read = {x.tensor for x in reads(lse_expr)}
    einsums.insert(1 + max(i for i, e in enumerate(einsums) if e.out in read), lse_einsum)
    made, after = (next(i for i, e in enumerate(einsums) if e.out == name_) for name_ in (p, lse))
    if after > made:
        einsums.insert(after, einsums.pop(made))
    decls = {p: num.tensor, y2: y, r2: r, dn2: dn.out, lse: den.tensor}
    tensors = list(c.tensors) + [TensorDecl(new, c.tensor(old).ranks) for new, old in decls.items()]
    out = prune(replace(c, tensors=tuple(tensors), einsums=tuple(einsums)))
    validate(out, contract=False)
    return out


STEEP = frozenset({"exp", "exp2"})  # maps whose value grows as fast as the last bit of their argument's rounding


def _steep(c: Cascade, x: Expr) -> bool:
    """Whether ``x`` takes an exponential of the scores: through the Einsums of ``c`` that make what it reads."""
    todo, seen = [x], set()
    while todo:
        for y in walk(todo.pop()):
            if isinstance(y, Call) and y.op in STEEP:
                return True
            if isinstance(y, Read) and y.tensor not in seen and (made := c.producer(y.tensor)) is not None:
                seen.add(y.tensor)
                todo.append(made.expr)
    return False


def _is_shift(x: Expr) -> TypeGuard[Call]:
    return isinstance(x, Call) and x.op == "sub" and x.merge is Merge.ALL


def fold_scalar_chains(c: Cascade) -> Cascade:
    """A product map read only by one other product map written into it, and the constants of the result
    multiplied into one (``d_s2 = d_num·ln 2·num``, ``d_dot = d_s2·scale·log2 e`` become ``d_num·num·scale``):
    the chain rule through exp2 and the base-2 scaling leaves constants that cancel."""

    def is_product(e: Einsum) -> bool:
        return (
            e.reduce is None
            and e.where is None
            and isinstance(e.expr, Call)
            and e.expr.op in ("mul", "div")
            and e.expr.merge is Merge.ALL
        )

    einsums = list(c.einsums)
    changed = True
    while changed:
        changed = False
        for p in einsums:
            users = [e for e in einsums if any(r.tensor == p.out for r in e.reads())]
            if not is_product(p) or p.out in c.outputs or len(users) != 1 or not is_product(users[0]):
                continue
            u = users[0]
            if any(r.tensor == p.out and not c.is_plain(r) for r in u.reads()):
                continue

            def sub(x, p=p):
                return p.expr if isinstance(x, Read) and x.tensor == p.out else None

            folded = _constants_folded(transform(u.expr, sub))
            einsums = [replace(u, expr=folded) if e is u else e for e in einsums if e is not p]
            changed = True
            break
    # within one product too (exp2's ln 2 and the base-2 scale's log2 e in one derivative)
    einsums = [
        replace(e, expr=_constants_folded(e.expr))
        if is_product(e) and sum(isinstance(f, Const) for f, _ in factors(e.expr)) > 1
        else e
        for e in einsums
    ]
    return prune(replace(c, einsums=tuple(einsums)))


def _constants_folded(x: Expr) -> Expr:
    """The product ``x`` with its constant factors multiplied into one (none where they cancel)."""
    fs = factors(x)
    scalar = 1.0
    for f, k in fs:
        if isinstance(f, Const):
            scalar = scalar * f.value if k > 0 else scalar / f.value
    rest = [(f, k) for f, k in fs if not isinstance(f, Const)]
    return product(rest + ([(Const(scalar), 1)] if scalar != 1.0 or not rest else []))


def scalars_after_sums(c: Cascade) -> Cascade:
    """A sum of products whose operand carries rank-free factors (``d_k = Σ_m d_dot·q`` with ``d_dot = (x·scale
    :: mask)``) as the sum of the operand without them, scaled once after the sum (``d_k = d_k__sum·scale``):
    one multiply per result element after the loop instead of one per pair in every tile. The operand's chain
    (masks included: masking commutes with a rank-free scale) must have no other reader."""
    einsums = list(c.einsums)
    tensors = list(c.tensors)
    taken: set[str] = set()
    for e in c.einsums:
        if e.reduce is None or e.reduce.op != "sum" or e.where is not None or e.out in taken:
            continue
        for a, k in factors(e.expr):
            if k != 1 or not c.is_plain(a):
                continue
            t = a.tensor
            while (
                len(c.consumers(t)) == 1
                and (mask := c.producer(t)) is not None
                and mask.where is not None
                and mask.reduce is None
                and c.is_plain(mask.expr)
            ):
                t = mask.expr.tensor  # through a mask to what it masks
            made = c.producer(t)
            fs = [] if made is None else factors(made.expr)
            scalars = [(f, j) for f, j in fs if rank_free(f)]
            if (
                made is None
                or made.reduce is not None
                or made.where is not None
                or not scalars
                or len(scalars) == len(fs)
                or len(c.consumers(t)) != 1
                or len(c.consumers(a.tensor)) != 1
            ):
                continue
            taken.add(raw := fresh_name(c, f"{e.out}__sum", taken))
            tensors.append(TensorDecl(raw, c.tensor(e.out).ranks))
            at = einsums.index(e)
            einsums[einsums.index(made)] = replace(made, expr=product([f for f in fs if f not in scalars]))
            einsums[at : at + 1] = [
                replace(e, out=raw),
                Einsum(e.out, e.ranks, call("mul", plain_read(tensors[-1]), product(scalars)), line=e.line),
            ]
            break
    if not taken:
        return c
    out = replace(c, tensors=tuple(tensors), einsums=tuple(einsums))
    validate(out, contract=False)
    return out
