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

from dataclasses import dataclass, field, replace

import torch

from ..errors import LoweringError
from ..ir.cascade import Cascade, Einsum, Layout, Reduction, Role, TensorDecl, plain_read
from ..ir.expr import Call, Const, Expr, Merge, Read, call, free_ranks, reads, transform, walk
from ..ir.printer import format_cascade
from ..ir.ranks import PARALLEL, STREAM, coord, rank_order
from ..ir.validate import validate
from ..templates import render
from .algebra import factors, product
from .blocks import tile_lists
from .forward import DTYPE_NAMES, Forward, accumulator_dtype
from .gradient import Gradient, Partial, _depends, finish, gradient_of, presence_predicate, prune
from .launch import KernelCall, Launcher, jit_launch
from .lower import FORWARD_META, FORWARD_RUNTIME, exact_dots, helpers, kernel_name, source_digest
from .masks import KeyRange, _mask_einsum, conjuncts, key_plan, query_plan
from .replay import Recording
from .rewrites import fresh_name
from .strength import LOG2E, _scalar
from .tilecode import Tile, TileCode, axis_extent, bcast, presence, tile_axes

ROWS_BLOCK_M = 64  # query rows per program of the rows kernel (memory-bound and tiny)
KEYS_FIRST = ("b", "h", "n", "m")  # tile axes of the dK/dV kernel: its dots take key-major tiles untransposed
ROWS_WARPS = 4
# the templates' own parameters after the generated ones (runtime, then tl.constexpr)
ROWS_RUNTIME, ROWS_META = ("M", "N", "H", "GROUP"), ("BLOCK_M",)
KV_RUNTIME, KV_META = ("M", "N", "H", "GROUP", "visits_ptr"), ("BLOCK_M", "BLOCK_N", "NUM_STAGES", "COUNT_VISITS")


@dataclass(frozen=True)
class BackwardSchedule:
    """How the backward runs.

    The dK/dV kernel keeps ``block_n`` keys per program and streams queries ``block_m`` at a time, in a
    pipeline ``num_stages`` deep; the dQ kernel keeps ``block_n`` queries and streams keys ``block_m`` at a
    time (each keeps the larger tile), ``dq_stages`` deep (0: ``num_stages``). ``max_registers``: the register
    budget per thread given to ptxas for both (0: its own choice). ``one_launch``: the dK/dV and dQ programs
    run in one launch (``attention_bwd.py.jinja``), so neither kernel's last wave idles the GPU. ``atomic_dq``:
    no dQ kernel; the dK/dV kernel adds the query-side gradients atomically (fp32), so their bits may differ
    from run to run on a GPU.

    >>> BackwardSchedule(32, 128, 8, 2).deterministic
    True
    >>> BackwardSchedule.from_ints(BackwardSchedule(64, 128, 8, 2, dq_stages=3).to_ints())
    BackwardSchedule(block_m=64, block_n=128, num_warps=8, num_stages=2, atomic_dq=False, dq_stages=3, \
max_registers=0, one_launch=True)
    """

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    atomic_dq: bool = False
    dq_stages: int = 0
    max_registers: int = 0
    one_launch: bool = True

    @property
    def deterministic(self) -> bool:
        return not self.atomic_dq

    @property
    def dq_depth(self) -> int:
        """The dQ kernel's pipeline depth."""
        return self.dq_stages or self.num_stages

    def describe(self) -> str:
        """A short label: tiles, warps, stages (dK/dV, then dQ), register budget, launches.

        >>> BackwardSchedule(64, 128, 8, 2, dq_stages=3, max_registers=240).describe()
        '64x128 w8 s2/3 r240 one launch'
        """
        stages = f"s{self.num_stages}" + (f"/{self.dq_stages}" if self.dq_stages else "")
        regs = f" r{self.max_registers}" if self.max_registers else ""
        how = " atomic dq" if self.atomic_dq else " one launch" if self.one_launch else " two launches"
        return f"{self.block_m}x{self.block_n} w{self.num_warps} {stages}{regs}{how}"

    def to_ints(self) -> list[int]:
        """The schedule as the training custom op takes it (``from_ints`` reads it back)."""
        return [self.block_m, self.block_n, self.num_warps, self.num_stages, int(self.atomic_dq), self.dq_stages,
                self.max_registers, int(self.one_launch)]

    @classmethod
    def from_ints(cls, ints: list[int]) -> "BackwardSchedule":
        bm, bn, warps, stages, atomic, *rest = ints
        dq, regs, one = (list(rest) + [0, 0, 1])[:3]
        return cls(bm, bn, warps, stages, bool(atomic), dq, regs, bool(one))


# fp32 values per thread a broadcast tile (BM x BN x widest head dim) may take in a backward kernel
BROADCAST_VALUES_PER_THREAD = 128


