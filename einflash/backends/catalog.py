"""The targets einflash knows, as data.

Rates are labelled: "measured" figures were read on this project's GPU machines
(an 8192³ bf16 matrix product through PyTorch, a device-to-device copy counting bytes read and
written); "spec" figures are the vendor's
data sheet values for the SXM parts. Where a measurement exists the roofline uses it,
because it is what a kernel can reach. The SFU rate is 16 results per clock per SM
(the CUDA programming guide's throughput table for exp2/log2/reciprocal on compute
capability 8.x and 9.0) times SMs times the boost clock; FlashAttention-3 quotes 3.9
TFLOP/s of special functions on H100 SXM, the same order.

Why each default is what it is, with the measurements behind it: docs/tuning.md, "Why the defaults
are what they are". Tile defaults were checked by cross-compiling a flash-attention-like loop for each target
(tests/codegen/test_crosscompile.py): every one fits shared memory and does not spill. Generated
kernels with these defaults (tests/codegen/test_generated_sm90.py) fit too and do not spill.
"""

from __future__ import annotations

from dataclasses import replace

from .target import GPU, Capabilities, CostModel, SearchSpace, Target, TileConfig, Tuning

# Head-dimension buckets are padded (power of two) head dims, so 40 falls in 64 and 80 in 128.

INTERPRETER = Target(
    name="interpreter",
    device="Triton CPU interpreter",
    gpu=None,
    # Triton's interpreter enforces no shared-memory or register limits.
    smem_per_block=None,
    regs_per_sm=None,
    regs_per_thread=None,
    sm_count=None,
    # Rough nominal values for this 2-core CPU running numpy under the interpreter: the roofline
    # there is only indicative, and interpreter overheads dominate small tiles anyway.
    tensor_flops=1e11,
    fp32_flops=1e11,
    sfu_ops=1e10,
    hbm_bandwidth=2e10,
    # bf16 computes wrongly under the interpreter (dot and add), so templates must not rely on it.
    caps=Capabilities(tensor_core_dot=False, bf16=False, fp8=False, tma=False, wgmma=False),
    # The interpreter's cost grows with the work per tile and it runs programs one at a time:
    # small tiles keep CPU tests fast; warps and stages mean nothing there.
    forward=Tuning(
        defaults=((256, TileConfig(16, 16, 4, 1)),),
        space=SearchSpace(block_m=(16, 32), block_n=(16, 32), num_warps=(4,), num_stages=(1,)),
    ),
    decode=Tuning(
        defaults=((256, TileConfig(16, 16, 4, 1)),),
        space=SearchSpace(block_m=(16,), block_n=(16, 32), num_warps=(4,), num_stages=(1,), splits=(1, 2, 4)),
    ),
    backward=Tuning(
        defaults=((256, TileConfig(16, 16, 4, 1)),),
        space=SearchSpace(block_m=(16,), block_n=(16, 32), num_warps=(4,), num_stages=(1,)),
    ),
)
# Instructions per result of each operator as einflash's kernels write it, (special-function, other): what a
# target's cost model is priced at before it is calibrated. From the lowering of each operator's Triton text:
# exp2 and log2 are one MUFU instruction, exp and log add a multiply, an fp32 division is a reciprocal and its
# correction (div.rn), the sigmoid is an exponential and a division, Triton's tanh 2·σ(2x) − 1; a maximum that
# propagates NaN is a max and a select.
INSTRUCTIONS: dict[str, tuple[int, float]] = {
    **dict.fromkeys(("add", "sub", "mul", "neg", "abs", "relu", "where", "row_max", "row_sum"), (0, 1)),
    **dict.fromkeys(("lt", "le", "gt", "ge", "eq", "ne", "and", "or", "not"), (0, 1)),
    **dict.fromkeys(("maximum", "minimum"), (0, 2)),
    "to_16bit": (0, 0.5),
    "sign": (0, 4),
    "exp2": (1, 0),
    "exp": (1, 1),
    "log": (1, 1),
    "sqrt": (1, 1),
    "div": (1, 8),
    "floordiv": (1, 9),
    "mod": (1, 11),
    "sigmoid": (2, 10),
    "tanh": (2, 13),
}


