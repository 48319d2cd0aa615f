"""Jagged batches: sequences of different lengths packed along the query and key ranks.

As in FlashAttention's variable-length interface, sequence ``b`` of a jagged batch is the
query rows ``cu_seqlens_q[b] : cu_seqlens_q[b + 1]`` and the keys ``cu_seqlens_k[b] :
cu_seqlens_k[b + 1]`` of tensors whose batch dimension is 1: q ``[1, Hq, total_q, E]``, k
and v ``[1, Hkv, total_k, d]``, and every other input with an m or n dimension packed the
same way. Inside a sequence, the coordinates m and n count from 0, so masks such as
``n ≤ m`` hold per sequence and no query sees another sequence's keys.

>>> import torch
>>> jb = JaggedBatch.from_offsets(torch.tensor([0, 3, 8]), torch.tensor([0, 4, 4]), 8, 4)
>>> jb.sequences, jb.max_q, jb.max_k, jb.lengths
(2, 5, 4, ((3, 4), (5, 0)))
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch

from .errors import DTypeError, ShapeError
from .ir.cascade import Cascade

OFFSET_NAMES = ("cu_seqlens_q", "cu_seqlens_k")


@dataclass(frozen=True)
class JaggedBatch:
    """The cumulative offsets (int32, on the inputs' device) and the lengths they imply."""

    cu_q: torch.Tensor
    cu_k: torch.Tensor
    lengths: tuple[tuple[int, int], ...]  # (query length, key length) of each sequence

    @property
    def sequences(self) -> int:
        return len(self.lengths)

    @property
    def max_q(self) -> int:
        return max((m for m, _ in self.lengths), default=0)

    @property
    def max_k(self) -> int:
        return max((n for _, n in self.lengths), default=0)

    @classmethod
    def from_offsets(cls, cu_q, cu_k, total_q: int, total_k: int) -> JaggedBatch:
        """Check both offset tensors against the packed lengths; one small device-to-host copy reads them."""
        for name, t in zip(OFFSET_NAMES, (cu_q, cu_k)):
            if not isinstance(t, torch.Tensor):
                raise DTypeError(
                    f"{name} must be a torch.Tensor of cumulative sequence offsets, got {type(t).__name__}"
                )
            if t.dtype not in (torch.int32, torch.int64) or t.dim() != 1 or t.numel() < 1:
                raise ShapeError(
                    f"{name} must be a 1-D int32 or int64 tensor [sequences + 1], got {t.dtype} "
                    f"of shape {tuple(t.shape)}"
                )
        if cu_q.numel() != cu_k.numel():
            raise ShapeError(f"cu_seqlens_q has {cu_q.numel() - 1} sequences but cu_seqlens_k has {cu_k.numel() - 1}")
        if cu_q.device != cu_k.device:
            raise ShapeError(f"cu_seqlens_q is on {cu_q.device} but cu_seqlens_k on {cu_k.device}")
        both = torch.stack([cu_q.to(torch.int64), cu_k.to(torch.int64)]).cpu()
        for name, row, total in zip(OFFSET_NAMES, both.tolist(), (total_q, total_k)):
            if row[0] != 0 or row[-1] != total or any(b < a for a, b in itertools.pairwise(row)):
                raise ShapeError(
                    f"{name} must start at 0, never decrease and end at the packed length {total}; got {row}"
                )
        steps = both.diff(dim=1).tolist()
        return cls(cu_q.to(torch.int32), cu_k.to(torch.int32), tuple(zip(steps[0], steps[1])))

    def sequence_inputs(self, c: Cascade, inputs: Mapping[str, torch.Tensor]) -> Iterator[dict[str, torch.Tensor]]:
        """Each sequence's own inputs: m and n dimensions sliced to it, batch dimensions of 1 kept."""
        starts = [(int(q), int(k)) for q, k in zip(self.cu_q.tolist(), self.cu_k.tolist())]
        for (q0, k0), (lm, ln) in zip(starts, self.lengths):
            seq = {}
            for t in c.inputs:
                x = inputs[t.name]
                for d, r in enumerate(t.ranks):
                    if r == "m":
                        x = x.narrow(d, q0, lm)
                    elif r == "n":
                        x = x.narrow(d, k0, ln)
                seq[t.name] = x
            yield seq


def jagged_batch(c: Cascade, inputs: Mapping[str, torch.Tensor], offsets: Mapping) -> JaggedBatch | None:
    """The jagged batch that ``offsets`` (the call's ``cu_seqlens_q`` and ``cu_seqlens_k``) describe, or None.

    Every input with a batch dimension must have batch 1 (sequences are packed, not stacked).
    """
    given = [n for n in OFFSET_NAMES if offsets.get(n) is not None]
    if not given:
        return None
    if len(given) == 1:
        raise ShapeError(f"a jagged batch needs both cu_seqlens_q and cu_seqlens_k, got only {given[0]}")
    total = {}
    for t in c.inputs:
        x = inputs[t.name]
        for d, r in enumerate(t.ranks):
            if r == "b" and x.shape[d] != 1:
                raise ShapeError(
                    f"in a jagged batch the sequences are packed along m and n, so {t.name} must have "
                    f"batch 1; got shape {tuple(x.shape)}"
                )
            if r in ("m", "n"):
                total.setdefault(r, int(x.shape[d]))
    return JaggedBatch.from_offsets(
        offsets["cu_seqlens_q"], offsets["cu_seqlens_k"], total.get("m", 0), total.get("n", 0)
    )
