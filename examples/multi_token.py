"""Multi-token attention (Golovneva et al. 2025): a key-query convolution before the softmax.

The causal scores are convolved over a small window of neighbouring queries and keys,
conv[m, n] = Σ_{i,j} θ[h, i, j]·s[m − i, n − j] (masked or out-of-range scores add
nothing), then masked causally again, normalised and applied to v.

The kernel makes one pass over the keys: each score is recomputed at its neighbours, q[m − i]·k[n − j] for the
3×3 window (nine q·k products per tile, the window's positions unrolled), so no tile of scores is kept. It has no
backward yet (the convolution's gradient back onto q and k); backend='reference' trains it.

Positions count from the first query (ef.m = 0 is q's first row), which is right when M = N; for decoding
and chunked prefill (M < N) write the mask end-aligned, as docs/semantics.md shows.
"""

import torch

import einflash as ef


@ef.attention
def multi_token(q, k, v, theta: ef.Tensor["h i j"]):
    i, j = ef.rank("i"), ef.rank("j")
    s = ef.mask(q @ k * ef.scale, ef.n <= ef.m)
    conv = (theta * s[ef.m - i, ef.n - j]).sum("i j")
    return ef.softmax(ef.mask(conv, ef.n <= ef.m), "n") @ v


def extra_inputs(shape, device="cpu", dtype=torch.float32) -> dict[str, torch.Tensor]:
    """3×3 kernels near the identity, as the paper initialises them, plus small learned-looking weights."""
    theta = 0.1 * torch.randn(shape.Hq, 3, 3, device=device, dtype=dtype)
    theta[:, 0, 0] += 1.0
    return {"theta": theta}
