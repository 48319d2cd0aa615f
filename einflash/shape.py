"""Problem shapes, as the CLI, the demo, the tuner and the benchmarks name them."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ShapeError


@dataclass(frozen=True)
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
    F: int | None = None
    Hkv: int | None = None

    def __post_init__(self):
        if self.F is None:
            object.__setattr__(self, "F", self.E)
        if self.Hkv is None:
            object.__setattr__(self, "Hkv", self.Hq)
        for name in ("B", "Hq", "M", "N", "E", "F", "Hkv"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0 or (v == 0 and name not in ("B", "M", "N")):
                raise ShapeError(f"shape field {name} must be a {'non-negative' if name in 'BMN' else 'positive'} "
                                 f"int, got {v!r}")
        if self.Hq % self.Hkv:
            raise ShapeError(f"query heads ({self.Hq}) must be a multiple of kv heads ({self.Hkv})")

    @classmethod
    def parse(cls, text: str, kv_heads: int | None = None, head_dim_v: int | None = None) -> "Shape":
        """``B,H,M,N,D`` as the CLI takes it."""
        try:
            b, h, m, n, d = (int(x) for x in text.split(","))
        except ValueError:
            raise ShapeError(f"a shape is B,H,M,N,D (five ints), got {text!r}") from None
        return cls(b, h, m, n, d, head_dim_v, kv_heads)

    @property
    def group(self) -> int:
        return self.Hq // self.Hkv
