"""The stores that end a kernel: the output, per-row outputs (the log-sum-exp), running states (with their
presence) into workspaces, and the running states' initialisation and update that the loops share."""

from __future__ import annotations

from ...errors import LoweringError
from ...ir.cascade import ROW_OUTPUT_ABSENT, Cascade
from ...ir.ranks import PARALLEL
from .signature import pointer_params
from .tile import Tile, axis_extent, bcast, literal
from .tilecode import TileCode


def init_states(g: TileCode, c: Cascade, acc: str = "tl.float32", only: set[str] | None = None) -> None:
    """Every running state (or those named in ``only``: one loop's) at its initial value, absent on every row
    (no key seen yet)."""
    for t in c.states if only is None else [t for t in c.states if t.name in only]:
        assert t.init is not None, t.name  # a state is made with its reducer's identity (rewrite.online)
        shape = ", ".join(bcast_axes(t.ranks))
        g.emit(f"v_{t.name} = tl.full([{shape}], {literal(t.init)}, {acc})")
        g.emit(f"v_{t.name}_p = tl.zeros([{', '.join(bcast_axes(presence_ranks(t.ranks)))}], dtype=tl.int1)")
        g.env[t.name] = Tile(f"v_{t.name}", tile_ranks(t.ranks), f"v_{t.name}_p", presence_ranks(t.ranks), t.init)


def presence_ranks(ranks) -> tuple[str, ...]:
    """The axes of a running state's loop-carried presence: its rows (a state over m is present per row), else all
    its tile axes (a summary of the keys, MoBA's block sums)."""
    return ("m",) if "m" in ranks else tile_ranks(ranks)


def tile_ranks(ranks) -> tuple[str, ...]:
    """The ranks of a tensor that are tile axes (batch and head are fixed per program)."""
    return tuple(r for r in ranks if r not in PARALLEL)


def bcast_axes(ranks) -> list[str]:
    """The tile extents of a tensor's tile axes."""
    return [axis_extent(r) for r in tile_ranks(ranks)]


def carry(g: TileCode, name: str, t: Tile) -> None:
    """Keep a running state loop-carried with a fixed type: value and a presence over ``presence_ranks``."""
    axes = presence_ranks(t.ranks)
    shape = ", ".join(bcast_axes(axes))
    if t.present is None:
        g.emit(f"v_{name}_p = tl.full([{shape}], 1, tl.int1)")
    elif t.pranks != axes and "m" in t.ranks:
        raise LoweringError(f"the presence of state {name} varies along {t.pranks}; expected rows only")
    elif t.pranks != axes:  # a key summary's presence along some of its axes, made whole
        g.emit(f"v_{name}_p = {bcast(t.present, t.pranks, axes)} | tl.zeros([{shape}], dtype=tl.int1)")
    g.env[name] = Tile(
        f"v_{name}", t.ranks, None if t.present is None else f"v_{name}_p", axes if t.present else (), t.fill
    )


def store_output(g: TileCode, t: Tile, value_rank: str) -> None:
    want = ("m", value_rank)
    t = g.filled(t, 0.0)
    code = bcast(g.f32(t), t.ranks, want)
    if t.ranks != want:  # a value constant along some axis: broadcast it to the full tile
        code = f"tl.broadcast_to({code}, (BLOCK_M, D_{value_rank}))"
    ptr = (
        f"out_ptr + mem_b * stride_out_0 + off_hrow[:, None] * stride_out_1 + mem_m[:, None] * stride_out_2"
        f" + offs_{value_rank}[None, :] * stride_out_3"
    )
    mask = f"row_ok[:, None] & (offs_{value_rank} < {g.extent(value_rank)})[None, :]"
    g.emit(f"tl.store({ptr}, {code}.to(out_ptr.dtype.element_ty), mask={mask})")


def row_output_params(names) -> list[str]:
    """The kernel parameters of per-row outputs ``out_<name>[b, h, m]``."""
    return [a for o in names for a in pointer_params(f"out_{o}", 3)]


def store_row_output(g: TileCode, name: str) -> None:
    """A per-row output into ``out_<name>[b, h, m]``, laid out like the output; absent rows store −inf.

    Selected by presence, not by the tile's fill: a row that saw no key may hold NaN states (a data-dependent
    mask leaves exp(−inf − (−inf)) in its correction factor), as ``store_state`` knows too.
    """
    t = g.env[name]
    code = bcast(g.f32(t), t.ranks, ("m",))
    if t.present is not None:
        code = f"tl.where({bcast(t.present, t.pranks, ('m',))}, {code}, {literal(ROW_OUTPUT_ABSENT)})"
    if t.ranks != ("m",):  # constant along the rows (a cascade whose scores ignore q): one value per program
        code = f"tl.broadcast_to({code}, (BLOCK_M,))"
    g.emit(
        f"tl.store(out_{name}_ptr + mem_b * stride_out_{name}_0 + off_hrow * stride_out_{name}_1 + mem_m * "
        f"stride_out_{name}_2, {code}.to(out_{name}_ptr.dtype.element_ty), mask=row_ok)"
    )


