"""Inputs read at computed positions: a relative-position table at ``n − m + M − 1``, a row of a table at a
constant, a key-indexed array at the query's position in chunked prefill, and gathers: T5's table at the bucket of
each offset, a segment-pair table at the segments of m and n. Each kernel (prefill, decode with GQA
packing, split-KV) against the float64 reference under the tolerance rule; the backward with the table frozen,
and with tables read along the diagonals learning; what is refused, and how."""

import pytest
import torch

import einflash as ef
from einflash.compiler.schedule import BackwardSchedule, Schedule
from einflash.errors import DifferentiationError, DTypeError, LoweringError, ShapeError
from einflash.testing import check, check_gradients


@ef.attention
def relative(q, k, v, rel: ef.Tensor["h r"]):
    return ef.softmax(q @ k * ef.scale + rel[ef.n - ef.m + ef.M - 1], "n") @ v


@ef.attention
def table_row(q, k, v, tab: ef.Tensor["h x r"], c: int = 4):
    s = q @ k * ef.scale + tab[1, ef.n - ef.m + ef.M + c]
    return ef.softmax(ef.mask(s, ef.n <= ef.m + ef.N - ef.M), "n") @ v


@ef.attention
def chunked_documents(q, k, v, doc: ef.Tensor["b n"]):
    s = q @ k * ef.scale
    here = ef.m + ef.N - ef.M  # the query's position among the keys
    return ef.softmax(ef.mask(s, (doc[ef.n] == doc[here]) & (ef.n <= here)), "n") @ v


@ef.attention
def bucketed(q, k, v, table: ef.Tensor["h r"], bucket: ef.Tensor["d"]):  # noqa: F821 -- a rank name
    return ef.softmax(q @ k * ef.scale + table[bucket[ef.n - ef.m + ef.M - 1]], "n") @ v


@ef.attention
def segment_pairs(q, k, v, pair: ef.Tensor["h x y"], seg: ef.Tensor["b n"]):
    here = ef.m + ef.N - ef.M
    return ef.softmax(q @ k * ef.scale + pair[seg[here], seg[ef.n]], "n") @ v


GATHERS = [bucketed, segment_pairs]


def _inputs(op, B, Hq, Hkv, M, N, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, M, D, generator=g).to(dtype)
    k, v = (torch.randn(B, Hkv, N, D, generator=g).to(dtype) for _ in range(2))
    extra = {
        "relative": lambda: {"rel": torch.randn(Hq, M + N - 1, generator=g).to(dtype)},
        "table_row": lambda: {"tab": torch.randn(Hq, 3, M + N + 5, generator=g).to(dtype)},
        "chunked_documents": lambda: {"doc": torch.sort(torch.randint(0, 3, (B, N), generator=g), -1).values},
        "bucketed": lambda: {
            "table": torch.randn(Hq, 7, generator=g).to(dtype),
            "bucket": torch.randint(0, 7, (M + N - 1,), generator=g, dtype=torch.int32),
        },
        "segment_pairs": lambda: {
            "pair": torch.randn(Hq, 4, 4, generator=g).to(dtype),
            "seg": torch.sort(torch.randint(0, 4, (B, N), generator=g), -1).values,
        },
    }[op.name]()
    return dict(q=q, k=k, v=v, **extra)


