"""Which schedule a call runs without one: cache, nearest bucket, deploy mode, EINFLASH_AUTOTUNE, torch.compile."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from autotune_helpers import example, qkv

from einflash.backends import INTERPRETER
from einflash.compiler.runtime import forward as forward_module
from einflash.compiler.schedule import Schedule, default_schedule
from einflash.compiler.tuning import cache as cache_module
from einflash.compiler.tuning import selection
from einflash.compiler.tuning.cache import TuneCache
from einflash.compiler.tuning.cache_keys import Bucket, CacheKey
from einflash.errors import CacheWarning
from einflash.ir.reference import bind_extents

TUNED = Schedule(32, 16, 4, 1, reverse_m=True)


@pytest.fixture
def ran(monkeypatch):
    """The schedules Forward.run was given, in order."""
    got = []
    real = forward_module.Forward.run
    monkeypatch.setattr(
        forward_module.Forward,
        "run",
        lambda self, i, v, s, *rest, **kw: got.append(s) or real(self, i, v, s, *rest, **kw),
    )
    return got


def _store(op, args, schedule=TUNED):
    extents = bind_extents(op.forward.rewritten, dict(zip("qkv", args)), {})
    TuneCache().put(
        CacheKey.of(op.cascade, INTERPRETER, args[0].dtype),
        Bucket.of(extents, args[1].shape[1]),
        {"study": "t", "best": {"schedule": dataclasses.asdict(schedule), "ms": 1.0}, "measured": [], "failed": []},
    )
    selection.forget()
    return extents


def test_no_entry_runs_the_default_silently_and_never_tunes(cache_dir, ran):
    op, args = example("causal"), qkv()
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheWarning)
        op(*args)
    extents = bind_extents(op.forward.rewritten, dict(zip("qkv", args)), {})
    assert ran == [default_schedule(extents, INTERPRETER, 2, op.forward.masked)]
    assert not (cache_dir / "autotune").exists()


def test_an_entry_is_used_for_its_bucket_and_the_nearest(cache_dir, ran):
    op = example("causal")
    _store(op, qkv(M=40, N=40))
    op(*qkv(M=40, N=40))
    op(*qkv(M=100, N=120))  # bucket m128 n128: the m64 n64 entry is the nearest
    assert ran == [TUNED, TUNED]


def test_a_remembered_shape_reads_no_file(cache_dir, ran, monkeypatch):
    op, args = example("causal"), qkv()
    _store(op, args)
    op(*args)
    monkeypatch.setattr(cache_module.TuneCache, "best", lambda *a: pytest.fail("the cache was read again"))
    op._replays = type(op._replays)()  # not a replay of the first call: the choice itself is remembered
    op(*args)
    assert ran == [TUNED, TUNED]


@pytest.mark.parametrize("how", ["env", "api"])
def test_deploy_mode_warns_once_per_missing_key_and_runs_the_default(cache_dir, ran, monkeypatch, how):
    if how == "env":
        monkeypatch.setenv("EINFLASH_DEPLOY", "1")
    else:
        selection.set_deploy_mode(True)
    monkeypatch.setenv("EINFLASH_AUTOTUNE", "1")  # deployment never tunes, whatever else is asked
    op = example("causal")
    with pytest.warns(CacheWarning, match=r"deploy mode: no tuned schedule for causal \(float32, forward m64") as w:
        for _ in range(3):
            op(*qkv())
        op(*qkv(M=33))  # the same bucket
    assert len([x for x in w if x.category is CacheWarning]) == 1 and len(set(ran)) == 1 and TUNED not in ran
    with pytest.warns(CacheWarning, match="decode"):
        op(*qkv(M=3))  # another bucket: warned once too


def test_deploy_mode_uses_the_cache(cache_dir, ran):
    selection.set_deploy_mode(True)
    op, args = example("causal"), qkv()
    _store(op, args)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheWarning)
        op(*args)
    assert ran == [TUNED]


def test_autotune_flag_tunes_a_missing_shape_on_the_call_once(cache_dir, ran, monkeypatch):
    monkeypatch.setenv("EINFLASH_AUTOTUNE", "1")
    op, args = example("causal"), qkv(M=20, N=20)
    op(*args)
    tuned = ran[-1]
    entry = TuneCache().entries(CacheKey.of(op.cascade, INTERPRETER, torch.float32))
    (e,) = entry.values()
    assert dataclasses.asdict(tuned) == e["best"]["schedule"] and len(e["measured"]) > 1
    n = len(ran)
    op(*args)
    assert ran[n:] == [tuned]  # the second call runs the winner at once


@pytest.mark.slow  # Dynamo traces the call
def test_a_compiled_call_uses_the_cached_schedule(cache_dir, ran):
    op, args = example("causal"), qkv()
    _store(op, args)
    torch._dynamo.reset()
    out = torch.compile(lambda q, k, v: op(q, k, v) * 2, backend="eager", fullgraph=True)(*args)
    assert ran == [TUNED]
    torch.testing.assert_close(out, 2 * op(*args, schedule=TUNED))
