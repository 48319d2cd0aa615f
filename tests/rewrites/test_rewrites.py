"""The rewrite pipeline: every step of every example keeps the maths (the reference executor
gives the as-written output, chunk by chunk), and the rewrites have the shapes they promise."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import sympy
import torch
from catalogue import EXAMPLES, anticausal_decay, load_example, plain_causal_linear

import einflash as ef
from einflash.compiler.analysis.key_passes import count_passes
from einflash.compiler.rewrite.defer import defer_normalisation
from einflash.compiler.rewrite.indicator import sums_as_indicators
from einflash.compiler.rewrite.online import stream_online, streaming_obstacle
from einflash.compiler.rewrite.pipeline import PIPELINE, optimise
from einflash.compiler.rewrite.reassociate import reassociate
from einflash.compiler.rewrite.shifted import recompute_shifted
from einflash.compiler.rewrite.strength import LOG2E, exponent_base2, scalars_before_masks, scalars_out_of_max
from einflash.ir import REDUCERS, Call, Const, Param, Read, Role, validate
from einflash.ir.cascade import plain_read
from einflash.ir.expr import Merge, to_sympy, walk
from einflash.ir.printer import format_einsum
from einflash.ir.ranks import PARALLEL, coord
from einflash.ir.reference import run_reference

# Small odd sizes, M ≠ N (M < N: document_mask reads doc[m] at a key position), GQA 4:2.
SHAPE = ef.Shape(B=1, Hq=4, M=11, N=13, E=5, F=3, Hkv=2)
SQUARE = {"gla"}  # gates are read at query and key positions alike
# Parameters that make masks, caps, thresholds and routing bite at these sizes.
TUNED = {
    "sliding_window": {"window": 4},
    "prefix_lm": {"prefix": 3},
    "sink_window": {"window": 3, "sinks": 2},
    "softcap": {"cap": 1.5},
    "moba": {"block": 3},
    "post_norm_threshold": {"tau": 0.05},
    "renorm_threshold": {"tau": 0.9},
}
CHUNKS = (1, 3, 7, None)
NAMES = sorted(p.stem for p in EXAMPLES.glob("*.py"))


@functools.cache
def _example(name: str):
    return load_example(name)


def _op(name: str) -> ef.AttentionOp:
    return getattr(_example(name), name)


def _inputs(op: ef.AttentionOp, extra=None) -> dict[str, torch.Tensor]:
    """Random float64 q, k, v, the extra inputs ``extra(shape)`` makes, for the inputs ``op`` declares."""
    shape = SHAPE
    heads = getattr(_example(op.name), "HEADS", None) if op.name in NAMES else None
    if heads:
        shape = dataclasses.replace(shape, Hq=heads[0], Hkv=heads[1])
    if op.name in SQUARE:
        shape = dataclasses.replace(shape, M=shape.N)
    f64 = {"dtype": torch.float64}
    made = {
        "q": torch.randn(shape.B, shape.Hq, shape.M, shape.E, **f64),
        "k": torch.randn(shape.B, shape.Hkv, shape.N, shape.E, **f64),
        "v": torch.randn(shape.B, shape.Hkv, shape.N, shape.F, **f64),
    }
    if extra is not None:
        made.update(extra(shape, dtype=torch.float64))
    return {t.name: made[t.name] for t in op.cascade.inputs}


def _params(op: ef.AttentionOp) -> dict[str, float]:
    """The tuned parameters, and a scale other than the default where the op has one."""
    out = dict(TUNED.get(op.name, {}))
    if any(p.name == "scale" for p in op.cascade.params):
        out["scale"] = 0.7
    return out


def _check_steps(op: ef.AttentionOp, inputs, params) -> None:
    want = run_reference(op.cascade, inputs, params)
    assert torch.isfinite(want).all() and want.abs().max() > 0
    for step in op.forward.steps:
        validate(step.cascade)
        for chunk in CHUNKS:
            got = run_reference(step.cascade, inputs, params, chunk=chunk)
            torch.testing.assert_close(
                got,
                want,
                rtol=1e-10,
                atol=1e-10,
                msg=lambda m, step=step, chunk=chunk: f"after {step.name!r}, chunk {chunk}: {m}",
            )


@pytest.mark.parametrize("name", NAMES)
def test_every_step_keeps_the_output(name):
    op = _op(name)
    _check_steps(op, _inputs(op, getattr(_example(name), "extra_inputs", None)), _params(op))


def test_steps_are_the_pipeline():
    written = _op("softmax").cascade
    streamed, steps = optimise(written)
    assert [s.name for s in steps] == [name for name, _ in PIPELINE]
    assert steps[-1].cascade == streamed
    before = written
    for s in steps:
        assert s.changed == (s.cascade.key != before.key)
        before = s.cascade


# -- declarations that probe the edges of streaming ------------------------------------------------


@ef.attention
def first_key_gate(q, k, v):
    """Every row scaled by a function of its first key's score: an element of a streamed value."""
    s = q @ k * ef.scale
    x = ef.exp(s[ef.m, 0])
    return ef.softmax(s * x, "n") @ v * x