def store_state(g: TileCode, name: str, ranks, split: bool, presence: bool = False) -> None:
    """A state into ``ws[b, h, (split,) m (, d)]``; with ``split`` also its presence into ``wsp[b, h, split, m]``,
    with ``presence`` (a saved state, no split) into ``wsp[b, h, m]``.

    Without a split, absent rows keep the state's initial value (-inf for a max, 0 for a sum), and ``ws`` is
    laid out like the output (packed rows of a jagged batch); a split's workspace is per sequence and row.
    """
    t = g.env[name]
    b, m = ("off_b", "offs_m") if split else ("mem_b", "mem_m")
    ptr = f"ws_{name}_ptr + {b} * stride_ws_{name}_0 + off_hrow{{}} * stride_ws_{name}_1"
    d = 2
    if split:
        ptr += f" + tl.program_id(2) * stride_ws_{name}_2"
        d = 3
    tile = tile_ranks(ranks)
    if tile == ("m",):
        ptr = ptr.format("") + f" + {m} * stride_ws_{name}_{d}"
        mask = "row_ok"
    else:
        vr = tile[1]
        ptr = ptr.format("[:, None]") + (
            f" + {m}[:, None] * stride_ws_{name}_{d} + offs_{vr}[None, :] * stride_ws_{name}_{d + 1}"
        )
        mask = f"row_ok[:, None] & (offs_{vr} < {g.extent(vr)})[None, :]"
    value = t.code
    if t.present:
        init = g.c.tensor(name).init
        assert init is not None, name  # a state is made with its reducer's identity (rewrite.online)
        value = f"tl.where({bcast(t.present, t.pranks, tile)}, {t.code}, {literal(init)})"
    g.emit(f"tl.store({ptr}, {value}, mask={mask})")
    if split:
        flag = f"{t.present}.to(tl.int8)" if t.present else "tl.full([BLOCK_M], 1, tl.int8)"
        g.emit(
            f"tl.store(wsp_{name}_ptr + off_b * stride_wsp_{name}_0 + off_hrow * stride_wsp_{name}_1 + "
            f"tl.program_id(2) * stride_wsp_{name}_2 + offs_m * stride_wsp_{name}_3, {flag}, mask=row_ok)"
        )
    elif presence:
        flag = f"{t.present}.to(tl.int8)" if t.present else "tl.full([BLOCK_M], 1, tl.int8)"
        g.emit(
            f"tl.store(wsp_{name}_ptr + mem_b * stride_wsp_{name}_0 + off_hrow * stride_wsp_{name}_1 + "
            f"mem_m * stride_wsp_{name}_2, {flag}, mask=row_ok)"
        )


def store_summary(g: TileCode, name: str, split: bool = False) -> None:
    """A key stage's summary of the keys into ``out_<name>[b, h, ...]`` (0 where absent), and its presence into
    ``present_<name>`` (int8, laid out alike). The batch is the program's own (a jagged batch's sequence).

    With ``split``, a running state of a split key stage instead: the split's partial value into
    ``ws_<name>[b, h, split, ...]`` (its initial value where absent) and its presence into ``wsp_<name>``."""
    t = g.env[name]
    ranks = tile_ranks(g.c.tensor(name).ranks)
    if t.ranks != ranks:
        raise LoweringError(f"the summary {name} varies along {t.ranks}, where it is declared over {ranks}")
    value, flag = (f"ws_{name}", f"wsp_{name}") if split else (f"out_{name}", f"present_{name}")

    def offset(stride: str) -> str:
        at = f"off_b * {stride}_0 + off_h * {stride}_1" + (f" + tl.program_id(2) * {stride}_2" if split else "")
        return at + "".join(
            f" + {bcast(f'offs_{r}', (r,), ranks)} * {stride}_{d}" for d, r in enumerate(ranks, start=3 if split else 2)
        )

    masks = [bcast(f"(offs_{r} < {g.extent(r)})", (r,), ranks) for r in ranks if g.extent(r) != g.dims[r]]
    mask = f", mask={' & '.join(masks)}" if masks else ""
    shape = ", ".join(bcast_axes(ranks))
    present = f"tl.full([{shape}], 1, tl.int8)"
    if t.present is not None:
        present = f"({bcast(t.present, t.pranks, ranks)} | tl.zeros([{shape}], dtype=tl.int1)).to(tl.int8)"
    init = g.c.tensor(name).init if split else None
    kept = g.f32(g.filled(t, 0.0 if init is None else init))
    g.emit(f"tl.store({value}_ptr + {offset(f'stride_{value}')}, {kept}{mask})")
    # a summary's presence is laid out as its value, with its strides; a split's partial one has strides of its own
    g.emit(f"tl.store({flag}_ptr + {offset(f'stride_{flag}' if split else f'stride_{value}')}, {present}{mask})")


def store_results(g: TileCode, summaries: tuple[str, ...], value_rank: str) -> None:
    """What a kernel's programs end with: a key stage's summaries (each with its presence), else the output and the
    per-row outputs (the log-sum-exp)."""
    for o in summaries:
        store_summary(g, o)
    if not summaries:
        store_output(g, g.env[g.c.outputs[0]], value_rank)
        for o in g.c.outputs[1:]:
            store_row_output(g, o)


def result_params(c: Cascade, summaries: tuple[str, ...], row_outputs: tuple[str, ...]) -> list[str]:
    """The kernel parameters of what ``store_results`` stores: the summaries' (each followed by its presence's),
    else the output's and the per-row outputs'."""
    if not summaries:
        return pointer_params("out", 4) + row_output_params(row_outputs)
    return [a for o in summaries for a in [*pointer_params(f"out_{o}", len(c.tensor(o).ranks)), f"present_{o}_ptr"]]