def sfu_shares(sfu_ops: float, alu_ops: float) -> tuple[tuple[str, float], ...]:
    """Each operator's share of time on the special-function unit, from INSTRUCTIONS at these rates."""
    return tuple(
        (op, (mufu / sfu_ops) / (mufu / sfu_ops + other / alu_ops))
        for op, (mufu, other) in INSTRUCTIONS.items()
        if mufu
    )


def nominal_costs(fp32_flops: float, sfu_ops: float, dot_efficiency: float, source: str) -> CostModel:
    """A cost model from a target's data-sheet rates and INSTRUCTIONS (special-function and other instructions
    take turns: their times add), before any calibration."""
    alu = fp32_flops / 2  # instructions per second: a fused multiply-add counts two FLOPs
    ops = tuple((op, 1.0 / (mufu / sfu_ops + other / alu)) for op, (mufu, other) in INSTRUCTIONS.items())
    return CostModel(ops, sfu_shares(sfu_ops, alu), dot_efficiency, (0.0, 0.0), 5e-6, source)


# Backward tiles: block_m queries streamed (keys for the dQ kernel), block_n kept per program.
_BACKWARD = Tuning(
    defaults=((128, TileConfig(64, 128, 8, 3)), (256, TileConfig(32, 64, 4, 2))),
    space=SearchSpace(block_m=(16, 32, 64), block_n=(64, 128), num_warps=(4, 8), num_stages=(1, 2, 3, 4, 5)),
)
# sm90: the dK/dV part 2 stages deep, the dQ part 3 (backward_dq_stages), capped at 240 registers, in one launch.
_BACKWARD_SM90 = replace(_BACKWARD, defaults=((128, TileConfig(64, 128, 8, 2, 240)),) + _BACKWARD.defaults[1:])

SM80 = Target(
    name="sm80",
    device="NVIDIA A100-SXM4 (nominal)",
    gpu=GPU("cuda", 80, 32),
    smem_per_block=166_912,  # 163 KiB opt-in per block
    regs_per_sm=65_536,
    regs_per_thread=255,
    sm_count=108,
    tensor_flops=312e12,  # spec, dense bf16/fp16
    fp32_flops=19.5e12,  # spec
    sfu_ops=108 * 16 * 1.41e9,  # SMs × 16/clock × 1.41 GHz boost
    hbm_bandwidth=2.0e12,  # spec (80 GB part: 2.04 TB/s)
    caps=Capabilities(tensor_core_dot=True, bf16=True, fp8=False, tma=False, wgmma=False),
    forward=Tuning(
        defaults=(
            (64, TileConfig(128, 64, 4, 3)),
            (128, TileConfig(128, 64, 8, 2)),
            (256, TileConfig(64, 32, 8, 2)),
        ),  # 4 warps use all 255 registers a thread has
        space=SearchSpace(block_m=(64, 128), block_n=(32, 64, 128), num_warps=(4, 8), num_stages=(1, 2, 3, 4)),
    ),
    decode=Tuning(
        defaults=((64, TileConfig(16, 128, 4, 3)), (128, TileConfig(16, 64, 4, 3)), (256, TileConfig(16, 64, 4, 2))),
        space=SearchSpace(
            block_m=(16, 32, 64),
            block_n=(32, 64, 128, 256),
            num_warps=(2, 4, 8),
            num_stages=(1, 2, 3, 4),
            splits=(1, 2, 4, 8, 16, 32, 64),
        ),
    ),
    backward=_BACKWARD,
    costs=nominal_costs(19.5e12, 108 * 16 * 1.41e9, 0.7, "nominal: A100 data sheet rates, not calibrated"),
)

