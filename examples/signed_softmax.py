"""Signed softmax: Cog attention (Lv et al. 2024, "More Expressive Attention with Negative Weights").

Weights keep the sign of the score and normalise its magnitude:
P = sign(s)·exp(|s| − max|s|) / Σ_n exp(|s| − max|s|); O = P·v.
"""

import einflash as ef


@ef.attention
def signed_softmax(q, k, v):
    s = q @ k * ef.scale
    mag = ef.exp(ef.abs(s) - ef.abs(s).max("n"))
    p = ef.sign(s) * mag / mag.sum("n")
    return p @ v
