"""The tolerance rule (docs/design.md §7) where plain PyTorch in the kernel's dtype overflows: its error is taken where
it is finite, so the tolerance stays a number; where it overflowed, the float32 run's error scaled to the dtype stands
in for it; a kernel output that is not finite still fails. A gradient's error may also include what the backward's
row term's rounding moves it by (row_term_allowance), and no more."""

import math

import torch
from catalogue import load_example

import einflash as ef
from einflash.testing import (
    check_gradients,
    judge,
    judge_gradient,
    lowp_error,
    random_inputs,
    recompute_allowance,
    reference_gradients,
    rounding_allowance,
    row_term_allowance,
    tolerance_floor,
)


def test_an_overflowing_low_precision_reference_leaves_a_finite_tolerance():
    exact = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    lowp = torch.tensor([1.0, float("nan"), 3.0078125], dtype=torch.float64)
    verdict = judge(torch.tensor([1.0, 2.0, 3.0], dtype=torch.bfloat16), exact, lowp)
    assert math.isfinite(verdict.tolerance) and verdict.lowp_error == 0.0078125 and verdict.ok


def test_a_kernel_output_that_is_not_finite_fails_where_the_dtype_holds_the_maths():
    exact = torch.tensor([1.0, 2.0], dtype=torch.float64)
    lowp = torch.tensor([1.0, 2.0], dtype=torch.float64)
    verdict = judge(torch.tensor([float("inf"), 2.0], dtype=torch.float16), exact, lowp)
    assert verdict.max_error == float("inf") and not verdict.ok


def test_a_kernel_output_that_is_not_finite_where_the_dtype_overflows_too_is_its_answer():
    # the same maths in the kernel's dtype (after the float32 stand-in, for fp16) left the range there
    exact = torch.tensor([1.0, 2.0], dtype=torch.float64)
    lowp = torch.tensor([float("nan"), 2.0], dtype=torch.float64)
    assert judge(torch.tensor([float("nan"), 2.0]), exact, lowp).ok
    assert not judge(torch.tensor([float("nan"), float("inf")]), exact, lowp).ok


def test_a_gradient_that_overflows_in_fp16_is_held_to_the_float32_error_scaled_to_fp16():
    # causal linear attention's decay gradient sums decay^(m−n) terms over every pair: in fp16 PyTorch overflows
    # (was: no error to measure, the tolerance its floor alone, and an H100 check failed a 0.4% error)
    op = load_example("causal_linear").causal_linear
    inputs = random_inputs(op, ef.Shape(1, 2, 256, 256, 16), dtype=torch.float16)
    grad_output = torch.randn(1, 2, 256, 16, generator=torch.Generator().manual_seed(0)).half()
    lowp = reference_gradients(op, grad_output, **inputs, dtype=torch.float16)["decay"]
    assert not torch.isfinite(lowp).any()
    exact = reference_gradients(op, grad_output, **inputs)
    verdict = check_gradients(op, exact, grad_output, **inputs)["decay"]  # the exact gradient itself: error 0
    wide = reference_gradients(op, grad_output, **inputs, dtype=torch.float32)["decay"].double()
    scale = torch.finfo(torch.float16).eps / torch.finfo(torch.float32).eps
    stood_in = float((wide - exact["decay"]).abs().max()) * scale
    assert stood_in > 0 and math.isclose(verdict.lowp_error, stood_in, rel_tol=1e-9)


def test_the_row_term_allowance_stays_below_the_floor_for_plain_softmax():
    op = load_example("softmax").softmax
    inputs = random_inputs(op, ef.Shape(1, 2, 64, 64, 32), dtype=torch.float16)
    grad_output = torch.randn(1, 2, 64, 32, generator=torch.Generator().manual_seed(0)).half()
    allowance = row_term_allowance(op, grad_output, **inputs, dtype=torch.float16)
    exact = reference_gradients(op, grad_output, **inputs)
    magnitude = max(float(g.abs().max()) for g in exact.values())
    assert all(float(a.max()) < tolerance_floor(torch.float16, magnitude) for a in allowance.values())


def test_the_recompute_allowance_stays_below_the_floor_for_plain_softmax():
    op = load_example("softmax").softmax
    inputs = random_inputs(op, ef.Shape(1, 2, 64, 64, 32), dtype=torch.float16)
    grad_output = torch.randn(1, 2, 64, 32, generator=torch.Generator().manual_seed(0)).half()
    allowance = recompute_allowance(op, grad_output, **inputs)
    exact = reference_gradients(op, grad_output, **inputs)
    magnitude = max(float(g.abs().max()) for g in exact.values())
    assert all(float(a.max()) < tolerance_floor(torch.float16, magnitude) for a in allowance.values())


