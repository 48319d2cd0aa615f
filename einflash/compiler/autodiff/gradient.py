"""Gradients of a cascade by reverse-mode differentiation, as another cascade.

The gradient cascade is derived from the forward cascade as it stands just before it is
streamed (deferred and strength-reduced; each reduction over n is one Einsum whose final
value the one-pass forward keeps as a running state). That form already divides by the
row normaliser after the contraction with v (``o = o_acc / den``), so the adjoint of the
normaliser is a row term (``d_den = −Σ_f d_o·o/den``, FlashAttention's rowsum(dO∘O)):
deferral carries over to the adjoint, and the gradient streams once over n (for dQ) and
once over m (for dK and dV).

- The forward's reductions over n are not recomputed: the gradient cascade reads their
  final values (saved by the forward with a per-row presence flag) as inputs.
- A max (or min) over n whose shift leaves the output unchanged gets no gradient, which is
  proved, not assumed (einflash.compiler.autodiff.invariance).
- Derivatives of map operators come from the operators' sympy forms, expressed through
  the operator's own value where they can be (σ' = σ − σ², tanh' = 1 − tanh², exp' = exp),
  so kernels reuse the forward value and stay finite where the textbook form overflows.
- Each gradient of an input is a sum of *partials*: one per way it is read (``g[m,e]`` and
  ``g[n,e]`` are two) and per backward kernel that computes it; :func:`finish` reduces them
  to the input's own shape (per head, per token, per pair, scalar).

>>> import einflash as ef
>>> @ef.attention
... def plain(q, k, v):
...     return ef.softmax(q @ k * ef.scale, "n") @ v
>>> g = gradient_of(plain.forward)
>>> [s.name for s in g.saved], sorted(p.input for p in g.partials)
(['max_n2_raw', 'sum_n'], ['k', 'q', 'v'])
>>> print(g.invariant[0])  # doctest: +NORMALIZE_WHITESPACE +ELLIPSIS
max_n2_raw (line 3): max over n; the output does not change when it shifts: sum_n and o_acc are rescaled by
...(... − ...) and the output is invariant under that rescaling
"""

from __future__ import annotations

from collections.abc import Set
from dataclasses import dataclass, replace

import sympy
import torch

from ...errors import DifferentiationError
from ...ir.algebra import ratio
from ...ir.cascade import Cascade, Einsum, Layout, Reducing, Reduction, Role, TensorDecl, plain_read, reduces
from ...ir.expr import Const, Expr, Merge, Read, call, free_ranks, gathered, index_ranks, reads
from ...ir.operators import REDUCERS
from ...ir.ranks import PARALLEL, STREAM, coord, extent_symbol, rank_order
from ...ir.reference import Value, evaluate
from ...ir.validate import validate
from ..rewrite.names import fresh_name
from .derivatives import ZERO, partial_derivatives, reduction_derivative, simplified_mul
from .invariance import Invariance, invariant_reductions

KERNELS = ("rows", "q", "kv")  # row-level terms; per query tile streaming keys; per key tile streaming queries


@dataclass(frozen=True)
class SavedState:
    """A forward state the gradient reads: ``value`` and ``present`` are inputs of the gradient cascade
    holding its final value (``init`` where a row saw no key) and 1 where the row saw a key."""

    name: str
    ranks: tuple[str, ...]
    init: float
    value: str
    present: str

    @property
    def rows(self) -> tuple[str, ...]:
        """The ranks of its presence flag: batch, head and query row."""
        return tuple(r for r in self.ranks if r in PARALLEL or r == "m")


@dataclass(frozen=True)
class Diagonal:
    """How a partial over query-key pairs belongs to an input read along the pairs' diagonals: pair (m, n)
    adds into entry ``sign·(n − m) + offset`` of rank ``rank`` (``offset`` in M, N and integer parameters), of the
    input itself, or (``through``, an integer input over ``rank``) of the input's rank ``own`` at the
    entry that ``through`` holds there: a relative-position table ``rel[h, n − m + M − 1]``, T5's
    ``table[h, bucket[n − m + M − 1]]``. ``fixed``: the input's ranks read at a constant (``tab[h, 1, n − m]``),
    with it."""

    rank: str
    sign: int
    offset: sympy.Expr
    own: str
    through: str | None = None
    fixed: tuple[tuple[str, int], ...] = ()

    def entry(self, diagonal: int, m: int, n: int, values: dict[str, float]) -> int:
        """The entry of ``rank`` the pairs with ``n − m = diagonal`` add into, at extents M = ``m`` and N = ``n``
        (``values``: the integer parameters')."""
        named = {s: values[s.name] for s in self.offset.free_symbols if s.name in values}
        return self.sign * diagonal + int(self.offset.subs({extent_symbol("M"): m, extent_symbol("N"): n} | named))


