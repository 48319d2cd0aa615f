"""Rewrites of a cascade into cheaper forms; each is a pure function Cascade → Cascade.

- :func:`defer_normalisation`: pull factors that wait for a full reduction over n
  out of a sum over n (``Σ_n num/den·v = (Σ_n num·v)/den``): FuseMax's deferral.
- :func:`reassociate`: re-order a chain of contractions so that no intermediate
  spans both sequence ranks (linear attention: ``(q·kᵀ)·v = q·(kᵀ·v)``).
- :func:`stream_online`: turn the first passes into one loop over chunks of n with
  running states and correction factors (online softmax, and any normaliser whose
  correction factor exists); :func:`streaming_obstacle` says why it cannot go further.

Every rewrite is checked by running both sides through the reference executor
(tests/rewrites).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

from ..ir.cascade import Cascade, Einsum, Reduction, Role, TensorDecl, plain_read
from ..ir.expr import Call, Const, Expr, Merge, Read, call, free_ranks, transform
from ..ir.operators import REDUCERS
from ..ir.ranks import STREAM, coord, rank_order
from .algebra import correction, factors, product
from .passes import count_passes

# -- deferral ---------------------------------------------------------------------------------


def _late_tensors(c: Cascade, rank: str = STREAM) -> set[str]:
    """Tensors that exist only once a full traversal of ``rank`` is complete: reductions over it,
    and values computed without iterating it from such tensors or from elements of computed
    values along it (``x[m] = s[m, 0]``)."""
    late: set[str] = set()
    for e in c.einsums:
        if e.loop:
            continue
        reduces = e.reduce is not None and rank in e.reduce.ranks
        if reduces or (rank not in e.iteration_ranks and any(
                r.tensor in late or (rank in c.tensor(r.tensor).ranks and c.tensor(r.tensor).role is not Role.INPUT)
                for r in e.reads())):
            late.add(e.out)
    return late


def defer_normalisation(c: Cascade) -> Cascade:
    """Move late factors out of sums over n; a sum ``o`` becomes ``o_acc`` then ``o = o_acc·factors``.

    A factor moves when it has none of the reduced ranks and reads a value that
    needs a full reduction over n; multiplication distributes over the sum, so
    both sides are equal (an empty fiber is absent on both sides).
    """
    late = _late_tensors(c)
    out: list[Einsum] = []
    tensors = list(c.tensors)
    for e in c.einsums:
        red = e.reduce
        if e.loop or red is None or red.op != "sum" or STREAM not in red.ranks or e.where is not None:
            out.append(e)
            continue
        fs = factors(e.expr)
        moved = [(f, k) for f, k in fs
                 if not (free_ranks(f) & set(red.ranks)) and any(r.tensor in late for r in _reads(f))]
        if not moved:
            out.append(e)
            continue
        kept = [(f, k) for f, k in fs if (f, k) not in moved]
        body = product(kept)
        acc_ranks = rank_order(free_ranks(body) - set(red.ranks))
        acc = fresh_name(c, f"{e.out}_acc")
        tensors.append(TensorDecl(acc, acc_ranks))
        out.append(Einsum(acc, acc_ranks, body, red, line=e.line))
        acc_read = Read(acc, tuple(coord(r) for r in acc_ranks))
        out.append(Einsum(e.out, e.ranks, product([(acc_read, 1)] + moved), line=e.line))
    return replace(c, tensors=tuple(ordered_tensors(tensors, out)), einsums=tuple(out))


def _reads(x: Expr):
    from ..ir.expr import reads

    return reads(x)


def fresh_name(c: Cascade, base: str, taken: set[str] = frozenset()) -> str:
    """``base``, or ``base2``, ``base3``... : a tensor name neither the cascade nor ``taken`` uses."""
    name, i = base, 2
    while c.has_tensor(name) or name in taken:
        name, i = f"{base}{i}", i + 1
    return name


def ordered_tensors(tensors: list[TensorDecl], einsums: list[Einsum]) -> list[TensorDecl]:
    """Inputs first, then tensors in the order Einsums first assign them; drop unused ones."""
    by = {t.name: t for t in tensors}
    out = [t for t in tensors if t.role is Role.INPUT]
    seen = {t.name for t in out}
    for e in einsums:
        if e.out not in seen:
            out.append(by[e.out])
            seen.add(e.out)
    return out


# -- reassociation ------------------------------------------------------------------------------

# Extents at which contraction orders are compared: long sequences, usual head dims.
_REFERENCE_EXTENT = {"m": 4096, "n": 4096, "e": 128, "f": 128, "b": 1, "h": 1}
_OTHER_EXTENT = 64


def _size(ranks) -> int:
    out = 1
    for r in ranks:
        out *= _REFERENCE_EXTENT.get(r, _OTHER_EXTENT)
    return out


def reassociate(c: Cascade) -> Cascade:
    """Reorder ``Z = Σ (Σ P·Q)·B`` when another order needs a smaller intermediate.

    Applies to a sum-of-products Einsum that reads, once and at its own
    coordinates, an intermediate that is itself a plain sum of products used
    nowhere else. The three factors are contracted in the order whose
    intermediate is smallest at long sequence lengths (ties: fewer FLOPs).
    """
    einsums = list(c.einsums)
    tensors = list(c.tensors)
    for i, e in enumerate(einsums):
        if not _plain_sum(e):
            continue
        fs = [(x, 1) for x in _operands(e.expr)]
        for f, k in fs:
            inner = _inner_contraction(c, einsums, f, k, e)
            if inner is None:
                continue
            j, a = inner
            if set(a.reduce.ranks) & e.iteration_ranks:
                continue  # the two reductions share a rank name; leave it alone
            parts = [g for g in fs if g != (f, k)] + [(x, 1) for x in _operands(a.expr)]
            if len(parts) != 3:
                continue
            best = _best_order(parts, set(e.ranks))
            if best is None:
                continue
            (fa, fb), rest = best
            pair_ranks = free_ranks(fa[0]) | free_ranks(fb[0])
            mid_ranks = rank_order(pair_ranks & (free_ranks(rest[0]) | set(e.ranks)))
            mid_reduced = rank_order(pair_ranks - set(mid_ranks))
            mid = fresh_name(c, "ctx", {t.name for t in tensors})
            mid_einsum = Einsum(mid, mid_ranks, product([fa, fb]), Reduction("sum", mid_reduced), line=a.line)
            mid_read = Read(mid, tuple(coord(r) for r in mid_ranks))
            outer = product([rest, (mid_read, 1)])
            outer_reduced = rank_order((free_ranks(outer)) - set(e.ranks))
            new_e = Einsum(e.out, e.ranks, outer, Reduction("sum", outer_reduced) if outer_reduced else None,
                           line=e.line)
            einsums = einsums[:j] + einsums[j + 1:i] + [mid_einsum, new_e] + einsums[i + 1:]
            tensors = [t for t in tensors if t.name != a.out] + [TensorDecl(mid, mid_ranks)]
            return reassociate(replace(c, tensors=tuple(ordered_tensors(tensors, einsums)), einsums=tuple(einsums)))
    return c


def _operands(x: Expr) -> list[Expr]:
    """The operands of a product as written (a quotient stays one operand)."""
    if isinstance(x, Call) and x.op == "mul" and x.merge is Merge.ALL:
        return _operands(x.args[0]) + _operands(x.args[1])
    return [x]


def _plain_sum(e: Einsum) -> bool:
    return (not e.loop and e.reduce is not None and e.reduce.op == "sum" and e.where is None
            and all(not (isinstance(x, Call) and x.merge is Merge.ANY) for x in _walk(e.expr)))


def _walk(x):
    from ..ir.expr import walk

    return walk(x)


def _inner_contraction(c: Cascade, einsums, f, k, consumer) -> tuple[int, Einsum] | None:
    if k != 1 or not isinstance(f, Read) or f.prev:
        return None
    j = next((j for j, x in enumerate(einsums) if x.out == f.tensor), None)
    if j is None or not _plain_sum(einsums[j]) or tuple(f.index) != tuple(coord(r) for r in einsums[j].ranks):
        return None
    users = [x for x in einsums if any(r.tensor == f.tensor for r in x.reads())]
    if users != [consumer] or f.tensor in c.outputs:
        return None
    return j, einsums[j]


def _best_order(parts, out_ranks: set[str]):
    """The pair to contract first (and the remaining factor), if it beats the written order."""
    def cost(pair, rest):
        a, b = free_ranks(pair[0][0]), free_ranks(pair[1][0])
        keep = (a | b) & (free_ranks(rest[0]) | out_ranks)
        return (_size(keep), _size(a | b) + _size(keep | free_ranks(rest[0])))

    options = []
    for pair in itertools.combinations(range(3), 2):
        rest = parts[({0, 1, 2} - set(pair)).pop()]
        options.append((cost((parts[pair[0]], parts[pair[1]]), rest), pair, rest))
    written = next(o for o in options if o[1] == (1, 2))  # the inner contraction's two factors
    best = min(options, key=lambda o: o[0])
    if best[0] >= written[0]:
        return None
    return (parts[best[1][0]], parts[best[1][1]]), best[2]


# -- online streaming ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    k: int  # passes 1..k become the loop
    states: tuple[str, ...]  # reductions over n that become running states
    corrections: dict  # state -> correction expression (Const(1) when none)


def _inline_body(c: Cascade, e: Einsum, stop: set[str], inline: set[str]) -> Expr:
    """``e``'s body with the Einsums named in ``inline`` substituted, stopping at ``stop``."""
    def sub(x):
        if isinstance(x, Read) and not x.prev and x.tensor in inline and x.tensor not in stop:
            p = c.producer(x.tensor)
            if p.reduce is None and tuple(x.index) == tuple(coord(r) for r in p.ranks):
                return _inline_body(c, p, stop, inline)
        return None

    return transform(e.expr, sub)


