"""Multi-head latent attention, absorbed form for decoding: DeepSeek-V2 (DeepSeek-AI 2024).

The cache holds one latent vector per token, k[n, e], that serves as key and as value,
plus a small decoupled rotary key k_rope[n, r]; the query is absorbed into the latent
space. s = (q·k + q_rope·k_rope)·scale; O = softmax(s)·k (output rank e). All query
heads share one latent head: HEADS = (query heads, kv heads).
"""

import torch

import einflash as ef

HEADS = (16, 1)


@ef.attention
def mla_decode(q, k, q_rope: ef.Query["r"], k_rope: ef.Key["r"]):
    s = (q @ k + q_rope @ k_rope) * ef.scale
    return ef.softmax(s, "n") @ k


def extra_inputs(shape, device="cpu", dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Rotary parts one eighth of the latent width (64 of 512 in DeepSeek-V2), at least 4."""
    r = max(4, shape.E // 8)
    return {
        "q_rope": torch.randn(shape.B, shape.Hq, shape.M, r, device=device, dtype=dtype),
        "k_rope": torch.randn(shape.B, shape.Hkv, shape.N, r, device=device, dtype=dtype),
    }
