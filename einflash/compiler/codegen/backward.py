"""The backward of one cascade: its gradient cascade, split into three kernels, lowered and run.

- rows (``attention_bwd_rows.py.jinja``): one program per query tile, no keys. The gradient
  cascade's row-level reductions that the other kernels read (Σ_f d_o·o/den for softmax, one
  per normaliser) are computed once per row here instead of once per tile pair, and so are
  the gradients of inputs read only at row level (head gates, the λ of differential attention).
- dK/dV (``attention_bwd_kv.py.jinja``): one program per key tile and kv head. For each query
  head of its GQA group it streams the query tiles the transposed mask plan visits; gradients
  of key-side inputs (k, v, key-layout factors) accumulate over the whole group in registers,
  per-pair gradients (bias[h, m, n]) are stored per tile, per-head ones (ALiBi slopes) as one
  partial sum per program.
- dQ (the forward's one-pass template, ``attention_fwd.py.jinja``): one program per query tile
  streaming key tiles with the forward's key plan: gradients of query-side inputs. With an
  atomic schedule the dK/dV kernel adds them (atomically, in fp32) instead; that is faster to
  launch and not deterministic on GPUs.
- one launch (``attention_bwd.py.jinja``, the default schedule): the dK/dV and dQ kernels' functions
  called from one grid, the dK/dV programs of each (batch, kv head) followed by its dQ programs, so
  programs of both kinds run side by side and neither kernel's last wave leaves the GPU idle.

Each kernel's part of the gradient cascade is a cascade of its own (its row terms read as
inputs), with every reduction over several ranks split into one-rank steps and the reductions
over the streamed rank made running sums; the tile code is the forward's (TileCode).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property

from ...ir.cascade import Cascade, Layout
from ...ir.expr import Read, rank_free
from ...ir.ranks import PARALLEL
from ...templates import render
from ..analysis.mask_tiles import conjuncts
from ..autodiff.gradient import Diagonal
from ..autodiff.parts import Looped
from .forward import exact_dots, helpers
from .signature import KernelCall, Signature, param_name, pointer_params
from .source import dim_names, kernel_name, notation, source_digest
from .tile import Tile, axis_extent, bcast, presence, tile_axes
from .tile_ranges import KeyRange, TileLists, key_plan, query_plan, to_triton
from .tilecode import KernelSettings, TileCode

KEYS_FIRST = ("b", "h", "n", "m")  # tile axes of the dK/dV kernel: its dots take key-major tiles untransposed


# -- tile code ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Output:
    """Where a kernel stores a tensor: ``ranks`` after the batch and head dims (head ``head``), and per
    program (``program`` names its index) or per tile pair (ranks m and n), or atomically added. A
    ``diagonal`` output is a tile's sums along its diagonals, added into the program's row (its one rank
    ``len_{name}`` long) at the entries its pairs read."""

    name: str
    ranks: tuple[str, ...]
    head: str = "off_h"
    program: str | None = None
    atomic: bool = False
    diagonal: Diagonal | None = None


@dataclass(frozen=True)
class BackwardKernel:
    """A rendered backward kernel and how to call it."""

    name: str
    text: str
    tensors: tuple[str, ...]  # inputs in argument order (each followed by its strides)
    outputs: tuple[Output, ...]  # then outputs in argument order (each followed by its strides)
    params: tuple[str, ...]
    constexprs: tuple[tuple[str, int], ...]
    ranges: tuple[KeyRange, ...] = ()
    lists: TileLists | None = None  # run-time key tile lists (dQ kernel of a document mask), as the forward's
    body: str = ""  # the kernel as a function given its program ids, for the one-launch kernel (dK/dV, dQ)

    @cached_property
    def signature(self) -> Signature:
        """The kernel's parameters, as its rendered source declares them."""
        return Signature.of(self.text, self.name)

    def call(
        self, grid: tuple[int, ...], args: dict[str, object], warps: int, stages: int, max_registers: int = 0
    ) -> KernelCall:
        """The launch of this kernel with every argument by name (checked against its signature)."""
        x, y, z = (*grid, 1, 1)[:3]  # a grid of fewer dimensions is 1 along the others
        return KernelCall((x, y, z), self.signature.bind(args), warps, stages, max_registers)


