"""The chunked form of causal attention in linear form: each chunk of C queries against its own C keys, and
against the keys before it through a running state.

A cascade in linear form (einflash.compiler.analysis.linear_form) has weights
``w[m,n] = Σ_e a[m,e]·b[n,e]·P(m,n,e)`` under the causal mask ``n ≤ m``, where ``a`` is made of query-side
factors, ``b`` of key-side ones and ``P`` of the factors of both sides (a decay ``γ^(m − n)``, GLA's gates
``exp(G[m,e] − G[n,e])``). When ``P`` is *anchored*, ``P(m,n) = P(m,p)·P(p,n)`` for every position ``p``, the keys
up to ``p`` reach every later query through one E×F state per head:

    H_p[e,f] = Σ_{n ≤ p} b[n,e]·P(p,n,e)·v[n,f]          o[m,f] ⊇ Σ_e a[m,e]·P(m,p,e)·H_p[e,f]   (m > p)
    H_p' = P(p',p)·H_p + Σ_{p < n ≤ p'} b[n,e]·P(p',n,e)·v[n,f]

Anchoring each chunk's state at the chunk's last key keeps every factor a ratio over at most one chunk (a decay
0.8^8192 is 0 in any float; 0.8^64 is not). The **state kernel** walks the chunks of one head in order, storing
the state before each chunk and updating it with the chunk's keys (one tensor-core product per chunk); the
**query kernel** is the cascade's own one-pass kernel whose loop visits only the query tile's own chunk of keys
(the mask gains ``n // C == m // C``), with the state's term added after it. O(N·C·(E + F) + N·E·F) work per head
instead of O(N²·(E + F)). Under the mask ``n ≥ m`` (each query sees the keys from its own on) the same holds with
the states running backwards: each anchored at the first key after its chunk, the walk from the last chunk.

The positions the factors are evaluated at are integer parameters of the chunk cascades (``anchor_lo``, the key
before the chunk (after it); ``anchor_hi``, the chunk's last key (first); ``chunk``, its index), which the kernels
bind per chunk:
``P(m, p)`` is ``P`` with the key position (its coordinate, and the key-side reads' index) replaced by
``anchor_lo``. tests/rewrites run both chunk cascades through the reference executor, chunk by chunk, against the
cascade as written.

>>> import einflash as ef
>>> @ef.attention
... def decayed(q, k, v, decay: ef.Tensor["h"]):
...     return ef.mask((q @ k) * ef.exp((ef.m - ef.n) * ef.log(decay)), ef.n <= ef.m) @ v
>>> ch = chunked_form(decayed.cascade, decayed.forward.rewritten, chunk=64)
>>> [e.out for e in ch.states.einsums]
['kb', 'decay_between', 'update']
>>> [e.out for e in ch.queries.einsums][-3:]
['qa', 'from_state', 'o_chunked']
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import sympy

from ...ir.algebra import factors, product
from ...ir.cascade import Cascade, Einsum, Layout, ParamDecl, Reduction, Role, TensorDecl
from ...ir.expr import (
    Call,
    Const,
    Coord,
    Expr,
    Merge,
    Param,
    Read,
    Size,
    at_positions,
    call,
    free_ranks,
    reads,
    to_sympy,
)
from ...ir.ranks import STREAM, Rank, coord, extent_symbol
from ..analysis.linear_form import linear_form
from ..analysis.mask_tiles import affine_form

ANCHOR_LO, ANCHOR_HI, CHUNK = "anchor_lo", "anchor_hi", "chunk"
HAS_STATE = "has_state"  # 1 where a state of earlier keys comes in (a prefill that goes on): the first chunk reads it
STATE = "hs"  # the chunk states the state kernel stores: hs[b, h, chunk, e, f], the state before each chunk
CHUNK_RANK = "c"


@dataclass(frozen=True)
class Chunked:
    """The two cascades of the chunked form and the chunk size they are cut for.

    ``states`` holds, per chunk, the key-side weights anchored at the chunk's last key (``kb[n,e]``), the factor
    that carries the state from the previous chunk's last key to this one's (``decay_between[e]``, or rank-free),
    and the chunk's own contribution (``update[e,f]``); ``queries`` is the rewritten cascade restricted to each
    query's own chunk, then the state's term ``Σ_e qa[m,e]·hs[chunk,e,f]``."""

    states: Cascade
    queries: Cascade
    chunk: int
    contracted: str  # e: the state's first rank
    value: str  # f: the state's second rank, the output's
    direction: int  # 1: keys before each query (the states run forwards), −1: keys after (backwards)


@dataclass(frozen=True)
class Weights:
    """``w[m,n] = Σ_e query·key·pair`` (``pair`` may be None: no factor of both sides), and the value read."""

    query: Expr
    key: Expr
    pair: Expr | None
    contracted: str
    value: Read
    direction: int  # 1: the causal mask n ≤ m (keys before); −1: n ≥ m (keys after)


def chunked_form(written: Cascade, rewritten: Cascade, chunk: int) -> Chunked | None:
    """The chunked form of ``written`` (as declared; ``rewritten`` is its one-pass form) for chunks of ``chunk``
    positions, or None where it has none: not in causal linear form (``n ≤ m``, exactly), a factor of both sides
    that is not anchored, a side's factor that is a reduction (a feature map normalised over e)."""
    form = linear_form(written)
    if form is None or not form.causal:
        return None
    w = weights(written)
    if w is None or (w.pair is not None and not anchored(w.pair)):
        return None
    queries = _query_cascade(rewritten, w, chunk)
    if queries is None:
        return None
    return Chunked(
        _state_cascade(written, w),
        queries,
        chunk,
        w.contracted,
        next(r for r in written.tensor(written.outputs[0]).ranks if r not in ("b", "h", "m")),
        w.direction,
    )


