"""What a call on the CPU prints: no warnings of numpy's from the interpreter's evaluation of masked-off lanes
(they mean nothing), while einflash's own warnings still reach the caller."""

import warnings

import pytest
import torch
from catalogue import load_example

from einflash.compiler.tuning import selection
from einflash.errors import CacheWarning
from einflash.shape import Shape


@pytest.mark.parametrize("name", ["causal", "document_mask", "sliding_window"])
def test_interpreter_launches_leak_no_numpy_warnings(name):
    mod = load_example(name)
    op = getattr(mod, name)
    q, k, v = (torch.randn(1, 2, 37, 16, requires_grad=True) for _ in range(3))
    extra = mod.extra_inputs(Shape(1, 2, 37, 37, 16)) if hasattr(mod, "extra_inputs") else {}
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        op(q, k, v, **extra).sum().backward()  # forward, backward, and a replayed inference call
        with torch.no_grad():
            op(q, k, v, **extra)
            op(q, k, v, **extra)
    assert [str(w.message) for w in seen] == []


def test_einflash_warnings_still_show(tmp_path, monkeypatch):
    monkeypatch.setenv("EINFLASH_CACHE_DIR", str(tmp_path))
    selection.set_deploy_mode(True)
    try:
        with pytest.warns(CacheWarning, match="deploy mode: no tuned schedule"):
            load_example("causal").causal(*(torch.randn(1, 2, 24, 16) for _ in range(3)))
    finally:
        selection.set_deploy_mode(None)


@pytest.mark.parametrize("name", ["causal", "softmax"])
def test_a_nan_input_gives_nan_without_numpy_warnings(name):
    # the interpreter reduces a row of NaN with numpy's nan-aware maximum, which warns "All-NaN slice"
    op = getattr(load_example(name), name)
    q, k, v = (torch.randn(1, 2, 37, 16) for _ in range(3))
    q[0, 1, 5] = float("nan")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = op(q, k, v)
    assert out[0, 1, 5].isnan().all() and [str(w.message) for w in seen] == []
