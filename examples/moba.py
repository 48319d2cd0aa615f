"""MoBA: mixture of block attention (Lu et al. 2025, "MoBA: Mixture of Block Attention for Long-Context LLMs").

Keys are cut into blocks of `block`; each block c is summarised by its mean key kbar[c]
and gated by g[m, c] = q[m]·kbar[c]. A query attends, causally, to its own block and to
the TOPK past blocks with the largest gates (all past blocks when there are fewer).
TOPK is fixed at declaration: the k of a k-th-largest reduction must be a Python int.

The kernel makes two passes over the keys: the block sums (every program sums all N keys into E × ceil(N/block)
values), then, after routing its rows, attention over the key tiles some row routes to (the others are left out).
MoBA routes among blocks of hundreds of keys (512 in its paper); a small block holds many sums on chip. It has no
backward yet; backend='reference' trains it.

Positions count from the first query (ef.m = 0 is q's first row), which is right when M = N; for decoding
and chunked prefill (M < N) write the mask end-aligned, as docs/semantics.md shows.
"""

import einflash as ef

TOPK = 2


@ef.attention
def moba(q, k, v, block: int = 16):
    c = ef.rank("c", ef.ceil_div(ef.N, block))
    kbar = ef.mask(k, ef.n // block == c).sum("n") / ef.minimum(block, ef.N - c * block)
    g = q @ kbar
    past = c < ef.m // block
    thr = ef.mask(g, past).kth_largest(TOPK, "c")
    sel = (past & (g >= thr)) | (c == ef.m // block)
    s = ef.mask(q @ k * ef.scale, sel[ef.m, ef.n // block] & (ef.n <= ef.m))
    return ef.softmax(s, "n") @ v
