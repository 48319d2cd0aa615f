"""Writing generated kernels to files, importing them, and launching them on torch tensors."""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass

import torch

from .. import knobs
from ..ir.cascade import Cascade, Layout
from ..jagged import JaggedBatch
from .lower import KernelSource

_MODULES: dict[str, object] = {}


def load_kernel(src: KernelSource):
    """The @triton.jit function of a rendered kernel (written once, imported once per process)."""
    if src.name in _MODULES:
        return getattr(_MODULES[src.name], src.name)
    folder = knobs.kernel_dir()
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = folder / f"{src.name}.py"
    if not path.exists() or path.read_text() != src.text:
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(src.text)
        os.replace(tmp, path)
    spec = importlib.util.spec_from_file_location(f"einflash_kernels.{src.name}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    _MODULES[src.name] = mod
    return getattr(mod, src.name)


@dataclass(frozen=True)
class LaunchConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    splits: int = 1
    pack: bool = False  # GQA groups packed into the rows of one program (decoding)
    reverse_m: bool = False  # query tiles launched last-first
    count_visits: bool = False  # tests: have each program count the key tiles it visits


def launch(c: Cascade, src: KernelSource, inputs: dict[str, torch.Tensor], params: dict[str, float],
           out: torch.Tensor, workspaces: dict[str, torch.Tensor], cfg: LaunchConfig,
           extents: dict[str, int], jagged: JaggedBatch | None = None,
           tile_lists: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor | None:
    """Launch the kernel over a grid of (query tiles, batch·heads[, splits]).

    For a ``jagged`` batch, ``extents`` give the number of sequences as b and the longest
    sequence's lengths as m and n. ``tile_lists`` are the (tiles, counts) of a kernel whose key
    tiles are listed at run time (see einflash.compiler.blocks).

    With ``cfg.count_visits``, return how many key tiles each program visited, int32
    ``[splits, batch·heads, query tiles]`` (batch·kv heads when packed); else None.
    """
    fn = load_kernel(src)
    args = []
    for name in src.tensors:
        x = inputs[name]
        args.append(x)
        args += list(x.stride())
    args.append(out)
    args += list(out.stride())
    for s in (src.row_states + src.acc_states if src.split else src.row_states):
        w = workspaces[s]
        args.append(w)
        args += list(w.stride())
        if src.split:
            args.append(workspaces[f"{s}:present"])
            args += list(workspaces[f"{s}:present"].stride())
    for t in tile_lists or ():
        args.append(t)
        args += list(t.stride())
    args += [params[p] for p in src.params]
    B, H, M, N = extents["b"], extents["h"], extents["m"], extents["n"]
    hkv = next((inputs[t.name].shape[1] for t in c.inputs if t.layout is Layout.KEY and t.name in inputs), H)
    tiles = -(-N // cfg.block_n)
    per_split = -(-tiles // cfg.splits)
    rows, programs = (M * (H // hkv), B * hkv) if cfg.pack else (M, B * H)
    grid = (-(-rows // cfg.block_m), programs, cfg.splits if src.split else 1)
    visits = torch.zeros(grid[::-1], dtype=torch.int32, device=out.device) if cfg.count_visits else None
    offsets = (jagged.cu_q, jagged.cu_k) if jagged is not None else (None, None)
    fn[grid](*args, M, N, H, H // hkv, per_split, visits, *offsets, **dict(src.constexprs),
             BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, NUM_STAGES=cfg.num_stages, SPLIT=src.split, PACK=cfg.pack,
             REVERSE_M=cfg.reverse_m, COUNT_VISITS=cfg.count_visits, JAGGED=jagged is not None,
             num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return visits


def combine(src: KernelSource, ws: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor],
            params: dict[str, float], out: torch.Tensor, rows: dict[str, torch.Tensor], block_m: int,
            extents: dict[str, int], splits: int):
    """Launch the split-KV combine kernel over (query tiles, batch·heads)."""
    fn = load_kernel(src)
    args = []
    for s in src.row_states + src.acc_states:
        for t in (ws[s], ws[f"{s}:present"]):
            args.append(t)
            args += list(t.stride())
    for name in src.tensors:
        args.append(inputs[name])
        args += list(inputs[name].stride())
    args.append(out)
    args += list(out.stride())
    for s in src.row_states:
        args.append(rows[s])
        args += list(rows[s].stride())
    args += [params[p] for p in src.params]
    B, H, M = extents["b"], extents["h"], extents["m"]
    fn[(-(-M // block_m), B * H)](*args, M, H, splits, **dict(src.constexprs), BLOCK_M=block_m)
