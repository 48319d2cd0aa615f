"""Backward kernels under the CPU interpreter against the float64 reference gradients (the tolerance rule of
docs/design.md §7, applied to each input's gradient): every one-pass catalogue variant in fp32 and fp16 through
autograd; GQA, head dims, lengths, rows that see no key, strides, the atomic dQ schedule, determinism, empty
shapes; the query tiles each dK/dV program visits, counted by the kernel, against the transposed plan and the
materialised mask; the custom ops under opcheck and a compiled training step."""

import dataclasses
import functools

import pytest
import torch
from gradient_cases import FULLY_MASKED, LOWERED, STAGED, TRAINED_OWN, TUNED, frozen, grad_output, inputs, op

import einflash as ef
from einflash.autograd import schedule_ints
from einflash.compiler.analysis.mask_tiles import tile_rows
from einflash.compiler.autodiff.parts import loop_over
from einflash.compiler.codegen.tile_ranges import query_plan
from einflash.compiler.runtime.launch import jit_launch
from einflash.compiler.schedule import BackwardSchedule, Schedule
from einflash.errors import ParameterError
from einflash.ir.reference import bind_extents, bind_params
from einflash.testing import check_gradients, trainable

pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
]

F32, F16, F64 = torch.float32, torch.float16, torch.float64
SHAPE = ef.Shape(B=1, Hq=2, M=37, N=45, E=24, F=16, Hkv=1)  # odd lengths, M ≠ N, E padded to 32
SMALL = BackwardSchedule(16, 16, 4, 1)


def _grads(name: str, given: dict, params: dict, d_o: torch.Tensor, **call) -> dict:
    """Every floating-point input's gradient through the op's autograd (None for integer inputs)."""
    leaves = trainable(op(name), given)
    out = op(name)(**leaves, **params, **call)
    out.backward(d_o)
    return {k: (v.grad if v.requires_grad else None) for k, v in leaves.items()}


def _assert_within_tolerance(name, grads, d_o, given, params):
    verdicts = check_gradients(op(name), grads, d_o, **given, **params)
    assert set(verdicts) == {k for k, v in grads.items() if v is not None}
    bad = {k: v for k, v in verdicts.items() if not v.ok}
    assert not bad, bad


@pytest.mark.parametrize("dtype", [F32, F16], ids=str)
@pytest.mark.parametrize("name", LOWERED + STAGED + TRAINED_OWN)
def test_example_gradients_match_reference(name, dtype):
    given, params = inputs(name, SHAPE, dtype), TUNED.get(name, {})
    d_o = grad_output(name, given, params)
    grads = _grads(name, given, params, d_o, backward_schedule=SMALL)
    for k, x in given.items():
        assert (grads[k] is None) == (not x.is_floating_point() or k in frozen(name))
        assert grads[k] is None or (grads[k].shape == x.shape and grads[k].dtype == x.dtype)
    _assert_within_tolerance(name, grads, d_o, given, params)


