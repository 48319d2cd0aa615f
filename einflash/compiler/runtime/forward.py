"""The forward of one cascade: rewritten once, lowered once per specialisation, launched per call.

A specialisation is what a compiled kernel depends on besides sequence lengths:
the input dtype, the padded head dimensions and the schedule (fused or split-KV).
"""

from __future__ import annotations

import functools

import torch

from ... import knobs
from ...errors import DTypeError, LoweringError
from ...ir.cascade import Cascade
from ...ir.expr import index_ranks
from ...ir.ranks import PARALLEL
from ...ir.reference import bind_extents
from ...jagged import JaggedBatch
from ..analysis.cost import broadcast_reduction
from ..codegen.combine import combine_cascade, lower_combine
from ..codegen.forward import lower, sections
from ..codegen.source import KernelSource
from ..codegen.tile_ranges import key_plan
from ..rewrite.compose import compose_gathers
from ..rewrite.online import streaming_obstacle
from ..rewrite.pipeline import optimise
from ..schedule import Schedule, padded
from .launch import Launcher, combine, jit_launch, launch
from .replay import Recording
from .tile_lists import tile_lists

DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32", torch.float64: "float64"}


def refuse_interpreted_bfloat16(x: torch.Tensor) -> None:
    """Raise DTypeError for a bfloat16 kernel call that Triton's interpreter would run: it computes bfloat16
    dots and adds wrongly, so the result would be silently wrong."""
    if x.dtype == torch.bfloat16 and x.device.type == "cpu" and knobs.interpreting():
        raise DTypeError(
            "bfloat16 kernels cannot run on Triton's CPU interpreter, which computes bfloat16 wrongly; "
            "call with float16 or float32 tensors on the CPU, bfloat16 on a GPU, or pass "
            "backend='reference'"
        )


