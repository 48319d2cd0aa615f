"""Compiling a Triton kernel for a GPU target on any machine, with or without that GPU.

Triton compiles to a cubin without a driver (ptxas and cuobjdump ship in its wheel), so a
CPU-only machine can prove that a configuration compiles for sm_90, fits its shared memory
and does not spill registers.

Where Triton runs in interpreter mode (TRITON_INTERPRET on, as on CPU-only machines), its
own language helpers are interpreter functions that cannot be compiled, in this process, for
good; the kernel is then compiled in a child Python with the interpreter off, which loads it
again from its file (einflash.backends.triton_compile says how). That costs about a second
more per call, and the kernel must be a global of a real file that imports without side
effects, as generated kernels are.
"""

from __future__ import annotations

import base64
import dataclasses
import inspect
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

import triton
from triton.runtime.jit import JITFunction

from ...backends import triton_compile
from ...backends.target import Target
from ...errors import BackendError, OutOfResourcesError
from .specialise import ArgSpec


@dataclass(frozen=True)
class CompiledKernel:
    """What compiling one kernel for one target produced, as far as tuning and checks need it."""

    name: str
    target: str
    num_warps: int
    num_stages: int
    shared_bytes: int  # dynamic shared memory per program
    registers: int  # 32-bit registers per thread
    spill_bytes: int  # local memory per thread: registers that did not fit
    ptx: str = field(repr=False)
    cubin: bytes = field(repr=False)  # the binary, as Triton's launcher loads it
    metadata: dict = field(repr=False)  # Triton's metadata of the binary (its cache entry's JSON)

    @property
    def cubin_bytes(self) -> int:
        return len(self.cubin)

    @property
    def uses_wgmma(self) -> bool:
        """Whether the dots became Hopper's asynchronous warp-group matrix multiplies."""
        return "wgmma.mma_async" in self.ptx


@dataclass(frozen=True)
class CompileJob:
    """One kernel to compile: the ``@triton.jit`` function and the arguments of ``compile_for_target``."""

    fn: Any  # Triton's JITFunction (or its interpreter's), which has no type information
    signature: dict[str, str]
    constexprs: dict[str, object]  # JSON scalars
    num_warps: int
    num_stages: int
    aligned: tuple[str, ...] | None = None
    max_registers: int = 0  # per thread (0: ptxas's own choice)

    @classmethod
    def specialised(
        cls, fn, specs: tuple[ArgSpec, ...], num_warps: int, num_stages: int, max_registers: int = 0
    ) -> CompileJob:
        """The job that compiles ``fn`` for exactly the specialisation ``specs``
        (see einflash.compiler.aot.specialise)."""
        return cls(
            fn,
            {s.name: s.type for s in specs if s.type != "constexpr"},
            {s.name: s.value for s in specs if s.type == "constexpr"},
            num_warps,
            num_stages,
            tuple(s.name for s in specs if s.divisible),
            max_registers,
        )


def _in_child(fns: list, requests: list[dict]) -> list[dict]:
    # JIT and interpreter functions both keep the decorated Python function in .fn
    requests = [{**r, "path": inspect.getsourcefile(fn.fn), "name": fn.fn.__name__} for fn, r in zip(fns, requests)]
    # -P: the script's folder (einflash/backends) must not shadow top-level modules in the child.
    run = subprocess.run(
        [sys.executable, "-P", triton_compile.__file__],
        input=json.dumps(requests),
        capture_output=True,
        text=True,
        env={**os.environ, "TRITON_INTERPRET": "0"},
    )
    if run.returncode:
        names = ", ".join(fn.fn.__name__ for fn in fns)
        raise BackendError(
            f"compiling {names} for {requests[0]['target']} in a child process failed; "
            f"its error output ends:\n{run.stderr[-3000:]}"
        )
    return json.loads(run.stdout)


