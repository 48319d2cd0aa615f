"""Lowering a streamed (one-pass) cascade into the one-pass forward Triton template.

The cascade's Einsums become the template's hook slots: Einsums before the loop
and running-state initialisation fill the prologue, loop Einsums the body of each
range of key tiles, the rest the epilogue. Key-tile ranges come from the symbolic
mask analysis: tiles proven empty are never visited, tiles proven full skip the
affine part of the mask.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import sympy

from ..errors import LoweringError
from ..ir.cascade import Cascade, Einsum, Layout, Role
from ..ir.expr import Call, walk
from ..ir.printer import format_cascade
from ..ir.ranks import PARALLEL, STREAM
from ..templates import render
from .masks import KeyRange, key_ranges
from .passes import count_passes
from .tilecode import Tile, TileCode, bcast, literal

TEMPLATE = "attention_fwd.py.jinja"


@dataclass(frozen=True)
class KernelSource:
    """A rendered kernel: its module text and how to call it."""

    name: str
    text: str
    tensors: tuple[str, ...]  # input tensors in argument order (each followed by its strides)
    params: tuple[str, ...]  # scalar parameters in argument order
    row_states: tuple[str, ...]  # per-row states stored in the workspace, in column order
    acc_states: tuple[str, ...]  # states with a value rank, stored only by split programs
    value_rank: str  # the output's value rank (f, or e when k doubles as v)
    constexprs: tuple[tuple[str, int], ...]
    split: bool
    ranges: tuple[KeyRange, ...] = field(default=())


@dataclass(frozen=True)
class Sections:
    prologue: tuple[Einsum, ...]
    loop: tuple[Einsum, ...]
    epilogue: tuple[Einsum, ...]


def sections(c: Cascade) -> Sections:
    """Split a streamed cascade into prologue, loop and epilogue; raise LoweringError if it is not one-pass."""
    pa = count_passes(c)
    if pa.passes > 1:
        raise LoweringError(f"{c.name} needs {pa.passes} passes over n; the one-pass template needs 1 "
                            f"(a multi-pass template is not implemented yet)")
    loop = [e for e in c.einsums if e.loop]
    if not loop:
        raise LoweringError(f"{c.name} has no loop over n after the rewrites; nothing to stream")
    first = c.einsums.index(loop[0])
    last = first + len(loop)
    for e in c.einsums[last:]:
        if STREAM in e.iteration_ranks:
            raise LoweringError(f"{e.out} iterates n after the loop")
    for t in c.states:
        if "m" not in t.ranks:
            raise LoweringError(f"running state {t.name}[{','.join(t.ranks)}] does not depend on the query rank m: "
                                f"every query tile would repeat the whole stream (linear-attention form); "
                                f"it needs a two-stage template, not implemented yet")
    return Sections(c.einsums[:first], tuple(loop), c.einsums[last:])


def kernel_name(c: Cascade, dims: dict, dtype: str, split: bool) -> str:
    """Deterministic and readable: variant, structural key, dtype and head dims."""
    ds = "_".join(f"{r}{dims[r]}" for r in sorted(k for k in dims if not k.endswith("_extent")))
    return f"attn_fwd__{c.name}__{c.key[:8]}__{dtype}__{ds}{'__split' if split else ''}"


def lower(c: Cascade, dims: dict[str, int], dtype: str, *, split: bool = False) -> KernelSource:
    """Render the one-pass kernel of a streamed cascade.

    ``dims`` maps every non-sequence rank to its padded tile extent and
    ``<rank>_extent`` to its true extent, e.g. ``{"e": 64, "e_extent": 40}``.
    """
    sec = sections(c)
    used = {r.tensor for e in c.einsums for r in e.reads()}
    tensors = tuple(t.name for t in c.inputs if t.name in used)
    params = tuple(p.name for p in c.params)
    value_rank = next(r for r in c.tensor(c.outputs[0]).ranks if r not in PARALLEL + ("m",))
    row_states = tuple(t.name for t in c.states if tuple(r for r in t.ranks if r not in PARALLEL) == ("m",))
    acc_states = tuple(t.name for t in c.states if t.name not in row_states)
    fp32 = dtype == "float32"
    dot_dtype = "tl.float32" if fp32 else f"{tensors[0]}_ptr.dtype.element_ty"
    ranges = key_ranges(c, sec.loop)

    shared: dict[str, Tile] = {}
    loads: dict = {}
    counter = [0]

    def gen(masked: bool, skip=frozenset()) -> TileCode:
        return TileCode(c, dims, masked, skip, dict(shared), [], dot_dtype, fp32, dict(loads), counter)

    # prologue: state init, query-side loads used anywhere, prologue Einsums
    pro = gen(masked=False)
    for t in c.states:
        shape = ", ".join(bcast_axes(t.ranks))
        pro.emit(f"v_{t.name} = tl.full([{shape}], {literal(t.init)}, tl.float32)")
        pro.emit(f"v_{t.name}_p = tl.zeros([BLOCK_M], dtype=tl.int1)")
        pro.env[t.name] = Tile(f"v_{t.name}", _tile_ranks(t.ranks), f"v_{t.name}_p", ("m",), t.init)
    for e in sec.loop:
        for r in e.reads():
            if c.tensor(r.tensor).role is Role.INPUT and not _has_n(r):
                pro.load(r)
    for e in sec.prologue:
        pro.einsum(e)
    shared.update(pro.env)
    loads.update(pro.loads)
    states = {t.name for t in c.states}
    prev_read = {r.tensor for e in sec.loop for r in e.reads() if r.prev}

    loops = []
    for kr in ranges:
        body = gen(masked=kr.masked, skip=kr.skip)
        for s in sorted(prev_read):
            body.emit(f"v_{s}_prev = v_{s}")
            body.emit(f"v_{s}_p_prev = v_{s}_p")
        for e in sec.loop:
            t = body.einsum(e)
            if e.out in states:
                _carry(body, e.out, t)
        loops.append(dict(lo=kr.lo, hi=kr.hi, comment=kr.comment, body="\n".join(body.lines)))

    epi = gen(masked=False)
    epi.env.update({s: shared[s] for s in states})
    for e in sec.epilogue:
        epi.einsum(e)
    if split:
        for s in states:
            _store_state(epi, s, c.tensor(s).ranks, split=True)
    else:
        for s in row_states:
            _store_state(epi, s, c.tensor(s).ranks, split=False)
        _store_output(epi, epi.env[c.outputs[0]], value_rank)

    args = []
    for name in tensors:
        args.append(f"{name}_ptr")
        args += [f"stride_{name}_{d}" for d in range(len(c.tensor(name).ranks))]
    args += ["out_ptr"] + [f"stride_out_{d}" for d in range(4)]
    for s in (states if split else row_states):
        nd = 3 + (1 if split else 0) + (0 if s in row_states else 1)
        args += [f"ws_{s}_ptr"] + [f"stride_ws_{s}_{d}" for d in range(nd)]
    args += [f"p_{p}" for p in params]
    constexprs = [f"D_{r}" for r in sorted(k for k in dims if not k.endswith("_extent"))]
    name = kernel_name(c, dims, dtype, split)
    notation = "\n".join("# " + line for line in format_cascade(c).splitlines())
    text = render(TEMPLATE, cascade_key=c.key, variant=c.name, notation=notation, kernel=name,
                  args=",\n    ".join(args), constexprs=constexprs,
                  dim_offsets=[(r, f"D_{r}") for r in sorted(k for k in dims if not k.endswith("_extent"))],
                  prologue="\n".join(pro.lines), key_loops=loops, epilogue="\n".join(epi.lines))
    return KernelSource(name, text, tensors, params, row_states, acc_states, value_rank,
                        tuple((f"D_{r}", dims[r]) for r in sorted(k for k in dims if not k.endswith("_extent"))),
                        split, tuple(ranges))


def _has_n(r) -> bool:
    return any(s.name == STREAM for i in r.index for s in getattr(i, "free_symbols", ()))


def _tile_ranks(ranks) -> tuple[str, ...]:
    return tuple(r for r in ranks if r not in PARALLEL)


def bcast_axes(ranks) -> list[str]:
    from .tilecode import axis_extent

    return [axis_extent(r) for r in _tile_ranks(ranks)]


def _carry(g: TileCode, name: str, t: Tile) -> None:
    """Keep a running state loop-carried with a fixed type: value and a [BLOCK_M] presence."""
    if t.present is None:
        g.emit(f"v_{name}_p = tl.full([BLOCK_M], 1, tl.int1)")
    elif t.pranks != ("m",):
        raise LoweringError(f"the presence of state {name} varies along {t.pranks}; expected rows only")
    g.env[name] = Tile(f"v_{name}", t.ranks, None if t.present is None else f"v_{name}_p",
                       ("m",) if t.present else (), t.fill)


def _store_output(g: TileCode, t: Tile, value_rank: str) -> None:
    want = ("m", value_rank)
    t = g.filled(t, 0.0)
    code = bcast(g.f32(t), t.ranks, want)
    if t.ranks != want:  # a value constant along some axis: broadcast it to the full tile
        code = f"tl.broadcast_to({code}, (BLOCK_M, D_{value_rank}))"
    ptr = (f"out_ptr + off_b * stride_out_0 + off_h * stride_out_1 + offs_m[:, None] * stride_out_2 + "
           f"offs_{value_rank}[None, :] * stride_out_3")
    mask = f"row_ok[:, None] & (offs_{value_rank} < {g.extent(value_rank)})[None, :]"
    g.emit(f"tl.store({ptr}, {code}.to(out_ptr.dtype.element_ty), mask={mask})")


def _store_state(g: TileCode, name: str, ranks, split: bool) -> None:
    """Per-row states: ``ws[b, h, (split,) m (, d)]``; absent rows keep the state's initial value."""
    t = g.env[name]
    d = 0
    ptr = f"ws_{name}_ptr + off_b * stride_ws_{name}_0 + off_h * stride_ws_{name}_1"
    d = 2
    if split:
        ptr += f" + tl.program_id(2) * stride_ws_{name}_2"
        d = 3
    tile = _tile_ranks(ranks)
    if tile == ("m",):
        ptr += f" + offs_m * stride_ws_{name}_{d}"
        mask = "row_ok"
    else:
        vr = tile[1]
        ptr += f" + offs_m[:, None] * stride_ws_{name}_{d} + offs_{vr}[None, :] * stride_ws_{name}_{d + 1}"
        mask = f"row_ok[:, None] & (offs_{vr} < {g.extent(vr)})[None, :]"
    init = g.c.tensor(name).init
    value = f"tl.where({bcast(t.present, t.pranks, tile)}, {t.code}, {literal(init)})" if t.present else t.code
    g.emit(f"tl.store({ptr}, {value}, mask={mask})")


def source_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


__all__ = ["KernelSource", "Sections", "sections", "lower", "kernel_name", "source_digest", "Call", "walk",
           "Einsum", "Layout", "sympy"]
