"""The autotune cache: keys and buckets, nearest-bucket lookups, atomic locked writes, corrupt files."""

from __future__ import annotations

import dataclasses
import json
import threading
import warnings

import pytest
from autotune_helpers import example

from einflash.backends import get_target
from einflash.compiler.schedule import Schedule
from einflash.compiler.tuning.cache import TuneCache, best_schedule, merge
from einflash.compiler.tuning.cache_format import FORMAT, problem
from einflash.compiler.tuning.cache_keys import Bucket, CacheKey
from einflash.errors import CacheError, CacheWarning
from einflash.shape import Shape

SM90 = get_target("sm90")
PREFILL = dict(b=2, h=16, m=4096, n=4096, e=128, f=128)


def _entry(schedule: Schedule, ms: float, study: str = "s", trial: int = 0) -> dict:
    row = {"trial": trial, "schedule": dataclasses.asdict(schedule), "ms": ms}
    return {
        "study": study,
        "best": {"schedule": row["schedule"], "ms": ms, "trial": trial},
        "measured": [row],
        "failed": [],
    }


@pytest.fixture
def key():
    return CacheKey.of(example("softmax").cascade, SM90, "bfloat16")


def test_key_names_everything_that_changes_the_answer(key):
    env = key.environment
    assert set(env) == {"target", "device", "capability", "triton", "torch", "einflash"}
    assert env["capability"] == "9.0" and env["target"] == "sm90"
    softmax, causal = example("softmax").cascade, example("causal").cascade
    others = [
        CacheKey.of(causal, SM90, "bfloat16"),
        CacheKey.of(softmax, SM90, "float16"),
        CacheKey.of(softmax, get_target("sm80"), "bfloat16"),
        dataclasses.replace(key, env=tuple({**env, "triton": "3.9.0"}.items())),
    ]
    assert len({key.stem, *(o.stem for o in others)}) == 5


def test_buckets_round_lengths_and_keep_head_dims_and_groups():
    b = Bucket.of(dict(PREFILL, m=3000, n=5000), 16)
    assert (b.family, b.m, b.n, b.bkv, b.group) == ("forward", 4096, 8192, 32, 1)
    decode = Bucket.of(dict(PREFILL, m=1), 4)
    assert decode.family == "decode" and decode.group == 4 and decode.bkv == 8
    assert not b.compatible(decode) and not b.compatible(Bucket.of(dict(PREFILL, e=64, f=64), 16))
    assert Bucket.from_json(json.loads(json.dumps(b.to_json()))) == b


def test_lookup_prefers_the_exact_bucket_then_the_nearest_compatible(tmp_path, key):
    cache = TuneCache(tmp_path)
    near, far = Bucket.of(dict(PREFILL, n=8192), 16), Bucket.of(dict(PREFILL, n=32768), 16)
    other_dims = Bucket.of(dict(PREFILL, e=64, f=64), 16)
    cache.put(key, near, _entry(Schedule(64, 64, 4, 3), 2.0))
    cache.put(key, far, _entry(Schedule(128, 128, 8, 2), 1.0))
    cache.put(key, other_dims, _entry(Schedule(64, 128, 4, 4), 0.5))
    here = Bucket.of(PREFILL, 16)
    assert cache.best(key, here) == (Schedule(64, 64, 4, 3), near.label)
    cache.put(key, here, _entry(Schedule(128, 64, 8, 3), 3.0))
    assert cache.best(key, here) == (Schedule(128, 64, 8, 3), here.label)
    assert cache.best(key, Bucket.of(dict(PREFILL, h=8), 2)) is None  # GQA group 4: nothing compatible
    assert cache.best(CacheKey.of(example("softmax").cascade, SM90, "float16"), here) is None


def test_best_schedule_is_the_lookup_for_ahead_of_time_builds(tmp_path, key):
    cache = TuneCache(tmp_path)
    cache.put(key, Bucket.of(PREFILL, 16), _entry(Schedule(64, 64, 4, 3), 2.0))
    op = example("softmax")
    assert best_schedule(op.cascade, SM90, "bfloat16", Shape(2, 16, 4096, 4096, 128), cache=cache) == Schedule(
        64, 64, 4, 3
    )
    assert best_schedule(op.cascade, SM90, "bfloat16", Shape(2, 16, 1, 4096, 128), cache=cache) is None  # decode


