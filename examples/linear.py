"""Efficient attention (Shen et al. 2021, "Efficient Attention: Attention with Linear Complexities").

q is normalised over its features and k over the sequence, then
O = softmax_e(q)·(softmax_n(k)ᵀ·v). Declared here in the quadratic order,
(softmax_e(q)·softmax_n(k)ᵀ)·v, which builds an M×N matrix; einflash's reassociation
rewrite finds the linear order.
"""

import einflash as ef


@ef.attention
def linear(q, k, v):
    qs = ef.softmax(q, "e")
    ks = ef.softmax(k, "n")
    a = ef.einsum("m e, n e -> m n", qs, ks)
    return a @ v
