"""Register tiles as generated code sees them: a value's code, axes, presence and what its absent positions hold.

A ``Tile`` is a Triton expression (or variable) over the axes of its ranks; where it may be absent it
carries a boolean presence tile, and ``fill`` says what absent positions hold when that is known.
The helpers here index tiles to broadcast against each other, combine presences, and work out an op's
value at absent positions from its operands' (``absent_value``), which decides where a ``tl.where`` is
needed at all.

>>> bcast("x", ("m",), ("m", "n"))
'x[:, None]'
>>> presence([Tile("a", ("m", "n"), "pa", ("m",)), Tile("b", ("n",), "pb", ("n",))])
('(pa[:, None] & pb[None, :])', ('m', 'n'))
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from ...ir.operators import OPERATORS
from ...ir.ranks import rank_order

FINITE_PROBES = (0.0, 1.5, -2.25)
POSITIVE_PROBES = (0.125, 1.5)  # a positive parameter's values, for the fills they determine
# ops whose results are finite where their operands are (overflow aside): a finite score's maximum is
# above −inf, which tells a row's presence in a tile without reducing a boolean tile
FINITE_OPS = (
    "add",
    "sub",
    "mul",
    "neg",
    "maximum",
    "minimum",
    "abs",
    "relu",
    "sign",
    "where",
    "tanh",
    "sigmoid",
    "exp",
    "exp2",
)


@dataclass(frozen=True)
class Tile:
    code: str
    ranks: tuple[str, ...]
    present: str | None = None
    pranks: tuple[str, ...] = ()
    fill: float | None = None
    # "f32" (the accumulator type: fp32, fp64 in fp64 kernels), "in" (q, k, v as loaded: the dot dtype),
    # "declared" (another input as loaded, in its own dtype), "bool", "int"
    dtype: str = "f32"
    values: tuple[float, ...] | None = None  # what present positions may hold, when few values stand for all
    finite: bool = False  # present positions hold finite values (given finite q, k and v)
    int_code: str | None = None  # an integer leaf's code as an integer (a constant, an int parameter, an extent)


def axis_extent(rank: str) -> str:
    return {"m": "BLOCK_M", "n": "BLOCK_N"}.get(rank, f"D_{rank}")


def bcast(code: str, have: tuple[str, ...], want: tuple[str, ...]) -> str:
    """Index ``code`` (axes ``have``) so it broadcasts against axes ``want``."""
    if not have or have == want:
        return code
    return f"{code}[{', '.join(':' if r in have else 'None' for r in want)}]"


def literal(v: float) -> str:
    if v == float("inf"):
        return 'float("inf")'
    if v == float("-inf"):
        return 'float("-inf")'
    return repr(float(v))


def _and(a: str | None, b: str | None) -> str | None:
    if a is None:
        return b
    if b is None:
        return a
    return f"({a} & {b})"


def tile_axes(ranks, order: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """Tile axes in the order of ``order`` (ranks it does not name after, by name); else the canonical one.

    >>> tile_axes(["m", "e", "n"]), tile_axes(["m", "e", "n"], ("n", "m"))
    (('m', 'n', 'e'), ('n', 'm', 'e'))
    """
    canonical = rank_order(ranks)
    if order is None:
        return canonical
    return tuple(sorted(canonical, key=lambda r: order.index(r) if r in order else len(order) + canonical.index(r)))


def presence(tiles, how: str = "&", order: tuple[str, ...] | None = None) -> tuple[str | None, tuple[str, ...]]:
    """The presence of a combination of tiles: a boolean tile over the union of their presence axes."""
    parts = [t for t in tiles if t.present is not None]
    if not parts:
        return None, ()
    pranks = tile_axes((r for t in parts for r in t.pranks), order)
    code = f" {how} ".join(bcast(t.present, t.pranks, pranks) for t in parts)
    return (f"({code})" if len(parts) > 1 else code), pranks


def is_finite(v: float | None) -> bool:
    return v is not None and math.isfinite(v)


def absent_value(op: str, args: list[Tile], kept: set[int], implies) -> float | None:
    """The op's value at the result's absent positions, when the operands' values there determine it.

    The result is absent where one of the ``kept`` operands (those whose presence makes up the
    result's) is. There, an operand with a presence holds its fill (absent) or real data
    (present), except that an operand whose presence follows from an absent one's is absent too;
    an operand present everywhere holds real data. Real data is probed with a few finite values.
    An operand that may be absent with an unknown fill may hold anything (NaN included), so
    nothing follows.
    """
    if any(a.present is not None and a.fill is None for a in args):
        return None
    choices = [
        [(a.fill, True)] * (a.present is not None) + [(p, False) for p in a.values or FINITE_PROBES] for a in args
    ]
    # (i, j): operand i present makes operand j present
    follows = [
        (i, j)
        for i, a in enumerate(args)
        for j, b in enumerate(args)
        if i != j and a.present and b.present and implies(a.present, b.present)
    ]
    results = set()
    for combo in itertools.product(*choices):
        if not any(combo[i][1] for i in kept):
            continue  # the result is present here
        if any(combo[j][1] and not combo[i][1] for i, j in follows):
            continue  # cannot happen
        values = [torch.tensor(v, dtype=torch.float64) for v, _ in combo]
        if op == "where":
            values[0] = values[0].bool()
        with torch.no_grad():
            out = float(OPERATORS[op].torch(*values))
        if math.isnan(out):
            return None
        results.add(out)
        if len(results) > 1:
            return None
    return results.pop() if results else None


def few_values(op: str, args: list[Tile]) -> tuple[float, ...] | None:
    """The few values an op of operands with few values takes (a product of constants and positive parameters)."""
    values = [a.values for a in args if a.values is not None]
    if len(values) != len(args) or op == "where":
        return None
    out = set()
    for combo in itertools.product(*values):
        with torch.no_grad():
            out.add(float(OPERATORS[op].torch(*(torch.tensor(v, dtype=torch.float64) for v in combo))))
    return tuple(sorted(out)) if len(out) <= len(POSITIVE_PROBES) ** 2 and all(map(math.isfinite, out)) else None
