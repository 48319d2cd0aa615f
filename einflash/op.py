"""AttentionOp: what ``@einflash.attention`` returns; checks call arguments and dispatches."""

from __future__ import annotations

import importlib.util
import inspect
import math
import pathlib
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch

from . import errors
from .autograd import jagged_training, register_training, schedule_ints, unpacker
from .backends import for_device, get_target
from .backends.target import Target
from .compiler.explain import DTYPE_BYTES, Explanation, explain
from .compiler.rewrite.lse import with_lse
from .compiler.runtime.backward import Backward
from .compiler.runtime.forward import Forward, accumulator_dtype
from .compiler.runtime.replay import Recording, Replays, signature
from .compiler.schedule import BackwardSchedule, Schedule
from .compiler.tuning.ranking import untuned_default
from .compiler.tuning.selection import choose, generation
from .compiler.tuning.space import element_bytes, fitting_default
from .errors import (
    CallError,
    DeclarationError,
    DeviceError,
    DifferentiationError,
    DTypeError,
    LoweringError,
    MissingInputError,
    NormaliserError,
    ParameterError,
    ShapeError,
)
from .ir import Cascade, Layout, trace
from .ir.cascade import ATTENTION_INPUTS, ParamDecl
from .ir.reference import bind_extents, bind_params, kv_heads, run_outputs
from .jagged import OFFSET_NAMES, JaggedBatch, jagged_batch
from .shape import Shape

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class AttentionOp:
    """An attention variant declared as a cascade of Einsums.

    ``op(q, k, v, **inputs)`` takes q ``[B, Hq, M, E]``, k ``[B, Hkv, N, E]``, v
    ``[B, Hkv, N, F]`` (``Hq`` a multiple of ``Hkv``), the declared extra inputs
    and scalar parameters as keywords, and an optional ``scale``; it returns
    ``[B, Hq, M, F]`` in q's dtype (and the log-sum-exp with ``return_lse=True``).

    >>> import torch, einflash as ef
    >>> @ef.attention
    ... def plain(q, k, v):
    ...     return ef.softmax(q @ k * ef.scale, "n") @ v
    >>> q = torch.randn(1, 2, 5, 8)
    >>> plain.reference(q, q, q).shape
    torch.Size([1, 2, 5, 8])
    """

    def __init__(self, fn: Callable, name: str | None = None):
        self.fn = fn
        self.name = _identifier(fn.__name__ if name is None else name, given=name is not None)
        self.cascade: Cascade = trace(fn, self.name)
        self.__doc__ = fn.__doc__
        self.__wrapped__ = fn
        # rewritten and registered now, so that calls (also under torch.compile) run no sympy
        self.forward = Forward(self.cascade)
        self.backward = Backward(self.forward)  # the gradient, derived now too
        # the cascade with its softmax's log-sum-exp as a second output (return_lse=True), or why it has none
        self.lse_error: NormaliserError | None = None
        try:
            self.forward_lse: Forward | None = Forward(with_lse(self.cascade))
        except NormaliserError as e:
            self.forward_lse, self.lse_error = None, e
        self._custom_op = _register(self, self.forward)
        self._lse_op = None if self.forward_lse is None else _register(self, self.forward_lse)
        self._training = register_training(self)
        self._replays = Replays()  # eager calls' launches by call signature

    def __repr__(self) -> str:
        return f"<einflash.AttentionOp {self.name} {self.cascade.key}>"

    # -- arguments ---------------------------------------------------------------------

    def bind(self, args: tuple, kwargs: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Split call arguments into checked input tensors and scalar parameters."""
        names = [t.name for t in self.cascade.inputs]
        if len(args) > len(names):
            raise MissingInputError(
                f"{self.name} takes {len(names)} tensor inputs ({', '.join(names)}), "
                f"got {len(args)} positional arguments"
            )
        inputs = dict(zip(names, args))
        params: dict[str, float] = {}
        declared = {p.name: p for p in self.cascade.params}
        for key, val in kwargs.items():
            if key in OFFSET_NAMES:  # a jagged batch's offsets: see jagged_batch
                continue
            if key in names:
                if key in inputs:
                    raise MissingInputError(f"{self.name}: input {key!r} given twice")
                inputs[key] = val
            elif key in declared:
                if val is not None:
                    params[key] = _checked_param(self.name, declared[key], val)
            elif key == "scale":
                if val is not None:
                    raise MissingInputError(f"{self.name} does not use ef.scale, so `scale` cannot be given")
            else:
                raise MissingInputError(
                    f"{self.name} got an unexpected argument {key!r}; it takes inputs "
                    f"{names} and parameters {sorted(declared)}"
                )
        missing = [n for n in names if n not in inputs]
        if missing:
            raise MissingInputError(f"{self.name} is missing input(s) {missing}")
        self._check_tensors(inputs)
        return inputs, params

    def _check_tensors(self, inputs: dict[str, Any]) -> None:
        device, qkv_dtype = None, None
        for t in self.cascade.inputs:
            x = inputs[t.name]
            if not isinstance(x, torch.Tensor):
                raise DTypeError(f"{t.name} must be a torch.Tensor, got {type(x).__name__}")
            if x.device.type not in ("cpu", "cuda"):
                raise DeviceError(
                    f"{t.name} is on {x.device}: einflash computes on cpu or cuda tensors (a meta "
                    f"tensor holds no data; einflash.aot builds kernels without a GPU)"
                )
            if device is None:
                device = x.device
            elif x.device != device:
                raise DeviceError(
                    f"{t.name} is on {x.device}, but {self.cascade.inputs[0].name} is on {device}; "
                    f"move all inputs to one device"
                )
            if t.layout in (Layout.QUERY, Layout.KEY):
                if x.dtype not in FLOAT_DTYPES:
                    raise DTypeError(f"{t.name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
                # q, k and v share a dtype; another per-token input (fp32 gates) keeps its own
                if t.name in ATTENTION_INPUTS and qkv_dtype is None:
                    qkv_dtype = x.dtype
                elif t.name in ATTENTION_INPUTS and x.dtype != qkv_dtype:
                    raise DTypeError(
                        f"{t.name} is {x.dtype} but {self.cascade.inputs[0].name} is {qkv_dtype}; "
                        f"q, k and v must share a dtype"
                    )
                if x.dim() != 4:
                    raise ShapeError(
                        f"{t.name} must be 4-D {'[B, Hq, M, d]' if t.layout is Layout.QUERY else '[B, Hkv, N, d]'}"
                        f", got shape {tuple(x.shape)}"
                    )
                if x.shape[3] == 0:
                    raise ShapeError(f"{t.name}'s head dim is 0 (shape {tuple(x.shape)}); attention needs at least 1")
            elif x.dtype.is_complex:
                raise DTypeError(f"{t.name} must be a real tensor, got {x.dtype}")

    # -- running -------------------------------------------------------------------------

    def reference(
        self, *args, dtype: torch.dtype = torch.float64, return_lse: bool = False, rounding=None, **kwargs
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The reference executor on these inputs (the oracle), computed and returned in ``dtype``; with
        ``return_lse=True`` the output and its softmax's log-sum-exp, as a call returns them.

        Takes a jagged batch's ``cu_seqlens_q`` and ``cu_seqlens_k`` like a call does, and runs each
        sequence on its own. ``rounding(name, values)``, given each Einsum's values, returns the values to go
        on with (the tolerance rule's ``einflash.testing.rounding_allowance`` rounds them); None leaves them.
        """
        inputs, params = self.bind(args, kwargs)
        jagged = jagged_batch(self.cascade, inputs, kwargs)
        return self._reference(inputs, params, jagged, dtype, return_lse, rounding)

    def _reference(
        self, inputs, params, jagged: JaggedBatch | None, dtype: torch.dtype, lse: bool = False, rounding=None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The output, or with ``lse`` the output and the log-sum-exp, from the written cascade; ``rounding`` as
        ``run_outputs`` takes it."""
        c = self._lse_cascade() if lse else self.cascade
        if jagged is None:
            outs = run_outputs(c, inputs, params, dtype=dtype, rounding=rounding)
        else:
            per_seq = [
                run_outputs(c, seq, params, dtype=dtype, rounding=rounding)
                for seq in jagged.sequence_inputs(self.cascade, inputs)
            ]
            outs = tuple(torch.cat(parts, dim=2) for parts in zip(*per_seq))
        return outs if lse else outs[0]

    def _lse_cascade(self) -> Cascade:
        if self.lse_error is not None:
            raise NormaliserError(f"return_lse=True: {self.lse_error}")
        return self.forward_lse.written

    def __call__(
        self,
        *args,
        backend: str | None = None,
        schedule: Schedule | None = None,
        backward_schedule: BackwardSchedule | None = None,
        deterministic: bool = False,
        return_lse: bool = False,
        initial_state: torch.Tensor | None = None,
        return_state: bool = False,
        **kwargs,
    ):
        """Run the generated kernel; ``backend="reference"`` runs the float64 reference instead.

        Without a ``schedule``, the autotune cache's for this shape (or the nearest tuned shape), else the
        heuristic default; see ``einflash.compiler.tuning.selection``. A jagged batch (sequences packed along m
        and n of batch-1 tensors) is given by the keywords ``cu_seqlens_q`` and ``cu_seqlens_k``, the
        cumulative offsets of its sequences (see einflash.jagged). Raises LoweringError (with the reason)
        when the cascade cannot be lowered yet.

        Inputs that require grad make the call differentiable: the forward then also keeps the per-row
        states its backward reads, and ``backward_schedule`` says how the backward runs (the default is
        deterministic; an atomic dQ schedule is not, and ``deterministic=True`` refuses one).

        ``return_lse=True`` returns ``(out, lse)``: ``lse`` ``[B, Hq, M]`` (``[1, Hq, total_q]`` for a jagged
        batch), float32 (float64 for float64 inputs), the natural-log log-sum-exp over n of the scores the
        cascade's softmax normalises (scale and biases included, masked keys left out), −inf for a row with
        no unmasked key (whose output is 0). The fused kernel (or the split-KV combine) computes it from
        its running max and sum. It is not differentiable: with inputs that require grad it comes back
        detached, from a second forward pass without the training states. A cascade with no softmax over n
        (sigmoid or linear attention), or with several (differential attention), raises NormaliserError
        saying what it normalises with.

        Causal attention in linear form (``causal_linear``; see einflash.compiler.rewrite.chunked) carries a state
        from call to call: ``return_state=True`` returns ``(out, state)``, the state after the last key
        (``[B, Hq, E, F]``, float32; float64 for float64 inputs), and ``initial_state=`` gives the state of the keys
        before this call's, so that a sequence runs in pieces (a prefill in chunks, then one token at a time) with
        the output of one whole call. Such a call runs chunk by chunk at any length (M = N), eagerly, with no
        backward yet.

        An eager call with nothing to differentiate is recorded (einflash.compiler.runtime.replay): a later call
        with tensors of the same shapes, strides, dtypes, devices and alignment and the same other
        arguments skips the binding, the checks and the schedule's choice, and launches the same kernels (not
        where an index gathers through an input: its entries are checked on every call).

        >>> import torch, einflash as ef
        >>> @ef.attention
        ... def plain(q, k, v):
        ...     return ef.softmax(q @ k * ef.scale, "n") @ v
        >>> q = torch.randn(1, 2, 5, 16)
        >>> out, lse = plain(q, q, q, return_lse=True)
        >>> torch.allclose(lse, torch.logsumexp(q @ q.mT / 4, dim=-1), atol=1e-5), lse.dtype
        (True, torch.float32)
        """
        if initial_state is not None or return_state:
            return self._call_with_state(args, kwargs, backend, schedule, initial_state, return_state)
        tracing = torch.compiler.is_compiling()
        replay_key = None
        # a gather's bounds depend on the gathered input's entries: such a call binds and checks every time
        if backend is None and not tracing and not kwargs.keys() & OFFSET_NAMES and not self.cascade.gathers:
            replay_key = signature(args, kwargs, schedule, return_lse, generation())
            replay = None if replay_key is None else self._replays.get(replay_key)
            if replay is not None:
                return _returned(replay(_call_tensors(args, kwargs)))
        try:
            inputs, params = self.bind(args, kwargs)
        except CallError as e:
            if not tracing:
                raise
            # a raise that Dynamo traced would come out of a fullgraph compile as its own exception type: the
            # compiled graph raises this one when it runs instead
            return _refused(e, args, kwargs)
        jagged = jagged_batch(self.cascade, inputs, kwargs)
        if backend == "reference":
            return self._call_reference(inputs, params, jagged, return_lse)
        fwd = self._forward(backend, return_lse, tracing)
        if jagged is not None:
            extents = bind_extents(fwd.rewritten, inputs, params)
            return self._run_jagged(fwd, inputs, params, extents, jagged, schedule, backward_schedule, deterministic)
        # traced, the custom op binds the extents (its fake implementation at trace time) and chooses the schedule
        extents = None if tracing else bind_extents(fwd.rewritten, inputs, params)
        if schedule is None and not tracing:
            schedule = self._chosen(fwd, inputs, params, extents)
        if torch.is_grad_enabled() and any(x.requires_grad for x in inputs.values()):
            return self._call_training(inputs, params, schedule, backward_schedule, deterministic, return_lse, tracing)
        if tracing:
            return (self._lse_op if return_lse else self._custom_op)(
                [inputs[t.name] for t in self.cascade.inputs],
                _param_values(self.cascade, params),
                [] if schedule is None else schedule.to_ints(),
            )
        # eager with nothing to differentiate: the custom op's dispatch would only add host time
        record = None if replay_key is None else Recording()
        results = _results(
            fwd, *fwd.run(inputs, bind_params(fwd.rewritten, params, extents), schedule, extents, record=record)
        )
        replay = (
            None
            if record is None
            else record.replay(_call_tensors(args, kwargs), results if isinstance(results, tuple) else (results,))
        )
        if replay is not None:
            self._replays.put(replay_key, replay)
        return results

    def _chosen(self, fwd: Forward, inputs, params, extents) -> Schedule:
        """The schedule of an eager call that gave none: the autotune cache's, else the heuristic default."""
        first = inputs[self.cascade.inputs[0].name]
        target = for_device(first.device.type)
        return choose(self.cascade, fwd, target, first.dtype, extents, kv_heads(self.cascade, inputs), inputs, params)

    def _call_with_state(self, args, kwargs, backend, schedule, initial_state, return_state: bool):
        """A call that carries a state (``initial_state=``, ``return_state=True``): the chunked form's forward."""
        if backend == "reference" or torch.compiler.is_compiling():
            raise LoweringError(
                f"{self.name}: a call that carries a state runs the chunked kernels eagerly; not with "
                f"backend='reference' nor under torch.compile yet"
            )
        inputs, params = self.bind(args, kwargs)
        if jagged_batch(self.cascade, inputs, kwargs) is not None:
            raise LoweringError(f"{self.name}: a call that carries a state takes a plain batch, not a jagged one")
        if torch.is_grad_enabled() and any(x.requires_grad for x in [*inputs.values(), initial_state] if x is not None):
            raise DifferentiationError(
                f"{self.name}: a call that carries a state has no backward yet; train on whole sequences (no "
                f"initial_state, no return_state), or call it under torch.no_grad()"
            )
        fwd = self._forward(backend, False, False)
        extents = bind_extents(fwd.rewritten, inputs, params)
        schedule = schedule or self._chosen(fwd, inputs, params, extents)
        values = bind_params(fwd.rewritten, params, extents)
        out, final = fwd.prefill(inputs, values, schedule, extents, initial_state)
        return (out, final) if return_state else out

    def _call_reference(self, inputs, params, jagged: JaggedBatch | None, return_lse: bool):
        """``backend="reference"``: the float64 reference, returned in the dtypes a kernel returns."""
        first = inputs[self.cascade.inputs[0].name]
        if return_lse:
            out, lse = self._reference(inputs, params, jagged, torch.float64, lse=True)
            return out.to(first.dtype), lse.to(accumulator_dtype(first.dtype))
        return self._reference(inputs, params, jagged, torch.float64).to(first.dtype)

    def _forward(self, backend: str | None, return_lse: bool, tracing: bool) -> Forward:
        """The forward a call runs, after the checks that refuse it: an unknown backend name, a log-sum-exp
        without a softmax over n, a cascade that no template lowers."""
        if backend is not None:
            get_target(backend)  # an unknown name raises BackendError listing the valid ones
        if return_lse:
            self._lse_cascade()  # NormaliserError when there is no softmax over n
        fwd = self.forward_lse if return_lse else self.forward
        # traced by torch.compile, the custom op raises it when it runs: a raise that Dynamo traced would come
        # out of a fullgraph compile as its own exception type
        if fwd.error is not None and not tracing:
            raise LoweringError(fwd.refusal)
        return fwd

    def _call_training(
        self,
        inputs,
        params,
        schedule: Schedule | None,
        backward_schedule: BackwardSchedule | None,
        deterministic: bool,
        return_lse: bool,
        tracing: bool,
    ):
        """A differentiable call: the training forward, which keeps the states its backward reads."""
        self._check_trainable(inputs, backward_schedule, deterministic)
        tensors = [inputs[t.name] for t in self.cascade.inputs]
        values = _param_values(self.cascade, params)
        ints = [] if schedule is None else schedule.to_ints()
        training_ints = schedule_ints(ints, backward_schedule)
        if tracing:
            out = self._training.custom_op(tensors, values, training_ints)[0]
        else:  # eager: the same forward and backward without the custom op's dispatch
            out = self._training.eager.apply(values, training_ints, *tensors)[0]
        if not return_lse:
            return out
        # lse is not differentiated: the training op keeps the states its backward needs, not lse
        return out, self._lse_op([x.detach() for x in tensors], values, ints)[1]

    def _check_trainable(self, inputs, backward_schedule: BackwardSchedule | None, deterministic: bool) -> None:
        """Refuse a differentiable call the backward cannot make: no backward, a frozen input that requires grad,
        or a deterministic call given an atomic backward schedule."""
        if self.backward.error is not None:
            raise type(self.backward.error)(f"{self.name}: no backward: {self.backward.error}")
        for name, why in self.backward.frozen:
            if inputs[name].requires_grad:
                raise DifferentiationError(f"{self.name}: {name} requires grad, but {why}")
        if deterministic and backward_schedule is not None and not backward_schedule.deterministic:
            raise ParameterError(
                f"{self.name}: deterministic=True, but the backward schedule {backward_schedule} "
                f"adds query-side gradients atomically; use atomic_dq=False"
            )

    def tune(self, *args, trials: int | None = None, seconds: float | None = None, **kwargs):
        """Tune the schedule for these arguments (as a call takes them) on their device; store the winner in
        the autotune cache, which later calls of this shape (and nearby shapes) then use. Returns the
        ``TuneResult``. The budget: ``trials`` schedules measured (default 30), ``seconds`` (default 600).

        Other keywords go to ``einflash.compiler.tuning.tuner.tune``: ``timer``, ``storage`` (an Optuna URL or
        journal file shared with other workers), ``seed``, ``sampler``, ``warm_start``, ``cache``, ``progress``.

        >>> import tempfile, torch, einflash as ef
        >>> from einflash.compiler.tuning.cache import TuneCache
        >>> @ef.attention
        ... def plain(q, k, v):
        ...     return ef.softmax(q @ k * ef.scale, "n") @ v
        >>> q = torch.randn(1, 2, 24, 16)
        >>> r = plain.tune(q, q, q, trials=2, cache=TuneCache(tempfile.mkdtemp()))
        >>> len(r.measured), r.best_ms <= r.default_ms
        (2, True)
        """
        from .compiler.tuning.tuner import Budget, tune

        options = {k: kwargs.pop(k) for k in TUNE_OPTIONS if k in kwargs}
        inputs, params = self.bind(args, kwargs)
        if self.forward.error is not None:
            raise LoweringError(f"{self.name}: {self.forward.error}; there is no kernel to tune")
        if jagged_batch(self.cascade, inputs, kwargs) is not None:
            raise LoweringError(
                f"{self.name}: tuning jagged batches is not implemented (the cache's shape buckets "
                f"are of stacked batches); tune a stacked batch of typical sequence lengths"
            )
        first = inputs[self.cascade.inputs[0].name]
        return tune(
            self.cascade,
            self.forward,
            inputs,
            params,
            for_device(first.device.type),
            budget=Budget(**{k: v for k, v in (("trials", trials), ("seconds", seconds)) if v is not None}),
            **options,
        )

    def _run_jagged(
        self,
        fwd: Forward,
        inputs,
        params,
        extents,
        jagged: JaggedBatch,
        schedule: Schedule | None,
        backward_schedule: BackwardSchedule | None = None,
        deterministic: bool = False,
    ):
        """A jagged batch through ``fwd``'s kernel, eagerly (the custom op takes stacked batches only); with
        inputs that require grad, through the jagged training path (``einflash.autograd.jagged_training``)."""
        training = torch.is_grad_enabled() and any(x.requires_grad for x in inputs.values())
        if self.cascade.computed_reads:
            raise LoweringError(
                f"{self.name}: reads of {', '.join(sorted(self.cascade.computed_reads))} at computed positions are "
                f"not lowered for jagged batches (each sequence's bounds differ); pad the sequences into a stacked "
                f"batch, or pass backend='reference'"
            )
        per_sequence = {**extents, "b": jagged.sequences, "m": jagged.max_q, "n": jagged.max_k}
        if schedule is None:
            # jagged batches are not tuned yet: the cache's buckets are of stacked batches
            first = inputs[self.cascade.inputs[0].name]
            target = for_device(first.device.type)
            heads = kv_heads(self.cascade, inputs)
            elem = element_bytes(self.cascade, inputs, first.dtype)
            schedule = fitting_default(fwd, target, per_sequence, heads, elem, allow_split=False)
        values = bind_params(fwd.rewritten, params, extents)
        if training:
            if fwd is not self.forward:
                raise LoweringError(
                    f"{self.name}: the log-sum-exp of a jagged batch is not differentiated; call it without "
                    f"return_lse, or without gradients"
                )
            self._check_trainable(inputs, backward_schedule, deterministic)
            return jagged_training(self, inputs, values, extents, jagged, schedule, backward_schedule)
        return _results(fwd, *fwd.run(inputs, values, schedule, extents, jagged))

    def explain(
        self,
        shape: Shape | None = None,
        dtype: str = "bfloat16",
        target: str | Target = "sm90",
        dims: dict[str, int] | None = None,
        inputs: Mapping[str, torch.Tensor] | None = None,
        schedule: Schedule | None = None,
        **params,
    ) -> Explanation:
        """Passes as written and after rewriting (with reasons), buffers as formulas, FLOPs, bytes, the
        roofline on ``target`` at ``shape`` (default B=2, H=16, M=N=4096, D=128), mask tile counts.

        ``dims`` gives extents of ranks the declaration adds (``r``, ``a``...); others are assumed 16.
        ``inputs`` may give the per-token data a mask reads (document ids ``[B, N]``): the tiles are then counted
        as the run time classifies them for that data, with the pairs the mask keeps and the tiles holding one.
        ``schedule``: the schedule to count tiles and predict the time at (default: the one a call of ``shape``
        runs when nothing is tuned); the prediction (``.predicted``) needs a target with a cost model.
        Keyword arguments are the declaration's parameters; anything else (``M=1024``) is refused.

        >>> import torch, einflash as ef
        >>> @ef.attention
        ... def docs(q, k, v, doc: ef.Tensor["b n"]):  # noqa: F722 -- rank names
        ...     return ef.softmax(ef.mask(q @ k, (doc[ef.m] == doc[ef.n]) & (ef.n <= ef.m)), "n") @ v
        >>> ids = torch.repeat_interleave(torch.arange(3), torch.tensor([1000, 3000, 96]))[None]  # 3 documents
        >>> t = docs.explain(ef.Shape(1, 16, 4096, 4096, 128), inputs={"doc": ids}).tiles  # at the call's 64x64 tiles
        >>> t["pairs"] == 1000 * 1001 // 2 + 3000 * 3001 // 2 + 96 * 97 // 2, t["tiles_with_pairs"]
        (True, 1313)
        """
        declared = {p.name: p for p in self.cascade.params}
        for key, val in params.items():
            if key not in declared:
                raise ParameterError(
                    f"{self.name}.explain got {key}={val!r}, which is not a parameter of {self.name} "
                    f"(it has {sorted(declared)}); give sizes as shape=ef.Shape(B, H, M, N, D)"
                )
            params[key] = _checked_param(self.name, declared[key], val)
        inputs = dict(inputs or {})
        names = {t.name for t in self.cascade.inputs}
        for key, val in inputs.items():
            if key not in names or not isinstance(val, torch.Tensor):
                raise ParameterError(
                    f"{self.name}.explain got inputs[{key!r}] = {type(val).__name__}; inputs maps names of "
                    f"{self.name}'s inputs ({sorted(names)}) to tensors"
                )
        shape = shape or DEFAULT_SHAPE
        tgt = get_target(target) if isinstance(target, str) else target
        if schedule is None and self.forward.error is None:
            # the schedule a call of this shape runs when nothing is tuned
            extents = shape.extents([r.name for r in self.cascade.ranks], dict(dims or {}))
            schedule = untuned_default(self.forward, tgt, extents, shape.Hkv, DTYPE_BYTES[dtype], params)
        return explain(
            self.cascade,
            self.forward.steps,
            self.forward.rewritten,
            self.forward.error,
            tgt,
            shape,
            dtype,
            dims,
            params,
            self.backward,
            inputs,
            schedule,
        )


DEFAULT_SHAPE = Shape(2, 16, 4096, 4096, 128)
_REGISTERED: dict[str, object] = {}
TUNE_OPTIONS = ("timer", "storage", "seed", "sampler", "warm_start", "cache", "progress")


def _call_tensors(args: tuple, kwargs: Mapping[str, Any]) -> list[torch.Tensor]:
    """A call's tensors in the order its replay takes them (see einflash.compiler.runtime.replay.signature)."""
    return [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)]


