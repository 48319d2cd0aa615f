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
import math
import os
import pathlib
import platform
import shutil
from dataclasses import dataclass

import torch
import triton

from ..backends.target import Target
from ..errors import AOTError, AOTMismatchError, BackendError, DeviceError, LoweringError, ShapeError
from ..ir.cascade import Cascade, Layout
from ..ir.reference import bind_extents, bind_params
from ..shape import Shape
from .crosscompile import CompileJob, compile_all
from .forward import DTYPE_NAMES, Forward, Schedule
from .launch import KernelCall
from .lower import KernelSource
from .schedule import DECODE_MAX_QUERIES, default_schedule
from .specialise import ArgSpec, common, first_misfit, specialise

FORMAT, FORMAT_VERSION = "einflash-aot", 1
MANIFEST = "manifest.json"
DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}
GRIDS = {"forward": "(ceil(rows / BLOCK_M), programs, splits if SPLIT else 1) where rows, programs = "
                    "(M·GROUP, B·Hkv) if PACK else (M, B·H)",
         "combine": "(ceil(M / BLOCK_M), B·H, 1)"}


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
    def from_json(cls, d: dict) -> "Binary":
        return cls(**{**d, "args": tuple(ArgSpec.from_json(a) for a in d["args"])})


@dataclass(frozen=True)
class Kernel:
    """A generated kernel: its source, calling interface, grid rule and binaries."""

    name: str
    kind: str  # forward or combine
    source: str  # path in the directory
    source_sha256: str
    interface: dict  # what launches rely on; see ``interface``
    grid: str
    binaries: tuple[Binary, ...]

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "binaries": [b.to_json() for b in self.binaries]}

    @classmethod
    def from_json(cls, d: dict) -> "Kernel":
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
        return (f"{self.dtype} B={s.B} Hq={s.Hq} Hkv={s.Hkv} M={s.M} N={s.N} E={s.E} F={s.F} "
                f"({'split-KV ×' + str(c.splits) if c.splits > 1 else 'fused'}, {c.block_m}×{c.block_n} tiles)")

    def to_json(self) -> dict:
        return {"shape": dataclasses.asdict(self.shape), "dtype": self.dtype, "inputs": self.inputs,
                "dims": self.dims, "params": self.params, "schedule": dataclasses.asdict(self.schedule),
                "launches": list(self.launches),
                "grids": [list(g) for g in self.grids]}

    @classmethod
    def from_json(cls, d: dict) -> "Entry":
        return cls(Shape(**d["shape"]), d["dtype"], dict(d["inputs"]), dict(d["dims"]), dict(d["params"]),
                   Schedule(**d["schedule"]),
                   tuple(d["launches"]), tuple(tuple(g) for g in d["grids"]))


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
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "variant": self.variant, "key": self.key,
                "declaration": self.declaration, "target": self.target, "versions": self.versions,
                "entries": [e.to_json() for e in self.entries],
                "kernels": {n: k.to_json() for n, k in self.kernels.items()}}

    @classmethod
    def from_json(cls, d: dict) -> "Manifest":
        return cls(d["variant"], d["key"], d["declaration"], dict(d["target"]), dict(d["versions"]),
                   tuple(Entry.from_json(e) for e in d["entries"]),
                   {n: Kernel.from_json(k) for n, k in d["kernels"].items()})

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
    return {"einflash": own, "triton": triton.__version__, "torch": torch.__version__,
            "python": platform.python_version()}


