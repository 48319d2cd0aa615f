"""The demo: declare, explain, compile, run and check every catalogue variant on this machine.

One record per variant: its name, passes as written and after rewriting, the backend
it ran on, the kernel's error against the float64 reference with its tolerance
(docs/design.md §7), whether it passed, and the time of one call; then the same for its
gradients (``grad_ok``: every input's gradient within the rule, ``grad_max_error``: the
largest error of any of them). Variants that cannot be lowered yet have ``ok: None``
and the reason; variants without a backward ``grad_ok: None`` and ``grad_reason``.

Each step of a variant (importing its file, explaining, making inputs, running the kernel,
which generates and compiles it, checking, timing, the backward and its check) is guarded:
a step that raises, out of memory included, ends that variant's row with the reason
(``step: ExceptionType: message``) and the demo goes on with the next. ``status`` says
what the row counts as: ``ok``, ``not lowered`` (no kernel yet; not a failure) or ``failed``
(a step raised, or a result is out of tolerance).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import gc
import importlib.util
import json
import multiprocessing
import os
import pathlib
import sys
import time
from collections.abc import Callable, Iterator

import torch

from .backends import detect
from .errors import DeclarationError, LoweringError
from .op import AttentionOp
from .shape import Shape
from .testing import check, check_gradients, trainable

QUICK = ("softmax", "causal", "alibi", "sigmoid", "differential", "post_norm_threshold", "linear")
OK, NOT_LOWERED, FAILED = "ok", "not lowered", "failed"

Progress = Callable[[str], None]  # told the step a variant is at


def gpu_shape(hq: int, hkv: int) -> Shape:
    """The GPU demo's shape. Its float64 checks fit one 80 GB GPU because the reference executor evaluates
    within a share of the free memory: GLA's m×n×e products (128 GiB at once) a head at a time."""
    return Shape(2, hq, 2048, 2048, 128, 128, hkv)


def _shape(mod, on_gpu: bool) -> Shape:
    hq, hkv = getattr(mod, "HEADS", (16, 16) if on_gpu else (2, 1))
    return gpu_shape(hq, hkv) if on_gpu else Shape(1, hq, 64, 64, 32, 32, hkv)


def _time(fn, on_gpu: bool) -> float:
    if on_gpu:
        from triton.testing import do_bench

        return do_bench(fn, warmup=5, rep=20)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _record(name: str, backend: str) -> dict:
    return {
        "name": name,
        "passes_as_written": None,
        "passes": None,
        "backend": backend,
        "max_error": None,
        "tolerance": None,
        "ok": None,
        "ms": None,
        "reason": None,
        "grad_ok": None,
        "grad_max_error": None,
        "grad_reason": None,
        "status": None,
        "seconds": None,
    }


class _Failed(Exception):
    """A step that raised, as its row's reason."""


def _step(name: str, fn, progress: Progress):
    """``fn()``, or _Failed with the reason ``name: ExceptionType: message``; after running out of memory, the
    memory the failed step held is given back (its traceback gone) so that later variants have it."""
    progress(name)
    try:
        return fn()
    except LoweringError:  # no kernel yet: a row of its own kind, not a failure
        raise
    except Exception as e:  # noqa: BLE001 -- any failure of one variant is its row's reason, never the demo's end
        reason, out_of_memory = f"{name}: {type(e).__name__}: {e}", isinstance(e, torch.OutOfMemoryError)
    if out_of_memory:
        gc.collect()
        torch.cuda.empty_cache()
    raise _Failed(reason)


def load_variant(file: pathlib.Path) -> tuple[object, AttentionOp]:
    """The module of a catalogue file and the attention op named after the file."""
    spec = importlib.util.spec_from_file_location(f"einflash_example_{file.stem}", file)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    op = getattr(mod, file.stem, None)
    if not isinstance(op, AttentionOp):
        raise DeclarationError(f"{file} declares no @einflash.attention function named {file.stem}")
    return mod, op