@dataclass(frozen=True)
class Partial:
    """A part of the gradient of ``input``: tensor ``name`` of the gradient cascade, over ``ranks``.

    ``relabel`` pairs a rank of the partial with the rank of the input it stands for where they
    differ (``g`` read as ``g[n,e]`` gives a partial over n for the input's m). ``kernel`` is the
    backward kernel that computes it (see KERNELS).
    """

    name: str
    input: str
    ranks: tuple[str, ...]
    relabel: tuple[tuple[str, str], ...]
    kernel: str
    diagonal: Diagonal | None = None  # a partial over pairs (m, n) summed along their diagonals into the input


@dataclass(frozen=True)
class Gradient:
    """The gradient cascade of a forward cascade and how to read its results.

    Inputs of ``cascade``: the forward's inputs, ``grad_output`` (the incoming gradient, laid out
    like the output), ``output`` (the forward's output, when the gradient reads it) and the
    ``saved`` states; its outputs are the ``partials``.
    """

    cascade: Cascade
    forward: Cascade
    grad_output: str
    output: str | None
    saved: tuple[SavedState, ...]
    partials: tuple[Partial, ...]
    invariant: tuple[Invariance, ...]
    # inputs with no gradient, each with why: read at computed positions other than the diagonals (a segment-pair
    # table), whose gradient is a scatter into its entries; a call where one requires grad is refused
    frozen: tuple[tuple[str, str], ...] = ()

    def inputs_with_gradient(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(p.input for p in self.partials))


def gradient_of(forward) -> Gradient:
    """The gradient of a :class:`~einflash.compiler.runtime.forward.Forward`'s cascade (cached on it by the caller)."""
    before = next(s.cascade for s in reversed(forward.steps) if s.name != "stream online")
    return differentiate(before, frozenset(t.name for t in forward.rewritten.states))


# -- reverse mode ----------------------------------------------------------------------------------


def _row_ratio(d: Expr, e: Einsum) -> Expr | None:
    """``d / body`` for ``e = Σ_n body`` (no mask), when that ratio is constant along n: then Σ_n g·d is
    g·ratio·e. (``o = Σ_n exp(s − lse)·v``: ∂/∂lse of the summand is −1 times it, and the adjoint of lse is
    −Σ_f d_o·o, a row term, as deferral makes it for a softmax.)"""
    if e.reduce is None or e.reduce.op != "sum" or e.reduce.ranks != (STREAM,) or e.where is not None:
        return None
    return ratio(d, e.expr, {STREAM})


