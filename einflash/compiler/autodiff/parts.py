"""The gradient cascade cut into the backward kernels' cascades, each with its loop.

The rows kernel computes the row terms (reductions over f that the pair kernels read, and gradients of
inputs read only per row); the keys kernels, where the forward made several passes over the keys, the key
terms (sums over n of a row that the pair kernels read: the adjoint of a first pass's row sum, read in the
second pass's weights), each in a pass over the keys of each query tile; the dK/dV kernel streams queries
past a key tile, the dQ kernel keys past a query tile. Each part is a cascade of its own (row and key terms
read as inputs), with every reduction over several ranks split into one-rank steps
(:func:`one_rank_reductions`) and the reductions over the streamed rank made running sums (:func:`loop_over`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ...errors import LoweringError
from ...ir.cascade import Cascade, Einsum, Reduction, Role, TensorDecl, plain_read
from ...ir.expr import Merge, call
from ...ir.ranks import STREAM, rank_order
from ...ir.validate import validate
from ..rewrite.names import fresh_name
from .flash_form import (
    fold_scalar_chains,
    inline_row_products,
    normalised_exponentials,
    precomputed_row_map,
    row_reciprocals,
    scalars_after_sums,
)
from .gradient import Gradient, prune

# -- the kernels' parts of the gradient cascade -------------------------------------------------


@dataclass(frozen=True)
class Parts:
    """The gradient cascade cut into the kernels' cascades; ``row_terms`` are computed by ``rows``, then
    ``key_terms`` by the ``keys`` kernels, one after the other, each reading what those before it computed;
    the dK/dV and dQ kernels read them all. ``kv_atomic`` is the dK/dV kernel of the atomic schedule
    (query-side partials too)."""

    rows: Cascade | None
    kv: Cascade | None
    q: Cascade | None
    kv_atomic: Cascade | None
    row_terms: tuple[str, ...]
    keys: tuple[Cascade, ...] = ()  # one keys kernel per pass over the keys, in order
    key_terms: tuple[tuple[str, ...], ...] = ()  # computed by each (with the row terms computed from them)

    @property
    def key_kernels(self) -> dict[str, tuple[Cascade, tuple[str, ...]]]:
        """The keys kernels by kind ("keys1", "keys2"..., in launch order), each with the terms it computes."""
        return {f"keys{i + 1}": made for i, made in enumerate(zip(self.keys, self.key_terms))}


def _given(c: Cascade, names: set[str]) -> Cascade:
    """``c`` with the tensors ``names`` read as inputs instead of computed."""
    tensors = tuple(replace(t, role=Role.INPUT) if t.name in names else t for t in c.tensors)
    tensors = tuple(t for t in tensors if t.role is Role.INPUT) + tuple(t for t in tensors if t.role is not Role.INPUT)
    return replace(c, tensors=tensors, einsums=tuple(e for e in c.einsums if e.out not in names))


def _part(g: Cascade, name: str, outputs: list[str], given: set[str]) -> Cascade | None:
    if not outputs:
        return None
    return prune(replace(_given(g, given), name=f"{g.name}_{name}", outputs=tuple(outputs)))


def one_rank_reductions(c: Cascade, order: tuple[str, ...]) -> Cascade:
    """Every reduction over several ranks as a chain of reductions over one rank each, the ranks in
    ``order`` last and in that order (Σ_{m,n} x = Σ_n Σ_m x); sums only."""
    einsums, tensors = [], list(c.tensors)
    taken: set[str] = set()
    for e in c.einsums:
        if e.reduce is None or len(e.reduce.ranks) == 1:
            einsums.append(e)
            continue
        if e.reduce.op != "sum":
            raise LoweringError(f"{c.where(e)}: a {e.reduce.op} over several ranks has no one-rank form here")
        ranks = sorted(e.reduce.ranks, key=lambda r: order.index(r) if r in order else -1)
        its, body, where = set(e.iteration_ranks), e.expr, e.where
        for r in ranks[:-1]:
            its.discard(r)
            name = fresh_name(c, f"{e.out}__{r}", taken)
            taken.add(name)
            decl = TensorDecl(name, rank_order(its))
            tensors.append(decl)
            einsums.append(Einsum(name, decl.ranks, body, Reduction("sum", (r,)), where, line=e.line))
            body, where = plain_read(decl), None
        einsums.append(Einsum(e.out, e.ranks, body, Reduction("sum", (ranks[-1],)), where, line=e.line))
    out = replace(c, tensors=tuple(tensors), einsums=tuple(einsums))
    validate(out, contract=False)
    return out


def parts_of(g: Gradient) -> Parts:
    """The kernels' cascades of a gradient (see the module docstring)."""
    c = row_reciprocals(normalised_exponentials(g.cascade))
    by = {k: [p.name for p in g.partials if p.kernel == k] for k in ("rows", "q", "kv")}
    pair_reads = {r.tensor for e in c.einsums if STREAM in e.iteration_ranks for r in e.reads()}
    # row maps are recomputed where they are read; row reductions the pair kernels need are precomputed
    # sums over n of a row that they read are key terms: a pass over the keys before theirs
    todo, seen, keyed = list(pair_reads), set(), set()
    while todo:
        t = todo.pop()
        e = c.producer(t)
        if t in seen or e is None:
            continue
        if STREAM in e.iteration_ranks:
            if e.reduce is not None and STREAM in e.reduce.ranks and STREAM not in e.ranks:
                keyed.add(t)
            continue
        seen.add(t)
        if e.reduce is None:
            todo += [r.tensor for r in e.reads()]
    terms = [e.out for e in c.einsums if e.out in seen and (e.reduce is not None or precomputed_row_map(e))]
    # a key term's pass: one after the last pass of the terms it is computed from; a row term computed from key
    # terms is made in the last of their passes, after its loop
    level: dict[str, int] = {}
    for e in c.einsums:
        if e.out in keyed or e.out in terms:
            before = [level[k] + (e.out in keyed) for k in level if c.depends_on(e.out, {k})]
            if e.out in keyed or before:
                level[e.out] = max(before, default=0)
    for name in by["rows"]:
        if c.depends_on(name, keyed):
            raise LoweringError(
                f"{c.name}: {name}, a gradient read per row, needs a pass over the keys first (its adjoint reads "
                f"{', '.join(sorted(k for k in keyed if c.depends_on(name, {k})))}); not lowered yet"
            )
    row_terms = tuple(t for t in terms if t not in level)
    key_terms = tuple(tuple(t for t in level if level[t] == i) for i in range(1 + max(level.values(), default=-1)))
    rows = _part(c, "rows", list(row_terms) + by["rows"], set())
    given = set(row_terms)
    keys: list[Cascade] = []
    for mine in key_terms:  # each level has a term (a key term, or a row term made after one)
        part = prune(replace(_given(c, given), name=f"{c.name}_keys{len(keys) + 1}", outputs=mine))
        keys.append(one_rank_reductions(fold_scalar_chains(inline_row_products(part)), ("n", "m")))
        given |= set(mine)
    kv, q = _part(c, "kv", by["kv"], given), _part(c, "q", by["q"], given)
    both = _part(c, "kv", by["kv"] + by["q"], given) if by["q"] else kv

    def streamed(part, order, hoist=True):
        part = part and fold_scalar_chains(inline_row_products(part))
        # not for the atomic schedule's kernel: its query-side sums are added per tile, with no after
        return part and one_rank_reductions(scalars_after_sums(part) if hoist else part, order)

    return Parts(
        rows and one_rank_reductions(rows, ("m",)),
        streamed(kv, ("m", "n")),
        streamed(q, ("n", "m")),
        streamed(both, ("m", "n"), hoist=False),
        row_terms,
        tuple(keys),
        key_terms,
    )