def run_variant(
    file: pathlib.Path,
    device: str,
    dtype: torch.dtype,
    backend: str,
    shape: Shape | None = None,
    progress: Progress = lambda step: None,
) -> dict:
    """One variant's record (see the module's docstring); ``shape`` overrides the device's demo shape."""
    rec = _record(file.stem, backend)
    start = time.perf_counter()
    try:
        mod, op = _step("import", lambda: load_variant(file), progress)
        _forward(rec, mod, op, device, dtype, shape, progress)
    except LoweringError as e:  # found only when the kernel is generated (a shifted read, ...)
        rec["reason"] = str(e)
    except _Failed as e:
        rec.update(ok=False, reason=str(e))
    rec["status"] = status(rec)
    rec["seconds"] = round(time.perf_counter() - start, 3)
    return rec


def _forward(
    rec: dict, mod, op: AttentionOp, device: str, dtype: torch.dtype, shape: Shape | None, progress: Progress
) -> None:
    x = _step("explain", op.explain, progress)
    rec.update(passes_as_written=x.passes_as_written, passes=x.passes)
    if op.forward.error is not None:
        rec["reason"] = str(op.forward.error)
        return
    on_gpu = device == "cuda"
    sh = shape or _shape(mod, on_gpu)
    args, extra, g = _step("inputs", lambda: _inputs(mod, op, sh, device, dtype), progress)
    out = [_step("run", lambda: op(*args, **extra), progress)]  # dropped by its check: the backward makes its own
    verdict = _step("check", lambda: check(op, out.pop(), *args, **extra), progress)
    rec.update(max_error=verdict.max_error, tolerance=verdict.tolerance, ok=verdict.ok)
    if not verdict.ok:
        rec["reason"] = f"max error {verdict.max_error:.2e} above the tolerance {verdict.tolerance:.2e}"
    rec["ms"] = _step("timing", lambda: _time(lambda: op(*args, **extra), on_gpu), progress)
    given = dict(zip([t.name for t in op.cascade.inputs if t.name in ("q", "k", "v")], args)) | extra
    rec.update(_gradients(op, given, g, progress))


def _inputs(mod, op: AttentionOp, sh: Shape, device: str, dtype: torch.dtype):
    """q, k and v (those the op takes, in order), the file's extra inputs, and the generator they came from."""
    torch.manual_seed(0)  # extra_inputs draws from the global generator: a row does not depend on those before it
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(sh.B, sh.Hq, sh.M, sh.E, device=device, dtype=dtype, generator=g)
    k = torch.randn(sh.B, sh.Hkv, sh.N, sh.E, device=device, dtype=dtype, generator=g)
    v = torch.randn(sh.B, sh.Hkv, sh.N, sh.F, device=device, dtype=dtype, generator=g)
    extra = mod.extra_inputs(sh, device=device, dtype=dtype) if hasattr(mod, "extra_inputs") else {}
    standard = {"q": q, "k": k, "v": v}
    return tuple(standard[t.name] for t in op.cascade.inputs if t.name in standard), extra, g


def _gradients(op: AttentionOp, given: dict, generator: torch.Generator, progress: Progress) -> dict:
    """The backward of one call (all floating-point inputs), held to the tolerance rule."""
    if op.backward.error is not None:
        return {"grad_reason": str(op.backward.error)}
    leaves = trainable(op, given)

    def backward() -> torch.Tensor:
        out = op(**leaves)
        d_o = torch.randn(out.shape, device=out.device, dtype=out.dtype, generator=generator)
        out.backward(d_o)
        return d_o

    try:
        d_o = _step("gradients", backward, progress)
        verdicts = _step(
            "gradient check",
            lambda: check_gradients(op, {k: v.grad for k, v in leaves.items() if v.requires_grad}, d_o, **given),
            progress,
        )
    except LoweringError as e:  # a backward found not lowerable only when its kernels are generated
        return {"grad_reason": str(e)}
    except _Failed as e:
        return {"grad_ok": False, "grad_reason": str(e)}
    worst = max(verdicts.values(), key=lambda v: v.max_error)
    ok = all(v.ok for v in verdicts.values())
    return {
        "grad_ok": ok,
        "grad_max_error": worst.max_error,
        "grad_reason": None if ok else f"max error {worst.max_error:.2e} above the tolerance {worst.tolerance:.2e}",
    }


