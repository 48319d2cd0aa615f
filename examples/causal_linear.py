"""Causal linear attention with exponential decay: RetNet (Sun et al. 2023), Lightning Attention-2 (Qin et al. 2024).

O[m] = Σ_{n ≤ m} (q[m]·k[n])·decay[h]^(m − n)·v[n], with no normaliser, written as
a masked quadratic form; past a crossover length the kernels run it chunk by chunk with a D×F running state
(einflash.compiler.rewrite.chunked), forward and backward.

Positions count from the first query (ef.m = 0 is q's first row), which is right when M = N; for decoding
and chunked prefill (M < N) write the mask end-aligned, as docs/semantics.md shows.
"""

import torch

import einflash as ef


@ef.attention
def causal_linear(q, k, v, decay: ef.Tensor["h"]):
    w = ef.mask((q @ k) * ef.exp((ef.m - ef.n) * ef.log(decay)), ef.n <= ef.m)
    return w @ v


def extra_inputs(shape, device="cpu", dtype=torch.float32) -> dict[str, torch.Tensor]:
    """A decay rate per head in (0.8, 1)."""
    return {"decay": 0.8 + 0.2 * torch.rand(shape.Hq, device=device, dtype=dtype)}
