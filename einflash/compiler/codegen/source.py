"""A rendered kernel and what names it: its source with its signature, deterministic names, its notation.

Generated sources get names a human can read and that change with what the kernel computes:
``attn_fwd__causal__8c1f03d2__bfloat16__e128_f128`` is the forward kernel of the variant ``causal``
(structural key ``8c1f03d2…``) for bfloat16 inputs and head dims 128.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cached_property
from typing import Protocol

from ...ir.cascade import Cascade
from ...ir.printer import format_cascade
from .signature import Signature
from .tile_ranges import KeyRange, TileLists


class RenderedKernel(Protocol):
    """What launching a rendered kernel takes of it, a forward, combine or backward kernel alike."""

    @property
    def name(self) -> str: ...

    @property
    def text(self) -> str: ...

    @property
    def signature(self) -> Signature: ...


@dataclass(frozen=True)
class KernelSource:
    """A rendered forward or combine kernel: its module text and how to call it."""

    name: str
    text: str
    tensors: tuple[str, ...]  # input tensors in argument order (each followed by its strides)
    params: tuple[str, ...]  # scalar parameters in argument order
    row_states: tuple[str, ...]  # per-row states stored in the workspace, in column order
    acc_states: tuple[str, ...]  # states with a value rank, stored only by split programs
    value_rank: str  # the output's value rank (f, or e when k doubles as v)
    constexprs: tuple[tuple[str, int], ...]  # the head-dimension constants and their values
    split: bool
    ranges: tuple[KeyRange, ...] = field(default=())
    lists: TileLists | None = None  # key tiles are listed at run time (tiles_ptr, counts_ptr follow the states)
    saved: tuple[str, ...] = ()  # states stored for the backward, each with a per-row presence flag
    row_outputs: tuple[str, ...] = ()  # per-row outputs stored after the output (the log-sum-exp), in order
    summaries: tuple[str, ...] = ()  # a key stage's outputs: summaries of the keys, each with its presence
    summary_reads: tuple[str, ...] = ()  # a query stage's inputs that are summaries (their presence follows)
    stage: str | None = None  # "keys" or "queries": a stage of a two-stage cascade (one program per head for keys)

    @cached_property
    def signature(self) -> Signature:
        """The kernel's parameters, as its rendered source declares them."""
        return Signature.of(self.text, self.name)

    @property
    def stored(self) -> tuple[str, ...]:
        """The states whose values the kernel stores, in argument order (presence flags follow, if saved)."""
        if self.split:
            return self.row_states + self.acc_states
        return self.row_states + tuple(s for s in self.saved if s not in self.row_states)


def dim_names(dims: dict[str, int]) -> list[str]:
    """The ranks of a kernel's head dimensions, in order (``dims`` also holds ``<rank>_extent`` entries)."""
    return sorted(k for k in dims if not k.endswith("_extent"))


def kernel_name(c: Cascade, dims: dict, dtype: str, kind: str = "fwd", split: bool = False, saved: bool = False) -> str:
    """Deterministic and readable: kind (fwd, combine, bwd_rows, bwd_kv, bwd_q), variant, structural key, dtype
    and head dims.

    A head dim is named by its true extent (``e40``), with the padded tile extent after it when
    they differ (``e40p64``): kernels of 40 and 64 share a tile but mask differently.
    """

    def dim(r: str) -> str:
        true = dims.get(f"{r}_extent", dims[r])
        return f"{r}{true}" if true == dims[r] else f"{r}{true}p{dims[r]}"

    ds = "_".join(dim(r) for r in dim_names(dims))
    return f"attn_{kind}__{c.name}__{c.key[:8]}__{dtype}__{ds}{'__split' if split else ''}{'__train' if saved else ''}"


def notation(c: Cascade) -> str:
    """The cascade a kernel computes, in Einsum notation, as a comment block for the kernel's header."""
    return "\n".join("# " + line for line in format_cascade(c).splitlines())


def source_digest(text: str) -> str:
    """A short digest of a kernel's source text."""
    return hashlib.sha256(text.encode()).hexdigest()[:12]
