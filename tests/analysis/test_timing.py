"""The cost model's counts and prices: work per visited tile from the cascade, the grid's schedule on the SMs,
and explain's prediction; checked against counts made by hand, never against a GPU's times (those are in
benchmarks/results and docs/benchmarks.md)."""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib

import pytest
import sympy
from catalogue import load_example

import einflash as ef
from einflash.backends import get_target
from einflash.backends.target import CostModel
from einflash.compiler.analysis.cost import BM, BN
from einflash.compiler.analysis.timing import Launch, _run_grid, epilogue_ops, loop_work, predict
from einflash.compiler.rewrite.pipeline import optimise
from einflash.compiler.schedule import Schedule
from einflash.errors import LoweringError
from einflash.ir.ranks import extent_symbol

E, F = extent_symbol("E"), extent_symbol("F")


def _op(name: str):
    return getattr(load_example(name), name)


def _work(name: str):
    return loop_work(optimise(_op(name).cascade)[0])


def test_softmax_attention_puts_both_products_on_the_tensor_cores_and_one_exponential_per_score():
    (w,) = _work("softmax")
    ops = dict(w.ops)
    assert w.dot_flops == sympy.expand(2 * BM * BN * E + 2 * BM * BN * F)
    assert ops["exp2"] == BM * BN  # the weights; the rescaling's exponential is per row
    assert ops["row_max"] == BM * BN and ops["row_sum"] == BM * BN
    assert ops["to_16bit"] == BM * BN  # the weights go to 16 bits for Σ_n p·v; q and k are inputs already
    assert w.mask_ops == ()


def test_a_mask_is_priced_only_where_it_is_tested_and_softcap_adds_its_tanh_and_division():
    (causal,) = _work("causal")
    assert dict(causal.mask_ops) == {"le": BM * BN, "where": BM * BN}
    (softcap,) = _work("softcap")
    assert dict(softcap.ops)["tanh"] == BM * BN and dict(softcap.ops)["div"] == BM * BN


def test_the_epilogue_divides_once_per_output_element():
    ops = dict(epilogue_ops(optimise(_op("softmax").cascade)[0]))
    assert ops == {"div": BM * F}


def test_a_two_pass_cascade_has_the_work_of_each_pass():
    work = _work("post_norm_threshold")
    assert [w.loop for w in work] == [1, 2]
    assert all(w.dot_flops != 0 for w in work[1:])


def test_programs_start_in_launch_order_on_the_first_sm_with_a_free_slot():
    # four programs of 1..4 s on two SMs: 1, 2 start; 3 on SM 0 at 1; 4 on SM 1 at 2 → ends at 6, last start 2
    assert _run_grid([1.0, 2.0, 3.0, 4.0], 2, 1, 1.0) == (6.0, 2.0)
    # heaviest first: 4, 3 start; 2 at 3; 1 at 4 → both end at 5
    assert _run_grid([4.0, 3.0, 2.0, 1.0], 2, 1, 1.0) == (5.0, 4.0)
    assert _run_grid([], 4, 1, 1.0) == (0.0, 0.0)


def test_programs_sharing_an_sm_run_faster_together_and_alone_again_when_the_other_ends():
    # two programs of 1 s and 3 s on one SM, together at 0.6 of their speed alone (gain 1.2): the short one ends
    # at 1 / 0.6 s, when the long one has 2 s left, which it then runs alone
    end, _ = _run_grid([1.0, 3.0], 1, 2, 1.2)
    assert end == pytest.approx(1 / 0.6 + 2.0)


def _target(tensor: float = 1e12, exp2: float = 1e12):
    model = CostModel(
        (("exp2", exp2), ("add", 1e13), ("mul", 1e13), ("maximum", 1e13), ("exp", exp2), ("div", 1e12), ("neg", 1e13))
        + (("sub", 1e13),)
        + (("row_max", 1e13), ("row_sum", 1e13), ("to_16bit", 1e13)),
        (("exp2", 1.0), ("exp", 1.0), ("div", 1.0)),
        1.0,
        (0.0, 0.0),
        0.0,
        "test",
    )
    return dataclasses.replace(get_target("sm90"), costs=model, tensor_flops=tensor, sm_count=2)


def _launch(rows, copies=1, per_sm=1, splits=1, reverse=False) -> Launch:
    c = optimise(_op("softmax").cascade)[0]
    cfg = get_target("sm90").forward.default(128)
    return Launch(loop_work(c), (), rows, copies, cfg, ((E, 64), (F, 64)), per_sm, 0.0, reverse, splits)


