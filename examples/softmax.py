"""Standard (multi-head) softmax attention, Vaswani et al. 2017, "Attention Is All You Need".

O = softmax(scale·q·kᵀ)·v, declared naively, one Einsum per step as a textbook writes it:
the row maximum, the exponentials, their sum, the division, the contraction with v. As
written this is three passes over the keys (max; sum of exp; normalise and multiply by v);
einflash's rewrites defer the division and stream the maximum to reach one pass.
"""

import einflash as ef


@ef.attention
def softmax(q, k, v):
    s = ef.einsum("m e, n e -> m n", q, k) * ef.scale
    top = s.max("n")
    num = ef.exp(s - top)
    den = num.sum("n")
    p = num / den
    return ef.einsum("m n, n f -> m f", p, v)
