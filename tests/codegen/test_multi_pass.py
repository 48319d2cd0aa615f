"""Cascades of several passes over the keys: each pass a loop of the kernel (its own key-tile ranges from the mask
plan), checked against the float64 reference, forward and gradients; split-KV decoding refused with a typed
error."""

from unittest import mock

import pytest
import torch
from catalogue import load_example

import einflash as ef
from einflash.compiler.analysis.key_passes import count_passes
from einflash.compiler.codegen.forward import sections
from einflash.compiler.runtime import forward as forward_module
from einflash.compiler.schedule import Schedule
from einflash.errors import DifferentiationError, LoweringError
from einflash.ir.reference import bind_extents, bind_params
from einflash.testing import check, check_gradients

pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
]


@ef.attention
def causal_threshold(q, k, v, tau: float = 0.02):
    p = ef.softmax(ef.mask(q @ k * ef.scale, ef.n <= ef.m + ef.N - ef.M), "n")
    return ef.relu(p - tau) @ v


@ef.attention
def document_renorm(q, k, v, doc: ef.Tensor["b n"], tau: float = 0.02):
    here = ef.m + ef.N - ef.M
    p = ef.relu(ef.softmax(ef.mask(q @ k * ef.scale, (doc[ef.n] == doc[here]) & (ef.n <= here)), "n") - tau)
    return (p / p.sum("n")) @ v


@ef.attention
def twice_thresholded(q, k, v, tau: float = 0.02):
    p = ef.relu(ef.softmax(q @ k * ef.scale, "n") - tau)
    w = p / p.sum("n")  # a second threshold on the renormalised weights: the sum of the first is a second pass
    return ef.relu(w - 2 * tau) @ v


@ef.attention
def learned_threshold(q, k, v, tau: ef.Tensor["h"]):  # noqa: F821 -- a threshold per head that learns
    p = ef.relu(ef.softmax(q @ k * ef.scale, "n") - tau / ef.N)
    return (p / p.sum("n")) @ v


def _qkv(B, Hq, Hkv, M, N, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(B, Hq, M, D, generator=g),
        torch.randn(B, Hkv, N, D, generator=g),
        torch.randn(B, Hkv, N, D, generator=g),
    )


def test_each_loop_of_the_cascade_is_a_pass_of_the_kernel():
    op = load_example("post_norm_threshold").post_norm_threshold
    c = op.forward.rewritten
    assert [len(loop) > 0 for loop in sections(c).loops] == [True, True]
    assert count_passes(c).passes == 2 == op.explain().passes
    text = op.forward.source(torch.float32, op.forward.dims({"e": 16, "f": 16}), False).text
    assert text.count("# pass 2 over the keys") == 1 and "pass 3" not in text


def test_three_passes_lower_as_three_loops():
    c = twice_thresholded.forward.rewritten
    assert twice_thresholded.forward.error is None and sorted({e.loop for e in c.einsums}) == [0, 1, 2, 3]
    q, k, v = _qkv(2, 2, 2, 37, 45, 16)
    assert check(twice_thresholded, twice_thresholded(q, k, v), q, k, v).ok


@pytest.mark.parametrize("M, N", [(37, 45), (45, 37), (1, 77)])
def test_a_masked_two_pass_cascade_matches_the_reference(M, N):
    q, k, v = _qkv(2, 4, 2, M, N, 16)
    out = causal_threshold(q, k, v, schedule=Schedule(16, 16, 4, 1))
    assert check(causal_threshold, out, q, k, v).ok


def test_each_pass_visits_only_the_key_tiles_its_mask_plan_keeps():
    q, k, v = _qkv(1, 2, 2, 64, 64, 16)
    counts = []
    real = forward_module.launch

    def counting(*args, **kw):
        counts.append(real(*args, **kw, count_visits=True))

    c = causal_threshold.forward.rewritten
    inputs = {"q": q, "k": k, "v": v}
    extents = bind_extents(c, inputs, {})
    with mock.patch.object(forward_module, "launch", counting):
        causal_threshold.forward.run(inputs, bind_params(c, {}, extents), Schedule(16, 16, 4, 1), extents)
    # causal over 4 tiles of 16: query tile i sees key tiles 0..i, in each of the two passes
    assert counts[0][0, 0].tolist() == [2 * (i + 1) for i in range(4)]


