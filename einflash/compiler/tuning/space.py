"""The schedules a tuner may try for one problem, with those the buffer analysis rules out before compiling.

A *family* is a template with its own knobs. ``forward``: the one-pass kernel, one program per
query tile (tiles, warps, stages, and for a cascade with an affine mask the order of the query
tiles). ``decode`` (at most 16 queries): split-KV partials plus the combine kernel, GQA groups
packed into one program's rows (tiles, warps, stages, and the split count, where one split is the
fused kernel without a combine). Knob values come from the target's SearchSpace; the heuristic
default's own values are added, so the default is always a candidate. There are no backward kernels
yet: each will be a family of its own, named to ``search_space``, with its knobs (the dQ strategy,
atomic or separate) added in ``_knobs`` and its Tuning on the targets beside ``forward`` and ``decode``.

Pruning, before anything compiles:

- shared memory: the buffer analysis gives the bytes of the input tiles a program holds,
  ``b·(BM·E + STAGES·BN·(E + F))`` for plain attention, which Triton 3.6 allocates (plus up to 2 KiB of
  barriers and scratch) for sm_90 at 2 to 5 stages. With one stage the loop is not pipelined and Triton
  keeps fewer tiles than the formula counts, so the formula proves nothing there and such configs compile.
- registers: one fp32 tile of each shape the loop computes (scores and accumulator, ``4·BM·(BN + F + 1)``
  bytes for plain attention) spread over the program's threads; more 32-bit values per thread than a
  thread may hold means spills (128×128 tiles on 4 warps at head dim 128 need 257 and spill 1,688 B on
  sm_90; the tests compile one such config to check).
- redundant: more query rows per tile than the problem has rows, more keys per tile than it has keys,
  or more splits than key tiles, all of which only repeat a smaller config's work.

>>> import einflash as ef
>>> from einflash.backends import get_target
>>> @ef.attention
... def plain(q, k, v):
...     return ef.softmax(q @ k * ef.scale, "n") @ v
>>> s = search_space(plain.forward, get_target("sm90"), dict(b=2, h=16, m=4096, n=4096, e=128, f=128), 16, 2)
>>> s.family, s.size, len(s.feasible), s.pruned_counts()
('forward', 120, 98, {'registers': 6, 'shared memory': 16})
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields

import sympy
import torch

from ...backends.target import Target
from ...errors import LoweringError
from ...ir.cascade import Cascade
from ...ir.ranks import PARALLEL, STREAM
from ..analysis.cost import BM, BN, ELEM, STAGES, buffer_needs
from ..codegen.unroll import unrolled_ranks
from ..runtime.forward import Forward
from ..schedule import DECODE_MAX_QUERIES, Schedule, default_schedule, next_power_of_two, padded

FP32 = 4
FAMILIES = ("forward", "decode")


def family_of(extents: dict[str, int]) -> str:
    """The template family that runs these extents: ``decode`` for at most 16 queries, else ``forward``."""
    return "decode" if extents["m"] <= DECODE_MAX_QUERIES else "forward"


@dataclass(frozen=True)
class Pruned:
    """A schedule ruled out without compiling it, and why."""

    schedule: Schedule
    kind: str  # "shared memory", "registers" or "redundant"
    reason: str


@dataclass(frozen=True)
class Space:
    """Candidate values per Schedule field (in field order, what a tuner samples), the default, and their
    product split into the feasible schedules and the pruned ones."""

    family: str
    knobs: tuple[tuple[str, tuple], ...]
    default: Schedule
    feasible: tuple[Schedule, ...]
    pruned: tuple[Pruned, ...]  # within the product of ``knobs``
    redundant_values: int = 0  # schedules left out of the product with knob values too large for the problem

    @property
    def size(self) -> int:
        """Schedules in the product of the target's knob values, before any pruning."""
        return math.prod(len(v) for _, v in self.knobs) + self.redundant_values

    def pruned_counts(self) -> dict[str, int]:
        """Schedules ruled out before compiling, by reason."""
        counts: dict[str, int] = {"redundant": self.redundant_values} if self.redundant_values else {}
        for p in self.pruned:
            counts[p.kind] = counts.get(p.kind, 0) + 1
        return dict(sorted(counts.items()))

    def why_pruned(self, schedule: Schedule) -> str | None:
        """The reason ``schedule`` was pruned, or None when it is feasible."""
        return next((f"{p.kind}: {p.reason}" for p in self.pruned if p.schedule == schedule), None)

    def project(self, schedule: Schedule) -> Schedule:
        """``schedule`` with each field moved to the nearest candidate (a neighbouring shape's winner here)."""
        near = {}
        for name, values in self.knobs:
            have = getattr(schedule, name)
            near[name] = min(
                values,
                key=lambda v: (
                    abs(math.log2(max(v, 1) / max(have, 1)))
                    if isinstance(v, int) and not isinstance(v, bool)
                    else v != have,
                    v,
                ),
            )
        return Schedule(**near)

    def to_json(self) -> dict:
        return {
            "family": self.family,
            "knobs": {k: list(v) for k, v in self.knobs},
            "size": self.size,
            "feasible": len(self.feasible),
            "pruned": self.pruned_counts(),
        }


