"""The gradient of a forward that runs in two stages (einflash.compiler.rewrite.stages): the stages themselves,
differentiated by torch's autograd on the reference executor.

A key stage reduces the keys to summaries that every query row reads alike (linear attention's ``ctx[e,f]``,
agent attention's ``va[f,a]``); a query stage without a loop over the keys reads them row by row. Neither stage
forms a value of both sequence ranks, so evaluating them (the reference executor, in the accumulator type) keeps
O(N·E + M·E + E·F) values per head, and torch's autograd on that evaluation is the gradient: each summary's
gradient a sum over the query rows, each key's from it. Nothing is saved by the forward; the backward recomputes
both stages from the inputs. No kernel is generated for it: its products are torch's (cuBLAS on a GPU).

A query stage with a loop of its own (MoBA's routed pass after its key-block sums) would form the pairs of that
loop, so it has no such gradient (``differentiable`` says why).

>>> import torch, einflash as ef
>>> @ef.attention
... def linear(q, k, v):
...     return ef.einsum("m e, n e -> m n", ef.softmax(q, "e"), ef.softmax(k, "n")) @ v
>>> from einflash.compiler.rewrite.stages import key_stages
>>> s = key_stages(linear.forward.rewritten)
>>> differentiable(s) is None
True
>>> q, k, v, d_o = torch.randn(4, 1, 2, 8, 4, dtype=torch.float64).unbind()
>>> got = stage_gradients(s, {"q": q, "k": k, "v": v}, {}, d_o, frozenset("qkv"))
>>> leaves = [x.clone().requires_grad_() for x in (q, k, v)]
>>> want = torch.autograd.grad(linear(*leaves, backend="reference"), leaves, d_o)
>>> all(torch.allclose(got[n], w) for n, w in zip("qkv", want))
True
"""

from __future__ import annotations

import torch

from ...ir.reference import evaluate, run_reference
from ..rewrite.stages import Stages


def differentiable(s: Stages) -> str | None:
    """Why the two stages ``s`` have no gradient here (None: they have one)."""
    looped = sorted({e.out for e in s.queries.einsums if e.loop})
    if looped:
        return (
            f"its query stage makes a pass over the keys of its own ({', '.join(looped)}), whose pairs a backward "
            f"on the stages would form whole"
        )
    return None


def stage_gradients(
    s: Stages,
    inputs: dict[str, torch.Tensor],
    values: dict[str, float],
    grad_output: torch.Tensor,
    wanted: frozenset[str],
) -> dict[str, torch.Tensor | None]:
    """Each wanted floating-point input's gradient in its own dtype (None for the others), given the incoming
    gradient of the output ``[B, H, M, F]``: both stages evaluated in the accumulator type (fp32; fp64 for fp64)
    with autograd on, the key stage's summaries handed to the query stage as its inputs."""
    first = next(x for x in inputs.values() if x.is_floating_point())
    acc = torch.float64 if first.dtype == torch.float64 else torch.float32
    leaves = {
        n: (x.detach().to(acc).requires_grad_(n in wanted) if x.is_floating_point() else x) for n, x in inputs.items()
    }
    with torch.enable_grad():
        made = evaluate(s.keys, leaves, values, dtype=acc)
        summaries = {n: made[n].aligned(s.queries.tensor(n).ranks) for n in s.summaries}
        out = run_reference(s.queries, leaves | summaries, values, dtype=acc)
    names = [n for n in inputs if n in wanted and inputs[n].is_floating_point()]
    found = torch.autograd.grad(out, [leaves[n] for n in names], grad_output.to(acc), allow_unused=True)
    grads: dict[str, torch.Tensor | None] = dict.fromkeys(inputs)
    for n, d in zip(names, found):
        grads[n] = torch.zeros_like(inputs[n]) if d is None else d.to(inputs[n].dtype)
    return grads
