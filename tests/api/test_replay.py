"""Eager calls replayed from their signature's recording: a replay launches what the call would, so each result
matches a fresh call's bit for bit, and anything a replay could not recompute (another shape, stride,
parameter value, dtype, a choice made after tuning, run-time tile lists) gets a call of its own."""

from __future__ import annotations

import functools

import pytest
import torch
from catalogue import load_example

from einflash.compiler.runtime.replay import Recording
from einflash.compiler.schedule import Schedule
from einflash.compiler.tuning import selection
from einflash.testing import check


@functools.cache
def _op(name: str):
    return getattr(load_example(name), name)


def _qkv(M=5, N=40, E=16, dtype=torch.float32):
    return (
        torch.randn(1, 4, M, E, dtype=dtype),
        torch.randn(1, 2, N, E, dtype=dtype),
        torch.randn(1, 2, N, E, dtype=dtype),
    )


def _fresh(op, *args, **kwargs):
    """The call's result without its replay: the op's replays forgotten first."""
    op._replays = type(op._replays)()
    return op(*args, **kwargs)


@pytest.mark.parametrize("schedule", [None, Schedule(16, 16, 4, 1, splits=2, pack=True)], ids=["chosen", "split-kv"])
def test_a_second_call_is_replayed_and_matches_a_fresh_call(schedule):
    op = _op("softcap")
    q, k, v = _qkv()
    _fresh(op, q, k, v, schedule=schedule)
    assert len(op._replays) == 1
    q2, k2, v2 = _qkv()
    replayed = op(q2, k2, v2, schedule=schedule)
    assert len(op._replays) == 1  # replayed, not recorded again
    assert torch.equal(replayed, _fresh(op, q2, k2, v2, schedule=schedule))
    assert check(op, replayed, q2, k2, v2).ok


def test_what_changes_the_launches_gets_its_own_recording():
    op = _op("softcap")
    q, k, v = _qkv()
    _fresh(op, q, k, v)
    wide = torch.randn(1, 4, 5, 24)[..., :16]  # other strides
    for args, kwargs in [
        ((q, k, v), {"cap": 5.0}),
        ((q[:, :, :3], k, v), {}),
        ((wide, k, v), {}),
        ((q.half(), k.half(), v.half()), {}),
        ((q, k, v), {"return_lse": True}),
    ]:
        before = len(op._replays)
        got = op(*args, **kwargs)
        assert len(op._replays) == before + 1, kwargs
        out = got[0] if isinstance(got, tuple) else got
        assert check(op, out, *args, **{n: x for n, x in kwargs.items() if n != "return_lse"}).ok


def test_forgetting_the_chosen_schedules_forgets_the_replays():
    """After tuning (which forgets the remembered choices), a call chooses again rather than replay the old choice."""
    op = _op("causal")
    q, k, v = _qkv()
    _fresh(op, q, k, v)
    selection.forget()
    op(q, k, v)
    assert len(op._replays) == 2


def test_the_same_tensor_given_twice_is_recorded_but_not_replayed():
    """A replay of ``op(q, q, q)`` would give q for k in a later ``op(q, k, v)`` of the same signature."""
    op = _op("causal")
    q = torch.randn(1, 2, 8, 16)
    _fresh(op, q, q, q)
    assert len(op._replays) == 0
    k, v = torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
    op(q, k, v)
    assert check(op, op(q, q, q), q, q, q).ok and check(op, op(q, k, v), q, k, v).ok


def test_tile_lists_classified_from_data_are_not_replayed():
    mod = load_example("document_mask")
    op = mod.document_mask
    q, k, v = _qkv(M=40)
    doc = torch.randint(0, 3, (1, 40)).sort().values
    _fresh(op, q, k, v, doc=doc)
    assert len(op._replays) == 0
    doc2 = torch.zeros_like(doc)
    assert check(op, op(q, k, v, doc=doc2), q, k, v, doc=doc2).ok


def test_calls_that_need_gradients_are_not_recorded():
    op = _op("causal")
    q, k, v = (x.requires_grad_() for x in _qkv())
    _fresh(op, q, k, v)
    assert len(op._replays) == 0
    with torch.no_grad():
        op(q, k, v)
    assert len(op._replays) == 1


def test_a_launch_reading_an_unrecorded_tensor_refuses_a_replay():
    rec = Recording()
    out = rec.empty(4, dtype=torch.float32, device=torch.device("cpu"))
    assert rec.replay([torch.zeros(4)], [torch.zeros(4)]) is None  # a result that is no buffer
    assert rec.replay([], [out]) is not None


@pytest.mark.gpu
def test_replayed_gqa_decode_on_the_gpu_matches_a_fresh_call():
    """Split-KV with GQA packing: the replay launches Triton's compiled kernels directly."""
    op = _op("causal")
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, 8, 1, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(2, 2, 3000, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    _fresh(op, q, k, v)
    q2 = torch.randn_like(q)
    replayed = op(q2, k, v)
    assert len(op._replays) == 1
    assert torch.equal(replayed, _fresh(op, q2, k, v))
    assert check(op, replayed, q2, k, v).ok
