"""Shared pieces of the autotune tests: tiny problems and a fake timer (the cache folder: conftest.py).

The fake timer gives every schedule a fixed, distinct time, so the winner of a tuning run is known
in advance: the smallest ``fake_ms`` among the feasible schedules.
"""

from __future__ import annotations

import torch
from catalogue import load_example


def example(name: str):
    return getattr(load_example(name), name)


def qkv(B=1, Hq=2, Hkv=2, M=40, N=40, D=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(B, Hq, M, D, generator=g, dtype=dtype),
        torch.randn(B, Hkv, N, D, generator=g, dtype=dtype),
        torch.randn(B, Hkv, N, D, generator=g, dtype=dtype),
    )


def fake_ms(s) -> float:
    """Wider key tiles and reversed tiles are faster; taller query tiles and more splits slower."""
    return 1.0 + 0.25 * (s.block_m // 16) + 0.5 * (32 // s.block_n) - 0.125 * s.reverse_m + 0.0625 * s.splits


class FakeTimer:
    """Records the schedules it timed; does not run them again (the tuner ran each for its check)."""

    def __init__(self, ms=fake_ms):
        self.ms, self.timed = ms, []

    def __call__(self, run, schedule) -> float:
        self.timed.append(schedule)
        return self.ms(schedule)