# Measured on an H100 80GB HBM3 (1980 MHz) on 2026-12-08 by benchmarks/calibrate.py: each operator's results per
# second as einflash's kernels write it (a dependent chain per element, less the chain's own step), row reductions,
# conversions and unmeasured operators at their instruction counts (INSTRUCTIONS) at the measured rates of one ALU
# and one special-function instruction (add's and exp2's); the efficiencies fitted to the seven benchmark rows at
# their default schedules (predicted within 16% of the measured times; the six other schedules of each row within
# 27%). Files: benchmarks/results/h100_2026-12-08_session13_costs/; docs/tuning.md, "The cost model".
_SM90_COSTS = CostModel(
    ops=(
        ("add", 4.51e13),
        ("sub", 4.41e13),
        ("mul", 4.27e13),
        ("neg", 4.51e13),
        ("abs", 6.07e14),  # an operand modifier of the instruction that uses it
        ("relu", 1.89e13),
        ("where", 7.78e12),
        ("row_max", 4.51e13),
        ("row_sum", 4.51e13),
        *((op, 4.51e13) for op in ("lt", "le", "gt", "ge", "eq", "ne", "and", "or", "not")),
        ("maximum", 1.78e13),
        ("minimum", 1.77e13),
        ("to_16bit", 9.02e13),
        ("sign", 1.13e13),
        ("exp2", 9.07e12),
        ("exp", 6.53e12),
        ("log", 1.20e12),
        ("sqrt", 9.06e12),
        ("div", 3.37e12),
        ("floordiv", 4.53e12),
        ("mod", 2.82e12),
        ("sigmoid", 2.45e12),
        ("tanh", 2.29e12),
    ),
    sfu_share=sfu_shares(9.07e12, 4.51e13),
    dot_efficiency=0.76,
    overlap=(0.0, 0.4),
    launch_s=3.6e-6,
    source="H100 80GB HBM3, calibrated 2026-12-08",
)

SM90 = Target(
    name="sm90",
    device="NVIDIA H100 80GB HBM3 (nominal)",
    gpu=GPU("cuda", 90, 32),
    smem_per_block=232_448,  # 227 KiB opt-in per block
    regs_per_sm=65_536,
    regs_per_thread=255,
    sm_count=132,
    tensor_flops=788e12,  # measured, dense bf16; spec 989 TFLOP/s
    fp32_flops=66.9e12,  # spec: 132 SMs × 128 lanes × 2 × 1.98 GHz
    sfu_ops=132 * 16 * 1.98e9,  # SMs × 16/clock × 1.98 GHz boost
    hbm_bandwidth=3.0e12,  # measured copy; spec 3.35 TB/s
    caps=Capabilities(tensor_core_dot=True, bf16=True, fp8=True, tma=True, wgmma=True),
    # masked: with a causal or windowed mask, smaller tiles waste less on the tiles the mask cuts
    forward=Tuning(
        defaults=(
            (64, TileConfig(64, 128, 4, 3)),
            (128, TileConfig(128, 128, 8, 3, 240)),
            (256, TileConfig(64, 32, 4, 2)),
        ),
        space=SearchSpace(
            block_m=(64, 128),
            block_n=(32, 64, 128),
            num_warps=(4, 8),
            num_stages=(1, 2, 3, 4, 5),
            max_registers=(0, 240),
        ),
        masked=((128, TileConfig(64, 64, 4, 3)),),
        # a tile gathered at n − m (a relative table): Triton's pipeliner stages the gather too, and one stage ran
        # 2.4× faster on an H100 (bf16, 2×16×8192×128: 169 TFLOP/s at 128×128 w8 s1, 70 at the default)
        gathered=((128, TileConfig(128, 128, 8, 1)),),
    ),
    decode=Tuning(
        defaults=((64, TileConfig(16, 128, 4, 3)), (128, TileConfig(16, 64, 4, 3)), (256, TileConfig(16, 64, 4, 2))),
        space=SearchSpace(
            block_m=(16, 32, 64),
            block_n=(32, 64, 128, 256),
            num_warps=(2, 4, 8),
            num_stages=(1, 2, 3, 4, 5),
            splits=(1, 2, 4, 8, 16, 32, 64),
        ),
    ),
    backward=_BACKWARD_SM90,
    backward_dq_stages=((128, 3),),
    costs=_SM90_COSTS,
)

TARGETS: dict[str, Target] = {t.name: t for t in (INTERPRETER, SM80, SM90)}

# Parts whose rates differ from their architecture's nominal target, by a fragment of the name
# the driver reports. Any other part of a known architecture keeps the nominal rates.
DEVICE_RATES: dict[str, tuple[tuple[str, dict[str, float]], ...]] = {
    "sm90": (
        (
            "H200",
            {
                "tensor_flops": 788e12,  # measured, same compute as H100
                "hbm_bandwidth": 4.3e12,
            },
        ),  # measured copy; spec 4.8 TB/s
    ),
}