def _plan(c: Cascade, k: int) -> tuple[_Plan | None, str | None]:
    """Whether passes 1..k can share one loop; the plan, or the reason they cannot."""
    pa = count_passes(c)
    stream = {e.out for e in c.einsums if 0 < pa.pass_of(e.out) <= k}
    reductions = [e for e in c.einsums if e.out in stream and e.reduce is not None and STREAM in e.reduce.ranks]
    states = {e.out for e in reductions}
    late = _late_tensors(c)
    maps = {e.out for e in c.einsums if e.reduce is None}
    for e in c.einsums:  # a loop holds only the current chunk of a streamed value: no halo reads
        for r in e.reads() if e.out in stream else ():
            at = _stream_index(c, r)
            if r.tensor in stream and at is not None and at != coord(STREAM):
                return None, (f"{e.out}" + (f" (line {e.line})" if e.line else "") + f" reads {r.tensor} at "
                              f"n = {at}, outside the current chunk of n, so it cannot run chunk by chunk")
    dependent = set(states)  # in-loop values that change as the running states change
    for e in c.einsums:
        if e.out in stream and e.out not in states and any(r.tensor in dependent for r in e.reads()):
            if e.reduce is not None:
                return None, (f"{e.out}" + (f" (line {e.line})" if e.line else "") + f" reduces over "
                              f"{', '.join(e.reduce.ranks)} a value that depends on a running state; no "
                              f"correction factor can be taken out of that reduction")
            dependent.add(e.out)
    for e in c.einsums:  # a value the loop reads must be an input, streamed, or a map of running states
        if e.out in stream:
            for r in e.reads():
                if r.tensor in late and not _follows_states(c, r.tensor, states):
                    where = f"{e.out}" + (f" (line {e.line})" if e.line else "")
                    return None, (f"{where} reads {r.tensor}, which needs a full reduction over n and reaches it "
                                  f"through a computation that has no running form, so it waits for that pass")
    corrections = {}
    for e in reductions:
        where = f"{e.out}" + (f" (line {e.line})" if e.line else "")
        if REDUCERS[e.reduce.op].combine is None:
            return None, f"{where} is a {e.reduce.op} over n, which has no running form"
        if set(e.reduce.ranks) != {STREAM}:
            return None, f"{where} reduces over n together with other ranks"
        body = _inline_body(c, e, states, maps & (stream | late))
        used = {r.tensor for r in _reads(body) if r.tensor in states}
        for r in _reads(body):
            if r.tensor in late and r.tensor not in states:
                return None, (f"{where} needs {r.tensor}, which depends on a full reduction over n through "
                              f"a computation that has no running form")
        if not used:
            corrections[e.out] = Const(1.0)
            continue
        if e.reduce.op != "sum":
            return None, f"{where} is a {e.reduce.op} of values that depend on running states"
        r = correction(body, used, set(e.reduce.ranks))
        if r is None:
            named = ", ".join(sorted(used))
            return None, (f"{where} sums a function of {named} for which no correction factor exists: "
                          f"its value under the final {named} is not a multiple of its value under a "
                          f"running {named}, so it must wait until {named} is complete")
        corrections[e.out] = r
    return _Plan(k, tuple(x.out for x in reductions), corrections), None