def test_files_are_json_with_format_metadata_and_every_measurement(tmp_path, key):
    cache = TuneCache(tmp_path)
    entry = _entry(Schedule(64, 64, 4, 3), 2.0)
    entry["failed"] = [
        {
            "trial": 1,
            "schedule": dataclasses.asdict(Schedule(128, 128, 4, 5)),
            "kind": "compile error",
            "reason": "boom",
        }
    ]
    path = cache.put(key, Bucket.of(PREFILL, 16), entry)
    data = json.loads(path.read_text())
    assert data["kind"] == "einflash-autotune" and data["format"] == FORMAT and problem(data, key) is None
    assert data["cascade"] == key.cascade and data["environment"] == key.environment and data["dtype"] == "bfloat16"
    (e,) = data["entries"].values()
    assert e["measured"][0]["ms"] == 2.0 and e["failed"][0]["reason"] == "boom"
    assert not list(tmp_path.glob("*.tmp*"))  # the temporary file was renamed over the real one


def test_writes_from_many_threads_lose_nothing(tmp_path, key):
    def writer(n: int):
        cache = TuneCache(tmp_path)  # each its own instance, as separate processes would be
        for i in range(10):
            cache.put(key, Bucket.of(dict(PREFILL, n=2 ** (n * 10 + i + 1)), 16), _entry(Schedule(64, 64, 4, 3), 1.0))

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(TuneCache(tmp_path).entries(key)) == 30


def test_one_study_written_by_two_workers_unites_their_trials():
    a, b = _entry(Schedule(64, 64, 4, 3), 2.0, trial=0), _entry(Schedule(128, 64, 8, 3), 1.5, trial=1)
    both = merge(a, b)
    assert [r["trial"] for r in both["measured"]] == [0, 1] and both["best"]["ms"] == 1.5
    assert merge(a, _entry(Schedule(128, 64, 8, 3), 9.0, study="another"))["best"]["ms"] == 9.0


@pytest.mark.parametrize(
    "content, what",
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"kind": "einflash-autotune", "format": 99}), "format version 99"),
        (json.dumps([1, 2]), "not an einflash autotune file"),
        ("BAD-SCHEDULE", "schedule field block_m must be a positive integer"),
        ("OTHER-TRITON", "written for environment"),
    ],
    ids=["not-json", "format", "not-ours", "schema", "mismatch"],
)
def test_a_bad_file_is_reported_once_and_skipped_then_moved_aside(tmp_path, key, content, what):
    cache = TuneCache(tmp_path)
    b = Bucket.of(PREFILL, 16)
    path = cache.put(key, b, _entry(Schedule(64, 64, 4, 3), 2.0))
    if content in ("BAD-SCHEDULE", "OTHER-TRITON"):
        data = json.loads(path.read_text())
        if content == "BAD-SCHEDULE":
            data["entries"][b.label]["best"]["schedule"]["block_m"] = -64
        else:
            data["environment"]["triton"] = "0.0.1"
        content = json.dumps(data)
    path.write_text(content)
    with pytest.warns(CacheWarning, match=what) as caught:
        assert TuneCache(tmp_path).best(key, b) is None
    assert str(path) in str(caught[0].message)
    listed = {f.path: f for f in TuneCache(tmp_path).files()}
    assert (listed[path].problem is not None) == (what != "written for environment")  # that one is only elsewhere's
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CacheWarning)
        cache.put(key, b, _entry(Schedule(128, 64, 8, 3), 1.0))
    assert cache.best(key, b) == (Schedule(128, 64, 8, 3), b.label)
    assert len(list(tmp_path.glob(f"{path.name}.corrupt-*"))) == 1


def test_export_then_import_elsewhere_round_trips(tmp_path, key):
    src, dst = TuneCache(tmp_path / "a"), TuneCache(tmp_path / "b")
    b = Bucket.of(PREFILL, 16)
    src.put(key, b, _entry(Schedule(64, 64, 4, 3), 2.0))
    (tmp_path / "a" / "junk.json").write_text("{")
    bundle = json.loads(json.dumps(src.export()))
    assert len(bundle["files"]) == 1  # the unreadable file is left out
    assert dst.import_bundle(bundle) == 1 and dst.best(key, b) == (Schedule(64, 64, 4, 3), b.label)
    with pytest.raises(CacheError, match="not an einflash autotune bundle"):
        dst.import_bundle({"kind": "something else"})
    bundle["files"][0]["entries"][b.label]["best"]["ms"] = "fast"
    with pytest.raises(CacheError, match="file 0 of the bundle: malformed"):
        dst.import_bundle(bundle)
    assert dst.clear() == 1 and dst.best(key, b) is None