class _Builder:
    """Accumulates the Einsums and tensor declarations of the gradient cascade."""

    def __init__(self, c: Cascade):
        self.c = c
        self.taken = {t.name for t in c.tensors} | {p.name for p in c.params}
        self.tensors: list[TensorDecl] = []
        self.einsums: list[Einsum] = []
        self.shared: set[str] = set()  # adjoints read by more than one term: never renamed by ``total``

    def fresh(self, base: str) -> str:
        name = fresh_name(self.c, base, self.taken)
        self.taken.add(name)
        return name

    def einsum(
        self,
        base: str,
        ranks: tuple[str, ...],
        expr: Expr,
        reduced: tuple[str, ...] = (),
        where: Expr | None = None,
        line: int | None = None,
    ) -> Read:
        name = self.fresh(base)
        ranks = rank_order(ranks)
        self.tensors.append(TensorDecl(name, ranks))
        self.einsums.append(
            Einsum(name, ranks, expr, Reduction("sum", rank_order(reduced)) if reduced else None, where, line=line)
        )
        return Read(name, tuple(coord(r) for r in ranks))

    def streams(self, x: Expr) -> bool:
        """Whether ``x`` reads, directly or not, a gradient term made by iterating n (a sum over the keys): a
        gradient per row made from one is the dQ kernel's, after its loop, not the rows kernel's."""
        made = {e.out: e for e in self.einsums}
        todo, seen = [r.tensor for r in reads(x)], set()
        while todo:
            t = todo.pop()
            e = made.get(t)
            if e is None or t in seen:
                continue
            seen.add(t)
            if STREAM in e.iteration_ranks:
                return True
            todo += [r.tensor for r in e.reads()]
        return False

    def total(self, base: str, ranks: tuple[str, ...], terms: list[Expr], line: int | None = None) -> Read:
        """The sum of ``terms`` as tensor ``base``; a single term made here is renamed rather than copied."""
        ranks = rank_order(ranks)
        made = {e.out: i for i, e in enumerate(self.einsums)}
        if (
            len(terms) == 1
            and isinstance(terms[0], Read)
            and terms[0].tensor in made
            and terms[0].tensor not in self.shared
            and self.einsums[made[terms[0].tensor]].ranks == ranks
        ):
            i, name = made[terms[0].tensor], self.fresh(base)
            self.einsums[i] = replace(self.einsums[i], out=name)
            self.tensors = [replace(t, name=name) if t.name == terms[0].tensor else t for t in self.tensors]
            return Read(name, tuple(coord(r) for r in ranks))
        return self.einsum(base, ranks, _sum(terms), line=line)


def _sum(terms: list[Expr]) -> Expr:
    """Contributions to one adjoint: one that is absent somewhere (masked there) adds nothing there."""
    out = terms[0]
    for t in terms[1:]:
        out = call("add", out, t, merge=Merge.ANY)
    return out


def _relabel(c: Cascade, leaf: Read) -> tuple[tuple[str, str], ...]:
    decl = c.tensor(leaf.tensor)
    pairs = []
    for i, own in zip(leaf.index, decl.ranks):
        names = [s.name for s in sympy.sympify(i).free_symbols]
        if len(names) != 1 or i != coord(names[0]):
            raise DifferentiationError(
                f"{c.name}: {leaf.tensor} is read at index {i} for its rank {own}; the "
                f"gradient of a shifted or computed read is not implemented"
            )
        pairs.append((names[0], own))
    if len({a for a, _ in pairs}) != len(pairs):
        raise DifferentiationError(
            f"{c.name}: {leaf.tensor} is read with a repeated index "
            f"{tuple(map(str, leaf.index))}; its gradient is not implemented"
        )
    return tuple((a, b) for a, b in pairs if a != b)


def _diagonal(c: Cascade, leaf: Read) -> Diagonal | None:
    """How ``leaf``, an input read at one computed position ``±(n − m) + offset`` (directly, or through an
    integer input over one rank; the offset in M, N and integer parameters) and at its own coordinates or
    integers elsewhere, gets its gradient; None for any other read at computed positions."""
    decl = c.tensor(leaf.tensor)
    at_ranks = [(sympy.sympify(i), own) for i, own in zip(leaf.index, decl.ranks)]
    fixed = tuple((own, int(i)) for i, own in at_ranks if i.is_Integer)
    computed = [(i, own) for i, own in at_ranks if i != coord(own) and not i.is_Integer]
    if len(computed) != 1 or STREAM in decl.ranks or "m" in decl.ranks:
        return None
    ((at, own),) = computed
    rank, through = own, None
    inner = list(gathered((at,)))
    if inner:
        table = inner[0].tensor
        if len(inner) != 1 or at != sympy.Function(table)(*inner[0].index) or len(c.tensor(table).ranks) != 1:
            return None
        at, rank, through = sympy.sympify(inner[0].index[0]), c.tensor(table).ranks[0], table
    m, n = coord("m"), coord("n")
    at = sympy.expand(at)
    sign, offset = at.coeff(n), sympy.expand(at - at.coeff(n) * n - at.coeff(m) * m)
    known = {"M", "N"} | {p.name for p in c.params if p.integer}
    if sign not in (1, -1) or at.coeff(m) != -sign or not {s.name for s in offset.free_symbols} <= known:
        return None
    return Diagonal(rank, int(sign), offset, own, through, fixed)


def _kernel(iterates_n: bool, ranks) -> str:
    if not iterates_n:
        return "rows"
    return "q" if {"m", "n"} & set(ranks) == {"m"} else "kv"


