"""Absent values (docs/semantics.md): an empty masked sum is absent, not 0, and stays absent in arithmetic; a
sum of present zeros (``ef.where(cond, x, 0)``) is 0. The reference follows the rule, checked against the
formula written out in torch, and a kernel agrees (the tail unrolled) or, where the tail is too long, refuses."""

import pytest
import torch

import einflash as ef
from einflash.errors import LoweringError
from einflash.testing import check

B, H, M, D = 1, 2, 7, 4


def _tail_weighted(empty_is_zero: bool):
    @ef.attention
    def tail_weighted(q, k, v, w: ef.Tensor["b h j"]):
        j = ef.rank("j")
        s = ef.mask(q @ k * ef.scale, ef.n <= ef.m)
        between = (ef.n < j) & (j < ef.m)
        tail = (ef.where(between, w[j], 0) if empty_is_zero else ef.mask(w[j], between)).sum("j")
        return (ef.exp(s) * ef.exp(-tail)) @ v

    return tail_weighted


def _inputs():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, M, D, generator=g, dtype=torch.float64) for _ in range(3))
    return q, k, v, torch.rand(B, H, M, generator=g, dtype=torch.float64)


def _formula(q, k, v, w, empty_is_zero: bool) -> torch.Tensor:
    m, n, j = torch.arange(M)[:, None, None], torch.arange(M)[None, :, None], torch.arange(M)[None, None, :]
    between = (n < j) & (j < m)  # [m, n, j]
    tail = (w[:, :, None, None, :] * between).sum(-1)  # [b, h, m, n]
    keep = n[..., 0] <= m[..., 0]
    if not empty_is_zero:
        keep = keep & between.any(-1)  # an empty tail is absent: its (m, n) drops out of the sum over n
    s = q @ k.transpose(-1, -2) * D**-0.5
    return torch.where(keep, torch.exp(s) * torch.exp(-tail), 0.0) @ v


@pytest.mark.parametrize("empty_is_zero", [False, True], ids=["masked sum", "sum of where"])
def test_the_reference_follows_the_absent_value_rule(empty_is_zero):
    q, k, v, w = _inputs()
    out = _tail_weighted(empty_is_zero).reference(q, k, v, w=w)
    torch.testing.assert_close(out, _formula(q, k, v, w, empty_is_zero), rtol=1e-12, atol=1e-12)


def test_the_two_forms_differ_exactly_where_a_tail_is_empty():
    q, k, v, w = _inputs()
    absent, zero = (_tail_weighted(z).reference(q, k, v, w=w) for z in (False, True))
    # rows 0 and 1 have no j strictly between n and m for any key: their every term is absent in one form
    assert torch.equal(absent[:, :, :2], torch.zeros_like(absent[:, :, :2]))
    assert not torch.allclose(absent, zero)


def test_a_kernel_follows_the_rule_where_it_unrolls_the_tail():
    """The masked tail is a sum of w times an indicator over (m, n, j), present where a count of the j between is
    positive (rewrite/indicator.py); with j short the kernel unrolls it and agrees with the reference, empty tails
    dropping their (m, n) as there."""
    q, k, v, w = _inputs()
    op = _tail_weighted(False)
    verdict = check(op, op(q.float(), k.float(), v.float(), w=w.float()), q, k, v, w=w)
    assert verdict.ok, verdict


def test_a_tail_too_long_to_unroll_is_refused_at_the_declarations_line():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, H, 100, D, generator=g) for _ in range(3))
    with pytest.raises(LoweringError, match="more than two tile ranks") as refused:
        _tail_weighted(False)(q, k, v, w=torch.rand(B, H, 100, generator=g))
    assert refused.value.where is not None and refused.value.where.startswith(__file__)
