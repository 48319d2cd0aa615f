"""Heuristic schedules: what runs when nothing was tuned.

Prefill: one program per (query tile, batch, head), tiles from the target's defaults
for the head dimension. Decoding (at most 16 queries): the query heads of a GQA
group share one program's rows, so each key/value tile is read once per group, and
the key sequence is split so that there are enough programs to fill the GPU
(split-KV, then a combine kernel).
"""

from __future__ import annotations

from ..backends.target import Target
from .forward import Schedule

DECODE_MAX_QUERIES = 16
WAVES = 2  # programs per SM that decoding aims for


def _pow2(x: int) -> int:
    return 1 << max(0, x - 1).bit_length()


def default_schedule(extents: dict[str, int], target: Target, kv_heads: int | None = None,
                     masked: bool = False, allow_split: bool = True) -> Schedule:
    """A schedule for these extents on ``target``: tiles, warps, stages, splits and GQA packing.

    ``masked``: the cascade has an affine mask whose empty tiles are skipped. ``allow_split``: False
    where split-KV is not available (jagged batches).

    >>> from einflash.backends import get_target
    >>> default_schedule(dict(b=4, h=32, m=1, n=32768, e=128, f=128), get_target("sm90"), 8)
    Schedule(block_m=16, block_n=64, num_warps=4, num_stages=3, splits=9, pack=True, reverse_m=False, max_registers=0)
    """
    heads = extents["h"]
    kv = kv_heads or heads
    group = heads // kv
    widest = max([v for r, v in extents.items() if r not in ("b", "h", "m", "n")] + [16])
    if extents["m"] > DECODE_MAX_QUERIES:
        cfg = target.forward.default(_pow2(widest), masked)
        return Schedule(cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages, max_registers=cfg.max_registers)
    cfg = target.decode.default(_pow2(widest))
    pack = group > 1
    rows = extents["m"] * (group if pack else 1)
    block_m = max(cfg.block_m, min(64, _pow2(rows)))
    programs = extents["b"] * (kv if pack else heads) * -(-rows // block_m)
    tiles = -(-extents["n"] // cfg.block_n)
    sms = target.sm_count or 1
    # (an empty batch or query sequence has no program at all: nothing to split)
    splits = max(1, min(tiles, -(-WAVES * sms // programs))) if allow_split and programs else 1
    return Schedule(block_m, cfg.block_n, cfg.num_warps, cfg.num_stages, splits, pack, max_registers=cfg.max_registers)
