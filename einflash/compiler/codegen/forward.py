"""Lowering a streamed (one-pass) cascade into the one-pass forward Triton template.

The cascade's Einsums become the template's hook slots: Einsums before the loop
and running-state initialisation fill the prologue, loop Einsums the body of each
range of key tiles, the rest the epilogue. Key-tile ranges come from the symbolic
mask analysis: tiles proven empty are never visited, tiles proven full skip the
affine part of the mask.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import sympy

from ...errors import LoweringError
from ...ir.cascade import Cascade, Einsum, Role, loop_blocks
from ...ir.ranks import PARALLEL, STREAM, extent_symbol
from ...ir.user_ops import triton_helper, user_operators
from ...templates import render
from ..analysis.key_passes import count_passes
from ..analysis.mask_tiles import conjuncts
from .reductions import KTH_LARGEST, TOP_LIST
from .signature import param_name, pointer_params
from .source import KernelSource, dim_names, kernel_name, notation
from .stores import carry, init_states, result_params, store_results, store_state, store_summary
from .tile_ranges import KeyPlan, governing_mask, governs, key_plan
from .tilecode import KernelSettings, TileCode

TEMPLATE = "attention_fwd.py.jinja"


@dataclass(frozen=True)
class Sections:
    """A streamed cascade cut for the template: the prologue, then per pass over the keys its loop and what runs
    after it (before the next loop; after the last, the epilogue)."""

    prologue: tuple[Einsum, ...]
    loops: tuple[tuple[Einsum, ...], ...]
    after: tuple[tuple[Einsum, ...], ...]

    @property
    def loop(self) -> tuple[Einsum, ...]:
        """The first pass's loop (the only one of a one-pass cascade)."""
        return self.loops[0]

    @property
    def epilogue(self) -> tuple[Einsum, ...]:
        return self.after[-1]


SEQUENCE = frozenset({extent_symbol("M"), extent_symbol("N")})


def _no_sequence_rank_held(c: Cascade) -> None:
    """Refuse a second key-like rank (``j = ef.rank("j", ef.N)``, or any extent polynomial in M and N): the
    template holds a rank besides m and n whole in every program, beside its tile of rows, which for one as long
    as the sequence is BLOCK_M·N values on chip."""
    for r in c.ranks:
        if r.name in PARALLEL or r.name in (STREAM, "m") or r.name in c.table_ranks:
            continue
        extent = sympy.sympify(r.extent)
        if not (extent.free_symbols & SEQUENCE and extent.is_polynomial(*SEQUENCE)):  # N, N − 1, M + N; not N/block
            continue
        e = next((e for e in c.einsums if r.name in e.iteration_ranks), None)
        if e is not None:
            raise LoweringError(
                f"{c.where(e)}: iterates {r.name}, as long as the sequence ({r.extent}); a program would hold all of "
                f"it beside its rows (BLOCK_M·{r.extent} values on chip, past any register file at long lengths), "
                f"where it needs a third tile rank streamed like n (a reduction over a second key-like rank inside "
                f"the score, as stick-breaking's tail), not lowered yet"
            )


