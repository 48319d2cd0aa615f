"""Lowering a streamed (one-pass) cascade into the one-pass forward Triton template.

The cascade's Einsums become the template's hook slots: Einsums before the loop
and running-state initialisation fill the prologue, loop Einsums the body of each
range of key tiles, the rest the epilogue. Key-tile ranges come from the symbolic
mask analysis: tiles proven empty are never visited, tiles proven full skip the
affine part of the mask.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import LoweringError
from ...ir.cascade import Cascade, Einsum, Role
from ...ir.ranks import PARALLEL, STREAM
from ...ir.user_ops import triton_helper, user_operators
from ...templates import render
from ..analysis.key_passes import count_passes
from .signature import param_name, pointer_params
from .source import KernelSource, dim_names, kernel_name, notation
from .stores import carry, init_states, row_output_params, store_output, store_row_output, store_state
from .tile_ranges import key_plan
from .tilecode import KernelSettings

TEMPLATE = "attention_fwd.py.jinja"


@dataclass(frozen=True)
class Sections:
    prologue: tuple[Einsum, ...]
    loop: tuple[Einsum, ...]
    epilogue: tuple[Einsum, ...]


def sections(c: Cascade) -> Sections:
    """Split a streamed cascade into prologue, loop and epilogue; raise LoweringError if it is not one-pass."""
    for e in c.einsums:
        if e.reduce is not None and "m" in e.reduce.ranks:
            raise LoweringError(
                f"{c.where(e)}: a reduction over the query rank m; a program of the forward "
                f"kernel holds one tile of query rows, so a reduction over all of m (a softmax "
                f"over m, slot attention) has no kernel yet; normalise over n, or run it with "
                f"backend='reference'"
            )
    pa = count_passes(c)
    if pa.passes > 1:
        raise LoweringError(
            f"{c.name} needs {pa.passes} passes over n; the one-pass template needs 1 "
            f"(a multi-pass template is not implemented yet)"
        )
    loop = [e for e in c.einsums if e.loop]
    if not loop:
        raise LoweringError(f"{c.name} has no loop over n after the rewrites; nothing to stream")
    first = c.einsums.index(loop[0])
    last = first + len(loop)
    for e in c.einsums[last:]:
        if STREAM in e.iteration_ranks:
            raise LoweringError(f"{e.out} iterates n after the loop")
    for t in c.states:
        if "m" not in t.ranks:
            raise LoweringError(
                f"running state {t.name}[{','.join(t.ranks)}] does not depend on the query rank m: "
                f"every query tile would repeat the whole stream (linear-attention form); "
                f"it needs a two-stage template, not implemented yet"
            )
    return Sections(c.einsums[:first], tuple(loop), c.einsums[last:])


def lower(
    c: Cascade,
    dims: dict[str, int],
    dtype: str,
    *,
    split: bool = False,
    int_inputs: frozenset = frozenset(),
    saved: tuple[str, ...] = (),
) -> KernelSource:
    """Render the one-pass kernel of a streamed cascade.

    ``dims`` maps every non-sequence rank to its padded tile extent and
    ``<rank>_extent`` to its true extent, e.g. ``{"e": 64, "e_extent": 40}``.
    ``saved`` names states the kernel also stores for the backward (training), each with its
    per-row presence (``wsp_<state>[b, h, m]``, 1 where the row saw a key).
    """
    sec = sections(c)
    used = {r.tensor for e in c.einsums for r in e.reads()}
    tensors = tuple(t.name for t in c.inputs if t.name in used)
    params = tuple(p.name for p in c.params)
    value_rank = next(r for r in c.tensor(c.outputs[0]).ranks if r not in PARALLEL + ("m",))
    row_states = tuple(t.name for t in c.states if tuple(r for r in t.ranks if r not in PARALLEL) == ("m",))
    acc_states = tuple(t.name for t in c.states if t.name not in row_states)
    exact, acc = exact_dots(dtype)
    kernel = KernelSettings(c, dims, acc if exact else f"{tensors[0]}_ptr.dtype.element_ty", exact, acc, int_inputs)
    keys = key_plan(c, sec.loop)

    # prologue: state init, query-side loads used anywhere, prologue Einsums
    pro = kernel.section()
    init_states(pro, c, acc)
    for e in sec.loop:
        for r in e.reads():
            if c.tensor(r.tensor).role is Role.INPUT and not _has_n(r):
                pro.load(r)
    for e in sec.prologue:
        pro.einsum(e)
    states = {t.name for t in c.states}
    prev_read = {r.tensor for e in sec.loop for r in e.reads() if r.prev}

    loops = []
    for kr in keys.ranges:
        body = kernel.section(kr.masked, kr.skip, pro.env, pro.loads)
        for s in sorted(prev_read):
            body.emit(f"v_{s}_prev = v_{s}")
            body.emit(f"v_{s}_p_prev = v_{s}_p")
        for e in sec.loop:
            t = body.einsum(e)
            if e.out in states:
                carry(body, e.out, t)
        loops.append(kr.slots(body.lines))

    epi = kernel.section(env=pro.env, loads=pro.loads)
    for e in sec.epilogue:
        epi.einsum(e)
    if split:
        for s in row_states + acc_states:
            store_state(epi, s, c.tensor(s).ranks, split=True)
    else:
        for s in row_states + tuple(s for s in saved if s not in row_states):
            store_state(epi, s, c.tensor(s).ranks, split=False, presence=s in saved)
        store_output(epi, epi.env[c.outputs[0]], value_rank)
        for o in c.outputs[1:]:
            store_row_output(epi, o)
    row_outputs = () if split else c.outputs[1:]  # a split program stores states, the combine the outputs

    args = [a for name in tensors for a in pointer_params(name, len(c.tensor(name).ranks))]
    args += pointer_params("out", 4) + row_output_params(row_outputs)
    saved = () if split else saved
    for s in row_states + acc_states if split else row_states + tuple(s for s in saved if s not in row_states):
        args += pointer_params(f"ws_{s}", 3 + (1 if split else 0) + (0 if s in row_states else 1))
        if split:
            args += pointer_params(f"wsp_{s}", 4)
    for s in saved:
        args += pointer_params(f"wsp_{s}", 3)
    if keys.lists is not None:
        args += pointer_params("tiles", 3) + pointer_params("counts", 3)
    args += [param_name(p) for p in params]
    names = dim_names(dims)
    name = kernel_name(c, dims, dtype, split=split, saved=bool(saved))
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
        tile_setup=keys.setup,
        key_loops=loops,
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
        tuple(keys.ranges),
        keys.lists,
        saved=saved,
        row_outputs=row_outputs,
    )


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
    return [triton_helper(name) for name in used]


def _has_n(r) -> bool:
    return any(s.name == STREAM for i in r.index for s in getattr(i, "free_symbols", ()))