def compile_for_target(
    fn,
    signature: dict[str, str],
    constexprs: dict[str, object],
    target: Target,
    num_warps: int,
    num_stages: int,
    aligned: tuple[str, ...] | None = None,
    max_registers: int = 0,
) -> CompiledKernel:
    """Compile the ``@triton.jit`` kernel ``fn`` for ``target``; check that it fits the target's shared memory.

    ``signature`` maps each runtime argument to its Triton type (``"*fp16"``, ``"i32"``, ``"fp32"``);
    ``constexprs`` gives the compile-time ones (JSON scalars). ``aligned`` names the arguments that
    Triton's launcher would find divisible by 16 (16-byte aligned pointers, integers that are multiples
    of 16) and specialise on at run time; by default every pointer, as torch allocates them.
    ``max_registers`` caps the registers per thread (Triton's ``maxnreg``; 0: no cap). Raises
    OutOfResourcesError when the kernel needs more shared memory than the target has. Triton caches
    what it compiles, so asking again is quick.

    >>> import importlib.util, pathlib, tempfile
    >>> from einflash.backends import get_target
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "copy_kernel.py"  # Triton reads kernel source from files
    >>> _ = path.write_text('''
    ... import triton, triton.language as tl
    ... @triton.jit
    ... def copy(x, y, n, BLOCK: tl.constexpr):
    ...     i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ...     tl.store(y + i, tl.load(x + i, mask=i < n), mask=i < n)
    ... ''')
    >>> spec = importlib.util.spec_from_file_location("copy_kernel", path)
    >>> mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    >>> k = compile_for_target(mod.copy, {"x": "*fp32", "y": "*fp32", "n": "i32"}, {"BLOCK": 1024},
    ...                        get_target("sm90"), num_warps=4, num_stages=1)
    >>> k.name, k.shared_bytes, k.spill_bytes, k.cubin[1:4]  # an ELF file
    ('copy', 0, 0, b'ELF')
    """
    return compile_all([CompileJob(fn, signature, constexprs, num_warps, num_stages, aligned, max_registers)], target)[
        0
    ]


def compile_all(jobs: list[CompileJob], target: Target) -> list[CompiledKernel]:
    """``compile_for_target`` for several kernels at once: under the interpreter, in one child process."""
    if target.gpu is None:
        raise BackendError(
            f"target {target.name!r} runs kernels in Triton's interpreter and has nothing to "
            f"compile for; cross-compile for a GPU target such as 'sm90' instead"
        )
    requests: list[dict[str, Any]] = []  # compile_kernel's arguments, as JSON for a child process
    for job in jobs:
        missing = [name for name in job.fn.arg_names if name not in job.signature and name not in job.constexprs]
        if missing:
            raise TypeError(
                f"kernel {job.fn.fn.__name__} has arguments {', '.join(missing)} that neither the "
                f"signature nor the constexprs give; add their types or values"
            )
        aligned = job.aligned
        if aligned is None:
            aligned = tuple(name for name, ty in job.signature.items() if ty.startswith("*"))
        requests.append(
            {
                "signature": job.signature,
                "constexprs": job.constexprs,
                "target": list(dataclasses.astuple(target.gpu)),
                "num_warps": job.num_warps,
                "num_stages": job.num_stages,
                "aligned": list(aligned),
                "max_registers": job.max_registers,
            }
        )
    if all(isinstance(job.fn, JITFunction) for job in jobs) and not triton.knobs.runtime.interpret:
        results = [triton_compile.compile_kernel(job.fn, **r) for job, r in zip(jobs, requests)]
    else:
        results = _in_child([job.fn for job in jobs], requests) if jobs else []
    kernels = []
    for job, facts in zip(jobs, results):
        facts["cubin"] = base64.b64decode(facts["cubin"])
        kernel = CompiledKernel(target=target.name, num_warps=job.num_warps, num_stages=job.num_stages, **facts)
        if target.smem_per_block is not None and kernel.shared_bytes > target.smem_per_block:
            config = ", ".join(
                [f"{k}={v}" for k, v in job.constexprs.items()]
                + [f"num_warps={job.num_warps}", f"num_stages={job.num_stages}"]
            )
            raise OutOfResourcesError(
                f"kernel {kernel.name} for {target.name} ({config}) shared memory",
                kernel.shared_bytes,
                target.smem_per_block,
                "Lower the block sizes or num_stages.",
            )
        kernels.append(kernel)
    return kernels
