"""An attention op's training path as PyTorch sees it: two custom ops and the autograd formula joining them.

``einflash::train_<name>_<key>`` runs the forward and also returns the states the backward reads
(per-row maxima and sums with their presence flags; never the weights P); ``einflash::bwd_<name>_<key>``
runs the backward kernels. Both are opaque to ``torch.compile`` and have fake implementations, so a
compiled training step (``fullgraph=True``) keeps them as single nodes. Incoming gradients are made
contiguous (``out.sum().backward()`` passes a stride-0 one); integer inputs get no gradient.
"""

from __future__ import annotations

import math

import torch

from .compiler.backward import BackwardSchedule
from .compiler.forward import Schedule, accumulator_dtype
from .ir.ranks import PARALLEL
from .ir.reference import bind_extents, bind_params

_REGISTERED: dict[str, object] = {}


def unpacker(op):
    """``(tensors, params) -> (inputs, values)`` for an op's custom ops: tensors in declaration order, a NaN
    parameter meaning "not given" (its default, which may depend on extents, is taken)."""
    names = [t.name for t in op.cascade.inputs]
    decls = op.cascade.params
    c = op.forward.streamed

    def unpack(tensors, params):
        inputs = dict(zip(names, tensors))
        given = {p.name: (int(v) if p.integer else v) for p, v in zip(decls, params) if not math.isnan(v)}
        return inputs, bind_params(c, given, bind_extents(c, inputs, given))

    return unpack


def schedule_ints(forward: Schedule, backward: BackwardSchedule) -> list[int]:
    """A training call's schedules as the custom op takes them (split-KV off: training runs the fused forward)."""
    return [forward.block_m, forward.block_n, forward.num_warps, forward.num_stages, 1, int(forward.pack),
            backward.block_m, backward.block_n, backward.num_warps, backward.num_stages, int(backward.atomic_dq)]


def _schedules(ints: list[int]) -> tuple[Schedule, BackwardSchedule]:
    f, b = ints[:6], ints[6:11]
    return Schedule(*f[:5], bool(f[5])), BackwardSchedule(*b[:4], bool(b[4]))


def _needed(tensors, ints: list[int]) -> list[bool]:
    """Which inputs' gradients the backward computes: flags after the schedules (all floating-point ones if none)."""
    flags = ints[11:] or [1] * len(tensors)
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
        inputs, values = unpack(tensors, params)
        out, ws = fwd.run(inputs, values, _schedules(schedule)[0], saved=bwd.saved)
        if not ws:  # nothing to run (an empty batch or sequence): the states are empty too
            ws = _empty_states(op, inputs, values, out)
        return [out] + [ws[s] for s in bwd.saved] + [ws[f"{s}:present"] for s in bwd.saved]

    @train.register_fake
    def _(tensors, params, schedule):
        inputs, values = unpack(tensors, params)
        ext = bind_extents(c, inputs, values)
        out = tensors[0].new_empty(ext["b"], ext["h"], ext["m"], ext[value_rank])
        return [out] + list(_empty_states(op, inputs, values, out).values())

    @torch.library.custom_op(qualname.replace("::train_", "::bwd_"), mutates_args=())
    def backward(grad: torch.Tensor, out: torch.Tensor, states: list[torch.Tensor], tensors: list[torch.Tensor],
                 params: list[float], schedule: list[int]) -> list[torch.Tensor]:
        inputs, values = unpack(tensors, params)
        k = len(bwd.saved)
        saved = dict(zip(bwd.saved, states[:k])) | {f"{s}:present": p for s, p in zip(bwd.saved, states[k:])}
        needed = frozenset(t.name for t, f in zip(op.cascade.inputs, _needed(tensors, schedule)) if f)
        grads = bwd.run(inputs, values, out, saved, grad, _schedules(schedule)[1], bind_extents(c, inputs, values),
                        needed=needed)
        # a gradient nobody asked for comes back empty (a custom op returns tensors, never None)
        return [grads[t.name] if f else x.new_empty(0) for t, x, f in zip(op.cascade.inputs, tensors,
                                                                          _needed(tensors, schedule))
                if x.is_floating_point()]

    @backward.register_fake
    def _(grad, out, states, tensors, params, schedule):
        return [torch.empty_like(t) if f else t.new_empty(0) for t, f in zip(tensors, _needed(tensors, schedule))
                if t.is_floating_point()]

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
