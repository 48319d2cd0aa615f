"""The split-KV combine: the partial running states that the splits of the key sequence left in workspaces,
folded in order by the same update rules the forward loop applies to a chunk, then the cascade's epilogue."""

from __future__ import annotations

from dataclasses import replace

from ...errors import LoweringError
from ...ir.cascade import Cascade, Einsum, Role, TensorDecl
from ...ir.expr import Call, Expr, Merge, Read, call, transform
from ...ir.ranks import PARALLEL, STREAM
from ...templates import render
from .forward import exact_dots, helpers, sections
from .signature import param_name, pointer_params
from .source import KernelSource, dim_names, kernel_name, notation
from .stores import carry, init_states, result_params, store_results, store_state, tile_ranks
from .tilecode import KernelSettings


def combine_cascade(c: Cascade, stage: str | None = None) -> tuple[Cascade, tuple[Einsum, ...], frozenset]:
    """The fold of split partial states, as Einsums over workspace inputs ``w_<state>``.

    A chunk update ``S = op∪(S@prev, S_chunk)`` folds a split as ``op∪(S@prev, w_S)``; a
    corrected update ``S = S@prev·α +∪ S_chunk`` as ``S@prev·α +∪ w_S·α_w``, where ``α_w``
    is the correction with the split's states in place of the previous ones.
    """
    states = {t.name for t in c.states}
    loop = [e for e in c.einsums if e.loop]
    w = {s: f"w_{s}" for s in states}

    def split_side(x):
        return Read(w[x.tensor], x.index) if isinstance(x, Read) and x.prev else None

    fold: list[Einsum] = []
    decls = [TensorDecl(w[s], c.tensor(s).ranks, Role.INPUT) for s in sorted(states)]
    alphas: dict[str, str] = {}
    for e in loop:
        if e.out in states:
            x = e.expr
            acc, chunk = x.args if isinstance(x, Call) and x.merge is Merge.ANY else (None, None)
            if not (isinstance(x, Call) and isinstance(chunk, Read) and not chunk.prev):
                raise LoweringError(f"state {e.out} has no split form: its update is not op∪(previous, chunk)")
            mine = Read(w[e.out], chunk.index)
            split: Expr
            if isinstance(acc, Read) and acc.prev:
                split = mine
            elif (
                isinstance(acc, Call)
                and acc.op == "mul"
                and isinstance(acc.args[1], Read)
                and acc.args[1].tensor in alphas
            ):
                alpha = acc.args[1]
                split = call("mul", mine, Read(alphas[alpha.tensor], alpha.index))
            else:
                raise LoweringError(f"state {e.out} has no split form: its correction is not a plain factor")
            fold.append(replace(e, expr=call(x.op, acc, split, merge=Merge.ANY)))
        elif STREAM not in e.iteration_ranks and all(r.tensor in states for r in e.reads()):
            alpha_w = f"{e.out}_w"
            alphas[e.out] = alpha_w
            decls.append(TensorDecl(alpha_w, e.ranks))
            fold.append(e)
            fold.append(replace(e, out=alpha_w, expr=transform(e.expr, split_side)))
    combined = replace(c, tensors=c.tensors + tuple(decls), einsums=tuple(fold) + sections(c, stage).epilogue)
    return combined, tuple(fold), frozenset(w.values())


def lower_combine(c: Cascade, dims: dict[str, int], dtype: str, stage: str | None = None) -> KernelSource:
    """Render the split-KV combine kernel of a streamed cascade; with ``stage="keys"``, the fold of a split key
    stage (einflash.compiler.rewrite.stages): one program per (batch, head) folds the splits' partial summaries,
    runs what follows the loop and stores the summaries as the unsplit key stage does."""
    combined, fold, workspaces = combine_cascade(c, stage)
    row_states = tuple(t.name for t in c.states if tile_ranks(t.ranks) == ("m",))
    acc_states = tuple(t.name for t in c.states if t.name not in row_states)
    value_rank = next(r for r in c.tensor(c.outputs[0]).ranks if r not in PARALLEL + ("m",))
    acc = exact_dots(dtype)[1]
    kernel = KernelSettings(combined, dims, acc=acc, workspaces=workspaces, packed_heads=stage is None)
    pro = kernel.section()
    init_states(pro, c, acc)
    body = kernel.section(env=pro.env)
    states = {t.name for t in c.states}
    for s in sorted(states):
        body.emit(f"v_{s}_prev = v_{s}")
        body.emit(f"v_{s}_p_prev = v_{s}_p")
    for e in fold:
        if e.out in states:
            carry(body, e.out, body.value(e))
        else:
            body.einsum(e)
    epi = kernel.section(env=pro.env)
    for e in sections(c, stage).epilogue:
        epi.einsum(e)
    summaries = c.outputs if stage == "keys" else ()
    for s in row_states:
        store_state(epi, s, c.tensor(s).ranks, split=False)
    store_results(epi, summaries, value_rank)
    args = []
    for s in row_states + acc_states:
        # a summary's workspace is [b, h, split, ...] with a presence alike; a row state's presence is per row
        nd = len(c.tensor(s).ranks) + 1
        args += pointer_params(f"w_{s}", nd) + pointer_params(f"wsp_w_{s}", nd if summaries else 4)
    read = {r.tensor for e in sections(c, stage).epilogue for r in e.reads()}
    inputs = tuple(t.name for t in c.inputs if t.name in read)  # per-head gates, λ of differential...
    for name in inputs:
        args += pointer_params(name, len(c.tensor(name).ranks))
    args += result_params(c, summaries, c.outputs[1:])
    for s in row_states:
        args += pointer_params(f"ws_{s}", 3)
    params = tuple(p.name for p in c.params)
    args += [param_name(p) for p in params]
    names = dim_names(dims)
    name = kernel_name(c, dims, dtype, kind="combine" if stage is None else "fold_keys")
    text = render(
        "attention_combine.py.jinja",
        cascade_key=c.key,
        variant=c.name,
        notation=notation(c),
        kernel=name,
        helpers=helpers(c),
        args=",\n    ".join(args),
        constexprs=[f"D_{r}" for r in names],
        dim_offsets=[(r, f"D_{r}") for r in names],
        prologue="\n".join(pro.lines),
        fold="\n".join(body.lines),
        epilogue="\n".join(epi.lines),
    )
    return KernelSource(
        name,
        text,
        inputs,
        params,
        row_states,
        acc_states,
        value_rank,
        tuple((f"D_{r}", dims[r]) for r in names),
        False,
        row_outputs=() if summaries else c.outputs[1:],
        summaries=summaries,
        stage=stage,
    )
