"""The forward of one cascade: rewritten once, lowered once per specialisation, launched per call.

A specialisation is what a compiled kernel depends on besides sequence lengths:
the input dtype, the padded head dimensions and the schedule (fused or split-KV).
"""

from __future__ import annotations

import functools
from dataclasses import replace

import torch

from ... import knobs
from ...backends.target import TileConfig
from ...errors import DTypeError, LoweringError, ShapeError
from ...ir.cascade import Cascade
from ...ir.expr import index_ranks
from ...ir.ranks import PARALLEL
from ...ir.reference import bind_extents
from ...jagged import JaggedBatch
from ..analysis.cost import broadcast_reduction
from ..analysis.linear_form import linear_form
from ..codegen.chunked import lower_states, query_keys
from ..codegen.combine import combine_cascade, lower_combine
from ..codegen.forward import exact_dots, lower, sections
from ..codegen.source import KernelSource
from ..codegen.tile_ranges import key_plan
from ..rewrite.chunked import HAS_STATE, STATE, Chunked, chunked_form
from ..rewrite.compose import compose_gathers
from ..rewrite.online import streaming_obstacle
from ..rewrite.pipeline import optimise
from ..rewrite.stages import key_stages
from ..schedule import Schedule, padded
from .launch import Launcher, chunk_states_call, combine, jit_launch, launch
from .replay import Recording
from .tile_lists import tile_lists

FOLD_BLOCK_M = 16
STATE_BLOCK = 64  # the rows and columns of a chunk state that one program of the state kernel keeps
# positions per chunk of the chunked form (at least a tile): the state kernel's sequential steps and the bytes of the
# chunk states fall as it grows, each row's quadratic part within its chunk grows (fla's chunked kernels use 64)
CHUNK = 64
DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32", torch.float64: "float64"}


