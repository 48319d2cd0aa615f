"""Backward kernels compile for Hopper (sm_90) on this CPU machine with the target's default backward tiles,
fit its shared memory and do not spill: the training forward, the rows, dK/dV and dQ kernels of a bf16 call
(on meta tensors, launches captured as in test_generated_sm90), for the benchmark's variants and head dims."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from unittest import mock

import pytest
import torch
from conftest import load_example
from test_generated_sm90 import SM90, _compile, _fits, _Recorder

from einflash.compiler import backward as backward_module
from einflash.compiler import launch as launch_module
from einflash.compiler.backward import default_backward_schedule
from einflash.compiler.forward import Schedule
from einflash.ir.reference import bind_extents, bind_params

pytestmark = pytest.mark.slow  # a child process compiles each kernel

VARIANTS = ("causal", "alibi", "softcap")
HEAD_DIMS = (64, 128)
SHAPE = {"B": 2, "Hq": 16, "Hkv": 8, "M": 4096, "N": 4096}  # GQA 2: the dK/dV kernel loops over the group


def _captured(name: str, head_dim: int) -> dict:
    """The launches of one bf16 training call (forward and backward) of example ``name`` on meta tensors."""
    op = getattr(load_example(name), name)
    B, Hq, Hkv, M, N = (SHAPE[k] for k in ("B", "Hq", "Hkv", "M", "N"))
    meta = {"dtype": torch.bfloat16, "device": "meta"}
    inputs = {"q": torch.empty(B, Hq, M, head_dim, **meta), "k": torch.empty(B, Hkv, N, head_dim, **meta),
              "v": torch.empty(B, Hkv, N, head_dim, **meta)}
    if name == "alibi":
        inputs["slope"] = torch.empty(Hq, dtype=torch.float32, device="meta")
    c = op.forward.streamed
    extents = bind_extents(c, inputs, {})
    values = bind_params(c, {}, extents)
    cfg = SM90.forward.default(head_dim)
    calls: list = []
    real = launch_module.load_kernel
    recording = lambda src: _Recorder(real(src), calls)  # noqa: E731
    with mock.patch.object(launch_module, "load_kernel", recording), \
            mock.patch.object(backward_module, "load_kernel", recording):
        out, states = op.forward.run(inputs, values, Schedule(cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages),
                                     extents, saved=op.backward.saved)
        op.backward.run(inputs, values, out, states, torch.empty_like(out), default_backward_schedule(extents, SM90),
                        extents)
    return dict(zip(("forward", "rows", "kv", "q"), calls))


@pytest.fixture(scope="session")
def compiled() -> dict:
    launches = {(name, d, kind): launch for name in VARIANTS for d in HEAD_DIMS
                for kind, launch in _captured(name, d).items()}
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        kernels = dict(zip(launches, pool.map(_compile, launches.values())))
    return {key: (launches[key], kernels[key]) for key in launches}


@pytest.mark.parametrize("kind", ["forward", "rows", "kv", "q"])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("name", VARIANTS)
def test_training_kernels_compile_with_the_default_config(compiled, name, head_dim, kind):
    launch, kernel = compiled[(name, head_dim, kind)]
    assert kernel.name.startswith({"forward": "attn_fwd__", "rows": "attn_bwd_rows__", "kv": "attn_bwd_kv__",
                                   "q": "attn_bwd_q__"}[kind])
    _fits(kernel)
    if kind in ("kv", "q"):
        cfg = SM90.backward.default(head_dim)
        assert (kernel.num_warps, kernel.num_stages) == (cfg.num_warps, cfg.num_stages)
        assert "mma" in kernel.ptx  # the dots run on tensor cores