def status(rec: dict) -> str:
    """``failed`` when a step raised or a result is out of tolerance, else ``not lowered`` when there is no
    kernel, else ``ok`` (a variant without a backward yet included).

    >>> [status({"ok": ok, "grad_ok": grad_ok}) for ok, grad_ok in [(True, None), (None, None), (True, False)]]
    ['ok', 'not lowered', 'failed']
    """
    if rec["ok"] is False or rec["grad_ok"] is False:
        return FAILED
    return NOT_LOWERED if rec["ok"] is None else OK


def variant_files(examples: pathlib.Path, quick: bool = False) -> list[pathlib.Path]:
    return [f for f in sorted(examples.glob("*.py")) if not quick or f.stem in QUICK]


def iter_demo(
    examples: pathlib.Path,
    quick: bool = False,
    shape: Shape | None = None,
    progress: Callable[[int, str, str], None] = lambda i, name, step: None,
    jobs: int = 1,
) -> Iterator[dict]:
    """Each variant's record as it finishes, on this machine's backend; ``progress(i, name, step)`` is told
    every step of the i-th variant. ``jobs`` > 1 runs that many variants at a time, each in a process of its own
    (most of a variant's time on a GPU is Triton compiling its kernels, on one CPU core); progress is then told
    only when a variant is done."""
    target = detect()
    device = "cpu" if target.is_interpreter else "cuda"
    dtype = torch.float16 if target.is_interpreter else torch.bfloat16
    files = variant_files(examples, quick)
    if jobs <= 1:
        for i, file in enumerate(files):
            yield run_variant(
                file, device, dtype, target.name, shape, lambda step, i=i, name=file.stem: progress(i, name, step)
            )
        return
    context = multiprocessing.get_context("spawn")  # CUDA does not survive a fork
    with concurrent.futures.ProcessPoolExecutor(jobs, context, initializer=_share_memory, initargs=(jobs,)) as pool:
        running = {pool.submit(run_variant, file, device, dtype, target.name, shape): file for file in files}
        for future in concurrent.futures.as_completed(running):
            file = running[future]
            try:
                yield future.result()
            except Exception as e:  # noqa: BLE001 -- a worker that died (a crash, not a Python error) is a row too
                rec = _record(file.stem, target.name)
                rec.update(ok=False, reason=f"worker: {type(e).__name__}: {e}", status=FAILED)
                yield rec


def _share_memory(jobs: int) -> None:
    """In a worker of ``jobs``: a reference evaluation takes its share of the device's memory divided among them."""
    from .ir import reference

    reference.BUDGET_SHARE *= jobs


