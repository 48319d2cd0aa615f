"""Predicted kernel time: the work a forward program does per visited key tile, counted per unit, and the
schedule's effects the analysis can count (tiles visited under the mask plan, programs per SM, waves and the
tail of the grid), priced with a target's cost model (``einflash.backends.target.CostModel``).

The work of one visited tile is counted from the cascade in its streaming form: the matrix products (a sum of a
product over one rank into a two-rank tile) go to the tensor cores; every other operator is evaluated once per
point of its Einsum's tile, at the rate the target measured for that operator's Triton text; a row reduction
(max, sum) once per reduced element; a 16-bit operand of a product that the kernel computes (the weights in
``Σ_n p·v``) is converted once per element; a read at computed positions (a relative table, a gather) is a
``gather`` per element, which no calibrated model prices yet. A mask's operators are evaluated only in partial
tiles.

>>> import einflash as ef
>>> from einflash.compiler.rewrite.pipeline import optimise
>>> @ef.attention
... def plain(q, k, v):
...     return ef.softmax(q @ k * ef.scale, "n") @ v
>>> work = loop_work(optimise(plain.cascade)[0])
>>> work[0].dot_flops
2*BM*BN*E + 2*BM*BN*F
>>> sorted(dict(work[0].ops))[:4]
['add', 'exp', 'exp2', 'maximum']
"""

from __future__ import annotations

import functools
import heapq
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

import sympy

from ...backends.target import CostModel, Target, TileConfig
from ...errors import LoweringError
from ...ir.algebra import factors
from ...ir.cascade import Cascade, Einsum, Role
from ...ir.expr import Call, Read, free_ranks, index_ranks, walk
from ...ir.ranks import PARALLEL
from ...shape import Shape
from ..schedule import Schedule
from .cost import BM, BN, BufferNeeds, broadcast_reduction

# the units a prediction names: where a program's time goes
UNITS = ("tensor-core", "special-function", "ALU", "memory")


@dataclass(frozen=True)
class TileWork:
    """One loop's work per visited key tile of one program, as formulas in BM, BN and the held extents.

    ``ops`` counts evaluations per operator name (row reductions as ``row_max`` and ``row_sum``, conversions
    to 16 bits as ``to_16bit``); ``mask_ops`` those of the mask, made only in partial tiles."""

    loop: int
    dot_flops: sympy.Expr
    ops: tuple[tuple[str, sympy.Expr], ...]
    mask_ops: tuple[tuple[str, sympy.Expr], ...]


def _tile_points(c: Cascade, ranks) -> sympy.Expr:
    sizes = {"m": BM, "n": BN}
    return sympy.Mul(*(sizes.get(r, c.rank(r).extent) for r in ranks if r not in PARALLEL))


def _is_dot(e: Einsum) -> bool:
    """A contraction over one rank into a two-rank tile: what the kernels give to ``tl.dot``."""
    if e.reduce is None or e.reduce.op != "sum" or len(e.reduce.ranks) != 1 or broadcast_reduction(e):
        return False
    return len([r for r in e.ranks if r not in PARALLEL]) == 2


def _count(c: Cascade, x, into: Counter) -> None:
    """The operators of ``x``, each evaluated once per point of the tile of the ranks it varies along (a scale
    times a constant is made once; ``(n − m)`` once per score)."""
    for node in walk(x):
        if isinstance(node, Call):
            into[node.op] += _tile_points(c, free_ranks(node))