def test_data_dependent_masks_share_their_tile_lists_across_passes():
    q, k, v = _qkv(2, 2, 1, 30, 50, 16)
    doc = torch.randint(0, 3, (2, 50), generator=torch.Generator().manual_seed(1)).sort(-1).values
    out = document_renorm(q, k, v, doc, schedule=Schedule(16, 16, 4, 1))
    assert check(document_renorm, out, q, k, v, doc=doc).ok


@pytest.mark.parametrize("name, tau", [("post_norm_threshold", 0.001), ("renorm_threshold", 0.9)])
def test_decoding_runs_both_passes_in_each_program_without_splits(name, tau):
    op = getattr(load_example(name), name)
    q, k, v = _qkv(2, 8, 2, 1, 300, 16)
    assert check(op, op(q, k, v, tau=tau), q, k, v, tau=tau).ok  # the default schedule: no split
    with pytest.raises(LoweringError, match="splits=1"):
        op(q, k, v, schedule=Schedule(16, 16, 4, 1, 3, True))
    assert check(op, op(q, k, v, tau=tau, schedule=Schedule(16, 16, 4, 1, 1, True)), q, k, v, tau=tau).ok


def test_a_jagged_batch_through_two_passes():
    q, k, v = _qkv(1, 4, 2, 16, 13, 16)
    cu_q, cu_k = torch.tensor([0, 5, 12, 16]), torch.tensor([0, 9, 13, 13])  # the last sequence has no key
    out = causal_threshold(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    want = causal_threshold(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, backend="reference")
    assert float((out - want).abs().max()) < 1e-5 and bool((out[:, :, 12:] == 0).all())


@pytest.mark.parametrize(
    "op, passes",
    [(causal_threshold, 1), (document_renorm, 1), (twice_thresholded, 2), (learned_threshold, 1)],
    ids=lambda x: str(x),
)
def test_multi_pass_gradients_make_a_pass_over_the_keys_per_key_term(op, passes):
    # the adjoint of a pass's row sum (Σ_n over the pairs of a later pass) is needed before any pair's
    # gradient: each such key term is one more pass of a keys kernel before the dK/dV and dQ kernels
    assert len(op.backward.cut(None).parts.keys) == passes == len(op.explain().backward["key_terms"])
    q, k, v = _qkv(1, 2, 1, 19, 23, 16, seed=1)
    given = dict(q=q, k=k, v=v)
    if op is document_renorm:
        given["doc"] = torch.tensor([[0] * 9 + [1] * 14])
    if op is learned_threshold:
        given["tau"] = torch.tensor([0.4, 0.8])
    leaves = {name: (x.clone().requires_grad_() if x.is_floating_point() else x) for name, x in given.items()}
    out = op(**leaves)
    d_o = torch.randn_like(out)
    out.backward(d_o)
    learning = {name for name, x in given.items() if x.is_floating_point()}
    verdicts = check_gradients(op, {name: leaves[name].grad for name in learning}, d_o, **given)
    assert set(verdicts) == learning and all(x.ok for x in verdicts.values()), verdicts


@ef.attention
def causal_top4(q, k, v):
    s = ef.mask(q @ k * ef.scale, ef.n <= ef.m + ef.N - ef.M)
    return ef.softmax(ef.mask(s, s >= s.kth_largest(4, "n")), "n") @ v


@pytest.mark.parametrize("M, N, block_n", [(37, 45, 16), (5, 77, 4), (1, 3, 16)])
def test_a_kth_largest_over_the_keys_streams_as_a_top_list(M, N, block_n):
    # a key tile narrower than the list (block_n 4 < 8 entries) is widened; rows with fewer than 4 keys keep all;
    # the first pass keeps the 5 largest, the second tests the scores against a cut between the 4th and 5th
    c = causal_top4.forward.rewritten
    assert sorted({e.loop for e in c.einsums}) == [0, 1, 2] and causal_top4.explain().passes == 2
    q, k, v = _qkv(2, 2, 1, M, N, 16)
    out = causal_top4(q, k, v, schedule=Schedule(16, block_n, 4, 1))
    assert check(causal_top4, out, q, k, v).ok


def test_top_k_gradients_test_the_scores_against_the_saved_list():
    # the dK/dV kernel contracts k·qᵀ: its scores round apart from the forward's, and the key at the 4th largest
    # would drop out of a test against the 4th largest itself
    _assert_trains(causal_top4, *_qkv(1, 2, 2, 21, 30, 16, seed=3))
    assert "only tests" in str(causal_top4.backward.gradient.invariant[0])


@ef.attention
def near_causal_max(q, k, v):
    s = ef.mask(q @ k * ef.scale, ef.n <= ef.m + ef.N - ef.M)
    return ef.softmax(ef.mask(s, s > s.max("n") - 1.0), "n") @ v


def test_a_mask_against_the_rows_maximum_makes_a_pass_of_its_own_and_trains():
    # the mask tests a running maximum: the softmax of what passes waits for the maximum's pass; only the test
    # reads that maximum, so it gets no gradient (the softmax's own maximum is proved shift-invariant)
    assert causal_top4.explain().passes == 2 == near_causal_max.explain().passes
    _assert_trains(near_causal_max, *_qkv(1, 2, 1, 19, 23, 16, seed=2))
    assert [x.tested for x in near_causal_max.backward.gradient.invariant] == [True, False]


@ef.attention
def above_top4(q, k, v):
    s = q @ k * ef.scale
    return ef.softmax(ef.mask(s, s > s.kth_largest(4, "n")), "n") @ v


@pytest.mark.parametrize("op", [causal_top4, above_top4], ids=["at_least", "strictly_above"])
def test_top_k_gradients_keep_tied_keys_together(op):
    # keys repeated 4 times tie their scores exactly, at the cut too: the dK/dV kernel's scores, rounded apart from
    # the forward's, must still fall on the same side of the cut (it lies a slack below, or above, a tie)
    q, k, v = _qkv(1, 2, 2, 16, 24, 16, seed=1)
    _assert_trains(op, q, k[:, :, torch.arange(24) % 6], v)


def _assert_trains(op, q, k, v):
    """The forward and the gradients of q, k and v within the tolerance rule."""
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    out = op(q, k, v)
    assert check(op, out, q, k, v).ok
    d_o = torch.randn_like(out)
    out.backward(d_o)
    verdicts = check_gradients(op, dict(q=q.grad, k=k.grad, v=v.grad), d_o, q=q, k=k, v=v)
    assert all(x.ok for x in verdicts.values()), verdicts


def test_a_kth_largest_of_fewer_values_than_k_is_minus_infinity():
    @ef.attention
    def above_top20(q, k, v):
        s = q @ k * ef.scale
        return ef.softmax(ef.mask(s, s > s.kth_largest(20, "n")), "n") @ v

    q, k, v = _qkv(1, 2, 2, 5, 8, 16)  # 8 keys: no 20th largest, every finite score passes
    out = above_top20(q, k, v)
    assert check(above_top20, out, q, k, v).ok
    torch.testing.assert_close(out, ef.attention(lambda q, k, v: ef.softmax(q @ k * ef.scale, "n") @ v)(q, k, v))


def test_a_test_against_its_own_maximum_has_no_backward():
    @ef.attention
    def at_max(q, k, v):
        s = q @ k * ef.scale
        return ef.softmax(ef.mask(s, s >= s.max("n")), "n") @ v

    q, k, v = (x.requires_grad_() for x in _qkv(1, 2, 2, 5, 8, 16))
    with pytest.raises(DifferentiationError, match=r"test_multi_pass\.py:\d+: a test of a value against its own max"):
        at_max(q, k, v)
