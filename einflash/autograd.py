"""An attention op's training path as PyTorch sees it: two custom ops and the autograd formula joining them,
and the same forward and backward as an ``autograd.Function`` for eager calls.

``einflash::train_<name>_<key>`` runs the forward and also returns the states the backward reads
(per-row maxima and sums with their presence flags; never the weights P); ``einflash::bwd_<name>_<key>``
runs the backward kernels. Both are opaque to ``torch.compile`` and have fake implementations, so a
compiled training step (``fullgraph=True``) keeps them as single nodes. Incoming gradients are made
contiguous (``out.sum().backward()`` passes a stride-0 one); integer inputs get no gradient.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch.autograd.function import once_differentiable

from .backends import for_device
from .compiler.runtime.forward import accumulator_dtype
from .compiler.runtime.replay import Recording, Replays, signature
from .compiler.schedule import BackwardSchedule, Schedule, default_backward_schedule, smaller_backward_schedules
from .compiler.tuning.selection import choose, generation
from .errors import CallError, OutOfResourcesError
from .ir.ranks import PARALLEL
from .ir.reference import bind_extents, bind_params, kv_heads

_REGISTERED: dict[str, object] = {}


def unpacker(op):
    """``(tensors, params) -> (inputs, values, extents)`` for an op's custom ops: tensors in declaration order, a
    NaN parameter meaning "not given" (its default, which may depend on extents, is taken)."""
    names = [t.name for t in op.cascade.inputs]
    decls = op.cascade.params
    c = op.forward.rewritten

    def unpack(tensors, params, fake: bool = False):
        inputs = dict(zip(names, tensors))
        given = {p.name: (int(v) if p.integer else v) for p, v in zip(decls, params) if not math.isnan(v)}
        try:
            extents = bind_extents(c, inputs, given)
            return inputs, bind_params(c, given, extents), extents
        except CallError:
            if not fake:
                raise
            # traced, a call whose run will refuse it (the same binding raises then, with its own type): shapes
            # guessed from q, so that tracing goes on to that run
            q = tensors[0]
            guess = collections.defaultdict(lambda: q.shape[-1], b=q.shape[0], h=q.shape[1], m=q.shape[2])
            return inputs, dict(given), guess

    return unpack


def schedule_ints(forward: list[int], backward: BackwardSchedule | None) -> list[int]:
    """A training call's schedules as the custom op takes them: the forward's ints as the inference op takes
    them (none: chosen in the op), then the backward's (none: the target's default, chosen in the op)."""
    back = [] if backward is None else backward.to_ints()
    return [len(forward), *forward, len(back), *back]


def _layout(ints: list[int]) -> tuple[list[int], list[int], list[int]]:
    """The forward's ints, the backward's, and the needed-gradient flags that follow them."""
    f = ints[1 : 1 + ints[0]]
    rest = ints[1 + ints[0] :]
    return f, rest[1 : 1 + rest[0]], rest[1 + rest[0] :]


def _schedules(op, tensors, extents, ints: list[int]) -> tuple[Schedule, BackwardSchedule, list[int]]:
    """The forward schedule (split-KV off: training runs the fused forward), the backward schedule and the
    needed-gradient flags (empty: every floating-point input's)."""
    f, b, needed = _layout(ints)
    inputs = dict(zip([t.name for t in op.cascade.inputs], tensors))
    target = for_device(tensors[0].device.type)
    if f:
        forward = Schedule.from_ints(f)
    else:
        forward = choose(op.cascade, op.forward, target, tensors[0].dtype, extents, kv_heads(op.cascade, inputs))
    backward = BackwardSchedule.from_ints(b) if b else default_backward_schedule(extents, target, op.forward.broadcast)
    return replace(forward, splits=1), backward, needed


_FITTING: dict[
    tuple, BackwardSchedule
] = {}  # a default backward schedule that ran out of shared memory -> one that fit


def _fitting(launch, schedule: BackwardSchedule, chosen: bool, key: tuple):
    """``launch(schedule)``, or where the target's default does not fit the cascade's kernels in shared memory (a
    cascade with more operands than attention's, at a wide head dim), with the first smaller schedule that does,
    remembered for ``key``. A schedule the caller chose is not changed: running out raises OutOfResourcesError."""
    tried = _FITTING.get(key, schedule)
    attempts = [tried] if chosen else [tried, *smaller_backward_schedules(tried)]
    for s in attempts:
        try:
            result = launch(s)
        except Exception as e:
            if type(e).__name__ not in ("OutOfResources", "OutOfResourcesError"):  # Triton's, or as launches say it
                raise
            failure = e
            continue
        _FITTING[key] = s
        return result
    raise OutOfResourcesError.of(
        f"the backward with schedule {attempts[-1].describe()}",
        failure,
        "pass a smaller backward_schedule" if chosen else "no smaller backward schedule fits either",
    ) from failure


def _needed(tensors, flags: list[int]) -> list[bool]:
    """Which inputs' gradients the backward computes (no flags: every floating-point input's)."""
    flags = flags or [1] * len(tensors)
    return [bool(f) and t.is_floating_point() for f, t in zip(flags, tensors)]


@dataclass(frozen=True)
class Training:
    """An op's training path: ``custom_op`` for traced calls (``torch.compile``, ``opcheck``), whose autograd
    formula is registered with torch.library; ``eager`` (an ``autograd.Function``) for eager calls. Both run
    the same forward and backward; eager calls skip the custom op's dispatch, which cost more host time than
    a sliding-window training step's GPU time on an H200. Either direction's launches are replayed by call
    signature (einflash.compiler.runtime.replay): ``forward_replays`` and ``backward_replays``."""

    custom_op: Callable
    eager: type[torch.autograd.Function]
    forward_replays: Replays
    backward_replays: Replays


def register_training(op) -> Training:
    """The training path of ``op``: a forward returning ``[out, *saved values, *saved presence]`` and its
    backward, as custom ops and as an autograd Function."""
    qualname = f"einflash::train_{op.name}_{op.cascade.key}"
    if qualname in _REGISTERED:
        return _REGISTERED[qualname]
    fwd, bwd = op.forward, op.backward
    unpack = unpacker(op)
    value_rank = fwd.value_rank

    names = [t.name for t in op.cascade.inputs]
    # each direction's launches by call signature (einflash.compiler.runtime.replay): a training step's host work
    # outlasted a sliding-window step's GPU time on an H200
    forward_replays, backward_replays = Replays(), Replays()

    def run_forward(tensors, params, schedule) -> list[torch.Tensor]:
        key = signature(tensors, {}, "forward", *_hashable(params), *schedule, generation())
        replay = None if key is None else forward_replays.get(key)
        if replay is not None:
            return replay(tensors)
        record = None if key is None else Recording()
        inputs, values, extents = unpack(tensors, params)
        out, ws = fwd.run(
            inputs, values, _schedules(op, tensors, extents, schedule)[0], extents, saved=bwd.saved, record=record
        )
        results = _with_states(op, out, ws, extents)
        replay = None if record is None else record.replay(tensors, results)
        if replay is not None:
            forward_replays.put(key, replay)
        return results

    def run_backward(grad, out, states, tensors, params, schedule) -> list[torch.Tensor]:
        call = [grad, out, *states, *tensors]
        key = signature(call, {}, "backward", *_hashable(params), *schedule, generation())
        hit = None if key is None else backward_replays.get(key)
        if hit is not None:
            replay, launched = hit
            launched = replace(launched, partials=dict(zip(launched.partials, replay(call))))
        else:
            inputs, values, extents = unpack(tensors, params)
            saved = _saved_states(bwd, states)
            _, schedule_b, flags = _schedules(op, tensors, extents, schedule)
            needed = frozenset(t.name for t, f in zip(op.cascade.inputs, _needed(tensors, flags)) if f)

            def launch(s: BackwardSchedule):
                record = None if key is None else Recording()
                return bwd.launch(inputs, values, out, saved, grad, s, extents, needed=needed, record=record), record

            chosen = bool(_layout(schedule)[1])  # given by the caller, else the target's default
            fits = (op.cascade.key, tensors[0].dtype, tuple(op.forward.dims(extents).items()), needed, schedule_b)
            launched, record = _fitting(launch, schedule_b, chosen, fits)
            replay = None if record is None else record.replay(call, list(launched.partials.values()))
            if replay is not None:  # kept without its tensors
                backward_replays.put(key, (replay, replace(launched, partials=dict.fromkeys(launched.partials))))
        grads = launched.finish(dict(zip(names, tensors)))
        # a gradient nobody asked for comes back empty (a custom op returns tensors, never None)
        return [
            x.new_empty(0) if grads[n] is None else grads[n] for n, x in zip(names, tensors) if x.is_floating_point()
        ]

    @torch.library.custom_op(qualname, mutates_args=())
    def train(tensors: list[torch.Tensor], params: list[float], schedule: list[int]) -> list[torch.Tensor]:
        return run_forward(tensors, params, schedule)

    @train.register_fake
    def _(tensors, params, schedule):
        ext = unpack(tensors, params, fake=True)[2]
        out = tensors[0].new_empty(ext["b"], ext["h"], ext["m"], ext[value_rank])
        return [out] + list(_empty_states(op, ext, out).values())

    @torch.library.custom_op(qualname.replace("::train_", "::bwd_"), mutates_args=())
    def backward(
        grad: torch.Tensor,
        out: torch.Tensor,
        states: list[torch.Tensor],
        tensors: list[torch.Tensor],
        params: list[float],
        schedule: list[int],
    ) -> list[torch.Tensor]:
        return run_backward(grad, out, states, tensors, params, schedule)

    @backward.register_fake
    def _(grad, out, states, tensors, params, schedule):
        wanted = _needed(tensors, _layout(schedule)[2])
        return [torch.empty_like(t) if f else t.new_empty(0) for t, f in zip(tensors, wanted) if t.is_floating_point()]

    def setup_context(ctx, inputs, output):
        tensors, params, schedule = inputs
        ctx.save_for_backward(*tensors, *output)
        ctx.params, ctx.schedule, ctx.count = params, schedule, len(tensors)
        ctx.mark_non_differentiable(*output[1:])

    def formula(ctx, grads):
        needed = [bool(f) for f in ctx.needs_input_grad[0]]
        grads_in = _input_grads(ctx.saved_tensors, ctx.count, ctx.params, ctx.schedule, needed, grads[0], backward)
        # non-tensor arguments get None (an empty list: an empty list), as torch.library expects
        return grads_in, (None if ctx.params else []), None

    train.register_autograd(formula, setup_context=setup_context)

    class EagerTraining(torch.autograd.Function):
        @staticmethod
        def forward(ctx, params, schedule, *tensors):
            results = run_forward(list(tensors), params, schedule)
            ctx.save_for_backward(*tensors, *results)
            ctx.params, ctx.schedule, ctx.count = params, schedule, len(tensors)
            ctx.mark_non_differentiable(*results[1:])
            return tuple(results)

        @staticmethod
        @once_differentiable
        def backward(ctx, *grads):
            needed = [bool(f) for f in ctx.needs_input_grad[2:]]
            return (
                None,
                None,
                *_input_grads(ctx.saved_tensors, ctx.count, ctx.params, ctx.schedule, needed, grads[0], run_backward),
            )

    EagerTraining.__name__ = EagerTraining.__qualname__ = f"EagerTraining_{op.name}_{op.cascade.key}"
    _REGISTERED[qualname] = Training(train, EagerTraining, forward_replays, backward_replays)
    return _REGISTERED[qualname]


def _hashable(params: list[float]) -> tuple:
    """Parameters as a signature holds them: NaN (not given) as None, since NaN equals nothing."""
    return tuple(None if math.isnan(v) else v for v in params)


def _input_grads(saved, count: int, params, schedule, needed: list[bool], grad_out, backward) -> list:
    """Each input's gradient (None where not needed, and for integer inputs) from what the forward saved:
    the inputs, then the output and its states; ``backward`` is the backward custom op or its function."""
    tensors, out, states = list(saved[:count]), saved[count], list(saved[count + 1 :])
    grad = grad_out if grad_out is not None else torch.zeros_like(out)
    made = iter(backward(grad.contiguous(), out, states, tensors, params, schedule + [int(f) for f in needed]))
    grads = []
    for t, wanted in zip(tensors, needed):
        g = next(made) if t.is_floating_point() else None
        grads.append(g if wanted else None)
    return grads


def _with_states(op, out: torch.Tensor, ws: dict[str, torch.Tensor], ext: dict[str, int]) -> list[torch.Tensor]:
    """A training forward's results as its backward takes them back: the output, each saved state's value, then
    each one's presence (allocated empty where nothing ran: an empty batch or sequence)."""
    saved = op.backward.saved
    if not ws:
        ws = _empty_states(op, ext, out)
    return [out] + [ws[s] for s in saved] + [ws[f"{s}:present"] for s in saved]


def _saved_states(bwd, states) -> dict[str, torch.Tensor]:
    """The saved states by name (``<state>`` and ``<state>:present``) from their values then their presence."""
    k = len(bwd.saved)
    return dict(zip(bwd.saved, states[:k])) | {f"{s}:present": p for s, p in zip(bwd.saved, states[k:])}


def _empty_states(op, ext: dict[str, int], out: torch.Tensor) -> dict[str, torch.Tensor]:
    """The saved states' values and presence flags at extents ``ext``, allocated (their shapes, for the fake
    implementation)."""
    c = op.forward.rewritten
    rows = (ext["b"], ext["h"], ext["m"])
    acc = accumulator_dtype(out.dtype)
    values_ = {
        s: out.new_empty(*rows, *(ext[r] for r in c.tensor(s).ranks if r not in PARALLEL + ("m",)), dtype=acc)
        for s in op.backward.saved
    }
    return values_ | {f"{s}:present": out.new_zeros(*rows, dtype=torch.int8) for s in op.backward.saved}


def jagged_training(
    op,
    inputs: dict[str, torch.Tensor],
    values: dict,
    extents: dict[str, int],
    jagged,
    schedule: Schedule,
    backward_schedule: BackwardSchedule | None = None,
):
    """A differentiable call of ``op`` on a jagged batch (``einflash.jagged``): the training forward through the
    jagged kernels, keeping the states its backward reads, and the backward's kernels over the same sequences;
    eager only (a jagged call is not traced). Gradients come packed as their inputs are. ``backward_schedule``
    (None: the target's default for the longest sequence, which is deterministic) is the caller's."""
    names = [t.name for t in op.cascade.inputs]
    fwd, bwd = op.forward, op.backward
    per_sequence = {**extents, "b": jagged.sequences, "m": jagged.max_q, "n": jagged.max_k}
    first = inputs[names[0]]
    target = for_device(first.device.type)

    class JaggedTraining(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *tensors):
            given = dict(zip(names, tensors))
            out, ws = fwd.run(given, values, schedule, extents, jagged, saved=bwd.saved)
            ctx.save_for_backward(*tensors, *_with_states(op, out, ws, extents))
            return out

        @staticmethod
        @once_differentiable
        def backward(ctx, grad):
            tensors, out = ctx.saved_tensors[: len(names)], ctx.saved_tensors[len(names)]
            saved = _saved_states(bwd, ctx.saved_tensors[len(names) + 1 :])
            given = dict(zip(names, tensors))
            needed = frozenset(n for n, f in zip(names, ctx.needs_input_grad) if f and given[n].is_floating_point())
            chosen = backward_schedule is not None
            schedule_b = backward_schedule if chosen else default_backward_schedule(per_sequence, target, fwd.broadcast)
            # keyed by the schedule asked for, as the stacked path is: a caller's own is never swapped for a default's
            fits = (op.cascade.key, first.dtype, tuple(fwd.dims(extents).items()), needed, schedule_b)
            launched = _fitting(
                lambda s: bwd.launch(
                    given, values, out, saved, grad.contiguous(), s, extents, needed=needed, jagged=jagged
                ),
                schedule_b,
                chosen,
                fits,
            )
            grads = launched.finish(given)
            return tuple(grads[n] for n in names)

    return JaggedTraining.apply(*(inputs[n] for n in names))
