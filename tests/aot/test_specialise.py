"""einflash's specialisation rule is Triton's: each argument value is specialised as the JIT's own function does."""

from __future__ import annotations

import pytest
import torch
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import BaseBackend

from einflash.compiler.aot.specialise import ArgSpec, common, first_misfit, of_value
from einflash.errors import LoweringError

VALUES = [
    1,
    0,
    2,
    16,
    17,
    -16,
    48,
    2**31 - 16,
    2**31,
    2**40,
    2**63,
    0.5,
    1.0,
    None,
    True,
    False,
    torch.empty(8),
    torch.empty(8, dtype=torch.float16)[1:],
    torch.empty(8, dtype=torch.bfloat16),
    torch.empty(4, dtype=torch.int32),
    torch.empty(4, dtype=torch.int8),
    torch.empty(4, dtype=torch.float64),
]


def _id(x) -> str:
    """A test id that does not read a tensor's (uninitialised) values: pytest-xdist's workers must agree on ids."""
    if isinstance(x, torch.Tensor):
        return f"tensor({x.dtype}, {tuple(x.shape)}, offset {x.storage_offset()})"
    return repr(x)


@pytest.mark.parametrize("x", VALUES, ids=_id)
def test_specialisation_is_the_jits(x):
    kind, attr = native_specialize_impl(BaseBackend, x, False, True, True)
    spec = of_value("x", x)
    assert spec.type == kind
    if kind == "constexpr":
        assert spec.value is attr or spec.value == attr
    else:
        assert spec.divisible == (attr == "D")


def test_a_binary_fits_the_values_its_assumptions_hold_for():
    specs = (ArgSpec("M", "i32", divisible=True), ArgSpec("stride_q_3", "constexpr", 1), ArgSpec("p", "fp32"))
    assert first_misfit(specs, {"M": 32, "stride_q_3": 1, "p": 0.5}) is None
    assert "compiled for multiples of 16; got 33" in first_misfit(specs, {"M": 33, "stride_q_3": 1, "p": 0.5})
    assert "q's last dimension must be contiguous" in first_misfit(specs, {"M": 32, "stride_q_3": 3, "p": 0.5})
    assert "does not fit the compiled i32" in first_misfit(specs, {"M": 2**32, "stride_q_3": 1, "p": 0.5})
    assert "are not the launch's" in first_misfit(specs, {"M": 32})
    loose = (ArgSpec("M", "i32"), ArgSpec("stride_q_3", "constexpr", 1), ArgSpec("p", "fp32"))
    assert first_misfit(loose, {"M": 1, "stride_q_3": 1, "p": 0.5}) is None  # 1 passes as a runtime integer
    tensor = (ArgSpec("k_ptr", "*fp16", divisible=True),)
    assert "k must be fp16 (float16); got torch.float32" in first_misfit(tensor, {"k_ptr": torch.empty(4)})


def test_common_keeps_what_all_agree_on_and_refuses_what_cannot_be_shared():
    a = (ArgSpec("q_ptr", "*fp16", divisible=True), ArgSpec("N", "i32", divisible=True), ArgSpec("T", "constexpr", 1))
    b = (ArgSpec("q_ptr", "*fp16", divisible=True), ArgSpec("N", "i64"), ArgSpec("T", "i32", divisible=True))
    assert common(a, b) == (a[0], ArgSpec("N", "i64"), ArgSpec("T", "i32"))
    with pytest.raises(LoweringError, match="one binary cannot serve them all"):
        common((ArgSpec("q_ptr", "*fp16"),), (ArgSpec("q_ptr", "*fp32"),))
