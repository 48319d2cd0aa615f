"""Relative position bias as a dense tensor: T5 (Raffel et al. 2020), Swin (Liu et al. 2021).

s = scale·q·kᵀ + bias[h, m, n]; O = softmax(s)·v.
"""

import torch

import einflash as ef


@ef.attention
def relative_bias(q, k, v, bias: ef.Tensor["h m n"]):
    return ef.softmax(q @ k * ef.scale + bias, "n") @ v


def extra_inputs(shape, device="cpu", dtype=torch.float32) -> dict[str, torch.Tensor]:
    """A learned-looking bias per head that depends on the offset n − m only."""
    table = torch.randn(shape.Hq, shape.M + shape.N, device=device, dtype=dtype)
    offset = torch.arange(shape.N, device=device)[None, :] - torch.arange(shape.M, device=device)[:, None]
    return {"bias": table[:, offset + shape.M - 1]}
