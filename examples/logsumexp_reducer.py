"""Causal softmax attention through a reducer of the user's own: log-sum-exp as one reduction.

einflash has no log-add-exp reducer built in; the declaration defines one with ef.reducer,
combine(a, b) = max(a, b) + log(1 + exp(−|a − b|)) with identity −∞, and weighs each key by
exp(s − logsumexp_n s), normalised by construction ("any normaliser", not only max and sum).
As written it takes 2 passes (the log-sum-exp needs every key first); streaming makes the
reducer a running state whose updates rescale the output by exp(lse_old − lse_new): 1 pass.
Its derivative, ∂ logsumexp_n s / ∂s = exp(s − logsumexp_n s), makes it differentiable.

Positions count from the first query (ef.m = 0 is q's first row), which is right when M = N; for decoding
and chunked prefill (M < N) write the mask end-aligned, as docs/semantics.md shows.
"""

import math

import einflash as ef

LOGADDEXP = ef.reducer(
    "logaddexp",
    lambda a, b: ef.maximum(a, b) + ef.log(1 + ef.exp(-ef.abs(a - b))),
    identity=-math.inf,
    derivative=lambda x, r: ef.exp(x - r),
)


@ef.attention
def logsumexp_reducer(q, k, v):
    s = ef.mask(q @ k * ef.scale, ef.n <= ef.m)
    return ef.exp(s - s.reduce(LOGADDEXP, "n")) @ v
