"""Declarations the fuzzer (einflash.fuzz) or a user found einflash getting wrong, each kept as a test: the kernel
now matches the float64 reference under the tolerance rule, or the declaration is refused with a typed error."""

import pytest
import torch

import einflash as ef
from einflash.errors import DeclarationError, DTypeError, LoweringError
from einflash.testing import check, check_gradients, judge, rounding_allowance


def _masked(predicate):
    @ef.attention
    def masked(q, k, v, window: int = 5):
        s = ef.mask(q @ k * ef.scale, predicate(window))
        return ef.softmax(s, "n") @ v

    return masked


def _qkv(M=13, N=21, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(1, 2, M, D, generator=g),
        torch.randn(1, 2, N, D, generator=g),
        torch.randn(1, 2, N, D, generator=g),
    )


MASKS = {
    # a sub-expression used twice: the end-aligned position of a query in a cache (was: CascadeError)
    "shared end-aligned window": lambda w: (lambda qp: (ef.n <= qp) & (qp - ef.n < w))(ef.m + ef.N - ef.M),
    # floor division and remainder of coordinates (was: an interpreter error, and % a TypeError)
    "block diagonal": lambda w: ef.n // 4 == ef.m // 4,
    "dilated window": lambda w: ((ef.m - ef.n) % 3 == 0) & (ef.n <= ef.m),
    "negative floor division": lambda w: (ef.n - ef.m) // w >= -1,
    # a coordinate between constants: one unsigned comparison with a Python int (was, fuzzer's final run of the
    # fourth session: `(1).to(tl.uint32)`, an interpreter error)
    "a key between constants": lambda w: (ef.n >= 0) & (ef.n <= 0),
    "a key window between constants": lambda w: (ef.n >= 2) & (ef.n <= 6),
    # predicates of constants (was: an interpreter error)
    "constant true": lambda w: (ef.m <= ef.m) & (0 <= 0),
    "comparison of extents": lambda w: (ef.n <= ef.m) | (ef.N < ef.M),
    "extents compared to themselves": lambda w: ef.M <= ef.M,
}


@pytest.mark.parametrize("name", MASKS)
def test_masks_the_kernel_computes_right(name):
    op = _masked(MASKS[name])
    args = _qkv()
    assert check(op, op(*args), *args).ok


def test_a_softmax_over_the_query_rank_is_refused():
    """It was normalised within each query tile (errors up to 2.9 once M exceeds a tile)."""

    @ef.attention
    def slots(q, k, v):
        return ef.softmax(q @ k * ef.scale, "m") @ v

    with pytest.raises(LoweringError, match="reduction over the query rank m"):
        slots(*_qkv(M=40))
    assert slots(*_qkv(M=40), backend="reference").shape == (1, 2, 40, 16)


