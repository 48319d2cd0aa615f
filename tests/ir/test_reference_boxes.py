"""The reference executor within a memory budget: boxes of independent rows give the unboxed output bit for bit,
cover every row once, fit the budget, and carry gradients (checkpointed per box)."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from catalogue import EXAMPLES, load_example

import einflash as ef
from einflash.ir.reference import bind_extents, footprint, independent_rows, memory_budget, row_boxes, run_outputs
from einflash.testing import random_inputs

NAMES = sorted(p.stem for p in EXAMPLES.glob("*.py"))
# four heads (two query heads per kv head); 96 query rows: a head at a time, or blocks of 64 rows and 32
SHAPE = ef.Shape(B=2, Hq=2, M=96, N=96, E=16, F=8, Hkv=1)


@functools.cache
def _case(name: str):
    op = getattr(load_example(name), name)
    return op, random_inputs(op, SHAPE, dtype=torch.float64)


def _budget(c, inputs, **rows) -> int:
    """The footprint of a box of this many rows (the others whole)."""
    return footprint(c, bind_extents(c, inputs, {}) | rows, 8)


@pytest.mark.parametrize("name", NAMES)
def test_boxes_give_the_unboxed_output_bit_for_bit(name):
    op, inputs = _case(name)
    cascades = [op.cascade] + ([op.forward_lse.written] if op.forward_lse is not None else [])
    for c in cascades:
        whole = run_outputs(c, inputs, max_bytes=math.inf)
        budgets = [_budget(c, inputs, b=1, h=1)] + (
            [_budget(c, inputs, b=1, h=1, m=64)] if "m" in independent_rows(c) else []
        )
        for budget in budgets:
            assert len(row_boxes(c, bind_extents(c, inputs, {}), 8, budget)) > 1
            boxed = run_outputs(c, inputs, max_bytes=budget)
            for a, b in zip(whole, boxed, strict=True):
                assert torch.equal(a, b), f"{c.name}, budget {budget}: differs by {(a - b).abs().max()}"


def test_rows_read_across_a_computed_tensor_are_not_cut():
    assert independent_rows(_case("multi_token")[0].cascade) == ("b", "h")  # s[m − i, n − j]
    assert independent_rows(_case("gla")[0].cascade) == ("b", "h", "m")  # g[n, e] reads an input: kept whole
    assert independent_rows(_case("moba")[0].cascade) == ("b", "h", "m")


@pytest.mark.parametrize("budget_rows", [dict(b=1), dict(b=1, h=3), dict(b=1, h=1, m=70), dict(b=1, h=1, m=5)])
def test_boxes_cover_every_row_once_within_the_budget(budget_rows):
    op, inputs = _case("causal")
    c, extents = op.cascade, bind_extents(op.cascade, inputs, {})
    budget = _budget(c, inputs, **budget_rows)
    boxes = row_boxes(c, extents, 8, budget)
    hits = torch.zeros(extents["b"], extents["h"], extents["m"], dtype=torch.int64)
    for box in boxes:
        rows = tuple(slice(*box.get(r, (0, extents[r]))) for r in ("b", "h", "m"))
        hits[rows] += 1
        assert footprint(c, extents | {r: hi - lo for r, (lo, hi) in box.items()}, 8) <= budget
    assert bool((hits == 1).all())
    if budget_rows.get("m") == 70:  # blocks of query rows start at multiples of 64
        assert {box["m"] for box in boxes} == {(0, 64), (64, 96)}


def test_gla_at_the_gpu_demo_shape_fits_a_quarter_of_an_h100_in_whole_heads():
    c = _case("gla")[0].cascade
    extents = dict(b=2, h=16, m=2048, n=2048, e=128, f=128)
    assert footprint(c, extents, 8) > 128 * 2**30  # what ran out of memory: an m×n×e tensor in float64
    boxes = row_boxes(c, extents, 8, 78 * 2**30 // 4)  # an idle H100: about 78 GiB free
    assert len(boxes) == 32 and all(set(box) == {"b", "h"} for box in boxes)


@pytest.mark.parametrize("name", ["gla", "causal", "alibi"])
def test_gradients_through_checkpointed_boxes_match(name):
    op, inputs = _case(name)
    c = op.cascade
    grads = []
    for budget in (math.inf, _budget(c, inputs, b=1, h=1, m=64)):
        leaves = {k: v.clone().requires_grad_(v.is_floating_point()) for k, v in inputs.items()}
        out = run_outputs(c, leaves, max_bytes=budget)[0]
        floats = [v for v in leaves.values() if v.requires_grad]
        grads.append(torch.autograd.grad(out, floats, torch.ones_like(out)))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)  # sums over boxes: float64 roundings apart


def test_the_default_budget_is_a_share_of_free_memory():
    budget = memory_budget(torch.device("cpu"))
    assert 0 < budget < math.inf
    op, inputs = _case("softmax")
    assert row_boxes(op.cascade, bind_extents(op.cascade, inputs, {}), 8, budget) == [{}]
