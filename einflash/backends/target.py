"""What einflash knows about one kind of hardware, as plain frozen values.

A target is data: limits the compiler must respect, peak rates the roofline divides by,
capabilities templates may rely on, default tile configurations and the search space a
tuner explores. Nothing here runs a kernel or asks a driver.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from ..errors import LoweringError


@dataclass(frozen=True)
class GPU:
    """What Triton's compiler needs to know of a GPU target: the fields of its GPUTarget."""

    backend: str  # "cuda"
    arch: int  # compute capability as one number, 90 for 9.0
    warp_size: int


@dataclass(frozen=True)
class Capabilities:
    """Hardware features a template may use on a target."""

    tensor_core_dot: bool  # tl.dot lowers to tensor-core instructions (mma or wgmma)
    bf16: bool  # bf16 arithmetic computes correctly
    fp8: bool  # fp8 (e4m3/e5m2) tensor-core dot
    tma: bool  # tensor memory accelerator descriptors (tl.make_tensor_descriptor)
    wgmma: bool  # warp-group asynchronous matrix multiply (Hopper)


@dataclass(frozen=True)
class TileConfig:
    """One kernel configuration: query rows and keys per tile, warps per program, pipeline depth, and the
    register budget per thread given to the assembler (0: its own choice).

    >>> TileConfig(128, 64, 8, 3)
    TileConfig(block_m=128, block_n=64, num_warps=8, num_stages=3, max_registers=0)
    """

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    max_registers: int = 0


@dataclass(frozen=True)
class SearchSpace:
    """Candidate values per knob; a tuner draws configurations from their product.

    ``splits`` is the number of slices the key sequence is cut into (split-KV decode); 1 means no split.
    ``max_registers`` are register budgets per thread (0: the assembler's own choice).

    >>> space = SearchSpace(block_m=(64, 128), block_n=(64,), num_warps=(4, 8), num_stages=(2, 3))
    >>> space.contains(TileConfig(128, 64, 8, 3)), space.contains(TileConfig(256, 64, 8, 3))
    (True, False)
    """

    block_m: tuple[int, ...]
    block_n: tuple[int, ...]
    num_warps: tuple[int, ...]
    num_stages: tuple[int, ...]
    splits: tuple[int, ...] = (1,)
    max_registers: tuple[int, ...] = (0,)

    def contains(self, cfg: TileConfig) -> bool:
        """Whether every field of ``cfg`` is among this space's candidates for it."""
        return all(getattr(cfg, f.name) in getattr(self, f.name) for f in fields(cfg))


@dataclass(frozen=True)
class Tuning:
    """Defaults by head-dimension bucket, and the search space, for one kernel family on one target.

    ``defaults`` pairs the largest (padded) head dimension of each bucket with its configuration, ascending.

    >>> t = Tuning(((64, TileConfig(128, 64, 4, 3)), (128, TileConfig(128, 64, 8, 3))),
    ...            SearchSpace((128,), (64,), (4, 8), (3,)))
    >>> t.default(80)
    TileConfig(block_m=128, block_n=64, num_warps=8, num_stages=3, max_registers=0)
    """

    defaults: tuple[tuple[int, TileConfig], ...]
    space: SearchSpace
    masked: tuple[tuple[int, TileConfig], ...] = ()  # buckets where an affine mask prefers other tiles
    gathered: tuple[tuple[int, TileConfig], ...] = ()  # buckets where a tile-sized gather prefers others

    def default(self, head_dim: int, masked: bool = False, gathered: bool = False) -> TileConfig:
        """The configuration of the smallest bucket that holds ``head_dim`` (``masked``: of a masked cascade;
        ``gathered``: of one that reads an input at computed positions along both m and n, a relative table)."""
        for largest, cfg in (self.gathered if gathered else ()) + (self.masked if masked else ()):
            if head_dim <= largest:
                return cfg
        for largest, cfg in self.defaults:
            if head_dim <= largest:
                return cfg
        raise LoweringError(
            f"head dimension {head_dim} is larger than the largest one with a tile configuration "
            f"({self.defaults[-1][0]}); split the head dimension or add a bucket to the target"
        )


