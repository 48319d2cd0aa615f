"""Prefix-LM attention: UniLM (Dong et al. 2019), T5 (Raffel et al. 2020).

The first `prefix` keys are visible to every query (bidirectional prefix), the rest
causally: (n ≤ m) ∨ (n < prefix).

Positions count from the first query (ef.m = 0 is q's first row), which is right when M = N; for decoding
and chunked prefill (M < N) write the mask end-aligned, as docs/semantics.md shows.
"""

import einflash as ef


@ef.attention
def prefix_lm(q, k, v, prefix: int = 64):
    s = ef.mask(q @ k * ef.scale, (ef.n <= ef.m) | (ef.n < prefix))
    return ef.softmax(s, "n") @ v
