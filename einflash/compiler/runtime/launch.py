"""Writing generated kernels to files, importing them, and launching them on torch tensors.

A launch is computed once, as a ``KernelCall`` (grid and every argument by name), by
``forward_call`` or ``combine_call``; a *launcher* then runs it. The default launcher goes
through Triton's JIT (``jit_launch``); ahead-of-time kernels run the same calls from stored
binaries (einflash.compiler.aot.load), so both paths build arguments and grids in one place.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
import warnings
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy
import torch

from ... import knobs
from ...errors import OutOfResourcesError
from ...ir.cascade import Cascade, Layout
from ...ir.reference import kv_heads
from ...jagged import JaggedBatch
from ..codegen.signature import KernelCall, param_name, pointer
from ..codegen.source import KernelSource, RenderedKernel, source_digest
from ..schedule import Schedule

_MODULES: dict[str, ModuleType] = {}


def load_kernel(src: RenderedKernel):
    """The @triton.jit function of a rendered kernel (written once, imported once per process)."""
    if src.name in _MODULES:
        return getattr(_MODULES[src.name], src.name)
    folder = knobs.kernel_dir()
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    # the file is named by its text too: einflash versions (or checkouts) that render the same kernel
    # differently, and share the kernel folder, never load each other's source
    path = folder / f"{src.name}__{source_digest(src.text)}.py"
    if not path.exists() or path.read_text() != src.text:
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(src.text)
        os.replace(tmp, path)
    spec = importlib.util.spec_from_file_location(f"einflash_kernels.{src.name}", path)
    assert spec is not None and spec.loader is not None, path  # a .py file has its loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    _MODULES[src.name] = mod
    return getattr(mod, src.name)


Launcher = Callable[[KernelSource, KernelCall], None]

# Triton's defaults, named: the combine kernel is tiny and launched without options.
COMBINE_WARPS, COMBINE_STAGES = 4, 3


# Triton's compiled kernel of each (kernel, warps, stages, specialisation) launched before in this process
_COMPILED: dict[tuple, Any] = {}  # Triton's CompiledKernel, which has no type information
_CONSTEXPRS: dict[str, frozenset] = {}


def specialisation(src: RenderedKernel, args: dict[str, object]) -> tuple:
    """What Triton's JIT specialises a launch on, per argument: tensors by dtype, device and 16-byte alignment,
    integers by being 1, dividing by 16 and fitting 32 bits, floats by type, compile-time constants (and None
    and booleans) by value. Launches with equal specialisations run the same compiled kernel."""
    consts = _CONSTEXPRS.get(src.name)
    if consts is None:
        consts = _CONSTEXPRS[src.name] = frozenset(src.signature.constexpr)
    key = []
    for name, v in args.items():
        kind = type(v)  # tested by type first: most arguments are plain ints (strides, extents)
        if name in consts or v is None or kind is bool:
            key.append(v)
        elif kind is not torch.Tensor and isinstance(v, int):
            key.append((v == 1, v % 16 == 0, -(2**31) <= v < 2**31))
        elif isinstance(v, torch.Tensor):
            key.append((v.dtype, v.device.index, v.data_ptr() % 16 == 0))
        else:
            key.append(kind)
    return tuple(key)


def jit_launch(src: RenderedKernel, call: KernelCall) -> None:
    """Run ``call`` through Triton's JIT (compiling the kernel on first use).

    A launch whose ``specialisation`` was launched before goes straight to the compiled kernel's launcher:
    the JIT's own binding of every argument (70 for a split-KV decode) cost more host time per launch
    than the GPU's time for the whole decode step on an H200.
    """
    key = _compiled_key(src, call)
    compiled = _COMPILED.get(key)
    if compiled is not None:
        compiled[call.grid](*call.args.values())
        return
    try:
        kernel = _quiet(load_kernel(src)[call.grid])(*call.args.values(), **call.options)
        if hasattr(kernel, "result"):  # compiled in the background
            kernel = kernel.result()
    except Exception as e:
        if type(e).__name__ != "OutOfResources":  # Triton's, which the kernel's schedule answers for
            raise
        raise OutOfResourcesError.of(
            f"kernel {src.name} at {call.num_warps} warps and {call.num_stages} stages",
            e,
            "pass a smaller schedule= (fewer stages, smaller tiles), or tune the op (op.tune) for this shape",
        ) from e
    if hasattr(kernel, "packed_metadata"):  # Triton's CompiledKernel; the interpreter has none
        _COMPILED[key] = kernel


def _compiled_key(src: RenderedKernel, call: KernelCall) -> tuple:
    return src.name, call.num_warps, call.num_stages, call.max_registers, specialisation(src, call.args)


def bound_launch(src: RenderedKernel, call: KernelCall) -> Callable[..., object]:
    """A function of positional kernel arguments that launches ``src`` as ``call`` does (its grid, options and
    specialisation), for arguments that specialise as ``call``'s do: the compiled kernel's own launcher once
    ``jit_launch`` has compiled it, else Triton's JIT (the interpreter)."""
    compiled = _COMPILED.get(_compiled_key(src, call))
    if compiled is not None:
        return compiled[call.grid]
    return _quiet(functools.partial(load_kernel(src)[call.grid], **call.options))


