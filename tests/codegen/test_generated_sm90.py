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
from catalogue import load_example
from launches import captured, compile_launch

from einflash.backends import get_target
from einflash.compiler.aot.crosscompile import CompiledKernel, CompileJob
from einflash.compiler.schedule import Schedule, default_schedule

pytestmark = pytest.mark.slow  # a child process compiles each kernel

SM90 = get_target("sm90")
FORWARD = ("causal", "softmax", "alibi", "softcap", "document_mask")  # the last with key tiles listed at run time
DECODE = "softmax"
HEAD_DIMS = (64, 128)
PREFILL = {"B": 2, "Hq": 16, "Hkv": 16, "M": 4096, "N": 4096}  # docs/design.md §5's shapes
DECODING = {"B": 4, "Hq": 32, "Hkv": 8, "M": 1, "N": 32768}  # GQA 32:8 over a long cache: split-KV and packing


def _prefill_schedule(extents, kv_heads) -> Schedule:
    cfg = SM90.forward.default(extents["e"])
    return Schedule(cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages, max_registers=cfg.max_registers)


def _decode_schedule(extents, kv_heads) -> Schedule:
    schedule = default_schedule(extents, SM90, kv_heads)
    cfg = SM90.decode.default(extents["e"])
    assert (schedule.block_n, schedule.num_warps, schedule.num_stages) == (cfg.block_n, cfg.num_warps, cfg.num_stages)
    assert schedule.splits > 1 and schedule.pack
    return schedule


def _compile(launch: CompileJob) -> CompiledKernel:
    return compile_launch(launch, SM90)


@pytest.fixture(scope="session")
def compiled() -> dict[tuple, tuple[CompileJob, CompiledKernel]]:
    """Every case compiled once: (kind, variant, head dim) -> (launch, compiled kernel)."""
    launches = {}
    for d in HEAD_DIMS:
        for name in FORWARD:
            (launches[("forward", name, d)],) = captured(name, PREFILL, d, _prefill_schedule)
        launches[("split", DECODE, d)], launches[("combine", DECODE, d)] = captured(
            DECODE, DECODING, d, _decode_schedule
        )
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        kernels = dict(zip(launches, pool.map(_compile, launches.values())))
    return {key: (launches[key], kernels[key]) for key in launches}


# Bytes of registers each thread spills (its stack frame, as cuobjdump reports it) with the default
# config, where that is not zero: none since masked tiles test a row's presence on its finite maximum
# instead of reducing a boolean tile. Growth shows here.
KNOWN_SPILLS: dict[tuple, int] = {}


def _fits(kernel: CompiledKernel, case: tuple):
    assert kernel.cubin_bytes > 0 and kernel.shared_bytes <= SM90.smem_per_block, kernel
    assert kernel.spill_bytes <= KNOWN_SPILLS.get(case, 0), kernel


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("name", FORWARD)
def test_forward_kernel_compiles_with_the_default_config(compiled, name, head_dim):
    case = ("forward", name, head_dim)
    launch, kernel = compiled[case]
    cfg = SM90.forward.default(head_dim)
    assert launch.constexprs["BLOCK_M"] == cfg.block_m and launch.constexprs["BLOCK_N"] == cfg.block_n
    assert (kernel.num_warps, kernel.num_stages) == (cfg.num_warps, cfg.num_stages)
    assert launch.max_registers == cfg.max_registers and kernel.registers <= (cfg.max_registers or 255)
    assert launch.constexprs["COUNT_VISITS"] is False and launch.constexprs["visits_ptr"] is None
    assert launch.signature["q_ptr"] == "*bf16" and kernel.name.startswith(f"attn_fwd__{name}__")
    _fits(kernel, case)
    assert kernel.uses_wgmma and ".target sm_90a" in kernel.ptx


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_split_kv_decode_kernel_compiles_with_the_default_config(compiled, head_dim):
    case = ("split", DECODE, head_dim)
    launch, kernel = compiled[case]
    cfg = SM90.decode.default(head_dim)
    assert launch.constexprs["SPLIT"] is True and launch.constexprs["PACK"] is True
    assert launch.constexprs["BLOCK_N"] == cfg.block_n and kernel.num_stages == cfg.num_stages
    _fits(kernel, case)
    # 16 rows per program: too few for a warp-group MMA (64 rows), so Triton uses mma.sync tensor cores
    assert "mma.sync" in kernel.ptx


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_combine_kernel_compiles(compiled, head_dim):
    case = ("combine", DECODE, head_dim)
    launch, kernel = compiled[case]
    assert kernel.name.startswith("attn_combine__softmax__") and launch.signature["out_ptr"] == "*bf16"
    _fits(kernel, case)


def test_a_broadcast_reduction_compiles_at_its_shrunk_default():
    # GLA's BM×BN×E decay tile does not fit the target's 64×64 default; the fitting default does. At a prefill's
    # length GLA runs chunk by chunk: the state kernel, then the query tiles whose own chunk holds that tile
    from einflash.compiler.tuning.space import fitting_default

    op = load_example("gla").gla
    states, job = captured("gla", PREFILL, 128, lambda extents, kv: fitting_default(op.forward, SM90, extents, kv, 2))
    assert job.constexprs["BLOCK_M"] * job.constexprs["BLOCK_N"] < 64 * 64
    for kernel in (_compile(states), _compile(job)):
        assert kernel.shared_bytes <= SM90.smem_per_block and kernel.spill_bytes == 0, kernel


def test_chunked_kernels_compile_with_tensor_cores():
    # causal linear attention with a decay at a prefill's length: the state kernel's chunk products and the query
    # tiles' (their own chunk, and the state) on warp-group MMAs, with no spills, at the default of a causal mask
    states, queries = captured(
        "causal_linear", PREFILL, 128, lambda extents, kv: default_schedule(extents, SM90, kv, True)
    )
    assert queries.constexprs["BLOCK_M"] == queries.constexprs["BLOCK_N"]  # a chunk's rows and its keys
    for kernel in (_compile(states), _compile(queries)):
        assert kernel.uses_wgmma and kernel.spill_bytes == 0, kernel
        assert kernel.shared_bytes <= SM90.smem_per_block, kernel
