"""On the GPU: ops loaded from AOT directories run their stored binaries, match the reference, and compile nothing.

EINFLASH_AOT_TEST_DIR names a folder of AOT directories built on another machine (``einflash aot ...
--out $EINFLASH_AOT_TEST_DIR/<name>``, on a CPU machine say); unset, conftest's BUILDS are built here.
Every entry of every directory runs at the shape it was built for (its exact binaries) and at other
lengths (the any-lengths binaries), under a Triton that refuses to compile and an empty Triton cache.
"""

from __future__ import annotations

import dataclasses
import pathlib

import pytest
import torch
import triton
import triton.compiler.compiler
import triton.runtime.jit

import einflash as ef
from einflash.compiler.aot.build import declared_inputs
from einflash.compiler.aot.manifest import DTYPES, Entry
from einflash.compiler.schedule import DECODE_MAX_QUERIES
from einflash.testing import check

pytestmark = pytest.mark.gpu
COMPILER_OUTPUT = (".cubin", ".ptx", ".ttir", ".ttgir", ".llir")


@pytest.fixture
def nothing_compiles(monkeypatch, tmp_path):
    """Triton's compiler and JIT raise if called, and its cache starts empty; after the test, no compiler
    output may have appeared in it (the launcher stub Triton builds from C may)."""
    cache = tmp_path / "triton-cache"
    monkeypatch.setenv("TRITON_CACHE_DIR", str(cache))

    def refuse(*args, **kwargs):
        raise AssertionError("a kernel was JIT-compiled while running AOT kernels")

    monkeypatch.setattr(triton, "compile", refuse)
    monkeypatch.setattr(triton.compiler.compiler, "compile", refuse)
    monkeypatch.setattr(triton.runtime.jit.JITFunction, "run", refuse)
    yield
    made = [p.name for p in cache.rglob("*") if p.suffix in COMPILER_OUTPUT]
    assert not made, f"Triton compiled {made}"


def _lengths(entry: Entry) -> list[tuple[int, int]]:
    """The built lengths, then others on the same side of the decode threshold (never more queries than
    keys where the build had none: per-token inputs such as document ids have N entries and are read at m)."""
    M, N = entry.shape.M, entry.shape.N
    if M <= DECODE_MAX_QUERIES:
        return [(M, N), (M, N + 37), (min(M + 3, DECODE_MAX_QUERIES), max(1, N - 29))]
    return [(M, N), (M, N + 37), (max(DECODE_MAX_QUERIES + 1, M - 29), N + 53)]


def _inputs(op, entry: Entry, M: int, N: int, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    shape = dataclasses.replace(entry.shape, M=M, N=N)
    dtypes = {n: getattr(torch, d) for n, d in entry.inputs.items()}
    made = declared_inputs(op.cascade, shape, DTYPES[entry.dtype], entry.dims, dtypes, device="cuda")
    return {n: t.normal_() if t.is_floating_point() else t.random_(0, 4) for n, t in made.items()}


def test_loaded_ops_run_their_binaries_and_match_the_reference(aot_root, nothing_compiles):
    directories = sorted(p.parent for p in pathlib.Path(aot_root).glob("*/manifest.json"))
    assert directories, f"no AOT directories under {aot_root}"
    report, chosen = [], set()
    for directory in directories:
        op = ef.load_aot(directory)
        for entry in op.manifest.entries:
            for i, (M, N) in enumerate(_lengths(entry)):
                inputs = _inputs(op, entry, M, N, seed=i)
                with torch.no_grad():
                    out = op(**inputs, **entry.params)
                verdict = check(op, out, **inputs, **entry.params)
                lengths = [b for _, b in op.kernels.last]
                chosen.update(lengths)
                report.append(
                    f"{directory.name:16} {entry.label:72} M={M:<5} N={N:<6} {'+'.join(lengths):12} err "
                    f"{verdict.max_error:.2e} tol {verdict.tolerance:.2e} {'ok' if verdict.ok else 'FAIL'}"
                )
                assert verdict.ok, report[-1]
                if i == 0:
                    assert set(lengths) == {"exact"}, report[-1]
    print("\n" + "\n".join(report))
    assert "any" in chosen
