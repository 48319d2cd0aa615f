"""AOT directories for the tests, as fixtures: built through the CLI, or taken from EINFLASH_AOT_TEST_DIR.

One fused and one split-KV entry of softmax (GQA 4:2, packed decode), and a fused entry of
sliding_window (an integer parameter and an affine mask): eight compiles for sm_90, done once per
test session.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import pathlib

import pytest
from catalogue import EXAMPLES

from einflash import cli, knobs

BUILDS = {
    "softmax": [
        str(EXAMPLES / "softmax.py"),
        "--shape",
        "1,4,64,64,64",
        "--shape",
        "2,8,1,256,64",
        "--kv-heads",
        "2",
        "--dtype",
        "float16",
    ],
    "sliding_window": [str(EXAMPLES / "sliding_window.py"), "--shape", "1,2,48,48,32", "--dtype", "float16"],
}


def build(name: str, root: pathlib.Path) -> dict:
    """``einflash aot`` for one of BUILDS into ``root/name``; the manifest it printed."""
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = cli.main(["aot", *BUILDS[name], "--target", "sm90", "--out", str(root / name), "--json"])
    assert rc == 0
    return json.loads(stdout.getvalue())


@functools.cache
def _built(base: pathlib.Path) -> pathlib.Path:
    root = base / "aot"
    root.mkdir()
    for name in BUILDS:
        build(name, root)
    return root


@pytest.fixture(scope="session")
def built_root(tmp_path_factory) -> pathlib.Path:
    """BUILDS, built in this test session."""
    return _built(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="session")
def aot_root(tmp_path_factory) -> pathlib.Path:
    """A folder of AOT directories: EINFLASH_AOT_TEST_DIR's (built on another machine), else BUILDS built now."""
    given = knobs.aot_test_dir()
    return given if given is not None else _built(tmp_path_factory.getbasetemp())