def _stream_index(c: Cascade, r: Read):
    """The coordinate at which ``r`` reads its tensor's streamed rank, or None if it has none."""
    ranks = c.tensor(r.tensor).ranks
    return r.index[ranks.index(STREAM)] if STREAM in ranks else None


def _follows_states(c: Cascade, name: str, states: set[str]) -> bool:
    """Whether ``name`` is a running state or an elementwise function of running states (and inputs)."""
    if name in states or c.tensor(name).role is Role.INPUT:
        return True
    made = c.producer(name)
    if made is None or made.reduce is not None:
        return False
    return all(_follows_states(c, r.tensor, states) for r in made.reads())


def streaming_obstacle(c: Cascade) -> str | None:
    """Why the passes of ``c`` (a cascade not yet streamed) cannot all share one loop, or None."""
    for k in range(2, count_passes(c).passes + 1):
        why = _plan(c, k)[1]
        if why is not None:
            return why
    return None


def stream_online(c: Cascade) -> Cascade:
    """Fuse as many leading passes as possible into one loop with running states."""
    if any(e.loop for e in c.einsums):
        return c
    pa = count_passes(c)
    if pa.passes == 0:
        return c
    best = None
    for k in range(pa.passes, 0, -1):
        plan, _ = _plan(c, k)
        if plan is not None and plan.states:  # a loop that carries nothing would only be recomputed after it
            best = plan
            break
    if best is None:
        return c
    return _build_loop(c, best, pa)


