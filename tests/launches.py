"""Kernel launches captured instead of run, with the specialisation Triton's launcher would give them,
and compiled for a GPU target on this CPU machine (shared by the codegen and autotune tests).

A call goes through ``Forward.run`` on meta tensors (no memory, no kernel run) with a launcher that
records each ``KernelCall`` as the ``CompileJob`` of its specialisation (einflash.compiler.aot.specialise,
the rule ahead-of-time builds use).
"""

from __future__ import annotations

import torch
from catalogue import load_example

from einflash.backends.target import Target
from einflash.compiler.aot.crosscompile import CompiledKernel, CompileJob, compile_for_target
from einflash.compiler.aot.specialise import specialise
from einflash.compiler.runtime.launch import load_kernel
from einflash.ir.reference import bind_extents, bind_params


def _job(src, call) -> CompileJob:
    return CompileJob.specialised(
        load_kernel(src),
        specialise(call.args, src.signature.constexpr),
        call.num_warps,
        call.num_stages,
        call.max_registers,
    )


def captured(name: str, dims: dict, head_dim: int, schedule_of) -> list[CompileJob]:
    """The launches of one bf16 call of example ``name`` on meta tensors, under the schedule ``schedule_of`` picks."""
    op = getattr(load_example(name), name)
    B, Hq, Hkv, M, N = dims["B"], dims["Hq"], dims["Hkv"], dims["M"], dims["N"]
    meta = {"dtype": torch.bfloat16, "device": "meta"}
    inputs = {
        "q": torch.empty(B, Hq, M, head_dim, **meta),
        "k": torch.empty(B, Hkv, N, head_dim, **meta),
        "v": torch.empty(B, Hkv, N, head_dim, **meta),
    }
    if name == "alibi":
        inputs["slope"] = torch.empty(Hq, dtype=torch.float32, device="meta")
    if name == "document_mask":
        inputs["doc"] = torch.empty(B, N, dtype=torch.int32, device="meta")
    if name == "gla":
        inputs["g"] = torch.empty(B, Hq, M, head_dim, **meta)
    if name == "causal_linear":
        inputs["decay"] = torch.empty(Hq, dtype=torch.float32, device="meta")
    extents = bind_extents(op.forward.rewritten, inputs, {})
    schedule = schedule_of(extents, Hkv)
    calls: list[CompileJob] = []
    op.forward.run(
        inputs,
        bind_params(op.forward.rewritten, {}, extents),
        schedule,
        extents,
        launcher=lambda src, call: calls.append(_job(src, call)),
    )
    return calls


def compile_launch(job: CompileJob, target: Target) -> CompiledKernel:
    return compile_for_target(
        job.fn,
        job.signature,
        job.constexprs,
        target,
        job.num_warps,
        job.num_stages,
        aligned=job.aligned,
        max_registers=job.max_registers,
    )
