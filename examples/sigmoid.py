"""Sigmoid attention (Ramapuram et al. 2024, "Theory, Analysis, and Best Practices for Sigmoid Self-Attention").

Each weight is a sigmoid of its own score, with the bias b = −log N the paper recommends;
there is no row normaliser: O = Σ_n sigmoid(s − log N)·v.
"""

import einflash as ef


@ef.attention
def sigmoid(q, k, v):
    p = ef.sigmoid(q @ k * ef.scale - ef.log(ef.N))
    return p @ v
