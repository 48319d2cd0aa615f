"""Gated linear attention: GLA (Yang et al. 2024,
"Gated Linear Attention Transformers with Hardware-Efficient Training").

g[m, e] holds the cumulative log forget gates G (≤ 0, non-increasing along the
sequence); a key's contribution decays per feature between its position and the query's:
O[m, f] = Σ_{n ≤ m} Σ_e q[m,e]·k[n,e]·exp(G[m,e] − G[n,e])·v[n,f].
The gates are read at query and key positions alike, so M must equal N.
"""

import torch

import einflash as ef


@ef.attention
def gla(q, k, v, g: ef.Query["e"]):
    decay = ef.exp(g - g[ef.n, ef.rank("e")])
    w = ef.mask((q * k * decay).sum("e"), ef.n <= ef.m)
    return w @ v


def extra_inputs(shape, device="cpu", dtype=torch.float32) -> dict[str, torch.Tensor]:
    """G = cumsum of log-sigmoid gates, with the paper's 1/16 gate normaliser."""
    logits = torch.randn(shape.B, shape.Hq, shape.M, shape.E, device=device, dtype=dtype)
    return {"g": (torch.nn.functional.logsigmoid(logits) / 16).cumsum(dim=2)}
