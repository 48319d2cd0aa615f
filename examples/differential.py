"""Differential attention: DIFF Transformer (Ye et al. 2024).

Two softmax maps over two query/key pairs, subtracted to cancel common-mode noise:
O = softmax(s₁)·v − λ[h]·softmax(s₂)·v, s₁ = scale·q·kᵀ, s₂ = scale·q₂·k₂ᵀ.
"""

import torch

import einflash as ef


@ef.attention
def differential(q, k, v, q2: ef.Query["e"], k2: ef.Key["e"], lam: ef.Tensor["h"]):
    p1 = ef.softmax(q @ k * ef.scale, "n")
    p2 = ef.softmax(q2 @ k2 * ef.scale, "n")
    return p1 @ v - lam * (p2 @ v)


def extra_inputs(shape, device="cpu", dtype=torch.float32) -> dict[str, torch.Tensor]:
    """A second query/key pair and λ per head in (0.2, 0.8)."""
    return {
        "q2": torch.randn(shape.B, shape.Hq, shape.M, shape.E, device=device, dtype=dtype),
        "k2": torch.randn(shape.B, shape.Hkv, shape.N, shape.E, device=device, dtype=dtype),
        "lam": 0.2 + 0.6 * torch.rand(shape.Hq, device=device, dtype=dtype),
    }