def _combinable(c: Cascade) -> bool:
    try:
        combine_cascade(c)
    except LoweringError:
        return False
    return True


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """What kernels of ``dtype`` accumulate (and keep their states) in: fp32, fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class Forward:
    """Rewrites a cascade into its one-pass form and runs it as generated Triton kernels.

    ``error`` holds the LoweringError when the cascade cannot be lowered yet.
    """

    def __init__(self, cascade: Cascade):
        self.written = cascade
        self.rewritten, self.steps = optimise(cascade)
        # kernels read a table gathered through an integer input as one table made before the launch
        self.kernel_cascade, self.compositions = compose_gathers(self.rewritten)
        self.error: LoweringError | None = None
        self.passes = 0  # passes over the keys the kernel makes
        try:
            self.passes = len(sections(self.rewritten).loops)
        except LoweringError as e:
            # what kept the rewrites from a loop for the pass (a read outside the current chunk of n...)
            why = streaming_obstacle(self.steps[-2].cascade) if len(self.steps) > 1 else None
            self.error = e if why is None else type(e)(f"{e}; what keeps it from a loop: {why}")
        # what a call says when it cannot run the kernel (a string made now: under torch.compile too)
        self.refusal = (
            None
            if self.error is None
            else (f"{cascade.name}: {self.error} (pass backend='reference' to run the reference executor instead)")
        )
        self._sources: dict[tuple, KernelSource] = {}
        keys = None if self.error is not None else key_plan(self.rewritten, sections(self.rewritten).loop)
        # an affine mask whose empty key tiles are skipped (the schedule prefers smaller tiles then)
        self.masked = keys is not None and keys.plan is not None
        # an input read at computed positions along both m and n (a relative table): a tile-sized gather per key
        # tile, which the schedule's defaults treat apart
        computed = self.rewritten.computed_reads
        self.gathered = any(
            r.tensor in computed and {"m", "n"} <= index_ranks(r.index)
            for e in self.rewritten.einsums
            for r in e.reads()
        )
        self.lists = None if keys is None else keys.lists  # key tiles classified at run time
        # a product reduced as a broadcast tile, not by tl.dot (GLA): the backward's tiles shrink to fit it
        self.broadcast = any(broadcast_reduction(e) for e in self.rewritten.einsums)

    @functools.cached_property
    def splittable(self) -> bool:
        """Whether split-KV can run it: one pass per split, whose states the combine kernel folds (with a
        correction it can apply to a split's states: not max(top, sink)'s). Asked by schedules that could split,
        not at declaration."""
        return self.passes == 1 and _combinable(self.rewritten)

    def dims(self, extents: dict[str, int]) -> dict[str, int]:
        out = {}
        for r in self.rewritten.ranks:
            if r.name in PARALLEL or r.name in ("m", "n") or r.name in self.rewritten.table_ranks:
                continue
            out[r.name] = padded(extents[r.name])
            out[f"{r.name}_extent"] = extents[r.name]
        return out

    def source(
        self,
        dtype: torch.dtype,
        dims: dict[str, int],
        split: bool,
        int_inputs: frozenset = frozenset(),
        saved: tuple[str, ...] = (),
    ) -> KernelSource:
        if self.error is not None:
            raise self.error
        key = (dtype, tuple(sorted(dims.items())), split, int_inputs, saved)
        if key not in self._sources:
            self._sources[key] = lower(
                self.kernel_cascade, dims, DTYPE_NAMES[dtype], split=split, int_inputs=int_inputs, saved=saved
            )
        return self._sources[key]

    def run(
        self,
        inputs: dict[str, torch.Tensor],
        values: dict[str, float],
        schedule: Schedule,
        extents: dict[str, int] | None = None,
        jagged: JaggedBatch | None = None,
        saved: tuple[str, ...] = (),
        launcher: Launcher = jit_launch,
        record: Recording | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The output ``[B, H, M, F]`` and the final per-row states (fp32 ``[B, H, M]`` each; fp64 for fp64), with
        the cascade's per-row outputs (the log-sum-exp: fp32 ``[B, H, M]``, fp64 for fp64) among them by name.

        ``values`` holds every parameter (defaults resolved); ``extents`` may be passed when known.
        A ``jagged`` batch packs its sequences along m and n of batch-1 tensors: the output and the
        states are then ``[1, H, total_q, ...]``. ``saved`` names states to keep for the backward
        (training, no split): each is returned too (``[B, H, M(, F)]``), with its per-row presence as
        ``"<state>:present"`` (int8, 1 where the row saw a key). ``launcher`` runs each kernel launch
        (Triton's JIT by default; stored binaries for AOT). A ``record`` allocates every buffer and runs
        every launch instead, keeping them for a replay (einflash.compiler.runtime.replay).
        """
        c = self.rewritten
        empty = torch.empty if record is None else record.empty
        launcher = launcher if record is None else record.launch
        extents = extents or bind_extents(c, inputs, values)
        first = inputs[c.inputs[0].name]
        refuse_interpreted_bfloat16(first)
        dims = self.dims(extents)
        value_rank = next(r for r in c.tensor(c.outputs[0]).ranks if r not in PARALLEL + ("m",))
        B, H, M = extents["b"], extents["h"], extents["m"]
        out = empty(B, H, M, extents[value_rank], dtype=first.dtype, device=first.device)
        acc = accumulator_dtype(first.dtype)
        row_out = {o: empty(B, H, M, dtype=acc, device=first.device) for o in c.outputs[1:]}
        if B * H * M == 0:
            return out, row_out
        split = schedule.splits > 1
        if jagged is not None:
            if split:
                raise LoweringError(
                    f"{c.name}: split-KV decoding of a jagged batch is not implemented; run it with splits=1"
                )
            if self.lists is not None:
                raise LoweringError(
                    f"{c.name}: a mask on per-token data (document ids) in a jagged batch is not "
                    f"implemented; the sequences of a jagged batch need no document mask"
                )
            extents = {**extents, "b": jagged.sequences, "m": jagged.max_q, "n": jagged.max_k}
        if saved and split:
            raise LoweringError(
                f"{c.name}: the training forward keeps its states for the backward and runs "
                f"without split-KV; run it with splits=1"
            )
        ints = frozenset(k for k, v in inputs.items() if not v.is_floating_point())
        src = self.source(first.dtype, dims, split, ints, saved)
        inputs = {
            k: (v if v.is_floating_point() or v.dtype == torch.int32 else v.to(torch.int32)) for k, v in inputs.items()
        }
        inputs |= {made.name: made.make(inputs) for made in self.compositions}
        lists = (
            None
            if src.lists is None
            else tile_lists(
                src.lists, inputs, values, B, M, extents["n"], schedule.block_m, schedule.block_n, schedule.pack
            )
        )
        if split:
            return self._split(src, inputs, values, out, row_out, schedule, extents, dims, lists, launcher, empty)
        ws = dict(row_out)
        for s in src.stored:
            extra = [extents[r] for r in c.tensor(s).ranks if r not in PARALLEL + ("m",)]
            ws[s] = empty(B, H, M, *extra, dtype=acc, device=first.device)
        for s in src.saved:
            ws[f"{s}:present"] = empty(B, H, M, dtype=torch.int8, device=first.device)
        if jagged is None or jagged.max_q > 0:
            launch(c, src, inputs, values, out, ws, schedule, extents, jagged, lists, launcher)
        return out, ws

    def _split(self, src, inputs, values, out, row_out, schedule, extents, dims, lists, launcher, empty):
        """Split-KV: each split writes its partial states; the combine kernel folds them."""
        c = self.rewritten
        B, H, M, S = extents["b"], extents["h"], extents["m"], schedule.splits
        dev = out.device
        ws = {}
        for s in src.row_states + src.acc_states:
            extra = [dims[r] for r in c.tensor(s).ranks if r not in PARALLEL + ("m",)]
            ws[s] = empty(B, H, S, M, *extra, dtype=accumulator_dtype(out.dtype), device=dev)
            ws[f"{s}:present"] = empty(B, H, S, M, dtype=torch.int8, device=dev)
        launch(c, src, inputs, values, out, ws, schedule, extents, tile_lists=lists, launcher=launcher)
        comb = self._combine_source(out.dtype, dims)
        rows = row_out | {s: empty(B, H, M, dtype=accumulator_dtype(out.dtype), device=dev) for s in comb.row_states}
        combine(
            comb, ws, inputs, values, out, rows, schedule.block_m if not schedule.pack else 16, extents, S, launcher
        )
        return out, rows

    def _combine_source(self, dtype, dims) -> KernelSource:
        key = ("combine", dtype, tuple(sorted(dims.items())))
        if key not in self._sources:
            self._sources[key] = lower_combine(self.rewritten, dims, DTYPE_NAMES[dtype])
        return self._sources[key]
