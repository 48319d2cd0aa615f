"""Which schedule a call runs when the caller names none: the cache's, else the heuristic default.

The first call of a shape looks it up (a file read, once per shape per process); later calls of
that shape find the answer in memory. The order:

1. the autotune cache entry of the call's shape bucket, else of the nearest compatible bucket;
2. with EINFLASH_AUTOTUNE=1, outside deployment and outside ``torch.compile``: tune the call's own
   inputs there and then (``einflash.compiler.tuning.tuner``) and use the winner;
3. the heuristic default (``einflash.compiler.schedule.default_schedule``), shrunk where the buffer
   analysis finds that it cannot fit the target (``einflash.compiler.tuning.space.fitting_default``), or the
   tile shape the target's cost model predicts clearly faster (``einflash.compiler.tuning.ranking``).

Without EINFLASH_AUTOTUNE a call never tunes. Deploy mode (EINFLASH_DEPLOY=1, or
``set_deploy_mode(True)``) never tunes, whatever else is set, and warns once per variant, dtype and
shape bucket that has no entry, since a deployment is expected to ship its cache.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch

from ... import knobs
from ...backends.target import Target
from ...errors import CacheWarning
from ...ir.cascade import Cascade
from ..runtime.forward import Forward
from ..schedule import Schedule
from . import cache as cache_files
from .cache import TuneCache
from .cache_keys import Bucket, CacheKey
from .ranking import untuned_default
from .space import element_bytes
from .tuner import tune

_MEMO: dict[tuple, Schedule] = {}
_WARNED: set[tuple] = set()
_DEPLOY: list[bool | None] = [None]
_CACHE: list[TuneCache | None] = [None]
_GENERATION = [0]
_CACHE_WRITES = [0]  # the caches' writes this process had made when the remembered choices were made


def set_deploy_mode(on: bool | None = True) -> None:
    """Deploy mode on or off for this process (None: follow EINFLASH_DEPLOY again).

    >>> set_deploy_mode(True); deploy_mode()
    True
    >>> set_deploy_mode(None)
    """
    _DEPLOY[0] = on
    forget()


def deploy_mode() -> bool:
    """Whether calls may never tune and warn about missing cache entries (see the module's docstring)."""
    return knobs.deploy() if _DEPLOY[0] is None else _DEPLOY[0]


def forget() -> None:
    """Drop the schedules remembered for call shapes, and which missing entries were warned about (after
    tuning, or when the cache folder or the deploy mode changes)."""
    _MEMO.clear()
    _WARNED.clear()
    _CACHE[0] = None
    _GENERATION[0] += 1


def generation() -> int:
    """How many times ``forget`` has run: what a choice remembered elsewhere (a call's replay) was made under.
    A cache written since the last call (a tuning run) forgets first."""
    if cache_files.writes() != _CACHE_WRITES[0]:
        _CACHE_WRITES[0] = cache_files.writes()
        forget()
    return _GENERATION[0]


def _cache() -> TuneCache:
    cache = _CACHE[0]
    if cache is None or cache.root != TuneCache().root:
        cache = _CACHE[0] = TuneCache()
    return cache


def choose(
    cascade: Cascade,
    forward: Forward,
    target: Target,
    dtype: torch.dtype,
    extents: dict[str, int],
    kv_heads: int,
    inputs: dict | None = None,
    params: dict | None = None,
) -> Schedule:
    """The schedule for a call of these extents. ``inputs`` (with ``params``) are the call's own, given only
    where tuning may run (eager calls); see the module's docstring for the order."""
    generation()  # forgets what a cache written since (a tuning run) makes stale
    memo = (cascade.key, target.name, target.device, dtype, kv_heads, tuple(extents.items()))
    hit = _MEMO.get(memo)
    if hit is None:
        hit = _MEMO[memo] = _resolve(cascade, forward, target, dtype, extents, kv_heads, inputs, params)
    return hit


def _resolve(cascade, forward, target, dtype, extents, kv_heads, inputs, params) -> Schedule:
    key, bucket = CacheKey.of(cascade, target, dtype), Bucket.of(extents, kv_heads)
    cache = _cache()
    found = cache.best(key, bucket)
    deploy = deploy_mode()
    if found is not None and (found[1] == bucket.label or deploy or not knobs.autotune() or inputs is None):
        schedule = found[0]
        if schedule.splits > 1:  # a neighbour's split count may exceed this shape's key tiles
            tiles = -(-extents["n"] // schedule.block_n) if forward.splittable or forward.keys_splittable else 1
            schedule = dataclasses.replace(schedule, splits=min(schedule.splits, tiles))
        return schedule
    if not deploy and knobs.autotune() and inputs is not None:
        return tune(cascade, forward, inputs, params or {}, target, cache=cache).best
    if deploy and (key, bucket) not in _WARNED:
        _WARNED.add((key, bucket))
        warnings.warn(
            f"deploy mode: no tuned schedule for {cascade.name} ({key.dtype}, {bucket.label}) on "
            f"{target.device} in {cache.path(key)}; using the heuristic default. Tune it with "
            f"`einflash tune` and ship the cache folder (or `einflash cache export`)",
            CacheWarning,
            stacklevel=4,
        )
    return untuned_default(
        forward, target, extents, kv_heads, element_bytes(cascade, inputs or {}, dtype), params or {}
    )
