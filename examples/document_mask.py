"""Document (jagged) causal mask for packed sequences, as in FlexAttention (Dong et al. 2024).

Several documents are packed into one sequence; doc[b, n] is the id of the document
token n belongs to (non-decreasing along n). A query sees the earlier tokens of its own
document: doc[m] == doc[n] and n ≤ m.

Positions count from the first query (ef.m = 0 is q's first row), which is right when M = N; for decoding
and chunked prefill (M < N) write the mask end-aligned, as docs/semantics.md shows.
"""

import torch

import einflash as ef


@ef.attention
def document_mask(q, k, v, doc: ef.Tensor["b n"]):
    same_doc = doc[ef.m] == doc[ef.n]
    s = ef.mask(q @ k * ef.scale, same_doc & (ef.n <= ef.m))
    return ef.softmax(s, "n") @ v


def extra_inputs(shape, device="cpu", dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Sorted document ids, about one document per 8 tokens."""
    ids = torch.randint(0, max(1, shape.N // 8), (shape.B, shape.N), device=device)
    return {"doc": ids.sort(dim=-1).values}
