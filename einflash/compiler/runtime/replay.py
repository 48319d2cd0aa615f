"""A call's kernel launches, recorded once per call signature and replayed.

An eager call binds and checks its arguments, chooses a schedule, allocates its output and
workspaces and builds every launch argument (70 for a split-KV decode's first kernel). On the
decode row of docs/design.md §5 that host work took longer than the GPU's whole step, so a call timed on
its own measured the host. All of it depends only on the call's *signature*: each tensor's shape,
strides, dtype, device and alignment, the other arguments' values, and the schedule chosen for
them. A ``Replay`` keeps what it computed: the buffers to allocate, and each launch's bound
launcher with its non-tensor arguments. A later call of the same signature allocates the buffers
and launches with its own tensors.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch

from ..codegen.signature import KernelCall
from ..codegen.source import RenderedKernel
from .launch import bound_launch, jit_launch


@dataclass(frozen=True)
class ReplayedLaunch:
    """One launch: its launcher, its arguments with None where a tensor goes, and each tensor's source as
    (argument position, whether it is a buffer (else a call tensor), index)."""

    launcher: Callable[..., object]
    args: tuple
    tensors: tuple[tuple[int, bool, int], ...]


@dataclass(frozen=True)
class Replay:
    """The launches of one call signature; ``replay(tensors)`` returns the call's results (see ``Recording``)."""

    device: torch.device
    buffers: tuple[tuple[tuple[int, ...], torch.dtype, bool], ...]  # shape, dtype, zero-filled
    launches: tuple[ReplayedLaunch, ...]
    results: tuple[int, ...]  # the buffer of each result

    def __call__(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        buffers = [
            (torch.zeros if zero else torch.empty)(shape, dtype=dtype, device=self.device)
            for shape, dtype, zero in self.buffers
        ]
        for launch in self.launches:
            args = list(launch.args)
            for position, is_buffer, index in launch.tensors:
                args[position] = buffers[index] if is_buffer else tensors[index]
            launch.launcher(*args)
        return [buffers[i] for i in self.results]


class Recording:
    """What one run of a forward or a backward allocates (through ``empty`` and ``zeros``) and launches
    (through ``launch``, which runs it).

    >>> rec = Recording()
    >>> out = rec.empty(2, 3, dtype=torch.float32, device=torch.device("cpu"))
    >>> rec.replay([], [out])([])[0].shape
    torch.Size([2, 3])
    """

    def __init__(self) -> None:
        self.buffers: list[torch.Tensor] = []
        self.zeroed: list[bool] = []
        self.launches: list[tuple[RenderedKernel, KernelCall]] = []

    def empty(self, *shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return self._buffer(torch.empty(*shape, dtype=dtype, device=device), False)

    def zeros(self, *shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return self._buffer(torch.zeros(*shape, dtype=dtype, device=device), True)

    def _buffer(self, t: torch.Tensor, zero: bool) -> torch.Tensor:
        self.buffers.append(t)
        self.zeroed.append(zero)
        return t

    def launch(self, src: RenderedKernel, call: KernelCall) -> None:
        jit_launch(src, call)
        self.launches.append((src, call))

    def replay(self, tensors: Sequence[torch.Tensor], results: Sequence[torch.Tensor]) -> Replay | None:
        """The replay of this run for calls that give ``tensors`` (in this order) and return ``results``; None
        where a replay could not recompute what a launch read: a tensor that is neither a call tensor nor a
        recorded buffer (tile lists classified from data, inputs converted to int32), one call tensor given
        twice (a later call may give two), or a result that is no buffer; None also where nothing was allocated."""
        if not self.buffers:  # nothing ran (an empty batch): nothing worth replaying
            return None
        where: dict[int, tuple[bool, int]] = {}
        for i, t in enumerate(tensors):
            if id(t) in where:
                return None
            where[id(t)] = (False, i)
        where.update({id(t): (True, i) for i, t in enumerate(self.buffers)})
        launches = []
        for src, call in self.launches:
            args, slots = list(call.args.values()), []
            for position, a in enumerate(args):
                if isinstance(a, torch.Tensor):
                    if id(a) not in where:
                        return None
                    slots.append((position, *where[id(a)]))
                    args[position] = None
            launches.append(ReplayedLaunch(bound_launch(src, call), tuple(args), tuple(slots)))
        found = [where.get(id(r), (False, 0)) for r in results]
        if not all(is_buffer for is_buffer, _ in found):
            return None
        buffers = tuple((tuple(t.shape), t.dtype, zero) for t, zero in zip(self.buffers, self.zeroed))
        return Replay(self.buffers[0].device, buffers, tuple(launches), tuple(i for _, i in found))


class Replays:
    """The replays of one op's recent call signatures, oldest dropped first beyond ``capacity`` (a decode
    loop whose key length grows makes a new signature every step).

    >>> r = Replays(capacity=1); r.put("a", 1); r.put("b", 2); r.get("a"), r.get("b")
    (None, 2)
    """

    def __init__(self, capacity: int = 64):
        self.capacity = capacity
        self._by_signature: OrderedDict[Hashable, Replay] = OrderedDict()

    def get(self, signature: Hashable) -> Replay | None:
        return self._by_signature.get(signature)

    def put(self, signature: Hashable, replay: Replay) -> None:
        self._by_signature[signature] = replay
        while len(self._by_signature) > self.capacity:
            self._by_signature.popitem(last=False)

    def __len__(self) -> int:
        return len(self._by_signature)

    def clear(self) -> None:
        self._by_signature.clear()


def signature(args: Sequence, kwargs: dict, *context: Hashable) -> tuple | None:
    """What a call's launches depend on besides the tensors' contents: each tensor's shape, strides, dtype,
    device and 16-byte alignment (Triton specialises on it), every other argument's type and value, the
    keyword names, and ``context``. None for a call that is not replayed: one with a tensor that requires
    grad while grad is enabled, or an argument that cannot be hashed.

    >>> q = torch.zeros(1, 2, 3, 4)
    >>> signature((q,), {"x": 1.0}) == signature((torch.ones(1, 2, 3, 4),), {"x": 1.0})
    True
    >>> signature((q,), {"x": 1.0}) == signature((q.mT,), {"x": 1.0})
    False
    """
    grad = torch.is_grad_enabled()
    parts: list = [tuple(kwargs), *context]
    for v in (*args, *kwargs.values()):
        if isinstance(v, torch.Tensor):
            if grad and v.requires_grad:
                return None
            parts.append((v.shape, v.stride(), v.dtype, v.device, v.data_ptr() % 16))
        else:
            parts.append((type(v), v))
    key = tuple(parts)
    try:
        hash(key)
    except TypeError:
        return None
    return key