@ef.attention
def previous_query(q, k, v):
    """The previous query's scores added to each row: a shift along m, which chunks of n do not cut."""
    s = q @ k * ef.scale
    return ef.softmax(s + s[ef.m - 1, ef.n], "n") @ v


@ef.attention
def signed_temperature(q, k, v, c: float = 2.0):
    """A temperature of either sign: it may not move out of the max unless it is positive."""
    return ef.softmax(q @ k * c, "n") @ v


@pytest.mark.parametrize(
    "op, params, passes",
    [
        (first_key_gate, {}, 4),
        (previous_query, {}, 1),
        (signed_temperature, {"c": -1.5}, 1),
        (signed_temperature, {"c": 0.5}, 1),
    ],
    ids=["first-key", "previous-query", "negative-temperature", "positive-temperature"],
)
def test_edge_declarations_keep_the_output(op, params, passes):
    _check_steps(op, _inputs(op), params)
    assert count_passes(op.forward.rewritten).passes <= passes


def test_a_temperature_of_unknown_sign_stays_inside_the_max():
    streamed = signed_temperature.forward.rewritten
    top = next(e for e in streamed.einsums if e.reduce is not None and e.reduce.op == "max")
    body = streamed.producer(top.expr.tensor).expr if isinstance(top.expr, Read) else top.expr
    assert Param("c") in walk(body)


# -- the shapes of the rewrites ----------------------------------------------------------------------


def _loop_examples():
    return [n for n in NAMES if any(e.loop for e in _op(n).forward.rewritten.einsums)]


def test_every_example_streams():
    assert set(NAMES) == set(_loop_examples())


@pytest.mark.parametrize("name", _loop_examples())
def test_running_states_update_with_merge_any(name):
    c = _op(name).forward.rewritten
    assert c.states
    for s in c.states:
        updates = [e for e in c.einsums if e.out == s.name]
        assert len(updates) == 1 and updates[0].loop
        upd = updates[0].expr
        assert isinstance(upd, Call) and upd.merge is Merge.ANY
        assert plain_read(s, prev=True) in walk(upd)
        chunk = next(r for r in walk(upd) if isinstance(r, Read) and not r.prev and r.tensor.endswith("_chunk"))
        reducer = c.producer(chunk.tensor).reduce.op
        assert s.init == REDUCERS[reducer].identity


def _corrections(c) -> dict[str, Call]:
    """Each correction factor's expression, by the running max it corrects for."""
    out = {}
    for e in c.einsums:
        if e.loop and e.reduce is None and c.tensor(e.out).role is not Role.STATE:
            prev = [r for r in walk(e.expr) if isinstance(r, Read) and r.prev]
            if prev:
                out[prev[0].tensor] = e.expr
    return out


def _exp_of_prev_minus_new(expr: Call, state: str) -> sympy.Expr:
    """The positive c with ``expr = exp(c·(prev − new))`` (or exp2), failing the test otherwise."""
    prev, new = sympy.symbols("prev new", real=True)

    def leaf(x):
        if isinstance(x, Read) and x.tensor == state:
            return prev if x.prev else new
        if isinstance(x, Param):
            return sympy.Symbol(x.name, positive=True)
        raise AssertionError(f"unexpected leaf {x} in a correction factor")

    assert isinstance(expr, Call) and expr.op in ("exp", "exp2")
    arg = sympy.expand(to_sympy(expr.args[0], leaf))
    c = sympy.simplify(arg / (prev - new))
    assert not c.free_symbols & {prev, new} and c.is_positive
    return c


