"""Building an ahead-of-time directory: the JIT path run on meta tensors, its launches recorded, specialised as
Triton's JIT would (``exact``) and for any lengths (``any``), and cross-compiled for the target in one child
process. See einflash.compiler.aot.manifest for the directory's layout."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import shutil

import torch

from ...backends.target import Target
from ...errors import AOTError, BackendError, LoweringError, ShapeError
from ...ir.cascade import Cascade, Layout
from ...ir.reference import bind_extents, bind_params
from ...shape import Shape
from ..codegen.signature import KernelCall
from ..codegen.source import KernelSource
from ..runtime.forward import Forward
from ..schedule import Schedule, default_schedule
from .crosscompile import CompileJob, compile_all
from .load import _import_kernel
from .manifest import DTYPES, GRIDS, KINDS, MANIFEST, Binary, Entry, Kernel, Manifest, interface, versions
from .specialise import common, specialise

# -- generation -----------------------------------------------------------------------------------


def declared_inputs(
    c: Cascade,
    shape: Shape,
    dtype: torch.dtype,
    dims: dict[str, int] | None = None,
    dtypes: dict[str, torch.dtype] | None = None,
    device: str = "meta",
) -> dict[str, torch.Tensor]:
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
                raise ShapeError(
                    f"input {t.name} has rank {r!r}, whose extent the shape does not give; "
                    f"give it (--dim {r}=EXTENT on the command line)"
                )
        default = dtype if t.layout in (Layout.QUERY, Layout.KEY) else torch.float32
        out[t.name] = torch.empty(sizes, dtype=(dtypes or {}).get(t.name, default), device=device)
    return out


def record(
    fwd: Forward, inputs: dict[str, torch.Tensor], values: dict[str, float], schedule: Schedule, extents: dict[str, int]
) -> list[tuple[KernelSource, KernelCall]]:
    """The kernel launches one call would make, in order, without running any (inputs may be meta tensors)."""
    launches: list[tuple[KernelSource, KernelCall]] = []
    fwd.run(inputs, values, schedule, extents, launcher=lambda src, call: launches.append((src, call)))
    return launches


def _bound(fwd: Forward, c: Cascade, shape: Shape, dtype: str, given: dict, dims, input_dtypes):
    inputs = declared_inputs(c, shape, DTYPES[dtype], dims, input_dtypes)
    extents = bind_extents(fwd.rewritten, inputs, given)
    return inputs, extents, bind_params(fwd.rewritten, given, extents)


def _probes(c: Cascade, shape: Shape, values: dict[str, float], schedule: Schedule):
    """Shapes and parameters at which every argument that depends on M, N or an integer parameter changes
    its specialisation: M + 1 flips the divisibility of anything linear in M (and an integer parameter + 1
    of itself); N + BLOCK_N·splits + 1 that of anything linear in N and of the key tiles per split."""
    yield dataclasses.replace(shape, M=shape.M + 1), {p.name: values[p.name] + 1 for p in c.params if p.integer}
    yield dataclasses.replace(shape, N=shape.N + schedule.block_n * schedule.splits + 1), {}


def _prepare(out: pathlib.Path) -> None:
    """Make ``out`` ready to receive a build: new, empty, or an earlier build (whose files are removed)."""
    if out.exists() and not out.is_dir():
        raise AOTError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MANIFEST).is_file():
            raise AOTError(
                f"{out} is not empty and holds no {MANIFEST}: refusing to write an AOT build into it; "
                f"name a new or empty directory"
            )
        try:
            old = Manifest.from_json(json.loads((out / MANIFEST).read_text()))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise AOTError(
                f"{out / MANIFEST} is unreadable ({e}); remove the directory by hand and build again"
            ) from None
        for f in old.files() + [MANIFEST]:
            (out / f).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def build(
    fwd: Forward,
    cascade: Cascade,
    declaration: pathlib.Path,
    shapes: list[Shape],
    dtypes: list[str],
    target: Target,
    out: pathlib.Path,
    *,
    params: dict[str, float] | None = None,
    dims: dict[str, int] | None = None,
    input_dtypes: dict[str, torch.dtype] | None = None,
    schedule_for=default_schedule,
) -> Manifest:
    """Generate, compile for ``target`` and store the kernels of ``cascade`` at each shape and dtype.

    ``declaration`` is the file declaring the variant (copied into ``out``); ``params`` the values of
    parameters without defaults; ``dims`` extents of ranks the declaration adds; ``input_dtypes`` dtypes
    of extra inputs. ``schedule_for(extents, target, kv_heads, masked)`` picks each schedule (the heuristic
    default; a tuned cache can stand in). ``out`` must be new, empty, or an earlier AOT build (replaced).
    """
    if target.gpu is None:
        raise BackendError(
            f"target {target.name!r} runs kernels in Triton's interpreter: there is nothing to "
            f"compile ahead of time; name a GPU target such as 'sm90'"
        )
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
                exact = specialise(call.args, src.signature.constexpr)
                others = [specialise(p[i][1].args, src.signature.constexpr) for p in probes]
                sources[src.name] = src
                # a compile-time constant that other lengths change (MoBA's block count, padded) has no binary for
                # any length: the exact one only
                varies = any(a != b for o in others for a, b in zip(exact, o) if a.name in src.signature.constexpr)
                loose = None if varies else common(exact, *others)
                for spec, label in ((exact, "exact"), (loose, "any")):
                    if spec is None:
                        continue
                    options = (call.num_warps, call.num_stages, call.max_registers)
                    wanted.setdefault(src.name, {}).setdefault((spec, *options), label)
            entries.append(
                Entry(
                    shape,
                    dtype,
                    {n: str(t.dtype).removeprefix("torch.") for n, t in inputs.items()},
                    dict(dims or {}),
                    values,
                    schedule,
                    tuple(src.name for src, _ in launches),
                    tuple(call.grid for _, call in launches),
                )
            )
    out = pathlib.Path(out)
    _prepare(out)
    (out / "sources").mkdir(exist_ok=True)
    (out / "binaries").mkdir(exist_ok=True)
    jobs, owners = [], []
    for name, src in sources.items():
        path = out / "sources" / f"{name}.py"
        path.write_text(src.text)
        fn = _import_kernel(path, name)
        if list(fn.arg_names) != list(src.signature.names):
            raise LoweringError(
                f"internal: kernel {name} declares {fn.arg_names}, its launches fill {list(src.signature.names)}"
            )
        for spec, *settings in wanted[name]:
            jobs.append(CompileJob.specialised(fn, spec, *settings))
            owners.append((name, spec, wanted[name][spec, *settings]))
    binaries: dict[str, list[Binary]] = {}
    for (name, spec, label), job, kernel in zip(owners, jobs, compile_all(jobs, target)):
        stem = f"binaries/{name}__{len(binaries.get(name, ()))}"
        (out / f"{stem}.cubin").write_bytes(kernel.cubin)
        (out / f"{stem}.json").write_text(json.dumps(kernel.metadata, indent=1))
        binaries.setdefault(name, []).append(
            Binary(
                label,
                spec,
                f"{stem}.cubin",
                f"{stem}.json",
                hashlib.sha256(kernel.cubin).hexdigest(),
                job.num_warps,
                job.num_stages,
                kernel.shared_bytes,
                kernel.registers,
                kernel.spill_bytes,
                job.max_registers,
            )
        )
    kernels = {}
    for name, src in sources.items():
        kind = next((k for prefix, k in KINDS.items() if name.startswith(prefix)), "forward")
        kernels[name] = Kernel(
            name,
            kind,
            f"sources/{name}.py",
            hashlib.sha256(src.text.encode()).hexdigest(),
            interface(src),
            GRIDS[kind],
            tuple(binaries[name]),
        )
    shutil.copyfile(declaration, out / f"{cascade.name}.py")
    manifest = Manifest(
        cascade.name,
        cascade.key,
        f"{cascade.name}.py",
        {"name": target.name, **dataclasses.asdict(target.gpu)},
        versions(),
        tuple(entries),
        kernels,
    )
    tmp = out / f"{MANIFEST}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(manifest.to_json(), indent=1))
    os.replace(tmp, out / MANIFEST)
    return manifest
