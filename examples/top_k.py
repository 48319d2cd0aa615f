"""Top-k attention (Gupta et al. 2021, "Memory-efficient Transformers via Top-k Attention"): each query keeps
its TOPK largest scores and takes the softmax over them alone.

s = scale·q·kᵀ; τ[m] = the TOPK-th largest of s[m, :]; O = softmax(s where s ≥ τ)·v. Ties at τ are all
kept. TOPK is fixed at declaration: the k of a k-th-largest reduction must be a Python int.

Two passes over the keys: the first keeps each row's TOPK largest scores so far (a top list, merged with
every key tile's own), the second is the softmax of the scores that pass. The mask compares with a cut between
the TOPK-th and the next largest, so the backward's kernels, which recompute the scores in another order, keep
the same keys. A test is piecewise constant: the threshold gets no gradient, as autograd gives torch.topk's
mask none.
"""

import einflash as ef

TOPK = 8


@ef.attention
def top_k(q, k, v):
    s = q @ k * ef.scale
    return ef.softmax(ef.mask(s, s >= s.kth_largest(TOPK, "n")), "n") @ v
