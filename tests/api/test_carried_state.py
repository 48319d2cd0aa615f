"""A state carried from call to call (``initial_state=``, ``return_state=True``): causal linear attention run in
pieces (a prefill in chunks, then one token at a time) gives the output and final state of one whole call, and
the reference's; the calls that cannot carry a state are refused with what to do instead."""

from __future__ import annotations

import functools

import pytest
import torch
from catalogue import load_example

import einflash as ef
from einflash.compiler.schedule import Schedule
from einflash.errors import DifferentiationError, LoweringError, ShapeError

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

SMALL = Schedule(16, 16, 4, 1)


@functools.cache
def _op(name: str) -> ef.AttentionOp:
    return getattr(load_example(name), name)


def _decayed(T: int, dtype=torch.float32, B: int = 2, H: int = 2, E: int = 16, F: int = 24):
    torch.manual_seed(0)
    q, k = (torch.randn(B, H, T, E, dtype=dtype) for _ in range(2))
    v = torch.randn(B, H, T, F, dtype=dtype)
    return q, k, v, 0.8 + 0.2 * torch.rand(H)


def test_pieces_and_token_by_token_decoding_give_the_whole_call():
    """A prefill of 70 positions, one of 41 (past a chunk's end), then 9 tokens one at a time: each piece's output
    is the whole call's rows, and the last state the whole call's state (fp32 kernels)."""
    op = _op("causal_linear")
    q, k, v, decay = _decayed(120)
    whole, state = op(q, k, v, decay, return_state=True, schedule=SMALL)
    torch.testing.assert_close(whole, op(q, k, v, decay, backend="reference"), rtol=1e-4, atol=1e-4)
    assert state.shape == (2, 2, 16, 24) and state.dtype == torch.float32
    outs, carried = [], None
    for lo, hi in [(0, 70), (70, 111)] + [(t, t + 1) for t in range(111, 120)]:
        piece = slice(lo, hi)
        out, carried = op(
            q[:, :, piece], k[:, :, piece], v[:, :, piece], decay, initial_state=carried, return_state=True
        )
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs, dim=2), whole, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(carried, state, rtol=1e-4, atol=1e-4)


def test_a_state_of_no_keys_is_zero_and_an_empty_call_hands_its_state_on():
    op = _op("causal_linear")
    q, k, v, decay = _decayed(0)
    out, state = op(q, k, v, decay, return_state=True)
    assert out.shape == (2, 2, 0, 24) and (state == 0).all()
    given = torch.randn(2, 2, 16, 24)
    assert torch.equal(op(q, k, v, decay, initial_state=given, return_state=True)[1], given)


def test_calls_that_cannot_carry_a_state_are_refused():
    op = _op("causal_linear")
    q, k, v, decay = _decayed(20)
    with pytest.raises(LoweringError, match="causal attention in linear form"):
        _op("softmax")(q, k, v, return_state=True)
    gla = _op("gla")
    with pytest.raises(LoweringError, match=r"reads \['g'\] per position"):
        gla(q, k, q, torch.zeros_like(q), initial_state=torch.zeros(2, 2, 16, 16), return_state=True)
    with pytest.raises(ShapeError, match=r"initial_state must be torch.float32 \[B, H, E, F\]"):
        op(q, k, v, decay, initial_state=torch.zeros(2, 2, 16, 16))
    with pytest.raises(ShapeError, match="as many queries as keys"):
        op(q[:, :, :1], k, v, decay, return_state=True)
    with pytest.raises(DifferentiationError, match="no backward yet"):
        op(q.requires_grad_(), k, v, decay, return_state=True)
    with pytest.raises(LoweringError, match="eagerly"):
        op(q.detach(), k, v, decay, return_state=True, backend="reference")
