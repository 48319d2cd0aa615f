"""Bad call-time input raises a typed error whose message names what was expected and what came.

Kernels are not the point here: calls go to the reference backend (or ``op.reference``), so
every check is the one made before any kernel would run.
"""

from __future__ import annotations

import functools

import pytest
import torch
from catalogue import load_example

import einflash as ef
from einflash.errors import (
    BackendError,
    CallError,
    DeviceError,
    DTypeError,
    EinflashError,
    MissingInputError,
    ParameterError,
    ShapeError,
)

B, HQ, HKV, M, N, E, F = 1, 4, 2, 5, 7, 8, 6


@functools.cache
def _op(name: str) -> ef.AttentionOp:
    return getattr(load_example(name), name)


def _qkv(**change) -> dict[str, torch.Tensor]:
    """Well-formed q, k, v (GQA 4:2, M ≠ N, E ≠ F), with some replaced."""
    made = {"q": torch.randn(B, HQ, M, E), "k": torch.randn(B, HKV, N, E), "v": torch.randn(B, HKV, N, F)}
    made.update(change)
    return made


def _raises(error: type, op, *words: str, **kwargs) -> None:
    """Both the reference backend and ``op.reference`` raise ``error`` with every word in its message."""
    for call in (lambda: op(**kwargs, backend="reference"), lambda: op.reference(**kwargs)):
        with pytest.raises(error) as info:
            call()
        assert isinstance(info.value, EinflashError)
        for w in words:
            assert w in str(info.value), (w, str(info.value))


def test_well_formed_input_runs():
    out = _op("softmax")(**_qkv(), backend="reference")
    assert out.shape == (B, HQ, M, F) and out.dtype == torch.float32


# -- shapes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, bad, layout",
    [
        ("q", torch.randn(HQ, M, E), "[B, Hq, M, d]"),
        ("k", torch.randn(1, B, HKV, N, E), "[B, Hkv, N, d]"),
        ("v", torch.randn(B, HKV, N), "[B, Hkv, N, d]"),
    ],
)
def test_wrong_number_of_dims(name, bad, layout):
    _raises(
        ShapeError,
        _op("softmax"),
        f"{name} must be 4-D {layout}",
        f"got shape {tuple(bad.shape)}",
        **_qkv(**{name: bad}),
    )


def test_extra_input_with_wrong_number_of_dims():
    _raises(
        ShapeError,
        _op("alibi"),
        "slope must have 1 dimensions (h)",
        "got shape (4, 1)",
        **_qkv(slope=torch.ones(HQ, 1)),
    )


def test_query_heads_not_a_multiple_of_kv_heads():
    three = {"k": torch.randn(B, 3, N, E), "v": torch.randn(B, 3, N, F)}
    _raises(ShapeError, _op("softmax"), "query heads (4)", "multiple of key/value heads (3", **_qkv(**three))


def test_k_and_v_disagree_on_kv_heads():
    _raises(ShapeError, _op("softmax"), "v has 1 kv heads", "k has 2", **_qkv(v=torch.randn(B, 1, N, F)))


def test_k_and_v_lengths_differ():
    _raises(
        ShapeError,
        _op("softmax"),
        "v.shape gives rank 'n' extent 6",
        "k.shape gives 7",
        **_qkv(v=torch.randn(B, HKV, N - 1, F)),
    )


def test_q_and_k_head_dims_differ():
    _raises(
        ShapeError,
        _op("softmax"),
        "k.shape gives rank 'e' extent 9",
        f"q.shape gives {E}",
        **_qkv(k=torch.randn(B, HKV, N, 9)),
    )


def test_extra_input_disagrees_with_q():
    _raises(
        ShapeError,
        _op("alibi"),
        "slope.shape gives rank 'h' extent 3",
        f"q.shape gives {HQ}",
        **_qkv(slope=torch.ones(3)),
    )


# -- dtypes and devices -------------------------------------------------------------------------------


def test_integer_query():
    _raises(
        DTypeError,
        _op("softmax"),
        "q must be float16, bfloat16, float32 or float64",
        "got torch.int32",
        **_qkv(q=torch.ones(B, HQ, M, E, dtype=torch.int32)),
    )


def test_mixed_query_and_key_dtypes():
    _raises(
        DTypeError,
        _op("softmax"),
        "k is torch.float16 but q is torch.float32",
        "must share a dtype",
        **_qkv(k=torch.randn(B, HKV, N, E).half()),
    )


def test_not_a_tensor():
    _raises(DTypeError, _op("softmax"), "v must be a torch.Tensor", "got list", **_qkv(v=[[0.0]]))


def test_complex_extra_input():
    _raises(
        DTypeError,
        _op("alibi"),
        "slope must be a real tensor",
        "complex64",
        **_qkv(slope=torch.ones(HQ, dtype=torch.complex64)),
    )


def test_inputs_on_a_device_without_data():
    meta = torch.empty(B, HKV, N, E, device="meta")
    _raises(DeviceError, _op("softmax"), "k is on meta", "cpu or cuda tensors", **_qkv(k=meta))


# -- inputs and parameters ------------------------------------------------------------------------------


def test_missing_extra_input():
    _raises(MissingInputError, _op("alibi"), "alibi is missing input(s) ['slope']", **_qkv())