def test_division_by_a_written_zero_is_refused_at_its_line():
    with pytest.raises(DeclarationError, match=r"test_regressions.py:\d+: // by 0"):

        @ef.attention
        def by_zero(q, k, v):
            return ef.softmax(ef.mask(q @ k, ef.m // 0 == 1), "n") @ v


def test_bfloat16_on_the_interpreter_is_refused():
    """The interpreter computes bf16 wrongly: a call returned values around 1e8 without a word."""
    op = _masked(lambda w: ef.n <= ef.m)
    q, k, v = (x.bfloat16() for x in _qkv())
    with pytest.raises(DTypeError, match="bfloat16 kernels cannot run on Triton's CPU interpreter"):
        op(q, k, v)
    assert op(q, k, v, backend="reference").dtype == torch.bfloat16


def test_an_output_gated_by_the_log_sum_exp_has_its_gradients():
    """A row value read beside the max (sigmoid(top + log(den) − sink)) was taken for a function of the max alone,
    and the output for invariant: every gradient was 0."""
    from einflash.testing import check_gradients

    @ef.attention
    def gated(q, k, v, sink: float = 0.5):
        s = ef.mask(q @ k * ef.scale, ef.n <= ef.m)
        top = s.max("n")
        e = ef.exp(s - top)
        den = e.sum("n")
        return ((e / den) @ v) * ef.sigmoid(top + ef.log(den) - sink)

    q, k, v = (x.requires_grad_() for x in _qkv(M=13, N=13))
    out = gated(q, k, v)
    d_o = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    out.backward(d_o)
    verdicts = check_gradients(gated, {"q": q.grad, "k": k.grad, "v": v.grad}, d_o, q, k, v)
    assert all(v.ok for v in verdicts.values()) and float(q.grad.abs().max()) > 0


NAN_ROW_MASKS = {
    "causal": lambda w: ef.n <= ef.m,
    "end-aligned causal": lambda w: ef.n <= ef.m + ef.N - ef.M,
    "sliding window": lambda w: (ef.n <= ef.m) & (ef.m - ef.n < w),
    "window and sinks": lambda w: (ef.n <= ef.m) & ((ef.m - ef.n < w) | (ef.n < 2)),
    "no mask": lambda w: ef.n >= 0,
}


@pytest.mark.parametrize("M", [13, 1], ids=["prefill", "decode"])
@pytest.mark.parametrize("name", NAN_ROW_MASKS)
def test_a_nan_in_a_query_row_gives_nan_there_as_the_reference_does(name, M):
    # was: a masked variant's row took its NaN scores for masked ones, 0 output and log-sum-exp −inf
    op = _masked(NAN_ROW_MASKS[name])
    q, k, v = _qkv(M=M)
    q[0, 1, M // 2, 3] = float("nan")
    out, exact = op(q, k, v), op.reference(q, k, v)
    assert exact.isnan().any() and torch.equal(out.isnan(), exact.isnan())
    assert torch.allclose(out[~exact.isnan()].double(), exact[~exact.isnan()], atol=1e-4)


def _fp16_gradients_hold(op, seed: int, M: int, N: int, D: int, slope: bool) -> bool:
    """Seeded fp16 q, k, v (and a per-head slope) of [1, 2, ·, D]: every gradient of ``op`` within the rule."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, n, D, generator=g).half() for n in (M, N, N))
    extra = {"slope": torch.randn(2, generator=g).half()} if slope else {}
    grad_output = torch.randn(1, 2, M, D, generator=g).half()
    leaves = {name: x.clone().requires_grad_() for name, x in dict(q=q, k=k, v=v, **extra).items()}
    op(**leaves).backward(grad_output)
    grads = {name: x.grad for name, x in leaves.items()}
    return all(v.ok for v in check_gradients(op, grads, grad_output, q, k, v, **extra).values())


def test_the_gradient_of_a_softmax_of_exponentiated_scores_in_fp16():
    # was (fuzzer): dq 1.3× the tolerance, because PyTorch's fp16 gradient overflows at some entries and the
    # rule measured its error only where it did not; the float32 error scaled to fp16 stands in there now
    @ef.attention
    def exp_scores(q, k, v):
        return ef.softmax(ef.exp(q @ k * ef.scale * 3.0), "n") @ v

    assert _fp16_gradients_hold(exp_scores, seed=5, M=3, N=33, D=4, slope=False)


def test_the_gradient_of_a_softmax_of_exponentiated_biased_scores_in_fp16():
    # was (fuzzer): scores near 13, exp gives ~5e5 and the softmax is one-hot, so every exact gradient but dv is
    # ~1e-191; the backward's dS = p·(dP − Δ) cancels the row term Δ = Σ dO·O against dP, two float32 sums in
    # different orders, to ~1e-7·|dP| instead of 0, and the chain through exp multiplies that by 5e5 (dslope 1.8).
    # Every FlashAttention-form backward does this; the rule now allows the row term's rounding
    # (row_term_allowance), which autograd's Σ p·dP from the same dP does not have
    @ef.attention
    def exp_biased(q, k, v, slope: ef.Tensor["h"]):  # noqa: F821 -- a rank name, einflash's DSL
        return ef.softmax(ef.exp(q @ k * ef.scale + slope * (ef.n - ef.m)), "n") @ v

    assert _fp16_gradients_hold(exp_biased, seed=8, M=4, N=9, D=16, slope=True)


def test_the_slope_gradient_under_a_two_key_window_in_fp16(slope_under_a_two_key_window):
    # was (fuzzer, both long runs): dslope = Σ dS·(n − m) at end-aligned offsets of 4 and 5 sums the row term's
    # rounding (Δ from the fp16 output) times the offset, 1.3× the tolerance; within the row-term allowance now
    op, grad_output, inputs = slope_under_a_two_key_window
    leaves = {name: x.clone().requires_grad_() for name, x in inputs.items()}
    op(**leaves).backward(grad_output)
    grads = {name: x.grad for name, x in leaves.items()}
    assert all(v.ok for v in check_gradients(op, grads, grad_output, **inputs).values())


def test_a_softmax_of_doubly_exponentiated_scores_that_leaves_fp32_is_held_to_fp32():
    # was (fuzzer): exp(exp(2s)) with s near 3 is ~1e175, finite in float64 and inf in fp32, so the kernel's row is
    # NaN (inf − inf) as plain PyTorch's in fp32 is; the rule took any non-finite output for an error
    @ef.attention
    def doubly(q, k, v):
        return ef.softmax(ef.exp(ef.exp(q @ k * ef.scale * 2.0)), "n") @ v

    q, k, v = torch.zeros(1, 1, 2, 16), torch.zeros(1, 1, 8, 16), torch.randn(1, 1, 8, 16)
    q[0, 0, 0, 0], q[0, 0, 1, 0] = 4.0, 1.0
    k[0, 0, :3, 0] = torch.tensor([3.0, 2.9, 2.8])  # row 0: scores 3.0, 2.9, 2.8 leave fp32; row 1 stays in it
    out, exact = doubly(q, k, v), doubly.reference(q, k, v)
    assert exact.isfinite().all() and out[0, 0, 0].isnan().all() and out[0, 0, 1].isfinite().all()
    assert check(doubly, out, q, k, v).ok
    wrong = out.clone()
    wrong[0, 0, 0] = 0.0  # a finite number where the dtype has none is still measured
    assert not check(doubly, wrong, q, k, v).ok


def test_the_gradient_of_a_softmax_of_doubly_exponentiated_scores_in_fp16():
    # was (fuzzer, final run): dv 4.4× the tolerance. The backward's recomputed q·k differs from the forward's in
    # the last bit, and exp(exp(s)) at s ≈ 2.5 turns that into ~0.8 in the exponent the forward's log-sum-exp
    # normalises; the rule now allows what that recomputation moves (recompute_allowance), as it does the row term
    @ef.attention
    def doubly(q, k, v):
        return ef.softmax(ef.exp(ef.exp(q @ k * ef.scale)), "n") @ v

    g = torch.Generator().manual_seed(0)  # the fuzzer's shape: one head, E 16, F 8
    q, k = torch.randn(1, 1, 3, 16, generator=g).half(), torch.randn(1, 1, 33, 16, generator=g).half()
    v, grad_output = torch.randn(1, 1, 33, 8, generator=g).half(), torch.randn(1, 1, 3, 8, generator=g).half()
    leaves = {name: x.clone().requires_grad_() for name, x in dict(q=q, k=k, v=v).items()}
    doubly(**leaves).backward(grad_output)
    grads = {name: x.grad for name, x in leaves.items()}
    assert all(v.ok for v in check_gradients(doubly, grads, grad_output, q, k, v).values())


def test_a_doubly_exponentiated_gradient_that_overflows_fp16_where_its_allowance_does():
    # was (fuzzer, final run): a one-hot row of exp(exp(s + bias)) (x ≈ 1e12); the backward's row-term noise times
    # x·exp(s) is ~1e7, past fp16's 65504, so dq came back ±inf where the exact gradient is 0. The allowance
    # admits values that do not fit fp16, so their overflow is one of them. Whether the noise overflows depends on
    # the machine's rounding (on some the kernel's dq is exactly 0), so the overflow itself is also given
    @ef.attention
    def doubly(q, k, v, bias: ef.Tensor["h m n"]):
        return ef.softmax(ef.exp(ef.exp(q @ k * ef.scale + bias)), "n") @ v

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, n, 8, generator=g).half() for n in (1, 16, 16))
    bias = torch.randn(1, 1, 16, generator=g).half()
    grad_output = torch.randn(1, 1, 1, 8, generator=torch.Generator().manual_seed(1)).half()
    leaves = {name: x.clone().requires_grad_() for name, x in dict(q=q, k=k, v=v, bias=bias).items()}
    doubly(**leaves).backward(grad_output)
    grads = {name: x.grad for name, x in leaves.items()}
    overflowed = grads | {"q": torch.full_like(grads["q"], float("inf"))}
    for given in (grads, overflowed):
        verdicts = check_gradients(doubly, given, grad_output, q, k, v, bias=bias)
        assert all(v.ok for v in verdicts.values())


def _softmax_program(shape, transforms):
    """The fuzzer's Program for ``softmax(t(q @ k * scale), "n") @ v``: ``transforms`` are (source, torch function)
    pairs applied to the scores in order."""
    from einflash import fuzz

    p = fuzz.Program(shape)

    def assign(name, src, fn):
        p.lines.append(f"{name} = {src}")
        p.steps.append(lambda env, name=name, fn=fn: env.__setitem__(name, fn(env)))

    scale = shape.E**-0.5
    assign("s", "q @ k * ef.scale", lambda env: torch.einsum("bhme,bhne->bhmn", env["q"], env["k"]) * scale)
    p.steps.append(lambda env: env.update(keep=torch.ones(env["s"].shape, dtype=torch.bool)))
    for src, fn in transforms:
        assign("s", src, lambda env, fn=fn: fn(env["s"]))
    assign("p", 'ef.softmax(s, "n")', lambda env: fuzz._softmax(env["s"], env["keep"], -1))
    assign("o", "p @ v", lambda env: torch.einsum("bhmn,bhnf->bhmf", env["p"], env["v"]))
    return p


def test_a_gradient_whose_maths_leaves_fp32_is_the_dtypes_answer_anywhere_in_it():
    # was (fuzzer, final run): exp(exp(2s)) reaches e^253 (inf in fp32), so the kernel's row is NaN, while plain
    # PyTorch's softmax still gives 0 at the keys whose weight underflows; which entries stay finite is its
    # formula's accident, so once even fp32 overflows the kernel's NaN entries are held to be the dtype's answer
    from einflash import fuzz

    shape = fuzz.Shape(B=1, Hkv=1, group=1, M=1, N=16, E=8, F=8)
    p = _softmax_program(shape, [("ef.exp(ef.exp(s * 2.0))", lambda s: torch.exp(torch.exp(s * 2.0)))])
    assert fuzz.check(p).stage == "gradients"  # every gradient judged, none a defect


def test_the_fuzzers_incoming_gradient_has_the_outputs_shape_where_its_maths_overflows():
    # was (fuzzer, final run): where the output overflows even in float64 the check compares the finite entries
    # only, and the incoming gradient was drawn at the shape of those (16 of 24): an untyped RuntimeError
    from einflash import fuzz

    shape = fuzz.Shape(B=1, Hkv=1, group=1, M=3, N=1, E=8, F=8)
    p = _softmax_program(shape, [("ef.exp(ef.exp(ef.exp(s)))", lambda s: torch.exp(torch.exp(torch.exp(s))))])
    assert fuzz.check(p).stage == "gradients"


def test_the_base2_exponent_of_scores_with_a_large_additive_term_in_fp32():
    # was (fuzzer, final run): the base-2 rewrite scaled x = exp(s/4) + slope·(n − m) (up to ~28) by log2 e before
    # the maximum was subtracted, one rounding of eps(fp32)·|x| more than PyTorch's exp(x − max): 2.3× its error
    @ef.attention
    def exp_plus_slope(q, k, v, slope: ef.Tensor["h"]):  # noqa: F821 -- a rank name
        return ef.softmax(ef.exp(q @ k * ef.scale / 4.0) + slope * (ef.n - ef.m), "n") @ v

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 1, n, 8, generator=g) for n in (1, 40, 40))
    slope = torch.rand(1, generator=g)
    out = exp_plus_slope(q, k, v, slope)
    exact = exp_plus_slope.reference(q, k, v, slope=slope)
    lowp = exp_plus_slope.reference(q, k, v, slope=slope, dtype=torch.float32).double()
    assert judge(out, exact, lowp).ok  # within twice PyTorch's error with no allowance for the scores' rounding


def _doubly_exponentiated_fp16_gradients(op, M: int, N: int, **params) -> dict:
    """The fuzzer's inputs (Program.inputs(seed=0) at B = H = 1, E = F = 8, then fp16) and incoming gradient."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, n, 8, generator=g).half() for n in (M, N, N))
    d_o = torch.randn(1, 1, M, 8, generator=torch.Generator().manual_seed(1)).half()
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    op(*leaves, **params).backward(d_o)
    grads = {name: x.grad for name, x in zip("qkv", leaves)}
    return check_gradients(op, grads, d_o, q, k, v, **params)


def test_a_doubly_exponentiated_score_near_the_float32_maximum_keeps_its_gradients_finite():
    # was (fuzzer, final run): dv = inf at M 40, N 5: exp(exp(s)) between 2.4e38 and 3.4e38 times log2 e overflowed
    # float32 before the maximum was subtracted (exp2(inf − inf)); the maximum now comes off first
    @ef.attention
    def doubly(q, k, v):
        return ef.softmax(ef.exp(ef.exp(q @ k * ef.scale)), "n") @ v

    assert all(v.ok for v in _doubly_exponentiated_fp16_gradients(doubly, 40, 5).values())


def test_a_gradient_the_float64_maths_overflows_is_judged_where_it_is_finite():
    # was (fuzzer, final run): with one key in the window exp(exp(2s)) overflows even in float64, so the exact
    # gradient held NaN and the rule compared NaN (a failure at every tolerance); where the maths has no number
    # there is nothing to compare, as for outputs, and the rule holds elsewhere
    @ef.attention
    def one_key(q, k, v, window: int = 1):
        qp = ef.m + ef.N - ef.M
        s = ef.exp(ef.exp(q @ k * ef.scale * 2.0))
        return ef.softmax(ef.mask(s, (ef.n <= qp) & (qp - ef.n < window)), "n") @ v

    verdicts = _doubly_exponentiated_fp16_gradients(one_key, 3, 1)
    assert all(v.ok for v in verdicts.values())
    assert all(v.max_error == v.max_error for v in verdicts.values())  # no NaN: the exact NaNs are left out


def test_softmax_of_thrice_tripled_scores_in_fp32():
    # was (fuzzer, the fourth session's final run): 6.1e-6 where the rule allowed 5.9e-6. The kernel folds
    # scale·27·log2 e into one constant and sums q·k in its own order; the scores reach ~100, so each differs from
    # PyTorch's by ~eps·100 and PyTorch's own error happened to be smaller at the worst entry. The rule now admits
    # what moving q and k by eps(fp32) moves the output (rounding_allowance), and no more
    from einflash import fuzz

    shape = fuzz.Shape(B=1, Hkv=2, group=1, M=40, N=16, E=8, F=8)
    p = _softmax_program(shape, [("s * 3.0", lambda s: s * 3.0)] * 3)
    inputs = p.inputs(0, torch.float32)
    op = fuzz.load(p.source("tripled"), "tripled")
    out, exact = op(**inputs), op.reference(**inputs)
    lowp = op.reference(**inputs, dtype=torch.float32).double()
    assert not judge(out, exact, lowp).ok  # the case: outside twice PyTorch's error without the allowance
    allowed = rounding_allowance(op, **inputs)
    assert judge(out, exact, lowp, lambda: allowed).ok
    assert float(allowed.max()) < 4 * float((out.double() - exact).abs().max())  # an allowance of its size only
    assert fuzz.check(p, gradients=False).stage == "forward"


def test_gradients_of_a_call_whose_float64_forward_left_its_range_accept_non_finite_entries():
    # was (fuzzer, this session's first long run): exp(exp(exp(s))) reaches 1e367 at one key, so float64's own
    # softmax row is NaN; plain PyTorch's formula (its maximum inf, replaced by 0) still gave dv = 0 at the keys
    # whose weight is finite/inf, the kernel NaN: which entries stay finite past float64's range is that formula's
    # accident, so the kernel's non-finite entries are the dtype's answer there, its finite ones still measured
    from einflash import fuzz

    shape = fuzz.Shape(B=1, Hkv=1, group=1, M=1, N=16, E=16, F=8)
    p = _softmax_program(shape, [("ef.exp(s / 1.0)", torch.exp)] * 3)
    assert not torch.isfinite(p.evaluate(p.inputs(0, torch.float16))).all()  # the case
    assert fuzz.check(p).stage == "gradients"


def test_a_renormalised_threshold_of_tanh_scores_in_fp32():
    # was (fuzzer, this session's third long run): 6.2e-5 where the rule allowed 4.8e-5. The weights of tanh scores
    # sit near 1/N ≈ 0.03, so relu(p − 0.05) keeps a few barely above the threshold, and their renormalisation
    # divides by that small sum: each weight's last-bit difference from PyTorch's (another order of exponentials
    # and sums) is amplified several times. The rule admits what rounding every intermediate by eps(fp32) moves
    # the output (rounding_allowance), and no more
    from einflash import fuzz

    shape = fuzz.Shape(B=2, Hkv=2, group=1, M=17, N=33, E=8, F=16)
    p = _softmax_program(shape, [("ef.tanh(s)", torch.tanh)])
    p.lines[-2:] = ['w = ef.relu(ef.softmax(s, "n") - 0.05)', 'p = w / w.sum("n")', "o = p @ v"]
    p.steps[-2:] = [
        lambda env: env.update(w=torch.relu(fuzz._softmax(env["s"], env["keep"], -1) - 0.05)),
        lambda env: env.update(p=env["w"] / env["w"].sum(-1, keepdim=True)),
        lambda env: env.update(o=torch.einsum("bhmn,bhnf->bhmf", env["p"], env["v"])),
    ]
    inputs = p.inputs(0, torch.float32)
    op = fuzz.load(p.source("renormed"), "renormed")
    out, exact = op(**inputs), op.reference(**inputs)
    assert torch.allclose(exact, p.evaluate(inputs), rtol=1e-9, atol=1e-12)  # the program is the maths above
    lowp = op.reference(**inputs, dtype=torch.float32).double()
    assert not judge(out, exact, lowp).ok  # the case: outside twice PyTorch's error without the allowance
    allowed = rounding_allowance(op, **inputs)
    assert judge(out, exact, lowp, lambda: allowed).ok
    assert float(allowed.max()) < 4 * float((out.double() - exact).abs().max())  # an allowance of its size only


def test_a_one_key_softmax_of_doubly_exponentiated_scores_in_fp16():
    # was (fuzzer, this session's fourth long run): with one key the weight is 1 and dS = dP − Δ is pure rounding,
    # which exp(exp(s)) (s ≈ 3.4: a slope of 7e13) carries past fp16's range in dq; the row term's allowance took
    # one eps(fp32) of Σ|dO·O| for the float32 sums where the backward's dP and Δ are two sums of F = 8 products,
    # and an entry whose allowance said 1e4 came out inf. The allowance now takes the textbook bound F·eps per sum
    from einflash import fuzz

    shape = fuzz.Shape(B=1, Hkv=1, group=2, M=40, N=1, E=20, F=8)
    p = _softmax_program(shape, [("ef.exp(s / 1.0)", torch.exp)] * 2)
    assert fuzz.check(p).stage == "gradients"


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="found by the fuzzer (eighth session, seed 2468), present before that session's change: dslope = "
    "Σ dS·(n − m) at decode offsets near N (29 to 32 under a window of 4 at M = 1, N = 33) exceeds the tolerance "
    "rule in fp16 beyond the row-term allowance (0.053 against 0.008 here); not investigated yet",
)
def test_the_slope_gradient_under_a_four_key_window_at_decode_in_fp16(slope_under_a_two_key_window):
    windowed_alibi = slope_under_a_two_key_window[0]  # the same declaration, its window given 4 here
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 2, 1, 8, generator=g).half()
    k, v = torch.randn(1, 1, 33, 8, generator=g).half(), torch.randn(1, 1, 33, 16, generator=g).half()
    inputs = dict(q=q, k=k, v=v, slope=torch.rand(2, generator=g).half())
    leaves = {name: x.clone().requires_grad_() for name, x in inputs.items()}
    out = windowed_alibi(**leaves, window=4)
    grad_output = torch.randn(out.shape, generator=g).half()
    out.backward(grad_output)
    grads = {name: x.grad for name, x in leaves.items()}
    assert all(v.ok for v in check_gradients(windowed_alibi, grads, grad_output, window=4, **inputs).values())


@ef.attention
def _decayed_keys_after(q, k, v, decay: ef.Tensor["h"]):  # noqa: F821
    """The fuzzer's linear family, 2026-12-07: feature maps, a decay, each row seeing the keys from its own on."""
    a = ef.exp(q * 0.5) @ ef.exp(k * 0.5)
    a = a * ef.exp((ef.n - ef.m) * ef.log(decay))
    return ef.mask(a, ef.n >= ef.m) @ v


def test_the_chunked_gradient_of_keys_after_each_row_in_fp16():
    """Past the chunked crossover (M = N = 96, E = F = 8) the backward of a mask n ≥ m ran its derived attentions
    with the masks of n ≤ m: q's gradient summed the wrong keys (inf in fp16, where the decay grows backwards)."""
    q, k, v = (x.half() for x in _qkv(96, 96, 8))
    decay = (0.7 + 0.3 * torch.rand(2, generator=torch.Generator().manual_seed(3))).half()
    assert _decayed_keys_after.forward.linear is not None
    leaves = {n: x.clone().requires_grad_() for n, x in (("q", q), ("k", k), ("v", v), ("decay", decay))}
    out = _decayed_keys_after(**leaves)
    d_o = torch.randn(out.shape, generator=torch.Generator().manual_seed(4)).half()
    out.backward(d_o)
    verdicts = check_gradients(_decayed_keys_after, {n: x.grad for n, x in leaves.items()}, d_o, q, k, v, decay)
    assert all(x.ok for x in verdicts.values()), verdicts


@ef.attention
def _normalised_decay(q, k, v, decay: ef.Tensor["h"]):  # noqa: F821
    a = ef.exp(q * 0.5) @ ef.exp(k * 0.5)
    a = ef.mask(a * ef.exp((ef.m - ef.n) * ef.log(decay)), ef.n <= ef.m)
    return (a @ v) / a.sum("n")


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="found by the fuzzer (twelfth session, seed 4242), the class of the slope test above: the decay's gradient "
    "Σ (m − n)·dS takes the row term Δ = Σ_f dO·O from the fp16 output, and rows far past the keys (m up to 95, "
    "N = 17) multiply its rounding by m where Σ_n dS cancels exactly; the kernel gives −30.7 where the exact "
    "gradient is 80.6 (plain torch's fp16 one is NaN). Fixes: Δ from an fp32 output kept for training, or the "
    "gradient cascade dropping m·Σ_n dS (zero for weights normalised by their row sum); neither built yet",
)
def test_a_decay_gradient_of_rows_far_past_the_keys_in_fp16():
    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(1, 1, 96, 16, generator=g),
        torch.randn(1, 1, 17, 16, generator=g),
        torch.randn(1, 1, 17, 16, generator=g),
    )
    inputs = {"q": q.half(), "k": k.half(), "v": v.half(), "decay": (0.7 + 0.3 * torch.rand(1, generator=g)).half()}
    leaves = {name: x.clone().requires_grad_() for name, x in inputs.items()}
    out = _normalised_decay(**leaves)
    grad_output = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).half()
    out.backward(grad_output)
    grads = {name: x.grad for name, x in leaves.items()}
    assert all(v.ok for v in check_gradients(_normalised_decay, grads, grad_output, **inputs).values())
