"""Entries are held to the target's search space on import and on read: a schedule no tuner there could have
chosen (``block_m: 3``) is skipped with a CacheWarning, and calls run what they would run without it."""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
import torch
from autotune_helpers import example, qkv

from einflash.backends import INTERPRETER, get_target
from einflash.compiler.schedule import Schedule
from einflash.compiler.tuning import selection
from einflash.compiler.tuning.cache import TuneCache
from einflash.compiler.tuning.cache_format import schedule_problem
from einflash.compiler.tuning.cache_keys import Bucket, CacheKey
from einflash.compiler.tuning.space import fitting_default, search_space
from einflash.errors import CacheWarning
from einflash.ir.reference import bind_extents

GOOD = Schedule(32, 16, 4, 1, reverse_m=True)
POISON = dataclasses.replace(GOOD, block_m=3)


def _entry(schedule: Schedule, study: str = "s", trial: int = 0) -> dict:
    row = {"trial": trial, "schedule": dataclasses.asdict(schedule), "ms": 1.0}
    return {"study": study, "best": dict(row), "measured": [row], "failed": []}


def _causal():
    op, args = example("causal"), qkv()
    extents = bind_extents(op.forward.rewritten, dict(zip("qkv", args)), {})
    return op, args, extents, CacheKey.of(op.cascade, INTERPRETER, torch.float32), Bucket.of(extents, 2)


def _poison(path, label: str, schedule=POISON, where=("best",)) -> None:
    """Edit the file as a hand or a forged bundle would: schema-valid, but not a schedule for the target."""
    data = json.loads(path.read_text())
    e = data["entries"][label]
    for w in where:
        (e["best"] if w == "best" else e["measured"][0])["schedule"] = dataclasses.asdict(schedule)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("study", ["s", "another"], ids=["same-study", "other-study"])
@pytest.mark.parametrize("where", [("best",), ("measured",), ("best", "measured")])
def test_an_imported_poisoned_entry_never_replaces_a_good_one(cache_dir, ran, tmp_path, study, where):
    op, args, _, key, bucket = _causal()
    TuneCache().put(key, bucket, _entry(GOOD))
    elsewhere = TuneCache(tmp_path / "elsewhere")
    path = elsewhere.put(key, bucket, _entry(GOOD, study, trial=1))
    _poison(path, bucket.label, where=where)
    with pytest.warns(CacheWarning, match=r"block_m 3 is not a power of two.*skipped"):
        assert TuneCache().import_bundle(elsewhere.export()) == 0
    assert TuneCache().best(key, bucket) == (GOOD, bucket.label)
    selection.forget()
    op(*args)
    assert ran == [GOOD]


def test_a_poisoned_entry_on_disk_is_skipped_and_the_call_runs_the_default(cache_dir, ran):
    op, args, extents, key, bucket = _causal()
    path = TuneCache().put(key, bucket, _entry(GOOD))
    _poison(path, bucket.label)
    selection.forget()
    with pytest.warns(CacheWarning, match=rf"{path.name}: entry '{bucket.label}': .*block_m 3 is not a power of two"):
        out = op(*args)
    assert ran == [fitting_default(op.forward, INTERPRETER, extents, 2, 4)]
    torch.testing.assert_close(out, op(*args, schedule=GOOD))


def test_the_next_write_drops_a_poisoned_entry(cache_dir):
    _, _, extents, key, bucket = _causal()
    other = Bucket.of({**extents, "m": 200}, 2)
    path = TuneCache().put(key, bucket, _entry(GOOD))
    _poison(path, bucket.label)
    with pytest.warns(CacheWarning, match="block_m 3"):
        TuneCache().put(key, other, _entry(GOOD))  # a tuning run of another shape
    assert set(json.loads(path.read_text())["entries"]) == {other.label}


