"""Which key tiles a query tile visits, and which of them evaluate the mask.

The loop of the one-pass kernel runs over ranges of key tiles. A range is
``masked`` when its tiles may be cut by the mask or by the end of the sequence:
there the mask predicate and ``n < N`` are evaluated. In an unmasked range every
tile is full: the affine conjuncts of the mask (``skip``) are proven to hold, and
only data-dependent conjuncts (document ids, score thresholds) are evaluated.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..ir.cascade import Cascade, Einsum
from ..ir.expr import Expr


@dataclass(frozen=True)
class KeyRange:
    lo: str  # first key position (a multiple of BLOCK_N), as a Triton expression
    hi: str  # end of the range, as a Triton expression
    masked: bool
    skip: frozenset = frozenset()  # mask conjuncts that hold on every tile of this range
    comment: str = ""


def loop_masks(loop: tuple[Einsum, ...]) -> list[Expr]:
    return [e.where for e in loop if e.where is not None]


def key_ranges(c: Cascade, loop: tuple[Einsum, ...]) -> list[KeyRange]:
    """Ranges of key tiles for one query tile: all tiles, split at the sequence edge."""
    edge = "(N // BLOCK_N) * BLOCK_N"
    return [KeyRange("0", edge, False, frozenset(), "whole key tiles"),
            KeyRange(edge, "N", True, frozenset(), "the last, partial key tile")] if not loop_masks(loop) else [
        KeyRange("0", "N", True, frozenset(), "every key tile, masked")]
