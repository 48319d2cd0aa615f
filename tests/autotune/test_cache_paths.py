"""Names read from cache files and bundles are data: nothing a bundle says puts a file outside the cache folder."""

from __future__ import annotations

import dataclasses

import pytest
from autotune_helpers import example

from einflash.backends import get_target
from einflash.compiler.schedule import Schedule
from einflash.compiler.tuning.cache import TuneCache
from einflash.compiler.tuning.cache_keys import Bucket, CacheKey
from einflash.errors import CacheError

SM90 = get_target("sm90")
BUCKET = Bucket.of(dict(b=2, h=16, m=4096, n=4096, e=128, f=128), 16)


def _bundle(tmp_path) -> dict:
    src = TuneCache(tmp_path / "src")
    key = CacheKey.of(example("softmax").cascade, SM90, "bfloat16")
    row = {"trial": 0, "schedule": dataclasses.asdict(Schedule(64, 64, 4, 3)), "ms": 1.0}
    src.put(key, BUCKET, {"study": "s", "best": row, "measured": [row], "failed": []})
    return src.export()


def _everything(folder) -> set:
    return {p.relative_to(folder) for p in folder.rglob("*")}


def test_a_name_with_path_separators_stays_a_name_inside_the_cache(tmp_path):
    bundle = _bundle(tmp_path)
    (tmp_path / "x").mkdir()
    bundle["files"][0]["name"] = "../../x/PWNED"  # from tmp_path/dst/cache, this would land in tmp_path/x
    dst = TuneCache(tmp_path / "dst" / "cache")
    assert dst.import_bundle(bundle) == 1
    assert not list((tmp_path / "x").iterdir())
    (written,) = dst.root.glob("*.json")
    assert written.parent == dst.root and written.name.startswith("______x_PWNED-")
    assert {p.parent for p in dst.root.iterdir()} == {dst.root}  # its lock file too


@pytest.mark.parametrize(
    "field, value",
    [
        (("environment", "target"), "../../x/PWNED"),
        (("environment", "target"), "sm90/x"),
        (("cascade",), "../../../../x/abc"),
        (("dtype",), "../../x"),
    ],
    ids=["target-traversal", "target-slash", "cascade", "dtype"],
)
def test_a_bundle_whose_key_fields_could_name_a_path_is_refused_and_writes_nothing(tmp_path, field, value):
    bundle = _bundle(tmp_path)
    data = bundle["files"][0]
    for part in field[:-1]:
        data = data[part]
    data[field[-1]] = value
    (tmp_path / "x").mkdir()
    dst = TuneCache(tmp_path / "dst" / "cache")
    with pytest.raises(CacheError, match=f"file 0 of the bundle: .*{field[-1]}"):
        dst.import_bundle(bundle)
    assert not list((tmp_path / "x").iterdir()) and not dst.root.exists()


def test_a_key_built_by_hand_is_checked_too(tmp_path):
    key = CacheKey.of(example("softmax").cascade, SM90, "bfloat16")
    env = dict(key.env)
    with pytest.raises(CacheError, match=r"environment\.target '\.\./x' .*letters, digits"):
        CacheKey(key.cascade, key.name, tuple({**env, "target": "../x"}.items()), key.dtype)
    with pytest.raises(CacheError, match="dtype"):
        CacheKey(key.cascade, key.name, key.env, "float32/../../x")
    # a variant's name is only for people reading file names: any name makes a plain file name
    odd = dataclasses.replace(key, name="a/../../b c")
    assert TuneCache(tmp_path).path(odd).parent == tmp_path