def differentiate(c: Cascade, states: frozenset[str]) -> Gradient:
    """The gradient cascade of ``c``, a one-pass cascade before streaming; ``states`` names the reductions
    over n the streamed forward keeps (and can save). Raises DifferentiationError when a step has no
    gradient einflash can derive."""
    if any(e.loop for e in c.einsums):
        raise DifferentiationError(f"{c.name}: differentiate the cascade before it is streamed")
    shifted = next((e for e in c.einsums for r in e.reads() if r.padded), None)
    if shifted is not None:
        raise DifferentiationError(
            f"{c.where(shifted)}: a value read at shifted coordinates (a convolution over the score tile) is "
            f"recomputed there by the forward kernel; its gradient, a convolution of the score gradients back "
            f"onto q and k, has no kernel yet: train it with backend='reference', or run the forward without "
            f"gradients"
        )
    late = [e for e in c.einsums if reduces(e) and STREAM in e.reduce.ranks]
    for reduction in late:
        if reduction.out not in states or set(reduction.reduce.ranks) != {STREAM}:
            raise DifferentiationError(
                f"{c.name}: {reduction.out} is a reduction over n that the one-pass forward does "
                f"not keep as a running state; its gradient would need another pass"
            )
    zero, proofs = invariant_reductions(c, late)
    # a max over another rank (a softmax over the head dimension) has the same proof over that rank
    unproved = [e for e in c.einsums if reduces(e) and STREAM not in e.reduce.ranks and reduction_derivative(e) is None]
    for rank in sorted({r for e in unproved for r in e.reduce.ranks}):
        over = [e for e in c.einsums if reduces(e) and rank in e.reduce.ranks]
        more_zero, more_proofs = invariant_reductions(c, over, rank)
        zero, proofs = zero | more_zero, proofs + more_proofs
    out_name = c.outputs[0]
    b = _Builder(c)
    out_decl = c.tensor(out_name)
    d_out = b.fresh(f"d_{out_name}")
    adjoints: dict[str, list[Expr]] = {out_name: [plain_read(TensorDecl(d_out, out_decl.ranks))]}
    grads: dict[tuple, list[Expr]] = {}
    frozen: dict[str, str] = {}
    for e in reversed(c.einsums):
        terms = adjoints.pop(e.out, None)
        if e.out in zero or not terms:
            continue
        derivative = reduction_derivative(e) if reduces(e) else None
        if e.reduce is not None and derivative is None:
            raise DifferentiationError(
                f"{c.where(e)}: the gradient through a {e.reduce.op} over "
                f"{', '.join(e.reduce.ranks)} is not implemented (a reducer of your own "
                f"is differentiable with its derivative declared: ef.reducer(..., "
                f"derivative=...))"
            )
        g = _materialise(b, c.tensor(e.out), terms, e.line)
        if derivative is not None and derivative != Const(1.0):
            g = simplified_mul(
                g, derivative
            )  # the adjoint of each reduced element: of the result times ∂result/∂element
        its = e.iteration_ranks
        value = plain_read(c.tensor(e.out)) if e.reduce is None else None
        leaves = partial_derivatives(e.expr, value)
        if isinstance(g, Read) and len(leaves) > 1:
            b.shared.add(g.tensor)  # each leaf's term may be g itself (a derivative of 1)
        for leaf, d in leaves.items():
            if leaf.prev:
                raise DifferentiationError(f"{c.where(e)}: reads a running state's previous value")
            decl = c.tensor(leaf.tensor)
            if decl.role is not Role.INPUT and leaf.tensor in zero:
                continue
            diagonal = _diagonal(c, leaf) if decl.role is Role.INPUT else None
            if decl.role is Role.INPUT and leaf.tensor in c.computed_reads and diagonal is None:
                frozen.setdefault(
                    leaf.tensor,
                    f"{c.where(e)} reads {leaf.tensor} at {', '.join(map(str, leaf.index))}; the gradient of a read at "
                    f"computed positions (a scatter into its entries) is implemented only along the diagonals, one "
                    f"position ±(n − m) + offset (or an integer input over one rank read there) and the others plain "
                    f"coordinates or integers: pass {leaf.tensor} without "
                    f"requires_grad (a frozen table), or detach it",
                )
                continue
            term = simplified_mul(g, d)
            if decl.role is Role.INPUT:
                relabel = () if diagonal is not None else _relabel(c, leaf)
                keep: Set[str] = index_ranks(leaf.index) | (set(PARALLEL) & its)
            else:
                if tuple(leaf.index) != tuple(coord(r) for r in decl.ranks):
                    raise DifferentiationError(
                        f"{c.where(e)}: reads {leaf.tensor} at {leaf.index}, not at its own "
                        f"coordinates; the gradient of such a read is not implemented"
                    )
                keep = set(decl.ranks)
            reduced = tuple(its - keep)
            ratio = _row_ratio(d, e) if STREAM in reduced and decl.role is not Role.INPUT else None
            if ratio is not None:
                # Σ_n of the adjoint needs no pass over n: the summand's derivative is the summand times a factor
                # constant along n, so the sum is that factor times e's own value (the saved state or output)
                term = simplified_mul(g, simplified_mul(ratio, plain_read(c.tensor(e.out))))
                reduced = tuple(r for r in reduced if r != STREAM)
            covered = free_ranks(term) | (free_ranks(e.where) if e.where is not None else frozenset())
            if set(reduced) - covered:
                raise DifferentiationError(
                    f"{c.where(e)}: the adjoint of {leaf.tensor} is constant along "
                    f"{', '.join(sorted(set(reduced) - covered))}; not implemented"
                )
            if reduced or e.where is not None:
                term = b.einsum(f"d_{leaf.tensor}__{e.out}", tuple(keep), term, reduced, e.where, e.line)
            if decl.role is Role.INPUT:
                streams = STREAM in its or b.streams(term)
                key = (leaf.tensor, relabel, _kernel(streams, keep), rank_order(keep), diagonal)
                grads.setdefault(key, []).append(term)
            else:
                adjoints.setdefault(leaf.tensor, []).append(term)
    partials = []
    grads = {key: terms for key, terms in grads.items() if key[0] not in frozen}  # no part of a frozen one
    for (name, relabel, kernel, ranks, diagonal), terms in grads.items():
        same = [k for k in grads if k[0] == name]
        base = f"d_{name}" if len(same) == 1 else f"d_{name}__{kernel}" + "".join(f"_{a}" for a, _ in relabel)
        read = b.total(base, ranks, terms)
        partials.append(Partial(read.tensor, name, ranks, relabel, kernel, diagonal))
    gradient = _assemble(c, b, {e.out: e for e in late}, d_out, tuple(partials), proofs)
    return replace(gradient, frozen=tuple(frozen.items()))