def sections(c: Cascade, stage: str | None = None) -> Sections:
    """Split a streamed cascade into prologue, loops and what follows each; raise LoweringError if some Einsum
    still iterates n outside a loop (a pass with no running form).

    ``stage`` names a stage of a two-stage cascade (einflash.compiler.rewrite.stages): ``"keys"`` keeps summaries
    of the keys that no query row is part of, ``"queries"`` has no loop (every Einsum in the epilogue)."""
    for e in c.einsums:
        if e.reduce is not None and "m" in e.reduce.ranks:
            raise LoweringError(
                f"{c.where(e)}: a reduction over the query rank m; a program of the forward "
                f"kernel holds one tile of query rows, so a reduction over all of m (a softmax "
                f"over m, slot attention) has no kernel yet; normalise over n, or run it with "
                f"backend='reference'"
            )
    _no_sequence_rank_held(c)
    blocks = loop_blocks(c.einsums)
    loops = [tuple(b) for k, b in blocks if k]
    first = next((i for i, (k, _) in enumerate(blocks) if k), len(blocks))
    prologue = tuple(b[0] for _, b in blocks[:first])  # blocks outside loops hold one Einsum each
    later = [b[0] for k, b in blocks[first:] if not k]
    for e in later if loops else prologue:  # without a loop, whatever iterates n has none to run in
        if STREAM in e.iteration_ranks:
            raise _no_loop_holds(c, e, len(loops))
    if stage == "queries" and not loops:
        return Sections((), (), (prologue,))
    if not loops:
        raise LoweringError(f"{c.name} has no loop over n after the rewrites; nothing to stream")
    after: list[list[Einsum]] = []
    for k, b in blocks[first:]:
        if k:
            after.append([])
        else:
            after[-1].append(b[0])
    last = max(int(e.loop) for e in c.einsums)
    for t in c.states if stage != "keys" else ():
        # a summary of the keys that a later pass reads (MoBA's block means) costs each program one more read of
        # the keys; one the output is made of (linear attention's state) is the whole stream again per query tile
        if "m" not in t.ranks and max(int(e.loop) for e in c.producers(t.name)) == last:
            raise LoweringError(
                f"running state {t.name}[{','.join(t.ranks)}] does not depend on the query rank m: "
                f"every query tile would repeat the whole stream, and the pass also iterates the query rows, so "
                f"the two-stage form (a key stage storing the summary, then the query tiles) does not apply"
            )
    return Sections(prologue, tuple(loops), tuple(tuple(a) for a in after))


def _no_loop_holds(c: Cascade, e: Einsum, loops: int) -> LoweringError:
    """The refusal of an Einsum that iterates n where no loop over the keys holds it."""
    pa = count_passes(c)
    why = "".join(f"; {r}" for r in pa.reasons)
    where = f"after the kernel's {loops} loop{'s' if loops > 1 else ''} over the keys" if loops else "outside any loop"
    return LoweringError(
        f"{c.where(e)}: {e.out} iterates n {where}, and no loop can hold it (the cascade needs {pa.passes} "
        f"passes{why}); each pass must be a loop whose reductions over n have running forms (sum, max, min, user "
        f"reducers, with a correction factor where they read the loop's own states; kth_largest has none)"
    )