SHAPES = {  # B, Hq, Hkv, M, N, D
    "prefill": (1, 2, 2, 40, 70, 16),
    "decode, GQA packed": (2, 4, 2, 1, 77, 32),
    "chunked prefill": (1, 2, 1, 5, 130, 16),
}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("op", [relative, table_row, chunked_documents, *GATHERS], ids=lambda op: op.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_a_read_at_computed_positions_matches_the_reference(op, shape, dtype):
    inputs = _inputs(op, *SHAPES[shape], dtype=dtype)
    assert check(op, op(**inputs), **inputs).ok


def test_a_relative_table_under_split_kv_matches_the_reference():
    inputs = _inputs(relative, 1, 2, 2, 3, 200, 16)
    assert check(relative, relative(**inputs, schedule=Schedule(16, 32, 4, 1, splits=3)), **inputs).ok


def test_a_table_rank_is_no_head_dimension():
    # was: the table's extent (M + N − 1 = 304) was taken for a head dimension and the call refused
    inputs = _inputs(relative, 1, 2, 2, 5, 300, 16)
    assert relative.cascade.table_ranks == {"r"}
    assert check(relative, relative(**inputs), **inputs).ok
    assert "R" not in str(relative.explain().buffer_formula)  # loaded a tile at a time, never held whole


def test_a_read_past_the_table_is_a_shape_error_naming_the_line():
    inputs = _inputs(relative, 1, 2, 2, 8, 16, 16)
    inputs["rel"] = inputs["rel"][:, :-1]
    with pytest.raises(ShapeError, match=r"test_offset_reads.py:\d+: reads rel at r = .* outside rel's 0..21"):
        relative(**inputs)


def test_a_jagged_batch_with_a_computed_read_is_refused_and_the_reference_runs_it():
    inputs = _inputs(relative, 1, 2, 2, 6, 40, 16)
    offsets = dict(cu_seqlens_q=torch.tensor([0, 2, 6]), cu_seqlens_k=torch.tensor([0, 10, 40]))
    with pytest.raises(LoweringError, match="rel at computed positions are not lowered for jagged batches"):
        relative(**inputs, **offsets)
    assert relative.reference(**inputs, **offsets).shape == (1, 2, 6, 16)


@pytest.mark.parametrize("op", [relative, chunked_documents, *GATHERS], ids=lambda op: op.name)
def test_the_backward_with_the_table_frozen_matches_autograd(op):
    inputs = _inputs(op, 1, 2, 2, 24, 40, 16, dtype=torch.float16)
    leaves = {n: inputs[n].clone().requires_grad_() for n in ("q", "k", "v")}
    grad_output = torch.randn(1, 2, 24, 16, generator=torch.Generator().manual_seed(1)).half()
    op(**(inputs | leaves)).backward(grad_output)
    verdicts = check_gradients(op, {n: x.grad for n, x in leaves.items()}, grad_output, **inputs)
    assert set(verdicts) == {"q", "k", "v"} and all(v.ok for v in verdicts.values())


def _learned(op, given: dict, learning, grad_output, schedule=None, **params) -> tuple[dict, dict]:
    """The gradients of the inputs named ``learning`` through autograd, and their verdicts against the float64
    reference under the tolerance rule."""
    leaves = {n: given[n].clone().requires_grad_() for n in learning}
    op(**(given | leaves), **params, backward_schedule=schedule).backward(grad_output)
    grads = {n: x.grad for n, x in leaves.items()}
    return grads, check_gradients(op, grads, grad_output, **given, **params)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("op, table", [(relative, "rel"), (bucketed, "table")], ids=["offsets", "gathered"])
@pytest.mark.parametrize(
    "schedule", [BackwardSchedule(32, 16, 4, 1), BackwardSchedule(16, 32, 4, 1, atomic_dq=True)], ids=["bm32", "atomic"]
)
def test_a_table_read_along_the_diagonals_learns(op, table, dtype, schedule):
    # each key tile's program sums its pairs' gradients along their diagonals (pairs with one n − m read one
    # entry), adding its query tiles' sums into its own row; the rows are added up after the kernel, and a
    # gathered table's entries collected through the integer input
    inputs = _inputs(op, 1, 4, 2, 37, 45, 16, dtype=dtype)
    grad_output = torch.randn(1, 4, 37, 16, generator=torch.Generator().manual_seed(1)).to(dtype)
    _, verdicts = _learned(op, inputs, ("q", "k", "v", table), grad_output, schedule)
    assert set(verdicts) == {"q", "k", "v", table} and all(v.ok for v in verdicts.values()), verdicts
    assert "frozen input" not in str(op.explain())


@ef.attention
def shared_reversed(q, k, v, rel: ef.Tensor["r"]):  # noqa: F821 -- one table for every head, read at m − n
    return ef.softmax(q @ k * ef.scale + rel[ef.m - ef.n + ef.N - 1], "n") @ v


@ef.attention
def per_sequence_causal(q, k, v, rel: ef.Tensor["b h r"]):  # a table per sequence and head, under a causal mask
    s = q @ k * ef.scale + rel[ef.n - ef.m + ef.M - 1]
    return ef.softmax(ef.mask(s, ef.n <= ef.m + ef.N - ef.M), "n") @ v


@ef.attention
def halves(q, k, v, rel: ef.Tensor["h r"]):  # n − m + M − 1, its offset written with floor divisions
    return ef.softmax(q @ k * ef.scale + rel[ef.n - ef.m + (ef.M + 1) // 2 + ef.M // 2 - 1], "n") @ v


@pytest.mark.parametrize(
    "op, shape", [(shared_reversed, ()), (per_sequence_causal, (2, 4)), (halves, (4,))], ids=lambda x: str(x)
)
def test_tables_shared_by_the_heads_or_per_sequence_learn_along_either_diagonal_at_any_offset(op, shape):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, n, 16, generator=g) for h, n in ((4, 21), (2, 30), (2, 30)))
    given = dict(q=q, k=k, v=v, rel=torch.randn(*shape, 21 + 30 - 1, generator=g))
    grad_output = torch.randn(2, 4, 21, 16, generator=g)
    _, verdicts = _learned(op, given, given, grad_output, BackwardSchedule(16, 16, 4, 1))
    assert set(verdicts) == set(given) and all(v.ok for v in verdicts.values()), verdicts


def test_a_table_read_at_a_constant_row_and_along_the_diagonals_learns_in_that_row():
    @ef.attention
    def second_row(q, k, v, tab: ef.Tensor["h x r"]):
        return ef.softmax(q @ k * ef.scale + tab[1, ef.n - ef.m + ef.M - 1], "n") @ v

    inputs = _inputs(relative, 1, 2, 2, 13, 21, 16)
    inputs["tab"] = torch.randn(2, 3, 13 + 21 - 1, generator=torch.Generator().manual_seed(2))
    del inputs["rel"]
    grad_output = torch.randn(1, 2, 13, 16, generator=torch.Generator().manual_seed(1))
    grads, verdicts = _learned(second_row, inputs, ("q", "k", "v", "tab"), grad_output)
    assert all(v.ok for v in verdicts.values()), verdicts
    assert bool((grads["tab"][:, [0, 2]] == 0).all()) and bool((grads["tab"][:, 1] != 0).any())


def test_a_table_read_at_an_offset_by_a_parameter_learns():
    inputs = _inputs(table_row, 1, 2, 2, 11, 16, 16)
    grad_output = torch.randn(1, 2, 11, 16, generator=torch.Generator().manual_seed(1))
    grads, verdicts = _learned(table_row, inputs, ("q", "k", "v", "tab"), grad_output, c=2)
    assert all(v.ok for v in verdicts.values()), verdicts
    # n − m + M + c runs from c + 1 (the last query, the first key) to N + c (the causal mask's end-aligned edge)
    row = grads["tab"][:, 1]
    assert bool((row[:, 3:19] != 0).all()) and not row[:, :3].any() and not row[:, 19:].any()
    assert not grads["tab"][:, [0, 2]].any()


def test_a_table_read_at_a_computed_position_off_the_diagonals_is_frozen_and_a_call_that_trains_it_refused():
    @ef.attention
    def periodic(q, k, v, rel: ef.Tensor["h r"]):
        return ef.softmax(q @ k * ef.scale + rel[(ef.n - ef.m) % 5], "n") @ v

    q, rel = torch.randn(1, 2, 9, 16), torch.randn(2, 5, requires_grad=True)
    with pytest.raises(DifferentiationError, match=r"rel requires grad, but .*:\d+ reads rel at .*a frozen table"):
        periodic(q, q, q, rel)
    assert "frozen input" in str(periodic.explain())


def test_an_index_modulo_a_period_matches_the_reference():
    @ef.attention
    def periodic(q, k, v, rel: ef.Tensor["h r"]):
        return ef.softmax(q @ k * ef.scale + rel[(ef.n - ef.m) % 5], "n") @ v  # floor-mod: negative offsets too

    q, rel = torch.randn(1, 2, 9, 16), torch.randn(2, 5)
    assert check(periodic, periodic(q, q, q, rel), q, q, q, rel=rel).ok


def test_an_index_by_a_float_parameter_is_refused_naming_the_line():
    @ef.attention
    def by_float(q, k, v, rel: ef.Tensor["h r"], w: float = 1.0):
        return ef.softmax(q @ k * ef.scale + rel[ef.n - ef.m + ef.M + w], "n") @ v

    q = torch.randn(1, 2, 9, 16)
    with pytest.raises(LoweringError, match=r"test_offset_reads.py:\d+: an index names w, .*`w: int`"):
        by_float(q, q, q, torch.randn(2, 40))


def test_a_gather_through_floats_is_refused_naming_the_line():
    inputs = _inputs(bucketed, 1, 2, 2, 6, 9, 16)
    inputs["bucket"] = inputs["bucket"].float()
    with pytest.raises(DTypeError, match=r"test_offset_reads.py:\d+: an index gathers through bucket, which must hold"):
        bucketed(**inputs)


def test_a_gathered_entry_outside_the_table_is_a_shape_error_and_is_checked_again_after_a_change():
    inputs = _inputs(bucketed, 1, 2, 2, 6, 9, 16)
    bucketed(**inputs)  # in range
    inputs["bucket"][3] = 7  # in place: a new version of the same tensor
    with pytest.raises(
        ShapeError, match=r"reads table at r = bucket\(.*bucket holding \d\.\.7\), outside table's 0\.\.6"
    ):
        bucketed(**inputs)
    with pytest.raises(ShapeError, match="bucket holding"):
        bucketed(**inputs, backend="reference")  # the reference holds the same rule


def test_a_gathered_table_that_requires_grad_is_refused_until_its_scatter_exists():
    inputs = _inputs(segment_pairs, 1, 2, 2, 6, 9, 16)
    inputs["pair"].requires_grad_()
    with pytest.raises(DifferentiationError, match=r"pair requires grad, but .*:\d+ reads pair at .*a frozen table"):
        segment_pairs(**inputs)


def test_an_index_through_a_computed_value_is_refused_at_its_line():
    from einflash.errors import DeclarationError

    with pytest.raises(DeclarationError, match=r"test_offset_reads.py:\d+: an index must be built from"):

        @ef.attention
        def through_scores(q, k, v, rel: ef.Tensor["h r"]):
            s = q @ k
            return ef.softmax(s + rel[s], "n") @ v


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("op", [relative, table_row, chunked_documents, *GATHERS], ids=lambda op: op.name)
def test_a_read_at_computed_positions_on_the_gpu(op, dtype):
    for shape in ((2, 4, 2, 300, 517, 128), (2, 8, 2, 1, 4099, 64)):  # prefill; decode with GQA packing
        inputs = {n: x.cuda() for n, x in _inputs(op, *shape, dtype=dtype).items()}
        assert check(op, op(**inputs), **inputs).ok
        leaves = {n: inputs[n].clone().requires_grad_() for n in ("q", "k", "v")}
        grad_output = torch.randn_like(inputs["q"])
        op(**(inputs | leaves)).backward(grad_output)
        verdicts = check_gradients(op, {n: x.grad for n, x in leaves.items()}, grad_output, **inputs)
        assert all(v.ok for v in verdicts.values()), {n: v.as_dict() for n, v in verdicts.items()}


def test_a_tile_sized_gather_takes_the_targets_gathered_defaults():
    from einflash.backends import get_target
    from einflash.compiler.tuning.space import fitting_default

    sm90, dims = get_target("sm90"), dict(b=2, h=16, m=8192, n=8192, e=128, f=128)
    assert relative.forward.gathered and bucketed.forward.gathered and table_row.forward.gathered
    expected = sm90.forward.gathered[0][1]
    got = fitting_default(relative.forward, sm90, dims, 16, 2)
    assert (got.block_m, got.block_n, got.num_warps, got.num_stages) == (
        expected.block_m,
        expected.block_n,
        expected.num_warps,
        expected.num_stages,
    )
    plain = fitting_default(chunked_documents.forward, sm90, dims, 16, 2)  # read along n only: no tile gather
    assert not chunked_documents.forward.gathered and plain.num_stages != expected.num_stages
