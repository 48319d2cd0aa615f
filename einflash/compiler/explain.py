"""``op.explain()``: what a cascade costs as written and after rewriting, as a printable value.

>>> import einflash as ef
>>> @ef.attention
... def plain(q, k, v):
...     return ef.softmax(q @ k * ef.scale, "n") @ v
>>> x = plain.explain()
>>> x.passes_as_written, x.passes, x.grows_with_n
(3, 1, False)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from ..backends.target import Target
from ..errors import LoweringError
from ..ir.cascade import Cascade
from ..shape import Shape
from .analysis.cost import buffer_needs, cost, declared_params, symbol_values, tile_values
from .analysis.key_passes import count_passes
from .analysis.linear_form import C, E, F, N, linear_form
from .analysis.timing import Launch, launch_of, predict
from .autodiff.chunked import chunked_gradient
from .codegen.stores import tile_ranks
from .rewrite.chunked import chunked_form
from .rewrite.online import streaming_obstacle
from .rewrite.stages import key_stages
from .runtime.forward import chunk_of
from .runtime.tile_lists import mask_tiles_at
from .schedule import Schedule, padded, widest_head_dim

DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}


@dataclass(frozen=True)
class Explanation:
    name: str
    key: str
    target: str
    shape: dict
    passes_as_written: int
    passes: int
    pass_reasons: tuple[str, ...]  # why the cascade as written needs its passes
    obstacle: str | None  # why the rewritten cascade still needs more than one pass
    rewrites: tuple[str, ...]  # the pipeline steps that changed the cascade
    buffer_formula_as_written: str
    buffer_formula: str
    buffer_bytes: int
    grows_with_n: bool
    grows_with_n_as_written: bool
    flops: float
    transcendentals: float
    bytes: float
    intensity: float
    roofline_ms: float
    bound: str  # which resource the roofline says limits: tensor cores, special functions or memory
    tiles: dict | None  # mask tile counts at the default tile sizes
    template: str  # what the kernel generator does with it
    written: str = field(repr=False)
    rewritten: str = field(repr=False)
    backward: dict | None = None  # the gradient cascade's analysis (see _backward)
    linear: dict | None = None  # its linear form and the chunked plan at the shape (see _linear), if it has one
    predicted: dict | None = None  # the cost model's predicted time at the call's schedule (see _predicted)
    launch: Launch | None = field(default=None, repr=False)  # what the prediction priced (to price it again)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "key": self.key,
            "target": self.target,
            "shape": self.shape,
            "passes_as_written": self.passes_as_written,
            "passes": self.passes,
            "pass_reasons": list(self.pass_reasons),
            "obstacle": self.obstacle,
            "rewrites": list(self.rewrites),
            "buffer_bytes": {
                "formula": self.buffer_formula,
                "value": self.buffer_bytes,
                "formula_as_written": self.buffer_formula_as_written,
            },
            "grows_with_n": self.grows_with_n,
            "grows_with_n_as_written": self.grows_with_n_as_written,
            "flops": self.flops,
            "transcendentals": self.transcendentals,
            "bytes": self.bytes,
            "intensity": self.intensity,
            "roofline_ms": self.roofline_ms,
            "bound": self.bound,
            "tiles": self.tiles,
            "template": self.template,
            "cascade_as_written": self.written,
            "cascade": self.rewritten,
            "backward": self.backward,
            "linear": self.linear,
            "predicted": self.predicted,
        }

    def __str__(self) -> str:
        rows = [
            ("variant", f"{self.name}  ({self.key})"),
            ("target, shape", f"{self.target}, {self.shape}"),
            ("passes as written", str(self.passes_as_written)),
        ]
        rows += [("", r) for r in self.pass_reasons]
        rows.append(("passes after rewriting", str(self.passes)))
        if self.obstacle:
            rows.append(("why not fewer", self.obstacle))
        rows += [
            ("rewrites", ", ".join(self.rewrites) or "none"),
            (
                "on-chip buffer as written",
                f"{self.buffer_formula_as_written}{'  (grows with N)' if self.grows_with_n_as_written else ''}",
            ),
            (
                "on-chip buffer",
                f"{self.buffer_formula} = {self.buffer_bytes:,} B"
                f"{'  (grows with N)' if self.grows_with_n else '  (independent of N)'}",
            ),
            ("FLOPs", f"{self.flops:.3e}  (+ {self.transcendentals:.3e} exp/log/tanh)"),
            ("bytes (compulsory)", f"{self.bytes:.3e}"),
            ("intensity", f"{self.intensity:.1f} FLOP/B"),
            ("roofline", f"{self.roofline_ms:.3f} ms ({self.bound}-bound)"),
            *(_predicted_rows(self.predicted) if self.predicted else ()),
            *(_linear_rows(self.linear) if self.linear else ()),
        ]
        if self.tiles:
            t = self.tiles
            rows.append(
                (
                    "mask tiles",
                    f"{t['empty']} empty, {t['partial']} partial, {t['full']} full of "
                    f"{t['total']} ({t['block_m']}×{t['block_n']})"
                    + (
                        f"; {' ∧ '.join(t['tested_in_every_tile'])} tested in every visited tile"
                        if t["tested_in_every_tile"]
                        else ""
                    ),
                )
            )
            if "pairs" in t:
                visited = t["partial"] + t["full"]
                rows.append(
                    (
                        "mask pairs",
                        f"{t['pairs']:,} kept of {t['all_pairs']:,} ({t['pairs'] / max(1, t['all_pairs']):.2%}); "
                        f"{t['tiles_with_pairs']} tiles hold one, {visited} visited; kept pairs fill "
                        f"{t['pairs'] / max(1, visited * t['block_m'] * t['block_n']):.0%} of the visited tiles",
                    )
                )
        rows.append(("template", self.template))
        b = self.backward
        if b is not None and b["error"] is not None:
            rows.append(("backward", f"none: {b['error']}"))
        elif b is not None and b["plan"] is not None:
            rows.append(("backward", b["plan"]))
        elif b is not None:
            rows += [
                (
                    "backward passes",
                    f"{b['passes']['n']} over n ({len(b['key_terms'])} for key terms, then dQ), "
                    f"{b['passes']['m']} over m (dK/dV)",
                ),
                ("saved per row", ", ".join(f"{s['name']}[{','.join(s['ranks'])}]" for s in b["saved"]) or "none"),
                ("row terms", ", ".join(b["row_terms"]) or "none"),
                *((f"key terms, pass {i + 1}", ", ".join(t)) for i, t in enumerate(b["key_terms"])),
                ("backward FLOPs", f"{b['flops']:.3e}  ({b['flops'] / max(self.flops, 1.0):.2f}× the forward)"),
            ]
            rows += [("no gradient", z) for z in b["zero_gradients"]]
            rows += [("frozen input", f"{name}: {why}") for name, why in b["frozen_inputs"].items()]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _predicted_rows(p: dict) -> list[tuple[str, str]]:
    if "error" in p:
        return [("predicted", f"none: {p['error']}")]
    units = ", ".join(f"{u} {t:.3f}" for u, t in p["units_ms"].items())
    return [
        ("predicted", f"{p['ms']:.3f} ms at {p['schedule']} ({p['bound']}-bound; busy ms per SM: {units})"),
        (
            "",
            f"{p['programs']} programs, {p['per_sm']} per SM, {p['waves']:.2f} waves, last "
            f"{p['tail']:.0%} of the time after the last program started; {p['model']}",
        ),
    ]


def explain(
    written: Cascade,
    steps,
    rewritten: Cascade,
    error: Exception | None,
    target: Target,
    shape: Shape,
    dtype: str = "bfloat16",
    dims: dict[str, int] | None = None,
    params: dict | None = None,
    backward=None,
    inputs: Mapping[str, torch.Tensor] | None = None,
    schedule: Schedule | None = None,
) -> Explanation:
    """Analyse ``written`` and its form after the rewrite pipeline, ``rewritten``, at ``shape`` on ``target``;
    with ``backward`` (a einflash.compiler.runtime.backward.Backward), its gradient cascade too; with ``inputs``
    (the per-token data a mask reads, document ids), its tiles and pairs for that data; with ``schedule`` (the
    one a call of ``shape`` runs), the tiles are counted at its tile sizes and the kernel's time is predicted
    with the target's cost model."""
    dims = dict(dims or {})
    params = declared_params(written, shape, params)
    ext = shape.extents([r.name for r in written.ranks], dims)
    pa_w, pa = count_passes(written), count_passes(rewritten)
    before_stream = next((s.cascade for s in reversed(steps) if s.name != "stream online"), written)
    cfg = target.forward.default(padded(widest_head_dim(ext))) if schedule is None else schedule.tile_config()
    subs = symbol_values(written, ext, params, shape) | tile_values(cfg, DTYPE_BYTES[dtype])
    buf_w, buf = buffer_needs(written), buffer_needs(rewritten)
    cst = cost(rewritten)
    flops = float(cst.flops.subs(subs))
    trans = float(cst.transcendentals.subs(subs))
    nbytes = float(cst.bytes.subs(subs))
    tiles, rows = mask_tiles_at(written, ext, params, cfg, inputs)
    frac = 1.0
    if tiles:  # masked-out tiles are never visited: count the work of the visited ones
        frac = (tiles["partial"] + tiles["full"]) / max(1, tiles["total"])
        flops, trans = flops * frac, trans * frac
    stages = key_stages(rewritten)
    # causal attention in linear form runs chunk by chunk, with the tiles a causal mask gets by default
    chunk = chunk_of(target.forward.default(padded(widest_head_dim(ext)), masked=True))
    has_chunks = error is None and stages is None and chunked_form(written, rewritten, chunk) is not None
    runs = (
        "the two-stage kernels run it"
        if error is None and stages is not None
        else "the chunked kernels run it past the crossover"
        if has_chunks
        else None
    )
    lin = _linear(written, ext, chunk, runs)
    chunked = has_chunks and lin is not None and shape.M == shape.N and lin["crossover"] <= shape.N
    if chunked and lin is not None:
        # the plan the kernels run: each row's pairs within its own chunk, and the state before each chunk
        # written once and read once
        e, f = lin["state"]
        flops = lin["chunked_flops"] * shape.B * shape.Hq
        trans *= min(1.0, chunk / shape.N)
        nbytes += 2 * shape.B * shape.Hq * -(-shape.N // chunk) * ext[e] * ext[f] * DTYPE_BYTES[dtype]
    times = {
        "tensor-core": flops / target.tensor_flops,
        "special-function": trans / target.sfu_ops,
        "memory": nbytes / target.hbm_bandwidth,
    }
    bound = max(times, key=times.__getitem__)
    launch = predicted = None
    if schedule is not None and error is None and stages is None and not chunked:
        launch = launch_of(rewritten, buf, subs, rows, shape, schedule, target, nbytes)
        predicted = _predicted(launch, schedule, target)
    if error is not None:
        template = f"not lowered: {error}"
    elif stages is not None:
        summaries = ", ".join(f"{s}[{','.join(tile_ranks(stages.keys.tensor(s).ranks))}]" for s in stages.summaries)
        passes = len({e.loop for e in stages.queries.einsums if e.loop})
        template = (
            f"two stages (attention_fwd.py.jinja): a key stage over all keys (programs per (batch, head), split "
            f"along the keys), stores {summaries}; then the query tiles read it, "
            + (f"with {passes} pass(es) over the keys of their own" if passes else "with no pass over the keys")
        )
    elif chunked and lin is not None:
        template = (
            f"chunked (attention_chunk_states.py.jinja, then attention_fwd.py.jinja): the state before each chunk of "
            f"{chunk} keys, then each query tile over its own chunk's keys and that state; the quadratic one-pass "
            f"kernel below N = {lin['crossover']}, for decoding (M ≠ N) and jagged batches; "
            + (
                "its backward: three chunked attentions and the chain rule"
                if chunked_gradient(written) is not None
                else "its backward is the quadratic one (a factor of both sides over the contracted rank)"
            )
        )
    elif pa.passes > 1:
        template = f"{pa.passes}-pass forward (attention_fwd.py.jinja, a loop over the keys per pass); no split-KV"
    else:
        template = "one-pass forward (attention_fwd.py.jinja); split-KV + combine for ≤ 16 queries"
    return Explanation(
        written.name,
        written.key,
        target.name,
        {
            "B": shape.B,
            "Hq": shape.Hq,
            "Hkv": shape.Hkv,
            "M": shape.M,
            "N": shape.N,
            "E": shape.E,
            "F": shape.F,
            **dims,
        },
        pa_w.passes,
        pa.passes,
        tuple(str(r) for r in pa_w.reasons),
        streaming_obstacle(before_stream),
        tuple(s.name for s in steps if s.changed),
        str(buf_w.total),
        str(buf.total),
        int(buf.total.subs(subs)),
        buf.grows_with_n,
        buf_w.grows_with_n,
        flops,
        trans,
        nbytes,
        flops / max(nbytes, 1.0),
        max(times.values()) * 1e3,
        bound,
        tiles,
        template,
        str(written),
        str(rewritten),
        None if backward is None else _backward(backward, subs, frac if tiles else 1.0),
        lin,
        predicted,
        launch,
    )


def _predicted(launch: Launch, schedule: Schedule, target: Target) -> dict:
    """The cost model's prediction for ``launch``, or why there is none."""
    try:
        p = predict(launch, target)
    except LoweringError as e:
        return {"error": str(e)}
    assert target.costs is not None  # predict refuses a target without one
    return p.to_json() | {"schedule": schedule.describe(), "model": target.costs.source}


def _linear(written: Cascade, ext: dict[str, int], chunk: int, runs: str | None) -> dict | None:
    """The linear form at the shape: the state, the chunked plan's FLOPs (chunks of ``chunk``) beside the quadratic
    form's (per head, M = N), the length past which the chunked plan takes fewer, which kernels run that plan
    (``runs``; None: none); None when the weights are not linear."""
    form = linear_form(written)
    if form is None:
        return None
    e, f = form.state
    sizes = {N: ext["n"], C: chunk, E: ext[e], F: ext[f]}
    return {
        "state": [e, f],
        "state_bytes": 4 * ext[e] * ext[f],
        "causal": form.causal,
        "separated": form.separated,
        "chunk": chunk,
        "chunked_flops": float(form.chunked_flops.subs(sizes)),
        "quadratic_flops": float(form.quadratic_flops.subs(sizes)),
        "crossover": form.crossover(chunk, ext[e], ext[f]),
        "runs": runs,
    }


def _linear_rows(lin: dict) -> list[tuple[str, str]]:
    e, f = lin["state"]
    kind = "a running state, chunk by chunk (causal)" if lin["causal"] else "summed once over the keys"
    split = "; a decay or gates split into query and key parts" if lin["separated"] else ""
    return [
        (
            "linear form",
            f"o = a[m,{e}]·S[{e},{f}], S = Σ_n b[n,{e}]·v[n,{f}]: {lin['state_bytes']:,} B per head, {kind}{split}",
        ),
        (
            "chunked plan" if lin["causal"] else "state plan",
            (f"chunks of {lin['chunk']}: " if lin["causal"] else "the state, then its read: ")
            + f"{lin['chunked_flops']:.3e} FLOPs per head where the quadratic form takes {lin['quadratic_flops']:.3e}; "
            f"fewer from N = {lin['crossover']} on"
            + (f" ({lin['runs']})" if lin["runs"] else " (analysis only: no kernel of this form yet)"),
        ),
    ]


STAGES_BACKWARD = (
    "both stages differentiated by torch's autograd on the reference executor in the accumulator type (no kernel "
    "of its own, nothing saved: the key stage's summaries are recomputed, their gradients summed over the query rows)"
)


def _backward(backward, subs: dict, visited: float) -> dict:
    """The gradient cascade: its passes in each direction, what the forward saves, the row terms computed once
    per row, the reductions that get no gradient (and why), its FLOPs at the shape (visited tiles only)."""
    if backward.error is not None:
        return {"error": str(backward.error)}
    if backward.differentiates_stages:
        return {"error": None, "plan": STAGES_BACKWARD}
    g = backward.gradient
    return {
        "error": None,
        "plan": None,
        "passes": {"n": count_passes(g.cascade, "n").passes, "m": count_passes(g.cascade, "m").passes},
        "saved": [{"name": s.name, "ranks": list(s.ranks)} for s in g.saved],
        "reads_output": g.output is not None,
        "row_terms": list(backward.parts.row_terms),
        "key_terms": [list(terms) for terms in backward.parts.key_terms],
        "zero_gradients": [str(z) for z in g.invariant],
        "gradients": {p.input: [q.name for q in g.partials if q.input == p.input] for p in g.partials},
        "frozen_inputs": dict(g.frozen),
        "flops": float(cost(g.cascade).flops.subs(subs)) * visited,
        "cascade": str(g.cascade),
    }