def _quiet(launch: Callable[..., object]) -> Callable[..., object]:
    """``launch``, with numpy's warnings off when the interpreter runs it: it computes the lanes a mask leaves out
    too (``exp(−inf − −inf)``, divisions by 0), whose results the kernel never keeps, and converts one-element
    arrays to scalars, which numpy 2.3 deprecates (numpy is held below 2.4, where that is an error, for this).
    Its maximum of a row that is all NaN (a NaN input, which the kernel passes on as NaN) is numpy's nan-aware
    one, which warns. On a GPU the launch as it is."""
    if not knobs.interpreting():
        return launch

    @functools.wraps(launch)
    def quietly(*args, **kwargs):
        with numpy.errstate(all="ignore"), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Conversion of an array with ndim > 0", DeprecationWarning)
            warnings.filterwarnings("ignore", "All-NaN slice encountered", RuntimeWarning)
            return launch(*args, **kwargs)

    return quietly


def forward_call(
    c: Cascade,
    src: KernelSource,
    inputs: dict[str, torch.Tensor],
    params: dict[str, float],
    out: torch.Tensor | None,
    workspaces: dict[str, torch.Tensor],
    schedule: Schedule,
    extents: dict[str, int],
    jagged: JaggedBatch | None = None,
    tile_lists: tuple[torch.Tensor, torch.Tensor] | None = None,
    count_visits: bool = False,
) -> KernelCall:
    """The launch of the forward kernel over a grid of (query tiles, batch·heads[, splits]).

    For a ``jagged`` batch, ``extents`` give the number of sequences as b and the longest
    sequence's lengths as m and n. ``tile_lists`` are the (tiles, counts) of a kernel whose key
    tiles are listed at run time (see einflash.compiler.runtime.tile_lists). With ``count_visits`` (tests)
    the call carries a fresh int32 visit counter as ``visits_ptr``. ``workspaces`` also hold the
    kernel's per-row outputs (``src.row_outputs``: the log-sum-exp), by name.
    """
    args: dict[str, object] = {}
    for name in src.tensors:
        args |= pointer(name, inputs[name])
    if out is not None:
        args |= pointer("out", out)
    for o in src.summaries:
        args |= pointer(f"out_{o}", workspaces[o]) | {f"present_{o}_ptr": workspaces[f"{o}:present"]}
    for o in src.summary_reads:
        args |= {f"present_{o}_ptr": workspaces[f"{o}:present"]}
    for o in src.row_outputs:
        args |= pointer(f"out_{o}", workspaces[o])
    for s in src.stored:
        args |= pointer(f"ws_{s}", workspaces[s])
        if src.split:
            args |= pointer(f"wsp_{s}", workspaces[f"{s}:present"])
    for s in src.saved:
        args |= pointer(f"wsp_{s}", workspaces[f"{s}:present"])
    if tile_lists is not None:
        args |= pointer("tiles", tile_lists[0]) | pointer("counts", tile_lists[1])
    args |= {param_name(p): params[p] for p in src.params} | dict(src.constexprs)
    B, H, M, N = extents["b"], extents["h"], extents["m"], extents["n"]
    hkv = next((inputs[t.name].shape[1] for t in c.inputs if t.layout is Layout.KEY and t.name in inputs), H)
    tiles = -(-N // schedule.block_n)
    rows, programs = (M * (H // hkv), B * hkv) if schedule.pack else (M, B * H)
    # a key stage's program summarises the keys of one (batch, head) for all its rows
    grid = (1 if src.stage == "keys" else -(-rows // schedule.block_m), programs, schedule.splits if src.split else 1)
    args |= dict(
        M=M,
        N=N,
        H=H,
        GROUP=H // hkv,
        TILES_PER_SPLIT=-(-tiles // schedule.splits),
        visits_ptr=torch.zeros(grid[::-1], dtype=torch.int32, device=inputs[src.tensors[0]].device)
        if count_visits
        else None,
        cu_q_ptr=None if jagged is None else jagged.cu_q,
        cu_k_ptr=None if jagged is None else jagged.cu_k,
        BLOCK_M=schedule.block_m,
        BLOCK_N=schedule.block_n,
        NUM_STAGES=schedule.num_stages,
        SPLIT=src.split,
        PACK=schedule.pack,
        REVERSE_M=schedule.reverse_m,
        COUNT_VISITS=count_visits,
        JAGGED=jagged is not None,
    )
    return KernelCall(grid, src.signature.bind(args), schedule.num_warps, schedule.num_stages, schedule.max_registers)


def launch(
    c: Cascade,
    src: KernelSource,
    inputs: dict[str, torch.Tensor],
    params: dict[str, float],
    out: torch.Tensor | None,
    workspaces: dict[str, torch.Tensor],
    schedule: Schedule,
    extents: dict[str, int],
    jagged: JaggedBatch | None = None,
    tile_lists: tuple[torch.Tensor, torch.Tensor] | None = None,
    launcher: Launcher = jit_launch,
    count_visits: bool = False,
) -> torch.Tensor | None:
    """Launch the forward kernel (see ``forward_call``).

    With ``count_visits``, return how many key tiles each program visited, int32
    ``[splits, batch·heads, query tiles]`` (batch·kv heads when packed); else None.
    """
    call = forward_call(c, src, inputs, params, out, workspaces, schedule, extents, jagged, tile_lists, count_visits)
    launcher(src, call)
    visits = call.args["visits_ptr"]
    return visits if isinstance(visits, torch.Tensor) else None


def chunk_states_call(
    c: Cascade,
    src: KernelSource,
    inputs: dict[str, torch.Tensor],
    params: dict[str, float],
    states: dict[str, torch.Tensor],
    extents: dict[str, int],
    chunk: int,
    blocks: tuple[int, int],
    num_warps: int,
) -> KernelCall:
    """The launch of the chunk-state kernel (einflash.compiler.codegen.chunked) over (blocks of the state,
    batch·heads): ``states`` holds ``hs`` (the state before each chunk), ``final`` (after the last) and perhaps
    ``init`` (of keys before the sequence), ``blocks`` how many blocks of the state's rows and columns the programs
    of a head share it in."""
    args: dict[str, object] = {}
    for name in src.tensors:
        args |= pointer(name, inputs[name])
    args |= pointer("hs", states["hs"]) | pointer("final", states["final"])
    init = states.get("init")
    args |= (
        pointer("init", init) if init is not None else {"init_ptr": None} | {f"stride_init_{i}": 0 for i in range(4)}
    )
    args |= {param_name(p): params[p] for p in src.params} | dict(src.constexprs)
    B, H = extents["b"], extents["h"]
    args |= dict(
        M=extents["m"],
        N=extents["n"],
        H=H,
        GROUP=H // kv_heads(c, inputs),
        E_BLOCKS=blocks[0],
        BLOCK_N=chunk,
        HAS_INIT=init is not None,
    )
    return KernelCall((blocks[0] * blocks[1], B * H, 1), src.signature.bind(args), num_warps, COMBINE_STAGES)


def combine_call(
    src: KernelSource,
    ws: dict[str, torch.Tensor],
    inputs: dict[str, torch.Tensor],
    params: dict[str, float],
    out: torch.Tensor | None,
    rows: dict[str, torch.Tensor],
    block_m: int,
    extents: dict[str, int],
    splits: int,
) -> KernelCall:
    """The launch of the split-KV combine kernel over (query tiles, batch·heads); ``rows`` holds the final row
    states and the per-row outputs (``src.row_outputs``), by name."""
    args: dict[str, object] = {}
    for s in src.row_states + src.acc_states:
        args |= pointer(f"w_{s}", ws[s]) | pointer(f"wsp_w_{s}", ws[f"{s}:present"])
    for name in src.tensors:
        args |= pointer(name, inputs[name])
    if out is not None:
        args |= pointer("out", out)
    for o in src.summaries:  # a key stage's fold stores the summaries (into ``rows``)
        args |= pointer(f"out_{o}", rows[o]) | {f"present_{o}_ptr": rows[f"{o}:present"]}
    for o in src.row_outputs:
        args |= pointer(f"out_{o}", rows[o])
    for s in src.row_states:
        args |= pointer(f"ws_{s}", rows[s])
    args |= {param_name(p): params[p] for p in src.params} | dict(src.constexprs)
    B, H, M = extents["b"], extents["h"], extents["m"]
    args |= dict(M=M, H=H, SPLITS=splits, BLOCK_M=block_m)
    grid = (1 if src.stage == "keys" else -(-M // block_m), B * H, 1)
    return KernelCall(grid, src.signature.bind(args), COMBINE_WARPS, COMBINE_STAGES)


def combine(
    src: KernelSource,
    ws: dict[str, torch.Tensor],
    inputs: dict[str, torch.Tensor],
    params: dict[str, float],
    out: torch.Tensor | None,
    rows: dict[str, torch.Tensor],
    block_m: int,
    extents: dict[str, int],
    splits: int,
    launcher: Launcher = jit_launch,
) -> None:
    """Launch the split-KV combine kernel (see ``combine_call``)."""
    launcher(src, combine_call(src, ws, inputs, params, out, rows, block_m, extents, splits))