@dataclass(frozen=True)
class CostModel:
    """The rates a kernel's predicted time is priced at on one target, and the efficiencies fitted to its
    measured kernels (``einflash.compiler.analysis.timing``).

    ``ops``: results per second of each elementwise operator as einflash's kernels write it (whole device), with
    ``row_max``, ``row_sum`` (elements per second a row reduction takes in) and ``to_16bit`` (conversions);
    ``sfu_share``: the share of an operator's time spent on the special-function unit (the rest is ALU work);
    ``dot_efficiency``: the fraction of the target's tensor-core rate the attention loop's products reach;
    ``overlap``: the fraction of the shorter of a tile's products and elementwise work hidden under the longer,
    with one program per SM and with several (one program's products then run beside another's elementwise
    work); ``launch_s``: one launch; ``source``: where the numbers come from.

    >>> m = CostModel((("exp2", 4e12),), (("exp2", 1.0),), 0.8, (0.2, 0.5), 5e-6, "example")
    >>> m.rate("exp2"), m.share("exp2"), m.overlap_at(3)
    (4000000000000.0, 1.0, 0.5)
    """

    ops: tuple[tuple[str, float], ...]
    sfu_share: tuple[tuple[str, float], ...]
    dot_efficiency: float
    overlap: tuple[float, float]
    launch_s: float
    source: str

    def rate(self, op: str) -> float:
        """Results per second of ``op``; an operator the model has no rate for is refused."""
        for name, rate in self.ops:
            if name == op:
                return rate
        raise LoweringError(f"the cost model ({self.source}) has no rate for the operator {op!r}")

    def share(self, op: str) -> float:
        """The share of ``op``'s time on the special-function unit (0 for plain arithmetic)."""
        return dict(self.sfu_share).get(op, 0.0)

    def overlap_at(self, per_sm: int) -> float:
        """The overlap of a tile's products and elementwise work with ``per_sm`` programs on each SM."""
        return self.overlap[0] if per_sm <= 1 else self.overlap[1]


@dataclass(frozen=True)
class Target:
    """One kind of hardware, as the compiler, the roofline and the tuner see it.

    Limits are None where nothing enforces them (the interpreter). Rates are per device:
    FLOP/s count a fused multiply-add as two; ``sfu_ops`` counts exp2 (and other special
    function) results per second; ``hbm_bandwidth`` is bytes per second, read plus written.
    """

    name: str
    device: str  # the GPU's name as its driver reports it, or a nominal description
    gpu: GPU | None  # what triton.compile targets; None for the interpreter
    smem_per_block: int | None  # bytes of shared memory one program may use (opt-in maximum)
    regs_per_sm: int | None  # 32-bit registers per streaming multiprocessor
    regs_per_thread: int | None  # 32-bit registers one thread may use
    sm_count: int | None
    tensor_flops: float  # dense fp16/bf16 tensor-core FLOP/s
    fp32_flops: float  # non-tensor fp32 FLOP/s
    sfu_ops: float
    hbm_bandwidth: float
    caps: Capabilities
    forward: Tuning  # the one-pass forward template
    decode: Tuning  # split-KV decode (partials; the combine kernel is tiny and not tuned)
    # the backward: block_n keys kept per dK/dV program (queries per dQ program), block_m streamed; the stages
    # are the dK/dV kernel's, the register budget holds for both kernels
    backward: Tuning | None = None
    # the dQ kernel's pipeline depth per head-dimension bucket (largest head dim, stages), where it differs from
    # the dK/dV kernel's
    backward_dq_stages: tuple[tuple[int, int], ...] = ()
    costs: CostModel | None = None  # the cost model that predicts kernel times (None: no prediction)

    @property
    def is_interpreter(self) -> bool:
        return self.gpu is None
