"""Grouped-query attention: GQA (Ainslie et al. 2023), MQA (Shazeer 2019).

The maths is causal softmax attention; the grouping is in the call shapes: q has Hq
heads, k and v have Hkv heads, and query head h reads kv head h // (Hq / Hkv).
HEADS is the (query heads, kv heads) pair the tests and the demo use.

Positions count from the first query (ef.m = 0 is q's first row), which is right when M = N; for decoding
and chunked prefill (M < N) write the mask end-aligned, as docs/semantics.md shows.
"""

import einflash as ef

HEADS = (8, 2)


@ef.attention
def gqa(q, k, v):
    s = ef.mask(q @ k * ef.scale, ef.n <= ef.m)
    return ef.softmax(s, "n") @ v
