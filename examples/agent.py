"""Agent attention (Han et al. 2024, "Agent Attention: On the Integration of Softmax and Linear Attention").

A few agent tokens first gather from the keys, then the queries read from the agents:
va[a] = softmax_n(scale·agent[a]·kᵀ)·v;  O = softmax_a(scale·q·agentᵀ)·va.
"""

import torch

import einflash as ef


@ef.attention
def agent(q, k, v, agent: ef.Tensor["b h a e"]):
    va = ef.softmax(ef.einsum("a e, n e -> a n", agent, k) * ef.scale, "n") @ v
    return ef.softmax(ef.einsum("m e, a e -> m a", q, agent) * ef.scale, "a") @ va


def extra_inputs(shape, device="cpu", dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Six agent tokens per head."""
    return {"agent": torch.randn(shape.B, shape.Hq, 6, shape.E, device=device, dtype=dtype)}
