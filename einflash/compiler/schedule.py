"""Schedules: how a call runs (tiles, warps, pipeline depth, splits, GQA packing, register budget), and the
heuristic defaults that run when nothing was tuned.

Prefill: one program per (query tile, batch, head), tiles from the target's defaults
for the head dimension. Decoding (at most 16 queries): the query heads of a GQA
group share one program's rows, so each key/value tile is read once per group, and
the key sequence is split so that there are enough programs to fill the GPU
(split-KV, then a combine kernel). The backward has its own schedule (``BackwardSchedule``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..backends.target import Target, TileConfig
from ..errors import LoweringError

DECODE_MAX_QUERIES = 16
WAVES = 2  # programs per SM that decoding aims for
ROWS_BLOCK_M = 64  # query rows per program of the rows kernel (memory-bound and tiny)
ROWS_WARPS = 4


def next_power_of_two(x: int) -> int:
    """The smallest power of two at least ``x`` (1 for ``x`` ≤ 1).

    >>> [next_power_of_two(x) for x in (0, 1, 2, 3, 40, 64)]
    [1, 1, 2, 4, 64, 64]
    """
    return 1 << max(0, x - 1).bit_length()


def padded(extent: int) -> int:
    """Tile extent of a head dimension: the next power of two, at least 16 (tl.dot's minimum)."""
    return max(16, next_power_of_two(extent))


def widest_head_dim(extents: dict[str, int]) -> int:
    """The widest extent of the ranks other than batch, heads and the sequences (the head dims), at least 16."""
    return max([v for r, v in extents.items() if r not in ("b", "h", "m", "n")] + [16])


@dataclass(frozen=True)
class Schedule:
    """How one call is run: tile sizes, warps, pipeline depth, the number of key splits, GQA packing, tile order.

    ``reverse_m`` launches the query tiles last-first (the heavy tiles of a causal mask start first).
    ``max_registers`` caps the registers per thread that ptxas may use (0: its own choice); a cap can
    change how it schedules the loop, not only whether it spills.
    """

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    splits: int = 1
    pack: bool = False
    reverse_m: bool = False
    max_registers: int = 0

    def tile_config(self) -> TileConfig:
        """The tiles, warps, stages and register cap, as a target's data names them."""
        return TileConfig(self.block_m, self.block_n, self.num_warps, self.num_stages, self.max_registers)

    def describe(self) -> str:
        """A short label: ``Schedule(128, 128, 8, 3, max_registers=240).describe()`` is ``128x128 w8 s3 r240``."""
        return (
            f"{self.block_m}x{self.block_n} w{self.num_warps} s{self.num_stages}"
            + (f" splits {self.splits}" if self.splits > 1 else "")
            + (" packed" if self.pack else "")
            + (" reversed" if self.reverse_m else "")
            + (f" r{self.max_registers}" if self.max_registers else "")
        )

    def to_ints(self) -> list[int]:
        """The schedule as a custom op's ``int[]`` argument takes it (``from_ints`` reads it back).

        >>> s = Schedule(128, 128, 8, 3, max_registers=240); Schedule.from_ints(s.to_ints()) == s
        True
        """
        return [
            self.block_m,
            self.block_n,
            self.num_warps,
            self.num_stages,
            self.splits,
            int(self.pack),
            int(self.reverse_m),
            self.max_registers,
        ]

    @classmethod
    def from_ints(cls, ints: list[int]) -> Schedule:
        bm, bn, warps, stages, *given = ints
        # fields left out keep their defaults
        splits, pack, reverse_m, registers = (given + [1, 0, 0, 0][len(given) :])[:4]
        return cls(bm, bn, warps, stages, splits, bool(pack), bool(reverse_m), registers)


@dataclass(frozen=True)
class BackwardSchedule:
    """How the backward runs.

    The dK/dV kernel keeps ``block_n`` keys per program and streams queries ``block_m`` at a time, in a
    pipeline ``num_stages`` deep; the dQ kernel keeps ``block_n`` queries and streams keys ``block_m`` at a
    time (each keeps the larger tile), ``dq_stages`` deep (0: ``num_stages``). ``max_registers``: the register
    budget per thread given to ptxas for both (0: its own choice). ``one_launch``: the dK/dV and dQ programs
    run in one launch (``attention_bwd.py.jinja``), so neither kernel's last wave idles the GPU. ``atomic_dq``:
    no dQ kernel; the dK/dV kernel adds the query-side gradients atomically (fp32), so their bits may differ
    from run to run on a GPU.

    >>> BackwardSchedule(32, 128, 8, 2).deterministic
    True
    >>> BackwardSchedule.from_ints(BackwardSchedule(64, 128, 8, 2, dq_stages=3).to_ints())
    BackwardSchedule(block_m=64, block_n=128, num_warps=8, num_stages=2, atomic_dq=False, dq_stages=3, \
max_registers=0, one_launch=True)
    """

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    atomic_dq: bool = False
    dq_stages: int = 0
    max_registers: int = 0
    one_launch: bool = True

    @property
    def deterministic(self) -> bool:
        return not self.atomic_dq

    @property
    def dq_depth(self) -> int:
        """The dQ kernel's pipeline depth."""
        return self.dq_stages or self.num_stages

    def describe(self) -> str:
        """A short label: tiles, warps, stages (dK/dV, then dQ), register budget, launches.

        >>> BackwardSchedule(64, 128, 8, 2, dq_stages=3, max_registers=240).describe()
        '64x128 w8 s2/3 r240 one launch'
        """
        stages = f"s{self.num_stages}" + (f"/{self.dq_stages}" if self.dq_stages else "")
        regs = f" r{self.max_registers}" if self.max_registers else ""
        how = " atomic dq" if self.atomic_dq else " one launch" if self.one_launch else " two launches"
        return f"{self.block_m}x{self.block_n} w{self.num_warps} {stages}{regs}{how}"

    def to_ints(self) -> list[int]:
        """The schedule as the training custom op takes it (``from_ints`` reads it back)."""
        return [
            self.block_m,
            self.block_n,
            self.num_warps,
            self.num_stages,
            int(self.atomic_dq),
            self.dq_stages,
            self.max_registers,
            int(self.one_launch),
        ]

    @classmethod
    def from_ints(cls, ints: list[int]) -> BackwardSchedule:
        bm, bn, warps, stages, atomic, *rest = ints
        dq, regs, one = (list(rest) + [0, 0, 1])[:3]
        return cls(bm, bn, warps, stages, bool(atomic), dq, regs, bool(one))


def default_schedule(
    extents: dict[str, int],
    target: Target,
    kv_heads: int | None = None,
    masked: bool = False,
    allow_split: bool = True,
    gathered: bool = False,
    key_stage: bool = False,
) -> Schedule:
    """A schedule for these extents on ``target``: tiles, warps, stages, splits and GQA packing.

    ``masked``: the cascade has an affine mask whose empty tiles are skipped. ``allow_split``: False
    where split-KV is not available (jagged batches). ``gathered``: it reads an input at computed positions
    along both m and n (``Forward.gathered``). ``key_stage``: a two-stage forward, whose key stage runs one
    program per (batch, head) over all keys: its splits cut those keys, at every length of the queries.

    >>> from einflash.backends import get_target
    >>> default_schedule(dict(b=4, h=32, m=1, n=32768, e=128, f=128), get_target("sm90"), 8)
    Schedule(block_m=16, block_n=64, num_warps=4, num_stages=3, splits=9, pack=True, reverse_m=False, max_registers=0)
    """
    heads = extents["h"]
    kv = kv_heads or heads
    group = heads // kv
    widest = widest_head_dim(extents)
    if extents["m"] > DECODE_MAX_QUERIES or key_stage:
        cfg = target.forward.default(next_power_of_two(widest), masked, gathered)
        programs, tiles = extents["b"] * heads, -(-extents["n"] // cfg.block_n)
        splits = max(1, min(tiles, -(-WAVES * (target.sm_count or 1) // programs))) if key_stage and programs else 1
        return Schedule(
            cfg.block_m,
            cfg.block_n,
            cfg.num_warps,
            cfg.num_stages,
            splits if allow_split else 1,
            max_registers=cfg.max_registers,
        )
    cfg = target.decode.default(next_power_of_two(widest))
    pack = group > 1
    rows = extents["m"] * (group if pack else 1)
    block_m = max(cfg.block_m, min(64, next_power_of_two(rows)))
    programs = extents["b"] * (kv if pack else heads) * -(-rows // block_m)
    tiles = -(-extents["n"] // cfg.block_n)
    sms = target.sm_count or 1
    # (an empty batch or query sequence has no program at all: nothing to split)
    splits = max(1, min(tiles, -(-WAVES * sms // programs))) if allow_split and programs else 1
    return Schedule(block_m, cfg.block_n, cfg.num_warps, cfg.num_stages, splits, pack, max_registers=cfg.max_registers)


# fp32 values per thread a broadcast tile (BM x BN x widest head dim) may take in a backward kernel
BROADCAST_VALUES_PER_THREAD = 128


def default_backward_schedule(extents: dict[str, int], target, broadcast: bool = False) -> BackwardSchedule:
    """The target's backward tiles for the widest head dimension (see ``Target.backward``); deterministic.

    ``broadcast``: the cascade reduces a tile that no matrix multiply computes (GLA's BM x BN x E decay
    product, ``einflash.compiler.analysis.cost.broadcast_reduction``); the tiles then shrink until it fits
    the threads' registers.

    >>> from einflash.backends import get_target
    >>> default_backward_schedule(dict(b=2, h=16, m=4096, n=4096, e=128, f=128), get_target("sm90")).describe()
    '64x128 w8 s2/3 r240 one launch'
    >>> default_backward_schedule(dict(b=2, h=16, m=4096, n=4096, e=128, f=128), get_target("sm90"), True).describe()
    '16x16 w8 s2/3 r240 one launch'
    """
    if target.backward is None:
        raise LoweringError(f"target {target.name} has no backward tile configurations")
    widest = next_power_of_two(widest_head_dim(extents))
    cfg = target.backward.default(widest)
    bm, bn = cfg.block_m, cfg.block_n
    if broadcast and target.gpu is not None:
        budget = BROADCAST_VALUES_PER_THREAD * target.gpu.warp_size * cfg.num_warps
        while bm * bn * widest > budget and max(bm, bn) > 16:
            bm, bn = (bm // 2, bn) if bm >= bn else (bm, bn // 2)
    dq = next((stages for largest, stages in target.backward_dq_stages if widest <= largest), 0)
    return BackwardSchedule(bm, bn, cfg.num_warps, cfg.num_stages, dq_stages=dq, max_registers=cfg.max_registers)


def smaller_backward_schedules(s: BackwardSchedule):
    """Schedules of the backward that need less shared memory than ``s``, each less than the one before: one
    stage deep, then shorter query tiles, then fewer keys per program (down to 16); for a default that does not
    fit a cascade's kernels (its buffers are known only once Triton compiles them).

    >>> [x.describe() for x in smaller_backward_schedules(BackwardSchedule(32, 32, 4, 2))]
    ['32x32 w4 s1 one launch', '16x32 w4 s1 one launch', '16x16 w4 s1 one launch']
    """
    s = replace(s, num_stages=1, dq_stages=0)
    yield s
    while s.block_m > 16:
        s = replace(s, block_m=s.block_m // 2)
        yield s
    while s.block_n > 16:
        s = replace(s, block_n=s.block_n // 2)
        yield s
