"""Search spaces per family, and pruning by the buffer analysis, checked against what Triton really allocates."""

from __future__ import annotations

import dataclasses

import pytest
from autotune_helpers import example
from launches import captured, compile_launch

from einflash.backends import get_target
from einflash.compiler.analysis.cost import BM, BN, ELEM, STAGES, buffer_needs
from einflash.compiler.schedule import Schedule, default_schedule
from einflash.compiler.tuning.space import family_of, search_space

SM90 = get_target("sm90")
PREFILL = dict(b=2, h=16, m=4096, n=4096, e=128, f=128)
DECODE = dict(b=4, h=32, m=1, n=32768, e=128, f=128)


def test_forward_space_is_the_targets_with_the_default_and_prunes_what_cannot_fit():
    op = example("softmax")
    s = search_space(op.forward, SM90, PREFILL, 16, 2)
    knobs = dict(s.knobs)
    assert s.family == "forward" and knobs["block_m"] == SM90.forward.space.block_m
    assert knobs["splits"] == (1,) and knobs["reverse_m"] == (False,)  # no mask: the tile order changes nothing
    assert s.default == default_schedule(PREFILL, SM90, 16) and s.default in s.feasible
    assert knobs["max_registers"] == SM90.forward.space.max_registers == (0, 240)
    assert s.size == len(s.feasible) + len(s.pruned) == 2 * 3 * 2 * 5 * 2
    counts = s.pruned_counts()
    assert counts["shared memory"] > 0 and counts["registers"] > 0
    smem = buffer_needs(op.forward.rewritten).smem
    for p in s.pruned:
        if p.kind == "shared memory":
            need = smem.subs(
                {
                    BM: p.schedule.block_m,
                    BN: p.schedule.block_n,
                    STAGES: p.schedule.num_stages,
                    ELEM: 2,
                    **{x: 128 for x in smem.free_symbols if x.name in ("E", "F")},
                }
            )
            assert need > SM90.smem_per_block and p.schedule.num_stages >= 2
            assert s.why_pruned(p.schedule).startswith("shared memory: input tiles need")
        if p.kind == "registers":  # 4·BM·(BN + F + 1) fp32 bytes over 32·warps threads
            sch = p.schedule
            assert 4 * sch.block_m * (sch.block_n + 128 + 1) / 4 / (32 * sch.num_warps) > (sch.max_registers or 255)
    assert all(s.why_pruned(x) is None for x in s.feasible)


def test_masked_forward_space_adds_the_tile_order():
    s = search_space(example("causal").forward, SM90, PREFILL, 16, 2)
    assert dict(s.knobs)["reverse_m"] == (False, True)
    assert any(x.reverse_m for x in s.feasible)


def test_decode_space_splits_and_packs_and_drops_tiles_taller_than_the_rows():
    op = example("softmax")
    s = search_space(op.forward, SM90, DECODE, 8, 2)
    knobs = dict(s.knobs)
    assert family_of(DECODE) == "decode" and s.family == "decode"
    assert s.default.splits == 9 and 9 in knobs["splits"]  # the heuristic's split count joins the target's
    assert knobs["pack"] == (True,)  # 4 query heads per kv head, packed into one program's rows
    assert knobs["block_m"] == (16,)  # 4 rows a program: 32 and 64 rows repeat 16's work
    assert s.pruned_counts()["redundant"] == 2 * len(s.feasible + s.pruned)
    assert s.size == len(SM90.decode.space.block_m) * len(SM90.decode.space.block_n) * len(
        SM90.decode.space.num_warps
    ) * len(SM90.decode.space.num_stages) * (len(SM90.decode.space.splits) + 1)


