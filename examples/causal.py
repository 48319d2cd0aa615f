"""Causal softmax attention (decoder self-attention, Vaswani et al. 2017).

Query m sees keys n ≤ m: O = softmax(mask(s, n ≤ m))·v with s = scale·q·kᵀ.

Positions count from the first query (ef.m = 0 is q's first row), which is right when M = N; for decoding
and chunked prefill (M < N) write the mask end-aligned, as docs/semantics.md shows.
"""

import einflash as ef


@ef.attention
def causal(q, k, v):
    s = ef.mask(q @ k * ef.scale, ef.n <= ef.m)
    return ef.softmax(s, "n") @ v