def default_jobs() -> int:
    """Variants run at a time by default: several on a GPU machine (a process each, compiling in parallel,
    a core in four for each), one on the interpreter (the CPU is the device)."""
    if detect().is_interpreter:
        return 1
    return max(1, min(3, (os.cpu_count() or 1) // 4))


def run_demo(examples: pathlib.Path, quick: bool = False, shape: Shape | None = None) -> list[dict]:
    """Run every example under ``examples`` (or a few with ``quick``) on this machine's backend."""
    return list(iter_demo(examples, quick, shape))


# -- the command -------------------------------------------------------------------------------------

HEADER = (
    f"{'variant':22} {'passes':>7} {'backend':12} {'max error':>10} {'tolerance':>10} {'ok':>5} {'ms':>8} "
    f"{'grad error':>10} {'grad ok':>7}"
)


def format_row(r: dict) -> str:
    """One record as a line of the table (the reason, if any, at its end)."""

    def num(x, spec):
        return "" if x is None else format(x, spec)

    passes = "" if r["passes"] is None else f"{r['passes_as_written']}→{r['passes']}"
    why = r["reason"] or (r["grad_reason"] if r["ok"] else None)
    return (
        f"{r['name']:22} {passes:^7} {r['backend']:12} {num(r['max_error'], '.2e'):>10} "
        f"{num(r['tolerance'], '.2e'):>10} {r['ok']!s:>5} {num(r['ms'], '.2f'):>8} "
        f"{num(r['grad_max_error'], '.2e'):>10} {r['grad_ok']!s:>7}" + (f"  ({why})" if why else "")
    )


def summary(records: list[dict]) -> str:
    """What the rows add up to, each count saying what it counts.

    >>> rows = [{"name": "a", "status": "ok", "grad_ok": True}, {"name": "b", "status": "ok", "grad_ok": None},
    ...         {"name": "c", "status": "not lowered"}, {"name": "d", "status": "failed", "reason": "run: E: x"}]
    >>> print(summary(rows))
    2 of 4 variants ok (output and gradients within tolerance; 1 of them has no backward yet),
    1 not lowered (no kernel yet: not a failure), 1 failed (a step raised or a result is out of tolerance: d)
    """
    ok = [r for r in records if r["status"] == OK]
    no_backward = sum(r["grad_ok"] is None for r in ok)
    lowered = sum(r["status"] == NOT_LOWERED for r in records)
    failed = [r["name"] for r in records if r["status"] == FAILED]
    without = f"; {no_backward} of them {'has' if no_backward == 1 else 'have'} no backward yet" if no_backward else ""
    which = f": {', '.join(failed)}" if failed else ""
    return (
        f"{len(ok)} of {len(records)} variants ok (output and gradients within tolerance{without}), "
        f"{lowered} not lowered (no kernel yet: not a failure), "
        f"{len(failed)} failed (a step raised or a result is out of tolerance{which})"
    )


def main(
    examples: pathlib.Path,
    quick: bool = False,
    as_json: bool = False,
    shape: Shape | None = None,
    jobs: int | None = None,
) -> int:
    """The ``einflash demo`` command: the table, a row as each variant finishes (with a progress display on a
    terminal), then the summary; or with ``as_json`` the records as a JSON list, by name. ``jobs``: variants run
    at a time (default ``default_jobs()``). Returns the exit status: 0 when no variant failed (variants not
    lowered are not failures), 1 otherwise."""
    files = variant_files(examples, quick)
    records = []
    with _progress_display(len(files), enabled=not as_json) as progress:
        if not as_json:
            print(HEADER, flush=True)
        for rec in iter_demo(examples, quick, shape, progress, default_jobs() if jobs is None else jobs):
            records.append(rec)
            progress(len(records), rec["name"], rec["status"])
            if not as_json:
                print(format_row(rec), flush=True)
    records.sort(key=lambda r: r["name"])
    print(json.dumps(records, indent=1) if as_json else summary(records))
    return 0 if all(r["status"] != FAILED for r in records) else 1


@contextlib.contextmanager
def _progress_display(total: int, enabled: bool):
    """A rich progress bar on the terminal, told ``(i, name, step)``; where neither stderr nor stdout is a
    terminal (a pipe, a CI log), nothing. Rows printed to stdout meanwhile appear above the bar."""
    stream = next((s for s in (sys.stderr, sys.stdout) if s.isatty()), None) if enabled else None
    if stream is None:
        yield lambda i, name, step: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(file=stream),
        transient=True,
        redirect_stdout=sys.stdout.isatty(),
        redirect_stderr=sys.stderr.isatty(),
    ) as bar:
        task = bar.add_task("", total=total)

        def show(i: int, name: str, step: str) -> None:
            bar.update(task, completed=i, description=f"{name}: {step}")

        yield show