def default_backward_schedule(extents: dict[str, int], target, broadcast: bool = False) -> BackwardSchedule:
    """The target's backward tiles for the widest head dimension (see ``Target.backward``); deterministic.

    ``broadcast``: the cascade reduces a tile that no matrix multiply computes (GLA's BM x BN x E decay
    product, ``einflash.compiler.analysis.broadcast_reduction``); the tiles then shrink until it fits
    the threads' registers.

    >>> from einflash.backends import get_target
    >>> default_backward_schedule(dict(b=2, h=16, m=4096, n=4096, e=128, f=128), get_target("sm90")).describe()
    '64x128 w8 s2/3 r240 one launch'
    >>> default_backward_schedule(dict(b=2, h=16, m=4096, n=4096, e=128, f=128), get_target("sm90"), True).describe()
    '16x16 w8 s2/3 r240 one launch'
    """
    if target.backward is None:
        raise LoweringError(f"target {target.name} has no backward tile configurations")
    widest = max([v for r, v in extents.items() if r not in ("b", "h", "m", "n")] + [16])
    widest = 1 << max(0, widest - 1).bit_length()
    cfg = target.backward.default(widest)
    bm, bn = cfg.block_m, cfg.block_n
    if broadcast and target.gpu is not None:
        budget = BROADCAST_VALUES_PER_THREAD * target.gpu.warp_size * cfg.num_warps
        while bm * bn * widest > budget and max(bm, bn) > 16:
            bm, bn = (bm // 2, bn) if bm >= bn else (bm, bn // 2)
    dq = next((stages for largest, stages in target.backward_dq_stages if widest <= largest), 0)
    return BackwardSchedule(bm, bn, cfg.num_warps, cfg.num_stages, dq_stages=dq, max_registers=cfg.max_registers)


# -- the kernels' parts of the gradient cascade -------------------------------------------------


@dataclass(frozen=True)
class Parts:
    """The gradient cascade cut into the kernels' cascades; ``row_terms`` are computed by ``rows`` and read
    by the others; ``kv_atomic`` is the dK/dV kernel of the atomic schedule (query-side partials too)."""

    rows: Cascade | None
    kv: Cascade | None
    q: Cascade | None
    kv_atomic: Cascade | None
    row_terms: tuple[str, ...]


def _given(c: Cascade, names: set[str]) -> Cascade:
    """``c`` with the tensors ``names`` read as inputs instead of computed."""
    tensors = tuple(replace(t, role=Role.INPUT) if t.name in names else t for t in c.tensors)
    tensors = tuple(t for t in tensors if t.role is Role.INPUT) + tuple(t for t in tensors if t.role is not Role.INPUT)
    return replace(c, tensors=tensors, einsums=tuple(e for e in c.einsums if e.out not in names))


def _part(g: Cascade, name: str, outputs: list[str], given: set[str]) -> Cascade | None:
    if not outputs:
        return None
    return prune(replace(_given(g, given), name=f"{g.name}_{name}", outputs=tuple(outputs)))


def one_rank_reductions(c: Cascade, order: tuple[str, ...]) -> Cascade:
    """Every reduction over several ranks as a chain of reductions over one rank each, the ranks in
    ``order`` last and in that order (Σ_{m,n} x = Σ_n Σ_m x); sums only."""
    einsums, tensors, taken = [], list(c.tensors), set()
    for e in c.einsums:
        if e.reduce is None or len(e.reduce.ranks) == 1:
            einsums.append(e)
            continue
        if e.reduce.op != "sum":
            raise LoweringError(f"{c.where(e)}: a {e.reduce.op} over several ranks has no one-rank form here")
        ranks = sorted(e.reduce.ranks, key=lambda r: order.index(r) if r in order else -1)
        its, body, where = set(e.iteration_ranks), e.expr, e.where
        for r in ranks[:-1]:
            its.discard(r)
            name = fresh_name(c, f"{e.out}__{r}", taken)
            taken.add(name)
            decl = TensorDecl(name, rank_order(its))
            tensors.append(decl)
            einsums.append(Einsum(name, decl.ranks, body, Reduction("sum", (r,)), where, line=e.line))
            body, where = plain_read(decl), None
        einsums.append(Einsum(e.out, e.ranks, body, Reduction("sum", (ranks[-1],)), where, line=e.line))
    out = replace(c, tensors=tuple(tensors), einsums=tuple(einsums))
    validate(out, contract=False)
    return out


def inline_row_products(c: Cascade) -> Cascade:
    """Row-level products (``d_o·(1/den)``) written into the Einsums that read them, so that a contraction takes
    the row factor out of the dot and keeps the loaded operand as it is (no product tile to stage)."""
    products = {e.out: e.expr for e in c.einsums if e.reduce is None and e.where is None and e.out not in c.outputs
                and STREAM not in e.iteration_ranks and isinstance(e.expr, Call) and e.expr.op in ("mul", "div")}

    def sub(x):
        if _plain(c, x) and x.tensor in products:
            return transform(products[x.tensor], sub)
        return None

    einsums = tuple(replace(e, expr=transform(e.expr, sub)) for e in c.einsums if e.out not in products)
    return prune(replace(c, einsums=einsums))


def _plain(c: Cascade, x) -> bool:
    """A read of a whole tensor at its own coordinates (not of its previous chunk)."""
    return isinstance(x, Read) and not x.prev and tuple(x.index) == tuple(coord(r) for r in c.tensor(x.tensor).ranks)


def _row_tensor(c: Cascade, name: str) -> bool:
    return tuple(r for r in c.tensor(name).ranks if r not in PARALLEL) == ("m",)


def _is_reciprocal(e: Einsum) -> bool:
    x = e.expr
    return e.reduce is None and e.where is None and isinstance(x, Call) and x.op == "div" \
        and x.args[0] == Const(1.0) and isinstance(x.args[1], Read)


def _precomputed(e: Einsum) -> bool:
    """Whether a row map the pair kernels read is computed once per row by the rows kernel: a reciprocal, or one
    that takes a logarithm (a libdevice call of some thirty instructions for each row of every tile pair)."""
    return _is_reciprocal(e) or (e.reduce is None and any(isinstance(x, Call) and x.op == "log" for x in walk(e.expr)))


def row_reciprocals(c: Cascade) -> Cascade:
    """Divisions by a row tensor (``x / den[m]``) in Einsums that iterate more than rows, as products with
    the row's reciprocal ``den__recip[m] = 1 / den[m]``: an Einsum of its own, placed after ``den``'s
    producer, which ``cut`` has the rows kernel precompute. The dK/dV kernel then multiplies where it
    divided once per query row in every tile of keys.
    """
    recips: dict[str, str] = {}
    taken: set[str] = set()

    def sub(x):
        if isinstance(x, Call) and x.op == "div" and _plain(c, x.args[1]):
            den = x.args[1]
            if _row_tensor(c, den.tensor):
                if den.tensor not in recips:
                    recips[den.tensor] = fresh_name(c, f"{den.tensor}__recip", taken)
                    taken.add(recips[den.tensor])
                num = transform(x.args[0], sub)
                read = Read(recips[den.tensor], den.index)
                return read if num == Const(1.0) else call("mul", num, read)
        return None

    einsums = []
    for e in c.einsums:
        rows_only = {r for r in e.iteration_ranks if r not in PARALLEL} == {"m"}
        einsums.append(e if rows_only or _is_reciprocal(e) else replace(e, expr=transform(e.expr, sub)))
    if not recips:
        return c
    tensors = list(c.tensors)
    for den, name in recips.items():
        decl = c.tensor(den)
        tensors.append(TensorDecl(name, decl.ranks))
        recip = Einsum(name, decl.ranks, call("div", Const(1.0), plain_read(decl)))
        producer = c.producer(den)
        at = 0 if producer is None else next(i for i, e in enumerate(einsums) if e.out == den) + 1
        einsums.insert(at, recip)
    out = replace(c, tensors=tuple(tensors), einsums=tuple(einsums))
    validate(out, contract=False)
    return out


def _without(fs: list, factor: Expr, exponent: int) -> list | None:
    """The factors ``fs`` less one occurrence of ``factor``**``exponent`` (None: it has none)."""
    i = next((i for i, (f, k) in enumerate(fs) if f == factor and k == exponent), None)
    return None if i is None else [fk for fk in fs[:i] + fs[i + 1:] if fk[0] != Const(1.0)]


def normalised_exponentials(c: Cascade) -> Cascade:
    """A softmax's gradient in FlashAttention's form: its exponentials divided by their row sum where they are
    made, not where they are read.

    The derived gradient reads ``num[m,n] = exp2(x)`` only with the row divisor ``den``: through
    ``d_o_acc = g/den`` in ``d_v = Σ_m d_o_acc·num``, and through ``num``'s adjoint
    ``d_num = Σ_f d_o_acc·v +∪ d_den`` in ``d_x = d_num·…·num``. With ``p = exp2(x − log2 den) = num/den``
    and the adjoint scaled by ``den`` these read ``d_v = Σ_m g·p``, ``d_num·den = Σ_f g·v +∪ d_den·den`` and
    ``d_x = (d_num·den)·…·p``, where ``d_den·den`` is ``d_den``'s reduction with ``1/den`` cancelled (``Σ_f
    d_o·−o``): each pair of a tile then takes one subtraction and no products by ``1/den``. Cascades without
    this structure come back unchanged.
    """
    for dn in c.einsums:
        x = dn.expr
        if not (dn.reduce is None and dn.where is None and isinstance(x, Call) and x.op == "add"
                and x.merge is Merge.ANY and all(_plain(c, a) for a in x.args)):
            continue
        found = _normalised_match(c, dn)
        if found is not None:
            return found
    return c


def _normalised_match(c: Cascade, dn: Einsum) -> Cascade | None:
    """``normalised_exponentials`` around the adjoint ``dn`` (``d_num = y +∪ d_den``), or None where it does not
    have the structure."""
    y, r = (a.tensor for a in dn.expr.args)
    if _row_tensor(c, y):
        y, r = r, y
    dp, rp = c.producer(y), c.producer(r)
    if not _row_tensor(c, r) or dp is None or rp is None or rp.reduce is None or rp.reduce.op != "sum" \
            or dp.reduce is None or dp.reduce.op != "sum" or len(c.producers(y)) != 1 or len(c.producers(r)) != 1:
        return None
    # y = Σ_f acc·v with acc = g/den
    acc = next((f for f, k in factors(dp.expr) if k == 1 and _plain(c, f) and c.producer(f.tensor) is not None
                and c.producer(f.tensor).reduce is None), None)
    if acc is None:
        return None
    pa = c.producer(acc.tensor)
    den = next((f for f, k in factors(pa.expr) if k == -1 and _plain(c, f) and _row_tensor(c, f.tensor)), None)
    if den is None or pa.where is not None or len(c.producers(acc.tensor)) != 1:
        return None
    g = product(_without(factors(pa.expr), den, -1))
    r_scaled = _without(factors(rp.expr), den, -1)  # d_den's summand with 1/den cancelled
    # num's only readers: the adjoint's one product and d_v = Σ_m acc·num
    users = c.consumers(dn.out)
    if len(users) != 1 or users[0].reduce is not None or r_scaled is None:
        return None
    dx = users[0]
    num = next((f for f, k in factors(dx.expr) if k == 1 and _plain(c, f) and f.tensor != dn.out
                and c.producer(f.tensor) is not None and isinstance(c.producer(f.tensor).expr, Call)
                and c.producer(f.tensor).expr.op == "exp2"), None)
    if num is None or _without(factors(dx.expr), plain_read(c.tensor(dn.out)), 1) is None:
        return None
    pn = c.producer(num.tensor)
    dv = [e for e in c.consumers(num.tensor) if e is not dx]
    rest = None if len(dv) != 1 else _without(factors(dv[0].expr), num, 1)  # d_v's summand without num
    if len(c.producers(num.tensor)) != 1 or pn.reduce is not None or rest is None or dv[0].reduce is None \
            or _without(rest, acc, 1) is None:
        return None
    if {e.out for e in c.consumers(acc.tensor)} != {y, dv[0].out} or c.consumers(y) != [dn] \
            or c.consumers(r) != [dn] or any(dn.out == o or num.tensor == o for o in c.outputs):
        return None
    taken: set[str] = set()

    def name(base: str) -> str:
        taken.add(fresh := fresh_name(c, base, taken))
        return fresh

    p, y2, r2, dn2 = name("p"), name(f"{y}__scaled"), name(f"{r}__scaled"), name(f"{dn.out}__scaled")
    lse = name("lse2")
    log2_den = call("mul", call("log", den), Const(LOG2E))
    arg = pn.expr.args[0]
    row = isinstance(arg, Call) and arg.op == "sub" and arg.merge is Merge.ALL \
        and free_ranks(arg.args[1]) <= set(c.tensor(den.tensor).ranks)
    lse_expr = call("add", arg.args[1], log2_den) if row else log2_den
    lse_read = plain_read(TensorDecl(lse, c.tensor(den.tensor).ranks))
    shifted = call("sub", arg.args[0] if row else arg, lse_read)
    renamed = {num.tensor: p, acc.tensor: None, y: y2, r: r2, dn.out: dn2}

    def sub(x):
        if isinstance(x, Read) and x.tensor in renamed:
            return g if renamed[x.tensor] is None else Read(renamed[x.tensor], x.index, x.prev)
        return None

    lse_einsum = Einsum(lse, c.tensor(den.tensor).ranks, lse_expr, line=pn.line)
    rewritten = {pn.out: replace(pn, out=p, expr=call("exp2", shifted)),
                 dp.out: replace(dp, out=y2, expr=transform(dp.expr, sub)),
                 rp.out: replace(rp, out=r2, expr=product(r_scaled)),
                 dn.out: replace(dn, out=dn2, expr=transform(dn.expr, sub))}
    einsums = [rewritten.get(e.out, replace(e, expr=transform(e.expr, sub))) for e in c.einsums
               if e.out != acc.tensor]
    # lse2 after what it reads, p after lse2: both before p's readers, which come after the adjoint (it reads den)
    read = {x.tensor for x in reads(lse_expr)}
    einsums.insert(1 + max(i for i, e in enumerate(einsums) if e.out in read), lse_einsum)
    made, after = (next(i for i, e in enumerate(einsums) if e.out == name_) for name_ in (p, lse))
    if after > made:
        einsums.insert(after, einsums.pop(made))
    decls = {p: num.tensor, y2: y, r2: r, dn2: dn.out, lse: den.tensor}
    tensors = list(c.tensors) + [TensorDecl(new, c.tensor(old).ranks) for new, old in decls.items()]
    out = prune(replace(c, tensors=tuple(tensors), einsums=tuple(einsums)))
    validate(out, contract=False)
    return out


def fold_scalar_chains(c: Cascade) -> Cascade:
    """A product map read only by one other product map written into it, and the constants of the result
    multiplied into one (``d_s2 = d_num·ln 2·num``, ``d_dot = d_s2·scale·log2 e`` become ``d_num·num·scale``):
    the chain rule through exp2 and the base-2 scaling leaves constants that cancel."""

    def is_product(e: Einsum) -> bool:
        return e.reduce is None and e.where is None and isinstance(e.expr, Call) and e.expr.op in ("mul", "div") \
            and e.expr.merge is Merge.ALL

    einsums = list(c.einsums)
    changed = True
    while changed:
        changed = False
        for p in einsums:
            users = [e for e in einsums if any(r.tensor == p.out for r in e.reads())]
            if not is_product(p) or p.out in c.outputs or len(users) != 1 or not is_product(users[0]):
                continue
            u = users[0]
            if any(r.tensor == p.out and not _plain(c, r) for r in u.reads()):
                continue

            def sub(x, p=p):
                return p.expr if isinstance(x, Read) and x.tensor == p.out else None

            fs = factors(transform(u.expr, sub))
            scalar = 1.0
            for f, k in fs:
                if isinstance(f, Const):
                    scalar = scalar * f.value if k > 0 else scalar / f.value
            rest = [(f, k) for f, k in fs if not isinstance(f, Const)]
            folded = product(rest + ([(Const(scalar), 1)] if scalar != 1.0 or not rest else []))
            einsums = [replace(u, expr=folded) if e is u else e for e in einsums if e is not p]
            changed = True
            break
    return prune(replace(c, einsums=tuple(einsums)))


def scalars_after_sums(c: Cascade) -> Cascade:
    """A sum of products whose operand carries rank-free factors (``d_k = Σ_m d_dot·q`` with ``d_dot = (x·scale
    :: mask)``) as the sum of the operand without them, scaled once after the sum (``d_k = d_k__sum·scale``):
    one multiply per result element after the loop instead of one per pair in every tile. The operand's chain
    (masks included: masking commutes with a rank-free scale) must have no other reader."""
    einsums = list(c.einsums)
    tensors, taken = list(c.tensors), set()
    for e in c.einsums:
        if e.reduce is None or e.reduce.op != "sum" or e.where is not None or e.out in taken:
            continue
        for a, k in factors(e.expr):
            if k != 1 or not _plain(c, a):
                continue
            t = a.tensor
            while len(c.consumers(t)) == 1 and c.producer(t) is not None and c.producer(t).where is not None \
                    and c.producer(t).reduce is None and _plain(c, c.producer(t).expr):
                t = c.producer(t).expr.tensor  # through a mask to what it masks
            made = c.producer(t)
            fs = [] if made is None else factors(made.expr)
            scalars = [(f, j) for f, j in fs if _scalar(f)]
            if made is None or made.reduce is not None or made.where is not None or not scalars \
                    or len(scalars) == len(fs) or len(c.consumers(t)) != 1 or len(c.consumers(a.tensor)) != 1:
                continue
            taken.add(raw := fresh_name(c, f"{e.out}__sum", taken))
            tensors.append(TensorDecl(raw, c.tensor(e.out).ranks))
            at = einsums.index(e)
            einsums[einsums.index(made)] = replace(made, expr=product([f for f in fs if f not in scalars]))
            einsums[at:at + 1] = [replace(e, out=raw),
                                  Einsum(e.out, e.ranks, call("mul", plain_read(tensors[-1]), product(scalars)),
                                         line=e.line)]
            break
    if not taken:
        return c
    out = replace(c, tensors=tuple(tensors), einsums=tuple(einsums))
    validate(out, contract=False)
    return out


def cut(g: Gradient) -> Parts:
    """The kernels' cascades of a gradient (see the module docstring)."""
    c = row_reciprocals(normalised_exponentials(g.cascade))
    by = {k: [p.name for p in g.partials if p.kernel == k] for k in ("rows", "q", "kv")}
    pair_reads = {r.tensor for e in c.einsums if STREAM in e.iteration_ranks for r in e.reads()}
    # row maps are recomputed where they are read; row reductions the pair kernels need are precomputed
    todo, seen = list(pair_reads), set()
    while todo:
        t = todo.pop()
        e = c.producer(t)
        if t in seen or e is None or STREAM in e.iteration_ranks:
            continue
        seen.add(t)
        if e.reduce is None:
            todo += [r.tensor for r in e.reads()]
    row_terms = tuple(e.out for e in c.einsums if e.out in seen and (e.reduce is not None or _precomputed(e)))
    rows = _part(c, "rows", list(row_terms) + by["rows"], set())
    given = set(row_terms)
    kv, q = _part(c, "kv", by["kv"], given), _part(c, "q", by["q"], given)
    both = _part(c, "kv", by["kv"] + by["q"], given) if by["q"] else kv
    def streamed(part, order, hoist=True):
        part = part and fold_scalar_chains(inline_row_products(part))
        # not for the atomic schedule's kernel: its query-side sums are added per tile, with no after
        return part and one_rank_reductions(scalars_after_sums(part) if hoist else part, order)

    return Parts(rows and one_rank_reductions(rows, ("m",)), streamed(kv, ("m", "n")), streamed(q, ("n", "m")),
                 streamed(both, ("m", "n"), hoist=False), row_terms)


@dataclass(frozen=True)
class Streamed:
    """A kernel's cascade with the Einsums that iterate ``rank`` in one loop over its tiles: reductions
    over ``rank`` are running sums (states ``S = S@prev +∪ S_chunk``)."""

    cascade: Cascade
    rank: str
    prologue: tuple[Einsum, ...]
    loop: tuple[Einsum, ...]
    epilogue: tuple[Einsum, ...]
    sums: tuple[str, ...]


def stream(c: Cascade, rank: str) -> Streamed:
    """Put the Einsums of ``c`` that iterate ``rank`` into one loop over tiles of it."""
    iterating = {e.out for e in c.einsums if rank in e.iteration_ranks}
    pro, loop, epi, sums, after = [], [], [], [], set()
    tensors, taken = list(c.tensors), set()
    for e in c.einsums:
        reads = {r.tensor for r in e.reads()}
        if e.out in iterating:
            late = reads & (set(sums) | after)
            if late:
                raise LoweringError(f"{c.where(e)}: reads {sorted(late)[0]}, a sum over all of {rank}; the "
                                    f"gradient would need another pass over {rank}")
            if e.reduce is not None and rank in e.reduce.ranks:
                chunk = fresh_name(c, f"{e.out}_chunk", taken)
                taken.add(chunk)
                decl = c.tensor(e.out)
                tensors = [replace(t, role=Role.STATE, init=0.0) if t.name == e.out else t for t in tensors]
                tensors.append(TensorDecl(chunk, decl.ranks))
                loop.append(replace(e, out=chunk, loop=True))
                update = call("add", plain_read(decl, prev=True), plain_read(TensorDecl(chunk, decl.ranks)),
                              merge=Merge.ANY)
                loop.append(Einsum(e.out, e.ranks, update, loop=True, line=e.line))
                sums.append(e.out)
            else:
                loop.append(replace(e, loop=True))
        elif reads & (iterating | after):
            epi.append(e)
            after.add(e.out)
        else:
            pro.append(e)
    out = replace(c, tensors=tuple(tensors), einsums=tuple(pro + loop + epi))
    validate(out, contract=False)
    return Streamed(out, rank, tuple(pro), tuple(loop), tuple(epi), tuple(sums))


# -- tile code ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Output:
    """Where a kernel stores a tensor: ``ranks`` after the batch and head dims (head ``head``), and per
    program (``program`` names its index) or per tile pair (``in_loop``), or atomically added."""

    name: str
    ranks: tuple[str, ...]
    head: str = "off_h"
    program: str | None = None
    atomic: bool = False


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
    lists: object = None  # run-time key tile lists (dQ kernel of a document mask), as the forward's
    runtime_args: tuple[str, ...] = ()  # the kernel's parameters given at launch, in order
    constexpr_args: tuple[str, ...] = ()  # then its tl.constexpr parameters, in order
    body: str = ""  # the kernel as a function given its program ids, for the one-launch kernel (dK/dV, dQ)

    @property
    def arguments(self) -> tuple[str, ...]:
        return self.runtime_args + self.constexpr_args

    def call(self, grid: tuple[int, ...], values: list, warps: int, stages: int, max_registers: int = 0) -> KernelCall:
        """The launch of this kernel with every argument, in order (as the forward's are made)."""
        if len(values) != len(self.arguments):
            raise LoweringError(f"internal: kernel {self.name} takes {len(self.arguments)} arguments, the launch "
                                f"built {len(values)}")
        return KernelCall(tuple(grid) + (1,) * (3 - len(grid)), dict(zip(self.arguments, values)), warps, stages,
                          max_registers)


class _Gen:
    """TileCode instances of one kernel, sharing its variable counter and settings."""

    def __init__(self, c: Cascade, dims: dict, dtype: str, ints: frozenset, states_full: frozenset,
                 order: tuple[str, ...] | None = None):
        self.c, self.dims, self.ints, self.order = c, dims, ints, order
        self.exact, self.acc = exact_dots(dtype)
        first = next((t.name for t in c.inputs if t.layout in (Layout.QUERY, Layout.KEY) and t.name not in ints),
                     None)
        self.dot = self.acc if self.exact or first is None else f"{first}_ptr.dtype.element_ty"
        self.counter = [0]
        self.states_full = states_full  # presence predicates of saved states, provably true on full tiles

    def code(self, env: dict, loads: dict, masked: bool, skip=frozenset(), **kw) -> TileCode:
        return TileCode(self.c, self.dims, masked, frozenset(skip), dict(env), [], self.dot, self.exact, dict(loads),
                        self.counter, int_inputs=self.ints, acc=self.acc, order=self.order, packed_heads=False, **kw)

    def zeros(self, g: TileCode, names) -> None:
        """Running sums start at 0, present everywhere (an empty sum adds nothing)."""
        for s in names:
            ranks = tile_axes([r for r in self.c.tensor(s).ranks if r not in PARALLEL], self.order)
            g.emit(f"v_{s} = tl.zeros([{', '.join(axis_extent(r) for r in ranks)}], dtype={self.acc})")
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
    terms = [f"{out.name}_ptr", f"mem_b * stride_{out.name}_0", f"{out.head} * stride_{out.name}_1"]
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


def _with_key_edge(t: Tile, loaded: bool) -> Tile:
    """A tile over n loaded before the loops, as masked code sees it: keys past N absent (loaded as 0)."""
    if "n" not in t.ranks:
        return t
    present, pranks = presence([t, Tile("", (), "(offs_n < N)", ("n",))], order=KEYS_FIRST)
    return replace(t, present=present, pranks=pranks, fill=0.0 if loaded and t.fill in (None, 0.0) else None)


def _args(c: Cascade, tensors, outputs: tuple[Output, ...]) -> list[str]:
    args = []
    for name in tensors:
        args += [f"{name}_ptr"] + [f"stride_{name}_{d}" for d in range(len(c.tensor(name).ranks))]
    for o in outputs:
        nd = 2 + (o.program is not None) + len(o.ranks)
        args += [f"{o.name}_ptr"] + [f"stride_{o.name}_{d}" for d in range(nd)]
    return args


def _notation(c: Cascade) -> str:
    return "\n".join("# " + line for line in format_cascade(c).splitlines())


def _dim_names(dims: dict) -> list[str]:
    return sorted(k for k in dims if not k.endswith("_extent"))


def _used_inputs(c: Cascade) -> tuple[str, ...]:
    used = {r.tensor for e in c.einsums for r in e.reads()}
    return tuple(t.name for t in c.inputs if t.name in used)


def lower_rows(c: Cascade, outputs: tuple[Output, ...], dims: dict, dtype: str, ints: frozenset) -> BackwardKernel:
    """The rows kernel: every Einsum of ``c`` (none iterates n) for BLOCK_M rows, then the stores."""
    gen = _Gen(c, dims, dtype, ints, frozenset())
    g = gen.code({}, {}, masked=True, row_edge=True)
    for e in c.einsums:
        g.einsum(e)
    for o in outputs:
        store(g, o, g.env[o.name])
    tensors = _used_inputs(c)
    args = _args(c, tensors, outputs) + [f"p_{p.name}" for p in c.params]
    name = kernel_name(c, dims, dtype, False).replace("attn_fwd__", "attn_bwd_rows__")
    names = _dim_names(dims)
    text = render("attention_bwd_rows.py.jinja", cascade_key=c.key, variant=c.name, notation=_notation(c),
                  kernel=name, args=",\n    ".join(args), constexprs=[f"D_{r}" for r in names],
                  dim_offsets=[(r, f"D_{r}") for r in names], body="\n".join(g.lines))
    return BackwardKernel(name, text, tensors, outputs, tuple(p.name for p in c.params),
                          tuple((f"D_{r}", dims[r]) for r in names), runtime_args=(*args, *ROWS_RUNTIME),
                          constexpr_args=(*(f"D_{r}" for r in names), *ROWS_META))


def _feeds(s: Streamed, outputs: set[str]) -> dict[str, set[str]]:
    """For each tensor, the outputs computed from it."""
    out: dict[str, set[str]] = {}
    for e in reversed(s.cascade.einsums):
        mine = out.setdefault(e.out, set()) | ({e.out} & outputs)
        out[e.out] = mine
        for r in e.reads():
            if not r.prev:
                out.setdefault(r.tensor, set()).update(mine)
    return out


def _group_level(s: Streamed, outputs: dict[str, Output], group_sums: set[str]) -> set[str]:
    """The sums and epilogue values a dK/dV program may add up over the query heads of its GQA group: they feed
    only gradients of key-layout inputs (``group_sums``), and linearly (sums of them)."""
    feeds = _feeds(s, set(outputs))
    epi = {e.out: e for e in s.epilogue}

    def linear(x) -> bool:  # a sum of reads, each perhaps scaled by a rank-free factor
        if isinstance(x, Read):
            return True
        if x.op == "add":
            return all(linear(a) for a in x.args)
        return x.op == "mul" and any(linear(a) and _scalar(b) for a, b in (x.args, x.args[::-1]))

    level = {x for x in s.sums if feeds.get(x) and feeds[x] <= group_sums}
    level |= {n for n, e in epi.items() if feeds.get(n) and feeds[n] <= group_sums and e.reduce is None
              and e.where is None and linear(e.expr)}
    while True:
        drop = {r.tensor for e in s.epilogue if e.out not in level for r in e.reads() if r.tensor in level}
        drop |= {n for n in level if n in epi and any(r.tensor not in level and r.tensor in set(s.sums) | set(epi)
                                                      for r in epi[n].reads())}
        if not drop:
            return level
        level -= drop


def lower_kv(s: Streamed, outputs: dict[str, Output], group_sums: set[str], dims: dict, dtype: str,
             ints: frozenset, states_full: frozenset, full_mask: frozenset | None) -> BackwardKernel:
    """The dK/dV kernel of a cascade streamed over m. ``group_sums``: gradients of key-layout inputs, summed over
    the query heads of a GQA group in the program where the cascade allows (the rest are stored per query head)."""
    c = s.cascade
    gen = _Gen(c, dims, dtype, ints, states_full, KEYS_FIRST)
    level = _group_level(s, outputs, group_sums)
    outputs = {n: replace(o, head="off_hk" if n in level else o.head, ranks=tile_axes(o.ranks, KEYS_FIRST))
               for n, o in outputs.items()}
    per_tile = {n for n, o in outputs.items() if "m" in o.ranks}  # per pair, or added atomically
    plan = query_plan(c, s.loop, frozenset(per_tile))

    # key-side loads: before the group loop if they do not depend on the query head, else per head
    pro = gen.code({}, {}, masked=False, edge_loads=True)
    gen.zeros(pro, [x for x in s.sums if x in level])
    head_pro = gen.code(pro.env, pro.loads, masked=False, edge_loads=True)
    for e in s.loop + s.prologue:
        for r in e.reads():
            decl = c.tensor(r.tensor)
            if decl.role is Role.INPUT and "m" not in {x.name for i in r.index for x in i.free_symbols}:
                per_head = "h" in decl.ranks and decl.layout is not Layout.KEY
                (head_pro if per_head else pro).load(r)
    head_pro.env.update(pro.env)
    head_pro.loads.update(pro.loads)
    for e in s.prologue:
        head_pro.einsum(e)
    gen.zeros(head_pro, [x for x in s.sums if x not in level])

    loops = []
    for kr in plan.ranges:
        full = _states_present(kr, full_mask)
        skip = set(kr.skip) | (set(states_full) if full else set())
        # masked code sees the keys past N of the tiles loaded before the loops as absent
        env = {k: (_with_key_edge(v, False) if kr.masked and k not in s.sums else v) for k, v in head_pro.env.items()}
        loads = {k: (_with_key_edge(v, True) if kr.masked else v) for k, v in head_pro.loads.items()}
        body = gen.code(env, loads, masked=kr.masked, skip=skip, row_edge=True)
        for x in s.sums:
            body.emit(f"v_{x}_prev = v_{x}")
        for e in s.loop:
            t = body.einsum(e)
            if e.out in per_tile:
                store(body, outputs[e.out], t)
        loops.append(dict(lo=kr.lo, hi=kr.hi, comment=kr.comment, body="\n".join(body.lines),
                          skip_tile=kr.skip_tile, pipelined=kr.pipelined, tile=kr.tile))
    head_epi = gen.code(head_pro.env, head_pro.loads, masked=False)
    epi = gen.code(pro.env, pro.loads, masked=False)
    for e in s.epilogue:
        (epi if e.out in level else head_epi).einsum(e)
    for n, o in outputs.items():
        if n not in per_tile:
            g = epi if n in level else head_epi
            store(g, o, g.env[n])

    tensors = _used_inputs(c)
    outs = tuple(outputs.values())
    args = _args(c, tensors, outs) + [f"p_{p.name}" for p in c.params]
    name = kernel_name(c, dims, dtype, False).replace("attn_fwd__", "attn_bwd_kv__")
    names = _dim_names(dims)
    text, body = _module_and_body(
        "attention_bwd_kv.py.jinja", cascade_key=c.key, variant=c.name, notation=_notation(c), kernel=name,
        args=",\n    ".join(args), constexprs=[f"D_{r}" for r in names], dim_offsets=[(r, f"D_{r}") for r in names],
        prologue="\n".join(pro.lines), tile_setup=plan.setup, head_prologue="\n".join(head_pro.lines),
        query_loops=loops, head_epilogue="\n".join(head_epi.lines), epilogue="\n".join(epi.lines))
    return BackwardKernel(name, text, tensors, outs, tuple(p.name for p in c.params),
                          tuple((f"D_{r}", dims[r]) for r in names), plan.ranges, runtime_args=(*args, *KV_RUNTIME),
                          constexpr_args=(*(f"D_{r}" for r in names), *KV_META), body=body)


def lower_q(s: Streamed, outputs: dict[str, Output], dims: dict, dtype: str, ints: frozenset,
            states_full: frozenset, full_mask: frozenset | None) -> BackwardKernel:
    """The dQ kernel of a cascade streamed over n, through the forward's one-pass template."""
    c = s.cascade
    gen = _Gen(c, dims, dtype, ints, states_full)
    keys = key_plan(c, s.loop)
    pro = gen.code({}, {}, masked=False)
    gen.zeros(pro, s.sums)
    for e in s.loop:
        for r in e.reads():
            if c.tensor(r.tensor).role is Role.INPUT and "n" not in {x.name for i in r.index for x in i.free_symbols}:
                pro.load(r)
    for e in s.prologue:
        pro.einsum(e)
    # on tiles the whole mask holds on, every row saw a key, so the saved states are present there: prologue
    # values computed from them are computed once more, without their presence, for those tiles
    full_env = pro.env
    if states_full and any(_states_present(kr, full_mask) for kr in keys.ranges):
        saved = {e.out for e in s.prologue if e.where is not None and set(conjuncts(e.where)) <= states_full}
        again = [e for e in s.prologue if e.out in saved or _depends(c, e.out, saved)]
        if again:
            pro2 = gen.code(pro.env, pro.loads, masked=False, skip=states_full, prefix="u_")
            for e in again:
                pro2.einsum(e)
            pro.lines += pro2.lines
            full_env = pro2.env
    loops = []
    for kr in keys.ranges:
        full = _states_present(kr, full_mask)
        body = gen.code(full_env if full else pro.env, pro.loads, masked=kr.masked,
                        skip=set(kr.skip) | (set(states_full) if full else set()))
        for x in s.sums:
            body.emit(f"v_{x}_prev = v_{x}")
        for e in s.loop:
            body.einsum(e)
        loops.append(dict(lo=kr.lo, hi=kr.hi, comment=kr.comment, body="\n".join(body.lines),
                          skip_tile=kr.skip_tile, pipelined=kr.pipelined, tile=kr.tile))
    epi = gen.code(pro.env, pro.loads, masked=False)
    for e in s.epilogue:
        epi.einsum(e)
    for n, o in outputs.items():
        store(epi, o, epi.env[n])
    tensors = _used_inputs(c)
    outs = tuple(outputs.values())
    args = _args(c, tensors, outs)
    if keys.lists is not None:
        args += ["tiles_ptr"] + [f"stride_tiles_{d}" for d in range(3)]
        args += ["counts_ptr"] + [f"stride_counts_{d}" for d in range(3)]
    args += [f"p_{p.name}" for p in c.params]
    name = kernel_name(c, dims, dtype, False).replace("attn_fwd__", "attn_bwd_q__")
    names = _dim_names(dims)
    text, body = _module_and_body(
        "attention_fwd.py.jinja", cascade_key=c.key, variant=c.name, notation=_notation(c), kernel=name,
        helpers=helpers(c), args=",\n    ".join(args), constexprs=[f"D_{r}" for r in names],
        dim_offsets=[(r, f"D_{r}") for r in names], prologue="\n".join(pro.lines), tile_setup=keys.setup,
        key_loops=loops, epilogue="\n".join(epi.lines))
    return BackwardKernel(name, text, tensors, outs, tuple(p.name for p in c.params),
                          tuple((f"D_{r}", dims[r]) for r in names), keys.ranges, keys.lists,
                          (*args, *FORWARD_RUNTIME), (*(f"D_{r}" for r in names), *FORWARD_META), body=body)


def _module_and_body(template: str, **slots) -> tuple[str, str]:
    """A kernel's module, and its function alone (given its program ids) for the one-launch kernel."""
    return render(template, entry=True, **slots), render(template, entry=False, **slots)


# the one-launch kernel's own parameters, after the two functions' (attention_bwd.py.jinja)
ONE_LAUNCH_RUNTIME = ("KV_TILES", "Q_TILES", "GROUP_Q", "H_KV", "H_Q")


def lower_one_launch(kv: BackwardKernel, q: BackwardKernel, kv_cascade: Cascade, q_cascade: Cascade) -> BackwardKernel:
    """The kernel that runs the dK/dV kernel ``kv`` and the dQ kernel ``q`` in one launch: their functions,
    called with each one's arguments (renamed kv_* and dq_*), the runtime ones first."""
    def renamed(k: BackwardKernel, prefix: str) -> tuple[list[str], list[str]]:
        return [prefix + a for a in k.runtime_args], [prefix + a for a in k.constexpr_args]

    (kv_rt, kv_ce), (q_rt, q_ce) = renamed(kv, "kv_"), renamed(q, "dq_")
    params = [*kv_rt, *q_rt, *ONE_LAUNCH_RUNTIME, *(f"{a}: tl.constexpr" for a in kv_ce + q_ce)]
    # named by both kernels: a dK/dV kernel may pair with dQ kernels of several cuts (gradients wanted)
    variant, *rest = kv.name.split("__")[1:]
    name = "__".join(["attn_bwd", variant.removesuffix("_kv"), source_digest(kv.name + q.name)[:8], *rest[1:]])
    text = render("attention_bwd.py.jinja", cascade_key=f"{kv_cascade.key} and {q_cascade.key}",
                  variant=f"{kv_cascade.name}, {q_cascade.name}", notation=_notation(kv_cascade) + "\n#\n" +
                  _notation(q_cascade), helpers=helpers(q_cascade), kv_body=kv.body, q_body=q.body, params=params,
                  kernel=name, kv_fn=kv.name, q_fn=q.name, kv_call=", ".join("kv_" + a for a in kv.arguments),
                  q_call=", ".join("dq_" + a for a in q.arguments))
    return BackwardKernel(name, text, (), kv.outputs + q.outputs, (), (),
                          runtime_args=(*kv_rt, *q_rt, *ONE_LAUNCH_RUNTIME), constexpr_args=(*kv_ce, *q_ce))


def _states_present(kr: KeyRange, full_mask: frozenset | None) -> bool:
    """Whether every row of every tile of a range saw a key: the range is unmasked and every conjunct of the
    forward's mask (``full_mask``; None when no single mask governs the forward) holds on its tiles."""
    return full_mask is not None and not kr.masked and full_mask <= set(kr.skip)


# -- running --------------------------------------------------------------------------------------


def _grid_args(kernel: BackwardKernel, tensors: dict[str, torch.Tensor], outs: dict[str, torch.Tensor]) -> list:
    args = []
    for name in kernel.tensors:
        args += [tensors[name], *tensors[name].stride()]
    for o in kernel.outputs:
        args += [outs[o.name], *outs[o.name].stride()]
    return args


@dataclass(frozen=True)
class Cut:
    """The part of a gradient one backward call computes (the gradients of some inputs), cut into kernels."""

    gradient: Gradient
    parts: Parts
    streams: dict


def restrict(g: Gradient, inputs: frozenset[str]) -> Gradient:
    """``g`` computing the gradients of ``inputs`` only (inputs that require none are left out)."""
    partials = tuple(p for p in g.partials if p.input in inputs)
    return replace(g, cascade=prune(replace(g.cascade, outputs=tuple(p.name for p in partials))), partials=partials)


def _cut(g: Gradient) -> Cut:
    parts = cut(g)
    streams = {k: (v and stream(v, r)) for k, v, r in (
        ("kv", parts.kv, "m"), ("q", parts.q, STREAM), ("kv_atomic", parts.kv_atomic, "m"))}
    return Cut(g, parts, streams)


@dataclass(frozen=True)
class Launched:
    """What one backward call's kernels wrote: each partial's buffer by name, with the names of its dimensions
    (see ``gradient.finish``), for the gradient cascade cut to the wanted inputs (None: nothing ran, every
    wanted gradient is 0)."""

    gradient: Gradient | None
    partials: dict[str, torch.Tensor]
    labels: dict[str, tuple[str, ...]]
    wanted: frozenset[str]

    def finish(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
        """Each input's gradient in its own shape and dtype (None for inputs not wanted)."""
        if self.gradient is None:
            return {name: (torch.zeros_like(x) if name in self.wanted else None) for name, x in inputs.items()}
        return finish(self.gradient, self.partials, self.labels, inputs, self.wanted)


@dataclass
class Backward:
    """The gradient of a Forward's cascade, its kernels, and one backward call.

    ``error`` holds the DifferentiationError (or LoweringError) when the gradient cannot be derived or
    lowered yet; calls then raise it.
    """

    forward: Forward
    gradient: Gradient | None = None
    parts: Parts | None = None
    error: LoweringError | None = None
    _kernels: dict = field(default_factory=dict)
    _cuts: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.forward.error is not None:
            self.error = self.forward.error
            return
        try:
            self.gradient = gradient_of(self.forward)
            self.parts = self.cut(None).parts
        except LoweringError as e:
            self.error = e
            return
        fwd = self.gradient.forward
        pair = tuple(e for e in fwd.einsums if STREAM in e.iteration_ranks)
        governing = _mask_einsum(fwd, pair)
        # the conjuncts of the one mask every state of the forward is masked by: tiles where all of them
        # hold have a key on every row (None: several masks, no tile is known to)
        self._full_mask = (frozenset() if not any(e.where is not None for e in pair) else
                           None if governing is None else frozenset(conjuncts(governing.where)))
        self._state_filters = frozenset(presence_predicate(st) for st in self.gradient.saved)

    @property
    def saved(self) -> tuple[str, ...]:
        """The forward states the backward reads (the forward stores them with their presence)."""
        return () if self.gradient is None else tuple(s.name for s in self.gradient.saved)

    def cut(self, needed: frozenset[str] | None) -> Cut:
        """The kernels' cascades for the gradients of ``needed`` (None: every input's)."""
        if needed not in self._cuts:
            self._cuts[needed] = _cut(self.gradient if needed is None else restrict(self.gradient, needed))
        return self._cuts[needed]

    def _outputs(self, cut: Cut, kernel: str, atomic: bool) -> dict[str, Output]:
        g = cut.gradient
        out = {}
        for p in g.partials:
            ranks = tuple(r for r in p.ranks if r not in PARALLEL)
            if kernel == "rows" and p.kernel == "rows":
                out[p.name] = Output(p.name, ranks, program=None if "m" in ranks else "pid_m")
            elif kernel == "q" and p.kernel == "q":
                out[p.name] = Output(p.name, ranks)
            elif kernel == "kv" and p.kernel == "kv":
                no_seq = not ({"m", "n"} & set(ranks))
                out[p.name] = Output(p.name, ranks, program="pid_n" if no_seq else None)
            elif kernel == "kv" and atomic and p.kernel == "q":
                out[p.name] = Output(p.name, ranks, atomic=True)
        if kernel == "rows":
            for t in cut.parts.row_terms:
                out = {t: Output(t, _tile_ranks(cut.parts.rows, t))} | out
        return out

    def kernel(self, kind: str, dtype: torch.dtype, dims: dict, ints: frozenset, atomic: bool = False,
               needed: frozenset[str] | None = None) -> BackwardKernel:
        """The rendered ``kind`` kernel ("rows", "kv", "q", or "one": kv and q in one launch) for these dtype,
        head dims and integer inputs."""
        key = (kind, dtype, tuple(sorted(dims.items())), ints, atomic, needed)
        if key in self._kernels:
            return self._kernels[key]
        cut = self.cut(needed)
        name = DTYPE_NAMES[dtype]
        full = self._state_filters if self._full_mask is not None else frozenset()
        if kind == "rows":
            src = lower_rows(cut.parts.rows, tuple(self._outputs(cut, "rows", atomic).values()), dims, name, ints)
        elif kind == "kv":
            sums = {p.name for p in cut.gradient.partials
                    if p.kernel == "kv" and cut.gradient.forward.tensor(p.input).layout is Layout.KEY}
            src = lower_kv(cut.streams["kv_atomic" if atomic else "kv"], self._outputs(cut, "kv", atomic), sums, dims,
                           name, ints, full, self._full_mask)
        elif kind == "q":
            src = lower_q(cut.streams["q"], self._outputs(cut, "q", atomic), dims, name, ints, full, self._full_mask)
        else:
            src = lower_one_launch(self.kernel("kv", dtype, dims, ints, needed=needed),
                                   self.kernel("q", dtype, dims, ints, needed=needed),
                                   cut.streams["kv"].cascade, cut.streams["q"].cascade)
        self._kernels[key] = src
        return src

    def run(self, inputs: dict[str, torch.Tensor], values: dict[str, float], output: torch.Tensor,
            states: dict[str, torch.Tensor], grad_output: torch.Tensor, schedule: BackwardSchedule,
            extents: dict[str, int], visits: torch.Tensor | None = None,
            needed: frozenset[str] | None = None, launcher: Launcher = jit_launch) -> dict[str, torch.Tensor | None]:
        """The gradient of every floating-point input named in ``needed`` (None: of all; the others get None)
        given the forward's output, its saved ``states`` (as ``Forward.run(saved=...)`` returns them) and the
        incoming gradient.

        ``visits`` (tests only): int32 ``[B·Hkv, key tiles]``, where the dK/dV programs store how many
        (query head, query tile) pairs they visited. ``launcher`` runs each kernel launch (Triton's JIT by
        default), as the forward's does.
        """
        return self.launch(inputs, values, output, states, grad_output, schedule, extents, visits, needed,
                           launcher).finish(inputs)

    def launch(self, inputs: dict[str, torch.Tensor], values: dict[str, float], output: torch.Tensor,
               states: dict[str, torch.Tensor], grad_output: torch.Tensor, schedule: BackwardSchedule,
               extents: dict[str, int], visits: torch.Tensor | None = None, needed: frozenset[str] | None = None,
               launcher: Launcher = jit_launch, record: Recording | None = None) -> "Launched":
        """``run``'s kernels, launched: what they wrote, for ``Launched.finish`` to make the gradients of. A
        ``record`` allocates every buffer and runs every launch instead (einflash.compiler.replay)."""
        if self.error is not None:
            raise self.error
        g = self.gradient
        first = next(x for x in inputs.values() if x.is_floating_point())
        B, H, M, N = extents["b"], extents["h"], extents["m"], extents["n"]
        wanted = frozenset(t.name for t in g.forward.inputs if inputs[t.name].is_floating_point()
                           and (needed is None or t.name in needed))
        if B * H * M * N == 0 or not wanted:  # nothing to differentiate through: every gradient is 0
            return Launched(None, {}, {}, wanted)
        needed = None if needed is None else frozenset(needed)
        empty = torch.empty if record is None else record.empty
        zeros = torch.zeros if record is None else record.zeros
        launcher = launcher if record is None else record.launch
        cut = self.cut(needed)
        g = cut.gradient
        dims = self.forward.dims(extents)
        ints = frozenset(k for k, v in inputs.items() if not v.is_floating_point())
        given = {k: (v if v.is_floating_point() or v.dtype == torch.int32 else v.to(torch.int32))
                 for k, v in inputs.items()}
        given[g.grad_output] = grad_output.contiguous()
        if g.output is not None:
            given[g.output] = output
        for st in g.saved:
            given[st.value], given[st.present] = states[st.name], states[f"{st.name}:present"]
        ints = ints | frozenset(st.present for st in g.saved)
        acc, dev = accumulator_dtype(first.dtype), first.device
        hkv = next(inputs[t.name].shape[1] for t in g.forward.inputs if t.layout is Layout.KEY)
        group = H // hkv
        partials, labels = {}, {}

        def workspace(o: Output, programs: int, zero: bool) -> torch.Tensor:
            shape = [B, hkv if o.head == "off_hk" else H] + ([programs] if o.program else [])
            shape += [extents[r] for r in o.ranks]
            p = next((p for p in g.partials if p.name == o.name), None)
            direct = p is not None and o.program is None and not o.atomic and self._direct(p, o)
            dtype = inputs[p.input].dtype if direct else acc
            t = (zeros if zero else empty)(*shape, dtype=dtype, device=dev)
            if p is not None:
                partials[o.name] = t
                labels[o.name] = ("b", "hk" if o.head == "off_hk" else "h") + (("p",) if o.program else ()) + o.ranks
            return t

        # rows
        if cut.parts.rows is not None:
            k = self.kernel("rows", first.dtype, dims, ints, needed=needed)
            outs = {o.name: workspace(o, -(-M // ROWS_BLOCK_M), False) for o in k.outputs}
            launcher(k, k.call((-(-M // ROWS_BLOCK_M), B * H), [
                *_grid_args(k, given, outs), *[values[p] for p in k.params], M, N, H, group,
                *(v for _, v in k.constexprs), ROWS_BLOCK_M], ROWS_WARPS, 1))
            for t in cut.parts.row_terms:
                given[t] = outs[t]
        # dK/dV and dQ
        atomic = schedule.atomic_dq and cut.parts.q is not None
        regs = schedule.max_registers
        calls = []
        if cut.parts.kv is not None or atomic:
            k = self.kernel("kv", first.dtype, dims, ints, atomic, needed)
            programs = -(-N // schedule.block_n)
            outs = {o.name: workspace(o, programs, zero=("m" in o.ranks and "n" in o.ranks) or o.atomic)
                    for o in k.outputs}
            calls.append((k, k.call((programs, B * hkv), [
                *_grid_args(k, given, outs), *[values[p] for p in k.params], M, N, H, group, visits,
                *(v for _, v in k.constexprs), schedule.block_m, schedule.block_n, schedule.num_stages,
                visits is not None], schedule.num_warps, schedule.num_stages, regs)))
        if cut.parts.q is not None and not atomic:
            k = self.kernel("q", first.dtype, dims, ints, needed=needed)
            outs = {o.name: workspace(o, 1, False) for o in k.outputs}
            bm, bn = schedule.block_n, schedule.block_m
            args = _grid_args(k, given, outs)
            if k.lists is not None:
                for t in tile_lists(k.lists, given, values, B, M, N, bm, bn, False):
                    args += [t, *t.stride()]
            # the forward template's own arguments: no split (1 tile share), no visit counter, no jagged batch
            calls.append((k, k.call((-(-M // bm), B * H, 1), [
                *args, *[values[p] for p in k.params], M, N, H, group, 1, None, None, None,
                *(v for _, v in k.constexprs), bm, bn, schedule.dq_depth, False, False, False, False, False],
                schedule.num_warps, schedule.dq_depth, regs)))
        if len(calls) == 2 and schedule.one_launch and visits is None:  # visit counts need each kernel's own grid
            (kv, kv_call), (q, q_call) = calls
            k = self.kernel("one", first.dtype, dims, ints, needed=needed)
            tiles = (kv_call.grid[0], q_call.grid[0])
            calls = [(k, k.call((B * hkv * (tiles[0] + group * tiles[1]),), [
                *(kv_call.args[a] for a in kv.runtime_args), *(q_call.args[a] for a in q.runtime_args),
                *tiles, group, hkv, H, *(kv_call.args[a] for a in kv.constexpr_args),
                *(q_call.args[a] for a in q.constexpr_args)], schedule.num_warps, schedule.num_stages, regs))]
        for k, launch in calls:
            launcher(k, launch)
        return Launched(g, partials, labels, wanted)

    def _direct(self, p: Partial, o: Output) -> bool:
        """Whether the kernel can write the input's gradient itself: the only partial of its input, laid out
        as the input is (a sum over the GQA group done, no rank to sum or rename)."""
        g = self.gradient
        decl = g.forward.tensor(p.input)
        mine = [x for x in g.partials if x.input == p.input]
        heads = "h" if (o.head == "off_hk") == (decl.layout is Layout.KEY) else None
        return len(mine) == 1 and not p.relabel and heads is not None and decl.ranks == ("b", "h") + o.ranks


