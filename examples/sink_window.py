"""Attention sinks plus a sliding window: StreamingLLM (Xiao et al. 2024).

Query m sees the first `sinks` keys and the `window` most recent ones, causally:
n ≤ m and (m − n < window or n < sinks).

Positions count from the first query (ef.m = 0 is q's first row), which is right when M = N; for decoding
and chunked prefill (M < N) write the mask end-aligned, as docs/semantics.md shows.
"""

import einflash as ef


@ef.attention
def sink_window(q, k, v, window: int = 256, sinks: int = 4):
    s = ef.mask(q @ k * ef.scale, (ef.n <= ef.m) & ((ef.m - ef.n < window) | (ef.n < sinks)))
    return ef.softmax(s, "n") @ v
