"""The tuner on the interpreter with a fake timer: winners, failures as trials, budgets, warm starts, seeds."""

from __future__ import annotations

import dataclasses
import json
import time

import optuna
import pytest
import torch
from autotune_helpers import FakeTimer, example, fake_ms, qkv

from einflash.backends import INTERPRETER, SearchSpace, TileConfig, Tuning
from einflash.compiler.runtime import forward as forward_module
from einflash.compiler.schedule import Schedule
from einflash.compiler.tuning import tuner as autotune
from einflash.compiler.tuning.cache import TuneCache
from einflash.compiler.tuning.cache_keys import Bucket, CacheKey
from einflash.compiler.tuning.storage import open_storage
from einflash.compiler.tuning.tuner import Budget, tune
from einflash.errors import TuningError, TuningOptionError
from einflash.ir.reference import bind_extents


def _tune(op, args, **kw):
    inputs, params = op.bind(args, {})
    kw.setdefault("timer", FakeTimer())
    return tune(op.cascade, op.forward, inputs, params, kw.pop("target", INTERPRETER), **kw)


def _study(result) -> optuna.Study:
    storage = open_storage(None, result.path.parent / "studies" / f"{result.key.stem}.journal")
    return optuna.load_study(study_name=result.study, storage=storage)


def test_the_fastest_schedule_that_passes_wins_and_is_cached(cache_dir):
    op, args = example("causal"), qkv()
    timer = FakeTimer()
    r = _tune(op, args, timer=timer, budget=Budget(trials=20))
    assert r.sampler == "grid" and len(r.space.feasible) == 8  # the whole space fits the budget
    assert r.best == min(r.space.feasible, key=fake_ms) and r.best.reverse_m  # causal: heavy tiles first
    assert r.best_ms == fake_ms(r.best) and r.default_ms == fake_ms(r.default) and r.speedup > 1
    assert len(r.measured) == len(timer.timed) == 8 and r.here == 8 and not r.failed
    assert r.measured[0]["warm_start"] == "heuristic default" and r.measured[0]["schedule"] == dataclasses.asdict(
        r.default
    )
    assert all(m["max_error"] <= m["tolerance"] for m in r.measured)
    entry = TuneCache().entries(r.key)[r.bucket.label]
    assert entry["best"]["ms"] == r.best_ms and len(entry["measured"]) == 8
    assert r.path.parent == cache_dir / "autotune" and json.loads(json.dumps(r.to_json()))["best"]["reverse_m"]
    assert "speedup" in str(r) and r.bucket.label in str(r)


def test_later_calls_of_the_shape_run_the_winner(cache_dir, monkeypatch):
    op, args = example("causal"), qkv()
    r = _tune(op, args, budget=Budget(trials=20))
    ran = []
    real = forward_module.Forward.run
    monkeypatch.setattr(
        forward_module.Forward,
        "run",
        lambda self, i, v, s, *rest, **kw: ran.append(s) or real(self, i, v, s, *rest, **kw),
    )
    op(*args)
    op(*qkv(M=33, N=50))  # another shape of the same bucket
    assert ran == [r.best, r.best]


def test_failures_are_trials_with_reasons_and_never_stop_the_tuner(cache_dir, monkeypatch):
    """A compile error, an out-of-resources error and a wrong result: each fails its trial; the rest go on."""
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources

    real = forward_module.Forward.run

    def flaky(self, inputs, values, s, *rest):
        if s.block_m == 32 and s.block_n == 16:
            raise OutOfResources(300_000, 232_448, "shared memory")
        if s.block_m == 32 and s.block_n == 32 and not s.reverse_m:
            raise CompilationError("src", None, "an unsupported layout")
        out, states = real(self, inputs, values, s, *rest)
        if s.block_m == 16 and s.block_n == 32 and s.reverse_m:  # the fake timer's favourite
            out = out + 1e-3
        return out, states

    monkeypatch.setattr(forward_module.Forward, "run", flaky)
    r = _tune(example("causal"), qkv(), budget=Budget(trials=20))
    kinds = sorted(f["kind"] for f in r.failed)
    assert kinds == ["compile error", "out of resources", "out of resources", "wrong result"]
    wrong = next(f for f in r.failed if f["kind"] == "wrong result")
    assert "max error" in wrong["reason"] and "whole problem" in wrong["reason"]
    assert r.best == Schedule(16, 32, 4, 1, reverse_m=False)  # the fastest one that matched the reference
    assert len(r.measured) == 4