@torch.library.custom_op("einflash::refuse", mutates_args=())
def _refuse(error: str, message: str, like: torch.Tensor) -> torch.Tensor:
    """Raise the einflash error ``error`` (a class of einflash.errors) with ``message``: a call that tracing
    refused, raised when the compiled graph runs."""
    raise getattr(errors, error)(message)


@_refuse.register_fake
def _(error, message, like):
    return torch.empty_like(like)


def _refused(e: CallError, args: tuple, kwargs: Mapping[str, Any]):
    """A traced call that ``e`` refuses: a node of the graph that raises ``e`` when it runs."""
    like = next((x for x in (*args, *kwargs.values()) if isinstance(x, torch.Tensor)), None)
    if like is None:
        raise e
    return _refuse(type(e).__name__, str(e), like)


def _param_values(cascade: Cascade, params: Mapping[str, float]) -> list[float]:
    """Parameters as the custom ops take them: a parameter not given travels as NaN, and its default (which may
    depend on extents) is taken inside."""
    return [float(params[p.name]) if p.name in params else math.nan for p in cascade.params]


def _returned(results: list[torch.Tensor]):
    """A replay's results as a call returns them."""
    return results[0] if len(results) == 1 else tuple(results)


def _results(fwd: Forward, out: torch.Tensor, ws: dict[str, torch.Tensor]):
    """What a call of ``fwd`` returns: the output, or the output and the per-row outputs (the log-sum-exp)."""
    rows = fwd.rewritten.outputs[1:]
    return (out, *(ws[o] for o in rows)) if rows else out