def test_unknown_keyword():
    _raises(
        MissingInputError,
        _op("alibi"),
        "unexpected argument 'slop'",
        "['q', 'k', 'v', 'slope']",
        "['scale']",
        **_qkv(slop=torch.ones(HQ)),
    )


def test_scale_for_an_op_without_scale():
    assert not any(p.name == "scale" for p in _op("linear").cascade.params)
    _raises(
        MissingInputError, _op("linear"), "linear does not use ef.scale", "`scale` cannot be given", **_qkv(), scale=0.5
    )


def test_too_many_positional_inputs_and_an_input_twice():
    op, t = _op("softmax"), _qkv()
    with pytest.raises(MissingInputError, match=r"takes 3 tensor inputs \(q, k, v\), got 4 positional"):
        op(t["q"], t["k"], t["v"], t["q"], backend="reference")
    with pytest.raises(MissingInputError, match="input 'q' given twice"):
        op(t["q"], t["k"], t["v"], q=t["q"], backend="reference")


def test_parameter_without_default_not_given():
    @ef.attention
    def capped(q, k, v, cap: float):
        return ef.softmax(cap * ef.tanh(q @ k * ef.scale / cap), "n") @ v

    _raises(MissingInputError, capped, "parameter 'cap' has no default and was not given", **_qkv())
    assert capped(**_qkv(), cap=2.0, backend="reference").shape == (B, HQ, M, F)


@pytest.mark.parametrize("scale", [0.0, -1.0])
def test_non_positive_scale(scale):
    _raises(ParameterError, _op("softmax"), "parameter 'scale' must be positive", f"got {scale}", **_qkv(), scale=scale)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), "0.5", torch.tensor(0.5)], ids=str)
def test_a_scale_that_is_no_finite_number(value):
    _raises(ParameterError, _op("softmax"), "parameter 'scale' takes a finite number", **_qkv(), scale=value)


@pytest.mark.parametrize("value", [16.7, 16.0, "16", True], ids=repr)
def test_an_int_parameter_takes_ints_only(value):
    _raises(ParameterError, _op("sliding_window"), "parameter 'window' takes an int", **_qkv(), window=value)


def test_unknown_backend():
    with pytest.raises(BackendError) as info:
        _op("softmax")(**_qkv(), backend="tpu")
    assert "unknown backend 'tpu'" in str(info.value)
    assert "interpreter" in str(info.value) and "sm90" in str(info.value)


def test_call_errors_share_a_base_and_stay_value_or_type_errors():
    """Callers may catch CallError, or the builtin errors they would expect from torch."""
    assert issubclass(ShapeError, (CallError, ValueError)) and issubclass(DeviceError, CallError)
    assert issubclass(DTypeError, TypeError) and issubclass(MissingInputError, TypeError)
    assert issubclass(ParameterError, ValueError) and issubclass(BackendError, RuntimeError)


# -- jagged batches -------------------------------------------------------------------------------


def _packed(total_q: int = 7, total_k: int = 9, batch: int = 1) -> dict[str, torch.Tensor]:
    return _qkv(
        q=torch.randn(batch, HQ, total_q, E),
        k=torch.randn(batch, HKV, total_k, E),
        v=torch.randn(batch, HKV, total_k, F),
    )


@pytest.mark.parametrize(
    "offsets, words",
    [
        ({"cu_seqlens_q": torch.tensor([0, 3, 7])}, ["needs both cu_seqlens_q and cu_seqlens_k", "only cu_seqlens_q"]),
        ({"cu_seqlens_q": torch.tensor([0, 3, 7]), "cu_seqlens_k": torch.tensor([0, 9])}, ["2 sequences", "has 1"]),
        (
            {"cu_seqlens_q": torch.tensor([0, 3, 6]), "cu_seqlens_k": torch.tensor([0, 4, 9])},
            ["cu_seqlens_q must start at 0", "end at the packed length 7", "[0, 3, 6]"],
        ),
        ({"cu_seqlens_q": torch.tensor([0, 5, 3, 7]), "cu_seqlens_k": torch.tensor([0, 4, 5, 9])}, ["never decrease"]),
        ({"cu_seqlens_q": torch.tensor([0.0, 7.0]), "cu_seqlens_k": torch.tensor([0, 9])}, ["1-D int32 or int64"]),
    ],
    ids=["one", "counts", "end", "decreasing", "float"],
)
def test_bad_jagged_offsets(offsets, words):
    _raises(ShapeError, _op("causal"), *words, **_packed(), **offsets)


def test_jagged_inputs_must_have_batch_one():
    offsets = {"cu_seqlens_q": torch.tensor([0, 7]), "cu_seqlens_k": torch.tensor([0, 9])}
    _raises(ShapeError, _op("causal"), "must have batch 1", **_packed(batch=2), **offsets)


def test_explain_refuses_a_size_given_as_a_keyword():
    # was: explain(M=1024) took M for a parameter and explained the default shape without a word
    op = ef.attention(lambda q, k, v: ef.softmax(q @ k * ef.scale, "n") @ v, name="plain")
    with pytest.raises(ParameterError, match=r"M=1024, which is not a parameter of plain .*shape=ef.Shape"):
        op.explain(M=1024)
