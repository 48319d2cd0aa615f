"""Heuristic schedules: what runs when nothing was tuned."""

from __future__ import annotations

import torch

from ..ir.cascade import Cascade
from .forward import Schedule


def default_schedule(c: Cascade, extents: dict[str, int], device: torch.device) -> Schedule:
    """Tile sizes by head dimension; small tiles under the CPU interpreter (its cost grows with tile work)."""
    if device.type != "cuda":
        return Schedule(16, 16, 4, 1)
    widest = max(v for r, v in extents.items() if r not in ("b", "h", "m", "n"))
    if widest <= 64:
        return Schedule(128, 64, 4, 3)
    if widest <= 128:
        return Schedule(128, 64, 8, 3)
    return Schedule(64, 32, 4, 2)