def test_a_bundle_for_a_target_this_einflash_does_not_know_is_skipped(cache_dir, tmp_path):
    _, _, _, key, bucket = _causal()
    elsewhere = TuneCache(tmp_path / "elsewhere")
    elsewhere.put(key, bucket, _entry(GOOD))
    bundle = elsewhere.export()
    bundle["files"][0]["environment"]["target"] = "sm100"
    with pytest.warns(CacheWarning, match="target 'sm100', which this einflash does not know"):
        assert TuneCache().import_bundle(bundle) == 0
    assert not list(TuneCache().root.glob("*.json"))


def test_list_and_show_name_the_skipped_entries(cache_dir, capsys):
    from einflash.cli import main

    _, _, _, key, bucket = _causal()
    _poison(TuneCache().put(key, bucket, _entry(GOOD)), bucket.label)
    assert main(["cache", "show"]) == 0
    assert f"{bucket.label}: SKIPPED: best schedule: block_m 3 is not a power of two" in capsys.readouterr().out
    assert main(["cache", "list", "--json"]) == 0
    (f,) = json.loads(capsys.readouterr().out)["files"]
    assert f["ok"] and "block_m 3" in f["skipped"][bucket.label]


PREFILL = dict(b=2, h=16, m=4096, n=4096, e=128, f=128)
DECODE = dict(b=2, h=16, m=16, n=4096, e=128, f=128)


@pytest.mark.parametrize(
    "bad, extents, what",
    [
        (Schedule(3, 64, 4, 3), PREFILL, "block_m 3 is not a power of two"),
        (Schedule(64, 48, 4, 3), PREFILL, "block_n 48 is not a power of two"),
        (Schedule(8, 64, 4, 3), PREFILL, "block_m 8 is outside 16..128"),
        (Schedule(1024, 64, 4, 3), PREFILL, "block_m 1024 is outside 16..128"),
        (Schedule(64, 64, 3, 3), PREFILL, "num_warps 3 is not a power of two"),
        (Schedule(64, 64, 64, 3), PREFILL, "num_warps 64 is outside 1..8"),
        (Schedule(64, 64, 4, 9), PREFILL, "num_stages 9 is outside 1..5"),
        (Schedule(64, 64, 4, 3, splits=2), PREFILL, "splits 2 is outside 1..1"),
        (Schedule(64, 64, 4, 3, pack=True), PREFILL, "pack true"),
        (Schedule(64, 64, 4, 3, max_registers=7), PREFILL, "max_registers 7 is not one of 0, 240"),
        (Schedule(16, 64, 4, 3, splits=2, pack=True, reverse_m=True), DECODE, "reverse_m true"),
        (Schedule(16, 64, 4, 3, splits=65, pack=False), DECODE, "splits 65 is outside 1..64"),
    ],
)
def test_schedules_no_tuner_could_choose_are_named(bad, extents, what):
    assert what in schedule_problem(bad, get_target("sm90"), Bucket.of(extents, 16 if extents is PREFILL else 2))


@pytest.mark.parametrize("target", ["interpreter", "sm80", "sm90"])
@pytest.mark.parametrize("name", ["softmax", "causal", "gla"])
@pytest.mark.parametrize(
    "extents, kv",
    [(PREFILL, 16), (dict(PREFILL, m=100, n=300, e=64, f=64), 4), (DECODE, 2), (dict(DECODE, m=1, n=100), 16)],
    ids=["prefill", "gqa", "decode-packed", "decode"],
)
def test_every_schedule_a_tuner_could_choose_is_accepted(target, name, extents, kv):
    op, t = example(name), get_target(target)
    ext = dict(extents)
    space = search_space(op.forward, t, ext, kv, 2)
    bucket = Bucket.of(ext, kv)
    candidates = [*space.feasible, space.default, fitting_default(op.forward, t, ext, kv, 2)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [(s, schedule_problem(s, t, bucket)) for s in candidates if schedule_problem(s, t, bucket)] == []
