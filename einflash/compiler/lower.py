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

from ..errors import LoweringError
from dataclasses import replace

from ..ir.cascade import ROW_OUTPUT_ABSENT, Cascade, Einsum, Role, TensorDecl
from ..ir.expr import Call, Merge, Read, call, transform
from ..ir.printer import format_cascade
from ..ir.ranks import PARALLEL, STREAM
from ..ir.user_ops import triton_helper, user_operators
from ..templates import render
from .masks import KeyRange, TileLists, key_plan
from .passes import count_passes
from .tilecode import Tile, TileCode, bcast, literal

TEMPLATE = "attention_fwd.py.jinja"
# The templates' own parameters, around the generated ones (tensors, strides, parameters) and the
# head-dimension constants: attention_fwd.py.jinja and attention_combine.py.jinja declare them so.
FORWARD_RUNTIME = ("M", "N", "H", "GROUP", "TILES_PER_SPLIT", "visits_ptr", "cu_q_ptr", "cu_k_ptr")
FORWARD_META = ("BLOCK_M", "BLOCK_N", "NUM_STAGES", "SPLIT", "PACK", "REVERSE_M", "COUNT_VISITS", "JAGGED")
COMBINE_RUNTIME = ("M", "H", "SPLITS")
COMBINE_META = ("BLOCK_M",)


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
    lists: TileLists | None = None  # key tiles are listed at run time (tiles_ptr, counts_ptr follow the states)
    runtime_args: tuple[str, ...] = ()  # the kernel's parameters given at launch, in order
    constexpr_args: tuple[str, ...] = ()  # then its tl.constexpr parameters, in order
    saved: tuple[str, ...] = ()  # states stored for the backward, each with a per-row presence flag
    row_outputs: tuple[str, ...] = ()  # per-row outputs stored after the output (the log-sum-exp), in order

    @property
    def arguments(self) -> tuple[str, ...]:
        """Every parameter of the kernel, in order (the templates put compile-time ones last)."""
        return self.runtime_args + self.constexpr_args

    @property
    def stored(self) -> tuple[str, ...]:
        """The states whose values the kernel stores, in argument order (presence flags follow, if saved)."""
        if self.split:
            return self.row_states + self.acc_states
        return self.row_states + tuple(s for s in self.saved if s not in self.row_states)


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


def kernel_name(c: Cascade, dims: dict, dtype: str, split: bool, saved: bool = False) -> str:
    """Deterministic and readable: variant, structural key, dtype and head dims.

    A head dim is named by its true extent (``e40``), with the padded tile extent after it when
    they differ (``e40p64``): kernels of 40 and 64 share a tile but mask differently.
    """
    def dim(r: str) -> str:
        true = dims.get(f"{r}_extent", dims[r])
        return f"{r}{true}" if true == dims[r] else f"{r}{true}p{dims[r]}"

    ds = "_".join(dim(r) for r in sorted(k for k in dims if not k.endswith("_extent")))
    return f"attn_fwd__{c.name}__{c.key[:8]}__{dtype}__{ds}{'__split' if split else ''}{'__train' if saved else ''}"