@functools.lru_cache(maxsize=256)
def loop_work(c: Cascade) -> tuple[TileWork, ...]:
    """Each loop over the keys' work per visited tile (see the module's docstring), in loop order."""
    loops: dict[int, tuple[list, Counter, Counter]] = {}
    for e in c.einsums:
        if not e.loop:
            continue
        dots, ops, mask_ops = loops.setdefault(e.loop, ([], Counter(), Counter()))
        points = _tile_points(c, e.iteration_ranks)
        if _is_dot(e):
            dots.append(2 * points)
            for f, _ in factors(e.expr):  # each operand is made at its own ranks, then multiplied by the MMA
                if not (isinstance(f, Read) and c.tensor(f.tensor).role is Role.INPUT):
                    ops["to_16bit"] += _tile_points(c, free_ranks(f))  # a computed operand goes to 16 bits
                _count(c, f, ops)
        else:
            _count(c, e.expr, ops)
            if e.reduce is not None:
                ops["row_max" if e.reduce.op in ("max", "min") else "row_sum"] += points
        for r in e.reads():  # a read at computed positions (a table at n − m, a gather) loads per element
            if r.tensor in c.computed_reads:
                ops["gather"] += _tile_points(c, index_ranks(r.index))
        if e.where is not None:
            _count(c, e.where, mask_ops)
            mask_ops["where"] += points
    return tuple(
        TileWork(
            loop,
            sympy.expand(sum(dots, sympy.Integer(0))),
            tuple(sorted((k, sympy.expand(v)) for k, v in ops.items())),
            tuple(sorted((k, sympy.expand(v)) for k, v in mask_ops.items())),
        )
        for loop, (dots, ops, mask_ops) in sorted(loops.items())
    )


@functools.lru_cache(maxsize=256)
def epilogue_ops(c: Cascade) -> tuple[tuple[str, sympy.Expr], ...]:
    """The operators one program evaluates outside its loops (the final division), per program."""
    ops: Counter = Counter()
    for e in c.einsums:
        if not e.loop and e.reads():
            _count(c, e.expr, ops)
    return tuple(sorted((k, sympy.expand(v)) for k, v in ops.items()))


@dataclass(frozen=True)
class Prediction:
    """A predicted kernel time and where it goes.

    ``units_ms``: each unit's busy time averaged over the SMs (its work divided by the device's rate for it);
    ``bound``: the unit that binds (``_bound``); ``waves``: programs over the programs that run at once;
    ``tail``: the share of the time after the last program started (the grid's uneven end)."""

    ms: float
    bound: str
    units_ms: dict[str, float]
    programs: int
    per_sm: int
    waves: float
    tail: float

    def to_json(self) -> dict:
        return {
            "ms": self.ms,
            "bound": self.bound,
            "units_ms": self.units_ms,
            "programs": self.programs,
            "per_sm": self.per_sm,
            "waves": self.waves,
            "tail": self.tail,
        }


def _unit_seconds(ops: Mapping[str, float], model: CostModel, sms: int) -> tuple[float, float]:
    """Seconds of one SM spent on ``ops``: (special-function, ALU)."""
    special = alu = 0.0
    for op, n in ops.items():
        t = n * sms / model.rate(op)
        share = model.share(op)
        special, alu = special + share * t, alu + (1.0 - share) * t
    return special, alu


@functools.lru_cache(maxsize=4096)
def _evaluated(formulas: tuple[tuple[str, sympy.Expr], ...], subs: tuple) -> dict[str, float]:
    """Formulas at these values (the same launch is priced under many models when a tuner ranks or a fit runs)."""
    values = dict(subs)
    return {k: float(v.subs(values)) for k, v in formulas}