def test_softmax_correction_is_the_exponential_of_the_max_difference():
    c = _op("softmax").forward.rewritten
    corrections = _corrections(c)
    assert len(corrections) == 1
    ((state, expr),) = corrections.items()
    assert c.tensor(state).role is Role.STATE and c.producer(state).expr.op == "maximum"
    # the max runs over the unscaled scores (the scale moved out of it), so the factor carries the scale
    assert _exp_of_prev_minus_new(expr, state) == sympy.Symbol("scale", positive=True)


def test_differential_has_two_running_maxima_and_two_corrections():
    c = _op("differential").forward.rewritten
    maxima = [s.name for s in c.states if c.producer(s.name).expr.op == "maximum"]
    assert len(maxima) == 2
    corrections = _corrections(c)
    assert sorted(corrections) == sorted(maxima)
    for state, expr in corrections.items():
        _exp_of_prev_minus_new(expr, state)


def test_defer_normalisation_moves_the_division_out_of_the_contraction():
    written = _op("softmax").cascade
    deferred = defer_normalisation(written)
    acc = deferred.producer("o_acc")
    assert acc.reduce.op == "sum" and "den" not in {r.tensor for r in acc.reads()}
    assert format_einsum(deferred.producer("o")) == "o[m,f] = o_acc[m,f]/den[m]"
    assert count_passes(written).passes == 3 and count_passes(deferred).passes == 2


def test_reassociate_finds_the_linear_order_and_leaves_softmax_alone():
    linear = reassociate(_op("linear").cascade)
    ctx = next(e for e in linear.einsums if e.out.startswith("ctx"))
    assert set(ctx.ranks) - set(PARALLEL) == {"e", "f"} and ctx.reduce.ranks == ("n",)
    assert not any({"m", "n"} <= set(t.ranks) for t in linear.tensors)
    softmax = _op("softmax").cascade
    assert reassociate(softmax) == softmax


@ef.attention
def normalised_linear(q, k, v):
    """Katharopoulos et al.'s linear attention: a feature map of q and k, normalised by the weights' row sums."""
    a = ef.einsum("m e, n e -> m n", ef.relu(q) + 1.0, ef.relu(k) + 1.0)
    return (a @ v) / a.sum("n")


def test_reassociate_rewrites_every_reader_of_the_weights_or_none():
    """``a`` is read by ``a·v`` and by ``a.sum("n")``: both become summaries of the keys (E×F and E), and the
    M×N weights are gone; the reference gives the written output. Where one reader cannot be reordered (a max
    over n), neither is."""
    c = reassociate(normalised_linear.cascade)
    assert not any({"m", "n"} <= set(t.ranks) for t in c.tensors)
    summaries = sorted(tuple(e.ranks) for e in c.einsums if e.reduce is not None and e.reduce.ranks == ("n",))
    assert summaries == [("b", "h", "e"), ("b", "h", "e", "f")]
    inputs = _inputs(normalised_linear)
    torch.testing.assert_close(run_reference(c, inputs), run_reference(normalised_linear.cascade, inputs))

    @ef.attention
    def with_a_max(q, k, v):
        a = ef.einsum("m e, n e -> m n", ef.relu(q), ef.relu(k))
        return (a @ v) / a.max("n")

    assert reassociate(with_a_max.cascade) == with_a_max.cascade


@pytest.mark.parametrize("name", ["linear", "agent", "normalised_linear"])
def test_two_stages_give_the_output(name):
    """The key stage's summaries, given to the query stage as inputs, give the cascade's output (the reference
    runs each stage); a one-pass cascade has no stages."""
    from einflash.compiler.rewrite.stages import key_stages
    from einflash.ir.reference import evaluate

    op = normalised_linear if name == "normalised_linear" else _op(name)
    inputs = _inputs(op, getattr(_example(name), "extra_inputs", None) if name in NAMES else None)
    stages = key_stages(op.forward.rewritten)
    assert stages is not None and not any(e.loop for e in stages.queries.einsums)
    assert all("m" not in stages.keys.tensor(s).ranks for s in stages.summaries)
    made = evaluate(stages.keys, inputs)
    summaries = {s: made[s].aligned(stages.queries.tensor(s).ranks) for s in stages.summaries}
    got = run_reference(stages.queries, inputs | summaries)
    torch.testing.assert_close(got, run_reference(op.cascade, inputs), rtol=1e-12, atol=1e-12)
    assert key_stages(_op("softmax").forward.rewritten) is None
    assert key_stages(_op("causal_linear").forward.rewritten) is None