@pytest.mark.parametrize("Hq, Hkv", [(4, 1), (8, 2)], ids=["mqa4", "gqa4"])
def test_gqa_gradients_are_summed_over_the_group(Hq, Hkv):
    name = "causal"
    given = inputs(name, dataclasses.replace(SHAPE, Hq=Hq, Hkv=Hkv, M=20, N=33, E=16), F32)
    d_o = grad_output(name, given, {})
    grads = _grads(name, given, {}, d_o)
    _assert_within_tolerance(name, grads, d_o, given, {})
    # the same as repeating the kv heads and adding up each group's gradients
    rep = {k: (v.repeat_interleave(Hq // Hkv, 1) if k in "kv" else v) for k, v in given.items()}
    wide = _grads(name, rep, {}, d_o)
    for k in "kv":
        torch.testing.assert_close(grads[k], wide[k].unflatten(1, (Hkv, Hq // Hkv)).sum(2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("E, F", [(40, 40), (80, 80), (24, 96)])
def test_head_dims_padded_or_not(E, F):
    given = inputs("causal", dataclasses.replace(SHAPE, M=21, N=18, E=E, F=F), F16)
    d_o = grad_output("causal", given, {})
    _assert_within_tolerance("causal", _grads("causal", given, {}, d_o), d_o, given, {})


@pytest.mark.parametrize("name", ["softmax", "bottom_right"])
@pytest.mark.parametrize("M, N", [(1, 1), (1, 37), (37, 1), (17, 31), (32, 32)])
def test_sequence_lengths(name, M, N):
    given = inputs(name, dataclasses.replace(SHAPE, B=2, M=M, N=N, E=16), F32)
    d_o = grad_output(name, given, {})
    _assert_within_tolerance(name, _grads(name, given, {}, d_o), d_o, given, {})


@pytest.mark.parametrize("name, M, N, params", FULLY_MASKED, ids=[c[0] for c in FULLY_MASKED])
def test_rows_that_see_no_key_give_zero_gradients_never_nan(name, M, N, params):
    given = inputs(name, ef.Shape(B=2, Hq=4, M=M, N=N, E=16, F=16, Hkv=2), F32)
    d_o = grad_output(name, given, params)
    grads = _grads(name, given, params, d_o)
    empty = (op(name).reference(**given, **params) == 0).all(-1)
    assert empty.any() and not empty.all()
    assert all(torch.isfinite(g).all() for g in grads.values() if g is not None)
    assert (grads["q"][empty] == 0).all()
    _assert_within_tolerance(name, grads, d_o, given, params)


def test_gates_keep_their_own_dtype_beside_fp16_qkv():
    """GLA's cumulative gates in fp32 (as GLA implementations keep them) beside fp16 q, k and v: the kernels
    convert them where they enter a dot and compute with them in fp32 elsewhere; the output is in q's dtype and
    each gradient in its input's."""
    given, params = inputs("gla", SHAPE, F16), {}
    given["g"] = given["g"].float() * 8  # decays that bite within a tile
    assert given["q"].dtype == F16 and given["g"].dtype == F32
    d_o = grad_output("gla", given, params)
    grads = _grads("gla", given, params, d_o, backward_schedule=SMALL)
    assert grads["g"].dtype == F32 and grads["q"].dtype == F16
    _assert_within_tolerance("gla", grads, d_o, given, params)


@pytest.mark.parametrize("name", ["softmax", "sliding_window", "alibi", "lowrank_bias", "gla"])
def test_atomic_dq_schedule_matches(name):
    given, params = inputs(name, SHAPE, F32), TUNED.get(name, {})
    d_o = grad_output(name, given, params)
    atomic = _grads(name, given, params, d_o, backward_schedule=dataclasses.replace(SMALL, atomic_dq=True))
    _assert_within_tolerance(name, atomic, d_o, given, params)
    separate = _grads(name, given, params, d_o, backward_schedule=SMALL)
    for k, g in atomic.items():
        if g is not None:
            torch.testing.assert_close(g, separate[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "name, Hq, Hkv",
    [("softmax", 2, 1), ("alibi", 4, 2), ("causal", 4, 1), ("document_mask", 2, 1), ("lowrank_bias", 2, 1)],
)
def test_one_launch_gives_the_two_launches_bits(name, Hq, Hkv):
    """dK/dV and dQ programs in one launch (GQA groups, run-time tile lists of a document mask, per-head and
    key-side partials): one kernel launched where two were, every gradient bit for bit."""
    o, params = op(name), TUNED.get(name, {})
    given = inputs(name, dataclasses.replace(SHAPE, Hq=Hq, Hkv=Hkv), F32)
    c = o.forward.rewritten
    extents = bind_extents(c, given, params)
    values = bind_params(c, params, extents)
    out, states = o.forward.run(given, values, Schedule(16, 16, 4, 1), extents, saved=o.backward.saved)
    d_o = grad_output(name, given, params)
    runs = {}
    for one in (True, False):
        kernels = []

        def launcher(src, call):
            kernels.append(src.name.split("__")[0])  # noqa: B023 -- called before run returns
            jit_launch(src, call)

        grads = o.backward.run(
            given, values, out, states, d_o, dataclasses.replace(SMALL, one_launch=one), extents, launcher=launcher
        )
        runs[one] = grads, [k for k in kernels if k != "attn_bwd_rows"]
    assert runs[True][1] == ["attn_bwd"] and runs[False][1] == ["attn_bwd_kv", "attn_bwd_q"]
    _assert_within_tolerance(name, runs[True][0], d_o, given, params)
    assert all(g is None or torch.equal(g, runs[False][0][k]) for k, g in runs[True][0].items())


def test_whole_query_tiles_load_their_rows_unmasked():
    """In the dK/dV kernel only the query tile cut by the end of the queries masks its loads of rows."""
    dims = {"e": 32, "e_extent": 32, "f": 16, "f_extent": 16}
    text = op("softmax").backward.kernel("kv", F16, dims, frozenset()).text
    whole, cut = text.split("# whole query tiles")[1].split("# the last query tile")
    assert "tl.load(q_ptr" in whole and "mask=row_ok" not in whole
    assert "tl.load(q_ptr" in cut and "mask=row_ok" in cut


def test_inputs_that_need_no_gradient_cost_nothing():
    """A fixed relative bias: its [H, M, N] gradient is neither computed nor stored."""
    name = "relative_bias"
    given = inputs(name, SHAPE, F32)
    leaves = {k: (v.clone().requires_grad_() if k != "bias" else v) for k, v in given.items()}
    d_o = grad_output(name, given, {})
    op(name)(**leaves).backward(d_o)
    assert leaves["bias"].grad is None
    grads = {k: leaves[k].grad for k in "qkv"}
    _assert_within_tolerance(name, grads, d_o, given, {})
    needed = op(name).backward.cut(frozenset("qkv"))
    assert {p.input for p in needed.gradient.partials} == set("qkv")
    assert "bias" in {p.input for p in op(name).backward.gradient.partials}


def test_deterministic_runs_give_identical_bits():
    given = inputs("causal", dataclasses.replace(SHAPE, Hq=4, Hkv=2), F16)
    d_o = grad_output("causal", given, {})
    first = _grads("causal", given, {}, d_o, deterministic=True)
    again = _grads("causal", given, {}, d_o, deterministic=True)
    assert all(torch.equal(first[k], again[k]) for k in "qkv")


def test_deterministic_refuses_an_atomic_schedule():
    given = inputs("causal", SHAPE, F32)
    with pytest.raises(ParameterError, match="atomically"):
        _grads(
            "causal",
            given,
            {},
            grad_output("causal", given, {}),
            backward_schedule=dataclasses.replace(SMALL, atomic_dq=True),
            deterministic=True,
        )


def test_incoming_gradients_of_any_strides():
    """out.sum().backward() passes a stride-0 gradient; a transposed one is not contiguous either."""
    given = inputs("alibi", SHAPE, F32)
    leaves = {k: v.clone().requires_grad_() for k, v in given.items()}
    op("alibi")(**leaves).sum().backward()
    ones = torch.ones(1, 2, 37, 16)
    _assert_within_tolerance("alibi", {k: v.grad for k, v in leaves.items()}, ones, given, {})
    d_o = torch.randn(1, 2, 16, 37).transpose(2, 3)
    assert not d_o.is_contiguous()
    _assert_within_tolerance("alibi", _grads("alibi", given, {}, d_o), d_o.contiguous(), given, {})


def test_non_contiguous_inputs():
    given = inputs("causal", dataclasses.replace(SHAPE, B=2, M=21, N=34, E=16), F32)
    strided = {
        "q": given["q"].transpose(1, 2).contiguous().transpose(1, 2),
        "k": torch.cat([given["k"], torch.randn_like(given["k"])], -1)[..., :16],
        "v": given["v"].transpose(2, 3).contiguous().transpose(2, 3),
    }
    assert not any(x.is_contiguous() for x in strided.values())
    d_o = grad_output("causal", given, {})
    got, want = _grads("causal", strided, {}, d_o), _grads("causal", given, {}, d_o)
    assert all(torch.equal(got[k], want[k]) for k in "qkv")


@pytest.mark.parametrize("B, M, N", [(0, 5, 7), (2, 0, 7), (2, 5, 0)], ids=["batch0", "queries0", "keys0"])
def test_empty_shapes(B, M, N):
    given = inputs("causal", dataclasses.replace(SHAPE, B=B, Hq=4, Hkv=2, M=M, N=N, E=16), F32)
    grads = _grads("causal", given, {}, torch.randn(B, 4, M, 16), schedule=Schedule(16, 16, 4, 1))
    assert all(g.shape == given[k].shape and (g == 0).all() for k, g in grads.items())


# -- visited query tiles ----------------------------------------------------------------------

VISIT_PARAMS = {
    "causal": {},
    "sliding_window": {"window": 20},
    "prefix_lm": {"prefix": 21},
    "sink_window": {"window": 12, "sinks": 5},
    "bottom_right": {},
}
VISIT_SIZES = [(37, 45, 16, 32), (45, 37, 32, 16), (77, 100, 16, 32)]  # (M, N, BM, BN)


def _brute_mask(name: str, M: int, N: int, p: dict) -> torch.Tensor:
    """The [M, N] mask, written from the examples' docstrings (independent of einflash)."""
    m, n = torch.arange(M)[:, None], torch.arange(N)[None, :]
    return {
        "causal": lambda: n <= m,
        "bottom_right": lambda: n <= m + (N - M),
        "sliding_window": lambda: (n <= m) & (m - n < p["window"]),
        "prefix_lm": lambda: (n <= m) | (n < p["prefix"]),
        "sink_window": lambda: (n <= m) & ((m - n < p["window"]) | (n < p["sinks"])),
    }[name]().expand(M, N)


@functools.cache
def _kv_visits(name: str, M: int, N: int, BM: int, BN: int) -> list[int]:
    """Query tiles each dK/dV program (key tile) visited, counted by the kernel; its gradients checked on the way."""
    o, params = op(name), VISIT_PARAMS[name]
    given = inputs(name, ef.Shape(B=1, Hq=2, M=M, N=N, E=16, F=16, Hkv=1), F32)
    c = o.forward.rewritten
    extents = bind_extents(c, given, params)
    values = bind_params(c, params, extents)
    out, states = o.forward.run(given, values, Schedule(16, 16, 4, 1), extents, saved=o.backward.saved)
    d_o = grad_output(name, given, params)
    visits = torch.zeros(1, -(-N // BN), dtype=torch.int32)
    grads = o.backward.run(given, values, out, states, d_o, BackwardSchedule(BM, BN, 4, 1), extents, visits)
    _assert_within_tolerance(name, grads, d_o, given, params)
    return [v // 2 for v in visits[0].tolist()]  # two query heads visit alike


@pytest.mark.parametrize("M, N, BM, BN", VISIT_SIZES)
@pytest.mark.parametrize("name", list(VISIT_PARAMS))
def test_dkdv_programs_visit_the_transposed_plans_tiles(name, M, N, BM, BN):
    kv = loop_over(op(name).backward.parts.kv, "m")
    plan = query_plan(kv.cascade, kv.loop).plan
    assert plan is not None and plan.exact and plan.over == "m"
    want = [sum(hi - lo for lo, hi in row.nonempty) for row in tile_rows(plan, M, N, BM, BN, **VISIT_PARAMS[name])]
    assert _kv_visits(name, M, N, BM, BN) == want


@pytest.mark.parametrize("M, N, BM, BN", VISIT_SIZES)
@pytest.mark.parametrize("name", list(VISIT_PARAMS))
def test_dkdv_programs_visit_the_materialised_masks_tiles(name, M, N, BM, BN):
    mask = _brute_mask(name, M, N, VISIT_PARAMS[name])
    want = [sum(bool(mask[i : i + BM, j : j + BN].any()) for i in range(0, M, BM)) for j in range(0, N, BN)]
    got = _kv_visits(name, M, N, BM, BN)
    assert got == want and sum(got) < -(-M // BM) * -(-N // BN)


# -- torch integration ------------------------------------------------------------------------


def test_training_custom_ops_pass_opcheck():
    o = op("alibi")
    given = inputs("alibi", dataclasses.replace(SHAPE, M=12, N=21, E=16), F32)
    tensors = [given[t.name] for t in o.cascade.inputs]
    schedule = schedule_ints(Schedule(16, 16, 4, 1).to_ints(), SMALL)
    torch.library.opcheck(o._training.custom_op, (tensors, [float("nan")], schedule))
    out, *states = o._training.custom_op(tensors, [float("nan")], schedule)
    bwd = getattr(torch.ops.einflash, o._training.custom_op._name.replace("train_", "bwd_"))
    torch.library.opcheck(bwd, (torch.randn_like(out), out, states, tensors, [float("nan")], schedule))


def test_eager_training_skips_the_custom_op_and_matches_it_bit_for_bit():
    o = op("alibi")
    given = inputs("alibi", dataclasses.replace(SHAPE, M=12, N=21, E=16), F32)
    d_o = torch.randn(given["q"].shape[:-1] + (given["v"].shape[-1],))
    schedule = schedule_ints(Schedule(16, 16, 4, 1).to_ints(), SMALL)
    grads = []
    for train in ("eager", "custom_op"):
        leaves = [given[t.name].clone().requires_grad_() for t in o.cascade.inputs]
        if train == "eager":
            out = o._training.eager.apply([float("nan")], schedule, *leaves)[0]
            assert type(out.grad_fn).__name__.startswith("EagerTraining")
        else:
            out = o._training.custom_op(leaves, [float("nan")], schedule)[0]
        out.backward(d_o)
        grads.append([x.grad for x in leaves])
    eager_call = o(*(given[t.name].clone().requires_grad_() for t in o.cascade.inputs))
    assert type(eager_call.grad_fn).__name__.startswith("EagerTraining")
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def _step(o, given: dict, d_o: torch.Tensor, fresh: bool = False) -> list[torch.Tensor]:
    """One eager training step's gradients of every floating-point input (``fresh``: the replays forgotten)."""
    if fresh:
        o._training.forward_replays.clear()
        o._training.backward_replays.clear()
    leaves = {k: (x.clone().requires_grad_() if x.is_floating_point() else x) for k, x in given.items()}
    o(*(leaves[t.name] for t in o.cascade.inputs)).backward(d_o)
    return [x.grad for x in leaves.values() if x.is_floating_point()]


def test_a_training_step_of_a_recorded_signature_is_replayed_bit_for_bit():
    o = op("alibi")  # GQA 4:2 and a per-head slope: the replayed partials still go through finish
    shape = dataclasses.replace(SHAPE, Hq=4, Hkv=2, M=12, N=21, E=16)
    given = inputs("alibi", shape, F32)
    _step(o, given, grad_output("alibi", given, {}), fresh=True)
    assert len(o._training.forward_replays) == len(o._training.backward_replays) == 1
    given = inputs("alibi", shape, F32, seed=1)
    d_o = torch.randn_like(grad_output("alibi", given, {}))
    replayed = _step(o, given, d_o)
    assert len(o._training.forward_replays) == len(o._training.backward_replays) == 1
    for a, b in zip(replayed, _step(o, given, d_o, fresh=True)):
        assert torch.equal(a, b)
    given = inputs("alibi", dataclasses.replace(shape, M=13), F32)
    _step(o, given, grad_output("alibi", given, {}))
    assert len(o._training.forward_replays) == len(o._training.backward_replays) == 2  # another shape


def test_a_training_step_with_converted_inputs_is_not_replayed():
    o = op("document_mask")  # int64 document ids are converted to int32 for the kernels
    given = inputs("document_mask", dataclasses.replace(SHAPE, M=12, N=21, E=16), F32)
    assert given["doc"].dtype == torch.int64
    d_o = grad_output("document_mask", given, {})
    first = _step(o, given, d_o, fresh=True)
    assert len(o._training.forward_replays) == len(o._training.backward_replays) == 0
    for a, b in zip(first, _step(o, given, d_o)):
        assert torch.equal(a, b)


@pytest.mark.slow  # Inductor compiles the training step around the ops
def test_compiled_training_step_matches_eager():
    causal, alibi = op("causal"), op("alibi")

    def step(q, k, v, slope):
        return (torch.relu(causal(q, k, v)) + alibi(q * 0.5, k, v, slope=slope).sigmoid()).square().sum()

    given = inputs("alibi", dataclasses.replace(SHAPE, M=12, N=21, E=16), F32)
    compiled = torch.compile(step, fullgraph=True)
    grads = []
    for fn in (compiled, step):
        leaves = [given[k].clone().requires_grad_() for k in ("q", "k", "v", "slope")]
        fn(*leaves).backward()
        grads.append([x.grad for x in leaves])
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_default_backward_that_runs_out_of_shared_memory_shrinks_until_it_fits():
    """Differential attention's backward at head dim 128 needed 245,760 B of an H100's 232,448 with the default;
    the default shrinks (one stage, then smaller tiles) and the schedule that fit is remembered. A schedule the
    caller chose is kept, and running out then raises OutOfResourcesError."""
    from einflash.autograd import _fitting
    from einflash.compiler.schedule import BackwardSchedule
    from einflash.errors import OutOfResourcesError

    class OutOfResources(Exception):  # Triton's, by name
        pass

    tried = []

    def launch(s):
        tried.append(s)
        if s.num_stages > 1 or s.block_m > 32:
            raise OutOfResources("out of resource: shared memory, Required: 245760, Hardware limit: 232448.")
        return "ran"

    default = BackwardSchedule(64, 128, 8, 2)
    assert _fitting(launch, default, False, ("key",)) == "ran"
    assert [(s.block_m, s.num_stages) for s in tried] == [(64, 2), (64, 1), (32, 1)]
    tried.clear()
    assert _fitting(launch, default, False, ("key",)) == "ran" and len(tried) == 1  # remembered
    with pytest.raises(OutOfResourcesError, match="needs 245,760 B, the target has 232,448 B"):
        _fitting(launch, default, True, ("other",))


# -- the chunked form's backward: three chunked attentions ------------------------------------------------


@pytest.mark.parametrize("dtype", [F32, F16], ids=str)
@pytest.mark.parametrize("N", [40, 160])
def test_chunked_backward_matches_the_reference(N, dtype):
    """Past the crossover, 16-bit causal linear attention with a decay trains chunk by chunk: its backward runs the
    derived attentions (dA with the keys before, dv and dB with the keys after) and the chain rule into q, k, v,
    and the quadratic kernels for the decay's gradient alone; GQA 4:2, a length that is no multiple of the chunk.
    fp32 keeps the quadratic backward."""
    from unittest import mock

    from einflash.compiler.runtime import backward as backward_module

    name = "causal_linear"
    given = inputs(name, dataclasses.replace(SHAPE, Hq=4, Hkv=2, M=N, N=N), dtype)
    d_o = grad_output(name, given, {})
    with mock.patch.object(backward_module, "chunked_gradients", wraps=backward_module.chunked_gradients) as ran:
        grads = _grads(name, given, {}, d_o, schedule=Schedule(16, 16, 4, 1), backward_schedule=SMALL)
    chunked = dtype == F16 and op(name).forward.linear.crossover(64, 24, 16) <= N
    assert ran.called == chunked
    assert not chunked or ran.call_args.args[-1] == frozenset("qkv")  # the decay's: the quadratic kernels'

    assert all(grads[k].shape == x.shape and grads[k].dtype == x.dtype for k, x in given.items())
    _assert_within_tolerance(name, grads, d_o, given, {})
