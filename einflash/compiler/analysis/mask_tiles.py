"""Which key tiles of a query tile a mask leaves empty, partial or full, as formulas.

A mask predicate that is affine in the coordinates (causal ``n ≤ m``, sliding
window, prefix-LM, sink + window, bottom-right causal ``n ≤ m + N − M``) is put
in disjunctive normal form over constraints ``a·m + b·n + c ≥ 0``. For query
tile ``i`` (rows ``m0 = i·BM`` to ``m1 = min((i+1)·BM, M) − 1``) each
conjunction is projected onto ``n`` by eliminating ``m`` (Fourier–Motzkin):
what is left bounds ``n`` from both sides, and the key tiles ``j`` that meet
those bounds form one half-open interval. The non-empty tiles are the union of
these intervals over the disjuncts. A tile is full when it meets no point of the
negated mask, so the full tiles are the complement of the negation's non-empty
tiles. Keys past ``N`` and rows past ``M`` are outside every box: a tile cut by
the end of a sequence is full when its in-range points all pass (the kernel
masks ``n < N`` apart).

Integer rounding makes this exact when no two constraints of a conjunction
bound ``m`` with a coefficient other than ±1 (``exact`` on the plan; true for
the whole catalogue). Otherwise the real projection is a superset, so some empty
tiles are visited and some full tiles are treated as partial, never the
reverse. Masks that are not affine (document ids, score thresholds) have no
plan: their tiles are classified at run time.

>>> import einflash as ef
>>> @ef.attention
... def causal(q, k, v):
...     return ef.softmax(ef.mask(q @ k * ef.scale, ef.n <= ef.m), "n") @ v
>>> plan = tile_plan(next(e.where for e in causal.cascade.einsums if e.where is not None))
>>> count_tiles(plan, M=8192, N=8192, BM=128, BN=128)
TileCounts(empty=2016, partial=64, full=2016, total=4096)
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from fractions import Fraction
from itertools import product

import sympy

from ...errors import DeclarationError, MissingInputError, ShapeError
from ...ir.expr import Call, Coord, Expr, Param, Read, Size, to_sympy, transform, walk
from ...ir.ranks import STANDARD_RANKS, coord, new_rank
from .cost import BM, BN

M, N = STANDARD_RANKS["m"].extent, STANDARD_RANKS["n"].extent
I = sympy.Symbol("i", integer=True, nonnegative=True)  # noqa: E741 -- the query tile, i as in the tile formulas
M0, M1 = (sympy.Symbol(s, integer=True, nonnegative=True) for s in ("m0", "m1"))  # its first and last row
ROW_BOUNDS = {M0: I * BM, M1: sympy.Min((I + 1) * BM, M) - 1}
J = sympy.Symbol("j", integer=True, nonnegative=True)  # a key tile (transposed plans)
N0, N1 = (sympy.Symbol(s, integer=True, nonnegative=True) for s in ("n0", "n1"))  # its first and last key
KEY_BOUNDS = {N0: J * BN, N1: sympy.Min((J + 1) * BN, N) - 1}
NCOLS = sympy.ceiling(N / BN)  # key tiles per row
_m, _n = coord("m"), coord("n")

_ARITH = frozenset({"add", "sub", "mul", "neg", "div", "floordiv"})
_NEGATED = {"le": "gt", "lt": "ge", "ge": "lt", "gt": "le", "eq": "ne", "ne": "eq"}


# -- the affine form ------------------------------------------------------------------


@dataclass(frozen=True)
class Constraint:
    """``a·m + b·n + c ≥ 0`` over integer coordinates, ``c`` an integer-valued expression.

    >>> print(Constraint(1, -1, sympy.Integer(0)))
    m - n >= 0
    """

    a: int
    b: int
    c: sympy.Expr

    def __str__(self) -> str:
        return f"{self.a * _m + self.b * _n + self.c} >= 0"

    def sort_key(self):
        return self.a, self.b, sympy.default_sort_key(self.c)


Conjunction = tuple[Constraint, ...]
Form = tuple[Conjunction, ...]  # a disjunction; () is false, ((),) is true
TRUE: Form = ((),)
FALSE: Form = ()


def _known(forms: tuple[Form | None, ...]) -> list[Form] | None:
    """The forms, or None where one of them is None (not affine)."""
    known = [f for f in forms if f is not None]
    return known if len(known) == len(forms) else None


def _union(forms: list[Form]) -> Form:
    conjs = tuple(dict.fromkeys(c for f in forms for c in f))
    return TRUE if () in conjs else conjs


def _or(*forms: Form | None) -> Form | None:
    known = _known(forms)
    return None if known is None else _union(known)


def _and(*forms: Form | None) -> Form | None:
    known = _known(forms)
    if known is None:
        return None
    out = TRUE
    for f in known:
        out = _union([(tuple(sorted(set(p) | set(q), key=Constraint.sort_key)),) for p in out for q in f])
    return out


def param_symbol(name: str, integer: bool) -> sympy.Symbol:
    """The symbol of scalar parameter ``name``; only integer ones let rounding drop out.

    >>> sympy.floor(param_symbol("W", True) - 1), sympy.floor(param_symbol("W", False) - 1)
    (W - 1, floor(W) - 1)
    """
    return sympy.Symbol(name, integer=True) if integer else sympy.Symbol(name, real=True)


def _is_arith(x: Expr) -> bool:
    if isinstance(x, Call):
        return x.op in _ARITH
    if isinstance(x, Coord):
        return x.rank in ("m", "n")
    return not isinstance(x, Read)


def _arith(x: Expr, integers: frozenset[str]) -> sympy.Expr | None:
    """``x`` as sympy when it is arithmetic over m, n, constants, parameters and extents."""
    if not all(_is_arith(y) for y in walk(x)):
        return None

    def leaf(y: Expr) -> sympy.Expr:
        if isinstance(y, Param):
            return param_symbol(y.name, y.name in integers)
        if isinstance(y, Coord):
            return coord(y.rank)
        assert isinstance(y, Size), y  # _is_arith lets no read through; to_sympy turns constants and calls itself
        return new_rank(y.rank).extent

    return to_sympy(x, leaf)


def _atom(g: sympy.Expr, strict: bool) -> Form | None:
    """``g > 0`` (strict) or ``g ≥ 0`` as a form, when ``g`` is affine in m and n."""
    g = sympy.expand(g)
    a, b = g.coeff(_m, 1), g.coeff(_n, 1)
    r = sympy.expand(g - a * _m - b * _n)
    if not (a.is_Rational and b.is_Rational) or r.has(_m, _n, sympy.oo, -sympy.oo, sympy.zoo, sympy.nan):
        return None
    d = sympy.ilcm(a.q, b.q)
    a, b, r = int(a * d), int(b * d), r * d
    # a·m + b·n is an integer, so it exceeds -r iff it reaches floor(-r) + 1, and reaches -r iff it reaches ceil(-r).
    c = sympy.ceiling(r) - 1 if strict else sympy.floor(r)
    k = math.gcd(a, b)
    if k == 0:
        holds = sympy.Ge(c, 0)
        return TRUE if holds is sympy.true else FALSE if holds is sympy.false else ((Constraint(0, 0, c),),)
    return ((Constraint(a // k, b // k, sympy.floor(c / k)),),)


def _compare(op: str, lhs: Expr, rhs: Expr, integers: frozenset[str]) -> Form | None:
    left, right = _arith(lhs, integers), _arith(rhs, integers)
    if left is None or right is None:
        return None
    g = right - left  # lhs ≤ rhs  ⇔  g ≥ 0
    if op == "eq":
        return _and(_atom(g, False), _atom(-g, False))
    if op == "ne":
        return _or(_atom(g, True), _atom(-g, True))
    return _atom(g if op in ("le", "lt") else -g, op in ("lt", "gt"))


def _form(pred: Expr, integers: frozenset[str], negate: bool) -> Form | None:
    if not isinstance(pred, Call):
        return None
    if pred.op == "not":
        return _form(pred.args[0], integers, not negate)
    if pred.op in ("and", "or"):
        parts = [_form(a, integers, negate) for a in pred.args]
        return _and(*parts) if (pred.op == "and") != negate else _or(*parts)
    if pred.op in _NEGATED:
        lhs, rhs = pred.args
        return _compare(_NEGATED[pred.op] if negate else pred.op, lhs, rhs, integers)
    return None


def affine_form(pred: Expr, integers: frozenset[str] = frozenset(), negate: bool = False) -> Form | None:
    """The predicate (or its negation) as a disjunction of conjunctions of affine constraints.

    None when it is not affine in (m, n): tensor reads, other ranks, products of
    coordinates, ``//`` of a coordinate. ``integers`` names the parameters declared
    ``int``; the others may take any real value.

    >>> from einflash.ir.expr import call
    >>> window = call("and", call("le", Coord("n"), Coord("m")),
    ...               call("lt", call("sub", Coord("m"), Coord("n")), Param("W")))
    >>> [[str(c) for c in conj] for conj in affine_form(window, frozenset({"W"}))]
    [['W - m + n - 1 >= 0', 'm - n >= 0']]
    >>> [[str(c) for c in conj] for conj in affine_form(window, negate=True)]
    [['-m + n - 1 >= 0'], ['m - n + floor(-W) >= 0']]
    """
    return _form(pred, integers, negate)


def is_affine(pred: Expr) -> bool:
    """Whether :func:`affine_form` can describe ``pred`` (else tiles are classified at run time).

    >>> from einflash.ir.expr import call
    >>> is_affine(call("le", Coord("n"), Coord("m"))), is_affine(call("eq", Read("doc", (_m,)), Read("doc", (_n,))))
    (True, False)
    """
    return affine_form(pred) is not None


def format_form(form: Form) -> str:
    """A form as text.

    >>> one = sympy.Integer(1)
    >>> format_form(((Constraint(1, -1, 0 * one), Constraint(-1, 1, 9 * one)), (Constraint(0, -1, 3 * one),)))
    '(m - n >= 0 ∧ -m + n + 9 >= 0) ∨ (3 - n >= 0)'
    """
    if not form:
        return "false"
    texts = [" ∧ ".join(str(c) for c in conj) or "true" for conj in form]
    return texts[0] if len(texts) == 1 else " ∨ ".join(f"({t})" for t in texts)


# -- per-row intervals ------------------------------------------------------------------


@dataclass(frozen=True)
class Interval:
    """Key tiles ``lo ≤ j < hi`` of query tile ``i`` where ``when`` holds, none where it does not.

    Bounds are in ``m0``, ``m1`` (see ``ROW_BOUNDS``), ``BM``, ``BN``, ``M``, ``N``
    and parameters.

    >>> print(Interval(sympy.Integer(0), NCOLS, sympy.Le(M0, N)))
    [0, ceiling(N/BN)) if m0 <= N
    """

    lo: sympy.Expr
    hi: sympy.Expr
    when: sympy.Basic = sympy.true

    def __str__(self) -> str:
        return f"[{self.lo}, {self.hi})" + ("" if self.when is sympy.true else f" if {self.when}")

    def is_void(self) -> bool:
        """Provably empty for every row and size."""
        return self.when is sympy.false or bool((self.hi - self.lo).is_nonpositive)


_ROW_LOW, _ROW_HIGH = Constraint(1, 0, -M0), Constraint(-1, 0, M1)  # m ≥ m0, m ≤ m1


def _eliminate_m(conj: Conjunction) -> list[Constraint]:
    """Constraints on n alone that hold iff some row m0 ≤ m ≤ m1 meets ``conj`` (over the reals)."""
    lows = [c for c in conj if c.a > 0] + [_ROW_LOW]
    highs = [c for c in conj if c.a < 0] + [_ROW_HIGH]
    # (−u.a)·l + l.a·u cancels m with non-negative weights; m0 ≤ m1 holds in every row.
    pairs = [
        Constraint(0, -u.a * lo.b + lo.a * u.b, -u.a * lo.c + lo.a * u.c)
        for lo in lows
        for u in highs
        if (lo, u) != (_ROW_LOW, _ROW_HIGH)
    ]
    return [c for c in conj if c.a == 0] + pairs


def _is_exact(conj: Conjunction) -> bool:
    """Whether integer rows exist wherever real ones do: m is bounded by one constraint, or with unit weights."""
    bounding = [c.a for c in conj if c.a != 0]
    return len(bounding) <= 1 or all(abs(a) == 1 for a in bounding)


def row_interval(conj: Conjunction) -> Interval | None:
    """The key tiles of query tile ``i`` holding a point of ``conj``; None if there are never any.

    Under ``when`` the interval is never empty.

    >>> print(row_interval((Constraint(1, -1, sympy.Integer(0)),)))
    [0, Min(floor(m1/BN) + 1, ceiling(N/BN)))
    """
    on_n = _eliminate_m(conj)
    lows = [sympy.Integer(0)] + [sympy.ceiling(-c.c / c.b) for c in on_n if c.b > 0]
    highs = [N - 1] + [sympy.floor(c.c / -c.b) for c in on_n if c.b < 0]
    when = sympy.And(*(sympy.Ge(c.c, 0) for c in on_n if c.b == 0), *(sympy.Le(lo, hi) for lo in lows for hi in highs))
    if when is sympy.false:
        return None
    # floor is monotone, so the tile of the largest lower bound is the largest tile of the lower bounds.
    lo = sympy.Max(*(sympy.floor(x / BN) for x in lows))
    hi = sympy.Min(*(NCOLS if x == N - 1 else sympy.floor(x / BN) + 1 for x in highs))
    return Interval(lo, hi, when)


def _misses(cut: Interval, k: int, lo: sympy.Expr, hi: sympy.Expr, first: int | None, last: int | None):
    """Cut ``k`` has no tile in [lo, hi), where cut ``first`` ends at lo and cut ``last`` starts at hi.

    Of cuts that end (start) at the same tile the lowest-numbered one names the run,
    hence the strict comparisons: each run is produced once.
    """
    if k in (first, last):
        return sympy.true
    # A present cut is never empty and lies within [0, NCOLS): beyond either end of the row, or
    # starting at 0 (ending at NCOLS) and right (left) of the run, it leaves the run empty anyway.
    right = () if last is None or cut.lo == 0 else ((sympy.Gt if k < last else sympy.Ge)(cut.lo, hi),)
    left = () if first is None or cut.hi == NCOLS else ((sympy.Lt if k < first else sympy.Le)(cut.hi, lo),)
    return sympy.Or(sympy.Not(cut.when), *right, *left)


def _complement(cuts: tuple[Interval, ...]) -> tuple[Interval, ...]:
    """Disjoint intervals covering the tiles of [0, NCOLS) in none of ``cuts``.

    A maximal run of such tiles starts at 0 or where a cut ends, stops at NCOLS or
    where a cut starts, and meets no cut: (k + 1)² candidates for k cuts.
    """
    starts = [(sympy.Integer(0), None)] + [(c.hi, k) for k, c in enumerate(cuts) if c.hi != NCOLS]
    ends = [(NCOLS, None)] + [(c.lo, k) for k, c in enumerate(cuts) if c.lo != 0]
    runs = []
    for (lo, first), (hi, last) in product(starts, ends):
        if first is not None and first == last:
            continue  # a cut ends after it starts
        when = sympy.And(
            *(cuts[x].when for x in (first, last) if x is not None),
            *(_misses(c, k, lo, hi, first, last) for k, c in enumerate(cuts)),
        )
        if not (run := Interval(lo, hi, when)).is_void():
            runs.append(run)
    return tuple(runs)


@dataclass(frozen=True)
class TilePlan:
    """Per query tile ``i``: the key tiles to visit and those that need no mask.

    ``visit`` intervals (possibly overlapping) cover the non-empty tiles, ``cut``
    intervals cover the tiles holding a masked-out point, ``full`` are disjoint
    intervals of the tiles in no cut. ``exact``: no empty tile is visited and
    every full tile is in ``full``; otherwise the plan errs on the safe side.
    """

    form: Form
    visit: tuple[Interval, ...]
    cut: tuple[Interval, ...]
    full: tuple[Interval, ...]
    exact: bool
    over: str = "n"  # "n": key tiles j per query tile i; "m" (transposed): query tiles i per key tile j

    def __str__(self) -> str:
        if self.over == "m":
            keys = ", ".join(f"{k} = {v}" for k, v in KEY_BOUNDS.items())
            head = f"query tiles i of key tile j ({keys}), 0 ≤ i < {sympy.ceiling(M / BM)}:"
        else:
            rows = ", ".join(f"{k} = {v}" for k, v in ROW_BOUNDS.items())
            head = f"key tiles j of query tile i ({rows}), 0 ≤ j < {NCOLS}:"
        lines = [f"mask {format_form(self.form)}", head]
        for name, ivs in (("non-empty", self.visit), ("full", self.full)):
            texts = [str(iv) for iv in ivs] or ["none"]
            lines += [f"  {name if k == 0 else '':10}{text}" for k, text in enumerate(texts)]
        lines.append("  exact" if self.exact else "  conservative: may visit empty tiles and mask full ones")
        return "\n".join(lines)


_SIZES = frozenset({M0, M1, N0, N1, BM, BN, M, N})  # bound by count_tiles itself
_RESERVED = frozenset(s.name for s in _SIZES | {I, J, _m, _n})


def tile_plan(pred: Expr, integers: frozenset[str] = frozenset()) -> TilePlan | None:
    """The tile plan of a mask predicate; None when it is not affine.

    ``integers`` names the parameters declared ``int`` (``frozenset(p.name for p in
    cascade.params if p.integer)``).

    >>> from einflash.ir.expr import call
    >>> print(tile_plan(call("le", Coord("n"), Coord("m"))))
    mask m - n >= 0
    key tiles j of query tile i (m0 = BM*i, m1 = Min(M, BM*(i + 1)) - 1), 0 ≤ j < ceiling(N/BN):
      non-empty [0, Min(floor(m1/BN) + 1, ceiling(N/BN)))
      full      [0, ceiling(N/BN)) if m0 + 1 > N - 1
                [0, floor((m0 + 1)/BN)) if m0 + 1 <= N - 1
      exact
    """
    form, negation = affine_form(pred, integers), affine_form(pred, integers, negate=True)
    if form is None or negation is None:
        return None
    clash = sorted({p.name for p in walk(pred) if isinstance(p, Param)} & _RESERVED)
    if clash:
        raise DeclarationError(
            f"mask parameter(s) {', '.join(clash)} share a name with a tile-plan symbol "
            f"({', '.join(sorted(_RESERVED))}); rename the parameter"
        )
    visit = tuple(iv for conj in form if (iv := row_interval(conj)) is not None)
    cut = tuple(iv for conj in negation if (iv := row_interval(conj)) is not None)
    exact = all(_is_exact(conj) for conj in form + negation)
    return TilePlan(form, visit, cut, _complement(cut), exact)


def _swap_sequences(pred: Expr) -> Expr:
    """The predicate with the roles of m and n exchanged (coordinates and extents)."""
    other = {"m": "n", "n": "m"}

    def swap(x):
        if isinstance(x, Coord) and x.rank in other:
            return Coord(other[x.rank])
        if isinstance(x, Size) and x.rank in other:
            return Size(other[x.rank])
        return None

    return transform(pred, swap)


def transposed_plan(pred: Expr, integers: frozenset[str] = frozenset()) -> TilePlan | None:
    """Per key tile ``j`` (keys ``n0`` to ``n1``): the query tiles to visit and those that need no mask.

    This is :func:`tile_plan` of the predicate with m and n exchanged, its symbols renamed back:
    what kernels that keep a key tile and stream query tiles (the backward's dK/dV kernel) visit.

    >>> from einflash.ir.expr import call
    >>> print(transposed_plan(call("le", Coord("n"), Coord("m"))))
    mask m - n >= 0
    query tiles i of key tile j (n0 = BN*j, n1 = Min(N, BN*(j + 1)) - 1), 0 ≤ i < ceiling(M/BM):
      non-empty [floor(n0/BM), ceiling(M/BM)) if n0 <= M - 1
      full      [0, ceiling(M/BM)) if 0 > n1 - 1
                [Min(floor((n1 - 1)/BM) + 1, ceiling(M/BM)), ceiling(M/BM)) if 0 <= n1 - 1
      exact
    """
    plan, form = tile_plan(_swap_sequences(pred), integers), affine_form(pred, integers)
    if plan is None or form is None:
        return None
    back = {M0: N0, M1: N1, BN: BM, BM: BN, N: M, M: N}

    def rename(ivs):
        return tuple(Interval(iv.lo.xreplace(back), iv.hi.xreplace(back), iv.when.xreplace(back)) for iv in ivs)

    return TilePlan(form, rename(plan.visit), rename(plan.cut), rename(plan.full), plan.exact, over="m")


# -- concrete sizes ---------------------------------------------------------------------

_EVAL: dict[type, Callable] = {
    sympy.Add: lambda *a: sum(a),
    sympy.Mul: lambda *a: math.prod(a),
    sympy.Pow: lambda b, e: Fraction(b) ** e,
    sympy.Min: min,
    sympy.Max: max,
    sympy.Mod: operator.mod,
    sympy.GreaterThan: operator.ge,
    sympy.StrictGreaterThan: operator.gt,
    sympy.LessThan: operator.le,
    sympy.StrictLessThan: operator.lt,
    sympy.Equality: operator.eq,
    sympy.Unequality: operator.ne,
    sympy.Not: operator.not_,
}
_SHORT_CIRCUIT = {sympy.And: all, sympy.Or: any}


@functools.lru_cache(maxsize=4096)
def _compile(e: sympy.Basic) -> Callable[[Mapping[str, int | Fraction]], int | Fraction | bool]:
    """Exact evaluation of a bound at integer or rational values, without sympy's per-call cost."""
    if e.is_Symbol:
        return lambda env: env[e.name]
    if e in (sympy.true, sympy.false) or e.is_Rational:
        value = bool(e) if e in (sympy.true, sympy.false) else int(e) if e.is_Integer else Fraction(int(e.p), int(e.q))
        return lambda env: value
    if isinstance(e, (sympy.floor, sympy.ceiling)):
        # floor(x / d) as x // d: exact and quick on ints, where x / d would make a Fraction.
        num, den = (_compile(x) for x in sympy.fraction(sympy.together(e.args[0])))
        if isinstance(e, sympy.floor):
            return lambda env: num(env) // den(env)
        return lambda env: -(-num(env) // den(env))
    args = [_compile(x) for x in e.args]
    if type(e) in _SHORT_CIRCUIT:
        quantifier = _SHORT_CIRCUIT[type(e)]
        return lambda env: quantifier(x(env) for x in args)
    fn = _EVAL[type(e)]
    return lambda env: fn(*(x(env) for x in args))


def _compile_interval(iv: Interval) -> Callable[[Mapping], tuple[int, int] | None]:
    lo, hi, when = _compile(iv.lo), _compile(iv.hi), _compile(iv.when)
    return lambda env: (int(lo(env)), int(hi(env))) if when(env) else None


def _merge(spans) -> tuple[tuple[int, int], ...]:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(s for s in spans if s is not None and s[0] < s[1]):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return tuple(out)


@dataclass(frozen=True)
class RowTiles:
    """One query tile's non-empty and full key tiles, as sorted disjoint ranges ``[lo, hi)`` of j."""

    nonempty: tuple[tuple[int, int], ...]
    full: tuple[tuple[int, int], ...]

    def counts(self) -> tuple[int, int]:
        """(non-empty, partial) key tiles: what a program visits, and of those what its mask must test."""
        nonempty = _size(self.nonempty)
        return nonempty, nonempty - _size(self.full)


@dataclass(frozen=True)
class _Compiled:
    visit: tuple[Callable, ...]
    full: tuple[Callable, ...]
    params: tuple[sympy.Symbol, ...]  # the symbols a caller binds, sorted by name


@functools.lru_cache(maxsize=64)
def _compiled(plan: TilePlan) -> _Compiled:
    symbols = {s for iv in plan.visit + plan.full for x in (iv.lo, iv.hi, iv.when) for s in x.free_symbols}
    return _Compiled(
        tuple(map(_compile_interval, plan.visit)),
        tuple(map(_compile_interval, plan.full)),
        tuple(sorted(symbols - _SIZES, key=lambda s: s.name)),
    )


def _environment(needs: tuple[sympy.Symbol, ...], M: int, N: int, BM: int, BN: int, params: Mapping) -> dict:
    for name, value, least in (("M", M, 0), ("N", N, 0), ("BM", BM, 1), ("BN", BN, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ShapeError(f"{name} must be an int ≥ {least}, got {value!r}")
    env: dict = {"M": M, "N": N, "BM": BM, "BN": BN}
    for s in needs:
        if s.name not in params:
            raise MissingInputError(f"the mask needs {s.name!r}; pass it as a keyword argument")
        value = params[s.name]
        if isinstance(value, bool) or not isinstance(value, int if s.is_integer else (int, float)):
            raise MissingInputError(f"{s.name} must be {'an int' if s.is_integer else 'a number'}, got {value!r}")
        env[s.name] = value if isinstance(value, int) else Fraction(value)
    return env


def tile_rows(plan: TilePlan, M: int, N: int, BM: int, BN: int, **params: float) -> Iterator[RowTiles]:
    """The classification of every key tile, query tile by query tile, for concrete sizes.

    >>> from einflash.ir.expr import call
    >>> plan = tile_plan(call("le", Coord("n"), Coord("m")))
    >>> [r.full for r in tile_rows(plan, M=5, N=5, BM=2, BN=2)]
    [(), ((0, 1),), ((0, 3),)]
    """
    code = _compiled(plan)
    env = _environment(code.params, M, N, BM, BN, params)
    if plan.over == "m":  # transposed: per key tile, ranges of query tiles
        for j in range(-(-N // BN)):
            env["n0"], env["n1"] = j * BN, min((j + 1) * BN, N) - 1
            yield RowTiles(_merge(f(env) for f in code.visit), _merge(f(env) for f in code.full))
        return
    for i in range(-(-M // BM)):
        env["m0"], env["m1"] = i * BM, min((i + 1) * BM, M) - 1
        yield RowTiles(_merge(f(env) for f in code.visit), _merge(f(env) for f in code.full))


@dataclass(frozen=True)
class TileCounts:
    empty: int
    partial: int
    full: int
    total: int


def _size(spans: tuple[tuple[int, int], ...]) -> int:
    return sum(hi - lo for lo, hi in spans)


def count_tiles(plan: TilePlan, M: int, N: int, BM: int, BN: int, **params: float) -> TileCounts:
    """How many (query tile, key tile) pairs are empty, partial and full; O(query tiles) work.

    >>> from einflash.ir.expr import call
    >>> count_tiles(tile_plan(call("le", Coord("n"), Coord("m"))), M=5, N=5, BM=2, BN=2)
    TileCounts(empty=3, partial=2, full=4, total=9)
    """
    nonempty = full = 0
    for row in tile_rows(plan, M, N, BM, BN, **params):
        nonempty, full = nonempty + _size(row.nonempty), full + _size(row.full)
    total = -(-M // BM) * -(-N // BN)
    return TileCounts(total - nonempty, nonempty - full, full, total)


def conjuncts(x: Expr) -> list[Expr]:
    """The parts of a mask joined by ``&``, in order."""
    if isinstance(x, Call) and x.op == "and":
        return conjuncts(x.args[0]) + conjuncts(x.args[1])
    return [x]


def affine_part(where: Expr, integers: frozenset[str]) -> Expr | None:
    """The conjunction of a mask's affine conjuncts (the part tile plans can reason about), or None."""
    affine = [p for p in conjuncts(where) if tile_plan(p, integers) is not None]
    if not affine:
        return None
    pred = affine[0]
    for p in affine[1:]:
        pred = Call("and", (pred, p))
    return pred
