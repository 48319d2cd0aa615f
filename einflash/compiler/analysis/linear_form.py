"""Attention in linear form: weights that enter the output linearly, so that a state summed over the keys replaces
the M×N weights.

A cascade is in linear form when its output is ``o[m,f] = Σ_n w[m,n]·v[n,f]`` with ``w = (Σ_e a[m,e]·b[n,e])·d``:
no function of the scores is taken and nothing normalises them over n. ``a`` may depend on the query side only
(a feature map of q), ``b`` on the key side only (a feature map of k, normalised over the keys or not), and every
factor ``d`` or factor of the summand that depends on both sides must split into a query part times a key part
once its exponentials are expanded (a decay ``γ^(m − n) = γ^m·γ^−n``, GLA's gates ``exp(G[m,e] − G[n,e])``). Then
``o[m] = a'[m]·S`` with the state ``S[e,f] = Σ_n b'[n,e]·v[n,f]`` (E×F per head). A causal mask ``n ≤ m + c`` makes
``S`` a running state (a mask ``n ≥ m + c``, one running backwards): the chunked form computes each chunk of C
queries against its own C keys quadratically and against the keys before through the state carried from chunk to
chunk.

Analysis only: the kernels still run the quadratic form; ``explain()`` reports the state, the chunked plan's FLOPs
and the length past which it is cheaper.

>>> import einflash as ef
>>> @ef.attention
... def decayed(q, k, v, decay: ef.Tensor["h"]):
...     return ef.mask((q @ k) * ef.exp((ef.m - ef.n) * ef.log(decay)), ef.n <= ef.m) @ v
>>> form = linear_form(decayed.cascade)
>>> form.causal, form.separated, form.state
(True, True, ('e', 'f'))
>>> form.crossover(chunk=64, e=128, f=128)
320
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy

from ...ir.algebra import factors
from ...ir.cascade import Cascade, Layout
from ...ir.expr import Expr, Read, free_ranks, to_sympy, walk
from ...ir.ranks import PARALLEL, STREAM
from .mask_tiles import affine_form

N, C, E, F = (sympy.Symbol(s, integer=True, positive=True) for s in ("N", "C", "E", "F"))
BOTH = frozenset({"m", STREAM})


@dataclass(frozen=True)
class LinearForm:
    """The linear form of a cascade: the state's ranks (contracted rank, value rank), whether a causal mask makes
    it a running state, and whether some factor had to be split into query and key parts (a decay, gates)."""

    state: tuple[str, str]
    causal: bool
    separated: bool

    @property
    def quadratic_flops(self) -> sympy.Expr:
        """FLOPs per head of the quadratic form at M = N (a causal mask halves them)."""
        full = 2 * N * N * (E + F)
        return full / 2 if self.causal else full

    @property
    def chunked_flops(self) -> sympy.Expr:
        """FLOPs per head of the linear form at M = N: causal, each chunk of C queries against its own keys
        (half of C×C) and the state (its update kᵀv and its read q·S); otherwise the state once and its read."""
        state = 4 * N * E * F
        return N * C * (E + F) + state if self.causal else state

    def crossover(self, chunk: int, e: int, f: int) -> int:
        """The shortest sequence at which the linear form takes no more FLOPs than the quadratic one."""
        at = sympy.solve(sympy.Eq(self.quadratic_flops, self.chunked_flops), N)
        return int(sympy.ceiling(max(x.subs({C: chunk, E: e, F: f}) for x in at)))


def _side(x: Expr, pairs: set[str]) -> frozenset[str] | None:
    """The sequence ranks ``x`` depends on (m, n, both or neither); None where it reads a value computed from the
    pairs (a normaliser of the scores)."""
    if any(isinstance(r, Read) and r.tensor in pairs for r in walk(x)):
        return None
    return frozenset(free_ranks(x) & BOTH)


def _splits(x: Expr, pairs: set[str]) -> bool:
    """Whether ``x`` is a product of a query part and a key part once its exponentials are expanded."""
    leaves: dict[Expr, sympy.Symbol] = {}
    sides: dict[sympy.Symbol, frozenset[str]] = {}

    def leaf(y: Expr) -> sympy.Symbol:
        if y not in leaves:
            leaves[y] = sympy.Symbol(f"x{len(leaves)}", real=True)
            sides[leaves[y]] = _side(y, pairs) or frozenset()
        return leaves[y]

    if _side(x, pairs) is None:
        return False
    expanded = sympy.expand(sympy.powsimp(to_sympy(x, leaf), combine="exp"), power_exp=True, log=False)
    return all(
        set().union(*(sides.get(s, frozenset()) for s in t.free_symbols)) != BOTH for t in sympy.Mul.make_args(expanded)
    )


def linear_form(c: Cascade) -> LinearForm | None:
    """The linear form of ``c`` (as written, before the rewrites), or None where its weights are not linear."""
    out = c.producer(c.outputs[0])
    if out is None or out.reduce is None or out.reduce.op != "sum" or out.reduce.ranks != (STREAM,) or out.where:
        return None
    reads = [(f, k) for f, k in factors(out.expr) if isinstance(f, Read)]
    values = [f for f, k in reads if k == 1 and c.tensor(f.tensor).layout is Layout.KEY]
    if len(values) != 1:
        return None
    value_rank = next(r for r in c.tensor(values[0].tensor).ranks if r not in PARALLEL and r != STREAM)
    pairs = {e.out for e in c.einsums if e.iteration_ranks >= BOTH and e.out != out.out}
    todo = [f for f, _ in factors(out.expr) if f != values[0]]
    dots, masks, separated = [], [], False
    while todo:
        f = todo.pop()
        made = c.producer(f.tensor) if isinstance(f, Read) and f.tensor in pairs else None
        if made is None:  # a factor of the weights read from the inputs or computed per side
            side = _side(f, pairs)
            if side is None or (side == BOTH and not _splits(f, pairs)):
                return None
            separated |= side == BOTH
        elif made.reduce is None:  # a product of the weights' factors, perhaps masked
            masks += [made.where] if made.where is not None else []
            todo += [g for g, _ in factors(made.expr)]
        elif made.reduce.op == "sum" and len(made.reduce.ranks) == 1 and made.where is None:  # the dot
            if not _splits(made.expr, pairs):
                return None
            separated |= any(_side(g, pairs) == BOTH for g, _ in factors(made.expr))
            dots.append(made.reduce.ranks[0])
        else:
            return None
    if len(dots) != 1:
        return None
    for pred in masks:  # n ≤ m + c (or n ≥ m + c); a window or a data mask leaves no single running state
        form = affine_form(pred)
        if (
            form is None
            or len(form) != 1
            or len(form[0]) != 1
            or (form[0][0].a, form[0][0].b) not in ((1, -1), (-1, 1))
        ):
            return None
    return LinearForm((dots[0], value_rank), bool(masks), separated)
