"""einflash ops as PyTorch sees them: the registered custom op passes ``opcheck``, a compiled
function calling an op matches eager, the reference backend is the reference executor in the
input dtype, and an op that cannot be lowered says so under ``torch.compile`` too."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from catalogue import load_example

import einflash as ef
from einflash.errors import LoweringError

pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
]

# (example, its parameters as the custom op takes them, schedule ints [block_m, block_n, warps, stages, splits, pack])
OPCHECK = [
    ("causal", [math.nan], [16, 16, 4, 1, 1, 0]),  # NaN: the default scale, 1/sqrt(E)
    ("sliding_window", [5.0, 0.25], [16, 16, 4, 1, 1, 0]),  # window 5, scale 0.25
    ("alibi", [math.nan], [16, 16, 4, 1, 2, 1]),  # split-KV with GQA packing
]


@functools.cache
def _op(name: str):
    return getattr(load_example(name), name)


def _tensors(name: str, M: int = 12, N: int = 21, dtype=torch.float32) -> list[torch.Tensor]:
    """The op's inputs in declaration order: q [1, 4, M, 16], k and v [1, 2, N, 16], extras."""
    made = {
        "q": torch.randn(1, 4, M, 16, dtype=dtype),
        "k": torch.randn(1, 2, N, 16, dtype=dtype),
        "v": torch.randn(1, 2, N, 16, dtype=dtype),
        "slope": torch.tensor([0.5, 0.25, 0.125, 0.0625]),
    }
    return [made[t.name] for t in _op(name).cascade.inputs]


def _params(name: str, values: list[float]) -> dict[str, float]:
    """The custom op's parameter list as a call's keywords (an int parameter as an int)."""
    return {p.name: (int(v) if p.integer else v) for p, v in zip(_op(name).cascade.params, values) if not math.isnan(v)}


@pytest.mark.parametrize("name, params, schedule", OPCHECK, ids=[c[0] for c in OPCHECK])
def test_custom_op_passes_opcheck(name, params, schedule):
    op = _op(name)
    tensors = _tensors(name)
    torch.library.opcheck(op._custom_op, (tensors, params, schedule))
    got = op._custom_op(tensors, params, schedule)
    want = op.reference(*tensors, **_params(name, params))
    assert got.shape == want.shape and float((got.double() - want).abs().max()) < 1e-5


@pytest.mark.slow  # Inductor compiles the graph around the op
def test_compiled_function_matches_eager():
    causal, window = _op("causal"), _op("sliding_window")

    def block(q, k, v):
        return torch.relu(causal(q, k, v)) + window(q * 0.5, k, v, window=6).sigmoid()

    compiled = torch.compile(block, fullgraph=True)
    for M, N in ((12, 21), (17, 9)):
        q, k, v = _tensors("causal", M, N)
        torch.testing.assert_close(compiled(q, k, v), block(q, k, v), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("name", ["alibi", "sliding_window", "moba"])
def test_reference_backend_is_the_reference_in_the_input_dtype(name, dtype):
    op = _op(name)
    tensors = [x.to(dtype) if x.dim() == 4 else x for x in _tensors(name)]
    params = {"window": 4} if name == "sliding_window" else {}
    got = op(*tensors, backend="reference", **params)
    assert got.dtype == dtype
    assert torch.equal(got, op.reference(*tensors, **params).to(dtype))


UNLOWERABLE = ["stick_breaking"]


def _unlowerable_call(name: str):
    op, mod = _op(name), load_example(name)
    extra = mod.extra_inputs(ef.Shape(B=1, Hq=4, M=12, N=21, E=16, Hkv=2)) if hasattr(mod, "extra_inputs") else {}
    return lambda q, k, v: op(q, k, v, **extra)


@pytest.mark.parametrize("name", UNLOWERABLE)
def test_unlowerable_op_raises_lowering_error_under_compile(name):
    call = _unlowerable_call(name)
    q, k, v = _tensors("causal")
    with pytest.raises(LoweringError, match=name):
        call(q, k, v)
    torch._dynamo.reset()
    with pytest.raises(LoweringError, match=name):
        torch.compile(call)(q, k, v)


def test_unlowerable_op_raises_lowering_error_under_fullgraph_compile():
    """Traced, the call goes to the custom op (its fake gives the shape); running it raises the LoweringError."""
    torch._dynamo.reset()
    with pytest.raises(LoweringError, match="stick_breaking"):
        torch.compile(_unlowerable_call("stick_breaking"), fullgraph=True)(*_tensors("causal"))