def weights(c: Cascade) -> Weights | None:
    """The factors of ``c``'s weights by side, every intermediate made without a reduction inlined; None where they
    are not ``Σ_e query·key·pair`` under the causal mask alone."""
    out = c.producer(c.outputs[0])
    if out is None or out.reduce is None or out.reduce.ranks != (STREAM,):
        return None
    values = [f for f, k in factors(out.expr) if isinstance(f, Read) and c.tensor(f.tensor).layout is Layout.KEY]
    if len(values) != 1 or (values[0], 1) not in factors(out.expr):
        return None
    sides: dict[str, list[tuple[Expr, int]]] = {"query": [], "key": [], "pair": []}
    contracted: str | None = None
    directions: set[int] = set()
    todo = [(f, k) for f, k in factors(out.expr) if f != values[0]]
    while todo:
        f, k = todo.pop()
        made = c.producer(f.tensor) if isinstance(f, Read) else None
        if made is not None and isinstance(f, Read):
            if k != 1 or tuple(f.index) != tuple(coord(r) for r in made.ranks):
                return None
            if made.reduce is None:  # a product of factors, perhaps under the causal mask
                if made.where is not None:
                    directions.add(direction(made.where) or 0)
                todo += factors(made.expr)
                continue
            if made.reduce.op != "sum" or len(made.reduce.ranks) != 1 or made.where is not None or contracted:
                return None
            contracted = made.reduce.ranks[0]
            todo += factors(made.expr)
            continue
        if any(c.producer(r.tensor) is not None for r in reads(f)):
            return None  # a factor computed from an intermediate with a reduction (a normalised feature map)
        side = free_ranks(f) & {"m", STREAM}
        sides["pair" if side == {"m", STREAM} else "key" if side == {STREAM} else "query"].append((f, k))
    if contracted is None or len(directions) != 1 or 0 in directions:
        return None
    return Weights(
        product(sides["query"]),
        product(sides["key"]),
        product(sides["pair"]) if sides["pair"] else None,
        contracted,
        values[0],
        directions.pop(),
    )


def _symbolic(x: Expr) -> sympy.Expr:
    """``x`` in sympy, each read an undefined function of its index (so that positions substitute into reads)."""

    def leaf(y: Expr) -> sympy.Expr:
        if isinstance(y, Read):
            return sympy.Function(y.tensor)(*y.index)
        if isinstance(y, Coord):
            return coord(y.rank)
        if isinstance(y, Param):
            return sympy.Symbol(y.name, integer=True)
        if isinstance(y, Size):
            return sympy.Symbol(f"size_{y.rank}", positive=True)
        raise TypeError(y)

    return to_sympy(x, leaf)


def anchored(pair: Expr) -> bool:
    """Whether ``P(m,n) = P(m,p)·P(p,n)`` for every position p (a decay between two positions, made of a value at
    each: ``exp(G[m] − G[n])``, ``γ^(m − n)``)."""
    p = sympy.Symbol("p", integer=True, nonnegative=True)
    whole = _symbolic(pair)
    split = whole.subs(coord(STREAM), p) * whole.subs(coord("m"), p)
    ratio = sympy.simplify(sympy.powsimp(whole / split, combine="exp", force=True))
    return bool(ratio == 1)


def _positions(c: Cascade, *names: str) -> tuple[ParamDecl, ...]:
    return c.params + tuple(ParamDecl(n, integer=True) for n in names)


