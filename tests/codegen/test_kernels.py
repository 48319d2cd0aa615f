"""Generated Triton kernels, run under the CPU interpreter, against the float64 reference (docs/design.md §7).

Every lowerable catalogue example in fp32 and fp16; the edge cases trusted suites test (head
dims, lengths, GQA, fully masked rows, strides, large logits, empty shapes, determinism, fp32
accumulation); split-KV decoding with and without GQA packing; and the key tiles each program
visits, counted by the kernel itself, against the symbolic tile plan and the materialised mask.
"""

from __future__ import annotations

import dataclasses
import functools
from unittest import mock

import formulas
import pytest
import torch
from catalogue import EXAMPLES, anticausal_decay, load_example, plain_causal_linear

import einflash as ef
from einflash.compiler.analysis.mask_tiles import tile_rows
from einflash.compiler.codegen.forward import sections
from einflash.compiler.codegen.tile_ranges import key_plan
from einflash.compiler.runtime import forward as forward_module
from einflash.compiler.schedule import Schedule
from einflash.errors import LoweringError, ShapeError
from einflash.ir.cascade import Layout
from einflash.ir.reference import bind_extents, bind_params
from einflash.testing import check, check_gradients

# Masked lanes compute -inf - -inf (then discard it), and the interpreter indexes with 1-element
# arrays: numpy, which it runs on, warns about both.
pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
]

F32, F16 = torch.float32, torch.float16
LOWERABLE = (
    "softmax",
    "causal",
    "sliding_window",
    "prefix_lm",
    "sink_window",
    "document_mask",
    "gqa",
    "alibi",
    "relative_bias",
    "lowrank_bias",
    "softcap",
    "sigmoid",
    "signed_softmax",
    "differential",
    "head_gate",
    "top_theta",
    "causal_linear",
    "gla",
    "mla_decode",
    "logsumexp_reducer",
    "t5_bias",
    "post_norm_threshold",
    "renorm_threshold",
    "sink_logit",
    "multi_token",
    "moba",
    "top_k",
    "linear",
    "agent",
)
# Each not-yet-lowerable example with the reason its LoweringError must give.
UNLOWERABLE = {
    "stick_breaking": "needs a third tile rank",
}
# Parameters that make the masks and the cap bite at these small sizes.
TUNED = {
    "sliding_window": {"window": 7},
    "prefix_lm": {"prefix": 5},
    "sink_window": {"window": 6, "sinks": 3},
    "softcap": {"cap": 1.5},
    "moba": {"block": 5},
}
# Odd lengths, M ≠ N, E padded to 32; Hq = 2·Hkv unless the example names its HEADS.
SHAPE = ef.Shape(B=1, Hq=2, M=37, N=45, E=24, F=16, Hkv=1)
SQUARE = {"gla"}  # gates are read at query and key positions alike: M = N


@ef.attention
def bottom_right(q, k, v):
    """Causal aligned to the last query (decoding, chunked prefill): query m sees keys n ≤ m + N − M."""
    return ef.softmax(ef.mask(q @ k * ef.scale, ef.n <= ef.m + (ef.N - ef.M)), "n") @ v


@functools.cache
def _op(name: str) -> ef.AttentionOp:
    return bottom_right if name == "bottom_right" else getattr(load_example(name), name)


def _inputs(name: str, shape: ef.Shape, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Random q, k, v and the example's extra inputs; per-token inputs (query or key layout) in ``dtype``."""
    torch.manual_seed(0)
    mod = load_example(name) if name != "bottom_right" else None
    heads = getattr(mod, "HEADS", None)
    if heads is not None:
        shape = dataclasses.replace(shape, Hq=heads[0], Hkv=heads[1])
    made = {
        "q": torch.randn(shape.B, shape.Hq, shape.M, shape.E),
        "k": torch.randn(shape.B, shape.Hkv, shape.N, shape.E),
        "v": torch.randn(shape.B, shape.Hkv, shape.N, shape.F),
    }
    if hasattr(mod, "extra_inputs"):
        made.update(mod.extra_inputs(shape))
    out = {}
    for t in _op(name).cascade.inputs:
        x = made[t.name]
        per_token = t.layout in (Layout.QUERY, Layout.KEY) and x.is_floating_point()
        out[t.name] = x.to(dtype) if per_token else x
    return out


def _qkv(B, Hq, Hkv, M, N, E, F=None, dtype=F32, scale_q=1.0):
    q = torch.randn(B, Hq, M, E) * scale_q
    return q.to(dtype), torch.randn(B, Hkv, N, E).to(dtype), torch.randn(B, Hkv, N, F or E).to(dtype)


def _assert_matches_reference(op, out, *args, **kwargs):
    verdict = check(op, out, *args, **kwargs)
    assert verdict.ok, verdict


def _run(op, inputs: dict, params: dict, schedule: Schedule) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward.run, the kernel entry: the output and the final per-row states."""
    c = op.forward.rewritten
    extents = bind_extents(c, inputs, params)
    return op.forward.run(inputs, bind_params(c, params, extents), schedule, extents)


def _forward(op, schedule: Schedule, *args, **kwargs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward.run on checked call arguments, with the schedule as given."""
    return _run(op, *op.bind(args, kwargs), schedule)


# -- the catalogue ------------------------------------------------------------------------


def test_every_example_is_listed_once():
    assert sorted(LOWERABLE + tuple(UNLOWERABLE)) == sorted(p.stem for p in EXAMPLES.glob("*.py"))


@pytest.mark.parametrize("dtype", [F32, F16], ids=str)
@pytest.mark.parametrize("name", LOWERABLE)
def test_example_kernel_matches_reference(name, dtype):
    shape = dataclasses.replace(SHAPE, N=SHAPE.M) if name in SQUARE else SHAPE
    inputs, params = _inputs(name, shape, dtype), TUNED.get(name, {})
    out = _op(name)(**inputs, **params)
    assert out.dtype == dtype and out.shape[2] == shape.M
    _assert_matches_reference(_op(name), out, **inputs, **params)


@pytest.mark.parametrize("window", [0, 1, 2, 16, 17, 1000])
def test_a_window_bounded_from_both_sides_is_one_unsigned_test(window):
    """``n ≤ m ∧ m − n < window`` becomes ``(m − n) <u max(window, 0)``: right at the empty window, the one-key
    window, tile-sized windows and one longer than the sequence, masked tiles and whole ones alike."""
    op = _op("sliding_window")
    src = op.forward.source(torch.float32, op.forward.dims({"e": 16, "f": 16}), False)
    assert ".to(tl.uint32) < (tl.maximum(p_window, 0)).to(tl.uint32)" in src.text
    inputs = _inputs("sliding_window", dataclasses.replace(SHAPE, M=37, N=37), F32)
    _assert_matches_reference(op, op(**inputs, window=window, schedule=Schedule(16, 16, 4, 1)), **inputs, window=window)


@pytest.mark.parametrize("name", sorted(UNLOWERABLE))
def test_unlowerable_example_says_why_and_reference_backend_runs(name):
    op, inputs = _op(name), _inputs(name, SHAPE, F32)
    with pytest.raises(LoweringError, match=UNLOWERABLE[name]):
        op(**inputs)
    got = op(**inputs, backend="reference")
    assert torch.equal(got, op.reference(**inputs).to(F32))


# -- edge cases ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "E, F", [(16, 16), (40, 40), (64, 64), (80, 80), (96, 96), (128, 128), (256, 256), (40, 24), (24, 96)]
)
def test_head_dims_padded_or_not(E, F):
    op = _op("causal")
    args = _qkv(1, 2, 1, 33, 29, E, F, dtype=F16)
    out = op(*args)
    assert out.shape == (1, 2, 33, F)
    _assert_matches_reference(op, out, *args)


