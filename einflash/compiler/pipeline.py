"""The rewrite pipeline: a short list of named steps, each a pure Cascade → Cascade function.

>>> [name for name, _ in PIPELINE]
['reassociate contractions', 'defer normalisation', 'stream online']
"""

from __future__ import annotations

from dataclasses import dataclass

from ..ir.cascade import Cascade
from ..ir.validate import validate
from .rewrites import defer_normalisation, reassociate, stream_online

PIPELINE = (
    ("reassociate contractions", reassociate),
    ("defer normalisation", defer_normalisation),
    ("stream online", stream_online),
)


@dataclass(frozen=True)
class Step:
    name: str
    cascade: Cascade
    changed: bool


def optimise(c: Cascade) -> tuple[Cascade, tuple[Step, ...]]:
    """Run every step of PIPELINE; return the final cascade and each step's result.

    Every intermediate cascade is validated, so a rewrite that breaks an invariant
    fails here, at the step that broke it.
    """
    steps = []
    for name, rewrite in PIPELINE:
        new = rewrite(c)
        validate(new)
        steps.append(Step(name, new, new.key != c.key))
        c = new
    return c, tuple(steps)