def test_more_splits_than_key_tiles_are_redundant():
    s = search_space(example("softmax").forward, SM90, dict(DECODE, n=256), 8, 2)
    assert all(x.splits <= -(-256 // x.block_n) for x in s.feasible if x != s.default)
    assert any(p.reason.endswith("key tiles") for p in s.pruned)


def test_interpreter_prunes_nothing_for_resources():
    s = search_space(example("causal").forward, get_target("interpreter"), dict(b=1, h=2, m=40, n=40, e=16, f=16), 2, 4)
    assert s.pruned_counts() == {} and len(s.feasible) == s.size == 8


def test_project_moves_each_knob_to_the_nearest_candidate():
    s = search_space(example("softmax").forward, SM90, DECODE, 8, 2)
    got = s.project(Schedule(64, 100, 16, 7, 11, True))
    assert got == Schedule(16, 128, 8, 5, 9, True)


@pytest.mark.slow  # two kernels compiled for sm_90 in a child process
def test_shared_memory_formula_is_a_lower_bound_of_what_triton_allocates():
    """The pruning is sound only if the formula never exceeds the real allocation (at 2+ stages)."""
    op = example("softmax")
    smem = buffer_needs(op.forward.rewritten).smem
    dims = {"B": 2, "Hq": 16, "Hkv": 16, "M": 4096, "N": 4096}
    for sch in (Schedule(128, 64, 8, 3), Schedule(64, 128, 4, 2)):
        (launch,) = captured("softmax", dims, 128, lambda extents, kv, sch=sch: sch)
        kernel = compile_launch(launch, SM90)
        formula = int(
            smem.subs(
                {
                    BM: sch.block_m,
                    BN: sch.block_n,
                    STAGES: sch.num_stages,
                    ELEM: 2,
                    **{x: 128 for x in smem.free_symbols if x.name in ("E", "F")},
                }
            )
        )
        assert formula <= kernel.shared_bytes <= formula + 4096, (sch, formula, kernel.shared_bytes)


@pytest.mark.slow  # one kernel compiled for sm_90 in a child process
def test_a_schedule_pruned_for_registers_does_spill():
    s = search_space(example("softmax").forward, SM90, PREFILL, 16, 2)
    sch = next(p.schedule for p in s.pruned if p.kind == "registers")
    (launch,) = captured(
        "softmax",
        {"B": 2, "Hq": 16, "Hkv": 16, "M": 4096, "N": 4096},
        128,
        lambda extents, kv: dataclasses.replace(sch),
    )
    assert compile_launch(launch, SM90).spill_bytes > 0


def test_there_is_no_backward_family_to_tune_yet():
    from einflash.errors import LoweringError

    with pytest.raises(LoweringError, match="no kernel family 'backward'"):
        search_space(example("softmax").forward, SM90, PREFILL, 16, 2, family="backward")


def test_reversed_tile_order_computes_the_same_bits():
    """REVERSE_M changes which program runs which query tile, nothing else."""
    import torch
    from autotune_helpers import qkv

    op = example("causal")
    q, k, v = qkv(M=70, N=70)
    straight = op(q, k, v, schedule=Schedule(16, 16, 4, 1))
    reversed_ = op(q, k, v, schedule=Schedule(16, 16, 4, 1, reverse_m=True))
    assert torch.equal(straight, reversed_)
    torch.testing.assert_close(straight, op.reference(q, k, v).float(), rtol=1e-5, atol=1e-5)


def test_a_broadcast_reduction_counts_its_tile_and_the_default_shrinks_to_fit():
    # GLA reduces q·k·decay over e as a BM×BN×E tile (no tl.dot computes it): the analysis holds that tile,
    # so the target's 64×64 default cannot fit sm_90's registers, and the default shrinks until it does
    from einflash.compiler.analysis.cost import broadcast_reduction
    from einflash.compiler.tuning.space import buffer_functions, fitting_default, prune

    gla, softmax = example("gla"), example("softmax")
    assert any(broadcast_reduction(e) for e in gla.forward.rewritten.einsums) and gla.forward.broadcast
    assert not softmax.forward.broadcast
    regs = buffer_needs(gla.forward.rewritten).registers
    assert {s.name for s in regs.free_symbols} >= {"BM", "BN", "E"} and regs.subs({BN: 1}).free_symbols
    extents = dict(b=1, h=8, m=4096, n=4096, e=128, f=128)
    smem, reg_fn = buffer_functions(gla.forward, extents, 2)
    plain = default_schedule(extents, SM90, 8, gla.forward.masked)
    assert prune(plain, extents, SM90, smem, reg_fn).kind == "registers"
    shrunk = fitting_default(gla.forward, SM90, extents, 8, 2)
    assert prune(shrunk, extents, SM90, smem, reg_fn) is None
    assert shrunk.block_m * shrunk.block_n < plain.block_m * plain.block_n
    assert search_space(gla.forward, SM90, extents, 8, 2).default == shrunk
    # where the default fits, it stays
    assert fitting_default(softmax.forward, SM90, PREFILL, 16, 2) == default_schedule(PREFILL, SM90, 16)


def test_buffer_formulas_are_made_once_per_cascade_head_dims_and_element_size():
    """The sympy work behind the buffer functions is done once: a call choosing its schedule each time (a jagged
    batch, whose longest sequence changes per batch) gets the same functions at any lengths."""
    from einflash.compiler.tuning.space import buffer_functions

    fwd = example("causal").forward
    extents = dict(b=2, h=8, m=3000, n=3000, e=128, f=128)
    first = buffer_functions(fwd, extents, 2)
    assert buffer_functions(fwd, dict(extents, m=17, n=5000), 2) is first
    assert buffer_functions(fwd, dict(extents, e=64, f=64), 2) is not first
    assert buffer_functions(fwd, extents, 4) is not first


def test_a_per_head_fp32_input_does_not_size_the_tiles_for_4_byte_elements():
    # ALiBi's fp32 slopes beside bf16 q, k, v: no tile of them is staged, so the default keeps the 16-bit tiles
    # (sized for 4-byte elements it shrank to 128x32 and ran 29% slower on an H100)
    import torch
    from catalogue import load_example

    from einflash.compiler.tuning.space import element_bytes, fitting_default

    alibi = load_example("alibi").alibi
    inputs = {n: torch.ones(1, dtype=torch.bfloat16) for n in "qkv"} | {"slope": torch.ones(1)}
    assert element_bytes(alibi.cascade, inputs, torch.bfloat16) == 2
    extents = dict(b=2, h=16, m=8192, n=8192, e=128, f=128)
    default = fitting_default(alibi.forward, get_target("sm90"), extents, 16, 2)
    assert (default.block_m, default.block_n) == (128, 128)
