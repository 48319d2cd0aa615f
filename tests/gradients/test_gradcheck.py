"""torch.autograd.gradcheck in float64 under the interpreter: the kernels' analytical gradients against finite
differences of the kernels themselves, for every one-pass catalogue variant and every floating-point input
(fast mode: one random direction per input), and in full for one variant at a tiny size."""

import dataclasses

import pytest
import torch
from gradient_cases import LOWERED, TRAINED_OWN, TUNED, frozen, inputs, op

import einflash as ef

pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
]

SHAPE = ef.Shape(B=1, Hq=2, M=9, N=11, E=16, F=16, Hkv=1)


def _check(name: str, shape: ef.Shape, fast: bool) -> None:
    given, params = inputs(name, shape, torch.float64), TUNED.get(name, {})
    floats = [k for k, v in given.items() if v.is_floating_point() and k not in frozen(name)]
    fixed = {k: v for k, v in given.items() if k not in floats}

    def fn(*xs):
        return op(name)(**dict(zip(floats, xs)), **fixed, **params)

    leaves = tuple(given[k].clone().requires_grad_() for k in floats)
    assert torch.autograd.gradcheck(fn, leaves, fast_mode=fast, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("name", LOWERED + TRAINED_OWN)
def test_gradcheck(name):
    _check(name, SHAPE, fast=True)


def test_gradcheck_every_element():
    _check("alibi", dataclasses.replace(SHAPE, Hq=2, M=3, N=4, E=4, F=3), fast=False)