def _register(op: AttentionOp, fwd: Forward):
    """``fwd`` (the op's forward, or the one with the log-sum-exp output) as a torch custom op, opaque to
    torch.compile, with a fake implementation; it returns what a call does (see ``_results``)."""
    rows = fwd.rewritten.outputs[1:]
    qualname = f"einflash::fwd{'_lse' if rows else ''}_{op.name}_{op.cascade.key}"
    if qualname in _REGISTERED:
        return _REGISTERED[qualname]
    unpack = unpacker(op)
    returns = f"({', '.join(['Tensor'] * (1 + len(rows)))})" if rows else "Tensor"

    @torch.library.custom_op(
        qualname, mutates_args=(), schema=f"(Tensor[] tensors, float[] params, int[] schedule) -> {returns}"
    )
    def run(tensors, params, schedule):
        """``schedule``: ``Schedule.to_ints()``, or [] to choose one here."""
        if fwd.error is not None:
            raise LoweringError(fwd.refusal)
        inputs, values, extents = unpack(tensors, params)
        if schedule:
            return _results(fwd, *fwd.run(inputs, values, Schedule.from_ints(schedule), extents))
        chosen = choose(
            op.cascade, fwd, for_device(tensors[0].device.type), tensors[0].dtype, extents, kv_heads(op.cascade, inputs)
        )
        return _results(fwd, *fwd.run(inputs, values, chosen, extents))

    @run.register_fake
    def _(tensors, params, schedule):
        ext = unpack(tensors, params, fake=True)[2]
        value_rank = fwd.value_rank
        acc = accumulator_dtype(tensors[0].dtype)
        return _results(
            fwd,
            tensors[0].new_empty(ext["b"], ext["h"], ext["m"], ext[value_rank]),
            {o: tensors[0].new_empty(ext["b"], ext["h"], ext["m"], dtype=acc) for o in rows},
        )

    _REGISTERED[qualname] = run
    return run


