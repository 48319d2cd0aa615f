"""Post-normalisation threshold: small attention weights are cut after the softmax, a
fixed-threshold relative of sparsemax (Martins & Astudillo 2016, where τ depends on the row).

P = softmax(s); O = relu(P − τ)·v. The threshold acts on normalised weights, so the row
sum is needed before the first key can be weighed: two passes over the keys.
"""

import einflash as ef


@ef.attention
def post_norm_threshold(q, k, v, tau: float = 0.01):
    p = ef.softmax(q @ k * ef.scale, "n")
    return ef.relu(p - tau) @ v
