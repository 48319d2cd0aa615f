"""Ahead-of-time kernels: generate and cross-compile what a deployment will launch; launch it from the binaries.

An AOT directory holds, for one attention variant and one GPU target::

    manifest.json                     what is there (``Manifest``), with versions and launch parameters
    <variant>.py                      the declaration, traced again by the loader (its structural hash must match)
    sources/<kernel>.py               the generated Triton sources
    binaries/<kernel>__<spec>.cubin   one binary per kernel and specialisation ...
    binaries/<kernel>__<spec>.json    ... with Triton's metadata of it, as Triton's own loader reads it

Generation is the JIT path run on meta tensors: ``Forward.run`` renders the kernels with the same
``lower()`` and builds each launch with the same ``forward_call``/``combine_call``, and a launcher
records the launches instead of running them. Each launch is specialised as Triton's JIT would
specialise it (``exact``), and once more for any sequence lengths and parameter values (``any``: the
arguments that change when M, N and the integer parameters change lose their specialisation), and both
are compiled for the target in one child process. The schedule comes from one call, ``schedule_for``.

Loading renders the kernels again (no compilation), checks that their calling interface is the stored
one, builds each launch with the same functions, picks the most specialised binary whose assumptions
the launch's arguments satisfy, and launches it through Triton's launcher (``CompiledKernel`` made
from the stored files, as Triton's cache does): no tuning, no JIT compilation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
import pathlib
import platform
from dataclasses import dataclass

import torch
import triton

from ...errors import AOTError
from ...shape import Shape
from ..codegen.source import KernelSource
from ..runtime.forward import DTYPE_NAMES
from ..schedule import Schedule
from .specialise import ArgSpec

FORMAT, FORMAT_VERSION = "einflash-aot", 1
MANIFEST = "manifest.json"
DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}
GRIDS = {
    "forward": "(ceil(rows / BLOCK_M), programs, splits if SPLIT else 1) where rows, programs = "
    "(M·GROUP, B·Hkv) if PACK else (M, B·H)",
    "combine": "(ceil(M / BLOCK_M), B·H, 1)",
    "key stage": "(1, B·H, splits if SPLIT else 1)",
    "key fold": "(1, B·H, 1)",
    "chunk states": "(blocks of E × blocks of F, B·H, 1)",
}
# the kind of a kernel, by the prefix of its name (the others are forward kernels)
KINDS = {
    "attn_combine__": "combine",
    "attn_fwd_keys__": "key stage",
    "attn_fold_keys__": "key fold",
    "attn_chunk_states__": "chunk states",
    "attn_chunk_states_backwards__": "chunk states",
}


# -- the manifest ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Binary:
    """One compiled specialisation of a kernel.

    ``lengths``: ``exact`` (as the JIT specialises the built shape) or ``any`` (for any sequence lengths
    and parameter values). ``args`` is what the binary assumes of each argument, in kernel order.
    """

    lengths: str
    args: tuple[ArgSpec, ...]
    cubin: str  # path in the directory
    metadata: str  # Triton's metadata JSON, path in the directory
    sha256: str  # of the cubin
    num_warps: int
    num_stages: int
    shared_bytes: int
    registers: int
    spill_bytes: int
    max_registers: int = 0  # the cap it was compiled with (0: none)

    @property
    def strength(self) -> int:
        """How much the binary assumes: preferred when it fits."""
        return sum(a.type == "constexpr" or a.divisible for a in self.args)

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "args": [a.to_json() for a in self.args]}

    @classmethod
    def from_json(cls, d: dict) -> Binary:
        return cls(**{**d, "args": tuple(ArgSpec.from_json(a) for a in d["args"])})


@dataclass(frozen=True)
class Kernel:
    """A generated kernel: its source, calling interface, grid rule and binaries."""

    name: str
    kind: str  # forward, combine, key stage, key fold or chunk states
    source: str  # path in the directory
    source_sha256: str
    interface: dict  # what launches rely on; see ``interface``
    grid: str
    binaries: tuple[Binary, ...]

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "binaries": [b.to_json() for b in self.binaries]}

    @classmethod
    def from_json(cls, d: dict) -> Kernel:
        return cls(**{**d, "binaries": tuple(Binary.from_json(b) for b in d["binaries"])})


@dataclass(frozen=True)
class Entry:
    """One configuration a deployment uses: a shape and dtype, the schedule chosen for it, its launches."""

    shape: Shape
    dtype: str
    inputs: dict[str, str]  # the dtype of every input tensor
    dims: dict[str, int]  # extents of ranks the declaration adds
    params: dict[str, float]  # the parameter values built for (exact binaries assume their specialisation)
    schedule: Schedule
    launches: tuple[str, ...]  # kernel names in launch order
    grids: tuple[tuple[int, int, int], ...]  # the launches' grids at this shape

    @property
    def label(self) -> str:
        s, c = self.shape, self.schedule
        return (
            f"{self.dtype} B={s.B} Hq={s.Hq} Hkv={s.Hkv} M={s.M} N={s.N} E={s.E} F={s.F} "
            f"({'split-KV ×' + str(c.splits) if c.splits > 1 else 'fused'}, {c.block_m}×{c.block_n} tiles)"
        )

    def to_json(self) -> dict:
        return {
            "shape": dataclasses.asdict(self.shape),
            "dtype": self.dtype,
            "inputs": self.inputs,
            "dims": self.dims,
            "params": self.params,
            "schedule": dataclasses.asdict(self.schedule),
            "launches": list(self.launches),
            "grids": [list(g) for g in self.grids],
        }

    @classmethod
    def from_json(cls, d: dict) -> Entry:
        return cls(
            Shape(**d["shape"]),
            d["dtype"],
            dict(d["inputs"]),
            dict(d["dims"]),
            dict(d["params"]),
            Schedule(**d["schedule"]),
            tuple(d["launches"]),
            tuple(tuple(g) for g in d["grids"]),
        )


@dataclass(frozen=True)
class Manifest:
    """What an AOT directory holds: the variant, target and versions it was built for, entries and kernels."""

    variant: str
    key: str  # the cascade's structural hash
    declaration: str  # the declaration file, path in the directory
    target: dict  # name, backend, arch, warp_size
    versions: dict  # einflash, triton, torch, python
    entries: tuple[Entry, ...]
    kernels: dict[str, Kernel]

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "variant": self.variant,
            "key": self.key,
            "declaration": self.declaration,
            "target": self.target,
            "versions": self.versions,
            "entries": [e.to_json() for e in self.entries],
            "kernels": {n: k.to_json() for n, k in self.kernels.items()},
        }

    @classmethod
    def from_json(cls, d: dict) -> Manifest:
        return cls(
            d["variant"],
            d["key"],
            d["declaration"],
            dict(d["target"]),
            dict(d["versions"]),
            tuple(Entry.from_json(e) for e in d["entries"]),
            {n: Kernel.from_json(k) for n, k in d["kernels"].items()},
        )

    def files(self) -> list[str]:
        """Every file the manifest names, relative to its directory."""
        out = [self.declaration]
        for k in self.kernels.values():
            out.append(k.source)
            out += [f for b in k.binaries for f in (b.cubin, b.metadata)]
        return out

    def summary(self) -> str:
        return "; ".join(e.label for e in self.entries) or "no entries"


def versions() -> dict[str, str]:
    """The versions a build depends on (Triton's must match at load: its launcher reads the metadata)."""
    try:
        own = importlib.metadata.version("einflash")
    except importlib.metadata.PackageNotFoundError:
        own = "source tree (not installed)"
    return {
        "einflash": own,
        "triton": triton.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def interface(src: KernelSource) -> dict:
    """What launching a kernel relies on besides its code: argument names and order, and what fills them."""
    return {
        "arguments": list(src.signature.names),
        "constexpr_args": list(src.signature.constexpr),
        "tensors": list(src.tensors),
        "params": list(src.params),
        "row_states": list(src.row_states),
        "acc_states": list(src.acc_states),
        "split": src.split,
        "constexprs": [list(c) for c in src.constexprs],
    }


def read_manifest(directory: pathlib.Path) -> Manifest:
    """The manifest of an AOT directory, checked: format, Triton version, every file present and intact.

    Raises AOTError saying what is wrong and what to do.
    """
    path = pathlib.Path(directory) / MANIFEST
    redo = "regenerate the directory with `einflash aot`"
    if not path.is_file():
        raise AOTError(f"{directory} is not an einflash AOT directory: it has no {MANIFEST}; {redo}")
    try:
        raw = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AOTError(f"{path} is corrupt (not JSON: {e}); {redo}") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise AOTError(
            f"{path} is not an einflash AOT manifest (its format is "
            f"{raw.get('format') if isinstance(raw, dict) else type(raw).__name__!r}, expected {FORMAT!r})"
        )
    if raw.get("format_version") != FORMAT_VERSION:
        raise AOTError(
            f"{path} has format version {raw.get('format_version')!r}; this einflash reads version "
            f"{FORMAT_VERSION}; {redo}"
        )
    try:
        manifest = Manifest.from_json(raw)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise AOTError(f"{path} is malformed ({type(e).__name__}: {e}); {redo}") from None
    built = manifest.versions.get("triton")
    if built != triton.__version__:
        raise AOTError(
            f"{directory} was built with Triton {built}, this process has Triton {triton.__version__}, "
            f"whose launcher may read its binaries differently; {redo} under this Triton"
        )
    missing = [f for f in manifest.files() if not (path.parent / f).is_file()]
    if missing:
        raise AOTError(
            f"{directory} lacks files its manifest names: {', '.join(missing[:5])}"
            f"{' ...' if len(missing) > 5 else ''}; {redo}"
        )
    for k in manifest.kernels.values():
        for b in k.binaries:
            if hashlib.sha256((path.parent / b.cubin).read_bytes()).hexdigest() != b.sha256:
                raise AOTError(
                    f"{path.parent / b.cubin} does not match its checksum in the manifest (corrupt or replaced); {redo}"
                )
    return manifest