def _materialise(b: _Builder, decl: TensorDecl, terms: list[Expr], line) -> Expr:
    """The adjoint of ``decl`` as one read when it has all of decl's ranks, else inline (a broadcast)."""
    total = _sum(terms)
    made = isinstance(total, Read) and any(e.out == total.tensor for e in b.einsums)
    if (isinstance(total, Read) and not made) or free_ranks(total) != frozenset(decl.ranks):
        return total
    return b.total(f"d_{decl.name}", decl.ranks, terms, line)


def _diagonal_sums(
    d: Diagonal,
    value: torch.Tensor,
    dims: list[str],
    inputs: dict[str, torch.Tensor],
    name: str,
    inputs_ranks,
    values: dict[str, float],
) -> tuple[torch.Tensor, list[str]]:
    """A diagonal partial of input ``name`` (over ``inputs_ranks``) as its own rank ``d.own``: summed along the
    diagonals of its pairs where it is still over (m, n) (the reference executor's), then through
    ``d.through``, then put at the entries of the ranks it reads at constants."""
    entries = inputs[name].shape[inputs_ranks.index(d.own)]
    if "m" in dims and "n" in dims:  # one sum per diagonal (deterministic, as the kernel's)
        pairs = value.movedim((dims.index("m"), dims.index("n")), (-2, -1))
        dims = [x for x in dims if x not in ("m", "n")] + [d.rank]
        m, n = pairs.shape[-2:]
        size = inputs[d.through].shape[0] if d.through is not None else entries
        value = pairs.new_zeros(*pairs.shape[:-2], size)
        for k in range(1 - m, n):
            at = d.entry(k, m, n, values)
            if 0 <= at < size:  # a diagonal outside the table is read by masked pairs only (0 here)
                value[..., at] += torch.diagonal(pairs, offset=k, dim1=-2, dim2=-1).sum(-1)
    if d.through is not None:  # entry e of rank d.rank adds into entry through[e] of the input's rank
        held = inputs[d.through].long()
        onehot = (held[:, None] == torch.arange(entries, device=held.device)[None, :]).to(value.dtype)
        value = value.movedim(dims.index(d.rank), -1) @ onehot  # a product, not index_add_: deterministic on GPUs
        dims = [x for x in dims if x != d.rank] + [d.own]
    for rank, entry in d.fixed:  # the one entry of a rank read at a constant
        size = inputs[name].shape[inputs_ranks.index(rank)]
        value = value[..., None] * (torch.arange(size, device=value.device) == entry).to(value.dtype)
        dims = dims + [rank]
    return value, dims