def _rows(extents: dict[str, int], kv_heads: int, pack: bool) -> int:
    return extents["m"] * (extents["h"] // kv_heads if pack else 1)


def _knobs(
    forward: Forward, target: Target, extents: dict[str, int], kv_heads: int, family: str, default: Schedule
) -> tuple[dict[str, tuple], int]:
    """Candidate values per field, and how many schedules of their product dropping redundant values removed."""
    space = (target.decode if family == "decode" else target.forward).space
    values = {
        "block_m": space.block_m,
        "block_n": space.block_n,
        "num_warps": space.num_warps,
        "num_stages": space.num_stages,
        # a two-stage forward's splits cut its key stage's keys, at every length; split-KV cuts a decode's
        "splits": target.decode.space.splits
        if forward.keys_splittable
        else space.splits
        if family == "decode" and forward.splittable
        else (1,),
        "pack": (default.pack,),
        # the order of query tiles matters only where tiles differ in work: an affine mask
        "reverse_m": (False, True) if family == "forward" and forward.masked else (False,),
        "max_registers": space.max_registers,
    }
    knobs = {f.name: tuple(sorted(set(values[f.name]) | {getattr(default, f.name)})) for f in fields(Schedule)}
    full = math.prod(len(v) for v in knobs.values())
    # tiles taller than the rows or wider than the keys only repeat a smaller tile's work, whatever else is chosen
    most = {
        "block_m": max(16, next_power_of_two(_rows(extents, kv_heads, default.pack))),
        "block_n": max(16, next_power_of_two(extents["n"])),
    }
    for name, limit in most.items():
        knobs[name] = tuple(v for v in knobs[name] if v <= limit or v == getattr(default, name))
    return knobs, full - math.prod(len(v) for v in knobs.values())


# (cascade key, held extents, element bytes) -> the functions buffer_functions made: sympy takes milliseconds,
# which a call that chooses its schedule each time (a jagged batch) would otherwise pay per call
_BUFFERS: dict[tuple, tuple] = {}


def buffer_functions(forward: Forward, extents: dict[str, int], elem_bytes: int):
    """Shared-memory and register bytes as plain functions of (BM, BN, STAGES): sympy runs once per cascade, head
    dims and element size."""
    c = forward.rewritten
    # a table rank is read at computed positions, never held whole
    dims = tuple(
        (r.name, extents[r.name])
        for r in c.ranks
        if r.name not in PARALLEL and r.name not in ("m", "n") and r.name not in c.table_ranks and r.name in extents
    )
    key = (c.key, dims, elem_bytes)
    if key not in _BUFFERS:
        _BUFFERS[key] = _lambdified(c, dict(dims), elem_bytes)
    return _BUFFERS[key]


def _lambdified(c, extents: dict[str, int], elem_bytes: int):
    """The buffer formulas of ``c`` at these held extents, as plain functions."""
    needs = buffer_needs(c)
    unrolled = {r for e in c.einsums for r in unrolled_ranks(e, c)}
    held, live = {ELEM: elem_bytes}, {ELEM: elem_bytes}
    for r in c.ranks:
        if r.name not in extents:
            continue
        # kernels hold head dims padded to a power of two (MoBA's blocks, ceil(N/block), too); an unrolled rank's
        # instances are each a tile of their own, one live at a time (their input tiles all are, one per shift)
        held[r.extent] = extents[r.name] if r.name in unrolled else padded(extents[r.name])
        live[r.extent] = 1 if r.name in unrolled else padded(extents[r.name])
    smem = sympy.lambdify((BM, BN, STAGES), needs.smem.subs(held), modules="math")
    regs = sympy.lambdify((BM, BN), needs.registers.subs(live), modules="math")
    return smem, regs


def prune(s: Schedule, extents: dict[str, int], target: Target, smem, regs) -> Pruned | None:
    """Why the buffer analysis rules ``s`` out (None where it fits); ``smem`` and ``regs`` from buffer_functions."""
    if s.splits > -(-extents["n"] // s.block_n):
        return Pruned(s, "redundant", f"{s.splits} splits of {-(-extents['n'] // s.block_n)} key tiles")
    if target.smem_per_block is not None and s.num_stages >= 2:
        need = int(smem(s.block_m, s.block_n, s.num_stages))
        if need > target.smem_per_block:
            return Pruned(
                s,
                "shared memory",
                f"input tiles need {need:,} B, {target.name} has {target.smem_per_block:,} B per block",
            )
    if target.regs_per_thread is not None and target.gpu is not None:
        per_thread = regs(s.block_m, s.block_n) / FP32 / (target.gpu.warp_size * s.num_warps)
        budget = min(target.regs_per_thread, s.max_registers or target.regs_per_thread)
        if per_thread > budget:
            return Pruned(
                s,
                "registers",
                f"fp32 tiles need {per_thread:.0f} registers per thread, "
                f"{target.name} has {target.regs_per_thread}"
                + (f" and the schedule caps them at {budget}" if s.max_registers else ""),
            )
    return None


# tile sizes a default may shrink to when the target's own do not fit (tl.dot needs 16)
_SHRUNK_TILES = (16, 32, 64, 128)


def element_bytes(cascade: Cascade, inputs: Mapping[str, torch.Tensor], dtype: torch.dtype) -> int:
    """The bytes per element the buffer analysis sizes tiles by: q's dtype's, or a wider input's among those a
    program loads as tiles, along the queries or the keys (fp32 gates g[n, e] beside bf16 q, k, v take as much
    shared memory per element as fp32; a per-head fp32 slope is no tile and counts for nothing).

    >>> import einflash as ef
    >>> @ef.attention
    ... def gated(q, k, v, g: ef.Tensor["b h n e"], slope: ef.Tensor["h"]):  # noqa: F722 -- rank names
    ...     return ef.softmax(q @ (k * g) + slope * (ef.n - ef.m), "n") @ v
    >>> bf16 = torch.ones(1, dtype=torch.bfloat16)
    >>> element_bytes(gated.cascade, {"q": bf16, "g": torch.ones(1), "slope": torch.ones(1)}, torch.bfloat16)
    4
    >>> element_bytes(gated.cascade, {"q": bf16, "g": bf16, "slope": torch.ones(1)}, torch.bfloat16)
    2
    """
    tiles = {t.name for t in cascade.inputs if {"m", STREAM} & set(t.ranks)}
    return max([dtype.itemsize] + [x.element_size() for n, x in inputs.items() if n in tiles and x.is_floating_point()])


def fitting_default(
    forward: Forward,
    target: Target,
    extents: dict[str, int],
    kv_heads: int,
    elem_bytes: int,
    allow_split: bool = True,
) -> Schedule:
    """The heuristic default, or where the buffer analysis finds that it cannot fit the target (a
    cascade that reduces a broadcast tile, as GLA does), the largest tiles that do, with its warps.
    ``allow_split`` False: no split-KV (a jagged batch's sequences).

    >>> import einflash as ef
    >>> from einflash.backends import get_target
    >>> @ef.attention
    ... def plain(q, k, v):
    ...     return ef.softmax(q @ k * ef.scale, "n") @ v
    >>> fitting_default(plain.forward, get_target("sm90"), dict(b=2, h=16, m=4096, n=4096, e=128, f=128), 16, 2)
    Schedule(block_m=128, block_n=128, num_warps=8, num_stages=3, splits=1, pack=False, reverse_m=False,
             max_registers=240)
    """
    smem, regs = buffer_functions(forward, extents, elem_bytes)
    return _fitting(_default(forward, extents, target, kv_heads, allow_split), extents, target, smem, regs)


def _default(
    forward: Forward, extents: dict[str, int], target: Target, kv_heads: int, allow_split: bool = True
) -> Schedule:
    return default_schedule(
        extents,
        target,
        kv_heads,
        forward.masked,
        allow_split=(forward.splittable or forward.keys_splittable) and allow_split,
        gathered=forward.gathered,
        key_stage=forward.stages is not None,
    )


def _fitting(default: Schedule, extents: dict[str, int], target: Target, smem, regs) -> Schedule:
    if prune(default, extents, target, smem, regs) is None:
        return default
    fits = [
        dataclasses.replace(default, block_m=bm, block_n=bn, num_warps=w)
        for bm in _SHRUNK_TILES
        for bn in _SHRUNK_TILES
        for w in sorted({default.num_warps, 4, 8})
        if bm <= default.block_m and bn <= default.block_n
    ]
    fits = [s for s in fits if prune(s, extents, target, smem, regs) is None]
    if not fits:
        return default  # nothing smaller fits either: compiling says what is short
    return max(fits, key=lambda s: (s.block_m * s.block_n, s.num_warps == default.num_warps, s.block_m))


def search_space(
    forward: Forward, target: Target, extents: dict[str, int], kv_heads: int, elem_bytes: int, family: str | None = None
) -> Space:
    """The schedules to try for these extents on ``target`` (inputs of ``elem_bytes`` bytes), pruned.

    ``family`` defaults to the one that runs these extents (``family_of``). The heuristic default is
    never pruned: it is the baseline every tuned result is compared with.
    """
    family = family or family_of(extents)
    if family not in FAMILIES:
        raise LoweringError(f"no kernel family {family!r} to tune; there are {', '.join(FAMILIES)}")
    smem, regs = buffer_functions(forward, extents, elem_bytes)  # sympy, once: the default and the pruning
    default = _fitting(_default(forward, extents, target, kv_heads), extents, target, smem, regs)
    knobs, redundant = _knobs(forward, target, extents, kv_heads, family, default)
    feasible: list[Schedule] = []
    pruned: list[Pruned] = []
    for combo in itertools.product(*knobs.values()):
        s = Schedule(*combo)
        why = None if s == default else prune(s, extents, target, smem, regs)
        if why is None:
            feasible.append(s)
        else:
            pruned.append(why)
    return Space(family, tuple(knobs.items()), default, tuple(feasible), tuple(pruned), redundant)