def _settings(
    c: Cascade, dims: dict, dtype: str, ints: frozenset, order: tuple[str, ...] | None = None
) -> KernelSettings:
    """A backward kernel's tile-code settings: its dots in the dtype of its first q or k input."""
    exact, acc = exact_dots(dtype)
    first = next((t.name for t in c.inputs if t.layout in (Layout.QUERY, Layout.KEY) and t.name not in ints), None)
    dot = acc if exact or first is None else f"{first}_ptr.dtype.element_ty"
    return KernelSettings(c, dims, dot, exact, acc, ints, order=order, packed_heads=False)


def zeros(g: TileCode, names) -> None:
    """Running sums start at 0, present everywhere (an empty sum adds nothing)."""
    for s in names:
        ranks = tile_axes([r for r in g.c.tensor(s).ranks if r not in PARALLEL], g.kernel.order)
        g.emit(f"v_{s} = tl.zeros([{', '.join(axis_extent(r) for r in ranks)}], dtype={g.kernel.acc})")
        g.env[s] = Tile(f"v_{s}", ranks)


def _tile_ranks(c: Cascade, name: str) -> tuple[str, ...]:
    return tuple(r for r in c.tensor(name).ranks if r not in PARALLEL)


def store(g: TileCode, out: Output, tile: Tile) -> None:
    """Store (or atomically add) ``tile`` into output ``out``, masked to the valid positions."""
    ranks = out.ranks
    t = g.filled(tile, 0.0)
    code = bcast(g.f32(t), t.ranks, ranks)
    if t.ranks != ranks:  # constant along some axis: broadcast it to the whole tile
        code = f"tl.broadcast_to({code}, ({', '.join(axis_extent(r) for r in ranks)},))"
    # a partial per program sits at its batch (a jagged batch's sequence: its programs' key tiles share their
    # indices with the other sequences'); rows and keys at their place in memory
    batch = "off_b" if out.program is not None else "mem_b"
    terms = [f"{out.name}_ptr", f"{batch} * stride_{out.name}_0", f"{out.head} * stride_{out.name}_1"]
    d = 2
    if out.program is not None:
        terms.append(f"{out.program} * stride_{out.name}_2")
        d = 3
    masks = []
    for i, r in enumerate(ranks):
        var = {"m": "mem_m", "n": "mem_n"}.get(r, f"offs_{r}")
        terms.append(f"{bcast(var, (r,), ranks)} * stride_{out.name}_{d + i}")
        cond = {"m": "row_ok", "n": "(offs_n < N)"}.get(r)
        if cond is None and g.extent(r) != g.dims[r]:
            cond = f"(offs_{r} < {g.extent(r)})"
        if cond is not None:
            masks.append(bcast(cond, (r,), ranks))
    mask = f", mask={' & '.join(masks)}" if masks else ""
    if out.atomic:
        g.emit(f"tl.atomic_add({' + '.join(terms)}, {code}{mask})")
    else:
        g.emit(f"tl.store({' + '.join(terms)}, {code}.to({out.name}_ptr.dtype.element_ty){mask})")


