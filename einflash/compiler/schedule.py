"""Heuristic schedules: what runs when nothing was tuned.

Prefill: one program per (query tile, batch, head), tiles sized by head dimension.
Decoding (at most 16 queries): the query heads of a GQA group share one program's
rows, so each key/value tile is read once per group, and the key sequence is split
so that there are enough programs to fill the GPU (split-KV, then a combine kernel).
"""

from __future__ import annotations

import torch

from ..ir.cascade import Cascade
from .forward import Schedule

DECODE_MAX_QUERIES = 16


def _pow2(x: int) -> int:
    return 1 << max(0, x - 1).bit_length()


def default_schedule(c: Cascade, extents: dict[str, int], device: torch.device, kv_heads: int | None = None,
                     sm_count: int | None = None) -> Schedule:
    """A schedule for these extents: tile sizes, warps, stages, splits and GQA packing.

    >>> default_schedule(None, dict(b=4, h=32, m=1, n=32768, e=128, f=128), torch.device("cuda"), 8, 132)
    Schedule(block_m=16, block_n=64, num_warps=4, num_stages=3, splits=9, pack=True)
    """
    heads = extents["h"]
    kv = kv_heads or heads
    group = heads // kv
    widest = max([v for r, v in extents.items() if r not in ("b", "h", "m", "n")] + [16])
    decode = extents["m"] <= DECODE_MAX_QUERIES
    if device.type != "cuda":
        return Schedule(16, 16, 4, 1, 2 if decode and extents["n"] > 32 else 1, decode and group > 1)
    if decode:
        pack = group > 1
        rows = extents["m"] * (group if pack else 1)
        block_m = min(64, max(16, _pow2(rows)))
        block_n = 64 if widest <= 128 else 32
        programs = extents["b"] * (kv if pack else heads) * -(-rows // block_m)
        sms = sm_count or torch.cuda.get_device_properties(device).multi_processor_count
        tiles = -(-extents["n"] // block_n)
        splits = max(1, min(tiles, -(-2 * sms // programs)))
        return Schedule(block_m, block_n, 4, 3, splits, pack)
    if widest <= 64:
        return Schedule(128, 64, 4, 3)
    if widest <= 128:
        return Schedule(128, 64, 8, 3)
    return Schedule(64, 32, 4, 2)