def lower(
    c: Cascade,
    dims: dict[str, int],
    dtype: str,
    *,
    split: bool = False,
    int_inputs: frozenset = frozenset(),
    saved: tuple[str, ...] = (),
    stage: str | None = None,
    read: frozenset = frozenset(),
    positions: dict[str, str] | None = None,
    keys: KeyPlan | None = None,
) -> KernelSource:
    """Render the one-pass kernel of a streamed cascade.

    ``dims`` maps every non-sequence rank to its padded tile extent and
    ``<rank>_extent`` to its true extent, e.g. ``{"e": 64, "e_extent": 40}``.
    ``saved`` names states the kernel also stores for the backward (training), each with its
    per-row presence (``wsp_<state>[b, h, m]``, 1 where the row saw a key).
    ``stage`` lowers a stage of a two-stage cascade (einflash.compiler.rewrite.stages): the ``"keys"`` kernel
    stores its outputs, the summaries, into ``out_<name>[b, h, ...]`` with their presence in
    ``present_<name>`` (same shape and strides); the ``"queries"`` kernel reads them (``read`` names them among its
    inputs) with no loop. The ``"chunked"`` kernel is the query kernel of the chunked form
    (einflash.compiler.rewrite.chunked): ``keys`` are its ranges of key tiles (its own chunk's, instead of the
    mask analysis's), and ``positions`` binds the integer parameters that name the program's positions (its
    chunk, the key before it) to their code.
    """
    positions = positions or {}
    sec = sections(c, stage)
    if split and len(sec.loops) > 1:
        raise LoweringError(
            f"{c.name} makes {len(sec.loops)} passes over the keys; split-KV runs one pass per split and has no "
            f"combine for a later pass's states yet: run it with splits=1"
        )
    used = {r.tensor for e in c.einsums for r in e.reads()}
    tensors = tuple(t.name for t in c.inputs if t.name in used)
    params = tuple(p.name for p in c.params if p.name not in positions)
    value_rank = next(r for r in c.tensor(c.outputs[0]).ranks if r not in PARALLEL + ("m",))
    row_states = tuple(t.name for t in c.states if tuple(r for r in t.ranks if r not in PARALLEL) == ("m",))
    acc_states = tuple(t.name for t in c.states if t.name not in row_states)
    exact, acc = exact_dots(dtype)
    summaries = c.outputs if stage == "keys" and not split else ()
    kernel = KernelSettings(
        c,
        dims,
        acc if exact else f"{tensors[0]}_ptr.dtype.element_ty",
        exact,
        acc,
        int_inputs,
        summaries=read,
        packed_heads=stage is None,  # the stages run one head per program (a key stage has no rows to pack)
    )
    plans = [keys or key_plan(c, loop) for loop in sec.loops]
    lists = plans[0].lists if plans else None
    if any(p.lists != lists for p in plans[1:]):
        raise LoweringError(
            f"{c.name}: its passes over the keys are masked by different per-token data; the key tiles are "
            f"classified at run time for one mask only"
        )

    # prologue: the first loop's states, query-side loads used anywhere, prologue Einsums
    pro = kernel.section()
    for p, code in positions.items():
        pro.emit(f"p_{p} = {code}")
    init_states(pro, c, acc, only={e.out for e in sec.loops[0]} if sec.loops else set())
    for e in (e for loop in sec.loops for e in loop):
        for r in pro.input_reads(e):
            if not _has_n(r):
                pro.load(r)
    for e in sec.prologue:
        pro.einsum(e)
    env = pro.env
    passes = []
    for index, (loop, keys) in enumerate(zip(sec.loops, plans)):
        # a later pass starts with what runs after the previous loop, then its own states: its accumulators are
        # not live during the earlier passes
        start = kernel.section(env=env, loads=pro.loads)
        if index:
            for e in sec.after[index - 1]:
                start.einsum(e)
            init_states(start, c, acc, only={e.out for e in loop})
        prev_read = {r.tensor for e in loop for r in e.reads() if r.prev}
        ranges = []
        skip = _unrouted(c, loop, start)
        for kr in keys.ranges:
            if skip is not None:
                kr = replace(kr, skip_tile=skip if kr.skip_tile is None else f"({kr.skip_tile}) | {skip}")
            body = kernel.section(kr.masked, kr.skip, start.env, pro.loads)
            for st in sorted(prev_read):
                body.emit(f"v_{st}_prev = v_{st}")
                body.emit(f"v_{st}_p_prev = v_{st}_p")
            for e in loop:
                if c.tensor(e.out).role is Role.STATE:
                    carry(body, e.out, body.value(e))
                else:
                    body.einsum(e)
            ranges.append(kr.slots(body.lines))
        passes.append(dict(start=start.lines, tile_setup=keys.setup, key_loops=ranges))
        env = start.env

    epi = kernel.section(env=env, loads=pro.loads)
    for e in sec.epilogue:
        epi.einsum(e)
    if split and stage == "keys":  # each split's partial summaries, which the key fold folds
        for s in acc_states:
            store_summary(epi, s, split=True)
    elif split:
        for s in row_states + acc_states:
            store_state(epi, s, c.tensor(s).ranks, split=True)
    else:
        for s in row_states + tuple(s for s in saved if s not in row_states):
            store_state(epi, s, c.tensor(s).ranks, split=False, presence=s in saved)
        store_results(epi, summaries, value_rank)
    # a split program stores states, the combine the outputs
    row_outputs = () if split or summaries else c.outputs[1:]

    args = [a for name in tensors for a in pointer_params(name, len(c.tensor(name).ranks))]
    for o in sorted(read):  # in a fixed order: the kernel's text is named by its digest
        args += [f"present_{o}_ptr"]
    args += [] if split and stage == "keys" else result_params(c, summaries, row_outputs)
    saved = () if split else saved
    for s in acc_states if split and stage == "keys" else ():  # [b, h, split, ...] with a presence alike
        args += pointer_params(f"ws_{s}", len(c.tensor(s).ranks) + 1) + pointer_params(
            f"wsp_{s}", len(c.tensor(s).ranks) + 1
        )
    for s in (
        ()
        if stage == "keys"
        else row_states + acc_states
        if split
        else row_states + tuple(s for s in saved if s not in row_states)
    ):
        args += pointer_params(f"ws_{s}", 3 + (1 if split else 0) + (0 if s in row_states else 1))
        if split:
            args += pointer_params(f"wsp_{s}", 4)
    for s in saved:
        args += pointer_params(f"wsp_{s}", 3)
    if lists is not None:
        args += pointer_params("tiles", 3) + pointer_params("counts", 3)
    args += [param_name(p) for p in params]
    names = dim_names(dims)
    name = kernel_name(c, dims, dtype, "fwd" if stage is None else f"fwd_{stage}", split=split, saved=bool(saved))
    text = render(
        TEMPLATE,
        entry=True,
        cascade_key=c.key,
        variant=c.name,
        notation=notation(c),
        kernel=name,
        helpers=helpers(c),
        args=",\n    ".join(args),
        constexprs=[f"D_{r}" for r in names],
        dim_offsets=[(r, f"D_{r}") for r in names],
        prologue="\n".join(pro.lines),
        passes=passes,
        epilogue="\n".join(epi.lines),
    )
    return KernelSource(
        name,
        text,
        tensors,
        params,
        row_states,
        acc_states,
        value_rank,
        tuple((f"D_{r}", dims[r]) for r in names),
        split,
        tuple(r for p in plans for r in p.ranges),
        lists,
        saved=saved,
        row_outputs=row_outputs,
        summaries=summaries,
        summary_reads=tuple(sorted(read)),
        stage=stage,
    )