def test_a_tensor_bound_program_takes_its_products_time_and_names_the_tensor_cores():
    launch = _launch((((1, 0),),))
    fast = predict(launch, _target(exp2=1e15))
    # one tile of 128 x 128 x (64 + 64) x 2 FLOPs at 1e12 / 2 SMs, plus its elementwise work (rates above)
    tc = 2 * 128 * 128 * 128 / (1e12 / 2)
    assert fast.bound == "tensor-core"
    assert fast.ms == pytest.approx(
        (tc + fast.units_ms["ALU"] * 2 / 1e3 + fast.units_ms["special-function"] * 2 / 1e3) * 1e3, rel=1e-9
    )
    slow = predict(launch, _target(exp2=1e9))
    assert slow.bound == "special-function" and slow.ms > fast.ms


def test_more_programs_than_slots_run_in_waves_and_reversed_rows_shorten_a_triangular_grid():
    rows = (tuple((i + 1, 1) for i in range(8)),)  # a causal grid: query tile i visits i + 1 key tiles
    forward = predict(_launch(rows, copies=1), _target())
    reverse = predict(_launch(rows, copies=1, reverse=True), _target())
    assert forward.programs == 8 and forward.waves == 8 / 2
    assert reverse.ms < forward.ms
    assert 0 < forward.tail < 1


def test_split_kv_shares_a_row_s_tiles_among_its_slices_and_adds_the_combine_launch():
    one = predict(_launch((((8, 0),),), splits=1), _target())
    four = predict(_launch((((8, 0),),), splits=4), _target())
    assert four.programs == 4 and four.ms < one.ms


def test_a_target_without_a_cost_model_is_refused_with_its_name():
    with pytest.raises(LoweringError, match="interpreter has no cost model"):
        predict(_launch((((1, 0),),)), get_target("interpreter"))


def test_an_operator_without_a_rate_is_refused_naming_it():
    model = dataclasses.replace(_target().costs, ops=(("add", 1e12),))
    with pytest.raises(LoweringError, match="no rate for the operator"):
        predict(_launch((((1, 0),),)), dataclasses.replace(_target(), costs=model))


def test_explain_predicts_the_call_s_schedule_and_says_why_not_where_it_cannot():
    causal = _op("causal")
    x = causal.explain(ef.Shape(2, 16, 8192, 8192, 128))
    p = x.predicted
    assert p["bound"] in ("tensor-core", "special-function", "ALU", "memory") and p["ms"] > 0
    assert p["schedule"] == "64x64 w4 s3" and p["programs"] == 2 * 16 * 128
    assert "predicted" in str(x)
    none = causal.explain(ef.Shape(2, 16, 8192, 8192, 128), target="interpreter").predicted
    assert none == {"error": "target interpreter has no cost model"}
    # a schedule given to explain is the one it counts tiles and predicts at
    other = causal.explain(ef.Shape(2, 16, 8192, 8192, 128), schedule=Schedule(128, 128, 8, 3))
    assert other.tiles["block_m"] == 128 and other.predicted["schedule"] == "128x128 w8 s3"


RUN = pathlib.Path(__file__).resolve().parents[2] / "benchmarks/results/h100_2026-12-08_session13_costs"


@functools.cache
def _calibration_predictions() -> list[tuple[dict, float]]:
    """The calibration run's rows (H100) with what sm90's cost model predicts for the schedule each ran."""
    record = json.loads((RUN / "calibration.json").read_text())
    rates = record["rates"]
    target = dataclasses.replace(
        get_target("sm90"),
        tensor_flops=rates["tensor_bf16"]["per_s"],
        hbm_bandwidth=rates["hbm_copy"]["per_s"],
        sm_count=record["sms"],
    )
    out = []
    for row in record["rows"]:
        B, Hq, Hkv, M, N, D = row["shape"]
        schedule = Schedule.from_ints(row["schedule"])
        x = _op(row["example"]).explain(
            ef.Shape(B, Hq, M, N, D, Hkv=Hkv), target=target, schedule=schedule, **row["params"]
        )
        out.append((row, x.predicted["ms"]))
    return out


def test_sm90_s_model_predicts_the_calibration_run_s_benchmark_rows_within_a_quarter():
    rows = _calibration_predictions()
    ratios = {r["case"]: p / r["ms"] for r, p in rows if r["default"]}
    assert len(ratios) == 7 and all(0.8 <= x <= 1.25 for x in ratios.values()), ratios


def test_no_schedule_of_the_calibration_was_predicted_faster_by_the_margin_and_measured_slower():
    from einflash.compiler.tuning.ranking import MODEL_MARGIN

    rows = _calibration_predictions()
    worst = max(1 - pa / pb for a, pa in rows for b, pb in rows if a["case"] == b["case"] and a["ms"] > b["ms"])
    assert worst < MODEL_MARGIN, worst
