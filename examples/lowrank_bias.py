"""Low-rank attention bias: FlashBias (Wu et al. 2025).

A bias that factors as u[m]·w[n] (rank r) is added to the scores:
s = scale·q·kᵀ + Σ_r u[m,r]·w[n,r]; O = softmax(s)·v. It is exact to fold the bias
into the q·k contraction by widening q and k with u and w.
"""

import torch

import einflash as ef


@ef.attention
def lowrank_bias(q, k, v, u: ef.Query["r"], w: ef.Key["r"]):
    return ef.softmax(q @ k * ef.scale + u @ w, "n") @ v


def extra_inputs(shape, device="cpu", dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Rank-4 factors."""
    r = 4
    return {
        "u": torch.randn(shape.B, shape.Hq, shape.M, r, device=device, dtype=dtype) / 2,
        "w": torch.randn(shape.B, shape.Hkv, shape.N, r, device=device, dtype=dtype) / 2,
    }
