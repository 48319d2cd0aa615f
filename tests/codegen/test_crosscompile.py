"""Cross-compiling Triton kernels for GPU targets on a machine without a GPU."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from einflash.backends import TARGETS, get_target
from einflash.compiler.aot.crosscompile import compile_for_target
from einflash.errors import BackendError, OutOfResourcesError

# A real kernel file, as einflash's generated kernels are (Triton reads kernel source from files):
# one-pass softmax attention over one head, N a multiple of BLOCK_N. Same shape as the forward
# template: the q tile is held, k/v tiles are streamed, with a running max and sum per row.
TOY_ATTENTION = """
import triton
import triton.language as tl


@triton.jit
def _exp2(x):
    return tl.math.exp2(x)


@triton.jit
def toy_attention(Q, K, V, O, N, stride_m, stride_n, qk_scale,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, NUM_STAGES: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    q = tl.load(Q + offs_m[:, None] * stride_m + offs_d[None, :])
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for start in tl.range(0, N, BLOCK_N, num_stages=NUM_STAGES):
        offs_n = start + tl.arange(0, BLOCK_N)
        k = tl.load(K + offs_n[:, None] * stride_n + offs_d[None, :])
        v = tl.load(V + offs_n[:, None] * stride_n + offs_d[None, :])
        s = tl.dot(q, tl.trans(k)) * qk_scale
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = _exp2(s - m_new[:, None])
        alpha = _exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(tl.float16), v, acc * alpha[:, None])
        m_i = m_new
    tl.store(O + offs_m[:, None] * stride_m + offs_d[None, :], (acc / l_i[:, None]).to(tl.float16))
"""

SIGNATURE = {
    "Q": "*fp16",
    "K": "*fp16",
    "V": "*fp16",
    "O": "*fp16",
    "N": "i32",
    "stride_m": "i32",
    "stride_n": "i32",
    "qk_scale": "fp32",
}
# Contiguous [rows, D] tensors with D >= 16: row strides are multiples of 16, as the launcher would see.
ALIGNED = ("Q", "K", "V", "O", "stride_m", "stride_n")


def load_toy(path):
    spec = importlib.util.spec_from_file_location(f"einflash_toy_attention_{abs(hash(str(path)))}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def toy_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("kernels") / "toy_attention.py"
    path.write_text(TOY_ATTENTION)
    return path


@pytest.fixture(scope="module")
def toy(toy_file):
    return load_toy(toy_file).toy_attention


def compile_toy(fn, target, block_m, block_n, d, num_warps, num_stages):
    constexprs = {"BLOCK_M": block_m, "BLOCK_N": block_n, "D": d, "NUM_STAGES": num_stages}
    return compile_for_target(fn, SIGNATURE, constexprs, target, num_warps, num_stages, aligned=ALIGNED)


def test_sm90_compile_reports_resources_and_uses_wgmma(toy):
    k = compile_toy(toy, get_target("sm90"), 128, 64, 64, 4, 3)
    assert (k.name, k.target, k.num_warps, k.num_stages) == ("toy_attention", "sm90", 4, 3)
    # Pipelined: three stages of a 64x64 fp16 k tile and v tile fit with room to spare.
    assert 3 * 2 * 64 * 64 * 2 <= k.shared_bytes <= get_target("sm90").smem_per_block
    assert k.uses_wgmma and ".target sm_90a" in k.ptx
    assert 0 < k.registers <= 255 and k.spill_bytes == 0 and k.cubin_bytes > 0


def test_more_stages_take_more_shared_memory_and_sm80_has_no_wgmma(toy):
    sm80 = get_target("sm80")
    one, three = compile_toy(toy, sm80, 64, 64, 64, 4, 1), compile_toy(toy, sm80, 64, 64, 64, 4, 3)
    assert three.shared_bytes > one.shared_bytes
    assert not three.uses_wgmma and "mma.sync" in three.ptx


@pytest.mark.parametrize("target", [t for t in TARGETS.values() if not t.is_interpreter], ids=lambda t: t.name)
@pytest.mark.parametrize("family", ["forward", "decode"])
def test_default_configs_fit_without_spilling(toy, target, family):
    for head_dim, cfg in getattr(target, family).defaults:
        k = compile_toy(toy, target, cfg.block_m, cfg.block_n, head_dim, cfg.num_warps, cfg.num_stages)
        assert k.shared_bytes <= target.smem_per_block and k.spill_bytes == 0, (head_dim, cfg, k)


def test_oversized_config_raises_out_of_resources(toy):
    sm90 = get_target("sm90")
    with pytest.raises(OutOfResourcesError, match=r"toy_attention for sm90 .*num_stages=4\).*Lower the block") as e:
        compile_toy(toy, sm90, 128, 256, 256, 8, 4)
    assert e.value.limit == sm90.smem_per_block < e.value.required


def test_interpreter_target_has_nothing_to_compile_for(toy):
    with pytest.raises(BackendError, match="sm90"):
        compile_toy(toy, get_target("interpreter"), 16, 16, 16, 4, 1)


def test_missing_argument_type_is_reported(toy):
    with pytest.raises(TypeError, match="qk_scale"):
        compile_for_target(
            toy,
            {k: v for k, v in SIGNATURE.items() if k != "qk_scale"},
            {"BLOCK_M": 64, "BLOCK_N": 64, "D": 64, "NUM_STAGES": 1},
            get_target("sm90"),
            4,
            1,
        )


def test_interpreter_mode_compiles_in_a_child_process_to_the_same_code(toy, toy_file, monkeypatch):
    here = compile_toy(toy, get_target("sm90"), 64, 64, 128, 4, 2)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    interpreted = load_toy(toy_file).toy_attention
    assert type(interpreted).__name__ == "InterpretedFunction"
    child = compile_toy(interpreted, get_target("sm90"), 64, 64, 128, 4, 2)
    assert child == here


def test_toy_attention_is_attention(toy):
    """The kernel the defaults are checked with computes attention (on the GPU, else in the interpreter)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and type(toy).__name__ != "InterpretedFunction":
        pytest.skip("Triton was imported with its interpreter off and there is no GPU to run on")
    n, d, block = 64, 16, 16
    q, k, v = (torch.randn(n, d, dtype=torch.float16, device=device) for _ in range(3))
    o = torch.empty_like(q)
    toy[(n // block,)](
        q,
        k,
        v,
        o,
        n,
        q.stride(0),
        k.stride(0),
        d**-0.5 * math.log2(math.e),
        BLOCK_M=block,
        BLOCK_N=block,
        D=d,
        NUM_STAGES=1,
    )
    expected = torch.softmax(q.double() @ k.double().T * d**-0.5, dim=1) @ v.double()
    torch.testing.assert_close(o.double(), expected, atol=2e-3, rtol=0)
