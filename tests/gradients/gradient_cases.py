"""The catalogue's variants that train as gradient test cases: their inputs, parameters and incoming gradients.

No ``from __future__ import annotations`` here: declarations read their annotations (ef.Scalar) as values.
"""

import dataclasses
import functools

import torch
from catalogue import load_example

import einflash as ef
from einflash.ir.cascade import Layout

# The catalogue variants whose forward and backward lower (with STAGED and FORWARD_ONLY, every example whose forward
# lowers: test_the_list_is_the_lowerable_catalogue); the last three make two passes over the keys.
LOWERED = (
    "softmax",
    "causal",
    "sliding_window",
    "prefix_lm",
    "sink_window",
    "document_mask",
    "gqa",
    "alibi",
    "relative_bias",
    "lowrank_bias",
    "softcap",
    "sigmoid",
    "signed_softmax",
    "differential",
    "head_gate",
    "top_theta",
    "causal_linear",
    "gla",
    "mla_decode",
    "logsumexp_reducer",
    "t5_bias",
    "sink_logit",
    "post_norm_threshold",
    "renorm_threshold",
    "top_k",
)
# Examples that run in two stages, whose backward differentiates the stages (einflash.compiler.autodiff.stages).
STAGED = ("linear", "agent")
# Examples whose forward lowers and whose backward is refused, with the refusal's words.
FORWARD_ONLY = {
    "multi_token": "a value read at shifted coordinates",
    "moba": "runs in two stages.*a pass over the keys of its own",
}
# Parameters that make the masks and the cap bite at small sizes.
TUNED = {
    "sliding_window": {"window": 7},
    "prefix_lm": {"prefix": 5},
    "sink_window": {"window": 6, "sinks": 3},
    "softcap": {"cap": 1.5},
}
FEWER_HEADS = {"mla_decode": (4, 1)}  # its 16 query heads share one kv head; 4 keep interpreted tests quick
SQUARE = {"gla"}  # its gates are read at query and key positions alike: M = N
# Not every row sees a key: (name, M, N, params).
FULLY_MASKED = [("sliding_window", 41, 23, {"window": 4}), ("bottom_right", 30, 12, {}), ("top_theta", 37, 37, {})]


@ef.attention
def bottom_right(q, k, v):
    """Causal aligned to the last query: query m sees keys n ≤ m + N − M (the first M − N rows see none)."""
    return ef.softmax(ef.mask(q @ k * ef.scale, ef.n <= ef.m + (ef.N - ef.M)), "n") @ v


@ef.attention
def learnable_softcap(q, k, v, cap: ef.Scalar):
    """Softcapping with the cap as a 0-d tensor input: a learnable scalar, which gets a gradient."""
    return ef.softmax(cap * ef.tanh(q @ k * ef.scale / cap), "n") @ v


@ef.attention
def softmax_features(q, k, v):
    """Causal linear attention with softmax feature maps over the head dimension: each max over e is proved
    shift-invariant over e, and q's gradient is made after dQ's sum over the keys."""
    return ef.mask(ef.softmax(q, "e") @ ef.softmax(k, "e"), ef.n <= ef.m) @ v


OWN = {"bottom_right": bottom_right, "learnable_softcap": learnable_softcap, "softmax_features": softmax_features}
TRAINED_OWN = ("learnable_softcap", "softmax_features")  # declared here, trained beside the catalogue


@functools.cache
def op(name: str) -> ef.AttentionOp:
    return OWN[name] if name in OWN else getattr(load_example(name), name)


def frozen(name: str) -> set[str]:
    """Inputs the backward gives no gradient: tables read at computed positions (a scatter is not lowered)."""
    return {n for n, _ in op(name).backward.frozen}


def inputs(name: str, shape: ef.Shape, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random q, k, v and the example's extra inputs in declaration order; per-token inputs in ``dtype``,
    others (slopes, biases, gates) in float32 unless ``dtype`` is float64."""
    torch.manual_seed(seed)
    mod = None if name in OWN else load_example(name)
    heads = FEWER_HEADS.get(name, getattr(mod, "HEADS", None))
    if heads is not None:
        shape = dataclasses.replace(shape, Hq=heads[0], Hkv=heads[1])
    if name in SQUARE:
        shape = dataclasses.replace(shape, N=shape.M)
    made = {
        "q": torch.randn(shape.B, shape.Hq, shape.M, shape.E),
        "k": torch.randn(shape.B, shape.Hkv, shape.N, shape.E),
        "v": torch.randn(shape.B, shape.Hkv, shape.N, shape.F),
        "cap": torch.tensor(1.5),
    }
    if hasattr(mod, "extra_inputs"):
        made.update(mod.extra_inputs(shape))
    out = {}
    for t in op(name).cascade.inputs:
        x = made[t.name]
        if x.is_floating_point():
            per_token = t.layout in (Layout.QUERY, Layout.KEY)
            x = x.to(dtype if per_token or dtype == torch.float64 else torch.float32)
        out[t.name] = x
    return out


def grad_output(name: str, inputs: dict, params: dict) -> torch.Tensor:
    """A random incoming gradient shaped like the output, in q's dtype."""
    out = op(name).reference(**inputs, **params)
    g = torch.Generator().manual_seed(1)
    return torch.randn(out.shape, generator=g, dtype=torch.float64).to(inputs[op(name).cascade.inputs[0].name].dtype)