def lower(c: Cascade, dims: dict[str, int], dtype: str, *, split: bool = False,
          int_inputs: frozenset = frozenset(), saved: tuple[str, ...] = ()) -> KernelSource:
    """Render the one-pass kernel of a streamed cascade.

    ``dims`` maps every non-sequence rank to its padded tile extent and
    ``<rank>_extent`` to its true extent, e.g. ``{"e": 64, "e_extent": 40}``.
    ``saved`` names states the kernel also stores for the backward (training), each with its
    per-row presence (``wsp_<state>[b, h, m]``, 1 where the row saw a key).
    """
    sec = sections(c)
    used = {r.tensor for e in c.einsums for r in e.reads()}
    tensors = tuple(t.name for t in c.inputs if t.name in used)
    params = tuple(p.name for p in c.params)
    value_rank = next(r for r in c.tensor(c.outputs[0]).ranks if r not in PARALLEL + ("m",))
    row_states = tuple(t.name for t in c.states if tuple(r for r in t.ranks if r not in PARALLEL) == ("m",))
    acc_states = tuple(t.name for t in c.states if t.name not in row_states)
    exact, acc = exact_dots(dtype)
    dot_dtype = acc if exact else f"{tensors[0]}_ptr.dtype.element_ty"
    keys = key_plan(c, sec.loop)
    ranges = keys.ranges

    shared: dict[str, Tile] = {}
    loads: dict = {}
    counter = [0]

    def gen(masked: bool, skip=frozenset()) -> TileCode:
        return TileCode(c, dims, masked, skip, dict(shared), [], dot_dtype, exact, dict(loads), counter,
                        int_inputs=int_inputs, acc=acc)

    # prologue: state init, query-side loads used anywhere, prologue Einsums
    pro = gen(masked=False)
    _init_states(pro, c, acc)
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
        loops.append(dict(lo=kr.lo, hi=kr.hi, comment=kr.comment, body="\n".join(body.lines),
                          skip_tile=kr.skip_tile, pipelined=kr.pipelined, tile=kr.tile))

    epi = gen(masked=False)
    epi.env.update({s: shared[s] for s in states})
    for e in sec.epilogue:
        epi.einsum(e)
    if split:
        for s in row_states + acc_states:
            _store_state(epi, s, c.tensor(s).ranks, split=True)
    else:
        for s in row_states + tuple(s for s in saved if s not in row_states):
            _store_state(epi, s, c.tensor(s).ranks, split=False, presence=s in saved)
        _store_output(epi, epi.env[c.outputs[0]], value_rank)
        for o in c.outputs[1:]:
            _store_row_output(epi, o)
    row_outputs = () if split else c.outputs[1:]  # a split program stores states, the combine the outputs

    args = []
    for name in tensors:
        args.append(f"{name}_ptr")
        args += [f"stride_{name}_{d}" for d in range(len(c.tensor(name).ranks))]
    args += ["out_ptr"] + [f"stride_out_{d}" for d in range(4)] + _row_output_args(row_outputs)
    saved = () if split else saved
    for s in (row_states + acc_states if split else row_states + tuple(s for s in saved if s not in row_states)):
        nd = 3 + (1 if split else 0) + (0 if s in row_states else 1)
        args += [f"ws_{s}_ptr"] + [f"stride_ws_{s}_{d}" for d in range(nd)]
        if split:
            args += [f"wsp_{s}_ptr"] + [f"stride_wsp_{s}_{d}" for d in range(4)]
    for s in saved:
        args += [f"wsp_{s}_ptr"] + [f"stride_wsp_{s}_{d}" for d in range(3)]
    if keys.lists is not None:
        args += ["tiles_ptr"] + [f"stride_tiles_{d}" for d in range(3)]
        args += ["counts_ptr"] + [f"stride_counts_{d}" for d in range(3)]
    args += [f"p_{p}" for p in params]
    constexprs = [f"D_{r}" for r in sorted(k for k in dims if not k.endswith("_extent"))]
    name = kernel_name(c, dims, dtype, split, bool(saved))
    notation = "\n".join("# " + line for line in format_cascade(c).splitlines())
    text = render(TEMPLATE, entry=True, cascade_key=c.key, variant=c.name, notation=notation, kernel=name,
                  helpers=helpers(c), args=",\n    ".join(args), constexprs=constexprs,
                  dim_offsets=[(r, f"D_{r}") for r in sorted(k for k in dims if not k.endswith("_extent"))],
                  prologue="\n".join(pro.lines), tile_setup=keys.setup, key_loops=loops, epilogue="\n".join(epi.lines))
    return KernelSource(name, text, tensors, params, row_states, acc_states, value_rank,
                        tuple((f"D_{r}", dims[r]) for r in sorted(k for k in dims if not k.endswith("_extent"))),
                        split, tuple(ranges), keys.lists, (*args, *FORWARD_RUNTIME), (*constexprs, *FORWARD_META),
                        saved, row_outputs)


def exact_dots(dtype: str) -> tuple[bool, str]:
    """Whether a kernel of ``dtype`` contracts exactly (ieee dots of operands in the accumulator type), and
    the accumulator type: fp32, fp64 for fp64 kernels."""
    return dtype in ("float32", "float64"), "tl.float64" if dtype == "float64" else "tl.float32"