def chunk_of(schedule: Schedule | TileConfig) -> int:
    """The positions per chunk of the chunked form with ``schedule``'s tiles: CHUNK, or its tile where longer."""
    return max(CHUNK, schedule.block_m, schedule.block_n)


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
        # a summary of the keys that no query row is part of (linear attention): a key stage, then the query tiles
        self.stages = key_stages(self.kernel_cascade)
        try:
            loops = self._governing_loops()
            self.passes = len(loops[1])
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
        keys = None if self.error is not None else key_plan(loops[0], loops[1][0])
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
        self.linear = linear_form(cascade)  # weights in linear form: a state can replace them
        self._chunked: dict[int, Chunked | None] = {}
        self._crossovers: dict[tuple[int, int, int], int] = {}

    def _governing_loops(self) -> tuple[Cascade, tuple]:
        """The kernel cascade whose loops over the keys the query tiles' programs run, and those loops: the
        cascade's own, or a two-stage cascade's query stage's (MoBA's routed pass after its key-block sums), or
        its key stage's where the query stage has none (linear attention); LoweringError where it has none."""
        if self.stages is None:
            return self.rewritten, sections(self.rewritten).loops
        queries = sections(self.stages.queries, "queries").loops
        if queries:
            return self.stages.queries, queries
        return self.stages.keys, sections(self.stages.keys, "keys").loops

    @functools.cached_property
    def value_rank(self) -> str:
        """The output's value rank (f, or e when k doubles as v)."""
        c = self.rewritten
        return next(r for r in c.tensor(c.outputs[0]).ranks if r not in PARALLEL + ("m",))

    @functools.cached_property
    def splittable(self) -> bool:
        """Whether split-KV can run it: one pass per split, whose states the combine kernel folds (with a
        correction it can apply to a split's states: not max(top, sink)'s). Asked by schedules that could split,
        not at declaration."""
        return self.passes == 1 and self.stages is None and _combinable(self.rewritten)

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
        if self.stages is not None:
            raise LoweringError(f"internal: {self.rewritten.name} runs in two stages, whose kernels are stage_sources'")
        key = (dtype, tuple(sorted(dims.items())), split, int_inputs, saved)
        if key not in self._sources:
            self._sources[key] = lower(
                self.kernel_cascade, dims, DTYPE_NAMES[dtype], split=split, int_inputs=int_inputs, saved=saved
            )
        return self._sources[key]

    def stage_sources(
        self, dtype: torch.dtype, dims: dict[str, int], int_inputs: frozenset = frozenset(), split: bool = False
    ) -> tuple[KernelSource, ...]:
        """The kernels of a two-stage forward: the key stage's, then the query stage's; with ``split``, the key
        stage's split form, its fold, then the query stage's."""
        assert self.stages is not None  # asked only of a two-stage forward
        key = ("stages", dtype, tuple(sorted(dims.items())), int_inputs, split)
        if key not in self._sources:
            name, keys = DTYPE_NAMES[dtype], self.stages.keys
            made = [lower(keys, dims, name, split=split, int_inputs=int_inputs, stage="keys")]
            made += [lower_combine(keys, dims, name, stage="keys")] if split else []
            made += [
                lower(
                    self.stages.queries,
                    dims,
                    name,
                    int_inputs=int_inputs,
                    stage="queries",
                    read=frozenset(self.stages.summaries),
                )
            ]
            self._sources[key] = tuple(made)  # type: ignore[assignment]
        return self._sources[key]  # type: ignore[return-value]

    def chunked(self, chunk: int) -> Chunked | None:
        """The chunked form for chunks of ``chunk`` positions (causal attention in linear form), or None."""
        if chunk not in self._chunked:
            lowered = self.error is None and self.stages is None
            self._chunked[chunk] = chunked_form(self.written, self.kernel_cascade, chunk) if lowered else None
        return self._chunked[chunk]

    def runs_chunked(self, extents: dict[str, int], schedule: Schedule) -> Chunked | None:
        """The chunked form a call of a plain batch, as many queries as keys, runs: where the cascade has one and
        the length is past the crossover, from which it takes fewer FLOPs than the quadratic form; else None (the
        quadratic kernel)."""
        if self.linear is None or extents["m"] != extents["n"]:
            return None
        ch = self.chunked(chunk_of(schedule))
        if ch is None:
            return None
        at = (ch.chunk, extents[ch.contracted], extents[ch.value])
        if at not in self._crossovers:
            self._crossovers[at] = self.linear.crossover(*at)
        return ch if extents["n"] >= self._crossovers[at] else None

    def chunk_sources(
        self, ch: Chunked, dtype: torch.dtype, dims: dict[str, int], int_inputs: frozenset
    ) -> tuple[KernelSource, KernelSource]:
        """The chunked form's kernels: the chunk states', the query tiles' (any tile that divides the chunk)."""
        key = ("chunked", ch.chunk, dtype, tuple(sorted(dims.items())), int_inputs)
        if key not in self._sources:
            name = DTYPE_NAMES[dtype]
            e, f = ch.contracted, ch.value
            blocks = {r: min(dims[r], STATE_BLOCK) for r in (e, f)}
            state_dims = blocks | {f"{r}_extent": dims[f"{r}_extent"] for r in (e, f)}
            states = lower_states(ch.states, state_dims, name, *exact_dots(name), int_inputs, ch.direction == -1)
            keys, positions = query_keys(ch.chunk, ch.direction)
            queries = lower(
                ch.queries, dims, name, int_inputs=int_inputs, stage="chunked", positions=positions, keys=keys
            )
            self._sources[key] = (states, queries)  # type: ignore[assignment]
        return self._sources[key]  # type: ignore[return-value]

    @functools.cached_property
    def keys_splittable(self) -> bool:
        """Whether a two-stage forward's key stage can run split along the keys: its states have a fold."""
        if self.stages is None:
            return False
        try:
            combine_cascade(self.stages.keys, "keys")
        except LoweringError:
            return False
        return True

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
        out_dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The output ``[B, H, M, F]`` (in the inputs' dtype, or ``out_dtype``) and the final per-row states (fp32
        ``[B, H, M]`` each; fp64 for fp64), with the cascade's per-row outputs (the log-sum-exp: fp32 ``[B, H, M]``,
        fp64 for fp64) among them by name.

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
        B, H, M = extents["b"], extents["h"], extents["m"]
        out = empty(B, H, M, extents[self.value_rank], dtype=out_dtype or first.dtype, device=first.device)
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
        inputs, ints = self._kernel_inputs(inputs)
        chunked = None if split or saved or jagged is not None or row_out else self.runs_chunked(extents, schedule)
        if chunked is not None:
            self._run_chunked(chunked, inputs, values, out, schedule, extents, dims, ints, launcher, empty, first.dtype)
            return out, row_out
        summaries: dict[str, torch.Tensor] = {}
        if self.stages is not None:
            if saved:
                raise LoweringError(
                    f"{c.name}: its forward runs in two stages (a summary of the keys, then the query tiles), "
                    f"which have no backward yet"
                )
            # the query stage reads the summaries per head (no packed heads); its schedule's splits cut the key
            # stage's keys, where its states have a fold and the batch is not jagged
            splits = schedule.splits if self.keys_splittable and jagged is None else 1
            schedule, split = replace(schedule, splits=splits, pack=False), False
            *keys, src = self.stage_sources(first.dtype, dims, ints, splits > 1)
            summaries = self._summarise(keys, inputs, values, schedule, extents, jagged, launcher, empty)
            inputs, c = inputs | summaries, self.stages.queries
            schedule = replace(schedule, splits=1)
        else:
            src = self.source(first.dtype, dims, split, ints, saved)
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
            launch(c, src, inputs, values, out, ws | summaries, schedule, extents, jagged, lists, launcher)
        return out, ws

    def _kernel_inputs(self, inputs: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], frozenset]:
        """The inputs as the kernels take them (integers as int32, the tables composed through gathers), and the
        names of the integer ones."""
        ints = frozenset(k for k, v in inputs.items() if not v.is_floating_point())
        inputs = {
            k: (v if v.is_floating_point() or v.dtype == torch.int32 else v.to(torch.int32)) for k, v in inputs.items()
        }
        return inputs | {made.name: made.make(inputs) for made in self.compositions}, ints

    def _run_chunked(
        self, ch, inputs, values, out, schedule, extents, dims, ints, launcher, empty, dtype, initial=None
    ) -> torch.Tensor:
        """The chunked form: the state before each chunk (one program per block of a head's state walks the
        chunks), then the query tiles (the schedule's smaller tile), each over its own chunk's keys up to its own
        and the state before the chunk. ``initial`` (``[B, H, E, F]``) is the state of keys before the sequence;
        returns the state after its last key (fp32; fp64 for fp64), anchored there."""
        states_src, queries_src = self.chunk_sources(ch, dtype, dims, ints)
        e, f, C = ch.contracted, ch.value, ch.chunk
        B, H, N = extents["b"], extents["h"], extents["n"]
        acc = accumulator_dtype(dtype)
        exact = exact_dots(DTYPE_NAMES[dtype])[0]
        kept = acc if exact else dtype  # a 16-bit kernel's tensor cores read the state in the inputs' type
        states = {
            STATE: empty(B, H, -(-N // C), extents[e], extents[f], dtype=kept, device=out.device),
            "final": empty(B, H, extents[e], extents[f], dtype=acc, device=out.device),
        }
        if initial is not None:
            states["init"] = initial
        blocks = (-(-dims[e] // STATE_BLOCK), -(-dims[f] // STATE_BLOCK))
        call = chunk_states_call(ch.states, states_src, inputs, values, states, extents, C, blocks, schedule.num_warps)
        launcher(states_src, call)
        tile = min(schedule.block_m, schedule.block_n)
        own = replace(schedule, block_m=tile, block_n=tile, splits=1, pack=False, reverse_m=False)
        inputs = inputs | {STATE: states[STATE]}
        values = values | {HAS_STATE: int(initial is not None)}
        launch(ch.queries, queries_src, inputs, values, out, {}, own, extents, launcher=launcher)
        return states["final"]

    def prefill(
        self,
        inputs: dict[str, torch.Tensor],
        values: dict[str, float],
        schedule: Schedule,
        extents: dict[str, int],
        initial: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The output of a plain batch (M = N) chunk by chunk at any length, and the state after its last key
        (``[B, H, E, F]``, fp32; fp64 for fp64), given ``initial``, the state of the keys before it (a prefill in
        pieces, or decoding one token at a time). LoweringError where the cascade has no chunked form, or where its
        factor of both sides reads inputs per position (a state that comes in would need them at the position
        before the sequence) or runs backwards."""
        ch = self.chunked(chunk_of(schedule))
        name = self.written.name
        if ch is None:
            raise LoweringError(
                f"{name}: a state carried between calls needs causal attention in linear form (weights "
                f"Σ_e a[m,e]·b[n,e] times a decay anchored at any position, under the mask n ≤ m), which {name} is not"
            )
        per_position = {t.name for t in self.written.inputs if {"m", "n"} & set(t.ranks)} - {"q", "k", "v"}
        reads = {r.tensor for e in ch.states.einsums for r in e.reads()} & per_position
        if initial is not None and (reads or ch.direction != 1):
            why = f"reads {sorted(reads)} per position" if reads else "runs backwards (a mask n ≥ m)"
            raise LoweringError(
                f"{name}: its decay {why}, so a state of earlier keys cannot be carried into a call (it would need "
                f"them at the position before the sequence); run the whole sequence in one call"
            )
        if extents["m"] != extents["n"]:
            raise ShapeError(
                f"{name}: a call that carries a state takes as many queries as keys, got M = "
                f"{extents['m']}, N = {extents['n']}"
            )
        first = inputs[self.rewritten.inputs[0].name]
        refuse_interpreted_bfloat16(first)
        dims = self.dims(extents)
        B, H, M = extents["b"], extents["h"], extents["m"]
        out = torch.empty(B, H, M, extents[self.value_rank], dtype=first.dtype, device=first.device)
        acc = accumulator_dtype(first.dtype)
        e, f = ch.contracted, ch.value
        if initial is not None and (initial.shape != (B, H, extents[e], extents[f]) or initial.dtype != acc):
            raise ShapeError(
                f"{name}: initial_state must be {acc} [B, H, E, F] = [{B}, {H}, {extents[e]}, {extents[f]}], got "
                f"{initial.dtype} {list(initial.shape)}"
            )
        if M == 0:
            final = torch.zeros(B, H, extents[e], extents[f], dtype=acc, device=first.device)
            return out, final if initial is None else initial.clone()
        inputs, ints = self._kernel_inputs(inputs)
        final = self._run_chunked(
            ch, inputs, values, out, schedule, extents, dims, ints, jit_launch, torch.empty, first.dtype, initial
        )
        return out, final

    def _summarise(self, keys, inputs, values, schedule, extents, jagged, launcher, empty) -> dict[str, torch.Tensor]:
        """Run the key stage of a two-stage forward: each summary of the keys per (sequence, head), fp32 (fp64 for
        fp64), with its presence as ``"<summary>:present"`` (int8). ``keys`` holds the key stage's kernel, or its
        split form and fold (``schedule.splits`` splits, each leaving its partial states for the fold)."""
        assert self.stages is not None  # asked only of a two-stage forward
        c, first = self.stages.keys, inputs[keys[0].tensors[0]]
        acc = accumulator_dtype(first.dtype)
        made: dict[str, torch.Tensor] = {}
        for s in keys[-1].summaries:
            shape = [extents[r] for r in c.tensor(s).ranks]
            made[s] = empty(*shape, dtype=acc, device=first.device)
            made[f"{s}:present"] = empty(*shape, dtype=torch.int8, device=first.device)
        if len(keys) == 1:
            launch(c, keys[0], inputs, values, None, made, schedule, extents, jagged, launcher=launcher)
            return made
        partial: dict[str, torch.Tensor] = {}
        B, H, S = extents["b"], extents["h"], schedule.splits
        for s in keys[0].stored:
            shape = [B, H, S, *(extents[r] for r in c.tensor(s).ranks[2:])]
            partial[s] = empty(*shape, dtype=acc, device=first.device)
            partial[f"{s}:present"] = empty(*shape, dtype=torch.int8, device=first.device)
        launch(c, keys[0], inputs, values, None, partial, schedule, extents, launcher=launcher)
        # the fold's program holds no query rows: its BLOCK_M is the smallest tile the template takes
        combine(keys[1], partial, inputs, values, None, made, FOLD_BLOCK_M, extents, S, launcher)
        return made

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
