"""Cache files nobody can read: each is reported as corrupt and skipped by every reader (an op call, ``cache
list``, ``show``, ``export``), never followed into a hang or a traceback; ``tune`` and ``cache clear`` repair it."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import signal
import warnings

import pytest
from autotune_helpers import example, qkv

from einflash.backends import INTERPRETER
from einflash.cli import main
from einflash.compiler.schedule import Schedule
from einflash.compiler.tuning import cache_format, selection
from einflash.compiler.tuning.cache import TuneCache
from einflash.compiler.tuning.cache_format import problem
from einflash.compiler.tuning.cache_keys import Bucket, CacheKey
from einflash.compiler.tuning.space import fitting_default
from einflash.errors import CacheWarning
from einflash.ir.reference import bind_extents

GOOD = Schedule(32, 16, 4, 1, reverse_m=True)
HANG_S = 20  # far more than any of these reads takes; a read that blocks fails the test instead of hanging it


@contextlib.contextmanager
def _no_hang():
    def hung(*_):
        raise TimeoutError(f"still reading after {HANG_S} s: a reader blocked")

    before = signal.signal(signal.SIGALRM, hung)
    signal.alarm(HANG_S)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, before)


def _key_and_bucket(op, args):
    extents = bind_extents(op.forward.rewritten, dict(zip("qkv", args)), {})
    return CacheKey.of(op.cascade, INTERPRETER, args[0].dtype), Bucket.of(extents, args[1].shape[1])


def _good_file(key, bucket) -> dict:
    """A file as the tuner writes it: a winner, a measured row, a failure, the default's time, two workers."""
    row = {"trial": 0, "schedule": dataclasses.asdict(GOOD), "ms": 1.0, "worker": "a:1"}
    failed = {"trial": 1, "schedule": dataclasses.asdict(Schedule(16, 16, 4, 1)), "kind": "run error", "reason": "x"}
    entry = {
        "study": "s",
        "best": {"schedule": row["schedule"], "ms": 1.0, "trial": 0},
        "measured": [row],
        "failed": [failed],
        "default": {"schedule": failed["schedule"], "ms": None},
        "workers": ["a:1"],
    }
    path = TuneCache().put(key, bucket, entry)
    return json.loads(path.read_text())


def _entry_of(data):
    return next(iter(data["entries"].values()))


# Each makes the file at ``path`` (which holds the good file ``data``) unreadable in its own way.
CORRUPTIONS = {
    "not-utf8": lambda path, data: path.write_bytes(b'{"kind": "einflash-autotune", "name": "\xff\xfe"}'),
    "deep-nesting": lambda path, data: path.write_text("[" * 100_000 + "]" * 100_000),
    "int-of-5000-digits": lambda path, data: path.write_text('{"kind": ' + "1" * 5000 + "}"),
    "dims-a-string": lambda path, data: _edit(path, data, lambda d: _entry_of(d)["bucket"].update(dims="x")),
    "environment-a-string": lambda path, data: _edit(path, data, lambda d: d.update(environment="x")),
    "default-a-string": lambda path, data: _edit(path, data, lambda d: _entry_of(d).update(default="abc")),
    "symlink-loop": lambda path, data: path.unlink() or path.symlink_to(path.name),
    "folder": lambda path, data: path.unlink() or path.mkdir(),
    "fifo": lambda path, data: path.unlink() or os.mkfifo(path),
}


def _edit(path, data, change) -> None:
    data = copy.deepcopy(data)
    change(data)
    path.write_text(json.dumps(data))


