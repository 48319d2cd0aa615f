"""A softmax with a learned sink logit per head (gpt-oss; "attention sinks", Xiao et al. 2023, as a logit
instead of a token): the sink takes part in the row's maximum and sum but has no value, so a row may put
weight on nothing.

O = Σ_n exp(s − μ)·v / (Σ_n exp(s − μ) + exp(sink − μ)), μ = max(max_n s, sink). One pass: the sink is a
constant of the row, folded into the running maximum and sum.
"""

import torch

import einflash as ef


@ef.attention
def sink_logit(q, k, v, sink: ef.Tensor["h"]):
    s = q @ k * ef.scale
    top = ef.maximum(s.max("n"), sink)
    e = ef.exp(s - top)
    return (e @ v) / (e.sum("n") + ef.exp(sink - top))


def extra_inputs(shape, device="cpu", dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Sink logits around the scores' scale."""
    return {"sink": torch.randn(shape.Hq, generator=torch.Generator().manual_seed(3)).to(device=device, dtype=dtype)}
