"""A threshold renormalised after the softmax: weights below τ are cut, the rest scaled back to sum 1, as
sparse-attention variants that prune small weights do (a fixed-threshold relative of sparsemax, Martins &
Astudillo 2016, whose threshold depends on the row).

P = softmax(s); W = relu(P − τ); O = (W / Σ_n W)·v. The threshold acts on normalised weights, so the row's
maximum and sum are needed before the first key can be weighed: two passes over the keys, the second one
recomputing the scores. A row whose every weight is at most τ has no weight left: its output is NaN, as
0/0 in the formula (choose τ below 1/N to keep every row).
"""

import einflash as ef


@ef.attention
def renorm_threshold(q, k, v, tau: float = 0.01):
    p = ef.relu(ef.softmax(q @ k * ef.scale, "n") - tau)
    return (p / p.sum("n")) @ v
