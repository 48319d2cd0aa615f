"""The reference executor: evaluates any valid cascade with torch; the oracle of every test.

Inputs come in the contract layout (q ``[B,Hq,M,E]``, k ``[B,Hkv,N,E]``, v
``[B,Hkv,N,F]``; extra inputs in their declared rank order). Values carry a
presence mask: masked elements are absent, reductions skip them, and an empty
fiber gives an absent result, so a fully masked row has output 0. Loop Einsums
run chunk by chunk over ``n`` with running states, exactly as the rewritten
cascade says. Coordinates are exact int64; float inputs are cast to ``dtype``
(float64 for the oracle; a kernel's dtype to measure what plain PyTorch in that
dtype gets wrong).

An evaluation that would hold more than a memory budget (:func:`run_outputs`'
``max_bytes``) runs in boxes of rows that the cascade computes independently
(:func:`independent_rows`): whole heads first, blocks of query rows only when one
head does not fit. Each box is evaluated on its own, with absolute coordinates and
its inputs laid out as a whole run lays them, by the same operations: on the CPU the
output is bit-for-bit the unboxed one (tests/ir/test_reference_boxes.py); a GPU's
BLAS may pick other kernels for other sizes. Under autograd each box is
checkpointed, so a backward also holds one box at a time.

>>> import torch, einflash as ef
>>> @ef.attention
... def plain(q, k, v):
...     return ef.softmax(q @ k * ef.scale, "n") @ v
>>> q = k = v = torch.ones(1, 1, 3, 4)
>>> run_reference(plain.cascade, dict(q=q, k=k, v=v))[0, 0, 0].tolist()
[1.0, 1.0, 1.0, 1.0]
"""

from __future__ import annotations

import functools
import itertools
import math
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import sympy
import torch
import torch.utils.checkpoint

from ..errors import CascadeError, DTypeError, MissingInputError, ParameterError, ShapeError
from .cascade import ROW_OUTPUT_ABSENT, Cascade, Einsum, Layout, Reduction, Role, loop_blocks
from .expr import Call, Const, Coord, Expr, Merge, Param, Read, Size, free_ranks, gathered_entries, walk
from .operators import OPERATORS, REDUCERS
from .ranks import PARALLEL, RankRole, coord, extent_symbol, rank_order


@dataclass
class Value:
    """A tensor over named ranks; ``present`` None means every element is present."""

    data: torch.Tensor
    ranks: tuple[str, ...]
    present: torch.Tensor | None = None
    origin: dict[str, int] = field(default_factory=dict)  # first coordinate of each rank (chunks)

    def aligned(self, ranks: tuple[str, ...]) -> torch.Tensor:
        return _align(self.data, self.ranks, ranks)

    def aligned_present(self, ranks: tuple[str, ...]) -> torch.Tensor | None:
        return None if self.present is None else _align(self.present, self.ranks, ranks)


def _align(t: torch.Tensor, have: tuple[str, ...], want: tuple[str, ...]) -> torch.Tensor:
    if t.dim() == 0:  # stays 0-dim: broadcasts, and stays weak in type promotion
        return t
    perm = [have.index(r) for r in want if r in have]
    t = t.permute(perm)
    shape, it = [], iter(t.shape)
    for r in want:
        shape.append(next(it) if r in have else 1)
    return t.reshape(shape)


def _and(a, b):
    if a is None:
        return b
    if b is None:
        return a
    return a & b


# -- binding inputs -------------------------------------------------------------------------


def kv_heads(c: Cascade, inputs: Mapping[str, torch.Tensor]) -> int:
    """The number of key/value heads of a call: the head dimension of its first key-layout input."""
    return next(inputs[t.name].shape[1] for t in c.inputs if t.layout is Layout.KEY)


def bind_extents(c: Cascade, inputs: Mapping[str, torch.Tensor], params: Mapping[str, float]) -> dict[str, int]:
    """Rank extents from the inputs' shapes, checked for agreement; raises ShapeError naming both sides."""
    ext: dict[str, int] = {}
    origin: dict[str, str] = {}
    hkv = None

    def put(rank: str, size: int, who: str) -> None:
        if rank in ext and ext[rank] != size:
            raise ShapeError(f"{who} gives rank {rank!r} extent {size}, but {origin[rank]} gives {ext[rank]}")
        ext.setdefault(rank, size)
        origin.setdefault(rank, who)

    for t in c.inputs:
        if t.name not in inputs:
            raise MissingInputError(f"input {t.name!r} is missing; the cascade declares {[x.name for x in c.inputs]}")
        x = inputs[t.name]
        if x.dim() != len(t.ranks):
            raise ShapeError(
                f"{t.name} must have {len(t.ranks)} dimensions ({', '.join(t.ranks)}), got shape {tuple(x.shape)}"
            )
        for r, s in zip(t.ranks, x.shape):
            if t.layout is Layout.KEY and r == "h":
                if hkv is not None and hkv[0] != s:
                    raise ShapeError(f"{t.name} has {s} kv heads, but {hkv[1]} has {hkv[0]}")
                hkv = (s, t.name)
                continue
            put(r, int(s), f"{t.name}.shape")
    if hkv is not None:
        hq = ext.get("h")
        if hq is None or hkv[0] == 0 or hq % hkv[0]:
            raise ShapeError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv[0]}, from {hkv[1]})")
    missing = [r for r in c.ranks if r.name not in ext]
    if missing:  # extents defined by formulas (key blocks of MoBA: ceil(N / block))
        subs = {r.extent: ext[r.name] for r in c.ranks if isinstance(r.extent, sympy.Symbol) and r.name in ext}
        subs.update({extent_symbol(k): v for k, v in params.items()})
        # parameters not given take their defaults, which may themselves use extents
        defaults = {
            extent_symbol(p.name): p.default for p in c.params if p.default is not None and p.name not in params
        }
        for rank in missing:
            val = sympy.sympify(rank.extent).subs(defaults).subs(subs)
            if not val.is_number:
                raise ShapeError(f"rank {rank.name!r} has extent {rank.extent}, which the inputs do not determine")
            ext[rank.name] = int(val)
    _check_input_reads(c, ext, params, inputs)
    # a table rank's extent bounds reads (checked above) and is no tile axis: head dims are the other ranks'
    return {r: v for r, v in ext.items() if r not in c.table_ranks}


