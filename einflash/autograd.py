"""An attention op's training path as PyTorch sees it: two custom ops and the autograd formula joining them.

``einflash::train_<name>_<key>`` runs the forward and also returns the states the backward reads
(per-row maxima and sums with their presence flags; never the weights P); ``einflash::bwd_<name>_<key>``
runs the backward kernels. Both are opaque to ``torch.compile`` and have fake implementations, so a
compiled training step (``fullgraph=True``) keeps them as single nodes. Incoming gradients are made
contiguous (``out.sum().backward()`` passes a stride-0 one); integer inputs get no gradient.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from .compiler.backward import BackwardSchedule, default_backward_schedule
from .compiler.forward import Schedule, accumulator_dtype
from .compiler.selection import choose
from .ir.ranks import PARALLEL
from .ir.reference import bind_extents, bind_params

_REGISTERED: dict[str, object] = {}


def unpacker(op):
    """``(tensors, params) -> (inputs, values, extents)`` for an op's custom ops: tensors in declaration order, a
    NaN parameter meaning "not given" (its default, which may depend on extents, is taken)."""
    names = [t.name for t in op.cascade.inputs]
    decls = op.cascade.params
    c = op.forward.streamed

    def unpack(tensors, params):
        inputs = dict(zip(names, tensors))
        given = {p.name: (int(v) if p.integer else v) for p, v in zip(decls, params) if not math.isnan(v)}
        extents = bind_extents(c, inputs, given)
        return inputs, bind_params(c, given, extents), extents

    return unpack


def schedule_ints(forward: list[int], backward: BackwardSchedule | None) -> list[int]:
    """A training call's schedules as the custom op takes them: the forward's ints as the inference op takes
    them (none: chosen in the op), then the backward's (none: the target's default, chosen in the op)."""
    back = [] if backward is None else [backward.block_m, backward.block_n, backward.num_warps, backward.num_stages,
                                        int(backward.atomic_dq)]
    return [len(forward), *forward, len(back), *back]


def _layout(ints: list[int]) -> tuple[list[int], list[int], list[int]]:
    """The forward's ints, the backward's, and the needed-gradient flags that follow them."""
    f = ints[1:1 + ints[0]]
    rest = ints[1 + ints[0]:]
    return f, rest[1:1 + rest[0]], rest[1 + rest[0]:]


def _schedules(op, tensors, extents, ints: list[int]) -> tuple[Schedule, BackwardSchedule, list[int]]:
    """The forward schedule (split-KV off: training runs the fused forward), the backward schedule and the
    needed-gradient flags (empty: every floating-point input's)."""
    from .op import _kv_heads, _target

    f, b, needed = _layout(ints)
    inputs = dict(zip([t.name for t in op.cascade.inputs], tensors))
    target = _target(tensors[0].device.type)
    if f:
        forward = Schedule(*f[:5], *(bool(x) for x in f[5:]))
    else:
        forward = choose(op.cascade, op.forward, target, tensors[0].dtype, extents, _kv_heads(op.cascade, inputs))
    backward = BackwardSchedule(*b[:4], bool(b[4])) if b else \
        default_backward_schedule(extents, target, op.forward.broadcast)
    return replace(forward, splits=1), backward, needed


def _needed(tensors, flags: list[int]) -> list[bool]:
    """Which inputs' gradients the backward computes (no flags: every floating-point input's)."""
    flags = flags or [1] * len(tensors)
    return [bool(f) and t.is_floating_point() for f, t in zip(flags, tensors)]


def register_training(op):
    """The training custom op of ``op`` (forward returning ``[out, *saved values, *saved presence]``), with its
    backward registered."""
    qualname = f"einflash::train_{op.name}_{op.cascade.key}"
    if qualname in _REGISTERED:
        return _REGISTERED[qualname]
    fwd, bwd = op.forward, op.backward
    unpack = unpacker(op)
    c = fwd.streamed
    value_rank = next(r for r in c.tensor(c.outputs[0]).ranks if r not in PARALLEL + ("m",))

    @torch.library.custom_op(qualname, mutates_args=())
    def train(tensors: list[torch.Tensor], params: list[float], schedule: list[int]) -> list[torch.Tensor]:
        inputs, values, extents = unpack(tensors, params)
        out, ws = fwd.run(inputs, values, _schedules(op, tensors, extents, schedule)[0], extents, saved=bwd.saved)
        if not ws:  # nothing to run (an empty batch or sequence): the states are empty too
            ws = _empty_states(op, inputs, values, out)
        return [out] + [ws[s] for s in bwd.saved] + [ws[f"{s}:present"] for s in bwd.saved]

    @train.register_fake
    def _(tensors, params, schedule):
        inputs, values, ext = unpack(tensors, params)
        out = tensors[0].new_empty(ext["b"], ext["h"], ext["m"], ext[value_rank])
        return [out] + list(_empty_states(op, inputs, values, out).values())

    @torch.library.custom_op(qualname.replace("::train_", "::bwd_"), mutates_args=())
    def backward(grad: torch.Tensor, out: torch.Tensor, states: list[torch.Tensor], tensors: list[torch.Tensor],
                 params: list[float], schedule: list[int]) -> list[torch.Tensor]:
        inputs, values, extents = unpack(tensors, params)
        k = len(bwd.saved)
        saved = dict(zip(bwd.saved, states[:k])) | {f"{s}:present": p for s, p in zip(bwd.saved, states[k:])}
        _, schedule_b, flags = _schedules(op, tensors, extents, schedule)
        wanted = _needed(tensors, flags)
        needed = frozenset(t.name for t, f in zip(op.cascade.inputs, wanted) if f)
        grads = bwd.run(inputs, values, out, saved, grad, schedule_b, extents, needed=needed)
        # a gradient nobody asked for comes back empty (a custom op returns tensors, never None)
        return [grads[t.name] if f else x.new_empty(0) for t, x, f in zip(op.cascade.inputs, tensors, wanted)
                if x.is_floating_point()]

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
        saved = ctx.saved_tensors
        tensors, out, states = list(saved[:ctx.count]), saved[ctx.count], list(saved[ctx.count + 1:])
        grad = grads[0] if grads[0] is not None else torch.zeros_like(out)
        needed = [bool(f) for f in ctx.needs_input_grad[0]]
        made = iter(backward(grad.contiguous(), out, states, tensors, ctx.params,
                             ctx.schedule + [int(f) for f in needed]))
        grads_in = []
        for t, wanted in zip(tensors, needed):
            g = next(made) if t.is_floating_point() else None
            grads_in.append(g if wanted else None)
        # non-tensor arguments get None (an empty list: an empty list), as torch.library expects
        return grads_in, (None if ctx.params else []), None

    train.register_autograd(formula, setup_context=setup_context)
    _REGISTERED[qualname] = train
    return train


def _empty_states(op, inputs, values, out: torch.Tensor) -> dict[str, torch.Tensor]:
    """The saved states' values and presence flags, allocated (their shapes, for the fake implementation)."""
    c = op.forward.streamed
    ext = bind_extents(c, inputs, values)
    rows = (ext["b"], ext["h"], ext["m"])
    acc = accumulator_dtype(out.dtype)
    values_ = {s: out.new_empty(*rows, *(ext[r] for r in c.tensor(s).ranks if r not in PARALLEL + ("m",)), dtype=acc)
               for s in op.backward.saved}
    return values_ | {f"{s}:present": out.new_zeros(*rows, dtype=torch.int8) for s in op.backward.saved}
