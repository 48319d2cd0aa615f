"""Sliding-window (local) causal attention: Longformer (Beltagy et al. 2020), Mistral 7B (Jiang et al. 2023).

Query m sees the `window` most recent keys: n ≤ m and m − n < window.

Positions count from the first query (ef.m = 0 is q's first row), which is right when M = N; for decoding
and chunked prefill (M < N) write the mask end-aligned, as docs/semantics.md shows.
"""

import einflash as ef


@ef.attention
def sliding_window(q, k, v, window: int = 256):
    s = ef.mask(q @ k * ef.scale, (ef.n <= ef.m) & (ef.m - ef.n < window))
    return ef.softmax(s, "n") @ v
