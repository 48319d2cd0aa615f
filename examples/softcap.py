"""Logit soft-capping: Gemma 2 (Gemma Team 2024), Grok-1.

The scores are squashed smoothly into (−cap, cap): s' = cap·tanh(s / cap); O = softmax(s')·v.
"""

import einflash as ef


@ef.attention
def softcap(q, k, v, cap: float = 30.0):
    s = cap * ef.tanh(q @ k * ef.scale / cap)
    return ef.softmax(s, "n") @ v
