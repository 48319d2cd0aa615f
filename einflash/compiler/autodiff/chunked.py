"""The gradient of causal attention in linear form, as three causal linear attentions and the chain rule.

With weights ``w[m,n] = Σ_e A[m,e]·B[n,e]·P(m,n)`` under ``n ≤ m`` (A the query side's factors, B the key side's,
P the factor of both sides, here without the contracted rank e) and ``o = Σ_n w·v``, the incoming gradient ``dO``
gives

    dA[m,e] = Σ_{n ≤ m} (dO[m]·v[n])·P(m,n)·B[n,e]        causal linear attention of (dO, v, B) with P
    dv[n,f] = Σ_{m ≥ n} (B[n]·A[m])·P(m,n)·dO[m,f]        the same, backwards along the sequence
    dB[n,e] = Σ_{m ≥ n} (v[n]·dO[m])·P(m,n)·A[m,e]

so each is the cascade ``mask((q @ k)·P, n ≤ m) @ v`` run on other tensors (the last two as ``mask((q @ k)·P̃,
n ≥ m) @ v`` with ``P̃(m,n) = P(n,m)``: each row sees the keys from its own position on), which the forward runs
chunk by chunk (the last two with their states running backwards). Under the mask ``n ≥ m`` (each row sees the
keys from its own on) the two masks trade places: dA sees the keys after each row, dv and dB those before. Where
``P = exp(X)`` with ``X(m,n) = φ(m) − φ(n)`` (anchored), the gradient of X's inputs comes from
``dφ[t] = Σ_e A[t,e]·dA[t,e] − Σ_e B[t,e]·dB[t,e]`` (the weights' gradients summed over a row, less those summed
over a column) through ``φ(t) = X(t, 0)``; those of A's and B's inputs from dA and dB through A and B.
The chain rule runs on the reference executor's values of A, B and φ (elementwise, O(N·E)) with torch's autograd.

>>> import einflash as ef
>>> @ef.attention
... def decayed(q, k, v, decay: ef.Tensor["h"]):
...     return ef.mask((q @ k) * ef.exp((ef.m - ef.n) * ef.log(decay)), ef.n <= ef.m) @ v
>>> g = chunked_gradient(decayed.cascade)
>>> from einflash.ir.printer import format_expr
>>> format_expr(g.reversed.producer("w").expr), format_expr(g.exponent.einsums[0].expr)
('dot_e[m,n]·exp((n − m)·log(decay[h]))', '(m − 0)·log(decay[h])')
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import sympy
import torch

from ...ir.algebra import factors
from ...ir.cascade import Cascade, Einsum, Layout, Reduction, Role, TensorDecl
from ...ir.expr import Call, Const, Coord, Expr, Read, at_positions, call, free_ranks, reads
from ...ir.ranks import PARALLEL, STREAM, coord
from ...ir.reference import evaluate
from ..rewrite.chunked import anchored, weights

QKV = ("q", "k", "v")


@dataclass(frozen=True)
class ChunkedGradient:
    """The cascades of the chunked gradient: ``forward`` (``mask((q @ k)·P, n ≤ m) @ v``, the mask as written) and
    ``reversed`` (``mask((q @ k)·P̃, n ≥ m) @ v``, P with its positions swapped, the mask turned round); ``query``
    (``a[m,e]``, A) and ``key`` (``bk[n,e]``, B) to differentiate through; ``exponent`` (``phi[m]``, φ) where there
    is a P."""

    forward: Cascade
    reversed: Cascade
    query: Cascade
    key: Cascade
    exponent: Cascade | None

    @property
    def decay_inputs(self) -> frozenset[str]:
        """The inputs the exponent reads (a decay, gates): their gradients come through dφ."""
        if self.exponent is None:
            return frozenset()
        inputs = {t.name for t in self.exponent.inputs}
        return frozenset(r.tensor for e in self.exponent.einsums for r in e.reads() if r.tensor in inputs)


def chunked_gradient(written: Cascade) -> ChunkedGradient | None:
    """The chunked gradient of ``written``, or None where it has none: no causal linear form, a factor of both
    sides over the contracted rank (GLA's gates) or not an exponential of an anchored difference, or one that
    reads q, k or v, or reads an input other than at plain positions."""
    w = weights(written)
    if w is None or written.outputs != ("o",):
        return None
    pair = w.pair
    exponent = None if pair is None else _exponent(pair)
    if pair is not None and (exponent is None or w.contracted in free_ranks(pair) or not anchored(pair)):
        return None
    pair_reads = [] if pair is None else list(reads(pair))
    if any(r.tensor in QKV or not _plain(r) for r in pair_reads):
        return None
    inputs = tuple(t for t in written.inputs if t.name not in QKV)
    swapped = None if pair is None else at_positions(pair, {"m": Coord(STREAM), STREAM: Coord("m")})  # P(n, m)
    phi = None if exponent is None else at_positions(exponent, {STREAM: Const(0.0)})  # φ(m) = X(m, 0)
    return ChunkedGradient(
        _pair_linear(written, inputs, pair, w.direction),
        _pair_linear(written, inputs, swapped, -w.direction),
        _map(written, "a", ("b", "h", "m", w.contracted), w.query),
        _map(written, "bk", ("b", "h", STREAM, w.contracted), w.key),
        None if phi is None else _map(written, "phi", ("b", "h", "m"), phi),
    )


def _exponent(pair: Expr) -> Expr | None:
    """X where ``pair`` is a product of exponentials ``exp(X)`` (and their reciprocals); else None."""
    terms = []
    for f, k in factors(pair):
        if not (isinstance(f, Call) and f.op == "exp"):
            return None
        terms.append(f.args[0] if k > 0 else call("neg", f.args[0]))
    out = terms[0]
    for t in terms[1:]:
        out = call("add", out, t)
    return out


def _plain(r: Read) -> bool:
    """Whether ``r`` reads at plain coordinates (no offset, no gather)."""
    index = [sympy.sympify(i) for i in r.index]
    return all(i.is_Integer or (i.is_Symbol and i == coord(i.name)) for i in index)


def _pair_linear(written: Cascade, inputs: tuple[TensorDecl, ...], pair: Expr | None, direction: int) -> Cascade:
    """``mask((q @ k)·pair, n ≤ m) @ v`` (``n ≥ m`` for ``direction`` −1) with ``written``'s other inputs, ranks
    and parameters."""
    e, f = "e", "f"
    q, k, v = ("b", "h", "m", e), ("b", "h", STREAM, e), ("b", "h", STREAM, f)
    own = {name: tuple(coord(r) for r in ranks) for name, ranks in (("q", q), ("k", k), ("v", v))}
    pairs = tuple(coord(r) for r in ("b", "h", "m", STREAM))
    dot = Read("dot_e", pairs)
    weights_ = dot if pair is None else call("mul", dot, pair)
    einsums = (
        Einsum(
            "dot_e",
            ("b", "h", "m", STREAM),
            call("mul", Read("q", own["q"]), Read("k", own["k"])),
            Reduction("sum", (e,)),
        ),
        Einsum(
            "w",
            ("b", "h", "m", STREAM),
            weights_,
            where=call("le" if direction == 1 else "ge", Coord(STREAM), Coord("m")),
        ),
        Einsum(
            "o", ("b", "h", "m", f), call("mul", Read("w", pairs), Read("v", own["v"])), Reduction("sum", (STREAM,))
        ),
    )
    tensors = (
        TensorDecl("q", q, Role.INPUT, Layout.QUERY),
        TensorDecl("k", k, Role.INPUT, Layout.KEY),
        TensorDecl("v", v, Role.INPUT, Layout.KEY),
        *inputs,
        TensorDecl("dot_e", ("b", "h", "m", STREAM)),
        TensorDecl("w", ("b", "h", "m", STREAM)),
        TensorDecl("o", ("b", "h", "m", f), Role.OUTPUT),
    )
    ranks = tuple(r for r in written.ranks if r.name in set(PARALLEL) | {"m", STREAM, e, f} or _used(r.name, inputs))
    name = f"{written.name}_grad" if direction == 1 else f"{written.name}_grad_after"
    return replace(written, name=name, ranks=ranks, tensors=tensors, einsums=einsums)


def _used(rank: str, inputs: tuple[TensorDecl, ...]) -> bool:
    return any(rank in t.ranks for t in inputs)


def _map(written: Cascade, out: str, ranks: tuple[str, ...], x: Expr) -> Cascade:
    """The cascade of one elementwise value ``out[ranks] = x`` over ``written``'s inputs."""
    return replace(
        written,
        tensors=tuple(t for t in written.tensors if t.role is Role.INPUT) + (TensorDecl(out, ranks, Role.OUTPUT),),
        einsums=(Einsum(out, ranks, x),),
        outputs=(out,),
    )


Run = Callable[[Cascade, dict[str, torch.Tensor], torch.dtype], torch.Tensor]


def chunked_gradients(
    g: ChunkedGradient,
    inputs: dict[str, torch.Tensor],
    values: dict[str, float],
    grad_output: torch.Tensor,
    run: Run,
    wanted: frozenset[str],
) -> dict[str, torch.Tensor | None]:
    """Each wanted input's gradient, in its own dtype (None for the others): ``run(cascade, tensors, dtype)`` runs
    ``g.forward`` or ``g.reversed`` (the kernels, or the reference) and returns its output ``[B, H, M, F]`` in
    ``dtype``. dA and dB come in the accumulator type: dφ is a difference of their sums over e, which 16-bit values
    would round away. A decay's gradient (``g.decay_inputs``) through dφ weighs each position by itself
    (``φ(t) = t·log γ``), so the rounding of dA and dB that 16-bit kernels make grows with the length over the decay's
    reach: an H100 measured 13 times plain torch's bf16 error at T 1500. The backward asks the quadratic kernels for
    those gradients instead; here they are as precise as ``run``.

    A, B and φ are the reference executor's values in the accumulator type (fp32; fp64 for fp64), made with
    autograd on: the gradients of their inputs are their vector-Jacobian products with dA, dB and dφ."""
    q, v, low = inputs["q"], inputs["v"], inputs["q"].dtype
    acc = torch.float64 if low == torch.float64 else torch.float32
    heads, group = q.shape[1], q.shape[1] // v.shape[1]

    def per_query_head(x: torch.Tensor) -> torch.Tensor:  # the derived attentions run without GQA
        return x.repeat_interleave(heads // x.shape[1], dim=1) if x.shape[1] != heads else x

    leaves = {n: (x.detach().requires_grad_() if n in wanted else x.detach()) for n, x in inputs.items()}
    made: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}  # A, B, φ: the value, and with autograd on
    for side, c in (("a", g.query), ("bk", g.key), ("phi", g.exponent)):
        if c is None:
            continue
        plain = _plain_input(c)
        if plain is not None:  # A = q, B = k: the input itself, its gradient the derived attention's output
            made[side] = (inputs[plain], None)
            continue
        with torch.enable_grad():
            value = _value(c, leaves, values, acc)
        made[side] = (value.detach(), value if value.requires_grad else None)
    a, bk = made["a"][0].to(low), per_query_head(made["bk"][0]).to(low)
    extra = {n: x for n, x in inputs.items() if n not in QKV}
    d_a = run(g.forward, {"q": grad_output, "k": per_query_head(v), "v": bk} | extra, acc)
    d_v = run(g.reversed, {"q": bk, "k": a, "v": grad_output} | extra, v.dtype)
    d_b = run(g.reversed, {"q": per_query_head(v), "k": grad_output, "v": a} | extra, acc)
    cotangents = {"a": d_a, "bk": _per_kv_head(d_b, heads // made["bk"][0].shape[1])}
    if "phi" in made:  # the weights' gradient summed over each row, less over each column
        cotangents["phi"] = torch.sum(a * d_a, -1, dtype=acc) - torch.sum(bk * d_b, -1, dtype=acc)
    grads: dict[str, torch.Tensor | None] = dict.fromkeys(inputs)
    if "v" in wanted:
        grads["v"] = _per_kv_head(d_v, group).to(v.dtype)
    for side, name in (("a", _plain_input(g.query)), ("bk", _plain_input(g.key))):
        if name is not None and name in wanted:
            grads[name] = cotangents[side].to(inputs[name].dtype)
    traced = [(t, cotangents[s].to(t.dtype)) for s, (_, t) in made.items() if t is not None]
    others = [n for n in wanted if grads[n] is None and leaves[n].is_floating_point()]
    if others:
        found = (
            torch.autograd.grad(
                [t for t, _ in traced], [leaves[n] for n in others], [c for _, c in traced], allow_unused=True
            )
            if traced
            else [None] * len(others)
        )
        for n, d in zip(others, found):
            grads[n] = torch.zeros_like(inputs[n]) if d is None else d.to(inputs[n].dtype)
    return grads


def _plain_input(c: Cascade) -> str | None:
    """The input ``c``'s one value is, read as it is (``a[m,e] = q[m,e]``), or None."""
    (e,) = c.einsums
    x = e.expr
    own = tuple(coord(r) for r in e.ranks)
    return x.tensor if isinstance(x, Read) and c.tensor(x.tensor).role is Role.INPUT and x.index == own else None


def _value(c: Cascade, inputs: dict[str, torch.Tensor], values: dict[str, float], acc: torch.dtype) -> torch.Tensor:
    """The one output of an elementwise cascade ``c``, as ``[B, H, positions(, dim)]``."""
    out = c.outputs[0]
    return evaluate(c, inputs, values, dtype=acc)[out].aligned(c.tensor(out).ranks)


def _per_kv_head(x: torch.Tensor, group: int) -> torch.Tensor:
    """A gradient per query head summed over each kv head's group."""
    if group == 1:
        return x
    b, h, *rest = x.shape
    return x.reshape(b, h // group, group, *rest).sum(2)
