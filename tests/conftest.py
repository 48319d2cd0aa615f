"""Shared by every test: the gpu marker, seeded randomness, and cases that more than one layer tests."""

import pytest
import torch

import einflash  # noqa: F401  (on a machine without a GPU this turns Triton's interpreter on, before any test imports triton)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def slope_under_a_two_key_window():
    """The fuzzer's fp16 case of the backward's row term summed against decode offsets: an ALiBi slope under an
    end-aligned window of two keys (M=4, N=9, D=16), with seeded fp16 inputs and incoming gradient."""
    import einflash as ef

    @ef.attention
    def windowed_alibi(q, k, v, slope: ef.Tensor["h"], window: int = 2):  # noqa: F821 -- a rank name
        s = q @ k * ef.scale + slope * (ef.n - ef.m)
        qp = ef.m + ef.N - ef.M
        return ef.softmax(ef.mask(s, (ef.n <= qp) & (qp - ef.n < window)), "n") @ v

    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, n, 16, generator=g).half() for n in (4, 9, 9))
    slope, grad_output = torch.randn(2, generator=g).half(), torch.randn(1, 2, 4, 16, generator=g).half()
    return windowed_alibi, grad_output, dict(q=q, k=k, v=v, slope=slope)