def programs_per_sm(cfg: TileConfig, smem_bytes: int, register_bytes: int, target: Target) -> int:
    """How many programs of ``cfg`` one SM holds at once: limited by shared memory and by registers (the
    tile's fp32 values spread over its threads, plus what the loop itself keeps, at least what ptxas is
    capped to)."""
    threads = cfg.num_warps * 32
    per_thread = cfg.max_registers or min(target.regs_per_thread or 255, 64 + register_bytes // (4 * threads))
    by_regs = (target.regs_per_sm or 65536) // max(1, per_thread * threads)
    by_smem = (target.smem_per_block or smem_bytes) // max(1, smem_bytes)
    return max(1, min(by_regs, by_smem, 2048 // threads))


@dataclass(frozen=True)
class Launch:
    """What one forward call runs, as the cost model prices it: each loop's work per visited tile and the
    epilogue's (``loop_work``, ``epilogue_ops``); per entry of ``rows``, ``copies`` times over (the heads, and the
    batch where the rows do not depend on it), one program per query tile, ``rows[x][i]`` being (visited,
    partial) key tiles of query tile i; ``extents``: the values of the formulas' symbols; ``per_sm``: programs
    one SM holds (``programs_per_sm``); ``memory_bytes``: the call's compulsory traffic; ``splits``: key slices
    per query tile (split-KV, then a combine launch); ``reverse_m``: query tiles launched last-first."""

    work: tuple[TileWork, ...]
    epilogue: tuple[tuple[str, sympy.Expr], ...]
    rows: tuple[tuple[tuple[int, int], ...], ...]
    copies: int
    cfg: TileConfig
    extents: tuple[tuple[sympy.Expr, float], ...]
    per_sm: int
    memory_bytes: float
    reverse_m: bool = False
    splits: int = 1


def launch_of(
    c: Cascade, buf: BufferNeeds, subs: dict, rows, shape: Shape, schedule: Schedule, target: Target, nbytes: float
) -> Launch:
    """The forward launch of ``schedule`` for ``c`` (streaming form): its buffers ``buf`` and the values of its
    symbols ``subs`` at the shape, the (visited, partial) key tiles of each query tile (``rows``: one list, or
    one per batch entry), the compulsory bytes."""
    cfg = schedule.tile_config()
    per_sm = programs_per_sm(cfg, int(buf.smem.subs(subs)), int(buf.registers.subs(subs)), target)
    copies = shape.B * (shape.Hkv if schedule.pack else shape.Hq) if len(rows) == 1 else shape.Hq
    return Launch(
        loop_work(c),
        epilogue_ops(c),
        tuple(tuple(r) for r in rows),
        copies,
        cfg,
        tuple(subs.items()),
        per_sm,
        nbytes,
        schedule.reverse_m,
        schedule.splits,
    )


def predict(launch: Launch, target: Target) -> Prediction:
    """The time of ``launch`` on ``target`` (see the module's docstring)."""
    model = target.costs
    if model is None:
        raise LoweringError(f"target {target.name} has no cost model")
    sms = target.sm_count or 1
    cfg, splits = launch.cfg, launch.splits
    subs = tuple(dict(launch.extents).items()) + ((BM, cfg.block_m), (BN, cfg.block_n))
    tc_rate = target.tensor_flops * model.dot_efficiency / sms

    def tile_seconds(w: TileWork, partial: bool) -> tuple[float, float, float]:
        ops = _evaluated(w.ops, subs)
        if partial:
            ops = dict(ops)
            for k, v in _evaluated(w.mask_ops, subs).items():
                ops[k] = ops.get(k, 0.0) + v
        dot = _evaluated((("dot", w.dot_flops),), subs)["dot"]
        return (dot / tc_rate, *_unit_seconds(ops, model, sms))

    full = [tile_seconds(w, False) for w in launch.work]
    part = [tile_seconds(w, True) for w in launch.work]
    end = _unit_seconds(_evaluated(launch.epilogue, subs), model, sms)

    def combined(tc: float, special: float, alu: float, overlap: float) -> float:
        elementwise = special + alu
        return max(tc, elementwise) + (1.0 - overlap) * min(tc, elementwise)

    one, several = model.overlap_at(1), model.overlap_at(2)
    grid: list[float] = []  # each program's seconds alone on an SM, in launch order
    totals = dict.fromkeys(UNITS, 0.0)
    shared = 0.0  # the launch's seconds with several programs per SM (alone: the sum of the grid)
    for tiles in launch.rows:
        durations = []
        for visited, partial in reversed(tiles) if launch.reverse_m else tiles:
            for s in range(splits):  # a slice's share of the row's tiles, the full ones first
                start = s * (visited // splits) + min(s, visited % splits)
                n_all = visited // splits + (s < visited % splits)
                n_part = max(0, min(start + n_all, visited) - max(start, visited - partial))
                t = combined(0.0, *end, one)
                for f, p in zip(full, part):
                    t += (n_all - n_part) * combined(*f, one) + n_part * combined(*p, one)
                    shared += launch.copies * (
                        (n_all - n_part) * combined(*f, several) + n_part * combined(*p, several)
                    )
                    for unit, a, b in zip(UNITS, f, p):
                        totals[unit] += launch.copies * ((n_all - n_part) * a + n_part * b)
                durations.append(t)
        grid += durations * launch.copies
    alone = sum(grid)
    # with j programs on an SM each runs at gain / j of its speed alone: together they overlap one's products
    # with another's elementwise work, by the model's overlap with several programs
    gain = alone / shared if shared else 1.0
    makespan, last_start = _run_grid(grid, sms, launch.per_sm, gain)
    memory = launch.memory_bytes / target.hbm_bandwidth
    units = {u: t / sms * 1e3 for u, t in totals.items()} | {"memory": memory * 1e3}
    launches = 2 if splits > 1 else 1
    return Prediction(
        max(makespan, memory) * 1e3 + launches * model.launch_s * 1e3,
        _bound(units),
        units,
        len(grid),
        launch.per_sm,
        len(grid) / (sms * launch.per_sm),
        0.0 if makespan == 0 else (makespan - last_start) / makespan,
    )


def _bound(units: dict[str, float]) -> str:
    """The unit that binds: the tensor cores, memory, or where the elementwise work (the special-function unit's
    and the ALU's, issued by the same warps one after the other) takes longer than both, the larger of the two."""
    elementwise = units["special-function"] + units["ALU"]
    if elementwise > max(units["tensor-core"], units["memory"]):
        return max(("special-function", "ALU"), key=units.__getitem__)
    return "tensor-core" if units["tensor-core"] >= units["memory"] else "memory"


def _run_grid(work: list[float], sms: int, per_sm: int, gain: float) -> tuple[float, float]:
    """Programs of ``work`` seconds (alone on an SM) started in launch order, each on the first SM with a free
    slot (at first breadth-first over the SMs, as the block scheduler does); an SM holding j ≥ 2 programs runs
    each at ``gain / j`` of its speed alone. Returns (the last end, the last start).

    >>> _run_grid([1.0, 1.0, 1.0], sms=2, per_sm=1, gain=1.0)  # the third starts when the first SM frees up
    (2.0, 1.0)
    >>> _run_grid([1.0, 1.0], sms=1, per_sm=2, gain=1.5)  # together at 0.75 of their speed alone
    (1.3333333333333333, 0.0)
    """
    if not work:
        return 0.0, 0.0
    left: list[list[float]] = [[] for _ in range(sms)]  # per SM, its programs' remaining seconds alone
    since = [0.0] * sms  # when each SM's programs were last brought up to date
    events: list[tuple[float, int, int]] = []  # (time, SM, version) of each SM's next end
    version = [0] * sms
    nxt, last_start, now = 0, 0.0, 0.0

    def speed(j: int) -> float:
        return 1.0 if j <= 1 else gain / j

    def settle(sm: int, t: float) -> None:
        progress = (t - since[sm]) * speed(len(left[sm]))
        left[sm] = [w - progress for w in left[sm] if w - progress > 1e-15]
        since[sm] = t

    def schedule(sm: int) -> None:
        version[sm] += 1
        if left[sm]:
            heapq.heappush(events, (since[sm] + min(left[sm]) / speed(len(left[sm])), sm, version[sm]))

    for _ in range(per_sm):
        for sm in range(sms):
            if nxt < len(work):
                left[sm].append(work[nxt])
                nxt += 1
    for sm in range(sms):
        schedule(sm)
    while events:
        now, sm, v = heapq.heappop(events)
        if v != version[sm]:
            continue
        settle(sm, now)
        while len(left[sm]) < per_sm and nxt < len(work):
            left[sm].append(work[nxt])
            nxt, last_start = nxt + 1, now
        schedule(sm)
    return now, last_start
