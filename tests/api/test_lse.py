"""``return_lse=True``: the log-sum-exp of the cascade's softmax, against torch.logsumexp of the scores computed
here in float64, through the fused kernel, split-KV decoding (the combine kernel), GQA packing, jagged batches
and the reference backend; NormaliserError for cascades without one softmax over n; the custom op under
opcheck and torch.compile."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from catalogue import load_example

import einflash as ef
from einflash.compiler.schedule import Schedule
from einflash.errors import NormaliserError
from einflash.testing import random_inputs

pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
]

FUSED = Schedule(16, 16, 4, 1)
SPLIT = Schedule(16, 16, 4, 1, splits=3)
TOL = 2e-5  # fp32 kernels against float64, on scores of magnitude a few units


@ef.attention
def strictly_causal(q, k, v):
    """Query m sees keys n < m: row 0 sees none (output 0, lse −inf)."""
    s = ef.mask(q @ k * ef.scale, ef.n < ef.m)
    return ef.softmax(s, "n") @ v


@functools.cache
def _op(name: str):
    return strictly_causal if name == "strictly_causal" else getattr(load_example(name), name)


def _scores(name: str, q, k, **inputs) -> torch.Tensor:
    """The scores each softmax normalises, float64 ``[B, Hq, M, N]``, masked keys at −inf (written here, not
    taken from einflash)."""
    q, k = q.double(), k.double().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    s = q @ k.mT / math.sqrt(q.shape[-1])
    m = torch.arange(q.shape[2])[:, None]
    n = torch.arange(k.shape[2])[None, :]
    if name == "alibi":
        s = s + inputs["slope"].double()[:, None, None] * (n - m)
    if name == "softcap":
        s = 30.0 * torch.tanh(s / 30.0)
    keep = {"causal": n <= m, "strictly_causal": n < m}.get(name)
    return s if keep is None else s.masked_fill(~keep, -math.inf)


def _assert_lse(lse: torch.Tensor, want: torch.Tensor) -> None:
    """−inf exactly on the rows with no key, within TOL of ``want`` elsewhere."""
    assert lse.shape == want.shape and torch.equal(lse == -math.inf, want == -math.inf)
    err = (lse.double() - want)[torch.isfinite(want)].abs()
    assert err.numel() == 0 or float(err.max()) < TOL


def _inputs(name: str, M: int, N: int, hq: int = 2, hkv: int = 2, dtype=torch.float32) -> dict[str, torch.Tensor]:
    made = {
        "q": torch.randn(1, hq, M, 16, dtype=dtype),
        "k": torch.randn(1, hkv, N, 16, dtype=dtype),
        "v": torch.randn(1, hkv, N, 16, dtype=dtype),
    }
    if name == "alibi":
        made["slope"] = torch.tensor([0.5, 0.125])[:hq]
    return made


@pytest.mark.parametrize("schedule", [FUSED, SPLIT], ids=["fused", "split"])
@pytest.mark.parametrize("name", ["softmax", "causal", "strictly_causal", "alibi", "softcap"])
def test_lse_is_logsumexp_of_the_scores(name, schedule):
    op, x = _op(name), _inputs(name, 37, 53)
    out, lse = op(**x, schedule=schedule, return_lse=True)
    assert lse.shape == (1, 2, 37) and lse.dtype == torch.float32
    _assert_lse(lse, torch.logsumexp(_scores(name, **x), dim=-1))
    assert torch.allclose(out, op(**x, schedule=schedule), atol=0, rtol=0)  # the output is unchanged
    if name == "strictly_causal":
        assert bool((lse[:, :, 0] == -math.inf).all()) and bool((out[:, :, 0] == 0).all())


@pytest.mark.parametrize("name", ["causal", "strictly_causal", "alibi"])
def test_reference_backend_returns_the_lse_of_the_written_cascade(name):
    op, x = _op(name), _inputs(name, 9, 13, dtype=torch.float64)
    out, lse = op(**x, backend="reference", return_lse=True)
    assert lse.dtype == torch.float64 and torch.equal(out, op(**x, backend="reference"))
    torch.testing.assert_close(lse, torch.logsumexp(_scores(name, **x), dim=-1), rtol=1e-12, atol=1e-12)


def test_float64_kernels_return_float64_lse():
    x = _inputs("causal", 20, 20, dtype=torch.float64)
    lse = _op("causal")(**x, schedule=FUSED, return_lse=True)[1]
    assert lse.dtype == torch.float64
    torch.testing.assert_close(lse, torch.logsumexp(_scores("causal", **x), dim=-1), rtol=1e-12, atol=1e-12)


def test_gqa_decoding_with_split_kv_and_packing():
    x = _inputs("softmax", 1, 200, hq=4, hkv=2)
    out, lse = _op("softmax")(**x, schedule=Schedule(16, 16, 4, 1, splits=4, pack=True), return_lse=True)
    _assert_lse(lse, torch.logsumexp(_scores("softmax", **x), dim=-1))
    assert float((out.double() - _op("softmax").reference(**x)).abs().max()) < TOL


def test_jagged_batch():
    cu_q, cu_k = torch.tensor([0, 5, 12, 16]), torch.tensor([0, 9, 13, 13])  # the last sequence has no key
    x = _inputs("causal", 16, 13, hq=4, hkv=2)
    out, lse = _op("causal")(**x, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, return_lse=True)
    ref_out, ref_lse = _op("causal")(**x, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, backend="reference", return_lse=True)
    assert lse.shape == (1, 4, 16)
    for i in range(3):
        rows, keys = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
        want = torch.logsumexp(_scores("causal", x["q"][:, :, rows], x["k"][:, :, keys]), dim=-1)
        _assert_lse(lse[:, :, rows], want)
        _assert_lse(ref_lse[:, :, rows], want)
    assert bool((lse[:, :, 13:] == -math.inf).all()) and bool((out[:, :, 13:] == 0).all())
    assert float((out - ref_out).abs().max()) < TOL


@pytest.mark.parametrize(
    "name, says",
    [
        ("sigmoid", ["no softmax", "o = sum_n (line 13)"]),
        ("linear", ["softmax is over e", "over n of max_n[e]"]),
        ("differential", ["it has 2", "sum_n = Σ_n", "sum_n2 = Σ_n"]),
    ],
)
def test_no_softmax_over_n_raises_normaliser_error(name, says):
    op = _op(name)
    assert op.lse_error is not None
    x = {
        t.name: torch.randn(1, 2, 8, 16) if t.layout is not ef.ir.Layout.DECLARED else torch.rand(2)
        for t in op.cascade.inputs
    }
    for backend in (None, "reference"):
        with pytest.raises(NormaliserError) as err:
            op(**x, backend=backend, return_lse=True)
        for part in says + ["needs one softmax over n"]:
            assert part in str(err.value)


def test_lse_of_a_differentiable_call_is_detached():
    x = {k: t.requires_grad_() for k, t in _inputs("causal", 12, 12).items()}
    out, lse = _op("causal")(**x, schedule=FUSED, return_lse=True)
    assert out.requires_grad and not lse.requires_grad
    out.sum().backward()
    assert x["q"].grad is not None
    _assert_lse(lse, torch.logsumexp(_scores("causal", x["q"].detach(), x["k"].detach()), dim=-1))


@pytest.mark.parametrize("schedule", [[16, 16, 4, 1, 1, 0], [16, 16, 4, 1, 2, 1], []], ids=["fused", "split", "chosen"])
def test_lse_custom_op_passes_opcheck(schedule):
    op, x = _op("causal"), _inputs("causal", 12, 21, hq=4, hkv=2)
    tensors = [x[t.name] for t in op.cascade.inputs]
    torch.library.opcheck(op._lse_op, (tensors, [math.nan], schedule))
    lse = op._lse_op(tensors, [math.nan], schedule)[1]
    _assert_lse(lse, torch.logsumexp(_scores("causal", **x), dim=-1))


def test_compiled_call_returns_lse():
    op = _op("alibi")

    def block(q, k, v, slope):
        out, lse = op(q, k, v, slope=slope, return_lse=True)
        return out.relu(), lse * 2

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    x = _inputs("alibi", 12, 21)
    got, want = compiled(**x), block(**x)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


# every catalogue variant with one softmax over n that lowers (the others: NormaliserError, or LoweringError)
CATALOGUE = [
    "alibi",
    "causal",
    "document_mask",
    "gqa",
    "head_gate",
    "lowrank_bias",
    "mla_decode",
    "prefix_lm",
    "relative_bias",
    "signed_softmax",
    "sink_window",
    "sliding_window",
    "softcap",
    "softmax",
    "top_theta",
]


@pytest.mark.parametrize("name", CATALOGUE)
def test_catalogue_lse_matches_the_reference(name):
    op = getattr(load_example(name), name)
    hq, hkv = getattr(load_example(name), "HEADS", (2, 2))
    x = random_inputs(op, ef.Shape(1, min(hq, 4), 24, 40, 16, Hkv=min(hkv, 2)))
    want = op(**x, backend="reference", return_lse=True)[1].double()
    for schedule in (FUSED, SPLIT):
        _assert_lse(op(**x, schedule=schedule, return_lse=True)[1], want)