def test_nothing_passes_raises_after_storing_the_failures(cache_dir, monkeypatch):
    monkeypatch.setattr(forward_module.Forward, "run", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no GPU")))
    with pytest.raises(TuningError, match=r"no schedule of causal .* compiled, ran and matched"):
        _tune(example("causal"), qkv(), budget=Budget(trials=3))
    (entry,) = TuneCache().entries(CacheKey.of(example("causal").cascade, INTERPRETER, torch.float32)).values()
    assert entry["best"] is None and entry["failed"][0]["reason"] == "RuntimeError: no GPU"


def test_a_large_problem_is_checked_on_its_last_batch_and_kv_head(cache_dir, monkeypatch):
    monkeypatch.setattr(autotune, "FULL_CHECK_ELEMENTS", 0)
    real = forward_module.Forward.run

    def wrong_in_the_last_slice(self, inputs, values, s, *rest):
        out, states = real(self, inputs, values, s, *rest)
        if s.block_n == 32:
            out[-1, -1, 0, 0] += 1.0
        return out, states

    monkeypatch.setattr(forward_module.Forward, "run", wrong_in_the_last_slice)
    r = _tune(example("causal"), qkv(B=2, Hq=4, Hkv=2), budget=Budget(trials=20))
    assert r.checked == "batch 1, kv head 1 (query heads 2..3)"
    assert {f["kind"] for f in r.failed} == {"wrong result"} and len(r.failed) == 4
    assert all(m["schedule"]["block_n"] == 16 for m in r.measured)


def test_budget_in_trials_and_in_seconds(cache_dir):
    r = _tune(example("causal"), qkv(), budget=Budget(trials=3), sampler="tpe")
    assert r.here == len(r.measured) == 3
    slow = FakeTimer(lambda s: time.sleep(0.4) or fake_ms(s))
    t0 = time.monotonic()
    r = _tune(example("causal"), qkv(M=20, N=20), budget=Budget(trials=8, seconds=0.5), timer=slow, sampler="tpe")
    assert 1 <= r.here < 8 and time.monotonic() - t0 < 5


def test_schedules_the_buffer_analysis_rules_out_are_pruned_trials_that_cost_no_compile(cache_dir, monkeypatch):
    """A made-up target with a tiny shared memory: half its space cannot fit; the sampler never runs those."""
    space = SearchSpace(block_m=(16, 32), block_n=(16, 32, 64), num_warps=(4,), num_stages=(1, 2, 3))
    target = dataclasses.replace(
        INTERPRETER, smem_per_block=12_000, forward=Tuning(((256, TileConfig(16, 16, 4, 1)),), space)
    )
    ran = []
    real = forward_module.Forward.run
    monkeypatch.setattr(
        forward_module.Forward,
        "run",
        lambda self, i, v, s, *rest, **kw: ran.append(s) or real(self, i, v, s, *rest, **kw),
    )
    r = _tune(example("softmax"), qkv(), target=target, budget=Budget(trials=6), sampler="tpe")
    assert r.space.pruned_counts()["shared memory"] > 0
    pruned = {p.schedule for p in r.space.pruned}
    assert not pruned & set(ran) and r.here == 6
    states = [t.state for t in _study(r).trials]
    assert optuna.trial.TrialState.PRUNED in states
    assert all(
        t.user_attrs["pruned"].startswith("shared memory")
        for t in _study(r).trials
        if t.state is optuna.trial.TrialState.PRUNED
    )


def test_a_repeated_draw_reuses_its_result(cache_dir):
    r = _tune(example("causal"), qkv(), budget=Budget(trials=20))  # the grid revisits the enqueued default
    repeats = [t for t in _study(r).trials if "repeat_of" in t.user_attrs]
    assert repeats and all(t.value == fake_ms(r.default) for t in repeats)
    assert len(r.measured) == 8  # counted once


def test_a_seeded_study_draws_the_same_schedules(tmp_path, monkeypatch):
    orders = []
    for run in ("a", "b"):
        monkeypatch.setenv("EINFLASH_CACHE_DIR", str(tmp_path / run))
        r = _tune(example("causal"), qkv(), budget=Budget(trials=5), sampler="tpe", seed=7)
        orders.append([m["schedule"] for m in r.measured])
    assert orders[0] == orders[1]


def test_warm_start_from_the_nearest_cached_shape(cache_dir):
    op = example("causal")
    extents = bind_extents(op.forward.rewritten, dict(zip("qkv", qkv(M=100, N=100))), {})
    near = Bucket.of(extents, 2)
    winner = Schedule(32, 32, 4, 1, reverse_m=True)
    TuneCache().put(
        CacheKey.of(op.cascade, INTERPRETER, torch.float32),
        near,
        {
            "study": "elsewhere",
            "best": {"schedule": dataclasses.asdict(winner), "ms": 1.0},
            "measured": [],
            "failed": [],
        },
    )
    r = _tune(op, qkv(), budget=Budget(trials=2), sampler="tpe")
    first, second = r.measured[:2]
    assert first["warm_start"] == "heuristic default"
    assert second["warm_start"] == f"best of {near.label}" and second["schedule"] == dataclasses.asdict(winner)


def test_decode_tunes_split_counts(cache_dir):
    r = _tune(example("softmax"), qkv(Hq=4, Hkv=2, M=3, N=70), budget=Budget(trials=20))
    assert r.space.family == "decode" and {m["schedule"]["splits"] for m in r.measured} >= {1, 2, 4}
    assert all(m["schedule"]["pack"] for m in r.measured) and r.best == min(r.space.feasible, key=fake_ms)


def test_bad_budgets_and_samplers_are_refused(cache_dir):
    with pytest.raises(TuningOptionError, match="at least one trial"):
        Budget(trials=0)
    with pytest.raises(TuningOptionError, match="sampler must be"):
        _tune(example("causal"), qkv(), sampler="random")
    with pytest.raises(TuningOptionError, match="storage URL not understood"):
        _tune(example("causal"), qkv(), storage="nosuchdb://x")


def test_the_cost_model_s_fastest_schedules_are_measured_after_the_default(cache_dir):
    from einflash.backends import get_target
    from einflash.compiler.tuning.ranking import predicted_order

    target = dataclasses.replace(INTERPRETER, costs=get_target("sm90").costs)
    op, args = example("causal"), qkv()
    r = _tune(op, args, budget=Budget(trials=3), sampler="tpe", target=target)
    inputs, params = op.bind(args, {})
    extents = bind_extents(op.forward.rewritten, inputs, params)
    ranked = [s for s, _ in predicted_order(op.forward, target, extents, 2, 4, {}, r.space.feasible)]
    assert r.model_first is not None and r.model_first[0] == ranked[0]
    first, *model = r.measured[:3]
    assert first["warm_start"] == "heuristic default"
    assert all(m["warm_start"].startswith("cost model: ") for m in model)
    assert [m["schedule"] for m in model] == [dataclasses.asdict(s) for s in ranked if s != r.default][:2]
    assert "model's first" in str(r) and r.to_json()["model_first"]["predicted_ms"] == r.model_first[1]
    # without a model (the interpreter's own target) nothing is ranked
    assert _tune(op, args, budget=Budget(trials=1)).model_first is None