def test_a_doubly_exponentiated_softmax_gradient_is_allowed_its_recomputed_scores_and_no_more():
    # the fuzzer's case: exp(exp(s)) with s near 2.5 moves the exponent by ~0.8 when the backward's q·k differs
    # from the forward's in the last bit; the allowance measures that on the reference, and a wrong dv beyond fails
    @ef.attention
    def doubly(q, k, v):
        return ef.softmax(ef.exp(ef.exp(q @ k * ef.scale)), "n") @ v

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 3, 16, generator=g).half(), torch.randn(1, 1, 33, 16, generator=g).half()
    v, grad_output = torch.randn(1, 1, 33, 8, generator=g).half(), torch.randn(1, 1, 3, 8, generator=g).half()
    exact = reference_gradients(doubly, grad_output, q, k, v)
    moved = float(recompute_allowance(doubly, grad_output, q, k, v)["v"].max())
    assert moved > tolerance_floor(torch.float16, max(float(x.abs().max()) for x in exact.values()))
    assert check_gradients(doubly, exact, grad_output, q, k, v)["v"].ok
    wrong = dict(exact, v=exact["v"] + 2 * moved + 0.05)
    assert not check_gradients(doubly, wrong, grad_output, q, k, v)["v"].ok


def test_a_slope_gradient_wrong_beyond_the_row_term_allowance_fails(slope_under_a_two_key_window):
    op, grad_output, inputs = slope_under_a_two_key_window
    exact = reference_gradients(op, grad_output, **inputs)
    allowance = float(row_term_allowance(op, grad_output, **inputs, dtype=torch.float16)["slope"].max())
    assert 0 < allowance < 0.01 * float(exact["slope"].abs().max())  # a decode-offset sum, not a blanket
    assert check_gradients(op, exact, grad_output, **inputs)["slope"].ok
    wrong = dict(exact, slope=exact["slope"] + 2 * allowance + 0.02)
    verdict = check_gradients(op, wrong, grad_output, **inputs)["slope"]
    assert not verdict.ok and verdict.allowance >= allowance


def test_a_normaliser_without_a_log_sum_exp_has_no_row_term_allowance():
    op = load_example("causal_linear").causal_linear
    inputs = random_inputs(op, ef.Shape(1, 2, 16, 16, 8), dtype=torch.float16)
    grad_output = torch.randn(1, 2, 16, 8, generator=torch.Generator().manual_seed(0)).half()
    assert op.lse_error is not None
    assert all(not a.any() for a in row_term_allowance(op, grad_output, **inputs, dtype=torch.float16).values())


def test_a_gradient_overflows_only_where_its_allowance_leaves_the_dtype():
    want, lowp = torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    got = torch.tensor([float("inf"), 0.0], dtype=torch.float16)
    assert judge_gradient(got, want, lowp, 1.0, lambda: torch.tensor([1e7, 0.0], dtype=torch.float64)).ok
    assert not judge_gradient(got, want, lowp, 1.0, lambda: torch.tensor([1e3, 0.0], dtype=torch.float64)).ok


def test_once_even_fp32_leaves_the_range_a_gradient_may_be_nan_anywhere_but_not_wrongly_finite():
    want = torch.tensor([0.0, 1.0], dtype=torch.float64)
    lowp = torch.tensor([0.0, float("nan")], dtype=torch.float64)  # the stand-in: fp32 overflowed at one entry
    none = torch.zeros(2, dtype=torch.float64)
    assert judge_gradient(torch.tensor([float("nan"), float("nan")]), want, lowp, 1.0, lambda: none).ok
    assert not judge_gradient(torch.tensor([float("nan"), 5.0]), want, lowp, 1.0, lambda: none).ok


def test_the_rounding_allowance_is_of_the_size_of_pytorchs_own_error_for_plain_softmax():
    # every intermediate rounded once: a few eps(fp32) of the terms |p·v|, as PyTorch's fp32 error is (0.5 to 2.4
    # times it measured); it widens the rule where the maths amplifies a rounding, not for plain maths
    op = load_example("softmax").softmax
    inputs = random_inputs(op, ef.Shape(1, 2, 64, 64, 32), dtype=torch.float32)
    allowance = rounding_allowance(op, **inputs)
    exact = op.reference(**inputs)
    pytorch = lowp_error(op.reference(**inputs, dtype=torch.float32).double(), exact)
    assert 0 < float(allowance.max()) < 4 * pytorch


def test_an_output_is_held_to_the_rule_beyond_the_rounding_allowance_and_no_further():
    exact = torch.tensor([1.0, 2.0], dtype=torch.float64)
    lowp = torch.tensor([1.0 + 2**-20, 2.0], dtype=torch.float64)
    out = torch.tensor([1.0, 2.0 + 2**-18])
    tol = 2 * 2**-20 + tolerance_floor(torch.float32, 2.0)
    assert not judge(out, exact, lowp).ok  # 2^-18 is outside twice PyTorch's error plus the floor
    moved = torch.tensor([0.0, 2**-18 - tol / 2], dtype=torch.float64)
    assert judge(out, exact, lowp, lambda: moved).ok
    assert not judge(out, exact, lowp, lambda: moved / 4).ok