@pytest.mark.parametrize("name", ["softmax", "causal", "bottom_right"])
@pytest.mark.parametrize("M, N", [(1, 1), (1, 37), (37, 1), (17, 31), (31, 17), (48, 48), (45, 45)])
def test_sequence_lengths(name, M, N):
    args = _qkv(2, 2, 2, M, N, 16)
    _assert_matches_reference(_op(name), _op(name)(*args), *args)


@pytest.mark.parametrize("Hq, Hkv", [(4, 4), (4, 1), (8, 2), (8, 1)], ids=["mha", "mqa4", "gqa4", "mqa8"])
def test_gqa_ratios(Hq, Hkv):
    op = _op("causal")
    args = _qkv(2, Hq, Hkv, 20, 33, 16, dtype=F16)
    out = op(*args)
    _assert_matches_reference(op, out, *args)
    # query head h reads kv head h // (Hq / Hkv): the same as repeating the kv heads
    q, k, v = args
    repeated = op(q, k.repeat_interleave(Hq // Hkv, 1), v.repeat_interleave(Hq // Hkv, 1))
    torch.testing.assert_close(out, repeated, rtol=0, atol=0)


FULLY_MASKED = [  # (name, M, N, params): some rows see no key
    ("sliding_window", 41, 23, {"window": 4}),  # rows m ≥ N + 3 are past every key of their window
    ("bottom_right", 30, 12, {}),  # the first M − N rows come before the first key
    ("top_theta", 37, 37, {}),  # the strictest thresholds prune whole rows
]


@pytest.mark.parametrize("name, M, N, params", FULLY_MASKED, ids=[c[0] for c in FULLY_MASKED])
@pytest.mark.parametrize("splits", [1, 3])
def test_fully_masked_rows_are_zero_with_initial_states(name, M, N, params, splits):
    op = _op(name)
    shape = dataclasses.replace(SHAPE, B=2, Hq=4, Hkv=2, M=M, N=N, E=16, F=16)
    inputs = _inputs(name, shape, F32)
    out, states = _forward(op, Schedule(16, 16, 4, 1, splits), **inputs, **params)
    empty = (op.reference(**inputs, **params) == 0).all(-1)
    assert empty.any() and not empty.all()
    assert not out.isnan().any() and (out[empty] == 0).all()
    _assert_matches_reference(op, out, **inputs, **params)
    for state_name, state in states.items():  # e.g. the running max is -inf and the sum 0: log-sum-exp is -inf
        init = op.forward.rewritten.tensor(state_name).init
        assert (state[empty] == init).all(), state_name


@pytest.mark.parametrize("name", ["softmax", "causal", "alibi"])
def test_non_contiguous_inputs_give_the_same_bits(name):
    B, H, M, N, E = 2, 2, 21, 34, 16
    inputs = _inputs(name, dataclasses.replace(SHAPE, B=B, Hq=H, Hkv=H, M=M, N=N, E=E, F=E), F32)
    q, k, v = inputs.pop("q"), inputs.pop("k"), inputs.pop("v")
    strided = {
        "q": q.transpose(1, 2).contiguous().transpose(1, 2),  # [B, M, H, E] memory, as many models keep it
        "k": torch.cat([k, torch.randn_like(k)], -1)[..., :E],  # a slice of a wider buffer
        "v": v.transpose(2, 3).contiguous().transpose(2, 3),
    }  # feature stride N, key stride 1
    assert not any(x.is_contiguous() for x in strided.values())
    if "slope" in inputs:
        inputs["slope"] = torch.stack([inputs["slope"], inputs["slope"]], -1)[:, 0]
        assert inputs["slope"].stride() == (2,)
    op = _op(name)
    out = op(**strided, **inputs)
    assert torch.equal(out, op(q=q, k=k, v=v, **inputs))
    _assert_matches_reference(op, out, **strided, **inputs)


@pytest.mark.parametrize("dtype", [F32, F16], ids=str)
@pytest.mark.parametrize("name", ["softmax", "causal", "softcap"])
def test_large_logits(name, dtype):
    op = _op(name)
    args = _qkv(1, 2, 2, 33, 40, 32, dtype=dtype, scale_q=30.0)
    out = op(*args)
    assert torch.isfinite(out).all()
    _assert_matches_reference(op, out, *args)


EMPTY = [(0, 5, 7), (2, 0, 7), (2, 5, 0)]  # (B, M, N)


@pytest.mark.parametrize("B, M, N", EMPTY, ids=["batch0", "queries0", "keys0"])
def test_empty_shapes_with_a_schedule(B, M, N):
    op = _op("causal")
    args = _qkv(B, 4, 2, M, N, 16)
    out = op(*args, schedule=Schedule(16, 16, 4, 1))
    assert out.shape == (B, 4, M, 16) and (out == 0).all()


@pytest.mark.parametrize("B, M", [(0, 5), (2, 0)], ids=["batch0", "queries0"])
def test_empty_shapes_with_the_default_schedule(B, M):
    args = _qkv(B, 4, 2, M, 7, 16)
    assert _op("causal")(*args).shape == (B, 4, M, 16)


@pytest.mark.parametrize("schedule", [Schedule(16, 16, 4, 1), Schedule(16, 16, 4, 1, 3, True)], ids=["fused", "split"])
def test_repeated_runs_give_identical_bits(schedule):
    op = _op("causal")
    args = _qkv(1, 4, 2, 37 if schedule.splits == 1 else 3, 45, 16, dtype=F16)
    first, _ = _forward(op, schedule, *args)
    for _ in range(2):
        assert torch.equal(_forward(op, schedule, *args)[0], first)


def test_fp16_inputs_accumulate_in_fp32():
    """q·k = 128·24² = 73728 and a tile's Σ_n p·v = 16·60000 both overflow fp16 (max 65504); with
    fp32 accumulators the scores are equal, the weights uniform, and the output is the mean of v."""
    op = _op("softmax")
    q, k = torch.full((1, 1, 16, 128), 24.0, dtype=F16), torch.full((1, 1, 45, 128), 24.0, dtype=F16)
    v = torch.full((1, 1, 45, 16), 60000.0, dtype=F16)
    v[:, :, ::2] = 30000.0
    out = op(q, k, v)
    assert out.dtype == F16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), v.double().mean(2, keepdim=True).expand_as(out), rtol=2e-3, atol=0)


