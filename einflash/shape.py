"""Problem shapes, as the CLI, the demo, the tuner and the benchmarks name them."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ShapeError

ASSUMED_EXTENT = 16  # of a rank a declaration adds (``r``, ``a``...) when no extent is given for it


@dataclass(frozen=True, init=False)
class Shape:
    """B, query heads, query length M, key length N, head dims E (q·k) and F (v); Hkv kv heads.

    >>> Shape.parse("2,16,4096,4096,128")
    Shape(B=2, Hq=16, M=4096, N=4096, E=128, F=128, Hkv=16)
    """

    B: int
    Hq: int
    M: int
    N: int
    E: int
    F: int
    Hkv: int

    # F and Hkv may be left out (None: F is E, Hkv is Hq), and are ints once made: a generated __init__ would
    # leave them Optional for every reader
    def __init__(self, B: int, Hq: int, M: int, N: int, E: int, F: int | None = None, Hkv: int | None = None):
        given = {
            "B": B,
            "Hq": Hq,
            "M": M,
            "N": N,
            "E": E,
            "F": E if F is None else F,
            "Hkv": Hq if Hkv is None else Hkv,
        }
        for name, v in given.items():
            if not isinstance(v, int) or v < 0 or (v == 0 and name not in ("B", "M", "N")):
                raise ShapeError(
                    f"shape field {name} must be a {'non-negative' if name in 'BMN' else 'positive'} int, got {v!r}"
                )
            object.__setattr__(self, name, v)
        if self.Hq % self.Hkv:
            raise ShapeError(f"query heads ({self.Hq}) must be a multiple of kv heads ({self.Hkv})")

    @classmethod
    def parse(cls, text: str, kv_heads: int | None = None, head_dim_v: int | None = None) -> Shape:
        """``B,H,M,N,D`` as the CLI takes it."""
        try:
            b, h, m, n, d = (int(x) for x in text.split(","))
        except ValueError:
            raise ShapeError(f"a shape is B,H,M,N,D (five ints), got {text!r}") from None
        return cls(b, h, m, n, d, head_dim_v, kv_heads)

    def extents(self, ranks, dims: dict[str, int] | None = None) -> dict[str, int]:
        """The extent of each rank named in ``ranks`` at this shape: b, h (query heads), m, n, e, f from the
        shape, any other rank from ``dims``, else ``ASSUMED_EXTENT``.

        >>> Shape(2, 16, 4096, 4096, 128).extents(["b", "m", "r"], {"r": 4})
        {'b': 2, 'h': 16, 'm': 4096, 'n': 4096, 'e': 128, 'f': 128, 'r': 4}
        """
        out = {"b": self.B, "h": self.Hq, "m": self.M, "n": self.N, "e": self.E, "f": self.F}
        for r in ranks:
            if r not in out:
                out[r] = (dims or {}).get(r, ASSUMED_EXTENT)
        return out

    @property
    def group(self) -> int:
        return self.Hq // self.Hkv
