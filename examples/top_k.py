"""Top-k attention (Gupta et al. 2021, "Memory-efficient Transformers via Top-k Attention"): each query keeps
its TOPK largest scores and takes the softmax over them alone.

s = scale·q·kᵀ; τ[m] = the TOPK-th largest of s[m, :]; O = softmax(s where s ≥ τ)·v. Ties at τ are all
kept. TOPK is fixed at declaration: the k of a k-th-largest reduction must be a Python int.

Not lowered yet: the k-th largest of a row has no running form (the TOPK largest values seen so far would be
each row's state, merged with every key tile), so its pass cannot stream; `explain()` and the call say so. The
reference executor runs it (backend='reference').
"""

import einflash as ef

TOPK = 8


@ef.attention
def top_k(q, k, v):
    s = q @ k * ef.scale
    return ef.softmax(ef.mask(s, s >= s.kth_largest(TOPK, "n")), "n") @ v