def test_scalars_before_masks_masks_the_raw_scores():
    c = scalars_before_masks(_op("causal").cascade)
    masked = [e for e in c.einsums if e.where is not None]
    assert len(masked) == 1 and Param("scale") not in walk(masked[0].expr)
    scaled = next(e for e in c.einsums if any(r.tensor == masked[0].out for r in e.reads()))
    assert Param("scale") in walk(scaled.expr)


def test_exponent_base2_and_scalars_out_of_max():
    base2 = exponent_base2(_op("softmax").cascade)
    ops = {x.op for e in base2.einsums for x in walk(e.expr) if isinstance(x, Call)}
    assert "exp2" in ops and "exp" not in ops
    assert any(Const(LOG2E) in walk(e.expr) for e in base2.einsums)
    out = scalars_out_of_max(base2)
    top = next(e for e in out.einsums if e.reduce is not None and e.reduce.op == "max")
    assert not any(isinstance(x, (Param, Const)) for x in walk(top.expr))  # the max of the raw q·k


def test_stream_online_is_idempotent():
    streamed = _op("softmax").forward.rewritten
    assert stream_online(streamed) is streamed


def _before_streaming(name: str):
    """The cascade the 'stream online' step starts from."""
    steps = _op(name).forward.steps
    return steps[[s.name for s in steps].index("stream online") - 1].cascade


def test_obstacle_of_the_post_normalisation_threshold():
    c = _before_streaming("post_norm_threshold")
    why = streaming_obstacle(c)
    o = c.producer("o")
    assert "relu" in format_einsum(o)
    assert why.startswith(f"o (line {o.line}) sums a function of")
    assert "no correction factor exists" in why and "sum_n" in why


def test_obstacle_of_moba_is_its_routing():
    c = _before_streaming("moba")
    why = streaming_obstacle(c)
    assert why.startswith(f"s_raw (line {c.producer('s_raw').line}) reads sel")
    assert "no running form" in why


def test_multi_token_recomputes_its_halo():
    """The convolution reads scores at m − i, n − j: after the first step it reads a copy recomputed there, from q
    and k read padded at the shifted rows and keys, so the cascade streams in one pass."""
    c = recompute_shifted(_op("multi_token").cascade)
    shifted = [r for e in c.einsums for r in e.reads() if r.index != plain_read(c.tensor(r.tensor)).index]
    assert {(r.tensor, r.padded) for r in shifted} == {("q", True), ("k", True)}
    assert c.producer("conv").reduce.ranks == ("i", "j")
    assert streaming_obstacle(_before_streaming("multi_token")) is None


@ef.attention
def shifted_row_sum(q, k, v, w: ef.Tensor["h i"]):
    i = ef.rank("i")
    s = q @ k * ef.scale
    r = ef.exp(s).sum("n")
    return ef.softmax(s + (w * r[ef.m - i]).sum("i"), "n") @ v


def test_a_shifted_read_of_a_row_sum_is_not_recomputed():
    """A row's sum over all of n, read at the rows above, is no pointwise recomputation: it stays, and the pass
    analysis says why the cascade needs a second pass."""
    c = shifted_row_sum.cascade
    assert recompute_shifted(c) == c
    assert count_passes(shifted_row_sum.forward.rewritten).passes == 2


def test_moba_block_sums_become_a_contraction_with_an_indicator():
    """No value of MoBA's spans n, e and c at once after the step: the block sums are k times a 0/1 indicator over
    (n, c), present where the block's count of keys is positive."""
    c = sums_as_indicators(_op("moba").cascade)
    assert all(not {"n", "e", "c"} <= set(t.ranks) for t in c.tensors)
    assert c.producer("sum_n").where == Call("gt", (Read("sum_n_count", tuple(map(coord, "bhc"))), Const(0.0)))


