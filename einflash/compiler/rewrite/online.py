"""Online streaming: passes over n fused into loops over chunks of n with running states.

The first loop takes as many leading passes as can share one; what still iterates n after it (a threshold on
the normalised weights, which needs the row's sum first) becomes a second loop the same way, and so on: each
loop is one pass of the kernel over the keys.

Each reduction over n becomes a running state, updated chunk by chunk; a sum whose summand reads a
running state (the exponentials read the running maximum) is rescaled by a correction factor when
that state changes (online softmax), for any normaliser whose correction factor exists
(``einflash.ir.algebra.correction``). :func:`streaming_obstacle` says why a cascade cannot be fused
further when it cannot.

>>> import einflash as ef
>>> from einflash.compiler.analysis.key_passes import count_passes
>>> from einflash.compiler.rewrite.defer import defer_normalisation
>>> @ef.attention
... def plain(q, k, v):
...     return ef.softmax(q @ k * ef.scale, "n") @ v
>>> count_passes(stream_online(defer_normalisation(plain.cascade))).passes
1
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ...ir.algebra import correction
from ...ir.cascade import Cascade, Einsum, Role, TensorDecl, plain_read, reduces
from ...ir.expr import Const, Expr, Merge, Read, call, free_ranks, reads, transform
from ...ir.operators import REDUCERS
from ...ir.ranks import STREAM, coord, rank_order
from ..analysis.key_passes import count_passes, late_tensors
from .names import drop_unused, fresh_name, ordered_tensors

# -- online streaming ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Running:
    """How a reduction over n runs as a state: the operator that folds a chunk's value into it, its value
    before the first chunk."""

    combine: str
    identity: float


@dataclass(frozen=True)
class _Plan:
    k: int  # passes 1..k (of the Einsums no earlier loop holds) become the loop
    states: dict[str, _Running]  # reductions over n that become running states, by the tensor each writes
    corrections: dict[str, Expr]  # state -> correction expression (Const(1) when none)


def inline_body(c: Cascade, e: Einsum, stop: set[str], inline: set[str]) -> Expr:
    """``e``'s body with the Einsums named in ``inline`` substituted, stopping at ``stop``. Only what is computed
    from ``stop`` is substituted: a value that does not depend on it stays a read (its expression may be as deep as
    the declaration's, and what is asked of the body is how it depends on ``stop``). A value masked by a test that
    depends on ``stop`` stays a read too: the substituted expression would drop the mask."""

    def sub(x):
        if (
            isinstance(x, Read)
            and not x.prev
            and x.tensor in inline
            and x.tensor not in stop
            and c.depends_on(x.tensor, stop)
            and (p := c.producer(x.tensor)) is not None
            and p.reduce is None
            and (p.where is None or not any(c.depends_on(r.tensor, stop) for r in reads(p.where)))
            and tuple(x.index) == tuple(coord(r) for r in p.ranks)
        ):
            return inline_body(c, p, stop, inline)
        return None

    return transform(e.expr, sub)


def _plan(c: Cascade, k: int) -> tuple[_Plan | None, str | None]:
    """Whether passes 1..k can share one loop; the plan, or the reason they cannot."""
    pa = count_passes(c)
    fused = {e.out for e in c.einsums if not e.loop and 0 < pa.pass_of(e.out) <= k}
    reductions = [e for e in c.einsums if e.out in fused and reduces(e) and STREAM in e.reduce.ranks]
    states = {e.out for e in reductions}
    late = late_tensors(c)
    maps = {e.out for e in c.einsums if e.reduce is None}
    for e in c.einsums:  # a loop holds only the current chunk of a streamed value: no halo reads
        for r in e.reads() if e.out in fused else ():
            at = _stream_index(c, r)
            if r.tensor in fused and at is not None and at != coord(STREAM):
                return None, (
                    f"{e.out}" + (f" (line {e.line})" if e.line else "") + f" reads {r.tensor} at "
                    f"n = {at}, outside the current chunk of n, so it cannot run chunk by chunk"
                )
    dependent = set(states)  # values that change as the running states change (in the loop or maps of states)
    for e in c.einsums:
        if e.out not in states and any(r.tensor in dependent for r in e.reads()):
            if e.reduce is not None and e.out in fused:
                return None, (
                    f"{e.out}" + (f" (line {e.line})" if e.line else "") + f" reduces over "
                    f"{', '.join(e.reduce.ranks)} a value that depends on a running state; no "
                    f"correction factor can be taken out of that reduction"
                )
            if e.reduce is None:
                dependent.add(e.out)
    for e in c.einsums:  # a value the loop reads must be an input, streamed, or a map of running states
        if e.out in fused:
            for r in e.reads():
                if r.tensor in late and not _follows_states(c, r.tensor, states):
                    where = f"{e.out}" + (f" (line {e.line})" if e.line else "")
                    return None, (
                        f"{where} reads {r.tensor}, which needs a full reduction over n and reaches it "
                        f"through a computation that has no running form, so it waits for that pass"
                    )
    running: dict[str, _Running] = {}
    corrections: dict[str, Expr] = {}
    for e in reductions:
        where = f"{e.out}" + (f" (line {e.line})" if e.line else "")
        combine = REDUCERS[e.reduce.op].combine
        if combine is None:
            return None, f"{where} is a {e.reduce.op} over n, which has no running form"
        running[e.out] = _Running(combine, REDUCERS[e.reduce.op].identity)
        if set(e.reduce.ranks) != {STREAM}:
            return None, f"{where} reduces over n together with other ranks"
        body = inline_body(c, e, states, maps & (fused | late))
        used = {r.tensor for r in reads(body) if r.tensor in states}
        masked = sorted({r.tensor for r in reads(body) if r.tensor in dependent and r.tensor not in states})
        if masked:  # inline_body keeps a value whose mask tests a running state: no factor corrects a mask
            return None, (
                f"{where} reduces {', '.join(masked)}, masked by a test of a running state's value; a mask that "
                f"moves as the state changes has no correction factor, so the reduction waits for that pass"
            )
        for r in reads(body):
            if r.tensor in late and r.tensor not in states:
                return None, (
                    f"{where} needs {r.tensor}, which depends on a full reduction over n through "
                    f"a computation that has no running form"
                )
        if not used:
            corrections[e.out] = Const(1.0)
            continue
        if e.reduce.op != "sum":
            return None, f"{where} is a {e.reduce.op} of values that depend on running states"
        factor = correction(body, used, set(e.reduce.ranks))
        if factor is None:
            named = ", ".join(sorted(used))
            return None, (
                f"{where} sums a function of {named} for which no correction factor exists: "
                f"its value under the final {named} is not a multiple of its value under a "
                f"running {named}, so it must wait until {named} is complete"
            )
        corrections[e.out] = factor
    return _Plan(k, running, corrections), None


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
    """Fuse as many leading passes as possible into one loop with running states; then the passes left after
    it into a second loop, and so on, while the Einsums left have a running form."""
    while (plan := _next_loop(c)) is not None:
        c = _build_loop(c, plan, count_passes(c))
    # a later loop recomputes what it reads of an earlier pass's (MoBA's scores, again after the routing): an
    # earlier loop's copy that nothing of its own reads is dropped
    return drop_unused(c)


def _next_loop(c: Cascade) -> _Plan | None:
    """The plan of the next loop: the most passes of the Einsums no loop holds yet that can share one."""
    pa = count_passes(c)
    for k in range(pa.passes, 0, -1):
        plan, _ = _plan(c, k)
        if plan is not None and plan.states:  # a loop that carries nothing would only be recomputed after it
            return plan
    return None


def _build_loop(c: Cascade, plan: _Plan, pa) -> Cascade:
    k = plan.k
    level = 1 + max((e.loop for e in c.einsums), default=0)
    in_loop = {e.out for e in c.einsums if not e.loop and 0 < pa.pass_of(e.out) <= k}
    states = set(plan.states)
    # non-streaming Einsums computed from running states (through any chain of them: max(top, sink)·scale) that
    # feed the loop are recomputed per chunk, from the consumers in the loop back to the states
    pulled = True
    while pulled:
        pulled = False
        for e in reversed(c.einsums):
            if (
                e.out not in in_loop
                and e.reduce is None
                and pa.pass_of(e.out) == 0
                and c.depends_on(e.out, states)
                and any(e.out in {r.tensor for r in x.reads()} for x in c.einsums if x.out in in_loop)
            ):
                in_loop.add(e.out)
                pulled = True
    names = {t.name for t in c.tensors}
    tensors = list(c.tensors)
    loop: list[Einsum] = []
    before: list[Einsum] = []
    after: list[Einsum] = []
    alphas: dict[Expr, str] = {}
    decl = {t.name: t for t in c.tensors}
    # values the loop reads are computed before it, wherever they were written (a sub-expression the mask
    # shares, declared after the first Einsum that iterates n)
    feeds_loop = {r.tensor for e in c.einsums if e.out in in_loop for r in e.reads() if r.tensor not in in_loop}
    for e in reversed(c.einsums):
        if e.out in feeds_loop:
            feeds_loop |= {r.tensor for r in e.reads()}
    for e in c.einsums:
        if e.out not in in_loop:
            later = e.out not in feeds_loop and (loop or any(c.depends_on(r.tensor, in_loop) for r in e.reads()))
            (after if later else before).append(e)
            continue
        if e.out not in states:
            loop.append(replace(e, loop=level))
            continue
        state = plan.states[e.out]
        local = fresh_name(c, f"{e.out}_chunk", names)
        names.add(local)
        tensors.append(TensorDecl(local, e.ranks))
        loop.append(replace(e, out=local, loop=level))
        prev, cur = plain_read(decl[e.out], prev=True), plain_read(decl[e.out])
        chunk = Read(local, cur.index)
        r = plan.corrections[e.out]
        if r == Const(1.0):
            upd = call(state.combine, prev, chunk, merge=Merge.ANY)
        else:
            if r not in alphas:
                alpha = fresh_name(c, "alpha", names)
                names.add(alpha)
                ar = rank_order(free_ranks(r))
                tensors.append(TensorDecl(alpha, ar))
                alphas[r] = alpha
                loop.append(Einsum(alpha, ar, r, loop=level, line=e.line))
            ar = rank_order(free_ranks(r))
            upd = call("add", call("mul", prev, Read(alphas[r], tuple(coord(x) for x in ar))), chunk, merge=Merge.ANY)
        loop.append(Einsum(e.out, e.ranks, upd, loop=level, line=e.line))
        tensors = [replace(t, role=Role.STATE, init=state.identity) if t.name == e.out else t for t in tensors]
    after = _recompute_after(c, after, in_loop, states, names, tensors)
    einsums = before + loop + after
    return replace(c, tensors=tuple(ordered_tensors(tensors, einsums)), einsums=tuple(einsums))


def _recompute_after(
    c: Cascade, after: list[Einsum], in_loop: set[str], states: set[str], names: set[str], tensors: list[TensorDecl]
) -> list[Einsum]:
    """Einsums after the loop that read chunk-local values get their own copies of them."""
    chunk_local = in_loop - states
    producer = {e.out: e for e in c.einsums}  # by tensor, the last Einsum that writes it (as Cascade.producer)
    needed: list[str] = []

    def need(name: str) -> None:
        if name in needed:
            return
        for r in producer[name].reads():
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
        return replace(
            e, out=out or e.out, expr=transform(e.expr, fix), where=None if e.where is None else transform(e.where, fix)
        )

    copies = [redo(producer[n], renames[n]) for n in order]
    return copies + [redo(e) for e in after]
