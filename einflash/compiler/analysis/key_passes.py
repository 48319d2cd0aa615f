"""How many passes a cascade makes over the streamed rank, and why (FuseMax's rule).

A pass is one traversal of every element of a fiber of the streamed rank ``n``.
A value that needs a full reduction over ``n`` is complete only after the pass
that reduces it; an Einsum that iterates ``n`` again and reads such a value
cannot start before, so it runs in the next pass. Loop Einsums (the online form)
carry running states from chunk to chunk and never wait: a loop is one pass.

>>> import einflash as ef
>>> @ef.attention
... def naive(q, k, v):
...     s = q @ k
...     top = s.max("n")
...     num = ef.exp(s - top)
...     return num / num.sum("n") @ v
>>> count_passes(naive.cascade).passes
3
"""

from __future__ import annotations

from dataclasses import dataclass

from ...ir.cascade import Cascade, Einsum, Role, loop_blocks
from ...ir.ranks import STREAM


@dataclass(frozen=True)
class PassReason:
    """Why pass ``index`` exists: ``consumer`` iterates n again and reads ``waits_for``.

    ``waits_for`` is complete once ``reduced``, a ``reduction`` over all of n, is: the
    same tensor, or one it is computed from (a running state, a routing score).
    """

    index: int
    consumer: str
    consumer_line: int | None
    waits_for: str
    reduced: str
    reduction: str  # the reducer that completes reduced ("max", "sum", ...)
    reduction_line: int | None

    def __str__(self) -> str:
        at = f" (line {self.consumer_line})" if self.consumer_line else ""
        src = f" (line {self.reduction_line})" if self.reduction_line else ""
        via = f", which needs {self.reduced}" if self.reduced != self.waits_for else ""
        return (
            f"pass {self.index}: {self.consumer}{at} iterates n again and reads {self.waits_for}{via}, "
            f"a {self.reduction} over all of n{src} that is complete only after pass {self.index - 1}"
        )


@dataclass(frozen=True)
class PassAnalysis:
    """Passes over the streamed rank, the pass of each Einsum (0: does not iterate n), and reasons."""

    passes: int
    einsum_pass: tuple[tuple[str, int], ...]
    reasons: tuple[PassReason, ...]
    crossing: tuple[tuple[str, int, int], ...]  # (tensor, produced in pass, read again in pass)

    def pass_of(self, name: str) -> int:
        return dict(self.einsum_pass)[name]


def count_passes(c: Cascade, rank: str = STREAM) -> PassAnalysis:
    """Apply FuseMax's pass rule to ``c`` over ``rank``."""
    # status of each tensor: ("I",) input, ("S", p) streamed in pass p, ("D", p) done after pass p
    status: dict[str, tuple] = {t.name: ("I", 0) for t in c.inputs}
    producer: dict[str, Einsum] = {}
    of: dict[str, int] = {}
    reasons: dict[int, PassReason] = {}
    crossing: dict[str, tuple[str, int, int]] = {}
    for loop, block in loop_blocks(c.einsums):
        if loop:
            loop_pass = max(
                [1] + [_need(c, e, rank, status, producer, reasons, crossing, external_only=block) for e in block]
            )
            for e in block:
                of[e.out] = loop_pass
                producer[e.out] = e
                status[e.out] = ("S", loop_pass)
            for e in block:  # after the loop its states are complete
                if c.tensor(e.out).role is Role.STATE:
                    status[e.out] = ("D", loop_pass)
            continue
        (e,) = block
        need = _need(c, e, rank, status, producer, reasons, crossing)
        iterates = rank in e.iteration_ranks
        of[e.out] = need if iterates else 0
        producer[e.out] = e
        reduces = e.reduce is not None and rank in e.reduce.ranks
        status[e.out] = ("D", need) if (reduces or not iterates) else ("S", need)
    passes = max([*of.values(), 0])
    return PassAnalysis(
        passes, tuple(of.items()), tuple(reasons[k] for k in sorted(reasons)), tuple(sorted(crossing.values()))
    )


def _completing(name: str, rank: str, status, producer) -> tuple[str, str, int | None]:
    """(tensor, reducer, line) of the traversal of ``rank`` that makes ``name`` complete.

    A tensor done after pass p is a reduction over ``rank`` itself, a running state
    (completed by the chunk-local reduction its update folds in), or is computed
    without iterating ``rank`` from one done after pass p, or from elements of a value
    streamed in pass p (then that value's traversal is what it waits for).
    """
    e = producer[name]
    while e.reduce is None or rank not in e.reduce.ranks:
        if e.loop:  # a running state: its update reads the chunk's reduction
            chunk = next(
                producer[r.tensor]
                for r in e.reads()
                if not r.prev
                and producer[r.tensor].loop
                and producer[r.tensor].reduce is not None
                and rank in producer[r.tensor].reduce.ranks
            )
            return name, chunk.reduce.op, e.line
        p = status[name][1]
        ups = [r.tensor for r in e.reads() if not r.prev and status.get(r.tensor, ("I", 0))[1] == p]
        done = [t for t in ups if status[t][0] == "D"]
        if not done:
            return ups[0], "traversal", producer[ups[0]].line
        name, e = done[0], producer[done[0]]
    return name, e.reduce.op, e.line


def _need(c, e: Einsum, rank, status, producer, reasons, crossing, external_only=()) -> int:
    iterates = rank in e.iteration_ranks
    need = 1 if iterates else 0
    inside = {x.out for x in external_only}
    for r in e.reads():
        if r.prev or r.tensor in inside or r.tensor not in status:
            continue
        kind, p = status[r.tensor]
        if kind == "S":
            need = max(need, p)
        elif kind == "D":
            later = p + 1 if iterates and p > 0 else p
            if later > need:
                need = later
                if later > p and later not in reasons:
                    reasons[later] = PassReason(
                        later, e.out, e.line, r.tensor, *_completing(r.tensor, rank, status, producer)
                    )
    for r in e.reads():
        if r.prev or r.tensor in inside or r.tensor not in status:
            continue
        kind, p = status[r.tensor]
        if kind == "S" and need > p:
            crossing[r.tensor] = (r.tensor, p, need)
    return need


# -- deferral ---------------------------------------------------------------------------------


def late_tensors(c: Cascade, rank: str = STREAM) -> set[str]:
    """Tensors that exist only once a full traversal of ``rank`` is complete: reductions over it,
    and values computed without iterating it from such tensors or from elements of computed
    values along it (``x[m] = s[m, 0]``)."""
    late: set[str] = set()
    for e in c.einsums:
        if e.loop:
            continue
        reduces = e.reduce is not None and rank in e.reduce.ranks
        if reduces or (
            rank not in e.iteration_ranks
            and any(
                r.tensor in late or (rank in c.tensor(r.tensor).ranks and c.tensor(r.tensor).role is not Role.INPUT)
                for r in e.reads()
            )
        ):
            late.add(e.out)
    return late