def combine_cascade(c: Cascade) -> tuple[Cascade, tuple[Einsum, ...], frozenset]:
    """The fold of split partial states, as Einsums over workspace inputs ``w_<state>``.

    A chunk update ``S = op∪(S@prev, S_chunk)`` folds a split as ``op∪(S@prev, w_S)``; a
    corrected update ``S = S@prev·α +∪ S_chunk`` as ``S@prev·α +∪ w_S·α_w``, where ``α_w``
    is the correction with the split's states in place of the previous ones.
    """
    states = {t.name for t in c.states}
    loop = [e for e in c.einsums if e.loop]
    w = {s: f"w_{s}" for s in states}

    def split_side(x):
        return Read(w[x.tensor], x.index) if isinstance(x, Read) and x.prev else None

    fold: list[Einsum] = []
    decls = [TensorDecl(w[s], c.tensor(s).ranks, Role.INPUT) for s in sorted(states)]
    alphas = {}
    for e in loop:
        if e.out in states:
            x = e.expr
            acc, chunk = x.args if isinstance(x, Call) and x.merge is Merge.ANY else (None, None)
            if not (isinstance(chunk, Read) and not chunk.prev):
                raise LoweringError(f"state {e.out} has no split form: its update is not op∪(previous, chunk)")
            mine = Read(w[e.out], chunk.index)
            if isinstance(acc, Read) and acc.prev:
                split = mine
            elif isinstance(acc, Call) and acc.op == "mul" and isinstance(acc.args[1], Read) \
                    and acc.args[1].tensor in alphas:
                alpha = acc.args[1]
                split = call("mul", mine, Read(alphas[alpha.tensor], alpha.index))
            else:
                raise LoweringError(f"state {e.out} has no split form: its correction is not a plain factor")
            fold.append(replace(e, expr=call(x.op, acc, split, merge=Merge.ANY)))
        elif not (STREAM in e.iteration_ranks) and all(r.tensor in states for r in e.reads()):
            alpha_w = f"{e.out}_w"
            alphas[e.out] = alpha_w
            decls.append(TensorDecl(alpha_w, e.ranks))
            fold.append(e)
            fold.append(replace(e, out=alpha_w, expr=transform(e.expr, split_side)))
    combined = replace(c, tensors=c.tensors + tuple(decls), einsums=tuple(fold) + sections(c).epilogue)
    return combined, tuple(fold), frozenset(w.values())


def lower_combine(c: Cascade, dims: dict[str, int], dtype: str) -> KernelSource:
    """Render the split-KV combine kernel of a streamed cascade."""
    combined, fold, workspaces = combine_cascade(c)
    row_states = tuple(t.name for t in c.states if _tile_ranks(t.ranks) == ("m",))
    acc_states = tuple(t.name for t in c.states if t.name not in row_states)
    value_rank = next(r for r in c.tensor(c.outputs[0]).ranks if r not in PARALLEL + ("m",))
    counter = [0]
    acc = exact_dots(dtype)[1]
    pro = TileCode(combined, dims, False, counter=counter, workspaces=workspaces, acc=acc)
    _init_states(pro, c, acc)
    body = TileCode(combined, dims, False, env=dict(pro.env), counter=counter, workspaces=workspaces, acc=acc)
    states = {t.name for t in c.states}
    for s in sorted(states):
        body.emit(f"v_{s}_prev = v_{s}")
        body.emit(f"v_{s}_p_prev = v_{s}_p")
    for e in fold:
        t = body.einsum(e)
        if e.out in states:
            _carry(body, e.out, t)
    epi = TileCode(combined, dims, False, env=dict(pro.env), counter=counter, workspaces=workspaces, acc=acc)
    for e in sections(c).epilogue:
        epi.einsum(e)
    for s in row_states:
        _store_state(epi, s, c.tensor(s).ranks, split=False)
    _store_output(epi, epi.env[c.outputs[0]], value_rank)
    for o in c.outputs[1:]:
        _store_row_output(epi, o)
    args = []
    for s in row_states + acc_states:
        nd = 5 if s in acc_states else 4
        args += [f"w_{s}_ptr"] + [f"stride_w_{s}_{d}" for d in range(nd)]
        args += [f"wsp_w_{s}_ptr"] + [f"stride_wsp_w_{s}_{d}" for d in range(4)]
    read = {r.tensor for e in sections(c).epilogue for r in e.reads()}
    inputs = tuple(t.name for t in c.inputs if t.name in read)  # per-head gates, λ of differential...
    for name in inputs:
        args += [f"{name}_ptr"] + [f"stride_{name}_{d}" for d in range(len(c.tensor(name).ranks))]
    args += ["out_ptr"] + [f"stride_out_{d}" for d in range(4)] + _row_output_args(c.outputs[1:])
    for s in row_states:
        args += [f"ws_{s}_ptr"] + [f"stride_ws_{s}_{d}" for d in range(3)]
    params = tuple(p.name for p in c.params)
    args += [f"p_{p}" for p in params]
    names = sorted(k for k in dims if not k.endswith("_extent"))
    name = kernel_name(c, dims, dtype, False).replace("attn_fwd__", "attn_combine__")
    notation = "\n".join("# " + line for line in format_cascade(c).splitlines())
    text = render("attention_combine.py.jinja", cascade_key=c.key, variant=c.name, notation=notation, kernel=name,
                  helpers=helpers(c),
                  args=",\n    ".join(args), constexprs=[f"D_{r}" for r in names],
                  dim_offsets=[(r, f"D_{r}") for r in names], prologue="\n".join(pro.lines),
                  fold="\n".join(body.lines), epilogue="\n".join(epi.lines))
    return KernelSource(name, text, inputs, params, row_states, acc_states, value_rank,
                        tuple((f"D_{r}", dims[r]) for r in names), False,
                        runtime_args=(*args, *COMBINE_RUNTIME),
                        constexpr_args=(*(f"D_{r}" for r in names), *COMBINE_META), row_outputs=c.outputs[1:])