def interface(src: KernelSource) -> dict:
    """What launching a kernel relies on besides its code: argument names and order, and what fills them."""
    return {"arguments": list(src.arguments), "constexpr_args": list(src.constexpr_args),
            "tensors": list(src.tensors), "params": list(src.params), "row_states": list(src.row_states),
            "acc_states": list(src.acc_states), "split": src.split, "constexprs": [list(c) for c in src.constexprs]}


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
        raise AOTError(f"{path} is not an einflash AOT manifest (its format is "
                       f"{raw.get('format') if isinstance(raw, dict) else type(raw).__name__!r}, expected {FORMAT!r})")
    if raw.get("format_version") != FORMAT_VERSION:
        raise AOTError(f"{path} has format version {raw.get('format_version')!r}; this einflash reads version "
                       f"{FORMAT_VERSION}; {redo}")
    try:
        manifest = Manifest.from_json(raw)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise AOTError(f"{path} is malformed ({type(e).__name__}: {e}); {redo}") from None
    built = manifest.versions.get("triton")
    if built != triton.__version__:
        raise AOTError(f"{directory} was built with Triton {built}, this process has Triton {triton.__version__}, "
                       f"whose launcher may read its binaries differently; {redo} under this Triton")
    missing = [f for f in manifest.files() if not (path.parent / f).is_file()]
    if missing:
        raise AOTError(f"{directory} lacks files its manifest names: {', '.join(missing[:5])}"
                       f"{' ...' if len(missing) > 5 else ''}; {redo}")
    for k in manifest.kernels.values():
        for b in k.binaries:
            if hashlib.sha256((path.parent / b.cubin).read_bytes()).hexdigest() != b.sha256:
                raise AOTError(f"{path.parent / b.cubin} does not match its checksum in the manifest (corrupt or "
                               f"replaced); {redo}")
    return manifest


# -- generation -----------------------------------------------------------------------------------


def declared_inputs(c: Cascade, shape: Shape, dtype: torch.dtype, dims: dict[str, int] | None = None,
                    dtypes: dict[str, torch.dtype] | None = None, device: str = "meta") -> dict[str, torch.Tensor]:
    """An empty tensor for every input the cascade declares, at ``shape``.

    Ranks other than b, h, m, n, e, f take their extents from ``dims``. Inputs laid out like the query
    or the keys are ``dtype`` unless ``dtypes`` says otherwise; other (declared-layout) inputs float32.

    >>> import einflash as ef
    >>> @ef.attention
    ... def plain(q, k, v):
    ...     return ef.softmax(q @ k * ef.scale, "n") @ v
    >>> x = declared_inputs(plain.cascade, Shape(2, 8, 16, 32, 64, Hkv=2), torch.float16)
    >>> x["q"].shape, x["k"].shape, x["v"].dtype, x["v"].device
    (torch.Size([2, 8, 16, 64]), torch.Size([2, 2, 32, 64]), torch.float16, device(type='meta'))
    """
    extent = {"b": shape.B, "m": shape.M, "n": shape.N, "e": shape.E, "f": shape.F, **(dims or {})}
    out = {}
    for t in c.inputs:
        sizes = []
        for r in t.ranks:
            if r == "h":
                sizes.append(shape.Hkv if t.layout is Layout.KEY else shape.Hq)
            elif r in extent:
                sizes.append(extent[r])
            else:
                raise ShapeError(f"input {t.name} has rank {r!r}, whose extent the shape does not give; "
                                 f"give it (--dim {r}=EXTENT on the command line)")
        default = dtype if t.layout in (Layout.QUERY, Layout.KEY) else torch.float32
        out[t.name] = torch.empty(sizes, dtype=(dtypes or {}).get(t.name, default), device=device)
    return out


def record(fwd: Forward, inputs: dict[str, torch.Tensor], values: dict[str, float], schedule: Schedule,
           extents: dict[str, int]) -> list[tuple[KernelSource, KernelCall]]:
    """The kernel launches one call would make, in order, without running any (inputs may be meta tensors)."""
    launches: list[tuple[KernelSource, KernelCall]] = []
    fwd.run(inputs, values, schedule, extents, launcher=lambda src, call: launches.append((src, call)))
    return launches


def _bound(fwd: Forward, c: Cascade, shape: Shape, dtype: str, given: dict, dims, input_dtypes):
    inputs = declared_inputs(c, shape, DTYPES[dtype], dims, input_dtypes)
    extents = bind_extents(fwd.streamed, inputs, given)
    return inputs, extents, bind_params(fwd.streamed, given, extents)