def test_head_dims_padded_alike_get_kernels_of_their_own():
    """E = 40, 48 and 64 all pad to 64 in one process; each kernel must mask at its own true extent."""
    op = _op("softmax")
    for E in (40, 48, 64):
        args = _qkv(1, 1, 1, 17, 19, E)
        _assert_matches_reference(op, op(*args), *args)


def test_softcap_saturates_far_beyond_the_cap():
    """cap·tanh(s/cap) tends to ±cap: scores a hundred caps large must weigh as much as the cap allows.

    q and k hold small integers (times 25 for q), so every q·k is exact in fp32 and the error measured
    is the cap's, not the rounding of dot products whose terms are a hundred times larger than the result.
    """
    op = _op("softcap")
    q = torch.randint(-4, 5, (1, 1, 8, 16)).float() * 25.0
    args = (q, torch.randint(-2, 3, (1, 1, 16, 16)).float(), torch.randn(1, 1, 16, 16))
    _assert_matches_reference(op, op(*args, cap=1.0), *args, cap=1.0)


# -- decoding: split-KV and GQA packing --------------------------------------------------


@pytest.mark.parametrize("pack", [False, True], ids=["unpacked", "packed"])
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("M", [1, 4, 16])
@pytest.mark.parametrize("name", ["bottom_right", "alibi"])
def test_decode(name, M, splits, pack):
    op = _op(name)
    inputs = _inputs(name, dataclasses.replace(SHAPE, B=2, Hq=8, Hkv=2, M=M, N=77, E=16, F=16), F32)
    out = op(**inputs, schedule=Schedule(16, 16, 4, 1, splits, pack))
    _assert_matches_reference(op, out, **inputs)