def helpers(c: Cascade) -> list[str]:
    """The @triton.jit combines of the user reducers ``c`` uses."""
    used = user_operators([x for e in c.einsums for x in (e.expr, e.where) if x is not None],
                          [e.reduce.op for e in c.einsums if e.reduce is not None])
    return [triton_helper(name) for name in used]


def _init_states(g: TileCode, c: Cascade, acc: str = "tl.float32") -> None:
    for t in c.states:
        shape = ", ".join(bcast_axes(t.ranks))
        g.emit(f"v_{t.name} = tl.full([{shape}], {literal(t.init)}, {acc})")
        g.emit(f"v_{t.name}_p = tl.zeros([BLOCK_M], dtype=tl.int1)")
        g.env[t.name] = Tile(f"v_{t.name}", _tile_ranks(t.ranks), f"v_{t.name}_p", ("m",), t.init)


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
    ptr = (f"out_ptr + mem_b * stride_out_0 + off_hrow[:, None] * stride_out_1 + mem_m[:, None] * stride_out_2"
           f" + offs_{value_rank}[None, :] * stride_out_3")
    mask = f"row_ok[:, None] & (offs_{value_rank} < {g.extent(value_rank)})[None, :]"
    g.emit(f"tl.store({ptr}, {code}.to(out_ptr.dtype.element_ty), mask={mask})")


def _row_output_args(names) -> list[str]:
    return [a for o in names for a in (f"out_{o}_ptr", *(f"stride_out_{o}_{d}" for d in range(3)))]


def _store_row_output(g: TileCode, name: str) -> None:
    """A per-row output into ``out_<name>[b, h, m]``, laid out like the output; absent rows store −inf.

    Selected by presence, not by the tile's fill: a row that saw no key may hold NaN states (a data-dependent
    mask leaves exp(−inf − (−inf)) in its correction factor), as ``_store_state`` knows too.
    """
    t = g.env[name]
    code = bcast(g.f32(t), t.ranks, ("m",))
    if t.present is not None:
        code = f"tl.where({bcast(t.present, t.pranks, ('m',))}, {code}, {literal(ROW_OUTPUT_ABSENT)})"
    if t.ranks != ("m",):  # constant along the rows (a cascade whose scores ignore q): one value per program
        code = f"tl.broadcast_to({code}, (BLOCK_M,))"
    g.emit(f"tl.store(out_{name}_ptr + mem_b * stride_out_{name}_0 + off_hrow * stride_out_{name}_1 + mem_m * "
           f"stride_out_{name}_2, {code}.to(out_{name}_ptr.dtype.element_ty), mask=row_ok)")


def _store_state(g: TileCode, name: str, ranks, split: bool, presence: bool = False) -> None:
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
    tile = _tile_ranks(ranks)
    if tile == ("m",):
        ptr = ptr.format("") + f" + {m} * stride_ws_{name}_{d}"
        mask = "row_ok"
    else:
        vr = tile[1]
        ptr = ptr.format("[:, None]") + (f" + {m}[:, None] * stride_ws_{name}_{d} + offs_{vr}[None, :] * "
                                          f"stride_ws_{name}_{d + 1}")
        mask = f"row_ok[:, None] & (offs_{vr} < {g.extent(vr)})[None, :]"
    init = g.c.tensor(name).init
    value = f"tl.where({bcast(t.present, t.pranks, tile)}, {t.code}, {literal(init)})" if t.present else t.code
    g.emit(f"tl.store({ptr}, {value}, mask={mask})")
    if split:
        flag = f"{t.present}.to(tl.int8)" if t.present else "tl.full([BLOCK_M], 1, tl.int8)"
        g.emit(f"tl.store(wsp_{name}_ptr + off_b * stride_wsp_{name}_0 + off_hrow * stride_wsp_{name}_1 + "
               f"tl.program_id(2) * stride_wsp_{name}_2 + offs_m * stride_wsp_{name}_3, {flag}, mask=row_ok)")
    elif presence:
        flag = f"{t.present}.to(tl.int8)" if t.present else "tl.full([BLOCK_M], 1, tl.int8)"
        g.emit(f"tl.store(wsp_{name}_ptr + mem_b * stride_wsp_{name}_0 + off_hrow * stride_wsp_{name}_1 + "
               f"mem_m * stride_wsp_{name}_2, {flag}, mask=row_ok)")


def source_digest(text: str) -> str:
    """A short digest of a kernel's source text."""
    return hashlib.sha256(text.encode()).hexdigest()[:12]

