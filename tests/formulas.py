"""Plain-torch formulas of the example variants: the independent check of the reference executor.

One function per file of ``examples/``, with the same name and keyword arguments as the
declared op (inputs, then parameters with the same defaults, then ``scale``). They are
written from the papers' definitions with ordinary torch, never with einflash, and in a
different order of computation where there is one (recurrences for the linear variants,
top-k indices for MoBA, shifted copies for the convolution). Inputs are in the contract
layout; kv heads are repeated to the query heads (GQA); a query row that sees no key has
output exactly 0. Use float64 inputs.

>>> q = k = v = torch.arange(6.0, dtype=torch.float64).reshape(1, 1, 3, 2)
>>> causal(q, k, v)[0, 0, 0].tolist()  # the first query sees only the first key
[0.0, 1.0]
"""

from __future__ import annotations

import math

import torch

# -- shared pieces ---------------------------------------------------------------------------


def _heads(x: torch.Tensor, hq: int) -> torch.Tensor:
    """kv heads repeated to the query heads: query head h reads kv head h // (Hq / Hkv)."""
    return x.repeat_interleave(hq // x.shape[1], dim=1)


def _scale(q: torch.Tensor, scale: float | None) -> float:
    return q.shape[-1] ** -0.5 if scale is None else scale


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a[..., m, d]·b[..., n, d] over d, after repeating b's heads to a's."""
    return a @ _heads(b, a.shape[1]).transpose(-1, -2)


def _positions(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Query positions m as a column and key positions n as a row."""
    m = torch.arange(q.shape[2], device=q.device)[:, None]
    n = torch.arange(k.shape[2], device=q.device)[None, :]
    return m, n


def _softmax_where(s: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim of the kept scores only; rows with nothing kept are 0."""
    keep = keep.expand_as(s)
    top = s.masked_fill(~keep, -math.inf).amax(dim=-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    num = torch.where(keep, torch.exp(s - top), torch.zeros_like(s))
    den = num.sum(dim=-1, keepdim=True)
    return torch.where(den > 0, num / den, torch.zeros_like(num))


def _attend(s: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    p = torch.softmax(s, dim=-1) if keep is None else _softmax_where(s, keep)
    return p @ _heads(v, s.shape[1])


def _per_head(x: torch.Tensor) -> torch.Tensor:
    """A per-head vector [H] as [1, H, 1, 1], to broadcast over [B, H, M, N]."""
    return x[None, :, None, None]


# -- masks ---------------------------------------------------------------------------------


def softmax(q, k, v, scale=None):
    """softmax(scale·q·kᵀ)·v."""
    return _attend(_scale(q, scale) * _dot(q, k), v)


def causal(q, k, v, scale=None):
    m, n = _positions(q, k)
    return _attend(_scale(q, scale) * _dot(q, k), v, n <= m)


def gqa(q, k, v, scale=None):
    return causal(q, k, v, scale)


def sliding_window(q, k, v, window=256, scale=None):
    m, n = _positions(q, k)
    return _attend(_scale(q, scale) * _dot(q, k), v, (n <= m) & (m - n < window))


def prefix_lm(q, k, v, prefix=64, scale=None):
    m, n = _positions(q, k)
    return _attend(_scale(q, scale) * _dot(q, k), v, (n <= m) | (n < prefix))


def sink_window(q, k, v, window=256, sinks=4, scale=None):
    m, n = _positions(q, k)
    return _attend(_scale(q, scale) * _dot(q, k), v, (n <= m) & ((m - n < window) | (n < sinks)))


def document_mask(q, k, v, doc, scale=None):
    """Same document and causal; queries sit at the first M key positions (M ≤ N)."""
    if q.shape[2] > k.shape[2]:
        raise ValueError("document_mask's formula needs M <= N: query m has document doc[m]")
    m, n = _positions(q, k)
    same = doc[:, None, : q.shape[2], None] == doc[:, None, None, :]
    return _attend(_scale(q, scale) * _dot(q, k), v, same & (n <= m))


# -- score modifications ------------------------------------------------------------------------


def alibi(q, k, v, slope, scale=None):
    m, n = _positions(q, k)
    return _attend(_scale(q, scale) * _dot(q, k) + _per_head(slope) * (n - m), v)


def relative_bias(q, k, v, bias, scale=None):
    return _attend(_scale(q, scale) * _dot(q, k) + bias[None], v)


def t5_bias(q, k, v, table, bucket, scale=None):
    """The table gathered at each pair's bucket, the buckets indexed by n − m + M − 1 (one M x N bias)."""
    m, n = _positions(q, k)
    bias = table[:, bucket.long()[n - m + q.shape[-2] - 1]]  # [H, M, N]
    return _attend(_scale(q, scale) * _dot(q, k) + bias[None], v)


def lowrank_bias(q, k, v, u, w, scale=None):
    return _attend(_scale(q, scale) * _dot(q, k) + _dot(u, w), v)


def softcap(q, k, v, cap=30.0, scale=None):
    return _attend(cap * torch.tanh(_scale(q, scale) * _dot(q, k) / cap), v)


def multi_token(q, k, v, theta, scale=None):
    """Causal scores (masked ones 0) convolved with θ[h] over (query, key) offsets, then causal softmax."""
    m, n = _positions(q, k)
    causal_ = n <= m
    s = torch.where(causal_, _scale(q, scale) * _dot(q, k), 0.0)
    conv = torch.zeros_like(s)
    big_m, big_n = s.shape[-2:]
    for i in range(theta.shape[1]):
        for j in range(theta.shape[2]):
            conv[..., i:, j:] += theta[None, :, i, j, None, None] * s[..., : big_m - i, : big_n - j]
    return _attend(conv, v, causal_)


# -- other normalisers -------------------------------------------------------------------------


def sigmoid(q, k, v, scale=None):
    """Σ_n sigmoid(s − log N)·v, no row normaliser."""
    s = _scale(q, scale) * _dot(q, k)
    return torch.sigmoid(s - math.log(k.shape[2])) @ _heads(v, q.shape[1])


def signed_softmax(q, k, v, scale=None):
    """sign(s)·softmax(|s|)·v."""
    s = _scale(q, scale) * _dot(q, k)
    return (torch.sign(s) * torch.softmax(s.abs(), dim=-1)) @ _heads(v, q.shape[1])


def differential(q, k, v, q2, k2, lam, scale=None):
    sc = _scale(q, scale)
    return _attend(sc * _dot(q, k), v) - _per_head(lam) * _attend(sc * _dot(q2, k2), v)


def head_gate(q, k, v, gate, scale=None):
    return gate[..., None] * _attend(_scale(q, scale) * _dot(q, k), v)


def top_theta(q, k, v, theta, scale=None):
    s = _scale(q, scale) * _dot(q, k)
    return _attend(s, v, s >= _per_head(theta))


def post_norm_threshold(q, k, v, tau=0.01, scale=None):
    p = torch.softmax(_scale(q, scale) * _dot(q, k), dim=-1)
    return torch.relu(p - tau) @ _heads(v, q.shape[1])


def renorm_threshold(q, k, v, tau=0.5, scale=None):
    """Weights above τ times the uniform weight 1/N after the softmax, scaled back to sum 1."""
    w = torch.relu(torch.softmax(_scale(q, scale) * _dot(q, k), dim=-1) - tau / k.shape[2])
    return w / w.sum(dim=-1, keepdim=True) @ _heads(v, q.shape[1])


def sink_logit(q, k, v, sink, scale=None):
    """The softmax over the keys and one sink logit per head, whose weight is dropped."""
    s = _scale(q, scale) * _dot(q, k)
    sinks = _per_head(sink).expand(*s.shape[:-1], 1)
    return torch.softmax(torch.cat([s, sinks], dim=-1), dim=-1)[..., :-1] @ _heads(v, q.shape[1])


def moba(q, k, v, block=16, topk=2, scale=None):
    """Own block plus the top-k past blocks by q·mean(k over the block), then causal softmax."""
    return _attend(_scale(q, scale) * _dot(q, k), v, moba_mask(q, k, block, topk))


def moba_mask(q, k, block=16, topk=2):
    """MoBA's pairs: each query's own key block and its top-k past blocks by q·mean(k over the block), causal."""
    kk = _heads(k, q.shape[1])
    big_n = k.shape[2]
    blocks = torch.arange(big_n, device=q.device) // block
    n_blocks = -(-big_n // block)
    kbar = torch.stack([kk[:, :, blocks == c].mean(dim=2) for c in range(n_blocks)], dim=2)
    gates = q @ kbar.transpose(-1, -2)  # [B, H, M, C]
    own = torch.arange(q.shape[2], device=q.device)[:, None] // block
    c = torch.arange(n_blocks, device=q.device)[None, :]
    past = c < own
    picks = gates.masked_fill(~past, -math.inf).topk(min(topk, n_blocks), dim=-1).indices
    chosen = torch.zeros_like(gates, dtype=torch.bool).scatter_(-1, picks, True)
    selected = (chosen & past) | (c == own)
    m, n = _positions(q, k)
    return selected[..., blocks] & (n <= m)


# -- linear and chained ----------------------------------------------------------------------------


def linear(q, k, v):
    """softmax_e(q)·(softmax_n(k)ᵀ·v), in the linear order."""
    context = torch.softmax(k, dim=2).transpose(-1, -2) @ v  # [B, Hkv, E, F]
    return torch.softmax(q, dim=-1) @ _heads(context, q.shape[1])


def causal_linear(q, k, v, decay):
    """The recurrence S_t = decay·S_{t−1} + k_tᵀ·v_t, o_t = q_t·S_t."""
    kk, vv = _heads(k, q.shape[1]), _heads(v, q.shape[1])
    state = torch.zeros(*q.shape[:2], k.shape[-1], v.shape[-1], dtype=q.dtype, device=q.device)
    out = []
    for t in range(q.shape[2]):
        state = _per_head(decay) * state
        if t < k.shape[2]:
            state = state + kk[:, :, t, :, None] * vv[:, :, t, None, :]
        out.append(torch.einsum("bhe,bhef->bhf", q[:, :, t], state))
    return torch.stack(out, dim=2)


def gla(q, k, v, g):
    """The recurrence S_t = diag(exp(G_t − G_{t−1}))·S_{t−1} + k_tᵀ·v_t, o_t = q_t·S_t (M = N)."""
    if q.shape[2] != k.shape[2]:
        raise ValueError("gla needs M == N: the gates are read at query and key positions")
    kk, vv = _heads(k, q.shape[1]), _heads(v, q.shape[1])
    state = torch.zeros(*q.shape[:2], k.shape[-1], v.shape[-1], dtype=q.dtype, device=q.device)
    previous = torch.zeros_like(g[:, :, 0])
    out = []
    for t in range(q.shape[2]):
        state = torch.exp(g[:, :, t] - previous)[..., None] * state + kk[:, :, t, :, None] * vv[:, :, t, None, :]
        previous = g[:, :, t]
        out.append(torch.einsum("bhe,bhef->bhf", q[:, :, t], state))
    return torch.stack(out, dim=2)


def agent(q, k, v, agent, scale=None):
    sc = _scale(q, scale)
    gathered = _attend(sc * _dot(agent, k), v)  # [B, H, A, F]
    return torch.softmax(sc * q @ agent.transpose(-1, -2), dim=-1) @ gathered


def mla_decode(q, k, q_rope, k_rope, scale=None):
    """The latent k is key and value: softmax((q·k + q_rope·k_rope)·scale)·k."""
    s = _scale(q, scale) * (_dot(q, k) + _dot(q_rope, k_rope))
    return _attend(s, k)


def logsumexp_reducer(q, k, v, scale=None):
    """Causal softmax, with log-sum-exp computed by torch.logsumexp."""
    s = _dot(q, k) * _scale(q, scale)
    m, n = _positions(q, k)
    s = s.masked_fill(n > m, -math.inf)
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    p = torch.where(torch.isfinite(lse), torch.exp(s - lse), torch.zeros_like(s))
    return p @ _heads(v, q.shape[1])


def top_k(q, k, v, scale=None):
    """Softmax over each row's 8 largest scores (ties at the 8th all kept), from torch.topk's values."""
    s = _scale(q, scale) * _dot(q, k)
    kth = s.topk(min(8, s.shape[-1]), dim=-1).values[..., -1:]
    return _attend(s, v, s >= kth)


def stick_breaking(q, k, v, scale=None):
    """β = σ(s); weight[m, n] = β[m, n]·Π_{n<j<m} (1 − β[m, j]) for n < m, as a cumulative product over the keys
    between, taken from the query backwards."""
    beta = torch.sigmoid(_scale(q, scale) * _dot(q, k))
    M, N = beta.shape[-2:]
    weight = torch.zeros_like(beta)
    for m in range(M):
        left = torch.ones_like(beta[..., m, 0])
        for n in range(min(m, N) - 1, -1, -1):  # keys nearer to m first
            weight[..., m, n] = beta[..., m, n] * left
            left = left * (1 - beta[..., m, n])
    return weight @ _heads(v, q.shape[1])
