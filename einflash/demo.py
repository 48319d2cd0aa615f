"""The demo: declare, explain, compile, run and check every catalogue variant on this machine.

One record per variant: its name, passes as written and after rewriting, the backend
it ran on, the kernel's error against the float64 reference with its tolerance
(DESIGN §7), whether it passed, and the time of one call. Variants that cannot be
lowered yet have ``ok: None`` and the reason.
"""

from __future__ import annotations

import importlib.util
import pathlib
import time

import torch

from .backends import detect
from .errors import LoweringError
from .op import AttentionOp
from .shape import Shape
from .testing import check

QUICK = ("softmax", "causal", "alibi", "sigmoid", "differential", "post_norm_threshold", "linear")


def _shape(mod, on_gpu: bool) -> Shape:
    hq, hkv = getattr(mod, "HEADS", (16, 16) if on_gpu else (2, 1))
    if on_gpu:
        return Shape(2, hq, 2048, 2048, 128, 128, hkv)
    return Shape(1, hq, 64, 64, 32, 32, hkv)


def _time(fn, on_gpu: bool) -> float:
    if on_gpu:
        from triton.testing import do_bench

        return do_bench(fn, warmup=5, rep=20)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def run_variant(mod, op: AttentionOp, device: str, dtype: torch.dtype, backend: str) -> dict:
    on_gpu = device == "cuda"
    x = op.explain()
    rec = {"name": op.name, "passes_as_written": x.passes_as_written, "passes": x.passes, "backend": backend,
           "max_error": None, "tolerance": None, "ok": None, "ms": None, "reason": None}
    if op.forward.error is not None:
        rec["reason"] = str(op.forward.error)
        return rec
    sh = _shape(mod, on_gpu)
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(sh.B, sh.Hq, sh.M, sh.E, device=device, dtype=dtype, generator=g)
    k = torch.randn(sh.B, sh.Hkv, sh.N, sh.E, device=device, dtype=dtype, generator=g)
    v = torch.randn(sh.B, sh.Hkv, sh.N, sh.F, device=device, dtype=dtype, generator=g)
    extra = mod.extra_inputs(sh, device=device, dtype=dtype) if hasattr(mod, "extra_inputs") else {}
    standard = {"q": q, "k": k, "v": v}
    args = tuple(standard[t.name] for t in op.cascade.inputs if t.name in standard)
    try:
        out = op(*args, **extra)
    except LoweringError as e:  # found only when the kernel is generated (a shifted read, ...)
        rec["reason"] = str(e)
        return rec
    except Exception as e:  # a variant that lowers but fails to run is reported, never hidden
        rec.update(ok=False, reason=f"{type(e).__name__}: {e}")
        return rec
    verdict = check(op, out, *args, **extra)
    rec.update(max_error=verdict.max_error, tolerance=verdict.tolerance, ok=verdict.ok,
               ms=_time(lambda: op(*args, **extra), on_gpu))
    return rec


def run_demo(examples: pathlib.Path, quick: bool = False) -> list[dict]:
    """Run every example under ``examples`` (or a few with ``quick``) on this machine's backend."""
    target = detect()
    device = "cpu" if target.is_interpreter else "cuda"
    dtype = torch.float16 if target.is_interpreter else torch.bfloat16
    records = []
    for file in sorted(examples.glob("*.py")):
        if quick and file.stem not in QUICK:
            continue
        spec = importlib.util.spec_from_file_location(f"einflash_example_{file.stem}", file)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        op = getattr(mod, file.stem)
        records.append(run_variant(mod, op, device, dtype, target.name))
    return records