def store_diagonal(g: TileCode, out: Output, tile: Tile) -> None:
    """Add the sums along the diagonals of a ``[BLOCK_N, BLOCK_M]`` pair tile into the program's row of ``out``:
    pairs with one j − i read one entry of the table, ``sign·(n − m) + offset``.

    Row j of the tile is rotated left by j (a gather of the tile's own size), so that column c holds the pairs
    of diagonal ``j − i = BLOCK_M·g − c`` for the few groups g = j // BLOCK_M + (wrapped around): one masked sum
    over the keys per group gives BLOCK_M diagonals. The program adds its rows in the order of its query tiles,
    each address once per tile (a barrier between tiles: deterministic)."""
    d = out.diagonal
    assert d is not None, out.name  # only diagonal outputs come here
    t = g.filled(tile, 0.0)
    code = bcast(g.f32(t), t.ranks, KEYS_FIRST[2:])
    if t.ranks != KEYS_FIRST[2:]:
        code = f"tl.broadcast_to({code}, (BLOCK_N, BLOCK_M))"
    x = f"dg_{out.name}"
    ptr = f"{out.name}_ptr + mem_b * stride_{out.name}_0 + {out.head} * stride_{out.name}_1"
    ptr += f" + pid_n * stride_{out.name}_2 + {x}_at * stride_{out.name}_3"
    g.emit(f"{x}_j = tl.arange(0, BLOCK_N)[:, None]")
    g.emit(f"{x}_c = tl.arange(0, BLOCK_M)[None, :]")
    g.emit(f"{x} = tl.gather({code}, ({x}_c + {x}_j) % BLOCK_M, 1)")
    g.emit(f"{x}_g = {x}_j // BLOCK_M + (({x}_c + {x}_j % BLOCK_M) >= BLOCK_M).to(tl.int32)")
    g.emit("tl.debug_barrier()")
    g.emit(f"for {x}_group in tl.static_range(0, (BLOCK_N - 1) // BLOCK_M + 2):")
    g.emit(f"    {x}_sum = tl.sum(tl.where({x}_g == {x}_group, {x}, 0.0), 0)")
    diagonal = f"pid_n * BLOCK_N - start_m + {x}_group * BLOCK_M - tl.arange(0, BLOCK_M)"  # n − m of its pairs
    g.emit(f"    {x}_at = {d.sign} * ({diagonal}) + ({to_triton(d.offset, g.extent_names(d.offset))})")
    g.emit(f"    tl.atomic_add({ptr}, {x}_sum, mask=({x}_at >= 0) & ({x}_at < len_{out.name}), sem='relaxed')")


def _with_key_edge(t: Tile, loaded: bool) -> Tile:
    """A tile over n loaded before the loops, as masked code sees it: keys past N absent (loaded as 0)."""
    if "n" not in t.ranks:
        return t
    present, pranks = presence([t, Tile("", (), "(offs_n < N)", ("n",))], order=KEYS_FIRST)
    return replace(t, present=present, pranks=pranks, fill=0.0 if loaded and t.fill in (None, 0.0) else None)


def tensor_params(c: Cascade, tensors, outputs: tuple[Output, ...]) -> list[str]:
    """The pointer and stride parameters of the input tensors, then of the outputs."""
    args = [a for name in tensors for a in pointer_params(name, len(c.tensor(name).ranks))]
    for o in outputs:
        args += pointer_params(o.name, 2 + (o.program is not None) + len(o.ranks))
        args += [f"len_{o.name}"] if o.diagonal is not None else []
    return args


def _used_inputs(c: Cascade) -> tuple[str, ...]:
    used = {r.tensor for e in c.einsums for r in e.reads()}
    return tuple(t.name for t in c.inputs if t.name in used)


def lower_rows(c: Cascade, outputs: tuple[Output, ...], dims: dict, dtype: str, ints: frozenset) -> BackwardKernel:
    """The rows kernel: every Einsum of ``c`` (none iterates n) for BLOCK_M rows, then the stores."""
    g = _settings(c, dims, dtype, ints).section(masked=True, row_edge=True)
    for e in c.einsums:
        g.einsum(e)
    for o in outputs:
        store(g, o, g.env[o.name])
    tensors = _used_inputs(c)
    args = tensor_params(c, tensors, outputs) + [param_name(p.name) for p in c.params]
    name = kernel_name(c, dims, dtype, kind="bwd_rows")
    names = dim_names(dims)
    text = render(
        "attention_bwd_rows.py.jinja",
        cascade_key=c.key,
        variant=c.name,
        notation=notation(c),
        kernel=name,
        args=",\n    ".join(args),
        constexprs=[f"D_{r}" for r in names],
        dim_offsets=[(r, f"D_{r}") for r in names],
        body="\n".join(g.lines),
    )
    return BackwardKernel(
        name, text, tensors, outputs, tuple(p.name for p in c.params), tuple((f"D_{r}", dims[r]) for r in names)
    )


