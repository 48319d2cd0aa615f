"""The tolerance rule (docs/design.md §7) where plain PyTorch in the kernel's dtype overflows: its error is taken where
it is finite, so the tolerance stays a number; a kernel output that is not finite still fails."""

import math

import torch

from einflash.testing import judge


def test_an_overflowing_low_precision_reference_leaves_a_finite_tolerance():
    exact = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    lowp = torch.tensor([1.0, float("nan"), 3.0078125], dtype=torch.float64)
    verdict = judge(torch.tensor([1.0, 2.0, 3.0], dtype=torch.bfloat16), exact, lowp)
    assert math.isfinite(verdict.tolerance) and verdict.lowp_error == 0.0078125 and verdict.ok


def test_a_kernel_output_that_is_not_finite_fails_whatever_the_reference():
    exact = torch.tensor([1.0, 2.0], dtype=torch.float64)
    lowp = torch.tensor([float("inf"), 2.0], dtype=torch.float64)
    verdict = judge(torch.tensor([float("inf"), 2.0], dtype=torch.float16), exact, lowp)
    assert verdict.max_error == float("inf") and not verdict.ok
