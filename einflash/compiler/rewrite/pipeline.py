"""The rewrite pipeline: a short list of named steps, each a pure Cascade → Cascade function.

>>> [name for name, _ in PIPELINE]  # doctest: +NORMALIZE_WHITESPACE
['recompute shifted reads', 'masks as indicators in sums', 'reassociate contractions', 'defer normalisation',
 'scalars before masks', 'exponent in base 2', 'scalars out of max', 'k-th largest as top lists', 'stream online']
"""

from __future__ import annotations

from dataclasses import dataclass

from ...ir.cascade import Cascade
from ...ir.validate import validate
from .defer import defer_normalisation
from .indicator import sums_as_indicators
from .online import stream_online
from .reassociate import reassociate
from .shifted import recompute_shifted
from .strength import exponent_base2, scalars_before_masks, scalars_out_of_max
from .top_list import kth_largest_as_top_lists

PIPELINE = (
    ("recompute shifted reads", recompute_shifted),
    ("masks as indicators in sums", sums_as_indicators),
    ("reassociate contractions", reassociate),
    ("defer normalisation", defer_normalisation),
    ("scalars before masks", scalars_before_masks),
    ("exponent in base 2", exponent_base2),
    ("scalars out of max", scalars_out_of_max),
    ("k-th largest as top lists", kth_largest_as_top_lists),
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