def _feeds(s: Looped, outputs: set[str]) -> dict[str, set[str]]:
    """For each tensor, the outputs computed from it."""
    out: dict[str, set[str]] = {}
    for e in reversed(s.cascade.einsums):
        mine = out.setdefault(e.out, set()) | ({e.out} & outputs)
        out[e.out] = mine
        for r in e.reads():
            if not r.prev:
                out.setdefault(r.tensor, set()).update(mine)
    return out


def _group_level(s: Looped, outputs: dict[str, Output], group_sums: set[str]) -> set[str]:
    """The sums and epilogue values a dK/dV program may add up over the query heads of its GQA group: they feed
    only gradients of key-layout inputs (``group_sums``), and linearly (sums of them)."""
    feeds = _feeds(s, set(outputs))
    epi = {e.out: e for e in s.epilogue}

    def linear(x) -> bool:  # a sum of reads, each perhaps scaled by a rank-free factor
        if isinstance(x, Read):
            return True
        if x.op == "add":
            return all(linear(a) for a in x.args)
        return x.op == "mul" and any(linear(a) and rank_free(b) for a, b in (x.args, x.args[::-1]))

    level = {x for x in s.sums if feeds.get(x) and feeds[x] <= group_sums}
    level |= {
        n
        for n, e in epi.items()
        if feeds.get(n) and feeds[n] <= group_sums and e.reduce is None and e.where is None and linear(e.expr)
    }
    while True:
        drop = {r.tensor for e in s.epilogue if e.out not in level for r in e.reads() if r.tensor in level}
        drop |= {
            n
            for n in level
            if n in epi and any(r.tensor not in level and r.tensor in set(s.sums) | set(epi) for r in epi[n].reads())
        }
        if not drop:
            return level
        level -= drop


