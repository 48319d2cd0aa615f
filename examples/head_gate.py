"""Mixture-of-head attention: MoH (Jin et al. 2024, "MoH: Multi-Head Attention as Mixture-of-Head Attention").

A router weighs every head's output per token: O[m, h] = gate[h, m]·(softmax(s)·v)[m, h].
"""

import torch

import einflash as ef


@ef.attention
def head_gate(q, k, v, gate: ef.Tensor["b h m"]):
    return gate * (ef.softmax(q @ k * ef.scale, "n") @ v)


def extra_inputs(shape, device="cpu", dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Router gates in (0, 1)."""
    return {"gate": torch.rand(shape.B, shape.Hq, shape.M, device=device, dtype=dtype)}