@ef.attention
def masked_scores_summed(q, k, v, block: int = 4):
    c = ef.rank("c", ef.ceil_div(ef.N, block))
    s = q @ k * ef.scale
    per_block = ef.mask(ef.exp(s), ef.n // block == c).sum("n")  # a computed value, masked along c
    return ef.softmax(s, "n") @ v + per_block.sum("c")[ef.m] * 0.0


def test_a_masked_computed_value_stays_as_written():
    """Only a value made of inputs is present everywhere before its mask; a computed one (which a mask upstream
    could leave absent) is not rewritten."""
    assert sums_as_indicators(masked_scores_summed.cascade) == masked_scores_summed.cascade


@ef.attention
def query_smear(q, k, v, w: ef.Tensor["h i"], bias: ef.Tensor["h m n"]):
    i = ef.rank("i")
    s = q @ k * ef.scale + bias
    return ef.softmax((w * s[ef.m - i, ef.n]).sum("i"), "n") @ v


def test_a_recomputed_value_out_of_range_is_absent():
    """Rows above the first have no score: their terms are absent, as the original read found them. The bias is read
    padded at m − i too, so the recomputed score is absent there by its reads, with no filter of its own."""
    c = recompute_shifted(query_smear.cascade)
    assert all(e.where is None for e in c.einsums if e.out.endswith("_shifted"))
    assert {r.tensor for e in c.einsums for r in e.reads() if r.padded} == {"q", "bias"}
    inputs = {
        "q": torch.randn(1, 2, 6, 4, dtype=torch.float64),
        "k": torch.randn(1, 2, 7, 4, dtype=torch.float64),
        "v": torch.randn(1, 2, 7, 3, dtype=torch.float64),
        "w": torch.randn(2, 3, dtype=torch.float64),
        "bias": torch.randn(2, 6, 7, dtype=torch.float64),
    }
    want = run_reference(query_smear.cascade, inputs, {})
    torch.testing.assert_close(run_reference(c, inputs, {}), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["softmax", "differential", "linear", "causal_linear"])
def test_no_obstacle_where_one_pass_is_reached(name):
    assert streaming_obstacle(_before_streaming(name)) is None


@ef.attention
def near_max(q, k, v):
    s = q @ k * ef.scale
    return ef.softmax(ef.mask(s, s > s.max("n") - 1.0), "n") @ v


def test_a_mask_that_tests_a_running_state_waits_for_its_pass():
    # the mask moves as the running max does: no correction factor mends a reduction of the masked scores
    c = near_max.forward.rewritten
    assert sorted({e.loop for e in c.einsums}) == [0, 1, 2]
    _check_steps(near_max, _inputs(near_max), {})
    assert "masked by a test of a running state" in streaming_obstacle(near_max.forward.steps[-2].cascade)


def test_a_kth_largest_over_n_is_a_running_top_list():
    top_k = _op("top_k")
    c = top_k.forward.rewritten
    (state,) = [t for t in c.states if c.producer(f"{t.name}_chunk").reduce.op == "top"]
    listed = state.ranks[-1]
    assert c.rank(listed).extent == load_example("top_k").TOPK + 1  # one past k: the cut below the k-th
    assert [e.loop for e in c.einsums if e.out == state.name] == [1]
    cut = next(e for e in c.einsums if e.out.endswith("_cut"))
    masked = next(e for e in c.einsums if e.where is not None and cut.out in {r.tensor for r in e.reads()})
    assert masked.loop == 2


# -- gathers composed before the kernel ---------------------------------------------------------------


def test_a_table_read_through_an_integer_input_is_composed_into_one_table():
    """T5's table read through its buckets becomes one table of the buckets' extent: the reference gives the
    same output either way; a read whose gathered entry is not its whole index entry, or through a 2-D index,
    is left as it was."""
    from einflash.compiler.rewrite.compose import compose_gathers

    @ef.attention
    def gathered(q, k, v, table: ef.Tensor["h r"], bucket: ef.Tensor["d"], pair: ef.Tensor["g s"]):  # noqa: F821, UP037
        d = ef.n - ef.m + ef.M - 1
        s = q @ k + table[bucket[d]] + 0.5 * table[bucket[ef.N - 1 - ef.n]] + table[bucket[d] // 2]
        return ef.softmax(s + pair[0, bucket[d]], "n") @ v

    c, made = compose_gathers(gathered.cascade)
    assert [(m.table, m.index, m.axis) for m in made] == [("table", "bucket", 1), ("pair", "bucket", 1)]
    composed_reads = {r.tensor for e in c.einsums for r in e.reads()}
    assert {"table_at_bucket", "pair_at_bucket", "table", "bucket"} <= composed_reads  # table[bucket[d] // 2] stays
    M, N, H = 5, 7, 2
    g = torch.Generator().manual_seed(0)
    inputs = {
        "q": torch.randn(1, H, M, 4, generator=g, dtype=torch.float64),
        "k": torch.randn(1, H, N, 4, generator=g, dtype=torch.float64),
        "v": torch.randn(1, H, N, 3, generator=g, dtype=torch.float64),
        "table": torch.randn(H, 6, generator=g, dtype=torch.float64),
        "bucket": torch.randint(0, 6, (M + N - 1,), generator=g),
        "pair": torch.randn(3, 6, generator=g, dtype=torch.float64),
    }
    want = run_reference(gathered.cascade, inputs, {})
    got = run_reference(c, inputs | {m.name: m.make(inputs) for m in made}, {})
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def _chunked_by_reference(ch, inputs, n: int) -> torch.Tensor:
    """The chunked form run through the reference executor chunk by chunk, as the kernels run it: each chunk's
    update from the state cascade (its keys alone: v is zero elsewhere), the recurrence between anchors in the
    states' direction, then each chunk's rows of the query cascade given the state of the keys before it (after
    it, backwards)."""
    from einflash.compiler.rewrite.chunked import ANCHOR_HI, ANCHOR_LO, CHUNK, HAS_STATE, STATE
    from einflash.ir.reference import evaluate

    C, chunks = ch.chunk, -(-n // ch.chunk)
    e, f = ch.contracted, ch.value
    walk = range(chunks) if ch.direction == 1 else range(chunks - 1, -1, -1)
    anchors = {  # chunk -> (the key before it, or the first after it; its own last key, or its first)
        c: (max(c * C - 1, 0), min(c * C + C, n) - 1) if ch.direction == 1 else (min(c * C + C, n - 1), c * C)
        for c in walk
    }
    before, state = {}, None
    for c in walk:
        before[c] = state
        v = torch.zeros_like(inputs["v"])
        v[:, :, c * C : c * C + C] = inputs["v"][:, :, c * C : c * C + C]
        made = evaluate(ch.states, inputs | {"v": v}, {ANCHOR_LO: anchors[c][0], ANCHOR_HI: anchors[c][1]})
        update = made["update"].aligned(("b", "h", e, f))
        between = made["decay_between"]
        between = between.aligned(("b", "h", *between.ranks[2:]))
        between = between[..., None] if between.dim() == 3 else between[..., None, None]
        state = update if state is None else state * between + update
    hs = torch.stack([torch.zeros_like(state) if before[c] is None else before[c] for c in range(chunks)], dim=2)
    rows = []
    for c in range(chunks):
        at = {ANCHOR_LO: anchors[c][0], CHUNK: c, HAS_STATE: 0}
        rows.append(run_reference(ch.queries, inputs | {STATE: hs}, at)[:, :, c * C : c * C + C])
    return torch.cat(rows, dim=2)


@pytest.mark.parametrize("name", ["causal_linear", "gla", "plain_causal_linear", "anticausal_decay"])
@pytest.mark.parametrize("chunk", [4, 5])
def test_chunked_form_gives_the_output(name, chunk):
    """Chunk states through the recurrence between anchors, then each chunk's own keys plus its state's term, give
    the cascade's output (the reference runs both chunk cascades); a mask n ≥ m runs its states backwards."""
    from einflash.compiler.rewrite.chunked import chunked_form

    op = {"plain_causal_linear": plain_causal_linear, "anticausal_decay": anticausal_decay}.get(name) or _op(name)
    extra = getattr(_example(name), "extra_inputs", None) if name in NAMES else _example("causal_linear").extra_inputs
    inputs = _inputs(op, extra)
    inputs["q"] = torch.randn(SHAPE.B, SHAPE.Hq, SHAPE.N, SHAPE.E, dtype=torch.float64)  # M = N
    ch = chunked_form(op.cascade, op.forward.rewritten, chunk)
    assert ch is not None
    got = _chunked_by_reference(ch, inputs, SHAPE.N)
    torch.testing.assert_close(got, run_reference(op.cascade, inputs), rtol=1e-10, atol=1e-10)


def test_chunked_form_refuses_what_it_cannot_cut():
    """A window (no single running state), a normalised feature map, a factor of both sides with no anchor, and
    softmax have no chunked form."""
    from einflash.compiler.rewrite.chunked import chunked_form

    @ef.attention
    def windowed(q, k, v):
        return ef.mask(q @ k, (ef.n <= ef.m) & (ef.m - ef.n < 8)) @ v

    @ef.attention
    def unanchored(q, k, v):
        return ef.mask((q @ k) * ef.exp(-((ef.m - ef.n) * (ef.m - ef.n)) / 100), ef.n <= ef.m) @ v

    for op in (windowed, unanchored, _op("softmax"), _op("causal")):
        assert chunked_form(op.cascade, op.forward.rewritten, 16) is None, op.name
