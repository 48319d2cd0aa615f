"""Triton code for the Einsums of a streamed cascade, one tile at a time.

Every value is a register tile whose axes are its ranks (batch and head are fixed
per program): ``m`` spans BLOCK_M query rows, ``n`` BLOCK_N keys, any other rank
its padded extent ``D_<rank>``. A value may be absent at some positions (masked);
it then carries a boolean ``present`` tile, and ``fill`` says what the absent
positions hold when that is known. Consumers that need a particular fill (a
reduction its identity, a ``tl.dot`` operand zero, a store zero) get a
``tl.where`` only when the value's fill is not already right; values that are
present everywhere (full tiles) never pay for masking.

Presences are related: a row's running maximum is present wherever one of its
scores is. ``TileCode`` records such implications (reductions by any, unions,
conjunctions, copies) and leaves implied conjuncts out of a presence, so that a
masked score tile minus its row maximum is absent exactly where the score is,
holds −inf there, and its exponential holds 0 with no ``tl.where``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace

import sympy

from ...errors import LoweringError
from ...ir.cascade import ATTENTION_INPUTS, Cascade, Einsum, Layout, Reducing, Role, reduces
from ...ir.expr import Call, Const, Coord, Expr, Merge, Param, Read, Size, gathered_entries, index_ranks, reads
from ...ir.operators import OPERATORS, REDUCERS
from ...ir.ranks import PARALLEL, SEQUENCE_RANKS, coord
from ..analysis.mask_tiles import conjuncts
from .range_tests import range_pairs
from .reductions import contraction, dot_groups, reduction
from .tile import (
    FINITE_OPS,
    POSITIVE_PROBES,
    Tile,
    absent_value,
    axis_extent,
    bcast,
    few_values,
    is_finite,
    literal,
    presence,
    tile_axes,
)
from .tile_ranges import to_triton
from .unroll import at_position, instance, instance_name, positions, read_at_position, unrolled_ranks

_IDENTIFIER = re.compile(r"[A-Za-z_]\w*")
_INT_OPS = ("add", "sub", "mul", "floordiv", "mod", "neg", "maximum", "minimum", "where")  # exact on integers


@dataclass(frozen=True)
class KernelSettings:
    """What every code section of one kernel shares: the cascade, head dims, dtypes and tile layout, and the
    counter that keeps its variable names unique across sections. ``section`` makes the sections.

    >>> import einflash as ef
    >>> @ef.attention
    ... def plain(q, k, v):
    ...     return ef.softmax(q @ k * ef.scale, "n") @ v
    >>> k = KernelSettings(plain.forward.rewritten, {"e": 16, "e_extent": 16, "f": 16, "f_extent": 16})
    >>> k.section().fresh("x"), k.section(masked=True).fresh("x")
    ('x_1', 'x_2')
    """

    cascade: Cascade
    dims: dict[str, int]
    dot_dtype: str = "q_ptr.dtype.element_ty"  # what tl.dot operands are converted to
    exact: bool = False  # exact dots: ieee precision, operands in the accumulator type (fp32 and fp64 kernels)
    acc: str = "tl.float32"  # the type values are computed and accumulated in ("f32" tiles; tl.float64 for fp64)
    int_inputs: frozenset = frozenset()  # inputs holding integers (document ids)
    workspaces: frozenset = frozenset()  # split workspaces: [B, H, SPLITS, M(, D)] read at split s_idx
    # a key stage's summaries read by the query stage: [B, H, ...] per program's (sequence, head), with presence
    summaries: frozenset = frozenset()
    # the order of tile axes (None: canonical, m before n); kernels that keep keys and stream queries put n
    # first, so that their dots take key-major tiles as they are (no transpose through shared memory)
    order: tuple[str, ...] | None = None
    packed_heads: bool = True  # rows of a program may belong to several query heads (off_hrow); else off_h
    counter: list = field(default_factory=lambda: [0], compare=False)
    # Einsums over unrolled ranks (unroll.py) -> those ranks: each instance is made where it is first read, in any
    # section of the kernel
    deferred: dict = field(default_factory=dict, compare=False)

    def section(
        self, masked: bool = False, skip=frozenset(), env: dict | None = None, loads: dict | None = None, **options
    ) -> TileCode:
        """A new code section: ``masked`` evaluates mask predicates and the sequence edge (partial tiles),
        ``skip`` names conjuncts proven true on its tiles; ``env`` and ``loads`` are copied in. ``options``:
        ``row_edge``, ``edge_loads``, ``prefix`` (see TileCode)."""
        return TileCode(self, masked, frozenset(skip), dict(env or {}), loads=dict(loads or {}), **options)


@dataclass
class TileCode:
    """Emits Triton statements for Einsums into ``lines``; one instance per code section."""

    kernel: KernelSettings
    masked: bool  # evaluate mask predicates and the sequence edge (partial key tiles)
    skip_predicates: frozenset = frozenset()  # conjuncts proven true on these tiles
    env: dict[str, Tile] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)
    loads: dict = field(default_factory=dict)
    dots: dict = field(default_factory=dict)  # tensor -> (a, b, precision) of a plain tl.dot result
    # rows past M are absent in masked code: kernels that reduce over m (the backward's dK/dV) need them absent,
    # one-pass forwards only never store them
    row_edge: bool = False
    # loads of keys are masked at the end of the keys even in unmasked code (tiles loaded once, before
    # code of both kinds runs), without making keys past N absent
    edge_loads: bool = False
    prefix: str = "v_"  # of the variables Einsums are bound to (two versions of one Einsum need two)
    # presence implications of this section: code -> codes true wherever it is (broadcast along missing axes)
    implications: dict = field(default_factory=dict)
    presence_vars: dict = field(default_factory=dict)  # a presence expression -> the variable first bound to it
    aliases: dict = field(default_factory=dict)  # a presence variable -> the presence it copies
    reduced: dict = field(default_factory=dict)  # (presence, rank) -> its reduction over rank by any

    @property
    def c(self) -> Cascade:
        return self.kernel.cascade

    @property
    def dims(self) -> dict[str, int]:
        return self.kernel.dims

    def fresh(self, base: str) -> str:
        self.kernel.counter[0] += 1
        return f"{base}_{self.kernel.counter[0]}"

    def emit(self, line: str) -> None:
        self.lines.append(line)

    # -- presence ------------------------------------------------------------------------------

    def imply(self, a: str | None, b: str | None) -> None:
        """Record that presence ``a`` holds only where ``b`` does."""
        if a is not None and b is not None and a != b:
            self.implications.setdefault(a, set()).add(b)

    def implies(self, a: str, b: str) -> bool:
        seen, todo = {a}, [a]
        while todo:
            x = todo.pop()
            if x == b:
                return True
            for y in self.implications.get(x, ()):
                if y not in seen:
                    seen.add(y)
                    todo.append(y)
        return False

    def presence(self, tiles, how: str = "&") -> tuple[str | None, tuple[str, ...], set[int]]:
        """Like the module's ``presence``, leaving out parts that others imply (``&``) or that imply
        others (``|``); also returns the indices of the parts kept."""
        tiles = list(tiles)

        def covers(a: str, b: str) -> bool:  # part a makes part b redundant in the combination
            return self.implies(a, b) if how == "&" else self.implies(b, a)

        kept: list[int] = []
        for i, t in enumerate(tiles):
            if t.present is None:
                continue
            others = [j for j, u in enumerate(tiles) if j != i and u.present is not None]
            # of two equivalent parts, the first stays
            if not any(
                covers(tiles[j].present, t.present) and (j in kept or not covers(t.present, tiles[j].present))
                for j in others
            ):
                kept.append(i)
        code, pranks = presence([tiles[i] for i in kept], how, self.kernel.order)
        for i in kept:
            if how == "&":
                self.imply(code, tiles[i].present)
            else:
                self.imply(tiles[i].present, code)
        return code, pranks, set(kept)

    def canonical(self, present: str) -> str:
        while present in self.aliases:
            present = self.aliases[present]
        return present

    def any_of(self, present: str, pranks: tuple[str, ...], rank: str, known: str | None = None) -> str:
        """Presence ``present`` reduced over ``rank`` by any (``present`` implies it), computed once.

        ``known`` is an equivalent test that needs no reduction of its own (a finite maximum's
        result above −inf). A boolean tile's own reduction is dear: its layout is not the dot's.
        """
        key = (self.canonical(present), rank)
        if key not in self.reduced:
            self.reduced[key] = known or f"(tl.max({key[0]}.to(tl.int32), {pranks.index(rank)}) > 0)"
            self.imply(present, self.reduced[key])
        return self.reduced[key]

    # -- leaves -----------------------------------------------------------------------------

    def load(self, r: Read) -> Tile:
        decl = self.c.tensor(r.tensor)
        key = (r.tensor, r.index, r.padded)
        if key in self.loads:
            return self.loads[key]
        # terms of the address: a code, or (rank, stride) for a tile axis, indexed once the tile's axes are known
        offs: list[str | tuple[str, str] | tuple[sympy.Basic, str, tuple[str, ...], str | None]] = []
        masks: list[str] = []
        axes: list[str] = []
        # (axis, in-range condition) where a coordinate indexes a dimension of another rank
        beyond: list[tuple[str, str]] = []
        outside: list[tuple[tuple[str, ...], str]] = []  # (axes, in-range condition) of a padded read's index
        if r.tensor in self.kernel.workspaces:  # memory dims b, h, split, then the ranks after h
            offs.append(f"s_idx * stride_{r.tensor}_2")
        for d, (i, own) in enumerate(zip(r.index, decl.ranks)):
            d += 1 if (r.tensor in self.kernel.workspaces and d >= 2) else 0
            stride = f"stride_{r.tensor}_{d}"
            names = [s.name for s in getattr(i, "free_symbols", ())]
            if len(names) != 1 or i != coord(names[0]):
                # an offset or a constant: the call checked it within the input for every position
                # (reference.bind_extents), so only positions past the tile's edge are masked; a padded read's
                # positions outside the input hold nothing
                at = self.offset_index(r, i, own)
                axes += at
                # q, k and v sit in memory at their sequence's first position (a jagged batch packs them), which
                # an index along their own rank adds to (a shifted read, q[m − 1]); a table's index is its own
                at_start = own if decl.layout in (Layout.QUERY, Layout.KEY) and own in at else None
                offs.append((i, stride, at, at_start))
                if r.padded:
                    outside.append((at, self.within(i, own, at)))
                continue
            rank = names[0]
            if rank in ("b", "h") and r.tensor in self.kernel.summaries:  # kept per sequence and query head
                offs.append(f"off_{rank} * {stride}")
            elif rank == "b":  # the batch in memory: 0 for the sequences of a jagged batch, packed along m and n
                offs.append(f"mem_b * {stride}")
            elif rank == "h" and decl.layout is Layout.KEY:
                offs.append(f"off_hk * {stride}")
            elif rank == "h" and not self.kernel.packed_heads:
                offs.append(f"off_h * {stride}")
            elif rank == "h":  # query heads vary by row when GQA groups are packed into one program
                axes.append("m")
                offs.append(("h", stride))
            else:
                axes.append(rank)
                offs.append((rank, stride))
                if rank != own:  # doc[b, n] read at m: rows past doc's own extent read nothing
                    beyond.append((rank, f"(offs_{rank} < {self.extent_code(own)})"))
        axes_t = tile_axes(axes, self.kernel.order)
        terms = []
        for o in offs:
            if isinstance(o, tuple) and len(o) == 4:
                index, stride, at, at_start = o
                spots = {coord(x): bcast(f"offs_{x}", (x,), axes_t) for x in at}
                # a gathered entry (bucket(n − m)): its own load, an integer tile along its index's axes
                for f, read in gathered_entries(index):
                    entry = self.load(read)
                    if entry.dtype != "int":
                        raise LoweringError(f"an index gathers through {read.tensor}, which must hold integers")
                    spots[f] = bcast(entry.code, entry.ranks, axes_t)
                try:
                    position = to_triton(index, spots | self.extent_names(index))
                    if at_start is not None:  # mem − offs: the sequence's first position in memory (0 unless jagged)
                        first = f"(mem_{at_start} - offs_{at_start})"
                        position = f"({bcast(first, (at_start,), axes_t)} + {position})"
                    terms.append(f"{position} * {stride}")
                except ValueError:
                    raise LoweringError(
                        f"{r.tensor} is read at index {index}; the kernels compute integer +, −, ×, // and % in an "
                        f"index"
                    ) from None
            elif isinstance(o, tuple):
                rank, stride = o
                axis = "m" if rank == "h" else rank
                # rows and keys in memory (mem_m, mem_n) are shifted to the sequence's first one in a jagged batch
                var = "off_hrow" if rank == "h" else f"mem_{rank}" if rank in ("m", "n") else f"offs_{rank}"
                terms.append(f"{bcast(var, (axis,), axes_t)} * {stride}")
            else:
                terms.append(o)
        absent = []  # (axis, condition) of positions that hold no element: loaded as 0, and absent
        for rank in axes_t:
            cond = self.bound(rank)
            if cond is None and rank == "n" and self.edge_loads:
                masks.append(bcast("(offs_n < N)", (rank,), axes_t))
            if cond is not None:
                masks.append(bcast(cond, (rank,), axes_t))
                if rank != "m" or (self.row_edge and self.masked):
                    absent.append((rank, cond))
        for rank, cond in beyond:
            masks.append(bcast(cond, (rank,), axes_t))
            absent.append((rank, cond))
        for along, cond in outside:
            masks.append(bcast(cond, along, axes_t) if along else cond)
        ptr = " + ".join([f"{r.tensor}_ptr"] + terms)  # no terms: a 0-d tensor (a learnable scalar)
        name = self.fresh(f"ld_{r.tensor}")
        if masks:
            self.emit(f"{name} = tl.load({ptr}, mask={' & '.join(masks)}, other=0)")
        else:
            self.emit(f"{name} = tl.load({ptr})")
        # keys past the end, padded head-dimension positions and reads past a dimension's end are absent
        pranks = tile_axes([x for x, _ in absent] + [x for along, _ in outside for x in along], self.kernel.order)
        conds = [bcast(cond, (x,), pranks) for x, cond in absent]
        conds += [bcast(cond, along, pranks) if along else cond for along, cond in outside]
        present = " & ".join(conds) or None
        if len(conds) > 1:  # one expression: it is indexed to broadcast against other tiles
            present = f"({present})"
        # q, k and v are taken to be finite (as every attention kernel does); an extra input (a bias) may
        # hold −inf on purpose
        t = Tile(
            name,
            axes_t,
            present,
            pranks,
            0.0 if present else None,
            dtype="int" if r.tensor in self.kernel.int_inputs else "in" if r.tensor in ATTENTION_INPUTS else "declared",
            finite=decl.layout in (Layout.QUERY, Layout.KEY) or r.tensor in self.kernel.int_inputs,
        )
        # a summary of the keys (a key stage's, or a split's partial one) is absent where its keys were none:
        # its presence lies at the same positions (with the same strides, or with those of its own tensor)
        if r.tensor in self.kernel.summaries:
            t = Tile(name, axes_t, self._present(ptr, masks, r.tensor, f"present_{r.tensor}"), axes_t, 0.0, "f32")
        elif r.tensor in self.kernel.workspaces and "m" not in decl.ranks:
            flags = ptr.replace(f"stride_{r.tensor}_", f"stride_wsp_{r.tensor}_")
            t = Tile(name, axes_t, self._present(flags, masks, r.tensor, f"wsp_{r.tensor}"), axes_t, None, "f32")
        elif r.tensor in self.kernel.workspaces:  # a split that saw no key of a row left that row absent
            pres = self.fresh(f"ldp_{r.tensor}")
            self.emit(
                f"{pres} = tl.load(wsp_{r.tensor}_ptr + off_b * stride_wsp_{r.tensor}_0 + off_hrow * "
                f"stride_wsp_{r.tensor}_1 + s_idx * stride_wsp_{r.tensor}_2 + offs_m * stride_wsp_{r.tensor}_3,"
                f" mask=row_ok, other=0) != 0"
            )
            t = Tile(name, axes_t, pres, ("m",), None, "f32")
        self.loads[key] = t
        return t

    def _present(self, ptr: str, masks: list[str], tensor: str, flags: str) -> str:
        """Load the presence flags ``flags`` at the address ``ptr`` of ``tensor``'s element; their variable."""
        pres = self.fresh(f"ldp_{tensor}")
        where = f", mask={' & '.join(masks)}, other=0" if masks else ""
        self.emit(f"{pres} = tl.load({ptr.replace(f'{tensor}_ptr', f'{flags}_ptr', 1)}{where}) != 0")
        return pres

    def within(self, index, own: str, along: tuple[str, ...]) -> str:
        """The test that ``index`` (over the tile axes ``along``) lies within its input dimension's extent."""
        if own not in ("m", "n") and f"{own}_extent" not in self.dims:
            raise LoweringError(
                f"a value recomputed at shifted positions reads a table at {index}, outside which it would find "
                f"nothing; the kernels do not know a table's extent: read it where the value itself is read"
            )
        spots = {coord(x): bcast(f"offs_{x}", (x,), along) for x in along}
        at = to_triton(index, spots | self.extent_names(index))
        return f"((({at}) >= 0) & (({at}) < {self.extent_code(own)}))"

    def input_reads(self, e: Einsum) -> list[Read]:
        """The inputs ``e`` reads, at every position of its unrolled ranks."""
        ranks = unrolled_ranks(e, self.c)
        try:
            every = positions(ranks, self.dims, e.out) if ranks else [{}]
        except LoweringError as err:
            raise type(err)(str(err), self.c.where(e)) from None
        out = []
        for at in every:
            out += [read_at_position(r, at) for r in e.reads() if self.c.tensor(r.tensor).role is Role.INPUT]
        return out

    def offset_index(self, r: Read, index, own: str) -> tuple[str, ...]:
        """The tile axes an input's index other than its own coordinate runs along (``rel[n − m + M − 1]``:
        m and n); raises LoweringError for an index along other ranks."""
        gathers = gathered_entries(index)
        along = set(index_ranks((index.subs({f: 0 for f, _ in gathers}),)))
        for _, read in gathers:  # an entry an index gathers runs along the axes its own read does
            along |= set(self.load(read).ranks)
        at = tuple(sorted(along))
        where = f"{r.tensor} is read at index {index} for its rank {own}"
        if own in PARALLEL:
            raise LoweringError(f"{where}; batch and head are read only at their own coordinates")
        if not set(at) <= {"m", "n"}:
            raise LoweringError(f"{where}; an index may use the query and key positions m and n only")
        return at

    def extent_names(self, index) -> dict:
        """Code of the extents and parameters an index names: M and N as the kernel has them, others' sizes."""
        names = {}
        coords = {coord(x) for x in index_ranks((index,))}
        for x in index.free_symbols - coords:
            rank = next((q.name for q in self.c.ranks if q.extent == x), None)
            param = next((p for p in self.c.params if p.name == str(x)), None)
            if rank is not None:
                names[x] = self.extent_code(rank)
            elif param is not None and param.integer:
                names[x] = f"p_{param.name}"
            else:
                raise LoweringError(
                    f"an index names {x}, which is not an extent or an integer parameter (declare it `{x}: int`)"
                )
        return names

    def bound(self, rank: str) -> str | None:
        """The in-range condition of a tile axis, or None where it always holds."""
        if rank == "m":
            # the dK/dV kernel's unmasked query tiles are whole ones (tile_ranges.query_plan): every row is below M
            return None if self.row_edge and not self.masked else "row_ok"
        if rank == "n":
            return "(offs_n < N)" if self.masked else None
        extent = self.extent(rank)
        return None if extent == self.dims[rank] else f"(offs_{rank} < {extent})"

    def extent_code(self, rank: str) -> str:
        """A rank's extent as the kernel has it: M and N (per sequence in a jagged batch), the others' sizes."""
        return {"m": "M", "n": "N"}.get(rank) or str(self.extent(rank))

    def extent(self, rank: str) -> int:
        return self.dims[f"{rank}_extent"]

    def leaf(self, x: Expr) -> Tile:
        if isinstance(x, Const):
            integral = math.isfinite(x.value) and float(x.value).is_integer()
            return Tile(
                literal(x.value),
                (),
                fill=x.value,
                values=(x.value,),
                finite=math.isfinite(x.value),
                int_code=str(int(x.value)) if integral else None,
            )
        if isinstance(x, Param):
            decl = next(p for p in self.c.params if p.name == x.name)
            # a positive parameter is checked to be positive and finite at call time
            return Tile(
                f"p_{x.name}",
                (),
                values=POSITIVE_PROBES if decl.positive else None,
                finite=decl.positive or decl.integer,
                int_code=f"p_{x.name}" if decl.integer else None,
            )
        if isinstance(x, Size):
            size = self.extent_code(x.rank)
            return Tile(
                f"{size} * 1.0" if self.kernel.acc == "tl.float32" else f"tl.cast({size}, {self.kernel.acc})",
                (),
                finite=True,
                int_code=size,
            )
        if isinstance(x, Coord):
            if x.rank == "h":
                return (
                    Tile("off_hrow", ("m",), dtype="int", finite=True)
                    if self.kernel.packed_heads
                    else Tile("off_h", (), dtype="int", finite=True)
                )
            if x.rank == "b":
                return Tile("off_b", (), dtype="int", finite=True)
            return Tile(f"offs_{x.rank}", (x.rank,), dtype="int", finite=True)
        if isinstance(x, Read):
            if x.prev:
                t = self.env[x.tensor]
                return replace(t, code=f"{t.code}_prev", present=None if t.present is None else f"{t.present}_prev")
            if self.c.tensor(x.tensor).role is Role.INPUT:
                return self.load(x)
            if x.tensor in self.kernel.deferred:
                return self.instance_of(x)
            if tuple(x.index) != tuple(coord(r) for r in self.c.tensor(x.tensor).ranks):
                gathered = self.gather(x) or self.pick(x)
                if gathered is not None:
                    return gathered
                raise LoweringError(
                    f"{x.tensor} is read at index {x.index}; the one-pass template reads "
                    f"intermediates only at their own coordinates"
                )
            return self.env[x.tensor]
        raise TypeError(x)

    def instance_of(self, x: Read) -> Tile:
        """The instance of a deferred Einsum that ``x`` reads (its unrolled ranks at constants), made on first use."""
        e, ranks = self.kernel.deferred[x.tensor]
        at = {}
        for rank, i in zip(self.c.tensor(x.tensor).ranks, x.index):
            i = sympy.sympify(i)
            if rank in ranks and i.is_Integer:
                at[rank] = int(i)
            elif i != coord(rank):
                raise LoweringError(
                    f"{x.tensor} is read at index {x.index}; the kernels read a value over unrolled ranks at their "
                    f"positions, its other ranks at their own coordinates"
                )
        name = instance_name(x.tensor, at)
        if name not in self.env:
            self.einsum(instance(e, at))
        return self.env[name]

    def gather(self, x: Read) -> Tile | None:
        """A computed tile over a sequence rank and a rank held whole, read at the held rank's position computed from
        the other sequence rank (MoBA's routing ``sel[m, n // block]``): ``tl.gather`` along the held rank, absent
        where the position is outside its extent. None for any other index."""
        src = self.env.get(x.tensor)
        moved = self.moved(x)
        if src is None or len(moved) != 1 or len(src.ranks) != 2 or moved[0][0] not in src.ranks:
            return None
        held, index = moved[0]
        (own,) = [r for r in src.ranks if r != held]
        along = tuple(sorted(index_ranks((index,))))
        out = tile_axes((own, *along), self.kernel.order)
        if held in ("m", "n") or own not in ("m", "n") or along not in (("m",), ("n",)) or along == (own,):
            return None
        if out != (own, *along) or src.ranks.index(held) != 1:
            raise LoweringError(f"{x.tensor} is gathered at {index} in a kernel that holds its tiles transposed")
        at = self.fresh(f"at_{x.tensor}")
        spots = {coord(a): bcast(f"offs_{a}", (a,), out) for a in along}
        self.emit(
            f"{at} = {to_triton(index, spots | self.extent_names(index))} + {bcast(f'(offs_{own} * 0)', (own,), out)}"
        )
        inside = f"(({at} >= 0) & ({at} < {self.extent(held)}))"
        clamped = f"tl.minimum(tl.maximum({at}, 0), {self.dims[held] - 1})"

        def take(code: str, boolean: bool) -> str:
            name = self.fresh(f"g_{x.tensor}")
            value = f"{code}.to(tl.int8)" if boolean else code
            self.emit(f"{name} = tl.gather({value}, {clamped}, 1){' != 0' if boolean else ''}")
            return name

        code = take(src.code if src.dtype not in ("in", "declared") else self.f32(src), src.dtype == "bool")
        if src.dtype == "bool":  # false outside, as a predicate on absent data is, wherever it is tested
            code = f"({code} & {inside})"
        present = inside
        if src.present is not None:
            shape = ", ".join(axis_extent(r) for r in src.ranks)  # gathered along the held rank: the whole tile
            full = (
                src.present
                if src.pranks == src.ranks
                else f"tl.broadcast_to({bcast(src.present, src.pranks, src.ranks)}, ({shape}))"
            )
            present = f"({inside} & {take(full, True)})"
        return replace(src, code=code, ranks=out, present=present, pranks=out, values=None)

    def pick(self, x: Read) -> Tile | None:
        """A computed tile read at constant positions of ranks it holds whole (a top list's k-th entry,
        ``top[m, k − 1]``): each such axis selected and summed away. None for any other index."""
        src = self.env.get(x.tensor)
        moved = self.moved(x)
        if (
            src is None
            or not moved
            or any(
                not i.is_Integer or r not in src.ranks or r in ("m", "n") or not 0 <= int(i) < self.extent(r)
                for r, i in moved
            )
        ):
            return None
        code, ranks = self.f32(src), src.ranks
        present, pranks = src.present, src.pranks
        for r, i in moved:
            code = f"tl.sum(tl.where({bcast(f'(offs_{r} == {int(i)})', (r,), ranks)}, {code}, 0.0), {ranks.index(r)})"
            if present is not None and r in pranks:
                at = bcast(f"(offs_{r} == {int(i)})", (r,), pranks)
                present = f"(tl.sum(tl.where({at}, {present}, False).to(tl.int32), {pranks.index(r)}) > 0)"
                pranks = tuple(y for y in pranks if y != r)
            ranks = tuple(y for y in ranks if y != r)
        return Tile(code, ranks, present, pranks, src.fill if present is not None else None, "f32")

    def moved(self, x: Read) -> list[tuple[str, sympy.Expr]]:
        """The ranks of the tensor ``x`` reads that it reads at other than their own coordinates, with the index."""
        return [(r, sympy.sympify(i)) for r, i in zip(self.c.tensor(x.tensor).ranks, x.index) if i != coord(r)]

    def unrouted(self, where: Expr) -> tuple[Read, str] | None:
        """A test, on the key tile at ``start_n``, that no row of the query tile passes a conjunct of ``where`` that
        reads a computed routing row at the key's block (MoBA's ``sel[m, n // block]``), with that conjunct: a tile
        it holds has no pair there. None where ``where`` has no such conjunct."""
        for p in conjuncts(where):
            if not isinstance(p, Read) or p.tensor not in self.env:
                continue
            src = self.env[p.tensor]
            moved = self.moved(p)
            if src.dtype != "bool" or src.ranks[:1] != ("m",) or len(src.ranks) != 2 or len(moved) != 1:
                continue
            held, index = moved[0]
            num, _ = sympy.fraction(sympy.together(index.args[0])) if isinstance(index, sympy.floor) else (None, None)
            if held != src.ranks[1] or num != coord("n"):
                continue
            # floor(n / block) is monotone in n: the tile's blocks lie between those of its first and last key
            ends = [
                to_triton(index, {coord("n"): at} | self.extent_names(index))
                for at in ("start_n", "(tl.minimum(start_n + BLOCK_N, N) - 1)")
            ]
            lo, hi = f"tl.minimum({ends[0]}, {ends[1]})", f"tl.maximum({ends[0]}, {ends[1]})"
            routed = src.code if src.present is None else f"({src.code} & {bcast(src.present, src.pranks, src.ranks)})"
            inside = f"(offs_{held} >= {lo}) & (offs_{held} <= {hi})"
            return p, f"(tl.max(tl.where(({inside})[None, :], {routed}.to(tl.int32), 0)) == 0)"
        return None

    # -- expressions ---------------------------------------------------------------------------

    def f32(self, t: Tile) -> str:
        return f"{t.code}.to({self.kernel.acc})" if t.dtype in ("in", "declared", "int") else t.code

    def expr(self, x: Expr) -> Tile:
        if not isinstance(x, Call):
            return self.leaf(x)
        args = [self.expr(a) for a in x.args]
        op = OPERATORS[x.op]
        ranks = tile_axes((r for a in args for r in a.ranks), self.kernel.order)
        if x.merge is Merge.ANY:
            return self.any_merge(x.op, args, ranks)
        # integer coordinates, extents, integral constants and integer parameters: exact integer arithmetic, and
        # comparisons of integers as integers
        integral = all(a.dtype in ("int", "bool") or a.int_code is not None for a in args)
        exact = x.op in _INT_OPS and integral and not all(a.values is not None for a in args)
        as_ints = exact or (op.boolean and integral and x.op not in ("and", "or", "not"))
        # a smaller operand that may be absent is made finite (cheap: it is smaller), so the
        # result's value at absent positions follows from the larger operand's fill alone
        args = [
            self.filled(a, 0.0) if a.present is not None and a.ranks != ranks and not is_finite(a.fill) else a
            for a in args
        ]
        if op.boolean and x.op in ("and", "or", "not"):  # the operands of a logical op as truth values
            args = [self.truth(a) for a in args]
        codes = []
        for a in args:
            if as_ints and a.int_code is not None:
                code = a.int_code
            elif a.dtype == "bool" or (a.dtype == "int" and as_ints):
                code = a.code
            else:
                code = self.f32(a)
            codes.append(bcast(code, a.ranks, ranks) if a.ranks else code)
        present, pranks, kept = self.presence(args)
        fill = absent_value(x.op, args, kept, self.implies) if present is not None else None
        if exact and op.triton_int:
            code = op.triton_int.format(*codes)
        else:
            code = (op.triton_fp32 if self.kernel.exact and op.triton_fp32 else op.triton).format(*codes)
        dtype = "bool" if op.boolean else "int" if exact else "f32"
        if dtype == "f32" and self.kernel.acc != "tl.float32" and x.op in ("where", "sign"):
            code = f"({code}).to({self.kernel.acc})"  # a selection between literals is fp32 in Triton
        if op.boolean and present is not None:  # a predicate on absent data is false
            code, present, pranks = f"({code} & {bcast(present, pranks, ranks)})", None, ()
        values = few_values(x.op, args) if present is None and dtype == "f32" else None
        finite = all(a.finite for a in (args[1:] if x.op == "where" else args)) and (
            x.op in FINITE_OPS or (x.op == "div" and args[1].values is not None and 0.0 not in args[1].values)
        )
        return Tile(code, ranks, present, pranks, fill, dtype, values, finite)

    def truth(self, t: Tile) -> Tile:
        """``t`` as a truth value (nonzero is true, as Python's ``and`` and ``|`` of a bool parameter take it); a
        constant becomes True or False."""
        if t.dtype == "bool":
            return t
        if t.values is not None and len(t.values) == 1 and t.present is None and not t.ranks:
            return Tile("True" if t.values[0] else "False", (), dtype="bool")
        code = t.code if t.dtype == "int" else self.f32(t)
        return replace(t, code=f"({code} != 0)", dtype="bool", values=None, fill=None, int_code=None)

    def any_merge(self, op: str, args: list[Tile], ranks) -> Tile:
        a, b = args
        ident = {"mul": 1.0, **{r.combine: r.identity for r in REDUCERS.values() if r.combine}}.get(op)
        code = OPERATORS[op].triton.format(bcast(self.f32(a), a.ranks, ranks), bcast(self.f32(b), b.ranks, ranks))
        finite = a.finite and b.finite and op in FINITE_OPS
        if a.present is None and b.present is None:
            return Tile(code, ranks, finite=finite)
        if ident is not None and all(t.present is None or t.fill == ident for t in (a, b)):
            value = code  # absent operands already hold the identity
        else:
            pa = bcast(a.present, a.pranks, ranks) if a.present else "True"
            pb = bcast(b.present, b.pranks, ranks) if b.present else "True"
            value = (
                f"tl.where({pa} & {pb}, {code}, tl.where({pa}, {bcast(self.f32(a), a.ranks, ranks)}, "
                f"{bcast(self.f32(b), b.ranks, ranks)}))"
            )
        if a.present is None or b.present is None:
            return Tile(value, ranks, finite=finite)
        present, pranks, _ = self.presence((a, b), "|")
        return Tile(value, ranks, present, pranks, ident, finite=finite)

    def filled(self, t: Tile, value: float) -> Tile:
        """``t`` with its absent positions set to ``value`` (a no-op when they already are)."""
        if t.present is None or t.fill == value:
            return t
        name = self.fresh("f")
        self.emit(f"{name} = tl.where({bcast(t.present, t.pranks, t.ranks)}, {self.f32(t)}, {literal(value)})")
        return replace(t, code=name, fill=value, dtype="f32")

    def bind(self, name: str, t: Tile, evaluate: bool = True) -> Tile:
        """Assign a tile to a variable (and its presence to another) so later uses are cheap.

        With ``evaluate`` False the value stays an unevaluated expression (its presence is still bound):
        for a product whose only consumer adds it into an accumulator inside ``tl.dot``.
        """
        var = f"{self.prefix}{name}"
        if evaluate:
            self.emit(f"{var} = {t.code}")
        present = None
        if t.present is not None:
            present = f"{var}_p"
            # one presence computed once: a later tile present at the same positions copies the variable
            source = self.presence_vars.get(t.present, t.present)
            self.emit(f"{present} = {source}")
            self.presence_vars.setdefault(t.present, present)
            if _IDENTIFIER.fullmatch(source):
                self.aliases[present] = source
            self.imply(present, t.present)
            self.imply(t.present, present)
        out = replace(t, code=var if evaluate else t.code, present=present)
        self.env[name] = out
        return out

    def only_accumulated(self, name: str) -> bool:
        """Whether the one consumer of ``name`` is an update ``S = X +∪ name`` (see :meth:`accumulate`)."""
        users = self.c.consumers(name)
        if len(users) != 1 or name in self.c.outputs:
            return False
        x = users[0].expr
        return (
            users[0].reduce is None
            and isinstance(x, Call)
            and x.op == "add"
            and x.merge is Merge.ANY
            and x.args[1] == Read(name, tuple(coord(r) for r in self.c.tensor(name).ranks))
            and all(r.tensor != name for r in reads(x.args[0]))
        )

    # -- Einsums -------------------------------------------------------------------------------

    def einsum(self, e: Einsum) -> Tile | None:
        """``e`` as tile code (None for one over unrolled ranks, whose instances are made where they are read); a
        LoweringError raised on the way names ``e``'s line of the declaration."""
        try:
            return self._einsum(e)
        except LoweringError as err:
            if err.where is not None or self.c.where(e) in str(err):
                raise
            raise type(err)(str(err), self.c.where(e)) from None

    def value(self, e: Einsum) -> Tile:
        """``e`` as tile code, for a caller that keeps its tile (a running state, a stored result): one over
        unrolled ranks has none, and is refused."""
        t = self.einsum(e)
        if t is None:
            raise LoweringError(
                f"{e.out} has ranks the kernels unroll ({', '.join(self.kernel.deferred[e.out][1])}), so no one "
                f"tile: it cannot be a running state or a stored result",
                self.c.where(e),
            )
        return t

    def _einsum(self, e: Einsum) -> Tile | None:
        unrolled = unrolled_ranks(e, self.c)
        if set(unrolled) & set(e.ranks):  # its instances are made where they are read
            positions(unrolled, self.dims, e.out)  # made now only to refuse too many, here at its line
            self.kernel.deferred[e.out] = (e, unrolled)
            return None
        if unrolled and reduces(e):
            return self.bind(e.out, self.fold(e, unrolled))
        ranks = tuple(r for r in e.ranks if r not in PARALLEL)
        if len(ranks) > 2:
            raise LoweringError(
                f"{e.out} has {len(ranks)} tile ranks ({', '.join(ranks)}); the one-pass template handles at most 2"
            )
        if (
            reduces(e)
            and e.reduce.op == "sum"
            and e.where is None
            and (groups := dot_groups(e, self.kernel.order)) is not None
        ):
            tile = contraction(self, e, groups)
            # a dot that its consumer adds into an accumulator runs there, inside tl.dot, and only there
            return self.bind(e.out, tile, evaluate=not (e.out in self.dots and self.only_accumulated(e.out)))
        fused = self.accumulate(e)
        if fused is not None:
            return self.bind(e.out, fused)
        body = self.expr(e.expr)
        if e.where is not None:
            body = self.mask(e.where, body)
        if reduces(e):
            return self.bind(e.out, reduction(self, e, body))
        return self.bind(e.out, body)

    def fold(self, e: Reducing, ranks: tuple[str, ...]) -> Tile:
        """``e``'s reduction over its unrolled ``ranks``: its body at each position, folded in order by the
        reducer's combine (absent where every position is)."""
        if set(e.reduce.ranks) != set(ranks) or REDUCERS[e.reduce.op].combine is None:
            raise LoweringError(
                f"{e.out} reduces over {', '.join(e.reduce.ranks)} by {e.reduce.op}; unrolled, a reduction folds over "
                f"small ranks only ({', '.join(ranks)}), by a reducer with a combine (sum, max, min, user reducers)"
            )
        combine = REDUCERS[e.reduce.op].combine
        assert combine is not None  # checked just above
        acc: Tile | None = None
        for k, at in enumerate(positions(ranks, self.dims, e.out)):
            body = self.expr(at_position(e.expr, at))
            if e.where is not None:
                body = self.mask(at_position(e.where, at), body)
            if acc is not None:
                ranks_k = tile_axes(acc.ranks + body.ranks, self.kernel.order)
                body = self.any_merge(combine, [acc, body], ranks_k)
            acc = self.bind(f"{e.out}_at{k}", body)
        assert acc is not None  # positions() gives at least one: every extent is at least 1
        return acc

    def accumulate(self, e: Einsum) -> Tile | None:
        """``S = X +∪ dot`` as ``tl.dot(a, b, X)``: the tensor cores add into the rescaled accumulator."""
        x = e.expr
        if not (isinstance(x, Call) and x.op == "add" and x.merge is Merge.ANY and e.reduce is None):
            return None
        acc, chunk = x.args
        if not (isinstance(chunk, Read) and chunk.tensor in self.dots):
            return None
        a, b, prec = self.dots[chunk.tensor]
        made = self.env[chunk.tensor]
        rest = self.expr(acc)
        if (
            rest.ranks != made.ranks
            or not (rest.present is None or rest.fill == 0.0)
            or not (made.present is None or made.fill == 0.0)
        ):
            return None
        present, pranks = (
            (None, ()) if rest.present is None or made.present is None else self.presence((rest, made), "|")[:2]
        )
        return Tile(f"tl.dot({a}, {b}, {self.f32(rest)}{prec})", made.ranks, present, pranks, 0.0 if present else None)

    def mask(self, where: Expr, body: Tile) -> Tile:
        """``body`` kept where the filter ``where`` holds, and absent elsewhere."""
        pred = self.predicate(where)
        if pred is None:
            return body
        ranks = tile_axes(body.ranks + pred.ranks, self.kernel.order)
        present, pranks, kept = self.presence((body, Tile("", (), pred.code, pred.ranks)))
        assert present is not None  # the predicate's tile has a presence: the combination has one
        if kept == {0}:
            # the body is absent wherever the mask fails already (a gradient re-masked by its forward's mask):
            # it stays as it is, with the fill it has there
            return body
        value = f"tl.where({bcast(present, pranks, ranks)}, {bcast(self.f32(body), body.ranks, ranks)}, float('-inf'))"
        return Tile(value, ranks, present, pranks, float("-inf"), finite=body.finite)

    def predicate(self, where: Expr) -> Tile | None:
        """The mask as a boolean tile; conjuncts proven true on these tiles are left out."""
        # a constant conjunct (the declaration compared constants) holds everywhere or nowhere
        parts = [
            p for p in conjuncts(where) if p not in self.skip_predicates and not (isinstance(p, Const) and p.value)
        ]
        if any(isinstance(p, Const) for p in parts):
            return Tile("False", (), dtype="bool")
        if not parts:
            return None
        ranges, parts = range_pairs(parts, {p.name for p in self.c.params if p.integer})
        tiles = [self.range_test(x, k) for x, k in ranges] + [self.expr(p) for p in parts]
        ranks = tile_axes((r for t in tiles for r in t.ranks), self.kernel.order)
        # a held rank's padding (c = 3 of a tile of 4 over C = 3 blocks) is no position: a test there is false, so
        # that a reduction over the rank (a maximum of gates with c ≠ 1) does not take the padding's zeros
        tiles += [
            Tile(f"(offs_{r} < {self.extent_code(r)})", (r,), dtype="bool")
            for r in ranks
            if r not in SEQUENCE_RANKS and self.extent(r) != self.dims[r]
        ]
        code = " & ".join(bcast(t.code, t.ranks, ranks) for t in tiles)
        return Tile(f"({code})", ranks, dtype="bool")

    def range_test(self, x: Expr, bound: dict) -> Tile:
        """``0 ≤ x ≤ bound`` as one unsigned comparison, ``x < max(bound + 1, 0)`` (a negative x wraps above
        any limit), ``x`` over coordinates, ``bound`` a linear form of integer parameters and extents."""
        t = self.expr(x)
        limit = dict(bound)
        limit[1] = limit.get(1, 0) + 1
        if set(limit) <= {1}:  # a constant bound: a Python int, which the comparison takes as unsigned
            code = str(max(limit[1], 0))
        else:
            terms = [
                str(k) if leaf == 1 else self.integer(leaf) if k == 1 else f"{k} * {self.integer(leaf)}"
                for leaf, k in limit.items()
                if k
            ]
            code = f"(tl.maximum({' + '.join(terms)}, 0)).to(tl.uint32)"
        return Tile(f"(({t.code}).to(tl.uint32) < {code})", t.ranks, dtype="bool")

    def integer(self, x: Param | Size) -> str:
        """An integer parameter's or an extent's value as the kernel has it (an int, not converted)."""
        if isinstance(x, Param):
            return f"p_{x.name}"
        return self.extent_code(x.rank)
