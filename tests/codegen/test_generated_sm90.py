"""Generated kernels compile for Hopper (sm_90) on this CPU machine with the target's default configs.

Each kernel is compiled with the signature Triton's launcher would give it for a real bf16 call:
the call goes through ``Forward.run`` on meta tensors (no memory, no kernel run) with the launch
captured, and its arguments are specialised as the launcher does (pointers and multiples of 16
aligned, the integer 1 and None constant). Compiling takes a child process per kernel under the
interpreter, so the whole set is compiled once per session, two at a time.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import load_example

from einflash.backends import get_target
from einflash.compiler.crosscompile import CompileJob, CompiledKernel, compile_for_target
from einflash.compiler.forward import Schedule
from einflash.compiler.launch import load_kernel
from einflash.compiler.schedule import default_schedule
from einflash.compiler.specialise import specialise
from einflash.ir.reference import bind_extents, bind_params

pytestmark = pytest.mark.slow  # a child process compiles each kernel

SM90 = get_target("sm90")
FORWARD = ("causal", "softmax", "alibi", "softcap", "document_mask")  # the last with key tiles listed at run time
DECODE = "softmax"
HEAD_DIMS = (64, 128)
PREFILL = {"B": 2, "Hq": 16, "Hkv": 16, "M": 4096, "N": 4096}  # DESIGN §5's shapes
DECODING = {"B": 4, "Hq": 32, "Hkv": 8, "M": 1, "N": 32768}  # GQA 32:8 over a long cache: split-KV and packing


def _specialised(src, call) -> CompileJob:
    return CompileJob.specialised(load_kernel(src), specialise(call.args, src.constexpr_args), call.num_warps,
                                  call.num_stages)


def _captured(name: str, dims: dict, head_dim: int, schedule_of) -> list[CompileJob]:
    """The launches of one bf16 call of example ``name`` on meta tensors, under the schedule ``schedule_of`` picks."""
    op = getattr(load_example(name), name)
    B, Hq, Hkv, M, N = dims["B"], dims["Hq"], dims["Hkv"], dims["M"], dims["N"]
    meta = {"dtype": torch.bfloat16, "device": "meta"}
    inputs = {"q": torch.empty(B, Hq, M, head_dim, **meta), "k": torch.empty(B, Hkv, N, head_dim, **meta),
              "v": torch.empty(B, Hkv, N, head_dim, **meta)}
    if name == "alibi":
        inputs["slope"] = torch.empty(Hq, dtype=torch.float32, device="meta")
    if name == "document_mask":
        inputs["doc"] = torch.empty(B, N, dtype=torch.int32, device="meta")
    extents = bind_extents(op.forward.streamed, inputs, {})
    schedule = schedule_of(extents, Hkv)
    calls: list[CompileJob] = []
    op.forward.run(inputs, bind_params(op.forward.streamed, {}, extents), schedule, extents,
                   launcher=lambda src, call: calls.append(_specialised(src, call)))
    return calls


def _prefill_schedule(extents, kv_heads) -> Schedule:
    cfg = SM90.forward.default(extents["e"])
    return Schedule(cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages)


def _decode_schedule(extents, kv_heads) -> Schedule:
    schedule = default_schedule(extents, SM90, kv_heads)
    cfg = SM90.decode.default(extents["e"])
    assert (schedule.block_n, schedule.num_warps, schedule.num_stages) == (cfg.block_n, cfg.num_warps, cfg.num_stages)
    assert schedule.splits > 1 and schedule.pack
    return schedule


def _compile(launch: CompileJob) -> CompiledKernel:
    return compile_for_target(launch.fn, launch.signature, launch.constexprs, SM90, launch.num_warps,
                              launch.num_stages, aligned=launch.aligned)


@pytest.fixture(scope="session")
def compiled() -> dict[tuple, tuple[CompileJob, CompiledKernel]]:
    """Every case compiled once: (kind, variant, head dim) -> (launch, compiled kernel)."""
    launches = {}
    for d in HEAD_DIMS:
        for name in FORWARD:
            (launches[("forward", name, d)],) = _captured(name, PREFILL, d, _prefill_schedule)
        launches[("split", DECODE, d)], launches[("combine", DECODE, d)] = _captured(DECODE, DECODING, d,
                                                                                  _decode_schedule)
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        kernels = dict(zip(launches, pool.map(_compile, launches.values())))
    return {key: (launches[key], kernels[key]) for key in launches}


def _fits(kernel: CompiledKernel):
    assert 0 < kernel.cubin_bytes and kernel.shared_bytes <= SM90.smem_per_block, kernel
    assert kernel.spill_bytes == 0, kernel


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("name", FORWARD)
def test_forward_kernel_compiles_with_the_default_config(compiled, name, head_dim):
    launch, kernel = compiled[("forward", name, head_dim)]
    cfg = SM90.forward.default(head_dim)
    assert launch.constexprs["BLOCK_M"] == cfg.block_m and launch.constexprs["BLOCK_N"] == cfg.block_n
    assert (kernel.num_warps, kernel.num_stages) == (cfg.num_warps, cfg.num_stages)
    assert launch.constexprs["COUNT_VISITS"] is False and launch.constexprs["visits_ptr"] is None
    assert launch.signature["q_ptr"] == "*bf16" and kernel.name.startswith(f"attn_fwd__{name}__")
    _fits(kernel)
    assert kernel.uses_wgmma and ".target sm_90a" in kernel.ptx


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_split_kv_decode_kernel_compiles_with_the_default_config(compiled, head_dim):
    launch, kernel = compiled[("split", DECODE, head_dim)]
    cfg = SM90.decode.default(head_dim)
    assert launch.constexprs["SPLIT"] is True and launch.constexprs["PACK"] is True
    assert launch.constexprs["BLOCK_N"] == cfg.block_n and kernel.num_stages == cfg.num_stages
    _fits(kernel)
    # 16 rows per program: too few for a warp-group MMA (64 rows), so Triton uses mma.sync tensor cores
    assert "mma.sync" in kernel.ptx


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_combine_kernel_compiles(compiled, head_dim):
    launch, kernel = compiled[("combine", DECODE, head_dim)]
    assert kernel.name.startswith("attn_combine__softmax__") and launch.signature["out_ptr"] == "*bf16"
    _fits(kernel)