def _probes(c: Cascade, shape: Shape, values: dict[str, float], schedule: Schedule):
    """Shapes and parameters at which every argument that depends on M, N or an integer parameter changes
    its specialisation: M + 1 flips the divisibility of anything linear in M (and an integer parameter + 1
    of itself); N + BLOCK_N·splits + 1 that of anything linear in N and of the key tiles per split."""
    yield dataclasses.replace(shape, M=shape.M + 1), {p.name: values[p.name] + 1 for p in c.params if p.integer}
    yield dataclasses.replace(shape, N=shape.N + schedule.block_n * schedule.splits + 1), {}


def _import_kernel(path: pathlib.Path, name: str):
    spec = importlib.util.spec_from_file_location(f"einflash_aot_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)


def _prepare(out: pathlib.Path) -> None:
    """Make ``out`` ready to receive a build: new, empty, or an earlier build (whose files are removed)."""
    if out.exists() and not out.is_dir():
        raise AOTError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MANIFEST).is_file():
            raise AOTError(f"{out} is not empty and holds no {MANIFEST}: refusing to write an AOT build into it; "
                           f"name a new or empty directory")
        try:
            old = Manifest.from_json(json.loads((out / MANIFEST).read_text()))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise AOTError(f"{out / MANIFEST} is unreadable ({e}); remove the directory by hand and build again") \
                from None
        for f in old.files() + [MANIFEST]:
            (out / f).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def build(fwd: Forward, cascade: Cascade, declaration: pathlib.Path, shapes: list[Shape], dtypes: list[str],
          target: Target, out: pathlib.Path, *, params: dict[str, float] | None = None,
          dims: dict[str, int] | None = None, input_dtypes: dict[str, torch.dtype] | None = None,
          schedule_for=default_schedule) -> Manifest:
    """Generate, compile for ``target`` and store the kernels of ``cascade`` at each shape and dtype.

    ``declaration`` is the file declaring the variant (copied into ``out``); ``params`` the values of
    parameters without defaults; ``dims`` extents of ranks the declaration adds; ``input_dtypes`` dtypes
    of extra inputs. ``schedule_for(extents, target, kv_heads, masked)`` picks each schedule (the heuristic
    default; a tuned cache can stand in). ``out`` must be new, empty, or an earlier AOT build (replaced).
    """
    if target.gpu is None:
        raise BackendError(f"target {target.name!r} runs kernels in Triton's interpreter: there is nothing to "
                           f"compile ahead of time; name a GPU target such as 'sm90'")
    if fwd.error is not None:
        raise fwd.error
    given = dict(params or {})
    entries, sources = [], {}
    wanted: dict[str, dict[tuple, str]] = {}  # kernel -> (specialisation, warps, stages, registers) -> lengths label
    for dtype in dtypes:
        if dtype not in DTYPES:
            raise ShapeError(f"an AOT dtype is one of {', '.join(DTYPES)}, got {dtype!r}")
        for shape in shapes:
            if shape.B * shape.M * shape.N == 0:
                raise ShapeError(f"an AOT shape needs B, M and N of at least 1, got {shape}")
            inputs, extents, values = _bound(fwd, cascade, shape, dtype, given, dims, input_dtypes)
            schedule = schedule_for(extents, target, shape.Hkv, fwd.masked)  # the one place a schedule is chosen
            launches = record(fwd, inputs, values, schedule, extents)
            probes = []
            for probe, bumped in _probes(cascade, shape, values, schedule):
                p_inputs, p_extents, p_values = _bound(fwd, cascade, probe, dtype, given, dims, input_dtypes)
                probes.append(record(fwd, p_inputs, {**p_values, **bumped}, schedule, p_extents))
            for i, (src, call) in enumerate(launches):
                exact = specialise(call.args, src.constexpr_args)
                loose = common(exact, *(specialise(p[i][1].args, src.constexpr_args) for p in probes))
                sources[src.name] = src
                for spec, label in ((exact, "exact"), (loose, "any")):
                    options = (call.num_warps, call.num_stages, call.max_registers)
                    wanted.setdefault(src.name, {}).setdefault((spec, *options), label)
            entries.append(Entry(shape, dtype, {n: str(t.dtype).removeprefix("torch.") for n, t in inputs.items()},
                                 dict(dims or {}), values, schedule, tuple(src.name for src, _ in launches),
                                 tuple(call.grid for _, call in launches)))
    out = pathlib.Path(out)
    _prepare(out)
    (out / "sources").mkdir(exist_ok=True)
    (out / "binaries").mkdir(exist_ok=True)
    jobs, owners = [], []
    for name, src in sources.items():
        path = out / "sources" / f"{name}.py"
        path.write_text(src.text)
        fn = _import_kernel(path, name)
        if list(fn.arg_names) != list(src.arguments):
            raise LoweringError(f"internal: kernel {name} declares {fn.arg_names}, its launches fill "
                                f"{list(src.arguments)}")
        for spec, *options in wanted[name]:
            jobs.append(CompileJob.specialised(fn, spec, *options))
            owners.append((name, spec, wanted[name][spec, *options]))
    binaries: dict[str, list[Binary]] = {}
    for (name, spec, label), job, kernel in zip(owners, jobs, compile_all(jobs, target)):
        stem = f"binaries/{name}__{len(binaries.get(name, ()))}"
        (out / f"{stem}.cubin").write_bytes(kernel.cubin)
        (out / f"{stem}.json").write_text(json.dumps(kernel.metadata, indent=1))
        binaries.setdefault(name, []).append(Binary(label, spec, f"{stem}.cubin", f"{stem}.json",
                                                    hashlib.sha256(kernel.cubin).hexdigest(), job.num_warps,
                                                    job.num_stages, kernel.shared_bytes, kernel.registers,
                                                    kernel.spill_bytes, job.max_registers))
    kernels = {}
    for name, src in sources.items():
        kind = "combine" if name.startswith("attn_combine__") else "forward"
        kernels[name] = Kernel(name, kind, f"sources/{name}.py", hashlib.sha256(src.text.encode()).hexdigest(),
                               interface(src), GRIDS[kind], tuple(binaries[name]))
    shutil.copyfile(declaration, out / f"{cascade.name}.py")
    manifest = Manifest(cascade.name, cascade.key, f"{cascade.name}.py",
                        {"name": target.name, **dataclasses.asdict(target.gpu)}, versions(), tuple(entries), kernels)
    tmp = out / f"{MANIFEST}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(manifest.to_json(), indent=1))
    os.replace(tmp, out / MANIFEST)
    return manifest


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

    def run(self, fwd: Forward, inputs: dict[str, torch.Tensor], values: dict[str, float],
            extents: dict[str, int]) -> torch.Tensor:
        """The output of the call, from the stored binaries of the nearest entry that fits it.

        Raises AOTMismatchError naming what the directory holds when no entry fits.
        """
        first = inputs[fwd.streamed.inputs[0].name]
        dtype = DTYPE_NAMES.get(first.dtype, str(first.dtype))
        heads = {r: extents[r] for r in ("e", "f") if r in extents}
        candidates = [e for e in self.manifest.entries
                      if e.dtype == dtype and {"e": e.shape.E, "f": e.shape.F}.items() >= heads.items()]
        call = (f"{dtype}, B={extents['b']} H={extents['h']} M={extents['m']} N={extents['n']} "
                + " ".join(f"{r.upper()}={v}" for r, v in heads.items()))
        if not candidates:
            raise AOTMismatchError(f"{self.directory} has no {self.manifest.variant} kernels for {call}: it holds "
                                   f"{self.manifest.summary()}; build one for this dtype and head dims with "
                                   f"`einflash aot --shape ... --dtype {dtype}`")
        reasons, self.last = [], []
        for entry in sorted(candidates, key=lambda e: _distance(e, extents)):
            pending: list[tuple[KernelSource, KernelCall]] = []
            out, _ = fwd.run(inputs, values, entry.schedule, extents,
                             launcher=lambda src, c: pending.append((src, c)))
            try:
                chosen = [(self._binary(src, c), c) for src, c in pending]
            except AOTMismatchError as e:
                reasons.append(f"\n  the entry {entry.label}: {e}")
                continue
            self.last = [(src.name, b.lengths) for (src, _), (b, _) in zip(pending, chosen)]
            self._launch(chosen, out.device)
            return out
        raise AOTMismatchError(f"no kernel in {self.directory} fits this {self.manifest.variant} call ({call}):"
                               + "".join(reasons) + "\nFix the call, or regenerate the directory for it")

    def _binary(self, src: KernelSource, call: KernelCall) -> Binary:
        kernel = self.manifest.kernels.get(src.name)
        if kernel is None:
            raise AOTMismatchError(f"kernel {src.name} was not built (the directory has "
                                   f"{', '.join(self.manifest.kernels)})")
        if src.name not in self._checked:
            if interface(src) != kernel.interface:
                raise AOTError(f"this einflash generates kernel {src.name} with another calling interface than the "
                               f"one compiled into {self.directory}; regenerate the directory with this einflash")
            self._checked.add(src.name)
        why: dict[str, list[str]] = {}
        for b in sorted(kernel.binaries, key=lambda b: -b.strength):
            if (b.num_warps, b.num_stages, b.max_registers) != (call.num_warps, call.num_stages, call.max_registers):
                misfit = (f"compiled with num_warps={b.num_warps}, num_stages={b.num_stages}, "
                          f"max_registers={b.max_registers}")
            else:
                misfit = first_misfit(b.args, call.args)
            if misfit is None:
                return b
            why.setdefault(misfit, []).append(b.lengths)
        raise AOTMismatchError(f"{src.name}: " + "; ".join(f"{' and '.join(lengths)}-lengths "
                                                           f"binar{'ies' if len(lengths) > 1 else 'y'}: {misfit}"
                                                           for misfit, lengths in why.items()))

    def _launch(self, chosen: list[tuple[Binary, KernelCall]], device: torch.device) -> None:
        if device.type != "cuda":
            raise DeviceError(f"ahead-of-time kernels run on a CUDA GPU; the inputs are on {device}")
        arch = self.manifest.target["arch"]
        major, minor = torch.cuda.get_device_capability(device)
        if major * 10 + minor != arch:
            raise AOTError(f"{self.directory} holds binaries for {self.manifest.target['name']} (compute capability "
                           f"{arch // 10}.{arch % 10}); this GPU is {major}.{minor}: build for its target instead")
        with torch.cuda.device(device):
            for binary, call in chosen:
                self._kernel(binary)[call.grid](*call.args.values())

    def _kernel(self, binary: Binary):
        """Triton's CompiledKernel of a stored binary, made as Triton's cache makes it (no compilation)."""
        if binary.cubin not in self._loaded:
            from triton.compiler.compiler import CompiledKernel

            meta = json.loads((self.directory / binary.metadata).read_text())
            src = _LauncherSource({a.name: a.type for a in binary.args},
                                  {(i,): a.value for i, a in enumerate(binary.args) if a.type == "constexpr"})
            files = {pathlib.Path(f).name: str(self.directory / f) for f in (binary.metadata, binary.cubin)}
            self._loaded[binary.cubin] = CompiledKernel(src, files, meta["hash"])
        return self._loaded[binary.cubin]


def _distance(entry: Entry, extents: dict[str, int]) -> tuple:
    """Entries nearest a call first: the same side of the decode threshold, then the nearest lengths."""
    m, n = max(1, extents["m"]), max(1, extents["n"])
    decode = m <= DECODE_MAX_QUERIES
    return ((entry.shape.M <= DECODE_MAX_QUERIES) != decode, abs(math.log2(m / entry.shape.M)),
            abs(math.log2(n / entry.shape.N)))