def lower_kv(
    s: Looped,
    outputs: dict[str, Output],
    group_sums: set[str],
    dims: dict,
    dtype: str,
    ints: frozenset,
    states_full: frozenset,
    full_mask: frozenset | None,
) -> BackwardKernel:
    """The dK/dV kernel of a cascade streamed over m. ``group_sums``: gradients of key-layout inputs, summed over
    the query heads of a GQA group in the program where the cascade allows (the rest are stored per query head)."""
    c = s.cascade
    kernel = _settings(c, dims, dtype, ints, KEYS_FIRST)
    level = _group_level(s, outputs, group_sums)
    outputs = {
        n: replace(o, head="off_hk" if n in level else o.head, ranks=tile_axes(o.ranks, KEYS_FIRST))
        for n, o in outputs.items()
    }
    # per pair, added atomically, or summed along diagonals
    per_tile = {n for n, o in outputs.items() if "m" in o.ranks or o.diagonal is not None}
    plan = query_plan(c, s.loop, frozenset(per_tile))

    # key-side loads: before the group loop if they do not depend on the query head, else per head
    pro = kernel.section(masked=False, edge_loads=True)
    zeros(pro, [x for x in s.sums if x in level])
    head_pro = kernel.section(env=pro.env, loads=pro.loads, masked=False, edge_loads=True)
    for e in s.loop + s.prologue:
        for r in pro.input_reads(e):
            decl = c.tensor(r.tensor)
            if "m" not in {x.name for i in r.index for x in i.free_symbols}:
                per_head = "h" in decl.ranks and decl.layout is not Layout.KEY
                (head_pro if per_head else pro).load(r)
    head_pro.env.update(pro.env)
    head_pro.loads.update(pro.loads)
    for e in s.prologue:
        head_pro.einsum(e)
    zeros(head_pro, [x for x in s.sums if x not in level])

    loops = []
    for kr in plan.ranges:
        full = _states_present(kr, full_mask)
        skip = set(kr.skip) | (set(states_full) if full else set())
        # masked code sees the keys past N of the tiles loaded before the loops as absent
        env = {k: (_with_key_edge(v, False) if kr.masked and k not in s.sums else v) for k, v in head_pro.env.items()}
        loads = {k: (_with_key_edge(v, True) if kr.masked else v) for k, v in head_pro.loads.items()}
        tile_loop = kernel.section(env=env, loads=loads, masked=kr.masked, skip=skip, row_edge=True)
        for x in s.sums:
            tile_loop.emit(f"v_{x}_prev = v_{x}")
        for e in s.loop:
            if e.out in per_tile:
                t = tile_loop.value(e)
                (store if outputs[e.out].diagonal is None else store_diagonal)(tile_loop, outputs[e.out], t)
            else:
                tile_loop.einsum(e)
        loops.append(kr.slots(tile_loop.lines))
    head_epi = kernel.section(env=head_pro.env, loads=head_pro.loads, masked=False)
    epi = kernel.section(env=pro.env, loads=pro.loads, masked=False)
    for e in s.epilogue:
        (epi if e.out in level else head_epi).einsum(e)
    for n, o in outputs.items():
        if n not in per_tile:
            g = epi if n in level else head_epi
            store(g, o, g.env[n])

    tensors = _used_inputs(c)
    outs = tuple(outputs.values())
    args = tensor_params(c, tensors, outs) + [param_name(p.name) for p in c.params]
    name = kernel_name(c, dims, dtype, kind="bwd_kv")
    names = dim_names(dims)
    text, body = _module_and_body(
        "attention_bwd_kv.py.jinja",
        cascade_key=c.key,
        variant=c.name,
        notation=notation(c),
        kernel=name,
        args=",\n    ".join(args),
        constexprs=[f"D_{r}" for r in names],
        dim_offsets=[(r, f"D_{r}") for r in names],
        prologue="\n".join(pro.lines),
        tile_setup=plan.setup,
        head_prologue="\n".join(head_pro.lines),
        query_loops=loops,
        head_epilogue="\n".join(head_epi.lines),
        epilogue="\n".join(epi.lines),
    )
    return BackwardKernel(
        name,
        text,
        tensors,
        outs,
        tuple(p.name for p in c.params),
        tuple((f"D_{r}", dims[r]) for r in names),
        plan.ranges,
        body=body,
    )