def _state_cascade(c: Cascade, w: Weights) -> Cascade:
    """kb[n,e] = b·P(anchor_hi, n); decay_between[e] = P(anchor_hi, anchor_lo); update[e,f] = Σ_n kb·v."""
    e, f = w.contracted, next(r for r in c.tensor(w.value.tensor).ranks if r not in ("b", "h", STREAM))
    kb_expr = w.key if w.pair is None else call("mul", w.key, at_positions(w.pair, {"m": Param(ANCHOR_HI)}))
    anchors = {"m": Param(ANCHOR_HI), STREAM: Param(ANCHOR_LO)}
    between = Const(1.0) if w.pair is None else at_positions(w.pair, anchors)
    between_ranks = ("b", "h") + tuple(r for r in (e,) if r in free_ranks(between))
    kb_ranks = ("b", "h", STREAM, e)
    einsums = (
        Einsum("kb", kb_ranks, kb_expr),
        Einsum("decay_between", between_ranks, between),
        Einsum(
            "update",
            ("b", "h", e, f),
            call("mul", Read("kb", tuple(coord(r) for r in kb_ranks)), w.value),
            Reduction("sum", (STREAM,)),
        ),
    )
    made = {"kb": kb_ranks, "decay_between": between_ranks, "update": ("b", "h", e, f)}
    tensors = tuple(t for t in c.tensors if t.role is Role.INPUT) + tuple(
        TensorDecl(n, r, Role.OUTPUT if n == "update" else Role.INTERMEDIATE) for n, r in made.items()
    )
    return replace(
        c,
        tensors=tensors,
        params=_positions(c, ANCHOR_LO, ANCHOR_HI),
        einsums=einsums,
        outputs=("update",),
    )


def _query_cascade(rewritten: Cascade, w: Weights, chunk: int) -> Cascade | None:
    """The rewritten cascade with each query's keys cut to its own chunk, then its state's term; None where its
    loop is masked otherwise than by the causal mask alone."""
    own = call(
        "eq", call("floordiv", Coord(STREAM), Const(float(chunk))), call("floordiv", Coord("m"), Const(float(chunk)))
    )
    masked = {e.out: e.where for e in rewritten.einsums if e.loop and e.where is not None}
    if not masked or not all(direction(where) == w.direction for where in masked.values()):
        return None
    einsums = [replace(e, where=call("and", masked[e.out], own)) if e.out in masked else e for e in rewritten.einsums]
    e, out = w.contracted, rewritten.outputs[0]
    f = next(r for r in rewritten.tensor(out).ranks if r not in ("b", "h", "m"))
    qa_expr = w.query if w.pair is None else call("mul", w.query, at_positions(w.pair, {STREAM: Param(ANCHOR_LO)}))
    qa_ranks = ("b", "h", "m", e)
    state = Read(STATE, (coord("b"), coord("h"), extent_symbol(CHUNK), coord(e), coord(f)))
    # the first chunk has no keys before it (the last none after it): its rows take nothing from a state, unless one
    # comes in from the keys before the sequence
    size = Const(float(chunk))
    last = call("floordiv", call("sub", Size(STREAM), Const(1.0)), size)
    after_first = call("mul", size, call("sub", Const(1.0), Param(HAS_STATE)))
    first = (
        call("ge", Coord("m"), after_first)
        if w.direction == 1
        else call("lt", call("floordiv", Coord("m"), size), last)
    )
    einsums += [
        Einsum("qa", qa_ranks, qa_expr, where=first),
        Einsum(
            "from_state",
            ("b", "h", "m", f),
            call("mul", Read("qa", tuple(coord(r) for r in qa_ranks)), state),
            Reduction("sum", (e,)),
        ),
        Einsum(
            "o_chunked",
            ("b", "h", "m", f),
            Call("add", (Read(out, _own(("b", "h", "m", f))), Read("from_state", _own(("b", "h", "m", f)))), Merge.ANY),
        ),
    ]
    tensors = tuple(
        replace(t, role=Role.INTERMEDIATE) if t.name == out and t.role is Role.OUTPUT else t for t in rewritten.tensors
    ) + (
        TensorDecl(STATE, ("b", "h", CHUNK_RANK, e, f), Role.INPUT, Layout.DECLARED),
        TensorDecl("qa", qa_ranks),
        TensorDecl("from_state", ("b", "h", "m", f)),
        TensorDecl("o_chunked", ("b", "h", "m", f), Role.OUTPUT),
    )
    chunks = sympy.ceiling(next(r.extent for r in rewritten.ranks if r.name == STREAM) / chunk)
    return replace(
        rewritten,
        ranks=rewritten.ranks + (Rank(CHUNK_RANK, chunks),),
        tensors=tensors,
        params=_positions(rewritten, ANCHOR_LO, CHUNK, HAS_STATE),
        einsums=tuple(einsums),
        outputs=("o_chunked",) + rewritten.outputs[1:],
    )


def _own(ranks: tuple[str, ...]) -> tuple[sympy.Symbol, ...]:
    return tuple(coord(r) for r in ranks)


def direction(where: Expr) -> int | None:
    """1 where ``where`` is exactly the causal mask ``n ≤ m``, −1 where it is ``n ≥ m`` (each query sees the keys
    from its own position on), else None."""
    form = affine_form(where)
    found = None if form is None or len(form) != 1 else [str(x) for x in form[0]]
    return {"m - n >= 0": 1, "-m + n >= 0": -1}.get(found[0]) if found and len(found) == 1 else None
