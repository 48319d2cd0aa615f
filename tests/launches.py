"""Kernel launches captured instead of run, with the signature Triton's launcher would give them, and
compiled for a GPU target on this CPU machine (shared by the codegen and autotune tests).

A call goes through ``Forward.run`` on meta tensors (no memory, no kernel run); each launch's arguments
are specialised as the launcher does (pointers and multiples of 16 aligned, the integer 1 and None constant).
"""

from __future__ import annotations

import dataclasses
from unittest import mock

import torch
from conftest import load_example

from einflash.backends.target import Target
from einflash.compiler import launch as launch_module
from einflash.compiler.crosscompile import CompiledKernel, compile_for_target
from einflash.ir.reference import bind_extents, bind_params

TRITON_TYPES = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.int8: "i8", torch.int32: "i32", torch.int64: "i64"}


@dataclasses.dataclass(frozen=True)
class Launch:
    """One captured kernel launch: the kernel and its arguments, as Triton's launcher would specialise them."""

    fn: object
    signature: dict
    constexprs: dict
    aligned: tuple[str, ...]
    num_warps: int
    num_stages: int


class Recorder:
    """Stands in for a loaded kernel: ``kernel[grid](*args, **kwargs)`` records instead of running."""

    def __init__(self, fn, calls: list):
        self.fn, self.calls = fn, calls

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append(specialise(self.fn, args, kwargs))


def specialise(fn, args, kwargs) -> Launch:
    signature, constexprs, aligned = {}, {}, []
    for name, x in zip(fn.arg_names, args):
        if isinstance(x, torch.Tensor):
            signature[name] = "*" + TRITON_TYPES[x.dtype]
            aligned.append(name)
        elif x is None or (type(x) is int and x == 1):
            constexprs[name] = x
        elif type(x) is int:
            signature[name] = "i32"
            aligned += [name] if x % 16 == 0 else []
        else:
            signature[name] = "fp32"
    options = dict(kwargs)
    num_warps, num_stages = options.pop("num_warps", 4), options.pop("num_stages", 1)
    return Launch(fn, signature, {**constexprs, **options}, tuple(aligned), num_warps, num_stages)


def captured(name: str, dims: dict, head_dim: int, schedule_of) -> list[Launch]:
    """The launches of one bf16 call of example ``name`` on meta tensors, under the schedule ``schedule_of`` picks."""
    op = getattr(load_example(name), name)
    B, Hq, Hkv, M, N = dims["B"], dims["Hq"], dims["Hkv"], dims["M"], dims["N"]
    meta = {"dtype": torch.bfloat16, "device": "meta"}
    inputs = {"q": torch.empty(B, Hq, M, head_dim, **meta), "k": torch.empty(B, Hkv, N, head_dim, **meta),
              "v": torch.empty(B, Hkv, N, head_dim, **meta)}
    if name == "alibi":
        inputs["slope"] = torch.empty(Hq, dtype=torch.float32, device="meta")
    if name == "document_mask":
        inputs["doc"] = torch.empty(B, N, dtype=torch.int32, device="meta")
    extents = bind_extents(op.forward.streamed, inputs, {})
    schedule = schedule_of(extents, Hkv)
    calls: list[Launch] = []
    real = launch_module.load_kernel
    with mock.patch.object(launch_module, "load_kernel", lambda src: Recorder(real(src), calls)):
        op.forward.run(inputs, bind_params(op.forward.streamed, {}, extents), schedule, extents)
    return calls


def compile_launch(launch: Launch, target: Target) -> CompiledKernel:
    return compile_for_target(launch.fn, launch.signature, launch.constexprs, target, launch.num_warps,
                              launch.num_stages, aligned=launch.aligned)
