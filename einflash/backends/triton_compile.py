"""Compile Triton kernels for a GPU target and report what the compiler made of them.

This file imports nothing from einflash (nor torch) so that it also runs as a script in a
child process. That is how a process whose Triton is in interpreter mode cross-compiles:
Triton decides when ``triton.language`` is imported whether its own helpers (``tl.zeros``,
``tl.cdiv``, ...) are JIT or interpreter functions, and only JIT functions compile. The
child gets ``TRITON_INTERPRET=0``, loads the kernel from its file, and answers in JSON.

Script protocol: stdin holds a JSON list of requests, each the keyword arguments of
``compile_kernel`` with ``fn`` replaced by ``path`` and ``name`` (the kernel's file and its
global name there); stdout gets the JSON list of results.

Triton 3.6 calls used: ``triton.compile(ASTSource(fn, signature, constexprs, attrs),
target=GPUTarget(backend, arch, warp_size), options={"num_warps", "num_stages", "maxnreg"})``; the
result's ``metadata.shared``, ``asm["ptx"]``, ``asm["cubin"]``, ``name``, and ``metadata_group``
(the files of Triton's cache entry, whose ``.json`` is the metadata Triton's loader reads); and the
wheel's cuobjdump (``triton.knobs.nvidia.cuobjdump.path``) for registers and spills. The cubin
travels base64-encoded.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# Triton marks an argument "divisible by 16" with this attribute. Loads through pointers not so
# marked cannot use vector or asynchronous copies, so they are not pipelined (num_stages does nothing).
_DIVISIBLE = [["tt.divisibility", 16]]


def resource_usage(cubin: bytes, kernel: str) -> tuple[int, int]:
    """(registers per thread, local-memory bytes per thread) of ``kernel`` in ``cubin``, read by cuobjdump.

    Local memory is the stack frame (where ptxas spills registers: Triton kernels have no other use for
    it) plus any LOCAL allocation.
    """
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        report = subprocess.run(
            [triton.knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    usage = re.search(rf"Function {re.escape(kernel)}:\s*REG:(\d+)\s+STACK:(\d+)\s.*?LOCAL:(\d+)", report, re.S)
    return int(usage[1]), int(usage[2]) + int(usage[3])


def compile_kernel(
    fn,
    signature: dict[str, str],
    constexprs: dict,
    target: list,
    num_warps: int,
    num_stages: int,
    aligned: list[str],
    max_registers: int = 0,
) -> dict:
    """Compile the JIT function ``fn`` for ``target`` (GPUTarget's fields) and report name, shared memory,
    registers, spills, PTX, the cubin (base64) and Triton's metadata. ``signature`` must type every
    argument not in ``constexprs``; ``aligned`` names the arguments to treat as divisible by 16;
    ``max_registers`` (when not 0) is Triton's ``maxnreg``."""
    full = {name: "constexpr" if name in constexprs else signature[name] for name in fn.arg_names}
    attrs = {(fn.arg_names.index(name),): _DIVISIBLE for name in aligned}
    compiled = triton.compile(
        ASTSource(fn, full, constexprs, attrs),
        target=GPUTarget(*target),
        options={
            "num_warps": num_warps,
            "num_stages": num_stages,
            **({"maxnreg": max_registers} if max_registers else {}),
        },
    )
    registers, spills = resource_usage(compiled.asm["cubin"], compiled.name)
    metadata = next(path for file, path in compiled.metadata_group.items() if file.endswith(".json"))
    with open(metadata) as f:
        metadata = json.load(f)
    return {
        "name": compiled.name,
        "shared_bytes": compiled.metadata.shared,
        "registers": registers,
        "spill_bytes": spills,
        "ptx": compiled.asm["ptx"],
        "cubin": base64.b64encode(compiled.asm["cubin"]).decode(),
        "metadata": metadata,
    }


def _load(path: str, name: str):
    spec = importlib.util.spec_from_file_location(f"einflash_crosscompiled_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)


def main() -> None:
    requests = json.load(sys.stdin)
    results = [compile_kernel(_load(r.pop("path"), r.pop("name")), **r) for r in requests]
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
