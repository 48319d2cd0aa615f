"""Compiling a Triton kernel for a GPU target on any machine, with or without that GPU.

Triton compiles to a cubin without a driver (ptxas and cuobjdump ship in its wheel), so a
CPU-only machine can prove that a configuration compiles for sm_90, fits its shared memory
and does not spill registers. The Triton 3.6 calls used:
``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget(...), options={...})``.

Under ``TRITON_INTERPRET=1`` ``@triton.jit`` makes interpreter wrappers instead of JIT
functions; ``compile_for_target`` rebuilds JIT functions from them (see ``_jit_function``).
"""

from __future__ import annotations

import re
import subprocess
import tempfile
import types
from dataclasses import dataclass, field

import triton
from triton.compiler import ASTSource
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

from ..backends.target import Target
from ..errors import OutOfResourcesError

# Triton marks an argument "divisible by 16" with this attribute; pointers so marked can be loaded
# with vector and asynchronous copies, without which loads are not pipelined (num_stages does nothing).
_DIVISIBLE = [["tt.divisibility", 16]]


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
    cubin_bytes: int
    ptx: str = field(repr=False)

    @property
    def uses_wgmma(self) -> bool:
        """Whether the dots became Hopper's asynchronous warp-group matrix multiplies."""
        return "wgmma.mma_async" in self.ptx


def _rebuilt(fn: InterpretedFunction, done: dict[int, JITFunction]) -> JITFunction:
    # The interpreter wrapper keeps the plain Python function and the decorator's arguments.
    # A JIT function made from a copy of it whose globals see JIT versions of the helpers it
    # calls compiles like the original module would have without TRITON_INTERPRET.
    if id(fn) in done:
        return done[id(fn)]
    py = fn.fn
    scope = dict(py.__globals__)
    copy = types.FunctionType(py.__code__, scope, py.__name__, py.__defaults__, py.__closure__)
    copy.__qualname__, copy.__module__ = py.__qualname__, py.__module__
    done[id(fn)] = jit = JITFunction(copy, **fn.kwargs)
    for name, value in py.__globals__.items():
        if isinstance(value, InterpretedFunction):
            scope[name] = _rebuilt(value, done)
    return jit


def _jit_function(fn) -> JITFunction:
    """A JIT function for ``fn``, rebuilt when TRITON_INTERPRET made it an interpreter wrapper.

    Helpers a kernel calls are found through its module's globals; a helper reached another way
    (an attribute of an imported module, a closure variable) keeps its interpreter wrapper and
    fails to compile, so generated kernels call their helpers by global name.
    """
    if isinstance(fn, JITFunction):
        return fn
    if isinstance(fn, InterpretedFunction):
        return _rebuilt(fn, {})
    raise TypeError(f"expected a @triton.jit function, got {type(fn).__name__}")


def _resource_usage(cubin: bytes, kernel: str) -> tuple[int, int]:
    """(registers per thread, local bytes per thread) of ``kernel`` in ``cubin``, read by cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        report = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
                                capture_output=True, text=True, check=True).stdout
    usage = re.search(rf"Function {re.escape(kernel)}:\s*REG:(\d+)\s.*?LOCAL:(\d+)", report, re.S)
    return int(usage[1]), int(usage[2])


def compile_for_target(fn, signature: dict[str, str], constexprs: dict[str, object], target: Target,
                       num_warps: int, num_stages: int, aligned: tuple[str, ...] | None = None) -> CompiledKernel:
    """Compile ``fn`` for ``target`` and check that it fits the target's shared memory.

    ``signature`` maps each runtime argument to its Triton type (``"*fp16"``, ``"i32"``, ``"fp32"``);
    ``constexprs`` gives the compile-time ones. ``aligned`` names the arguments Triton's launcher would
    find divisible by 16 (16-byte aligned pointers, integers that are multiples of 16), as it specialises
    them at run time; by default every pointer, as torch allocates. Raises OutOfResourcesError when the
    kernel needs more shared memory than the target has. Compiling takes about a second; Triton caches it.

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
    >>> k.name, k.shared_bytes, k.spill_bytes
    ('copy', 0, 0)
    """
    jit = _jit_function(fn)
    missing = [name for name in jit.arg_names if name not in signature and name not in constexprs]
    if missing:
        raise TypeError(f"kernel {jit.__name__} has arguments {', '.join(missing)} that neither the signature "
                        f"nor the constexprs give; add their types or values")
    full = {name: "constexpr" if name in constexprs else signature[name] for name in jit.arg_names}
    if aligned is None:
        aligned = tuple(name for name, ty in signature.items() if ty.startswith("*"))
    attrs = {(jit.arg_names.index(name), ): _DIVISIBLE for name in aligned}
    with triton.knobs.runtime.scope():
        # Triton's code generator also consults this flag (constexpr functions); compile as on a GPU.
        triton.knobs.runtime.interpret = False
        compiled = triton.compile(ASTSource(jit, full, constexprs, attrs), target=target.gpu_target(),
                                  options={"num_warps": num_warps, "num_stages": num_stages})
    registers, spills = _resource_usage(compiled.asm["cubin"], compiled.name)
    kernel = CompiledKernel(compiled.name, target.name, num_warps, num_stages, compiled.metadata.shared, registers,
                            spills, len(compiled.asm["cubin"]), compiled.asm["ptx"])
    if target.smem_per_block is not None and kernel.shared_bytes > target.smem_per_block:
        config = ", ".join([f"{k}={v}" for k, v in constexprs.items()] + [f"num_stages={num_stages}"])
        raise OutOfResourcesError(f"kernel {kernel.name} for {target.name} ({config}) shared memory",
                                  kernel.shared_bytes, target.smem_per_block,
                                  "Lower the block sizes or num_stages.")
    return kernel
