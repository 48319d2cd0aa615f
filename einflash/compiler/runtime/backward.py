"""One backward call: the gradient of a Forward's cascade, its kernels rendered once per specialisation, and
their launches with every argument by name.

The rows kernel runs first (its row terms are inputs of the others); then the dK/dV and dQ kernels, in one
launch by default (``BackwardSchedule.one_launch``), or the dK/dV kernel alone adding the query-side
gradients atomically (``atomic_dq``). Each input's gradient is then assembled from the partials the kernels
wrote (``Launched.finish``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from ...errors import DifferentiationError, LoweringError
from ...ir.cascade import Cascade, Einsum, Layout
from ...ir.ranks import PARALLEL, STREAM
from ...ir.reference import run_reference
from ...jagged import JaggedBatch
from ..analysis.mask_tiles import conjuncts
from ..autodiff.chunked import ChunkedGradient, chunked_gradient, chunked_gradients
from ..autodiff.gradient import (
    Gradient,
    Partial,
    finish,
    gradient_of,
    presence_predicate,
    reference_partials,
    saved_states,
)
from ..autodiff.parts import Cut, Looped, Parts, cut, restrict
from ..autodiff.stages import differentiable, stage_gradients
from ..codegen.backward import BackwardKernel, Output, lower_kv, lower_one_launch, lower_q, lower_rows
from ..codegen.forward import exact_dots
from ..codegen.signature import KernelCall, param_name, pointer
from ..codegen.tile_ranges import governing_mask
from ..rewrite.compose import Composition, composed, compositions, read_composed
from ..rewrite.stages import Stages
from ..schedule import ROWS_BLOCK_M, ROWS_WARPS, BackwardSchedule, Schedule
from .forward import DTYPE_NAMES, Forward, accumulator_dtype, refuse_interpreted_bfloat16
from .launch import jit_launch
from .replay import Recording
from .tile_lists import tile_lists

# a launcher of the backward's kernels (einflash.compiler.runtime.launch.jit_launch by default)
BackwardLauncher = Callable[[BackwardKernel, KernelCall], None]


@dataclass(frozen=True)
class Launched:
    """What one backward call's kernels wrote: each partial's buffer by name, with the names of its dimensions
    (see ``einflash.compiler.autodiff.gradient.finish``), for the gradient cascade cut to the wanted inputs
    (None: nothing ran, every wanted gradient is 0)."""

    gradient: Gradient | None
    partials: dict[str, torch.Tensor]
    labels: dict[str, tuple[str, ...]]
    wanted: frozenset[str]
    made: dict[str, torch.Tensor | None] | None = None  # the gradients themselves (the chunked form's)

    def finish(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
        """Each input's gradient in its own shape and dtype (None for inputs not wanted)."""
        if self.made is not None:
            return self.made
        if self.gradient is None:
            return {name: (torch.zeros_like(x) if name in self.wanted else None) for name, x in inputs.items()}
        return finish(self.gradient, self.partials, self.labels, inputs, self.wanted)


