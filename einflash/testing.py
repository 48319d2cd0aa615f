"""The tolerance rule every kernel is held to (DESIGN §7), and random inputs for a declaration.

A kernel's error against the float64 reference may be at most twice the error of
the same maths done by PyTorch in the kernel's dtype (the reference executor run in
that dtype), plus a small floor of a few units in the last place of the output.

>>> import torch, einflash as ef
>>> @ef.attention
... def plain(q, k, v):
...     return ef.softmax(q @ k * ef.scale, "n") @ v
>>> q = torch.randn(1, 2, 9, 16)
>>> check(plain, plain(q, q, q, backend="reference"), q, q, q).ok
True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ULP_FLOOR = 4  # units in the last place of the output's dtype, times the output's magnitude


@dataclass(frozen=True)
class Verdict:
    max_error: float
    tolerance: float
    lowp_error: float  # the error of plain PyTorch in the kernel's dtype
    ok: bool

    def as_dict(self) -> dict:
        return {"max_error": self.max_error, "tolerance": self.tolerance, "lowp_error": self.lowp_error,
                "ok": self.ok}


def tolerance_floor(dtype: torch.dtype, magnitude: float) -> float:
    return ULP_FLOOR * torch.finfo(dtype).eps * max(1.0, magnitude)


def check(op, out: torch.Tensor, *args, **kwargs) -> Verdict:
    """Hold ``out`` (what a kernel returned for these arguments) to the tolerance rule."""
    exact = op.reference(*args, **kwargs)
    lowp = op.reference(*args, dtype=out.dtype, **kwargs).double()
    if not torch.isfinite(out).all():
        bad = float("inf")
    else:
        bad = float((out.double() - exact).abs().max()) if out.numel() else 0.0
    lowp_err = float((lowp - exact).abs().max()) if out.numel() else 0.0
    magnitude = float(exact.abs().max()) if out.numel() else 0.0
    tol = 2 * lowp_err + tolerance_floor(out.dtype, magnitude)
    return Verdict(bad, tol, lowp_err, bad <= tol)
