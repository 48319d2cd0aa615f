"""Schedules ranked by the target's cost model: which ones a tuning run measures first, and which one a call
runs when nothing is tuned.

The model (``einflash.compiler.analysis.timing``) prices what the analysis counts: tiles visited under the mask
plan, the work per tile per unit, programs per SM from the buffers, waves and the grid's tail. It does not see
what a pipeline depth or a warp count does inside a program, so schedules that differ only there tie, and the
order among them is the search space's.

>>> import einflash as ef
>>> from einflash.backends import get_target
>>> from einflash.compiler.schedule import Schedule
>>> @ef.attention
... def causal(q, k, v):
...     return ef.softmax(ef.mask(q @ k * ef.scale, ef.n <= ef.m), "n") @ v
>>> extents = dict(b=2, h=16, m=8192, n=8192, e=128, f=128)
>>> ranked = predicted_order(causal.forward, get_target("sm90"), extents, 16, 2, {},
...                          [Schedule(128, 128, 8, 3), Schedule(64, 64, 4, 3)])
>>> len(ranked), ranked[0][1] <= ranked[1][1]  # (schedule, predicted ms), fastest first
(2, True)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

from ...backends.target import Target
from ...errors import EinflashError
from ...ir.cascade import Cascade
from ...shape import Shape
from ..analysis.cost import buffer_needs, cost, declared_params, symbol_values, tile_values
from ..analysis.timing import Launch, launch_of, predict, programs_per_sm
from ..runtime.forward import Forward
from ..runtime.tile_lists import mask_tiles_at
from ..schedule import Schedule
from .space import buffer_functions, family_of, fitting_default, prune

# The model replaces the hand-set default only where it predicts a larger gain than this: among the schedules of
# each calibration row (benchmarks/results/h100_2026-12-08_session13_costs/fit.json), the largest gain it
# predicted for a schedule that measured slower was 12.9% (docs/tuning.md, "The cost model").
MODEL_MARGIN = 0.15


def _shape(extents: dict[str, int], kv_heads: int) -> tuple[Shape, dict[str, int]]:
    main = ("b", "h", "m", "n", "e", "f")
    shape = Shape(extents["b"], extents["h"], extents["m"], extents["n"], extents["e"], extents.get("f"), kv_heads)
    return shape, {r: v for r, v in extents.items() if r not in main}


def forward_launch(
    written: Cascade,
    rewritten: Cascade,
    target: Target,
    shape: Shape,
    dims: dict[str, int],
    params: Mapping | None,
    schedule: Schedule,
    elem_bytes: int,
) -> Launch:
    """The one-pass forward launch of ``schedule`` at ``shape``, as the cost model prices it: what ``explain``
    predicts, without the rest of its analysis (a tuner ranking schedules needs only this)."""
    params = declared_params(written, shape, params)
    ext = shape.extents([r.name for r in written.ranks], dims)
    cfg = schedule.tile_config()
    subs = symbol_values(written, ext, params, shape) | tile_values(cfg, elem_bytes)
    _, rows = mask_tiles_at(written, ext, params, cfg, None)
    nbytes = float(cost(rewritten).bytes.subs(subs))
    return launch_of(rewritten, buffer_needs(rewritten), subs, rows, shape, schedule, target, nbytes)


def predicted_order(
    forward: Forward,
    target: Target,
    extents: dict[str, int],
    kv_heads: int,
    elem_bytes: int,
    params: dict[str, float],
    schedules: Iterable[Schedule],
) -> list[tuple[Schedule, float]]:
    """``schedules`` with their predicted ms, fastest first (ties in the order given); empty where the target
    has no cost model or the model cannot price the cascade (a two-stage form, a linear form that long sequences
    run chunk by chunk, an operator it has no rate for, a mask parameter it is not given)."""
    if target.costs is None or forward.error is not None or forward.stages is not None or forward.linear is not None:
        return []
    shape, dims = _shape(extents, kv_heads)
    smem, regs = buffer_functions(forward, extents, elem_bytes)
    launches: dict[tuple, Launch] = {}
    out = []
    try:
        for order, s in enumerate(schedules):
            tiles = (s.block_m, s.block_n, s.pack)
            if tiles not in launches:
                launches[tiles] = forward_launch(
                    forward.written, forward.rewritten, target, shape, dims, params, s, elem_bytes
                )
            cfg = s.tile_config()
            per_sm = programs_per_sm(
                cfg, int(smem(s.block_m, s.block_n, s.num_stages)), int(regs(s.block_m, s.block_n)), target
            )
            priced = dataclasses.replace(
                launches[tiles], cfg=cfg, per_sm=per_sm, reverse_m=s.reverse_m, splits=s.splits
            )
            out.append((predict(priced, target).ms, order, s))
    except EinflashError:
        return []
    return [(s, ms) for ms, _, s in sorted(out, key=lambda x: (x[0], x[1]))]


def model_default(
    forward: Forward,
    target: Target,
    extents: dict[str, int],
    kv_heads: int,
    elem_bytes: int,
    params: dict[str, float],
    default: Schedule,
) -> Schedule:
    """The schedule a call runs when nothing is tuned: ``default`` (the target's hand-set one), or the tile shape
    the cost model predicts faster by more than MODEL_MARGIN (each tile shape of the target's space at 4 warps
    for 64 rows, 8 for 128, with the default's pipeline depth). Prefill only: decoding's split counts are the
    default's, and a target without a cost model keeps its defaults.

    >>> import einflash as ef
    >>> from einflash.backends import get_target
    >>> from einflash.compiler.tuning.space import fitting_default
    >>> @ef.attention
    ... def plain(q, k, v):
    ...     return ef.softmax(q @ k * ef.scale, "n") @ v
    >>> extents = dict(b=2, h=16, m=4096, n=4096, e=128, f=128)
    >>> default = fitting_default(plain.forward, get_target("interpreter"), extents, 16, 2)
    >>> model_default(plain.forward, get_target("interpreter"), extents, 16, 2, {}, default) == default
    True
    """
    if target.costs is None or family_of(extents) != "forward":
        return default
    space = target.forward.space
    smem, regs = buffer_functions(forward, extents, elem_bytes)
    candidates = [default]
    for bm in space.block_m:
        for bn in space.block_n:
            s = dataclasses.replace(default, block_m=bm, block_n=bn, num_warps=4 if bm <= 64 else 8, max_registers=0)
            if s not in candidates and prune(s, extents, target, smem, regs) is None:
                candidates.append(s)
    ranked = dict(predicted_order(forward, target, extents, kv_heads, elem_bytes, params, candidates))
    if not ranked:
        return default
    best = min(ranked, key=ranked.__getitem__)
    return best if ranked[best] < (1.0 - MODEL_MARGIN) * ranked[default] else default


def untuned_default(
    forward: Forward, target: Target, extents: dict[str, int], kv_heads: int, elem_bytes: int, params: dict
) -> Schedule:
    """What a call runs with no tuned schedule: the hand-set default that fits (``fitting_default``), or the cost
    model's choice over it (``model_default``)."""
    default = fitting_default(forward, target, extents, kv_heads, elem_bytes)
    return model_default(forward, target, extents, kv_heads, elem_bytes, params, default)
