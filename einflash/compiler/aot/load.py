"""Launching an ahead-of-time directory's binaries: each launch is built by the same functions as a JIT call,
its most specialised fitting binary picked (einflash.compiler.aot.specialise), and run through Triton's own
launcher from the stored cubin and metadata: no tuning, no JIT compilation."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import math
import pathlib
from dataclasses import dataclass

import torch

from ...errors import AOTError, AOTMismatchError, DeviceError
from ..codegen.signature import KernelCall
from ..codegen.source import KernelSource
from ..runtime.forward import DTYPE_NAMES, Forward
from ..schedule import DECODE_MAX_QUERIES
from .manifest import Binary, Entry, Manifest, interface
from .specialise import first_misfit


def _import_kernel(path: pathlib.Path, name: str):
    spec = importlib.util.spec_from_file_location(f"einflash_aot_{name}", path)
    assert spec is not None and spec.loader is not None, path  # a .py file has its loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)


# -- loading and launching --------------------------------------------------------------------------


@dataclass(frozen=True)
class _LauncherSource:
    """What Triton's launcher reads of a kernel's source: argument types in order, constants by position."""

    signature: dict[str, str]
    constants: dict[tuple[int], object]


class StoredKernels:
    """The binaries of an AOT directory, launched for the calls of one Forward (``einflash.load_aot`` makes one)."""

    def __init__(self, directory: pathlib.Path, manifest: Manifest):
        self.directory, self.manifest = pathlib.Path(directory), manifest
        self._loaded: dict[str, object] = {}
        self._checked: set[str] = set()
        self.last: list[tuple[str, str]] = []  # (kernel, lengths) of each binary the last call chose

    def run(
        self, fwd: Forward, inputs: dict[str, torch.Tensor], values: dict[str, float], extents: dict[str, int]
    ) -> torch.Tensor:
        """The output of the call, from the stored binaries of the nearest entry that fits it.

        Raises AOTMismatchError naming what the directory holds when no entry fits.
        """
        first = inputs[fwd.rewritten.inputs[0].name]
        dtype = DTYPE_NAMES.get(first.dtype, str(first.dtype))
        heads = {r: extents[r] for r in ("e", "f") if r in extents}
        candidates = [
            e
            for e in self.manifest.entries
            if e.dtype == dtype and {"e": e.shape.E, "f": e.shape.F}.items() >= heads.items()
        ]
        call = f"{dtype}, B={extents['b']} H={extents['h']} M={extents['m']} N={extents['n']} " + " ".join(
            f"{r.upper()}={v}" for r, v in heads.items()
        )
        if not candidates:
            raise AOTMismatchError(
                f"{self.directory} has no {self.manifest.variant} kernels for {call}: it holds "
                f"{self.manifest.summary()}; build one for this dtype and head dims with "
                f"`einflash aot --shape ... --dtype {dtype}`"
            )
        reasons, self.last = [], []
        for entry in sorted(candidates, key=lambda e: _distance(e, extents)):
            pending: list[tuple[KernelSource, KernelCall]] = []
            out, _ = fwd.run(inputs, values, entry.schedule, extents, launcher=lambda src, c: pending.append((src, c)))  # noqa: B023 -- called before run returns
            try:
                chosen = [(self._binary(src, c), c) for src, c in pending]
            except AOTMismatchError as e:
                reasons.append(f"\n  the entry {entry.label}: {e}")
                continue
            self.last = [(src.name, b.lengths) for (src, _), (b, _) in zip(pending, chosen)]
            self._launch(chosen, out.device)
            return out
        raise AOTMismatchError(
            f"no kernel in {self.directory} fits this {self.manifest.variant} call ({call}):"
            + "".join(reasons)
            + "\nFix the call, or regenerate the directory for it"
        )

    def _binary(self, src: KernelSource, call: KernelCall) -> Binary:
        kernel = self.manifest.kernels.get(src.name)
        if kernel is None:
            raise AOTMismatchError(
                f"kernel {src.name} was not built (the directory has {', '.join(self.manifest.kernels)})"
            )
        if src.name not in self._checked:
            if interface(src) != kernel.interface:
                raise AOTError(
                    f"this einflash generates kernel {src.name} with another calling interface than the "
                    f"one compiled into {self.directory}; regenerate the directory with this einflash"
                )
            self._checked.add(src.name)
        why: dict[str, list[str]] = {}
        for b in sorted(kernel.binaries, key=lambda b: -b.strength):
            misfit: str | None
            if (b.num_warps, b.num_stages, b.max_registers) != (call.num_warps, call.num_stages, call.max_registers):
                misfit = (
                    f"compiled with num_warps={b.num_warps}, num_stages={b.num_stages}, max_registers={b.max_registers}"
                )
            else:
                misfit = first_misfit(b.args, call.args)
            if misfit is None:
                return b
            why.setdefault(misfit, []).append(b.lengths)
        raise AOTMismatchError(
            f"{src.name}: "
            + "; ".join(
                f"{' and '.join(lengths)}-lengths binar{'ies' if len(lengths) > 1 else 'y'}: {misfit}"
                for misfit, lengths in why.items()
            )
        )

    def _launch(self, chosen: list[tuple[Binary, KernelCall]], device: torch.device) -> None:
        if device.type != "cuda":
            raise DeviceError(f"ahead-of-time kernels run on a CUDA GPU; the inputs are on {device}")
        arch = self.manifest.target["arch"]
        major, minor = torch.cuda.get_device_capability(device)
        if major * 10 + minor != arch:
            raise AOTError(
                f"{self.directory} holds binaries for {self.manifest.target['name']} (compute capability "
                f"{arch // 10}.{arch % 10}); this GPU is {major}.{minor}: build for its target instead"
            )
        with torch.cuda.device(device):
            for binary, call in chosen:
                self._kernel(binary)[call.grid](*call.args.values())

    def _kernel(self, binary: Binary):
        """Triton's CompiledKernel of a stored binary, made as Triton's cache makes it (no compilation)."""
        if binary.cubin not in self._loaded:
            from triton.compiler.compiler import CompiledKernel

            meta = json.loads((self.directory / binary.metadata).read_text())
            src = _LauncherSource(
                {a.name: a.type for a in binary.args},
                {(i,): a.value for i, a in enumerate(binary.args) if a.type == "constexpr"},
            )
            files = {pathlib.Path(f).name: str(self.directory / f) for f in (binary.metadata, binary.cubin)}
            self._loaded[binary.cubin] = CompiledKernel(src, files, meta["hash"])
        return self._loaded[binary.cubin]


def _distance(entry: Entry, extents: dict[str, int]) -> tuple:
    """Entries nearest a call first: the same side of the decode threshold, then the nearest lengths."""
    m, n = max(1, extents["m"]), max(1, extents["n"])
    decode = m <= DECODE_MAX_QUERIES
    return (
        (entry.shape.M <= DECODE_MAX_QUERIES) != decode,
        abs(math.log2(m / entry.shape.M)),
        abs(math.log2(n / entry.shape.N)),
    )