_OFFSET_READS: dict[str, tuple] = {}  # by cascade key: its reads of inputs at other than their own coordinates


_VALUE_RANGES: dict[int, tuple] = {}  # id of an index input -> (weak reference, version, lowest, highest)


def value_range(x: torch.Tensor) -> tuple[int, int]:
    """The lowest and highest entry of an integer input an index gathers through, computed once per tensor
    version (it waits for the device): a table read at those entries must hold both.

    >>> value_range(torch.tensor([3, 0, 7]))
    (0, 7)
    """
    key = id(x)
    hit = _VALUE_RANGES.get(key)
    if hit is not None and hit[0]() is x and hit[1] == x._version:
        return hit[2], hit[3]
    lo, hi = (int(v) for v in torch.aminmax(x)) if x.numel() else (0, -1)
    _VALUE_RANGES[key] = (weakref.ref(x, lambda _: _VALUE_RANGES.pop(key, None)), x._version, lo, hi)
    return lo, hi


def _check_input_reads(
    c: Cascade, ext: Mapping[str, int], params: Mapping[str, float], inputs: Mapping[str, torch.Tensor]
) -> None:
    """Raise ShapeError where the cascade reads an input outside its extent at these extents (``doc[b, n]`` read at
    ``m`` with M > N, ``tab[n − m + r]`` past the table's end): such a read is an error, never a dropped key. An
    index that gathers through an integer input (``table[bucket[n − m]]``) holds for every entry of it."""
    reads = _OFFSET_READS.get(c.key)
    if reads is None:
        reads = _OFFSET_READS[c.key] = tuple(
            (e, r.tensor, rank, sympy.sympify(i))
            for e in c.einsums
            for r in e.reads()
            if c.tensor(r.tensor).role is Role.INPUT and not r.padded  # a padded read finds absent elements outside
            for rank, i in zip(c.tensor(r.tensor).ranks, r.index)
            if rank not in PARALLEL and sympy.sympify(i) != coord(rank)
        )
    values = None
    for e, tensor, rank, index in reads:
        coords = sorted(s.name for s in index.free_symbols if s == coord(s.name))
        if any(ext.get(x, 0) == 0 for x in coords):
            continue  # nothing is read
        if values is None:  # parameters not given take their defaults, which may use extents
            values = {extent_symbol(k): v for k, v in bind_params(c, params, ext).items()} | {
                r.extent: ext[r.name] for r in c.ranks if r.name in ext
            }
        # a gathered entry (bucket(n − m)) is a variable over the gathered input's values
        gathers = gathered_entries(index)
        entries = [sympy.Dummy(read.tensor) for _, read in gathers]
        ranges = [_gather_range(c, e, read.tensor, inputs) for _, read in gathers]
        written, index = index, index.subs({f: d for (f, _), d in zip(gathers, entries)})
        syms = [coord(x) for x in coords if all(coord(x) not in f.free_symbols for f, _ in gathers)] + entries
        fn = sympy.lambdify(syms, index.subs(values), modules=[{"floor": math.floor}, "math"])
        # an affine index takes its extremes at the corners; another (floor, mod) is tried everywhere on short ranks
        affine = (
            not index.has(sympy.floor, sympy.Mod)
            and index.is_polynomial(*syms)
            and all(sympy.degree(index, x) <= 1 for x in syms)
        )
        bounds = [(0, ext[s.name] - 1) for s in syms[: len(syms) - len(entries)]] + ranges
        span = [(lo, hi) if affine or hi - lo >= 64 else range(lo, hi + 1) for lo, hi in bounds]
        seen = [fn(*point) for point in itertools.product(*span)] if syms else [fn()]
        low, high = min(seen), max(seen)
        if low < 0 or high >= ext[rank]:
            held = "".join(f", {read.tensor} holding {lo}..{hi}" for (_, read), (lo, hi) in zip(gathers, ranges))
            raise ShapeError(
                f"{c.where(e)}: reads {tensor} at {rank} = {written}, which runs from {low} to {high} at these "
                f"extents ({', '.join(f'{x.upper()}={ext[x]}' for x in coords)}{held}), "
                f"outside {tensor}'s 0..{ext[rank] - 1}; "
                f"a read outside an input is an error: give the input the extent it is read at (pad it)"
            )


