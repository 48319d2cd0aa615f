"""Launches that skip Triton's JIT binding: equal specialisations (what the JIT compiles a kernel for) must mean
the same compiled kernel, so the key tells apart everything the JIT tells apart."""

import pytest
import torch

from einflash.compiler.codegen.source import KernelSource
from einflash.compiler.runtime.launch import specialisation


def test_specialisation_tells_apart_what_the_jit_compiles_for():
    text = "@triton.jit\ndef k(q_ptr, stride, n, scale, BLOCK_M: tl.constexpr, flag):\n    pass\n"
    src = KernelSource("k", text, (), (), (), (), "f", (), False)
    base = {"q_ptr": torch.empty(64), "stride": 64, "n": 100, "scale": 0.125, "BLOCK_M": 64, "flag": None}
    key = specialisation(src, base)
    assert specialisation(src, {**base, "q_ptr": torch.empty(64)}) == key  # another aligned tensor
    assert specialisation(src, {**base, "n": 228}) == key  # another integer of the same kind
    assert specialisation(src, {**base, "scale": 0.5}) == key  # floats are runtime fp32 values
    differ = [
        {"q_ptr": torch.empty(65)[1:]},  # 4-byte offset: not 16-byte aligned
        {"q_ptr": torch.empty(64, dtype=torch.float16)},
        {"stride": 1},
        {"stride": 48 + 1},
        {"n": 2**31},  # one, not a multiple of 16, 64 bits
        {"BLOCK_M": 128},
    ]  # a compile-time constant
    for change in differ:
        assert specialisation(src, {**base, **change}) != key, change


@pytest.mark.gpu
def test_repeated_launches_skip_the_jit_and_stay_right():
    """The second call of a shape runs Triton's compiled kernel directly; it and a call with a strided (other
    specialisation) input both match the reference."""
    from catalogue import load_example

    from einflash.compiler.runtime import launch
    from einflash.testing import check

    op = load_example("causal").causal
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 4, 300, 64, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    op(q, k, v)
    before = len(launch._COMPILED)
    assert before > 0
    for args in (
        (q, k, v),
        (q.clone(), k.clone(), v.clone()),
        (torch.randn(2, 4, 300, 72, device="cuda", dtype=torch.bfloat16)[..., :64], k, v),
    ):
        assert check(op, op(*args), *args).ok
    assert len(launch._COMPILED) > before  # rows 72 apart (not a multiple of 16): compiled once more
