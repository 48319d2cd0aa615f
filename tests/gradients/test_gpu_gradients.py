"""On a GPU (skipped elsewhere): bf16 and fp16 gradients of a few variants within the tolerance rule, the
deterministic backward giving identical bits run to run, a replayed training step those of a fresh one, and
the atomic dQ schedule within the rule too."""

import dataclasses

import pytest
import torch
from gradient_cases import TUNED, inputs, op

import einflash as ef
from einflash.testing import check_gradients

pytestmark = pytest.mark.gpu

SHAPE = ef.Shape(B=2, Hq=8, M=1000, N=1000, E=64, F=64, Hkv=2)  # GQA 4, lengths not multiples of the tiles


def _run(name, dtype, **call):
    given = {k: v.cuda() for k, v in inputs(name, SHAPE, dtype).items()}
    leaves = {k: (v.clone().requires_grad_() if v.is_floating_point() else v) for k, v in given.items()}
    out = op(name)(**leaves, **TUNED.get(name, {}), **call)
    d_o = torch.randn_like(out)
    out.backward(d_o)
    return given, d_o, {k: v.grad for k, v in leaves.items() if v.is_floating_point()}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    "name", ["causal", "sliding_window", "alibi", "softcap", "differential", "sigmoid", "renorm_threshold"]
)
def test_gradients_within_the_rule(name, dtype):
    given, d_o, grads = _run(name, dtype)
    verdicts = check_gradients(op(name), grads, d_o, **given, **TUNED.get(name, {}))
    assert all(v.ok for v in verdicts.values()), verdicts


def test_deterministic_backward_gives_identical_bits():
    torch.manual_seed(0)
    first = _run("causal", torch.bfloat16, deterministic=True)[2]
    torch.manual_seed(0)
    again = _run("causal", torch.bfloat16, deterministic=True)[2]
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_atomic_dq_within_the_rule():
    from einflash.backends import detect
    from einflash.compiler.schedule import default_backward_schedule

    schedule = dataclasses.replace(default_backward_schedule({"e": 64, "f": 64}, detect()), atomic_dq=True)
    given, d_o, grads = _run("causal", torch.bfloat16, backward_schedule=schedule)
    verdicts = check_gradients(op("causal"), grads, d_o, **given)
    assert all(v.ok for v in verdicts.values()), verdicts


def test_a_replayed_training_step_matches_a_fresh_one():
    training = op("alibi")._training
    runs = []
    for fresh in (True, False, True):  # recorded, replayed, recorded again
        if fresh:
            training.forward_replays.clear()
            training.backward_replays.clear()
        torch.manual_seed(0)
        runs.append(_run("alibi", torch.bfloat16)[2])
        assert len(training.forward_replays) == len(training.backward_replays) == 1
    assert all(torch.equal(runs[1][k], runs[2][k]) for k in runs[1])


@pytest.mark.parametrize("T", [1000, 3000])  # the reference weighs masked pairs too: 0.8^−(N−1) is inf past ~3180
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", ["causal_linear", "gla"])
def test_linear_attention_chunk_by_chunk_within_the_rule(name, dtype, T):
    """Past the crossover the forward runs the chunked form, and causal_linear's backward its three chunked
    attentions (gla's stays quadratic): the output and every gradient, the decay's and the gates' included."""
    from einflash.testing import check

    shape = dataclasses.replace(SHAPE, B=1, Hq=4, Hkv=2, M=T, N=T)
    given = {k: v.cuda() for k, v in inputs(name, shape, dtype).items()}
    with torch.no_grad():
        verdict = check(op(name), op(name)(**given), **given)
    assert verdict.ok, verdict
    leaves = {k: (v.clone().requires_grad_() if v.is_floating_point() else v) for k, v in given.items()}
    out = op(name)(**leaves)
    d_o = torch.randn_like(out)
    out.backward(d_o)
    grads = {k: v.grad for k, v in leaves.items() if v.is_floating_point()}
    verdicts = check_gradients(op(name), grads, d_o, **given)
    assert all(v.ok for v in verdicts.values()), verdicts
