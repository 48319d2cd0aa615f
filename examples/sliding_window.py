"""Sliding-window (local) causal attention: Longformer (Beltagy et al. 2020), Mistral 7B (Jiang et al. 2023).

Query m sees the `window` most recent keys: n ≤ m and m − n < window.
"""

import einflash as ef


@ef.attention
def sliding_window(q, k, v, window: int = 256):
    s = ef.mask(q @ k * ef.scale, (ef.n <= ef.m) & (ef.m - ef.n < window))
    return ef.softmax(s, "n") @ v