def _assemble(
    c: Cascade, b: _Builder, late: dict[str, Reducing], d_out: str, partials: tuple[Partial, ...], proofs
) -> Gradient:
    """Recomputation of the forward's values (reductions over n read from the saved states), then the adjoints;
    whatever the partials do not need is dropped."""
    out_name = c.outputs[0]
    recompute: list[Einsum] = []
    decls = {t.name: t for t in c.tensors}
    saved: list[SavedState] = []
    inputs = list(c.inputs)
    for e in c.einsums:
        if e.out == out_name:
            continue  # the output itself is given (also when it is a reduction over n: not saved twice)
        if e.out in late:
            t = decls[e.out]
            value, present = b.fresh(f"{e.out}__saved"), b.fresh(f"{e.out}__present")
            rows = tuple(r for r in t.ranks if r in PARALLEL or r == "m")
            inputs += [TensorDecl(value, t.ranks, Role.INPUT), TensorDecl(present, rows, Role.INPUT)]
            state = SavedState(e.out, t.ranks, REDUCERS[late[e.out].reduce.op].identity, value, present)
            recompute.append(
                Einsum(
                    e.out, t.ranks, plain_read(TensorDecl(value, t.ranks)), where=presence_predicate(state), line=e.line
                )
            )
            saved.append(state)
            continue
        recompute.append(e)
    out_decl = c.tensor(out_name)
    inputs += [
        TensorDecl(d_out, out_decl.ranks, Role.INPUT, Layout.QUERY),
        TensorDecl(out_name, out_decl.ranks, Role.INPUT, Layout.QUERY),
    ]
    intermediates = [TensorDecl(t.name, t.ranks) for t in c.tensors if t.role is not Role.INPUT and t.name != out_name]
    einsums = recompute + b.einsums
    tensors = inputs + intermediates + b.tensors
    g = Cascade(
        f"{c.name}_grad",
        c.ranks,
        tuple(tensors),
        c.params,
        tuple(einsums),
        tuple(p.name for p in partials),
        source=c.source,
    )
    g = prune(g)
    used = {t.name for t in g.tensors}
    saved = [s for s in saved if s.value in used]
    validate(g, contract=False)
    return Gradient(g, c, d_out, out_name if out_name in used else None, tuple(saved), partials, proofs)


def presence_predicate(s: SavedState) -> Expr:
    """Where the gradient cascade takes a saved state as present: its row saw a key."""
    return call("ne", plain_read(TensorDecl(s.present, s.rows)), ZERO)


def prune(g: Cascade) -> Cascade:
    """Drop Einsums nothing the outputs need reads, and unused tensors (inputs included)."""
    needed = set(g.outputs)
    keep: list[Einsum] = []
    for e in reversed(g.einsums):
        if e.out in needed:
            keep.append(e)
            needed |= {r.tensor for r in e.reads()}
    keep.reverse()
    names = needed | {e.out for e in keep}
    return Cascade(
        g.name,
        g.ranks,
        tuple(t for t in g.tensors if t.name in names),
        g.params,
        tuple(keep),
        g.outputs,
        source=g.source,
    )


# -- running the gradient cascade on the reference executor ------------------------------------------


