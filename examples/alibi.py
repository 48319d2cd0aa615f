"""ALiBi: attention with linear biases (Press et al. 2022, "Train Short, Test Long").

s = scale·q·kᵀ + slope[h]·(n − m), with a fixed slope per head; O = softmax(s)·v.
Not causal here, as FlexAttention benchmarks it.

Positions count from the first query (ef.m = 0 is q's first row), which is right when M = N; for decoding
and chunked prefill (M < N) write the bias end-aligned, as docs/semantics.md shows.
"""

import torch

import einflash as ef


@ef.attention
def alibi(q, k, v, slope: ef.Tensor["h"]):
    s = q @ k * ef.scale + slope * (ef.n - ef.m)
    return ef.softmax(s, "n") @ v


def extra_inputs(shape, device="cpu", dtype=torch.float32) -> dict[str, torch.Tensor]:
    """The paper's geometric slopes 2^(−8i/H), i = 1..H."""
    i = torch.arange(1, shape.Hq + 1, device=device, dtype=dtype)
    return {"slope": 2.0 ** (-8.0 * i / shape.Hq)}