def _cli(capsys, *argv) -> tuple[int, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out + err


@pytest.mark.parametrize("how", sorted(CORRUPTIONS))
def test_a_corrupt_file_is_skipped_by_every_reader_and_removed_by_clear(cache_dir, ran, capsys, tmp_path, how):
    op, args = example("causal"), qkv()
    key, bucket = _key_and_bucket(op, args)
    path = TuneCache().path(key)
    CORRUPTIONS[how](path, _good_file(key, bucket))
    selection.forget()
    with _no_hang():
        with pytest.warns(CacheWarning, match="skipped") as caught:
            op(*args)  # runs the default, as with no cache at all
        assert str(path) in str(caught[0].message)
        assert ran == [fitting_default(op.forward, INTERPRETER, _extents(op, args), 2, 4)]
        rc, out = _cli(capsys, "cache", "list")
        assert rc == 0 and f"CORRUPT  {path.name}" in out
        rc, out = _cli(capsys, "cache", "list", "--json")
        (listed,) = json.loads(out)["files"]
        assert rc == 0 and not listed["ok"] and listed["problem"]
        rc, out = _cli(capsys, "cache", "show")
        assert rc == 0 and key.name not in out
        rc, out = _cli(capsys, "cache", "export", str(tmp_path / "bundle.json"))
        assert rc == 0 and json.loads((tmp_path / "bundle.json").read_text())["files"] == []
        rc, out = _cli(capsys, "cache", "clear", "--json")
    assert rc == 0 and json.loads(out) == {"removed": 1}
    assert not os.path.lexists(path)


def _extents(op, args):
    return bind_extents(op.forward.rewritten, dict(zip("qkv", args)), {})


@pytest.mark.parametrize("how", sorted(CORRUPTIONS))
def test_the_next_write_moves_a_corrupt_file_aside(cache_dir, how):
    op, args = example("causal"), qkv()
    key, bucket = _key_and_bucket(op, args)
    path = TuneCache().path(key)
    data = _good_file(key, bucket)
    CORRUPTIONS[how](path, data)
    with _no_hang(), pytest.warns(CacheWarning, match="moved to"):
        TuneCache().put(key, bucket, _entry_of(data))  # what a tuning run does with its result
    assert TuneCache().best(key, bucket) == (GOOD, bucket.label)
    assert len(list(path.parent.glob(f"{path.name}.corrupt-*"))) == 1


def test_a_bundle_that_cannot_be_read_is_a_cache_error(cache_dir, capsys, tmp_path):
    for name, make in [
        ("fifo.json", os.mkfifo),
        ("folder.json", os.mkdir),
        ("bytes.json", lambda p: p.write_bytes(b"\xff\xfe")),
        ("deep.json", lambda p: p.write_text("[" * 100_000)),
    ]:
        make(tmp_path / name)
        with _no_hang():
            rc, out = _cli(capsys, "cache", "import", str(tmp_path / name))
        assert rc == 2 and "CacheError: cannot read the bundle" in out, out


def test_a_file_larger_than_the_limit_is_not_parsed(cache_dir, monkeypatch):
    op, args = example("causal"), qkv()
    key, bucket = _key_and_bucket(op, args)
    _good_file(key, bucket)
    monkeypatch.setattr(cache_format, "MAX_FILE_BYTES", 100)
    with pytest.warns(CacheWarning, match="more than the 100 bytes"):
        assert TuneCache().best(key, bucket) is None


# Every value a reader takes from a file, replaced by each wrong kind of JSON value: the file is either
# reported as corrupt or every reader works with it; nothing raises.
WRONG = [None, True, 0, 2.5, float("nan"), "x", [], {"a": {}}]


def _paths(value, at=()):
    yield at
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, at + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, at + (i,))


def test_no_wrong_value_anywhere_in_a_file_makes_a_reader_raise(cache_dir, capsys, tmp_path):
    op, args = example("causal"), qkv()
    key, bucket = _key_and_bucket(op, args)
    good = _good_file(key, bucket)
    path = TuneCache().path(key)
    tried = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CacheWarning)
        for at in list(_paths(good))[1:]:
            for wrong in WRONG:
                data = copy.deepcopy(good)
                parent = data
                for part in at[:-1]:
                    parent = parent[part]
                parent[at[-1]] = wrong
                path.write_text(json.dumps(data))
                tried += 1
                bad = problem(data, key)
                assert bad is None or isinstance(bad, str)
                TuneCache().best(key, bucket)
                for f in TuneCache().files():
                    json.dumps(f.to_json())
                if problem(data) is None:  # (the commands on corrupt files: the test above)
                    assert _cli(capsys, "cache", "list")[0] == 0
                    assert _cli(capsys, "cache", "show")[0] == 0
                    TuneCache(tmp_path / "elsewhere").import_bundle(TuneCache().export())
    assert tried > 300