def saved_states(
    g: Gradient, streamed: Cascade, inputs: dict[str, torch.Tensor], params: dict, dtype: torch.dtype = torch.float64
) -> dict[str, torch.Tensor]:
    """The saved states' inputs (values and presence flags) from the reference run of the streamed forward."""
    env = evaluate(streamed, inputs, params, dtype=dtype)
    out = {}
    for s in g.saved:
        v: Value = env[s.name]
        data = v.aligned(s.ranks)
        present = v.aligned_present(s.ranks)
        if present is None:
            present = torch.ones_like(data, dtype=torch.bool)
        rows = tuple(r for r in s.ranks if r in PARALLEL or r == "m")
        row_present = present if present.dim() == len(rows) else present.any(-1)
        out[s.value] = torch.where(present, data, torch.full((), s.init, dtype=data.dtype)).contiguous()
        out[s.present] = row_present.to(torch.int8).contiguous()
    return out


def reference_partials(
    g: Gradient,
    inputs: dict[str, torch.Tensor],
    params: dict,
    grad_output: torch.Tensor,
    output: torch.Tensor,
    saved: dict[str, torch.Tensor],
    dtype: torch.dtype = torch.float64,
) -> dict[str, torch.Tensor]:
    """The partials, by the reference executor: each ``[B, H, ...]`` over its ranks in order (absent as 0)."""
    given = {t.name: inputs[t.name] for t in g.forward.inputs if g.cascade.has_tensor(t.name)}
    given[g.grad_output] = grad_output
    if g.output is not None:
        given[g.output] = output
    given |= {k: v for k, v in saved.items() if g.cascade.has_tensor(k)}
    env = evaluate(g.cascade, given, params, dtype=dtype)
    out = {}
    for p in g.partials:
        v = env[p.name]
        data = v.aligned(p.ranks)
        present = v.aligned_present(p.ranks)
        if present is not None:
            data = torch.where(present, data, torch.zeros((), dtype=data.dtype))
        out[p.name] = data
    return out


def finish(
    g: Gradient,
    partials: dict[str, torch.Tensor],
    labels: dict[str, tuple[str, ...]],
    inputs: dict[str, torch.Tensor],
    wanted: Set[str] | None = None,
    values: dict[str, float] | None = None,
) -> dict[str, torch.Tensor | None]:
    """Each input's gradient in its own shape and dtype, from the partials (``values``: the parameters', which
    partials still over pairs of a table read along the diagonals need, the reference executor's).

    ``labels[name]`` names the dimensions of partial ``name``: its ranks, with ``p`` for a dimension
    of per-program sums still to add, and ``hk`` for a head dimension already summed over each GQA
    group (kv heads). Inputs that are not floating point (or not in ``wanted``) get None; floating-point
    inputs without a partial (read only by predicates: thresholds, masks) get zeros.
    """
    parts: dict[str, list[torch.Tensor]] = {t.name: [] for t in g.forward.inputs}
    for p in g.partials:
        x = inputs[p.input]
        if not x.is_floating_point():
            continue
        decl = g.forward.tensor(p.input)
        value, dims = partials[p.name], list(labels[p.name])
        if "p" in dims:
            value, dims = value.sum(dims.index("p")), [d for d in dims if d != "p"]
        if p.diagonal is not None:
            value, dims = _diagonal_sums(p.diagonal, value, dims, inputs, p.input, decl.ranks, values or {})
        names = dict(p.relabel)
        dims = [names.get(d, d) for d in dims]
        if "h" in dims and decl.layout is Layout.KEY:  # query heads → their kv head
            i, hkv = dims.index("h"), x.shape[decl.ranks.index("h")]
            value = value.unflatten(i, (hkv, value.shape[i] // hkv)).sum(i + 1)
        dims = ["h" if d == "hk" else d for d in dims]
        extra = [i for i, d in enumerate(dims) if d not in decl.ranks]
        if extra:
            value = value.sum(extra)
            dims = [d for d in dims if d in decl.ranks]
        value = value.permute([dims.index(r) for r in decl.ranks]) if dims else value
        parts[p.input].append(value)
    out: dict[str, torch.Tensor | None] = {}
    for t in g.forward.inputs:
        x, mine = inputs[t.name], parts[t.name]
        if not x.is_floating_point() or (wanted is not None and t.name not in wanted):
            out[t.name] = None
        elif not mine:
            out[t.name] = torch.zeros_like(x)
        else:
            total = mine[0] if len(mine) == 1 else torch.stack(torch.broadcast_tensors(*mine)).sum(0)
            out[t.name] = total.to(x.dtype)
    return out
