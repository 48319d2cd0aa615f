"""T5's bucketed relative-position bias (Raffel et al. 2020), gathered: a learned scalar per head and bucket,
the bucket a function of the offset n − m.

s = scale·q·kᵀ + table[h, bucket[n − m + M − 1]]; O = softmax(s)·v. ``bucket`` holds, for each offset from
−(M − 1) to N − 1, its bucket: offsets below 8 in magnitude have their own, larger ones share logarithmically
wider ones up to 128, and the sign splits the buckets in two (T5's bidirectional encoder form). T5 itself folds
1/√d into its initialisation; the scale is written here as in the other examples.

No M×N bias: each call composes the two gathers into one table of M + N − 1 entries per head,
``table[h, bucket[d]]``, which the kernels read at the tile's offsets.
Every entry of ``bucket`` must index ``table`` (checked at the call, once per version of ``bucket``). The table
learns: pairs with one offset n − m read one entry, so the backward sums the pairs' gradients along each
diagonal, then collects each offset's sum into its bucket's entry.
"""

import math

import torch

import einflash as ef


@ef.attention
def t5_bias(q, k, v, table: ef.Tensor["h r"], bucket: ef.Tensor["d"]):
    return ef.softmax(q @ k * ef.scale + table[bucket[ef.n - ef.m + ef.M - 1]], "n") @ v


def buckets(offsets: torch.Tensor, count: int = 32, reach: int = 128) -> torch.Tensor:
    """The bucket of each offset n − m: half of ``count`` per sign; below count/4 in magnitude one bucket per
    offset, beyond it logarithmically wider buckets up to ``reach``, and the last bucket past it."""
    half = count // 2
    exact = half // 2
    size = offsets.abs()
    wide = exact + (torch.log(size.clamp(min=1).double() / exact) / math.log(reach / exact) * (half - exact)).long()
    inside = torch.where(size < exact, size, wide.clamp(max=half - 1))
    return (torch.where(offsets > 0, half, 0) + inside).int()


def extra_inputs(shape, device="cpu", dtype=torch.float32) -> dict[str, torch.Tensor]:
    """A learned-looking table of 32 buckets per head, and the buckets of the offsets −(M − 1)..N − 1."""
    offsets = torch.arange(shape.M + shape.N - 1, device=device) - (shape.M - 1)
    table = torch.randn(shape.Hq, 32, generator=torch.Generator().manual_seed(5)).to(device=device, dtype=dtype)
    return {"table": table, "bucket": buckets(offsets)}
