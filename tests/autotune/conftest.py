"""Fixtures of the autotune tests: a private cache folder per test; the schedules the forward ran with."""

from __future__ import annotations

import pytest

from einflash.compiler.runtime import forward as forward_module
from einflash.compiler.tuning import selection


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """EINFLASH_CACHE_DIR in a fresh folder; no deploy or autotune flags; nothing remembered."""
    monkeypatch.setenv("EINFLASH_CACHE_DIR", str(tmp_path))
    for flag in ("EINFLASH_DEPLOY", "EINFLASH_AUTOTUNE"):
        monkeypatch.delenv(flag, raising=False)
    selection.set_deploy_mode(None)
    yield tmp_path
    selection.set_deploy_mode(None)


@pytest.fixture
def ran(monkeypatch):
    """The schedule of every Forward.run call during the test, in order."""
    got = []
    real = forward_module.Forward.run
    monkeypatch.setattr(
        forward_module.Forward, "run", lambda self, i, v, s, *a, **kw: got.append(s) or real(self, i, v, s, *a, **kw)
    )
    return got