@ef.attention
def routed_with_ties(q, k, v, w: ef.Tensor["e c"], width: int = 1):
    """Keys routed by the 3rd largest of integer gates over a held rank c (ties everywhere), gathered at n // width."""
    g = q @ w
    sel = g >= g.kth_largest(3, "c")
    return ef.softmax(ef.mask(q @ k * ef.scale, sel[ef.m, ef.n // width] & (ef.n <= ef.m + 40)), "n") @ v


@pytest.mark.parametrize("C", [2, 5, 16])
def test_a_kth_largest_over_a_held_rank_counts_ties_and_routes_by_a_gather(C):
    """The k-th largest of a row over c as torch.topk takes it (ties counted; of fewer than k entries, the
    smallest), and a routing row read at a position computed from the key (``tl.gather``)."""
    torch.manual_seed(0)
    q = torch.randint(-2, 3, (1, 2, 37, 16)).float()
    k, v = torch.randn(1, 1, 45, 16), torch.randn(1, 1, 45, 16)
    w = torch.randint(-1, 2, (16, C)).float()
    width = -(-45 // C)
    out = routed_with_ties(q, k, v, w=w, width=width)
    _assert_matches_reference(routed_with_ties, out, q, k, v, w=w, width=width)


def test_decode_a_convolution_over_the_scores_packed_and_split():
    """Multi-token attention's recomputed halo (q read one and two rows up, k one and two keys left) in programs
    that pack the GQA group's rows and split the keys: a packed row's neighbour is in its own head."""
    op = _op("multi_token")
    inputs = _inputs("multi_token", dataclasses.replace(SHAPE, B=1, Hq=4, Hkv=2, M=5, N=53, E=16, F=16), F32)
    out = op(**inputs, schedule=Schedule(16, 16, 4, 1, 3, True))
    _assert_matches_reference(op, out, **inputs)


@pytest.mark.parametrize("pack", [False, True], ids=["unpacked", "packed"])
def test_decode_with_more_splits_than_key_tiles(pack):
    """N = 9 is one key tile: two of the three splits see no key at all and must leave no trace."""
    op = _op("bottom_right")
    args = _qkv(1, 4, 2, 2, 9, 16, dtype=F16)
    out, _ = _forward(op, Schedule(16, 16, 4, 1, 3, pack), *args)
    _assert_matches_reference(op, out, *args)


@pytest.mark.parametrize("grad", [False, True], ids=["eager", "custom_op"])
def test_call_runs_the_schedule_it_was_given(grad):
    op, ran = _op("causal"), []
    real = forward_module.Forward.run

    def spy(self, inputs, values, schedule, *rest, **kw):
        ran.append(schedule)
        return real(self, inputs, values, schedule, *rest, **kw)

    wanted = Schedule(16, 16, 4, 1, 3, True)
    q, k, v = _qkv(1, 8, 2, 1, 40, 16)
    with mock.patch.object(forward_module.Forward, "run", spy):
        op(q.requires_grad_(grad), k, v, schedule=wanted)
    # a differentiable call keeps its states for the backward, so it runs the fused forward (no split-KV)
    assert ran == [dataclasses.replace(wanted, splits=1) if grad else wanted]


# -- visited key tiles --------------------------------------------------------------------

VISIT_PARAMS = {
    "causal": {},
    "sliding_window": {"window": 20},
    "prefix_lm": {"prefix": 21},
    "sink_window": {"window": 12, "sinks": 5},
    "bottom_right": {},
}
# (M, N, BM, BN): lengths not multiples of the tiles, BM ≠ BN, both M > N and M < N.
VISIT_SIZES = [(37, 45, 16, 32), (45, 37, 32, 16), (100, 77, 16, 32), (77, 100, 32, 16)]


def _brute_mask(name: str, M: int, N: int, params: dict) -> torch.Tensor:
    """The [M, N] mask, written here from the examples' docstrings (independent of einflash)."""
    m, n = torch.arange(M)[:, None], torch.arange(N)[None, :]
    return {
        "causal": lambda: n <= m,
        "bottom_right": lambda: n <= m + (N - M),
        "sliding_window": lambda: (n <= m) & (m - n < params.get("window", 0)),
        "prefix_lm": lambda: (n <= m) | (n < params.get("prefix", 0)),
        "sink_window": lambda: (n <= m) & ((m - n < params.get("window", 0)) | (n < params.get("sinks", 0))),
    }[name]().expand(M, N)


def _brute_counts(mask: torch.Tensor, row_tiles: list[slice], BN: int) -> list[int]:
    """Per query tile (a slice of rows), the key tiles of width BN holding at least one visible pair."""
    return [sum(bool(mask[rows, j : j + BN].any()) for j in range(0, mask.shape[1], BN)) for rows in row_tiles]


def _counting_run(op, inputs, params, schedule, launches: int = 1):
    """Run Forward.run with the kernel's visit counter on; the output and the counts [splits, B·H, tiles] (of
    each launch, with ``launches`` > 1: a two-stage forward's key stage, then its query stage)."""
    counts = []
    real = forward_module.launch

    def counting(*args, **kw):
        counts.append(real(*args, **kw, count_visits=True))

    with mock.patch.object(forward_module, "launch", counting):
        out, _ = _run(op, inputs, params, schedule)
    assert len(counts) == launches
    return out, counts[0] if launches == 1 else counts


@functools.cache
def _visits(name: str, M: int, N: int, BM: int, BN: int) -> list[int]:
    """Key tiles visited per query tile, counted by the kernel (every head alike); output checked on the way."""
    op, params = _op(name), VISIT_PARAMS[name]
    inputs = _inputs(name, dataclasses.replace(SHAPE, B=1, Hq=2, Hkv=2, M=M, N=N, E=16, F=16), F32)
    out, counts = _counting_run(op, inputs, params, Schedule(BM, BN, 4, 1))
    assert torch.equal(out, _run(op, inputs, params, Schedule(BM, BN, 4, 1))[0])  # counting changes nothing else
    _assert_matches_reference(op, out, **inputs, **params)
    assert counts.shape == (1, 2, -(-M // BM)) and (counts == counts[:, :1]).all()
    return counts[0, 0].tolist()


@pytest.mark.parametrize("M, N, BM, BN", VISIT_SIZES)
@pytest.mark.parametrize("name", list(VISIT_PARAMS))
def test_visited_tiles_are_the_plans_non_empty_tiles(name, M, N, BM, BN):
    c = _op(name).forward.rewritten
    plan = key_plan(c, sections(c).loop).plan
    assert plan is not None and plan.exact
    want = [sum(hi - lo for lo, hi in row.nonempty) for row in tile_rows(plan, M, N, BM, BN, **VISIT_PARAMS[name])]
    assert _visits(name, M, N, BM, BN) == want


@pytest.mark.parametrize("M, N, BM, BN", VISIT_SIZES)
@pytest.mark.parametrize("name", list(VISIT_PARAMS))
def test_visited_tiles_are_the_materialised_masks_non_empty_tiles(name, M, N, BM, BN):
    mask = _brute_mask(name, M, N, VISIT_PARAMS[name])
    rows = [slice(i, i + BM) for i in range(0, M, BM)]
    got = _visits(name, M, N, BM, BN)
    assert got == _brute_counts(mask, rows, BN)
    assert sum(got) < len(rows) * -(-N // BN)  # the masks do leave tiles out


def test_moba_visits_only_the_key_tiles_its_rows_route_to():
    """MoBA's key-block sums are a key stage (one program per head visits every key tile once); its routed pass
    leaves out a key tile when no row of the query tile routes to its blocks: each query program visits exactly
    the tiles of the materialised routing mask that hold a pair (fewer than the causal ones), and none for the
    block sums."""
    M = N = 192
    inputs = _inputs("moba", dataclasses.replace(SHAPE, B=1, Hq=1, Hkv=1, M=M, N=N, E=16, F=16), F32)
    out, (keys, queries) = _counting_run(_op("moba"), inputs, {"block": 16}, Schedule(16, 16, 4, 1), launches=2)
    _assert_matches_reference(_op("moba"), out, **inputs, block=16)
    mask = formulas.moba_mask(inputs["q"], inputs["k"], block=16)[0, 0]
    want = _brute_counts(mask, [slice(i, i + 16) for i in range(0, M, 16)], 16)
    assert keys.tolist() == [[[N // 16]]] and queries[0, 0].tolist() == want
    assert sum(want) < sum(i + 1 for i in range(M // 16))  # some causal tiles are left out


@pytest.mark.parametrize("pack", [False, True], ids=["unpacked", "packed"])
@pytest.mark.parametrize("name", ["bottom_right", "sliding_window"])
def test_split_programs_visit_their_share_of_the_non_empty_tiles(name, pack):
    """4 queries, 77 keys in 5 tiles of 16, 3 splits of at most 2 tiles each. Packed, one program
    holds the 4 queries of all 4 query heads of a kv head."""
    op, M, N, params = _op(name), 4, 77, VISIT_PARAMS[name]
    inputs = _inputs(name, dataclasses.replace(SHAPE, B=1, Hq=8, Hkv=2, M=M, N=N, E=16, F=16), F32)
    out, counts = _counting_run(op, inputs, params, Schedule(16, 16, 4, 1, 3, pack))
    _assert_matches_reference(op, out, **inputs, **params)
    assert counts.shape == (3, 2 if pack else 8, 1) and (counts == counts[:, :1, :1]).all()
    per_split = counts[:, 0, 0].tolist()
    assert max(per_split) <= 2
    assert sum(per_split) == _brute_counts(_brute_mask(name, M, N, params), [slice(0, M)], 16)[0]


# -- two stages: a summary of the keys, then the query tiles -------------------------------------------


@pytest.mark.parametrize("schedule", [Schedule(16, 16, 4, 1), Schedule(16, 16, 4, 1, 3, True)], ids=["fused", "split"])
@pytest.mark.parametrize("M", [1, 37])
@pytest.mark.parametrize("name", ["linear", "agent"])
def test_two_stage_forward_decodes_and_prefills(name, M, schedule):
    """The key stage summarises all keys once per (batch, query head) and the query stage reads the summary:
    decoding and prefill, GQA, a padded head dim, fp16; a schedule's splits cut the key stage's keys (each split
    leaves partial summaries, one fold program per head folds them), its packed heads are not used (the query
    stage reads a summary per head)."""
    op = _op(name)
    inputs = _inputs(name, dataclasses.replace(SHAPE, B=2, Hq=4, Hkv=2, M=M, N=77, E=24, F=16), F16)
    _assert_matches_reference(op, op(**inputs, schedule=schedule), **inputs)


@ef.attention
def normalised_linear(q, k, v):
    """Katharopoulos et al.'s linear attention, as a user writes it: the weights' row sums normalise."""
    a = ef.einsum("m e, n e -> m n", ef.relu(q) + 1.0, ef.relu(k) + 1.0)
    return (a @ v) / a.sum("n")


@pytest.mark.parametrize("N", [0, 20, 150])
@pytest.mark.parametrize("name", ["linear", "agent", "normalised_linear", "moba"])
def test_split_key_stage_folds_to_the_unsplit_summaries(name, N):
    """7 splits of the key stage's keys (more than its key tiles at N = 20: some splits see no key, and at N = 0
    none does) fold to the summaries of one pass; MoBA's block sums split too, before its routed pass."""
    if name == "normalised_linear" and N == 0:
        pytest.skip("with no keys the reference divides an empty sum by an empty sum (NaN); the kernels leave 0")
    op = normalised_linear if name == "normalised_linear" else _op(name)
    assert op.forward.keys_splittable
    shape = dataclasses.replace(SHAPE, B=2, Hq=4, Hkv=2, M=37, N=N, E=24, F=16)
    inputs = _inputs("linear" if name == "normalised_linear" else name, shape, F16)
    params = {"block": 5} if name == "moba" else {}
    one = op(**inputs, **params, schedule=Schedule(16, 16, 4, 1))
    split = op(**inputs, **params, schedule=Schedule(16, 16, 4, 1, 7))
    _assert_matches_reference(op, split, **inputs, **params)
    torch.testing.assert_close(split, one, rtol=2e-3, atol=2e-3)


def test_two_stage_forward_of_a_normalised_feature_map():
    """Both readers of the weights become summaries of the keys (E×F and E), which the query stage reads."""
    op = normalised_linear
    assert op.forward.stages is not None and len(op.forward.stages.summaries) == 2
    args = _qkv(2, 4, 2, 37, 45, 24, 16, dtype=F16)
    _assert_matches_reference(op, op(*args), *args)


def test_two_stage_forward_of_no_keys_is_zero_and_so_are_its_gradients():
    """With no keys the summary is absent, and so is every output row (0); nothing reaches any input."""
    op = _op("linear")
    q, k, v = (x.requires_grad_() for x in _qkv(2, 2, 1, 9, 0, 16))
    out = op(q, k, v)
    assert (out == 0).all()
    out.sum().backward()
    assert all(x.grad is not None and (x.grad == 0).all() for x in (q, k, v))


def test_two_stage_jagged_batch_matches_each_sequence_alone():
    """Each sequence's summary is its own keys' (an empty sequence of keys leaves its rows 0)."""
    op = _op("linear")
    args, offsets = _jagged(JAGGED_LENGTHS, Hq=4, Hkv=2, dtype=F16)
    out = op(*args, **offsets)
    _assert_matches_reference(op, out, *args, **offsets)
    q, k, v = args
    for (q0, k0), (m, n) in zip(
        zip(offsets["cu_seqlens_q"].tolist(), offsets["cu_seqlens_k"].tolist()), JAGGED_LENGTHS
    ):
        assert torch.equal(out[:, :, q0 : q0 + m], op(q[:, :, q0 : q0 + m], k[:, :, k0 : k0 + n], v[:, :, k0 : k0 + n]))
    assert (out[:, :, 22:25] == 0).all()  # the sequence with no keys


# -- the chunked form: causal attention in linear form, chunk by chunk -------------------------------------


def _chunked_op(name: str) -> ef.AttentionOp:
    return {"plain_causal_linear": plain_causal_linear, "anticausal_decay": anticausal_decay}.get(name) or _op(name)


@pytest.mark.parametrize("dtype", [F16, F32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("N", [40, 130, 200])
@pytest.mark.parametrize("name", ["causal_linear", "gla", "plain_causal_linear", "anticausal_decay"])
def test_chunked_forward_matches_the_reference(name, N, dtype):
    """Past the crossover the forward runs the chunked form: the state kernel stores the state before each chunk
    of 64, the query tiles of 16 take their own chunk's keys up to theirs and the state before the chunk (after
    it, for a mask n ≥ m). GQA (the state is per query head: the decay is), lengths that are not multiples of the
    chunk, a padded head dim."""
    op = _chunked_op(name)
    shape = dataclasses.replace(SHAPE, B=2, Hq=4, Hkv=2, M=N, N=N, E=24, F=16)
    inputs = _inputs("causal_linear" if name in ("plain_causal_linear", "anticausal_decay") else name, shape, dtype)
    inputs = {t: x for t, x in inputs.items() if t in {i.name for i in op.cascade.inputs}}
    schedule = Schedule(16, 16, 4, 1)
    chunked = op.forward.runs_chunked(bind_extents(op.forward.rewritten, inputs, {}), schedule)
    assert (chunked is not None) == (op.forward.linear.crossover(64, 24, 16) <= N)
    with mock.patch.object(forward_module.Forward, "_run_chunked", wraps=op.forward._run_chunked) as ran:
        out = op(**inputs, schedule=schedule)
    assert ran.called == (chunked is not None)
    _assert_matches_reference(op, out, **inputs)


def test_chunked_form_runs_where_it_is_cheaper_and_as_written_elsewhere():
    """Decoding (M ≠ N), training and softmax keep the quadratic kernel; causal linear attention past its crossover
    runs chunks, and its quadratic and chunked outputs agree."""
    op = _op("causal_linear")
    schedule = Schedule(16, 16, 4, 1)
    extents = {"b": 1, "h": 2, "m": 160, "n": 160, "e": 24, "f": 16}
    assert op.forward.runs_chunked(extents, schedule) is not None
    assert op.forward.runs_chunked(extents | {"m": 1}, schedule) is None
    assert _op("causal").forward.runs_chunked(extents, schedule) is None
    inputs = _inputs("causal_linear", dataclasses.replace(SHAPE, B=1, M=160, N=160), F32)
    chunked = op(**inputs, schedule=schedule)
    quadratic = op(**inputs, schedule=Schedule(128, 128, 4, 1))  # chunks of 128 cross over later
    torch.testing.assert_close(chunked, quadratic, rtol=1e-4, atol=1e-4)


# -- jagged batches ------------------------------------------------------------------------

# (query length, key length) per sequence: lengths that are not multiples of the tile, M ≠ N, an empty
# sequence of queries, one with no keys (its rows are fully masked: output 0), one longer than a tile.
JAGGED_LENGTHS = [(5, 9), (17, 17), (0, 4), (3, 0), (33, 20)]


def _jagged(lengths, Hq: int, Hkv: int, E: int = 16, dtype=F32):
    cu_q = torch.tensor([0] + [m for m, _ in lengths]).cumsum(0)
    cu_k = torch.tensor([0] + [n for _, n in lengths]).cumsum(0)
    q, k, v = _qkv(1, Hq, Hkv, int(cu_q[-1]), int(cu_k[-1]), E, dtype=dtype)
    return (q, k, v), {"cu_seqlens_q": cu_q, "cu_seqlens_k": cu_k}


@pytest.mark.parametrize("schedule", [Schedule(16, 16, 4, 1), Schedule(16, 16, 4, 1, 1, True)], ids=["fused", "packed"])
@pytest.mark.parametrize("name", ["causal", "bottom_right", "alibi", "sliding_window"])
def test_jagged_batch_matches_each_sequence_alone(name, schedule):
    """Every sequence of the packed batch gives the same bits as the kernel run on that sequence alone."""
    op = _op(name)
    args, offsets = _jagged(JAGGED_LENGTHS, Hq=4, Hkv=2, dtype=F16)
    extra = {"slope": torch.rand(4)} if name == "alibi" else {"window": 4} if name == "sliding_window" else {}
    out = op(*args, **offsets, **extra, schedule=schedule)
    assert out.shape == (1, 4, args[0].shape[2], 16)
    _assert_matches_reference(op, out, *args, **offsets, **extra)
    q, k, v = args
    for (q0, k0), (m, n) in zip(
        zip(offsets["cu_seqlens_q"].tolist(), offsets["cu_seqlens_k"].tolist()), JAGGED_LENGTHS
    ):
        alone = op(q[:, :, q0 : q0 + m], k[:, :, k0 : k0 + n], v[:, :, k0 : k0 + n], **extra, schedule=schedule)
        assert torch.equal(out[:, :, q0 : q0 + m], alone)
    assert (out[:, :, 22:25] == 0).all()  # the sequence with no keys


@pytest.mark.parametrize("name", ["multi_token", "moba"])
def test_jagged_batch_of_recomputed_and_routed_scores(name):
    """Multi-token attention reads q and k at shifted rows and keys, which in a packed batch start at the
    sequence's first ones (a neighbour in the previous sequence is outside, not read); MoBA sums its key blocks
    per sequence. Each sequence gives the bits it gives alone."""
    op = _op(name)
    lengths = [(20, 20), (33, 33), (7, 7)]
    args, offsets = _jagged(lengths, Hq=2, Hkv=1)
    extra = _inputs(name, dataclasses.replace(SHAPE, Hq=2), F32)
    extra = {n: x for n, x in extra.items() if n not in "qkv"} | ({"block": 5} if name == "moba" else {})
    out = op(*args, **offsets, **extra, schedule=Schedule(16, 16, 4, 1))
    _assert_matches_reference(op, out, *args, **offsets, **extra)
    q, k, v = args
    for q0, (m, _) in zip(offsets["cu_seqlens_q"].tolist(), lengths):
        alone = op(*(x[:, :, q0 : q0 + m] for x in (q, k, v)), **extra, schedule=Schedule(16, 16, 4, 1))
        assert torch.equal(out[:, :, q0 : q0 + m], alone)


def test_jagged_batch_with_the_default_schedule_and_int64_offsets():
    op = _op("causal")
    args, offsets = _jagged([(40, 40), (7, 50)], Hq=2, Hkv=2)
    _assert_matches_reference(op, op(*args, **offsets), *args, **offsets)


def test_jagged_batch_refuses_what_it_cannot_do():
    op = _op("causal")
    args, offsets = _jagged([(4, 4), (3, 6)], Hq=2, Hkv=1)
    with pytest.raises(LoweringError, match="split-KV decoding of a jagged batch"):
        op(*args, **offsets, schedule=Schedule(16, 16, 4, 1, 2, True))
    q, k, v = args
    with pytest.raises(LoweringError, match="log-sum-exp of a jagged batch is not differentiated"):
        op(q.requires_grad_(), k, v, **offsets, return_lse=True)


def _sequence(op, given: dict, at: tuple[int, int], lengths: tuple[int, int]) -> dict:
    """One sequence's slice of a jagged batch's inputs: rows along m and keys along n, the rest whole."""
    out = {}
    for t in op.cascade.inputs:
        x = given[t.name]
        for d, r in enumerate(t.ranks):
            if r in ("m", "n"):
                start, length = (at[0], lengths[0]) if r == "m" else (at[1], lengths[1])
                x = x.narrow(d, start, length)
        out[t.name] = x
    return out


# per-head inputs (slopes, the differential λ, a learnable cap, agent tokens) sum their gradient over the sequences;
# linear and agent run in two stages, whose backward differentiates each sequence's slice
JAGGED_TRAINING = ["causal", "alibi", "sliding_window", "head_gate", "differential", "softcap", "sigmoid"]
JAGGED_TRAINING += ["linear", "agent"]


@pytest.mark.parametrize("name", JAGGED_TRAINING)
def test_jagged_batch_trains_as_each_sequence_alone(name):
    """A jagged batch's gradients, packed as its inputs are: each sequence's rows and keys get the bits they get
    alone (checked against the float64 reference), an input without rows or keys the sum over the sequences;
    the sequences with no query or no key get 0."""
    op, schedule = _op(name), Schedule(16, 16, 4, 1)
    cu_q = torch.tensor([0] + [m for m, _ in JAGGED_LENGTHS]).cumsum(0)
    cu_k = torch.tensor([0] + [n for _, n in JAGGED_LENGTHS]).cumsum(0)
    packed = ef.Shape(B=1, Hq=4, M=int(cu_q[-1]), N=int(cu_k[-1]), E=16, Hkv=2)
    given = ef.testing.random_inputs(op, packed)
    params = {"window": 4} if name == "sliding_window" else {}
    leaves = ef.testing.trainable(op, given)
    out = op(**leaves, **params, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, schedule=schedule)
    grad = torch.randn_like(out)
    out.backward(grad)
    learned = [n for n, x in leaves.items() if x.requires_grad]
    whole = [n for n in learned if not {"m", "n"} & set(op.cascade.tensor(n).ranks)]
    summed = {n: torch.zeros_like(given[n]) for n in whole}
    for at, lengths in zip(zip(cu_q.tolist(), cu_k.tolist()), JAGGED_LENGTHS):
        got = _sequence(op, given | {n: x.grad for n, x in leaves.items() if x.requires_grad}, at, lengths)
        if lengths[0] * lengths[1] == 0:
            assert all((got[n] == 0).all() for n in learned if n not in whole)
            continue
        alone = ef.testing.trainable(op, _sequence(op, given, at, lengths))
        rows = grad.narrow(2, at[0], lengths[0])
        op(**alone, **params, schedule=schedule).backward(rows)
        for n in learned:
            if n in whole:
                summed[n] += alone[n].grad
            else:
                assert torch.equal(got[n], alone[n].grad), n
        verdicts = check_gradients(
            op, {n: alone[n].grad for n in learned}, rows, **_sequence(op, given, at, lengths), **params
        )
        assert all(v.ok for v in verdicts.values()), {n: v.as_dict() for n, v in verdicts.items()}
    for n in whole:
        torch.testing.assert_close(leaves[n].grad, summed[n], rtol=1e-6, atol=1e-6)


# -- key tiles listed at run time ---------------------------------------------------------------


@pytest.mark.parametrize(
    "schedule",
    [Schedule(16, 16, 4, 1), Schedule(8, 16, 4, 1), Schedule(16, 16, 4, 1, 3, True)],
    ids=["16x16", "8x16", "split-packed"],
)
def test_document_mask_visits_only_its_listed_tiles(schedule):
    """Documents of 16 tokens: the kernel visits exactly the non-empty tiles of the materialised mask,
    fewer than causal alone would, and matches the reference."""
    op, M, N = _op("document_mask"), (5 if schedule.pack else 48), 48
    inputs = _inputs("document_mask", dataclasses.replace(SHAPE, B=2, Hq=4, Hkv=2, M=M, N=N, E=16, F=16), F32)
    inputs["doc"] = (torch.arange(N) // 16).expand(2, N).contiguous()
    out, counts = _counting_run(op, inputs, {}, schedule)
    _assert_matches_reference(op, out, **inputs)
    mask = (inputs["doc"][0, :M, None] == inputs["doc"][0, None, :]) & (torch.arange(N) <= torch.arange(M)[:, None])
    rows = [slice(0, M)] if schedule.pack else [slice(i, i + schedule.block_m) for i in range(0, M, schedule.block_m)]
    want = _brute_counts(mask, rows, schedule.block_n)
    visited = counts.sum(0)[0].tolist()  # the splits' shares added up
    assert visited == want
    if not schedule.pack:  # (5 packed queries see the first key tile only, under causal alone too)
        causal = _brute_counts(torch.arange(N) <= torch.arange(M)[:, None], rows, schedule.block_n)
        assert sum(visited) < sum(causal)


@pytest.mark.parametrize("schedule", [Schedule(16, 16, 4, 1), Schedule(16, 16, 4, 1, 3, True)], ids=["fused", "split"])
def test_a_per_token_input_read_past_its_end_is_refused(schedule):
    """doc has N entries and would be read at query positions m ≥ N too (M > N): a read outside an input is an
    error at call, not rows that silently see no key."""
    op, M, N = _op("document_mask"), (56 if schedule.splits == 1 else 5), (40 if schedule.splits == 1 else 3)
    inputs = _inputs("document_mask", dataclasses.replace(SHAPE, B=2, Hq=4, Hkv=2, M=M, N=N, E=16, F=16), F32)
    with pytest.raises(ShapeError, match=f"reads doc at n = m, which runs from 0 to {M - 1}"):
        op(**inputs, schedule=schedule)
    with pytest.raises(ShapeError, match="outside doc's"):
        op.reference(**inputs)


# -- masks on functions of one position: blocks, strides --------------------------------------------


def _positional(predicate):
    @ef.attention
    def positional(q, k, v, block: int = 8):
        return ef.softmax(ef.mask(q @ k * ef.scale, predicate(block)), "n") @ v

    return positional


# (declared mask, the same mask written out in torch, whether tile ranges decide it exactly)
POSITION_MASKS = {
    "block diagonal": (lambda c: ef.n // c == ef.m // c, lambda m, n, c: n // c == m // c, True),
    "blocks of two lengths": (lambda c: ef.n // (2 * c) == ef.m // c, lambda m, n, c: n // (2 * c) == m // c, True),
    "chunked local causal": (
        lambda c: (ef.m // c == ef.n // c) & (ef.n <= ef.m),
        lambda m, n, c: (m // c == n // c) & (n <= m),
        False,
    ),
    "same residue": (lambda c: ef.n % 4 == ef.m % 4, lambda m, n, c: n % 4 == m % 4, True),
}


@pytest.mark.parametrize("M, N, BM, BN", VISIT_SIZES)
@pytest.mark.parametrize("name", list(POSITION_MASKS))
def test_a_mask_on_positions_skips_the_tiles_it_empties(name, M, N, BM, BN):
    """``f(m) == g(n)`` tiles are classified at run time by the ranges of f over the tile's rows and of g over
    its keys: a block-diagonal mask visits only the tiles that hold a pair, and the result matches."""
    declared, brute, exact = POSITION_MASKS[name]
    op = _positional(declared)
    inputs = _inputs("causal", dataclasses.replace(SHAPE, B=1, Hq=2, Hkv=2, M=M, N=N, E=16, F=16), F32)
    out, counts = _counting_run(op, inputs, {"block": 8}, Schedule(BM, BN, 4, 1))
    _assert_matches_reference(op, out, **inputs, block=8)
    got = counts[0, 0].tolist()
    m, n = torch.arange(M)[:, None], torch.arange(N)[None, :]
    want = _brute_counts(brute(m, n, 8).expand(M, N), [slice(i, i + BM) for i in range(0, M, BM)], BN)
    if exact:
        assert got == want
    else:  # the affine part and the block test each keep a tile: a superset, never a tile with a pair left out
        assert all(g >= w for g, w in zip(got, want)) and sum(got) < len(got) * -(-N // BN)


def test_a_kernel_that_runs_out_of_shared_memory_raises_a_typed_error():
    """Triton's OutOfResources (a schedule too large for the target) comes out as OutOfResourcesError, naming the
    kernel, what it needs and what the target has, and what to do; the backward's fitting still shrinks on it."""
    from einflash.compiler.codegen.signature import KernelCall
    from einflash.compiler.runtime import launch as launch_module
    from einflash.errors import OutOfResourcesError

    class OutOfResources(Exception):  # Triton's, by name
        pass

    def refuse(*args, **kwargs):
        raise OutOfResources("out of resource: shared memory, Required: 279040, Hardware limit: 232448.")

    src = _op("causal").forward.source(F16, {"e": 16, "e_extent": 16, "f": 16, "f_extent": 16}, False)
    call = KernelCall((1, 1, 1), {}, 8, 3)
    with (
        mock.patch.object(launch_module, "load_kernel", lambda s: {(1, 1, 1): refuse}),
        pytest.raises(OutOfResourcesError, match=r"needs 279,040 B, the target has 232,448 B\. pass a smaller"),
    ):
        launch_module.jit_launch(src, call)