def attention(fn: Callable | None = None, *, name: str | None = None):
    """Declare an attention variant; see :class:`AttentionOp`.

    Use as ``@einflash.attention`` or ``@einflash.attention(name="...")``.
    """
    if fn is None:
        return lambda f: AttentionOp(f, name)
    if not callable(fn) or not inspect.isfunction(fn):
        raise DeclarationError(f"@einflash.attention decorates a function, got {type(fn).__name__}")
    return AttentionOp(fn, name)


def _checked_param(op: str, decl: ParamDecl, value) -> float | int:
    """A scalar parameter's value as the declaration allows it: a finite number; an int for an int parameter
    (True or False for a bool one). Anything else raises ParameterError saying what was expected."""
    kind = "bool" if decl.boolean else "an int" if decl.integer else "number"
    ok = (
        isinstance(value, bool)
        if decl.boolean
        else (
            isinstance(value, int) and not isinstance(value, bool)
            if decl.integer
            else isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        )
    )
    if not ok:
        shown = f"{type(value).__name__} {value!r}" if not isinstance(value, torch.Tensor) else "a tensor"
        article = "a finite " if kind == "number" else "a " if kind == "bool" else ""
        raise ParameterError(
            f"{op}: parameter {decl.name!r} takes {article}{kind}, "
            f"got {shown}" + ("; pass float(x)" if isinstance(value, torch.Tensor) else "")
        )
    return int(value) if decl.integer else value


def _identifier(name: str, given: bool) -> str:
    """The op's name as kernels, files and custom ops are named by it: an ASCII identifier. A function's own name
    that is none (a lambda's, a non-ASCII one) is made one; a ``name=`` that is none is refused.

    >>> _identifier("<lambda>", given=False), _identifier("atténtion", given=False)
    ('lambda', 'att_ntion')
    """
    if name.isascii() and name.isidentifier():
        return name
    if given:
        raise DeclarationError(
            f"name={name!r}: an attention op's name must be a Python identifier of ASCII letters, "
            f"digits and underscores (kernels and custom ops are named by it)"
        )
    safe = re.sub(r"[^0-9A-Za-z_]", "_", name).strip("_") or "attention"
    return f"_{safe}" if safe[0].isdigit() else safe


def load_ops(path: str) -> dict[str, AttentionOp]:
    """The attention ops a Python file declares, by name (``einflash explain FILE``, ``load_aot``)."""
    file = pathlib.Path(path)
    if not file.is_file():
        raise DeclarationError(f"no such file: {path}")
    spec = importlib.util.spec_from_file_location(f"einflash_user_{file.stem}", file)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return {v.name: v for v in vars(mod).values() if isinstance(v, AttentionOp)}
