"""The demo: declare, explain, compile, run and check every catalogue variant on this machine.

One record per variant: its name, passes as written and after rewriting, the backend
it ran on, the kernel's error against the float64 reference with its tolerance
(docs/design.md §7), whether it passed, and the time of one call; then the same for its
gradients (``grad_ok``: every input's gradient within the rule, ``grad_max_error``: the
largest error of any of them). Variants that cannot be lowered yet have ``ok: None``
and the reason; variants without a backward ``grad_ok: None`` and ``grad_reason``.
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
from .testing import check, check_gradients

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
           "max_error": None, "tolerance": None, "ok": None, "ms": None, "reason": None,
           "grad_ok": None, "grad_max_error": None, "grad_reason": None}
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
    given = dict(zip([t.name for t in op.cascade.inputs if t.name in standard], args)) | extra
    rec.update(_gradients(op, given, g))
    return rec


def _gradients(op: AttentionOp, given: dict, generator: torch.Generator) -> dict:
    """The backward of one call (all floating-point inputs), held to the tolerance rule."""
    if op.backward.error is not None:
        return {"grad_reason": str(op.backward.error)}
    leaves = {k: (v.detach().clone().requires_grad_() if v.is_floating_point() else v) for k, v in given.items()}
    try:
        out = op(**leaves)
        d_o = torch.randn(out.shape, device=out.device, dtype=out.dtype, generator=generator)
        out.backward(d_o)
    except Exception as e:  # a backward that fails to run is reported, never hidden
        return {"grad_ok": False, "grad_reason": f"{type(e).__name__}: {e}"}
    verdicts = check_gradients(op, {k: v.grad for k, v in leaves.items() if v.is_floating_point()}, d_o, **given)
    return {"grad_ok": all(v.ok for v in verdicts.values()),
            "grad_max_error": max(v.max_error for v in verdicts.values())}


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