def _build_loop(c: Cascade, plan: _Plan, pa) -> Cascade:
    k = plan.k
    in_loop = {e.out for e in c.einsums if 0 < pa.pass_of(e.out) <= k}
    states = set(plan.states)
    # non-streaming Einsums that read running states and feed the loop are recomputed per chunk
    for e in c.einsums:
        if e.out not in in_loop and e.reduce is None and pa.pass_of(e.out) == 0 \
                and any(r.tensor in states for r in e.reads()) \
                and any(e.out in {r.tensor for r in x.reads()} for x in c.einsums if x.out in in_loop):
            in_loop.add(e.out)
    names = {t.name for t in c.tensors}
    tensors = list(c.tensors)
    loop: list[Einsum] = []
    before: list[Einsum] = []
    after: list[Einsum] = []
    alphas: dict[Expr, str] = {}
    decl = {t.name: t for t in c.tensors}
    for e in c.einsums:
        if e.out not in in_loop:
            (after if loop or _depends_on(c, e, in_loop) else before).append(e)
            continue
        if e.out not in states:
            loop.append(replace(e, loop=True))
            continue
        local = fresh_name(c, f"{e.out}_chunk", names)
        names.add(local)
        tensors.append(TensorDecl(local, e.ranks))
        loop.append(replace(e, out=local, loop=True))
        prev, cur = plain_read(decl[e.out], prev=True), plain_read(decl[e.out])
        chunk = Read(local, cur.index)
        r = plan.corrections[e.out]
        if r == Const(1.0):
            upd = call(REDUCERS[e.reduce.op].combine, prev, chunk, merge=Merge.ANY)
        else:
            if r not in alphas:
                alpha = fresh_name(c, "alpha", names)
                names.add(alpha)
                ar = rank_order(free_ranks(r))
                tensors.append(TensorDecl(alpha, ar))
                alphas[r] = alpha
                loop.append(Einsum(alpha, ar, r, loop=True, line=e.line))
            ar = rank_order(free_ranks(r))
            upd = call("add", call("mul", prev, Read(alphas[r], tuple(coord(x) for x in ar))), chunk,
                       merge=Merge.ANY)
        loop.append(Einsum(e.out, e.ranks, upd, loop=True, line=e.line))
        ident = REDUCERS[e.reduce.op].identity
        tensors = [replace(t, role=Role.STATE, init=ident) if t.name == e.out else t for t in tensors]
    after = _recompute_after(c, after, in_loop, states, names, tensors)
    einsums = before + loop + after
    return replace(c, tensors=tuple(ordered_tensors(tensors, einsums)), einsums=tuple(einsums))


def _depends_on(c: Cascade, e: Einsum, names: set[str]) -> bool:
    seen, todo = set(), [e]
    while todo:
        x = todo.pop()
        for r in x.reads():
            if r.tensor in names:
                return True
            p = c.producer(r.tensor)
            if p is not None and p.out not in seen:
                seen.add(p.out)
                todo.append(p)
    return False


def _recompute_after(c: Cascade, after: list[Einsum], in_loop: set[str], states: set[str], names: set[str],
                     tensors: list[TensorDecl]) -> list[Einsum]:
    """Einsums after the loop that read chunk-local values get their own copies of them."""
    chunk_local = in_loop - states
    needed: list[str] = []

    def need(name: str) -> None:
        if name in needed:
            return
        p = c.producer(name)
        for r in p.reads():
            if r.tensor in chunk_local:
                need(r.tensor)
        needed.append(name)

    for e in after:
        for r in e.reads():
            if r.tensor in chunk_local:
                need(r.tensor)
    if not needed:
        return after
    order = [e.out for e in c.einsums if e.out in needed]
    renames = {}
    for name in order:
        renames[name] = fresh_name(c, f"{name}_again", names)
        names.add(renames[name])
        tensors.append(replace(c.tensor(name), name=renames[name]))

    def fix(x):
        if isinstance(x, Read) and x.tensor in renames:
            return Read(renames[x.tensor], x.index, x.prev)
        return None

    def redo(e: Einsum, out: str | None = None) -> Einsum:
        return replace(e, out=out or e.out, expr=transform(e.expr, fix),
                       where=None if e.where is None else transform(e.where, fix))

    copies = [redo(c.producer(n), renames[n]) for n in order]
    return copies + [redo(e) for e in after]

