"""A threshold renormalised after the softmax: weights below τ are cut, the rest scaled back to sum 1, as
sparse-attention variants that prune small weights do (a fixed-threshold relative of sparsemax, Martins &
Astudillo 2016, whose threshold depends on the row).

P = softmax(s); W = relu(P − τ/N); O = (W / Σ_n W)·v: τ is a fraction of the uniform weight 1/N, so a row
always keeps its largest weight (at least 1/N) for τ < 1, at every length. The threshold acts on normalised
weights, so the row's maximum and sum are needed before the first key can be weighed: two passes over the
keys, the second one recomputing the scores.
"""

import einflash as ef


@ef.attention
def renorm_threshold(q, k, v, tau: float = 0.5):
    p = ef.relu(ef.softmax(q @ k * ef.scale, "n") - tau / ef.N)
    return (p / p.sum("n")) @ v
