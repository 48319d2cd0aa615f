"""Two stages for a cascade whose pass over the keys does not depend on the query rows (linear attention's form).

When no Einsum of the loop over the keys iterates ``m``, what the loop computes is a summary of the keys that
every query row reads alike: linear attention's ``ctx[e,f] = Σ_n softmax_n(k)[n,e]·v[n,f]``, agent attention's
``va[f,a]``. One kernel of query tiles would recompute it whole in every program. Cut in two, the **key stage**
streams the keys once per (batch, head) and stores the summaries, and the **query stage** reads them as inputs
beside q, with no loop over the keys at all: O(N·E·F + M·E·F) work instead of O(M·N·(E + F)).

The key stage holds the loop, the Einsums it needs before it (none of them per query row) and the Einsums after
it that read only summaries; its outputs are the summaries the query stage reads. The query stage holds every
other Einsum; each summary becomes an input of the same name and ranks (``ctx[b, h, e, f]``). Running the key
stage and then the query stage on its summaries gives the cascade's output (tests/rewrites check it through the
reference executor).

>>> import einflash as ef
>>> @ef.attention
... def linear(q, k, v):
...     return ef.einsum("m e, n e -> m n", ef.softmax(q, "e"), ef.softmax(k, "n")) @ v
>>> s = key_stages(linear.forward.rewritten)
>>> s.summaries
('ctx',)
>>> [e.out for e in s.queries.einsums]
['max_e', 'exp', 'sum_e', 'o']
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ...ir.cascade import Cascade, Einsum, Layout, Role
from ...ir.ranks import STREAM


@dataclass(frozen=True)
class Stages:
    """The key stage (its outputs: the summaries, in order), the query stage (the summaries among its inputs)."""

    keys: Cascade
    queries: Cascade
    summaries: tuple[str, ...]


def key_stages(c: Cascade) -> Stages | None:
    """The two stages of ``c`` (a rewritten, streamed cascade), or None where its first loop iterates the query
    rows (one kernel of query tiles runs it whole) or something outside the loops iterates the keys.

    The key stage takes the leading loops that no query row is part of; the query stage keeps the loops after
    them, renumbered from 1 (MoBA's routed pass after its key-block sums), or none (linear attention)."""
    loops = sorted({int(e.loop) for e in c.einsums if e.loop})
    per_row = {int(e.loop) for e in c.einsums if e.loop and "m" in e.iteration_ranks}
    leading = [k for i, k in enumerate(loops) if not per_row & set(loops[: i + 1])]
    if not leading:
        return None
    key_side: list[Einsum] = []
    for e in c.einsums:
        made = {x.out for x in key_side}
        reads = {r.tensor for r in e.reads()}
        if e.loop in leading or (not e.loop and "m" not in e.iteration_ranks and reads & made):
            key_side.append(e)
    keys_made = {e.out for e in key_side}
    queries = [replace(e, loop=e.loop - len(leading) if e.loop else 0) for e in c.einsums if e.out not in keys_made]
    if any(STREAM in e.iteration_ranks for e in queries if not e.loop):
        return None
    summaries = tuple(
        dict.fromkeys(r.tensor for e in queries for r in e.reads() if r.tensor in keys_made and not r.prev)
    )
    if not summaries or any("m" in c.tensor(s).ranks for s in summaries):
        return None
    needed = _ancestors(c, key_side)
    key_einsums = tuple(e for e in c.einsums if e.out in keys_made or e.out in needed)
    key_tensors = {t.name for t in c.inputs} | {e.out for e in key_einsums}
    keys = replace(
        c,
        tensors=tuple(
            replace(t, role=Role.OUTPUT) if t.name in summaries and t.role is not Role.STATE else t
            for t in c.tensors
            if t.name in key_tensors
        ),
        einsums=key_einsums,
        outputs=summaries,
    )
    query_made = {e.out for e in queries}
    queries_c = replace(
        c,
        tensors=tuple(
            replace(t, role=Role.INPUT, layout=Layout.DECLARED, init=None) if t.name in summaries else t
            for t in c.tensors
            if t.role is Role.INPUT or t.name in query_made or t.name in summaries
        ),
        einsums=tuple(queries),
    )
    return Stages(keys, queries_c, summaries)


def _ancestors(c: Cascade, einsums: list[Einsum]) -> set[str]:
    """The tensors made before the loop that ``einsums`` read, directly or not."""
    found: set[str] = set()
    todo = [r.tensor for e in einsums for r in e.reads()]
    while todo:
        name = todo.pop()
        made = c.producer(name)
        if made is None or made.loop or name in found:
            continue
        found.add(name)
        todo += [r.tensor for r in made.reads()]
    return found
