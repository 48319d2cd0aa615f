"""Top-θ attention: scores below a per-head threshold are pruned (Berestizshevsky et al. 2025, "Top-Theta Attention").

s is kept where s ≥ θ[h] and is −∞ elsewhere; O = softmax(s)·v. A query whose scores
all fall below θ has output 0.
"""

import math

import torch

import einflash as ef


@ef.attention
def top_theta(q, k, v, theta: ef.Tensor["h"]):
    s = q @ k * ef.scale
    return ef.softmax(ef.mask(s, s >= theta), "n") @ v


def extra_inputs(shape, device="cpu", dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Thresholds from mild to strict: for unit-variance scores the strictest heads prune whole rows."""
    top = math.sqrt(2 * math.log(max(shape.N, 2)))  # about the largest of N standard normal scores
    return {"theta": torch.linspace(0.25, 1.0, shape.Hq, device=device, dtype=dtype) * top}
