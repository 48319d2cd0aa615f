"""Lowering the chunked form of causal linear attention (einflash.compiler.rewrite.chunked) into its two kernels.

The state kernel renders ``attention_chunk_states.py.jinja``: its chunk slot is the tile code of the state
cascade's Einsums (the key-side weights at the chunk's anchor, the factor between anchors, the chunk's update) for
one chunk of keys. The query kernel is the forward template itself (einflash.compiler.codegen.forward.lower with
``stage="chunked"``): its one range of key tiles is the query tile's own chunk (``query_keys``), and its epilogue
adds the state's term; the positions the chunk cascades name (``chunk``, ``anchor_lo``) are the program's, not
arguments.
"""

from __future__ import annotations

from ...ir.cascade import Cascade
from ...templates import render
from ..rewrite.chunked import ANCHOR_HI, ANCHOR_LO, CHUNK, HAS_STATE
from .signature import param_name, pointer_params
from .source import KernelSource, kernel_name, notation
from .tile import bcast
from .tile_ranges import KeyPlan, KeyRange
from .tilecode import KernelSettings

STATES_TEMPLATE = "attention_chunk_states.py.jinja"

STATE_POSITIONS = (ANCHOR_LO, ANCHOR_HI)  # bound by the state kernel per chunk


def query_keys(chunk: int, direction: int) -> tuple[KeyPlan, dict[str, str]]:
    """The query kernel's keys, of its own chunk (chunks of ``chunk`` positions, a multiple of its tiles): the
    tiles from the chunk's first to its own, or (``direction`` −1) from its own to the chunk's last; and the code
    its program binds the chunk cascade's positions to: its chunk, and the key before the chunk (after it)."""
    first = f"(pid_m * BLOCK_M) // {chunk} * {chunk}"  # the chunk's first position
    if direction == 1:
        # the key before the chunk; before the first, the last key of the state that came in (or none: 0)
        lo, hi, anchor = first, "tl.minimum(pid_m * BLOCK_M + BLOCK_M, N)", f"tl.maximum({first} - 1, -p_{HAS_STATE})"
    else:
        lo, hi, anchor = "pid_m * BLOCK_M", f"tl.minimum({first} + {chunk}, N)", f"tl.minimum({first} + {chunk}, N - 1)"
    own = KeyRange(
        lo,
        hi,
        masked=True,
        comment="the keys of the query tile's own chunk (the other chunks' reach it through the chunk state)",
        pipelined=False,
    )
    return KeyPlan((), (own,)), {CHUNK: f"(pid_m * BLOCK_M) // {chunk}", ANCHOR_LO: anchor}


def lower_states(
    c: Cascade,
    dims: dict[str, int],
    dtype: str,
    exact: bool,
    acc: str,
    int_inputs: frozenset = frozenset(),
    backwards: bool = False,
) -> KernelSource:
    """Render the state kernel of a chunk-state cascade; ``dims`` give the state's block of each rank (``e``,
    ``f``: the rows and columns one program keeps) and their true extents (``e_extent``, ``f_extent``);
    ``backwards`` walks the chunks last to first (a mask ``n ≥ m``)."""
    used = {r.tensor for e in c.einsums for r in e.reads()}
    tensors = tuple(t.name for t in c.inputs if t.name in used)
    params = tuple(p.name for p in c.params if p.name not in STATE_POSITIONS)
    kernel = KernelSettings(
        c, dims, acc if exact else "k_ptr.dtype.element_ty", exact, acc, int_inputs, packed_heads=False
    )
    body = kernel.section(masked=True)  # the last chunk may end before its tile does
    for einsum in c.einsums:
        body.einsum(einsum)
    between = body.env["decay_between"]
    update = body.filled(body.env["update"], 0.0)
    e, f = update.ranks
    args = [a for name in tensors for a in pointer_params(name, len(c.tensor(name).ranks))]
    args += [param_name(p) for p in params]
    name = kernel_name(c, dims, dtype, "chunk_states_backwards" if backwards else "chunk_states")
    text = render(
        STATES_TEMPLATE,
        cascade_key=c.key,
        variant=c.name,
        notation=notation(c),
        kernel=name,
        args=",\n    ".join(args),
        constexprs=[f"D_{e}", f"D_{f}"],
        e=e,
        f=f,
        acc=acc,
        e_extent=dims[f"{e}_extent"],
        f_extent=dims[f"{f}_extent"],
        chunk="\n".join(body.lines),
        between=bcast(between.code, between.ranks, (e, f)),
        update=update.code,
        backwards=backwards,
    )
    return KernelSource(
        name,
        text,
        tensors,
        params,
        (),
        (),
        f,
        ((f"D_{e}", dims[e]), (f"D_{f}", dims[f])),
        False,
        stage="chunk states",
    )