@dataclass
class Backward:
    """The gradient of a Forward's cascade, its kernels, and one backward call. Causal attention in linear form,
    where the forward runs chunk by chunk, differentiates as three chunked forwards (einflash.compiler.autodiff
    .chunked) at the same lengths.

    ``error`` holds the DifferentiationError (or LoweringError) when the gradient cannot be derived or
    lowered yet; calls then raise it.
    """

    forward: Forward
    gradient: Gradient | None = None
    parts: Parts | None = None
    error: LoweringError | None = None
    _kernels: dict = field(default_factory=dict)
    _cuts: dict = field(default_factory=dict)
    _made: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.forward.error is not None:
            self.error = self.forward.error
            return
        stages = self.forward.stages
        if stages is not None:  # the stages differentiate as they are (einflash.compiler.autodiff.stages)
            why = differentiable(stages)
            if why is not None:
                self.error = DifferentiationError(
                    f"{stages.keys.name}: its forward runs in two stages, a summary of the keys "
                    f"({', '.join(stages.summaries)}) and then the query tiles; {why}: train it with "
                    f"backend='reference', or run the forward without gradients"
                )
            return
        summary = next((t for t in self.forward.rewritten.states if "m" not in t.ranks), None)
        if summary is not None:
            self.error = DifferentiationError(
                f"{self.forward.rewritten.name}: its forward keeps a summary of the keys, {summary.name}"
                f"[{','.join(summary.ranks)}] (MoBA's block sums), in a pass of its own; the backward kernels "
                f"would need it in every program that streams queries, which they do not have yet: train it with "
                f"backend='reference', or run the forward without gradients"
            )
            return
        try:
            self.gradient = gradient_of(self.forward)
            self.parts = self.cut(None).parts
        except LoweringError as e:
            self.error = e
            return
        fwd = self.gradient.forward
        pair = tuple(e for e in fwd.einsums if STREAM in e.iteration_ranks)
        governing = governing_mask(fwd, pair)
        # the conjuncts of the one mask every state of the forward is masked by: tiles where all of them
        # hold have a key on every row (None: several masks, no tile is known to)
        self._full_mask = (
            frozenset()
            if not any(e.where is not None for e in pair)
            else None
            if governing is None
            else frozenset(conjuncts(governing))
        )
        self._state_filters = frozenset(presence_predicate(st) for st in self.gradient.saved)

    def on_reference(
        self,
        inputs: dict[str, torch.Tensor],
        values: dict[str, float],
        grad_output: torch.Tensor,
        states_from: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor | None]:
        """Each input's gradient from the gradient cascade on the reference executor (no kernel), in the inputs'
        dtype, with the forward's output and saved states computed at ``states_from`` (default: ``inputs``):
        a backward whose recomputation has moved away from its forward, as the tolerance rule measures it."""
        if self.differentiates_stages:  # nothing saved: every state recomputed from the inputs
            return stage_gradients(self._stages, inputs, values, grad_output, frozenset(inputs))
        if self.gradient is None:
            raise self.error or LoweringError(f"{self.forward.rewritten.name}: no backward")
        at = inputs if states_from is None else states_from
        g, streamed = self.gradient, self.forward.rewritten
        dtype = next(x.dtype for x in inputs.values() if x.is_floating_point())
        saved = saved_states(g, streamed, at, values, dtype)
        out = run_reference(streamed, at, values, dtype=dtype)
        parts = reference_partials(g, inputs, values, grad_output.to(dtype), out, saved, dtype)
        return finish(g, parts, {p.name: p.ranks for p in g.partials}, inputs, values=values)

    @property
    def saved(self) -> tuple[str, ...]:
        """The forward states the backward reads (the forward stores them with their presence)."""
        return () if self.gradient is None else tuple(s.name for s in self.gradient.saved)

    @property
    def frozen(self) -> tuple[tuple[str, str], ...]:
        """The inputs that get no gradient, each with why (a table read at computed positions)."""
        return () if self.gradient is None else self.gradient.frozen

    @property
    def differentiates_stages(self) -> bool:
        """Whether the backward differentiates the forward's two stages (einflash.compiler.autodiff.stages)."""
        return self.error is None and self.forward.stages is not None

    @property
    def _stages(self) -> Stages:
        stages = self.forward.stages
        assert stages is not None and self.error is None  # asked only where differentiates_stages
        return stages

    def _derived(self) -> Gradient:
        """The gradient; raises why there is none."""
        if self.error is not None:
            raise self.error
        assert self.gradient is not None  # __post_init__ derives it or records why it cannot
        return self.gradient

    def cut(self, needed: frozenset[str] | None) -> Cut:
        """The kernels' cascades for the gradients of ``needed`` (None: every input's)."""
        if needed not in self._cuts:
            gradient = self._derived()
            self._cuts[needed] = cut(gradient if needed is None else restrict(gradient, needed))
        return self._cuts[needed]

    def compositions(self, needed: frozenset[str] | None) -> tuple[Composition, ...]:
        """The tables the kernels of ``needed``'s gradients read composed (``einflash.compiler.rewrite.compose``):
        made by each call before the launches."""
        if needed not in self._made:
            self._made[needed] = compositions(self.cut(needed).gradient.cascade)
        return self._made[needed]

    def _outputs(self, cut: Cut, kernel: str, atomic: bool) -> dict[str, Output]:
        g = cut.gradient
        out = {}
        for p in g.partials:
            ranks = tuple(r for r in p.ranks if r not in PARALLEL)
            if kernel == "rows" and p.kernel == "rows":
                out[p.name] = Output(p.name, ranks, program=None if "m" in ranks else "pid_m")
            elif kernel == "q" and p.kernel == "q":
                out[p.name] = Output(p.name, ranks)
            elif kernel == "kv" and p.kernel == "kv" and p.diagonal is not None:  # one row of sums per program
                out[p.name] = Output(p.name, (p.diagonal.rank,), program="pid_n", diagonal=p.diagonal)
            elif kernel == "kv" and p.kernel == "kv":
                no_seq = not ({"m", "n"} & set(ranks))
                out[p.name] = Output(p.name, ranks, program="pid_n" if no_seq else None)
            elif kernel == "kv" and atomic and p.kernel == "q":
                out[p.name] = Output(p.name, ranks, atomic=True)
        made = cut.parts.key_kernels
        if cut.parts.rows is not None:
            made["rows"] = (cut.parts.rows, cut.parts.row_terms)
        if kernel in made:
            part, terms = made[kernel]
            for t in terms:
                out = {t: Output(t, tuple(r for r in part.tensor(t).ranks if r not in PARALLEL))} | out
        return out

    def kernel(
        self,
        kind: str,
        dtype: torch.dtype,
        dims: dict,
        ints: frozenset,
        atomic: bool = False,
        needed: frozenset[str] | None = None,
    ) -> BackwardKernel:
        """The rendered ``kind`` kernel ("rows", "keys1", "keys2"..., "kv", "q", or "one": kv and q in one
        launch) for these dtype, head dims and integer inputs."""
        key = (kind, dtype, tuple(sorted(dims.items())), ints, atomic, needed)
        if key in self._kernels:
            return self._kernels[key]
        cut = self.cut(needed)
        name = DTYPE_NAMES[dtype]
        full = self._state_filters if self._full_mask is not None else frozenset()
        made = self.compositions(needed)
        if kind == "rows":
            rows = cut.parts.rows
            assert rows is not None, kind  # asked for only where the gradient has row terms
            src = lower_rows(composed(rows, made), tuple(self._outputs(cut, "rows", atomic).values()), dims, name, ints)
        elif kind == "kv":
            sums = {
                p.name
                for p in cut.gradient.partials
                if p.kernel == "kv" and cut.gradient.forward.tensor(p.input).layout is Layout.KEY
            }
            src = lower_kv(
                composed_loop(cut.loops["kv_atomic" if atomic else "kv"], made),
                self._outputs(cut, "kv", atomic),
                sums,
                dims,
                name,
                ints,
                full,
                self._full_mask,
            )
        elif kind == "q" or kind in cut.parts.key_kernels:
            src = lower_q(
                composed_loop(cut.loops[kind], made),
                self._outputs(cut, kind, atomic),
                dims,
                name,
                ints,
                full,
                self._full_mask,
                kind,
            )
        else:
            src = lower_one_launch(
                self.kernel("kv", dtype, dims, ints, needed=needed),
                self.kernel("q", dtype, dims, ints, needed=needed),
                cut.loops["kv"].cascade,
                cut.loops["q"].cascade,
            )
        self._kernels[key] = src
        return src

    def run(
        self,
        inputs: dict[str, torch.Tensor],
        values: dict[str, float],
        output: torch.Tensor,
        states: dict[str, torch.Tensor],
        grad_output: torch.Tensor,
        schedule: BackwardSchedule,
        extents: dict[str, int],
        visits: torch.Tensor | None = None,
        needed: frozenset[str] | None = None,
        launcher: BackwardLauncher = jit_launch,
        jagged: JaggedBatch | None = None,
    ) -> dict[str, torch.Tensor | None]:
        """The gradient of every floating-point input named in ``needed`` (None: of all; the others get None)
        given the forward's output, its saved ``states`` (as ``Forward.run(saved=...)`` returns them) and the
        incoming gradient.

        ``visits`` (tests only): int32 ``[B·Hkv, key tiles]``, where the dK/dV programs store how many
        (query head, query tile) pairs they visited. ``launcher`` runs each kernel launch (Triton's JIT by
        default), as the forward's does. A ``jagged`` batch packs its sequences along m and n as the forward
        took them (``extents`` are of the packed tensors); the gradients come packed the same way.
        """
        return self.launch(
            inputs, values, output, states, grad_output, schedule, extents, visits, needed, launcher, jagged=jagged
        ).finish(inputs)

    def launch(
        self,
        inputs: dict[str, torch.Tensor],
        values: dict[str, float],
        output: torch.Tensor,
        states: dict[str, torch.Tensor],
        grad_output: torch.Tensor,
        schedule: BackwardSchedule,
        extents: dict[str, int],
        visits: torch.Tensor | None = None,
        needed: frozenset[str] | None = None,
        launcher: BackwardLauncher = jit_launch,
        record: Recording | None = None,
        jagged: JaggedBatch | None = None,
    ) -> Launched:
        """``run``'s kernels, launched: what they wrote, for ``Launched.finish`` to make the gradients of. A
        ``record`` allocates every buffer and runs every launch instead (einflash.compiler.runtime.replay)."""
        if self.differentiates_stages:
            return self._launch_stages(inputs, values, grad_output, extents, needed, jagged)
        B, H, M, N = extents["b"], extents["h"], extents["m"], extents["n"]
        wanted = self._wanted(inputs, needed)
        if B * H * M * N == 0 or not wanted:  # nothing to differentiate through: every gradient is 0
            return Launched(None, {}, {}, wanted)
        refuse_interpreted_bfloat16(output)
        # fp32 and fp64 keep the quadratic backward: a decay's gradient through dφ is a difference of row and column
        # sums that cancel over the sequence, and loses more digits to it than their tolerance has
        sixteen = not exact_dots(DTYPE_NAMES[output.dtype])[0]
        if jagged is None and visits is None and sixteen and self.chunked is not None:
            g, forwards = self.chunked
            tile = min(schedule.block_m, schedule.block_n)
            schedule_f = Schedule(tile, tile, schedule.num_warps, schedule.num_stages)
            if self.forward.runs_chunked(extents, schedule_f) is not None:
                # the derived forwards' launches, through the JIT, with host work between them: not recorded, so
                # not replayed
                def run(c: Cascade, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
                    return forwards[c.key].run(tensors, values, schedule_f, out_dtype=dtype)[0]

                # a decay's gradient through dφ weighs each position by itself, which 16-bit dA and dB do not survive
                # (einflash.compiler.autodiff.chunked): the quadratic kernels make it, pair by pair, unrecorded too
                decayed = wanted & g.decay_inputs
                made = chunked_gradients(g, inputs, values, grad_output, run, wanted - decayed)
                if decayed:
                    quadratic = self._launch_quadratic(
                        inputs, values, output, states, grad_output, schedule, extents, None, decayed, launcher, None
                    )
                    pairwise = quadratic.finish(inputs)
                    made |= {n: pairwise[n] for n in decayed}
                return Launched(None, {}, {}, wanted, made)
        return self._launch_quadratic(
            inputs, values, output, states, grad_output, schedule, extents, visits, needed, launcher, record, jagged
        )

    def _wanted(self, inputs: dict[str, torch.Tensor], needed: frozenset[str] | None) -> frozenset[str]:
        """The floating-point inputs of the gradient cascade named in ``needed`` (None: all of them)."""
        return frozenset(
            t.name
            for t in self._derived().forward.inputs
            if inputs[t.name].is_floating_point() and (needed is None or t.name in needed)
        )

    def _launch_quadratic(
        self,
        inputs: dict[str, torch.Tensor],
        values: dict[str, float],
        output: torch.Tensor,
        states: dict[str, torch.Tensor],
        grad_output: torch.Tensor,
        schedule: BackwardSchedule,
        extents: dict[str, int],
        visits: torch.Tensor | None,
        needed: frozenset[str] | None,
        launcher: BackwardLauncher,
        record: Recording | None,
        jagged: JaggedBatch | None = None,
    ) -> Launched:
        """The gradient cascade's kernels: the rows kernel, the keys kernels, then dK/dV and dQ."""
        wanted = self._wanted(inputs, needed)
        call = _Call.of(self, inputs, values, output, states, grad_output, extents, needed, record, jagged)
        launcher = launcher if record is None else record.launch
        if call.cut.parts.rows is not None:
            launcher(*call.rows())  # its row terms are inputs of the kernels that follow
        for kind in call.cut.parts.key_kernels:
            launcher(*call.q(schedule, kind))  # and so are their key terms, in order
        atomic = schedule.atomic_dq and call.cut.parts.q is not None
        calls = []
        if call.cut.parts.kv is not None or atomic:
            calls.append(call.kv(schedule, atomic, visits))
        if call.cut.parts.q is not None and not atomic:
            calls.append(call.q(schedule))
        if len(calls) == 2 and schedule.one_launch and visits is None:  # visit counts need each kernel's own grid
            kv_launch, q_launch = calls
            calls = [call.one_launch(kv_launch, q_launch, schedule)]
        for kernel, launch in calls:
            launcher(kernel, launch)
        return Launched(call.cut.gradient, call.partials, call.labels, wanted)

    def _launch_stages(self, inputs, values, grad_output, extents, needed, jagged) -> Launched:
        """The two stages' gradients (einflash.compiler.autodiff.stages): torch's work, no kernel of its own (a
        recording stays empty: nothing is replayed). A jagged batch differentiates each sequence's slice."""
        wanted = frozenset(n for n, x in inputs.items() if x.is_floating_point() and (needed is None or n in needed))
        if not extents["b"] * extents["h"] * extents["m"] * extents["n"] or not wanted:
            return Launched(None, {}, {}, wanted)
        if jagged is None:
            return Launched(None, {}, {}, wanted, stage_gradients(self._stages, inputs, values, grad_output, wanted))
        c = self.forward.written
        summed = {n: torch.zeros_like(x) for n, x in inputs.items() if n in wanted}
        sequences = zip(
            jagged.sequence_inputs(c, inputs),
            jagged.sequence_inputs(c, inputs | summed),  # each sequence's view of the gradients
            jagged.cu_q.tolist(),
            jagged.lengths,
        )
        for mine, into, q0, (m, n) in sequences:
            if not m * n:
                continue
            made = stage_gradients(self._stages, mine, values, grad_output.narrow(2, q0, m), wanted)
            for name, d in made.items():
                if d is not None:
                    into[name].add_(d)
        return Launched(None, {}, {}, wanted, {n: summed.get(n) for n in inputs})

    @functools.cached_property
    def chunked(self) -> tuple[ChunkedGradient, dict[str, Forward]] | None:
        """The chunked gradient of the forward's cascade, and the forwards of its two derived attentions by key."""
        g = chunked_gradient(self.forward.written) if self.forward.linear is not None else None
        return None if g is None else (g, {c.key: Forward(c) for c in (g.forward, g.reversed)})

    def direct(self, p: Partial, o: Output) -> bool:
        """Whether the kernel can write the input's gradient itself: the only partial of its input, laid out
        as the input is (a sum over the GQA group done, no rank to sum or rename)."""
        g = self._derived()
        decl = g.forward.tensor(p.input)
        mine = [x for x in g.partials if x.input == p.input]
        heads = "h" if (o.head == "off_hk") == (decl.layout is Layout.KEY) else None
        return len(mine) == 1 and not p.relabel and heads is not None and decl.ranks == ("b", "h") + o.ranks


@dataclass
class _Call:
    """One backward call's tensors by the gradient cascade's names, and the buffers its kernels write."""

    backward: Backward
    cut: Cut
    given: dict[str, torch.Tensor]  # the gradient cascade's inputs (and row terms once computed)
    values: dict[str, float]
    extents: dict[str, int]
    dims: dict[str, int]
    ints: frozenset[str]  # inputs holding integers
    dtype: torch.dtype  # of q, k and v
    device: torch.device
    kv_heads: int
    needed: frozenset[str] | None
    empty: Callable[..., torch.Tensor]  # torch.empty, or a recording's
    zeros: Callable[..., torch.Tensor]
    jagged: JaggedBatch | None = None
    partials: dict[str, torch.Tensor] = field(default_factory=dict)
    labels: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @classmethod
    def of(
        cls, backward: Backward, inputs, values, output, states, grad_output, extents, needed, record, jagged=None
    ) -> _Call:
        needed = None if needed is None else frozenset(needed)
        cut = backward.cut(needed)
        g = cut.gradient
        given = {
            k: (v if v.is_floating_point() or v.dtype == torch.int32 else v.to(torch.int32)) for k, v in inputs.items()
        }
        given[g.grad_output] = grad_output.contiguous()
        if g.output is not None:
            given[g.output] = output
        for st in g.saved:
            given[st.value], given[st.present] = states[st.name], states[f"{st.name}:present"]
        given |= {made.name: made.make(given) for made in backward.compositions(needed)}
        ints = frozenset(k for k, v in inputs.items() if not v.is_floating_point()) | {st.present for st in g.saved}
        first = next(x for x in inputs.values() if x.is_floating_point())
        hkv = next(inputs[t.name].shape[1] for t in g.forward.inputs if t.layout is Layout.KEY)
        return cls(
            backward,
            cut,
            given,
            values,
            extents,
            backward.forward.dims(extents),
            ints,
            first.dtype,
            first.device,
            hkv,
            needed,
            torch.empty if record is None else record.empty,
            torch.zeros if record is None else record.zeros,
            jagged,
        )

    @property
    def grid(self) -> dict[str, int]:
        """The extents the grids cover: a jagged batch's sequences, its longest query and key lengths."""
        j = self.jagged
        return self.extents if j is None else {**self.extents, "b": j.sequences, "m": j.max_q, "n": j.max_k}

    def jagged_args(self) -> dict[str, object]:
        """The offsets every backward template takes (None, and JAGGED off, for a stacked batch)."""
        j = self.jagged
        return dict(
            cu_q_ptr=None if j is None else j.cu_q, cu_k_ptr=None if j is None else j.cu_k, JAGGED=j is not None
        )

    @property
    def group(self) -> int:
        return self.extents["h"] // self.kv_heads

    def kernel(self, kind: str, atomic: bool = False) -> BackwardKernel:
        return self.backward.kernel(kind, self.dtype, self.dims, self.ints, atomic, self.needed)

    def workspace(self, o: Output, programs: int, zero: bool) -> torch.Tensor:
        """The buffer output ``o`` is written to; a partial's is kept with the names of its dimensions."""
        ext = self.extents
        # rows and keys sit packed as the inputs do; a partial per program is kept per sequence
        batches = self.grid["b"] if o.program else ext["b"]
        shape = [batches, self.kv_heads if o.head == "off_hk" else ext["h"]] + ([programs] if o.program else [])
        p = next((p for p in self.cut.gradient.partials if p.name == o.name), None)
        d = o.diagonal
        if d is not None and p is not None:  # the entries the diagonals read: of the table, or of the integer
            table = d.through or p.input  # input gathering it
            shape.append(self.given[table].shape[self.cut.gradient.forward.tensor(table).ranks.index(d.rank)])
        else:
            shape += [ext[r] for r in o.ranks]
        if p is not None and o.program is None and not o.atomic and self.backward.direct(p, o):
            dtype = self.given[p.input].dtype
        else:
            dtype = accumulator_dtype(self.dtype)
        t = (self.zeros if zero else self.empty)(*shape, dtype=dtype, device=self.device)
        if p is not None:
            self.partials[o.name] = t
            self.labels[o.name] = ("b", "hk" if o.head == "off_hk" else "h") + (("p",) if o.program else ()) + o.ranks
        return t

    def tensors(self, k: BackwardKernel, outs: dict[str, torch.Tensor]) -> dict[str, object]:
        """A kernel's tensor arguments (inputs, then outputs, each with its strides), its parameters and head dims,
        and the extents every backward template takes."""
        args: dict[str, object] = {}
        for name in k.tensors:
            args |= pointer(name, self.given[name])
        for o in k.outputs:
            args |= pointer(o.name, outs[o.name])
            if o.diagonal is not None:
                args[f"len_{o.name}"] = outs[o.name].shape[-1]
        ext = self.grid
        return (
            args
            | {param_name(p): self.values[p] for p in k.params}
            | dict(k.constexprs)
            | dict(M=ext["m"], N=ext["n"], H=ext["h"], GROUP=self.group)
            | self.jagged_args()
        )

    def rows(self) -> tuple[BackwardKernel, KernelCall]:
        """The rows kernel's launch; its row terms become inputs of the kernels that follow."""
        k = self.kernel("rows")
        tiles = -(-self.grid["m"] // ROWS_BLOCK_M)
        outs = {o.name: self.workspace(o, tiles, False) for o in k.outputs}
        for t in self.cut.parts.row_terms:
            self.given[t] = outs[t]
        return k, k.call(
            (tiles, self.grid["b"] * self.grid["h"]),
            self.tensors(k, outs) | dict(BLOCK_M=ROWS_BLOCK_M),
            ROWS_WARPS,
            1,
        )

    def kv(self, schedule: BackwardSchedule, atomic: bool, visits) -> tuple[BackwardKernel, KernelCall]:
        """The dK/dV kernel's launch: one program per key tile and kv head."""
        k = self.kernel("kv", atomic)
        programs = -(-self.grid["n"] // schedule.block_n)
        zeroed = {o.name for o in k.outputs if ("m" in o.ranks and "n" in o.ranks) or o.atomic or o.diagonal}
        outs = {o.name: self.workspace(o, programs, zero=o.name in zeroed) for o in k.outputs}
        own = dict(
            visits_ptr=visits,
            BLOCK_M=schedule.block_m,
            BLOCK_N=schedule.block_n,
            NUM_STAGES=schedule.num_stages,
            COUNT_VISITS=visits is not None,
        )
        return k, k.call(
            (programs, self.grid["b"] * self.kv_heads),
            self.tensors(k, outs) | own,
            schedule.num_warps,
            schedule.num_stages,
            schedule.max_registers,
        )

    def q(self, schedule: BackwardSchedule, kind: str = "q") -> tuple[BackwardKernel, KernelCall]:
        """The dQ kernel's launch (the forward's template): one program per query tile and query head; or, as
        ``kind`` "keys1", "keys2"..., a keys kernel's, whose key terms become inputs of the kernels that follow."""
        k = self.kernel(kind)
        outs = {o.name: self.workspace(o, 1, False) for o in k.outputs}
        for t in self.cut.parts.key_kernels[kind][1] if kind != "q" else ():
            self.given[t] = outs[t]
        bm, bn = schedule.block_n, schedule.block_m
        ext = self.grid
        args = self.tensors(k, outs)
        if k.lists is not None and self.jagged is not None:
            raise LoweringError(
                f"{self.cut.gradient.forward.name}: key tiles listed at run time (a mask on per-token data) in a "
                f"jagged batch are not implemented"
            )
        if k.lists is not None:
            tiles, counts = tile_lists(k.lists, self.given, self.values, ext["b"], ext["m"], ext["n"], bm, bn, False)
            args |= pointer("tiles", tiles) | pointer("counts", counts)
        # the forward template's own arguments: no split (1 tile share), no visit counter
        own = dict(
            TILES_PER_SPLIT=1,
            visits_ptr=None,
            BLOCK_M=bm,
            BLOCK_N=bn,
            NUM_STAGES=schedule.dq_depth,
            SPLIT=False,
            PACK=False,
            REVERSE_M=False,
            COUNT_VISITS=False,
        )
        return k, k.call(
            (-(-ext["m"] // bm), ext["b"] * ext["h"], 1),
            args | own,
            schedule.num_warps,
            schedule.dq_depth,
            schedule.max_registers,
        )

    def one_launch(
        self, kv: tuple[BackwardKernel, KernelCall], q: tuple[BackwardKernel, KernelCall], schedule: BackwardSchedule
    ) -> tuple[BackwardKernel, KernelCall]:
        """The dK/dV and dQ launches as one: each program of the grid runs one of either kind."""
        (_, kv_call), (_, q_call) = kv, q
        k = self.kernel("one")
        tiles = (kv_call.grid[0], q_call.grid[0])
        args = {f"kv_{a}": v for a, v in kv_call.args.items()} | {f"dq_{a}": v for a, v in q_call.args.items()}
        args |= dict(KV_TILES=tiles[0], Q_TILES=tiles[1], GROUP_Q=self.group, H_KV=self.kv_heads, H_Q=self.extents["h"])
        return k, k.call(
            (self.grid["b"] * self.kv_heads * (tiles[0] + self.group * tiles[1]),),
            args,
            schedule.num_warps,
            schedule.num_stages,
            schedule.max_registers,
        )


def composed_loop(s: Looped, made: tuple[Composition, ...]) -> Looped:
    """A kernel's looped cascade reading the composed tables ``made`` (see ``einflash.compiler.rewrite.compose``)."""
    if not made:
        return s

    def each(einsums: tuple[Einsum, ...]) -> tuple[Einsum, ...]:
        return tuple(read_composed(e, s.cascade, made) for e in einsums)

    return replace(
        s, cascade=composed(s.cascade, made), prologue=each(s.prologue), loop=each(s.loop), epilogue=each(s.epilogue)
    )