def _unrouted(c: Cascade, loop: tuple[Einsum, ...], start: TileCode) -> str | None:
    """The test of a key tile that no row of the query tile routes to (MoBA's ``sel[m, n // block]``), where
    every reduction of the loop depends on a filter with that routing conjunct: such a tile adds nothing, and is
    left out. None otherwise."""
    mask = governing_mask(c, loop)
    found = None if mask is None else start.unrouted(mask)
    if found is None:
        return None
    routing, test = found
    routed = {e.out for e in loop if e.where is not None and routing in conjuncts(e.where)}
    return test if governs(loop, frozenset({STREAM}), frozenset(), routed) else None


def exact_dots(dtype: str) -> tuple[bool, str]:
    """Whether a kernel of ``dtype`` contracts exactly (ieee dots of operands in the accumulator type), and
    the accumulator type: fp32, fp64 for fp64 kernels."""
    return dtype in ("float32", "float64"), "tl.float64" if dtype == "float64" else "tl.float32"


def helpers(c: Cascade) -> list[str]:
    """The @triton.jit combines of the user reducers ``c`` uses."""
    used = user_operators(
        [x for e in c.einsums for x in (e.expr, e.where) if x is not None],
        [e.reduce.op for e in c.einsums if e.reduce is not None],
    )
    reducers = {e.reduce.op for e in c.einsums if e.reduce is not None}
    return (
        [triton_helper(name) for name in used]
        + ([KTH_LARGEST] if "kth_largest" in reducers else [])
        + ([TOP_LIST] if "top" in reducers else [])
    )


def _has_n(r) -> bool:
    return any(s.name == STREAM for i in r.index for s in getattr(i, "free_symbols", ()))