def lower_q(
    s: Looped,
    outputs: dict[str, Output],
    dims: dict,
    dtype: str,
    ints: frozenset,
    states_full: frozenset,
    full_mask: frozenset | None,
    kind: str = "q",
) -> BackwardKernel:
    """The dQ kernel of a cascade streamed over n, through the forward's one-pass template (or, ``kind``
    "keys", the keys kernel, which computes the key terms the same way)."""
    c = s.cascade
    kernel = _settings(c, dims, dtype, ints)
    keys = key_plan(c, s.loop)
    pro = kernel.section(masked=False)
    zeros(pro, s.sums)
    for e in s.loop:
        for r in pro.input_reads(e):
            if "n" not in {x.name for i in r.index for x in i.free_symbols}:
                pro.load(r)
    for e in s.prologue:
        pro.einsum(e)
    # on tiles the whole mask holds on, every row saw a key, so the saved states are present there: prologue
    # values computed from them are computed once more, without their presence, for those tiles
    full_env = pro.env
    if states_full and any(_states_present(kr, full_mask) for kr in keys.ranges):
        saved = {e.out for e in s.prologue if e.where is not None and set(conjuncts(e.where)) <= states_full}
        again = [e for e in s.prologue if e.out in saved or c.depends_on(e.out, saved)]
        if again:
            pro2 = kernel.section(env=pro.env, loads=pro.loads, masked=False, skip=states_full, prefix="u_")
            for e in again:
                pro2.einsum(e)
            pro.lines += pro2.lines
            full_env = pro2.env
    loops = []
    for kr in keys.ranges:
        full = _states_present(kr, full_mask)
        tile_loop = kernel.section(
            env=full_env if full else pro.env,
            loads=pro.loads,
            masked=kr.masked,
            skip=set(kr.skip) | (set(states_full) if full else set()),
        )
        for x in s.sums:
            tile_loop.emit(f"v_{x}_prev = v_{x}")
        for e in s.loop:
            tile_loop.einsum(e)
        loops.append(kr.slots(tile_loop.lines))
    epi = kernel.section(env=pro.env, loads=pro.loads, masked=False)
    for e in s.epilogue:
        epi.einsum(e)
    for n, o in outputs.items():
        store(epi, o, epi.env[n])
    tensors = _used_inputs(c)
    outs = tuple(outputs.values())
    args = tensor_params(c, tensors, outs)
    if keys.lists is not None:
        args += ["tiles_ptr"] + [f"stride_tiles_{d}" for d in range(3)]
        args += ["counts_ptr"] + [f"stride_counts_{d}" for d in range(3)]
    args += [param_name(p.name) for p in c.params]
    name = kernel_name(c, dims, dtype, kind=f"bwd_{kind}")
    names = dim_names(dims)
    text, body = _module_and_body(
        "attention_fwd.py.jinja",
        cascade_key=c.key,
        variant=c.name,
        notation=notation(c),
        kernel=name,
        helpers=helpers(c),
        args=",\n    ".join(args),
        constexprs=[f"D_{r}" for r in names],
        dim_offsets=[(r, f"D_{r}") for r in names],
        prologue="\n".join(pro.lines),
        passes=[dict(start=[], tile_setup=keys.setup, key_loops=loops)],
        epilogue="\n".join(epi.lines),
    )
    return BackwardKernel(
        name,
        text,
        tensors,
        outs,
        tuple(p.name for p in c.params),
        tuple((f"D_{r}", dims[r]) for r in names),
        keys.ranges,
        keys.lists,
        body=body,
    )


def _module_and_body(template: str, **slots) -> tuple[str, str]:
    """A kernel's module, and its function alone (given its program ids) for the one-launch kernel."""
    return render(template, entry=True, **slots), render(template, entry=False, **slots)


def lower_one_launch(kv: BackwardKernel, q: BackwardKernel, kv_cascade: Cascade, q_cascade: Cascade) -> BackwardKernel:
    """The kernel that runs the dK/dV kernel ``kv`` and the dQ kernel ``q`` in one launch: their functions,
    called with each one's arguments (renamed kv_* and dq_*), the runtime ones first."""
    runtime = [*("kv_" + a for a in kv.signature.runtime), *("dq_" + a for a in q.signature.runtime)]
    constexpr = [*("kv_" + a for a in kv.signature.constexpr), *("dq_" + a for a in q.signature.constexpr)]
    # named by both kernels: a dK/dV kernel may pair with dQ kernels of several cuts (gradients wanted)
    variant, *rest = kv.name.split("__")[1:]
    name = "__".join(["attn_bwd", variant.removesuffix("_kv"), source_digest(kv.name + q.name)[:8], *rest[1:]])
    text = render(
        "attention_bwd.py.jinja",
        cascade_key=f"{kv_cascade.key} and {q_cascade.key}",
        variant=f"{kv_cascade.name}, {q_cascade.name}",
        notation=notation(kv_cascade) + "\n#\n" + notation(q_cascade),
        helpers=helpers(q_cascade),
        kv_body=kv.body,
        q_body=q.body,
        runtime=runtime,
        constexprs=constexpr,
        kernel=name,
        kv_fn=kv.name,
        q_fn=q.name,
        kv_call=", ".join("kv_" + a for a in kv.signature.names),
        q_call=", ".join("dq_" + a for a in q.signature.names),
    )
    return BackwardKernel(name, text, (), kv.outputs + q.outputs, (), ())


def _states_present(kr: KeyRange, full_mask: frozenset | None) -> bool:
    """Whether every row of every tile of a range saw a key: the range is unmasked and every conjunct of the
    forward's mask (``full_mask``; None when no single mask governs the forward) holds on its tiles."""
    return full_mask is not None and not kr.masked and full_mask <= set(kr.skip)