@dataclass(frozen=True)
class Looped:
    """A kernel's cascade with the Einsums that iterate ``rank`` in one loop over its tiles: reductions
    over ``rank`` are running sums (states ``S = S@prev +∪ S_chunk``)."""

    cascade: Cascade
    rank: str
    prologue: tuple[Einsum, ...]
    loop: tuple[Einsum, ...]
    epilogue: tuple[Einsum, ...]
    sums: tuple[str, ...]


def loop_over(c: Cascade, rank: str) -> Looped:
    """Put the Einsums of ``c`` that iterate ``rank`` into one loop over tiles of it."""
    iterating = {e.out for e in c.einsums if rank in e.iteration_ranks}
    pro, loop, epi = [], [], []
    sums: list[str] = []
    after: set[str] = set()
    tensors = list(c.tensors)
    taken: set[str] = set()
    for e in c.einsums:
        reads = {r.tensor for r in e.reads()}
        if e.out in iterating:
            late = reads & (set(sums) | after)
            if late:
                raise LoweringError(
                    f"{c.where(e)}: reads {sorted(late)[0]}, a sum over all of {rank}; the "
                    f"gradient would need another pass over {rank}"
                )
            if e.reduce is not None and rank in e.reduce.ranks:
                chunk = fresh_name(c, f"{e.out}_chunk", taken)
                taken.add(chunk)
                decl = c.tensor(e.out)
                tensors = [replace(t, role=Role.STATE, init=0.0) if t.name == e.out else t for t in tensors]
                tensors.append(TensorDecl(chunk, decl.ranks))
                loop.append(replace(e, out=chunk, loop=True))
                update = call(
                    "add", plain_read(decl, prev=True), plain_read(TensorDecl(chunk, decl.ranks)), merge=Merge.ANY
                )
                loop.append(Einsum(e.out, e.ranks, update, loop=True, line=e.line))
                sums.append(e.out)
            else:
                loop.append(replace(e, loop=True))
        elif reads & (iterating | after):
            epi.append(e)
            after.add(e.out)
        else:
            pro.append(e)
    out = replace(c, tensors=tuple(tensors), einsums=tuple(pro + loop + epi))
    validate(out, contract=False)
    return Looped(out, rank, tuple(pro), tuple(loop), tuple(epi), tuple(sums))


@dataclass(frozen=True)
class Cut:
    """The part of a gradient one backward call computes (the gradients of some inputs), cut into kernels."""

    gradient: Gradient
    parts: Parts
    loops: dict


def restrict(g: Gradient, inputs: frozenset[str]) -> Gradient:
    """``g`` computing the gradients of ``inputs`` only (inputs that require none are left out)."""
    partials = tuple(p for p in g.partials if p.input in inputs)
    return replace(g, cascade=prune(replace(g.cascade, outputs=tuple(p.name for p in partials))), partials=partials)


def cut(g: Gradient) -> Cut:
    """``g`` cut into the kernels' cascades, each put into its loop."""
    parts = parts_of(g)
    loops = {
        k: (v and loop_over(v, r))
        for k, v, r in (
            *((kind, part, STREAM) for kind, (part, _) in parts.key_kernels.items()),
            ("kv", parts.kv, "m"),
            ("q", parts.q, STREAM),
            ("kv_atomic", parts.kv_atomic, "m"),
        )
    }
    return Cut(g, parts, loops)