def _gather_range(c: Cascade, e: Einsum, name: str, inputs: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    x = inputs[name]
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise DTypeError(f"{c.where(e)}: an index gathers through {name}, which must hold integers, got {x.dtype}")
    lo, hi = value_range(x)
    if hi < lo:
        raise ShapeError(f"{c.where(e)}: an index gathers through {name}, which is empty")
    return lo, hi


def bind_params(c: Cascade, given: Mapping[str, float], extents: Mapping[str, int]) -> dict[str, float]:
    """Parameter values: given ones, else defaults evaluated at the extents."""
    unknown = set(given) - {p.name for p in c.params}
    if unknown:
        raise MissingInputError(
            f"unknown parameter(s) {sorted(unknown)}; the cascade declares {[p.name for p in c.params]}"
        )
    out: dict[str, float] = {}
    for p in c.params:
        if p.name in given and given[p.name] is not None:
            out[p.name] = given[p.name]
        elif p.default is not None:
            out[p.name] = float(_default_fn(c.key, c.params, c.ranks, p.name)(extents))
        else:
            raise MissingInputError(f"parameter {p.name!r} has no default and was not given")
        if p.integer:
            out[p.name] = int(out[p.name])
        if p.positive and not 0 < out[p.name] < math.inf:
            raise ParameterError(f"parameter {p.name!r} must be positive and finite, got {out[p.name]}")
    return out


@functools.lru_cache(maxsize=1024)
def _default_fn(key: str, params, ranks, name: str):
    """A parameter's default as a plain function of the extents (no sympy at call time; cached by cascade key)."""
    p = next(p for p in params if p.name == name)
    syms = {r.extent: r.name for r in ranks if isinstance(r.extent, sympy.Symbol)}
    expr = sympy.sympify(p.default)
    args = [s for s in expr.free_symbols if s in syms]
    fn = sympy.lambdify(args, expr, modules="math")
    return lambda extents: fn(*(extents[syms[s]] for s in args))


# -- evaluation -------------------------------------------------------------------------------


class _Evaluator:
    """Evaluates the cascade over ``box`` (coordinate ranges of some ranks, the whole extent of the others)."""

    def __init__(
        self,
        c: Cascade,
        extents: dict[str, int],
        params: dict[str, float],
        device,
        dtype,
        inputs: dict[str, Value],
        box: Mapping[str, tuple[int, int]],
        rounding: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
    ):
        self.c, self.extents, self.params, self.device, self.dtype = c, extents, params, device, dtype
        self.rounding = rounding
        self.env: dict[str, Value] = dict(inputs)
        self.prev: dict[str, Value] = {}
        self.ranges = {r: (0, s) for r, s in extents.items()} | dict(box)

    # leaves
    def coord_values(self, rank: str) -> torch.Tensor:
        lo, hi = self.ranges[rank]
        return torch.arange(lo, hi, device=self.device)

    def read(self, x: Read) -> Value:
        src = self.prev.get(x.tensor) if x.prev else self.env.get(x.tensor)
        decl = self.c.tensor(x.tensor)
        if src is None:  # a state before its first update: absent everywhere
            shape = [self.ranges[r][1] - self.ranges[r][0] for r in decl.ranks]
            zeros = torch.zeros(shape, dtype=self.dtype, device=self.device)
            src = Value(
                zeros,
                decl.ranks,
                torch.zeros(shape, dtype=torch.bool, device=self.device),
                {r: self.ranges[r][0] for r in decl.ranks},
            )
        if tuple(x.index) == tuple(coord(r) for r in src.ranks):
            return self._narrow(src)
        return self._gather(src, x.index)

    def _narrow(self, src: Value) -> Value:
        data, pres = src.data, src.present
        for d, r in enumerate(src.ranks):
            lo, hi = self.ranges[r]
            o = src.origin.get(r, 0)
            if (lo - o, hi - o) != (0, data.shape[d]):
                if lo - o < 0 or hi - o > data.shape[d]:
                    return self._gather(src, tuple(coord(r) for r in src.ranks))
                data = data.narrow(d, lo - o, hi - lo)
                pres = None if pres is None else pres.narrow(d, lo - o, hi - lo)
        return Value(data, src.ranks, pres, {r: self.ranges[r][0] for r in src.ranks})

    def _gather(self, src: Value, index) -> Value:
        free = rank_order(s.name for i in index for s in sympy.sympify(i).free_symbols if s == coord(s.name))
        grids = {coord(r): _align(self.coord_values(r), (r,), free) for r in free}
        # parameters and extents (a query's end-aligned position m + N − M) by their values
        psubs = {extent_symbol(k): v for k, v in self.params.items()}
        psubs |= {r.extent: self.extents[r.name] for r in self.c.ranks if r.name in self.extents}
        idxs, valid = [], None
        for d, (i, r) in enumerate(zip(index, src.ranks)):
            expr = sympy.sympify(i).subs(psubs)
            # entries an index gathers (bucket(n − m)): read as any input, then variables of the index
            gathers = gathered_entries(expr)
            entries = [sympy.Dummy(read.tensor) for _, read in gathers]
            taken = [self.read(read) for _, read in gathers]
            expr = expr.subs({f: d for (f, _), d in zip(gathers, entries)})
            fn = sympy.lambdify(list(grids) + entries, expr, modules=[{"floor": torch.floor}, "math"])
            val = fn(*grids.values(), *(_align(t.data, t.ranks, free) for t in taken))
            val = torch.as_tensor(val, device=self.device)
            val = torch.floor(val).long() if val.is_floating_point() else val.long()
            local = val - src.origin.get(r, 0)
            ok = (local >= 0) & (local < src.data.shape[d])
            valid = ok if valid is None else valid & ok
            idxs.append(local.clamp(0, max(src.data.shape[d] - 1, 0)))
        shape = torch.broadcast_shapes(*(t.shape for t in idxs)) if idxs else ()
        idxs = [t.expand(shape) for t in idxs]
        data = src.data[tuple(idxs)] if idxs else src.data
        pres = valid.expand(shape) if valid is not None else None
        if src.present is not None:
            pres = _and(pres, src.present[tuple(idxs)])
        return Value(data, free, pres, {r: self.ranges[r][0] for r in free})

    def eval(self, x: Expr) -> Value:
        if isinstance(x, Const):
            return Value(torch.tensor(x.value, dtype=torch.float64, device=self.device), ())
        if isinstance(x, Param):
            v = self.params[x.name]
            return Value(
                torch.tensor(v, dtype=torch.int64 if isinstance(v, int) else torch.float64, device=self.device), ()
            )
        if isinstance(x, Size):
            return Value(torch.tensor(float(self.extents[x.rank]), dtype=torch.float64, device=self.device), ())
        if isinstance(x, Coord):
            return Value(self.coord_values(x.rank), (x.rank,), None, {x.rank: self.ranges[x.rank][0]})
        if isinstance(x, Read):
            return self.read(x)
        return self.call(x)

    def call(self, x: Call) -> Value:
        args = [self.eval(a) for a in x.args]
        ranks = rank_order(r for a in args for r in a.ranks)
        datas = [a.aligned(ranks) for a in args]
        op = OPERATORS[x.op]
        if x.op == "where":
            datas[0] = datas[0].bool()
        elif x.op in ("and", "or", "not"):
            datas = [d.bool() for d in datas]
        press = [a.aligned_present(ranks) for a in args]
        absent = None if op.boolean or x.merge is not Merge.ALL else functools.reduce(_and, press, None)
        if absent is not None:
            # the result is absent there whatever it holds: computing it from 1s keeps infinities and NaNs made
            # at absent positions (exp(s − max) of a row with no key) out of autograd's 0·∞
            datas = [
                torch.where(absent, d, torch.ones((), dtype=d.dtype, device=d.device)) if d.is_floating_point() else d
                for d in datas
            ]
        if x.op == "merge_top":  # top lists merge along their LIST rank, taken last
            axis = next(i for i, r in enumerate(ranks) if self.c.rank(r).role is RankRole.LIST)
            data = op.torch(*(d.movedim(axis, -1) for d in datas)).movedim(-1, axis)
        else:
            data = op.torch(*datas)
        if op.boolean:  # a predicate on absent data is false, never absent
            for p in press:
                if p is not None:
                    data = data & p
            return Value(data, ranks, None, {r: self.ranges[r][0] for r in ranks})
        if x.merge is Merge.ALL:
            pres = None
            for p in press:
                pres = _and(pres, p)
        else:  # absent operands act as the identity: the result is the present operand
            a, b = datas
            pa, pb = press
            if pa is not None:
                data = torch.where(pa, data, b)
            if pb is not None:
                data = torch.where(pb, data, a if pa is None else torch.where(pa, a, data))
            pres = None if pa is None or pb is None else pa | pb
        return Value(data, ranks, pres, {r: self.ranges[r][0] for r in ranks})

    # einsums
    def einsum(self, e: Einsum) -> Value:
        its = rank_order(e.iteration_ranks)
        red = e.reduce
        if red is not None and red.op == "sum" and e.where is None:
            val = self._sum_of_products(e, red, its)
        else:
            body = self.eval(e.expr)
            data, pres = body.aligned(its), body.aligned_present(its)
            if e.where is not None:
                w = self.eval(e.where)
                keep = w.aligned(its).bool()
                keep = _and(keep, w.aligned_present(its))
                pres = _and(pres, keep)
            shape = [self.ranges[r][1] - self.ranges[r][0] for r in its]
            data = data.expand(shape)
            pres = None if pres is None else pres.expand(shape)
            if red is None:
                val = Value(data, its, pres)
            else:
                val = self._reduce(e, red, its, data, pres)
        out = Value(
            val.aligned(e.ranks), e.ranks, val.aligned_present(e.ranks), {r: self.ranges[r][0] for r in e.ranks}
        )
        shape = [self.ranges[r][1] - self.ranges[r][0] for r in e.ranks]
        out.data = out.data.expand(shape)
        out.present = None if out.present is None else out.present.expand(shape)
        if self.rounding is not None:
            out.data = self.rounding(e.out, out.data)
        return out

    def _reduce(self, e: Einsum, red: Reduction, its, data, pres) -> Value:
        dims = [its.index(r) for r in red.ranks]
        keep = tuple(r for r in its if r not in red.ranks)
        ident = REDUCERS[red.op].identity
        if pres is not None:
            data = torch.where(pres, data, torch.tensor(ident, dtype=data.dtype, device=data.device))
        if any(data.shape[d] == 0 for d in dims):  # an empty fiber: the identity, and absent
            shape = [s for d, s in enumerate(data.shape) if d not in dims]
            return Value(
                torch.full(shape, ident, dtype=data.dtype, device=data.device),
                keep,
                torch.zeros(shape, dtype=torch.bool, device=data.device),
            )
        if red.op == "sum":
            out = data.sum(dim=dims)
        elif red.op == "max":
            out = data.amax(dim=dims)
        elif red.op == "min":
            out = data.amin(dim=dims)
        elif REDUCERS[red.op].lists:
            out = self._top_list(red, its, data, dims, keep)
        elif (combine := REDUCERS[red.op].combine) is not None:  # a user reducer: fold pairwise with its combine
            out = _fold(data, dims, OPERATORS[combine].torch, ident)
        else:  # kth_largest, the one reducer with no combine
            if red.arg is None:  # a cascade built by hand, or x.reduce("kth_largest", ...) with no k
                raise CascadeError(f"{e.out}: kth_largest needs its k (Reduction.arg), got none")
            flat = _fibers(data, dims)
            k = int(red.arg)
            if k <= flat.shape[-1]:
                out = flat.topk(k, dim=-1).values[..., -1]
            else:  # a fiber shorter than k has no k-th largest: −inf, as absent elements count
                out = flat.new_full(flat.shape[:-1], -math.inf)
        any_pres = None if pres is None else pres.any(dim=dims)
        return Value(out, keep, any_pres)

    def _top_list(self, red: Reduction, its, data: torch.Tensor, dims: list[int], keep) -> torch.Tensor:
        """The k largest of each fiber, in descending order along the output's LIST rank (−inf past the fiber)."""
        listed = next(r for r in keep if self.c.rank(r).role is RankRole.LIST)
        axis = its.index(listed)
        base = data.select(axis, 0)  # the body does not vary along the list
        flat = _fibers(base, [d - (d > axis) for d in dims])
        k = int(red.arg or 0)
        values = flat.topk(min(k, flat.shape[-1]), dim=-1).values
        if values.shape[-1] < k:
            values = torch.cat([values, values.new_full((*values.shape[:-1], k - values.shape[-1]), -math.inf)], -1)
        lo, hi = self.ranges[listed]
        return values[..., lo:hi].movedim(-1, keep.index(listed))

    def _sum_of_products(self, e: Einsum, red: Reduction, its) -> Value:
        factors = list(_factors(e.expr))
        # b and h as batch dimensions of every contraction: BLAS then computes each head alike, however many
        # heads an evaluation has (a factor without b would have b folded into its product's rows)
        batch = tuple(r for r in PARALLEL if r not in red.ranks)
        vals = [self._with_ranks(self.eval(f), batch) for f in factors]
        letters = {r: chr(ord("a") + i) for i, r in enumerate(its)}
        keep = tuple(r for r in its if r not in red.ranks)
        spec = ",".join("".join(letters[r] for r in v.ranks) for v in vals) + "->" + "".join(letters[r] for r in keep)
        datas = []
        for v in vals:
            d = v.data
            if v.present is not None:
                d = torch.where(v.present, d, torch.zeros((), dtype=d.dtype, device=d.device))
            datas.append(d)
        dt = _result_dtype(datas)
        data = torch.einsum(spec, *(d.to(dt) for d in datas))
        pres = None
        if any(v.present is not None for v in vals):
            ps = [
                torch.ones(v.data.shape, dtype=torch.float64, device=self.device)
                if v.present is None
                else v.present.to(torch.float64)
                for v in vals
            ]
            pres = torch.einsum(spec, *ps) > 0
        return Value(data, keep, pres)

    def _with_ranks(self, v: Value, ranks: tuple[str, ...]) -> Value:
        """``v`` broadcast along those of ``ranks`` it lacks (a view); a scalar stays one (weak in promotion)."""
        missing = tuple(r for r in ranks if r not in v.ranks)
        if not missing or v.data.dim() == 0:
            return v
        have = missing + v.ranks
        shape = [self.ranges[r][1] - self.ranges[r][0] for r in missing] + list(v.data.shape)
        present = None if v.present is None else _align(v.present, v.ranks, have).expand(shape)
        return Value(
            _align(v.data, v.ranks, have).expand(shape),
            have,
            present,
            v.origin | {r: self.ranges[r][0] for r in missing},
        )

    # the whole cascade
    def run(self, chunk: int | None) -> dict[str, Value]:
        for k, block in loop_blocks(self.c.einsums):
            if k:
                self._loop(block, chunk)
            else:
                self.env[block[0].out] = self.einsum(block[0])
        return self.env

    def _loop(self, body: list[Einsum], chunk: int | None) -> None:
        total = self.extents["n"]
        step = max(1, chunk or total)
        states = {t.name for t in self.c.states}
        for lo in range(0, max(total, 1), step):
            self.ranges["n"] = (lo, min(total, lo + step))
            self.prev = {s: self.env[s] for s in states if s in self.env}
            for e in body:
                self.env[e.out] = self.einsum(e)
        self.ranges["n"] = (0, total)
        self.prev = {}


def _fibers(data: torch.Tensor, dims: list[int]) -> torch.Tensor:
    """``data`` with the axes ``dims`` flattened into its last: one row per fiber, the other axes in order."""
    rows = [d for d in range(data.dim()) if d not in dims]
    return data.permute(rows + dims).reshape(*(data.shape[d] for d in rows), -1)


def _fold(data: torch.Tensor, dims: list[int], combine, identity: float) -> torch.Tensor:
    """``data`` reduced over ``dims`` with an associative, commutative ``combine``: halves until one is left."""
    x = _fibers(data, dims)
    while x.shape[-1] > 1:
        if x.shape[-1] % 2:
            x = torch.cat([x, torch.full_like(x[..., :1], identity)], dim=-1)
        x = combine(x[..., 0::2], x[..., 1::2]).to(data.dtype)
    return x[..., 0]


def _result_dtype(datas: list[torch.Tensor]) -> torch.dtype:
    """The dtype torch's promotion gives a product of these (0-dim tensors are weak)."""
    rep = datas[0]
    for d in datas[1:]:
        dt = torch.result_type(rep, d)
        rep = torch.empty(() if rep.dim() == 0 and d.dim() == 0 else (1,), dtype=dt)
    return rep.dtype


def _factors(x: Expr):
    if isinstance(x, Call) and x.op == "mul" and x.merge is Merge.ALL:
        for a in x.args:
            yield from _factors(a)
    else:
        yield x


def _input_values(
    c: Cascade, inputs: Mapping[str, torch.Tensor], extents: Mapping[str, int], dtype: torch.dtype
) -> dict[str, Value]:
    """The inputs as Values: floats in ``dtype``, key/value heads repeated to the query heads."""
    out = {}
    for t in c.inputs:
        x = inputs[t.name]
        x = x.to(dtype) if x.is_floating_point() else x
        if t.layout is Layout.KEY:
            x = x.repeat_interleave(extents["h"] // x.shape[1], dim=1)
        out[t.name] = Value(x, t.ranks)
    return out


def evaluate(
    c: Cascade,
    inputs: Mapping[str, torch.Tensor],
    params: Mapping[str, float] | None = None,
    *,
    dtype: torch.dtype = torch.float64,
    chunk: int | None = None,
) -> dict[str, Value]:
    """Every tensor of the cascade as a Value (for tests of rewrites); see :func:`run_reference`."""
    params = dict(params or {})
    extents = bind_extents(c, inputs, params)
    values = bind_params(c, params, extents)
    given = _input_values(c, inputs, extents, dtype)
    return _Evaluator(c, extents, values, _device(inputs), dtype, given, {}).run(chunk)


def _device(inputs: Mapping[str, torch.Tensor]) -> torch.device:
    return next(iter(inputs.values())).device


def to_contract_layout(c: Cascade, v: Value, extents_like: Mapping[str, int] | None = None) -> torch.Tensor:
    """An output Value as ``[B, H, M, F]`` with absent elements as 0."""
    ranks = v.ranks
    value_rank = next(r for r in ranks if r not in ("b", "h", "m"))
    want = ("b", "h", "m", value_rank)
    data = v.aligned(want)
    present = v.aligned_present(want)
    if present is not None:
        data = torch.where(present, data, torch.zeros((), dtype=data.dtype, device=data.device))
    if extents_like:
        data = data.expand(extents_like["b"], extents_like["h"], data.shape[2], data.shape[3])
    return data.contiguous()


def run_reference(
    c: Cascade,
    inputs: Mapping[str, torch.Tensor],
    params: Mapping[str, float] | None = None,
    *,
    dtype: torch.dtype = torch.float64,
    chunk: int | None = None,
    max_bytes: float | None = None,
) -> torch.Tensor:
    """The output ``[B, Hq, M, F]`` of the cascade on these inputs, computed in ``dtype``."""
    return run_outputs(c, inputs, params, dtype=dtype, chunk=chunk, max_bytes=max_bytes)[0]


def run_outputs(
    c: Cascade,
    inputs: Mapping[str, torch.Tensor],
    params: Mapping[str, float] | None = None,
    *,
    dtype: torch.dtype = torch.float64,
    chunk: int | None = None,
    max_bytes: float | None = None,
    rounding: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, ...]:
    """Every output of the cascade: the first ``[B, Hq, M, F]`` (absent elements 0), then the per-row ones
    ``[B, Hq, M]`` (absent elements ``ROW_OUTPUT_ABSENT``, −inf), computed in ``dtype``. ``rounding`` (the
    tolerance rule's, ``einflash.testing.rounding_allowance``) is given each Einsum's name and values and returns
    the values to go on with.

    ``max_bytes`` bounds what one evaluation holds, as :func:`footprint` estimates it: above it the rows are
    evaluated in boxes (:func:`row_boxes`), for the same output (see the module's docstring). None takes a share
    of the memory free on the inputs' device (:func:`memory_budget`).

    >>> import torch, einflash as ef
    >>> from einflash.compiler.rewrite.lse import with_lse
    >>> @ef.attention
    ... def plain(q, k, v):
    ...     return ef.softmax(q @ k * ef.scale, "n") @ v
    >>> q = torch.randn(1, 2, 5, 8, dtype=torch.float64)
    >>> o, lse = run_outputs(with_lse(plain.cascade), {"q": q, "k": q, "v": q})
    >>> torch.allclose(lse, torch.logsumexp(q @ q.mT / 8 ** 0.5, dim=-1))
    True
    >>> torch.equal(run_outputs(plain.cascade, {"q": q, "k": q, "v": q}, max_bytes=1)[0], o)  # one row at a time
    True
    """
    params = dict(params or {})
    extents = bind_extents(c, inputs, params)
    values = bind_params(c, params, extents)
    given = _input_values(c, inputs, extents, dtype)
    device = _device(inputs)
    budget = memory_budget(device) if max_bytes is None else max_bytes
    boxes = row_boxes(c, extents, torch.empty((), dtype=dtype).element_size(), budget)
    names = list(given)

    def run(box: dict[str, tuple[int, int]], *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # the inputs come as arguments, so that a checkpoint sees what it differentiates
        ev = _Evaluator(
            c,
            extents,
            values,
            device,
            dtype,
            {n: _boxed(c, n, given[n].ranks, t, box) for n, t in zip(names, tensors)},
            box,
            rounding,
        )
        return _outputs(c, ev.run(chunk), {r: hi - lo for r, (lo, hi) in ev.ranges.items()})

    tensors = [v.data for v in given.values()]
    if len(boxes) == 1:
        return run(boxes[0], *tensors)
    differentiated = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    outs: list[torch.Tensor] = []
    for box in boxes:
        pieces = (
            torch.utils.checkpoint.checkpoint(run, box, *tensors, use_reentrant=False)
            if differentiated
            else run(box, *tensors)
        )
        if not outs:  # each output whole: full extents along the ranks boxes cut, the piece's sizes elsewhere
            outs = [
                p.new_empty([extents[r] if r in box else s for r, s in zip(ROW_RANKS, p.shape)] + [*p.shape[3:]])
                for p in pieces
            ]
        rows = tuple(slice(*box.get(r, (0, extents[r]))) for r in ROW_RANKS)
        for out, piece in zip(outs, pieces):
            out[rows] = piece
    return tuple(outs)


def _outputs(c: Cascade, env: dict[str, Value], sizes: Mapping[str, int]) -> tuple[torch.Tensor, ...]:
    """The cascade's outputs in their contract layouts, from the Values of one evaluation over ``sizes``."""
    out = [to_contract_layout(c, env[c.outputs[0]], sizes)]
    for name in c.outputs[1:]:
        v = env[name]
        data = v.aligned(ROW_RANKS)
        present = v.aligned_present(ROW_RANKS)
        if present is not None:
            data = torch.where(
                present,
                data,
                torch.full((), ROW_OUTPUT_ABSENT, dtype=data.dtype, device=data.device),
            )
        out.append(data.expand(*(sizes[r] for r in ROW_RANKS)).contiguous())
    return tuple(out)


# -- evaluating within a memory budget ------------------------------------------------------------

ROW_RANKS = ("b", "h", "m")  # the ranks of the output's rows, outermost first: what boxes cut
BUDGET_SHARE = 4  # the estimate counts what the forward holds; a backward holds about as much again
# Blocks of query rows start at multiples of this: BLAS kernels compute rows in groups (of 4 to 16 on CPUs)
# and the last, partial group of a product another way, so a block boundary inside a group changes roundings.
ROW_GROUP = 64


def independent_rows(c: Cascade) -> tuple[str, ...]:
    """The ranks among b, h and m along which the cascade computes its outputs row by row: every output has
    the rank, no Einsum reduces over it, and every tensor the cascade computes is read at its own coordinate
    there. Inputs may be read anywhere (a box keeps them whole): GLA reads its gates ``g[n, e]`` across m.

    >>> import einflash as ef
    >>> @ef.attention
    ... def smoothed(q, k, v):
    ...     s = q @ k * ef.scale
    ...     return ef.softmax(s + s[ef.m - 1, ef.n], "n") @ v
    >>> independent_rows(smoothed.cascade)  # s is read at m − 1: a row of m needs the one before it
    ('b', 'h')
    """
    return tuple(
        r
        for r in ROW_RANKS
        if all(r in c.tensor(o).ranks for o in c.outputs)
        and not any(e.reduce is not None and r in e.reduce.ranks for e in c.einsums)
        and not any(_read_across(c, e.out, r) for e in c.einsums)
    )


def _read_across(c: Cascade, name: str, rank: str) -> bool:
    """Whether some Einsum reads tensor ``name`` along ``rank`` at other than its own coordinate."""
    ranks = c.tensor(name).ranks
    return rank in ranks and any(
        x.tensor == name and sympy.sympify(x.index[ranks.index(rank)]) != coord(rank)
        for e in c.einsums
        for x in e.reads()
    )


def _boxed(
    c: Cascade, name: str, ranks: tuple[str, ...], data: torch.Tensor, box: Mapping[str, tuple[int, int]]
) -> Value:
    """Input ``name`` cut to ``box`` along the row ranks it is read at its own coordinate (whole along the
    others), as a contiguous copy: laid out as in an unboxed run, so that BLAS computes its rows alike."""
    origin = {}
    for d, r in enumerate(ranks):
        if r in box and not _read_across(c, name, r):
            lo, hi = box[r]
            data, origin[r] = data.narrow(d, lo, hi - lo), lo
    return Value(data.contiguous() if origin else data, ranks, None, origin)


def footprint(c: Cascade, extents: Mapping[str, int], itemsize: int) -> int:
    """Bytes one evaluation of the cascade over ``extents`` may hold, from its ranks: every tensor an Einsum
    makes (each operator's result, each gathered read with its indices, its output, and its iteration space
    where a filter, a reduction or a product of three factors materialises it), each element in ``itemsize``
    bytes plus a presence flag. Autograd keeps them all, so it is counted as if nothing were freed; torch's
    allocations for the catalogue, measured on the CPU, peaked at 0.4 to 1.9 times this, backward included.

    >>> import einflash as ef
    >>> @ef.attention
    ... def plain(q, k, v):
    ...     return ef.softmax(q @ k * ef.scale, "n") @ v
    >>> footprint(plain.cascade, dict(b=1, h=1, m=100, n=100, e=64, f=64), 8) < 100 * 100 * 64 * 8  # no m×n×e
    True
    """
    elements = 0
    for ranks, count in _materialised(c):
        elements += count * math.prod(extents[r] for r in ranks)
    return elements * (itemsize + 1)


@functools.lru_cache(maxsize=256)
def _materialised(c: Cascade) -> tuple[tuple[tuple[str, ...], int], ...]:
    """The rank sets of the tensors evaluating ``c`` makes, with how many of each (see :func:`footprint`)."""
    counts: dict[tuple[str, ...], int] = {}

    def add(ranks, count: int = 1) -> None:
        key = rank_order(ranks)
        counts[key] = counts.get(key, 0) + count

    for e in c.einsums:
        products = e.reduce is not None and e.reduce.op == "sum" and e.where is None
        # a sum of products is contracted by torch.einsum from its factors: their products are never formed
        roots = list(_factors(e.expr)) if products else [e.expr]
        roots += [] if e.where is None else [e.where]
        for node in (x for root in roots for x in walk(root)):
            if isinstance(node, Call):
                add(free_ranks(node))
            elif isinstance(node, Read) and not _plain(node, c):  # a gather: its values, and int64 indices
                add(free_ranks(node), 2)
        add(e.ranks)
        if e.where is not None or (e.reduce is not None and not products):
            add(e.iteration_ranks)
        elif products and len(roots) > 2:  # torch.einsum forms a pairwise product, and copies it to contract it
            add(e.iteration_ranks, 2)
    return tuple(counts.items())


def _plain(x: Read, c: Cascade) -> bool:
    """A read of a tensor at its own coordinates: a view, no copy."""
    return tuple(x.index) == tuple(coord(r) for r in c.tensor(x.tensor).ranks)


def row_boxes(
    c: Cascade, extents: Mapping[str, int], itemsize: int, max_bytes: float
) -> list[dict[str, tuple[int, int]]]:
    """Boxes of rows that cover the output once, each within ``max_bytes`` by :func:`footprint` where one row
    of the cascade's :func:`independent_rows` fits: the outer row ranks one coordinate at a time, then as many
    coordinates of the next as fit, the inner ones whole. ``[{}]`` (everything at once) when it all fits.

    >>> import einflash as ef
    >>> @ef.attention
    ... def plain(q, k, v):
    ...     return ef.softmax(q @ k * ef.scale, "n") @ v
    >>> sizes = dict(b=2, h=3, m=10, n=10, e=8, f=8)
    >>> row = footprint(plain.cascade, sizes | dict(b=1, h=1, m=1), 8)
    >>> row_boxes(plain.cascade, sizes, 8, 25 * row)[:2]  # 25 query rows' worth: two heads at a time
    [{'b': (0, 1), 'h': (0, 2)}, {'b': (0, 1), 'h': (2, 3)}]
    >>> len(row_boxes(plain.cascade, sizes, 8, 4 * row))  # 4 rows' worth: 3 boxes per head
    18
    """

    def cost(sizes: Mapping[str, int]) -> int:
        return footprint(c, {**extents, **sizes}, itemsize)

    if cost({}) <= max_bytes:
        return [{}]
    rows = independent_rows(c)
    if not rows:
        return [{}]
    # the outermost rank of which one coordinate (with the ranks inside it whole) fits, else the innermost
    i = next((i for i, r in enumerate(rows) if cost(dict.fromkeys(rows[: i + 1], 1)) <= max_bytes), len(rows) - 1)
    rank, ones = rows[i], dict.fromkeys(rows[:i], 1)
    lo, hi = 1, max(1, extents[rank])  # the largest block of that rank that fits, at least one coordinate
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if cost(ones | {rank: mid}) <= max_bytes else (lo, mid - 1)
    if rank == "m" and lo > ROW_GROUP:
        lo -= lo % ROW_GROUP
    return [
        {**{r: (x, x + 1) for r, x in zip(rows[:i], at)}, rank: (s, min(s + lo, extents[rank]))}
        for at in itertools.product(*(range(extents[r]) for r in rows[:i]))
        for s in range(0, extents[rank], lo)
    ]


def memory_budget(device: torch.device) -> float:
    """What one reference evaluation may hold on ``device``: a ``1/BUDGET_SHARE`` share of its free memory
    (on a GPU, with what torch's allocator has cached but does not use; on the CPU, Linux's MemAvailable),
    or no bound (infinity) where that is not known."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return (free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)) // BUDGET_SHARE
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
        except (OSError, StopIteration, ValueError, IndexError):
            return math.inf
        return kib * 1024 // BUDGET_SHARE
    return math.inf
