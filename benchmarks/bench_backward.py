"""Forward+backward benchmark on one GPU: einflash beside SDPA (cuDNN, FlashAttention-2) and FlexAttention,
for the training rows of docs/design.md §5, in one process; then the catalogue's gradients in bf16 and fp16 against
the tolerance rule.

    python3 benchmarks/bench_backward.py --out DIR [--quick] [--sweep [N]] [--only perf,kernels,check] [--deadline 500]
                                         [--cases causal,ALiBi] [--variants causal,alibi] [--dtypes bfloat16]
                                         [--host-profile]

Writes DIR/backward.json as it goes (one record per measurement) and prints the table with ratios. TFLOP/s
of a forward+backward count 3.5 × 4·B·H·M·D per visited (query, key) pair (the forward's 4·B·H·M·N·D, the
backward's 2.5×, as /work/shared/bench/peers_gpu.py counts them); masked rows use the exact number of unmasked
pairs, the same for every implementation. ``kernels`` profiles a training step of einflash and of FlexAttention per
row and records each GPU kernel's time (where a step's time goes); ``--host-profile`` adds to each einflash
perf record the functions that took the most host time over ten steps (cProfile, in the process that timed
them). Past the deadline (seconds from the start) nothing new is started and the run ends with what it has.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import datetime
import json
import math
import pathlib
import pstats
import sys
import time
import traceback

import torch
import triton
from triton.testing import do_bench

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import peers  # noqa: E402
from bench_forward import ROWS, example, row_setup  # noqa: E402

import einflash as ef  # noqa: E402
from einflash.backends import detect  # noqa: E402
from einflash.compiler.schedule import BackwardSchedule, default_backward_schedule  # noqa: E402
from einflash.testing import check_gradients, trainable  # noqa: E402

DT = torch.bfloat16
T0 = time.time()
DEADLINE = [500.0]
OUT: list[pathlib.Path] = []
# backward schedules tried with --sweep beside the default (and the default made atomic): launches, stages per
# kernel, register budgets
SWEEP = [
    BackwardSchedule(64, 128, 8, 3, one_launch=False),
    BackwardSchedule(64, 128, 8, 3),
    BackwardSchedule(64, 128, 8, 2, dq_stages=3, max_registers=240, one_launch=False),
    BackwardSchedule(64, 128, 8, 2, dq_stages=3),
    BackwardSchedule(32, 128, 8, 3, one_launch=False),
]


def late() -> bool:
    return time.time() - T0 > DEADLINE[0]


def emit(rows, **kw):
    rows.append(kw)
    print(json.dumps(kw), flush=True)
    if OUT:  # written as it goes, so a run stopped at its limit still leaves its results
        OUT[0].write_text(json.dumps(rows, indent=1))


def _training(fn, grad):
    """One forward+backward of ``fn``."""

    def step():
        fn().backward(grad)

    return step


def _host_profile(step, q, k, v, steps: int = 10) -> list[list]:
    """The functions with the most own host time over ``steps`` training steps: [name, calls, own ms, total ms]."""
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        step()
        q.grad = k.grad = v.grad = None
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    prof.disable()
    stats = pstats.Stats(prof).stats
    top = sorted(stats.items(), key=lambda kv: -kv[1][2])[:15]
    return [
        [f"{f}:{line}({name})"[-90:], calls, own * 1e3 / steps, total * 1e3 / steps]
        for (f, line, name), (_, calls, own, total, _) in top
    ]


def perf(rows, quick: bool, sweep: int, cases: str | None = None, host_profile: bool = False):
    for label, name, dims, params, kind in ROWS[:2] if quick else ROWS:
        if cases and not any(c in label for c in cases.split(",")):
            continue
        if late():
            emit(rows, kind="skipped", case=label, reason="deadline")
            continue
        _perf_row(rows, label, name, dims, params, kind, sweep, host_profile)
        torch.cuda.empty_cache()  # the row's tensors went with its call


def _perf_row(rows, label: str, name: str, dims: tuple, params: dict, kind, sweep: int, host_profile: bool):
    B, H, N, D = dims
    op, q, k, v, extra, flops = row_setup(name, B, H, N, D, params, kind, requires_grad=True)
    grad = torch.randn(B, H, N, D, device="cuda", dtype=DT)
    impls = {"einflash": lambda: op(q, k, v, **extra, **params)}
    if sweep:
        atomic = dataclasses.replace(default_backward_schedule({"e": D, "f": D}, detect()), atomic_dq=True)
        for sch in (SWEEP + [atomic])[:sweep]:
            impls[f"einflash[{sch.describe()}]"] = lambda sch=sch: op(q, k, v, **extra, **params, backward_schedule=sch)
    runnable, failed = peers.row_peers(name, kind, q, k, v, extra, params)
    impls.update(runnable)
    for peer, e in failed.items():
        emit(rows, kind="perf", case=label, impl=peer, error=str(e)[:300])
    for impl, fn in impls.items():
        if late():
            emit(rows, kind="skipped", case=label, impl=impl, reason="deadline")
            continue
        try:
            t0 = time.time()
            step = _training(fn, grad)
            step()
            torch.cuda.synchronize()
            first = time.time() - t0
            total = do_bench(step, warmup=10, rep=50, grad_to_none=[q, k, v])
            fwd = do_bench(fn, warmup=10, rep=50)
            extra_fields = {"host_profile": _host_profile(step, q, k, v)} if host_profile and impl == "einflash" else {}
            emit(
                rows,
                kind="perf",
                case=label,
                impl=impl,
                B=B,
                H=H,
                N=N,
                D=D,
                fwd_bwd_ms=total,
                fwd_ms=fwd,
                tflops=3.5 * flops / total / 1e9,
                bwd_tflops=2.5 * flops / max(total - fwd, 1e-6) / 1e9,
                first_call_s=first,
                **extra_fields,
            )
        except Exception as e:  # noqa: BLE001
            emit(
                rows,
                kind="perf",
                case=label,
                impl=impl,
                error=f"{type(e).__name__}: {str(e)[:300]}",
                trace=traceback.format_exc()[-800:],
            )
        q.grad = k.grad = v.grad = None


def kernels(rows, quick: bool, cases: str | None = None, steps: int = 5):
    """Per row, the GPU time of each kernel a training step runs (µs per step, from torch.profiler), for
    einflash and FlexAttention."""
    for label, name, dims, params, kind in ROWS[:2] if quick else ROWS:
        if (cases and not any(c in label for c in cases.split(","))) or late():
            continue
        _kernels_row(rows, label, name, dims, params, kind, steps)
        torch.cuda.empty_cache()  # the row's tensors went with its call


def _kernels_row(rows, label: str, name: str, dims: tuple, params: dict, kind, steps: int):
    B, H, N, D = dims
    op, q, k, v, extra, _ = row_setup(name, B, H, N, D, params, kind, requires_grad=True)
    grad = torch.randn(B, H, N, D, device="cuda", dtype=DT)
    runnable, _ = peers.row_peers(name, kind, q, k, v, extra, params)
    impls = {
        "einflash": lambda: op(q, k, v, **extra, **params),
        **{p: f for p, f in runnable.items() if p == "flex"},
    }
    for impl, fn in impls.items():
        step = _training(fn, grad)
        step()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                step()
                q.grad = k.grad = v.grad = None
            torch.cuda.synchronize()
        times = {e.key[:90]: e.device_time_total / steps for e in prof.key_averages() if e.device_time_total > 0}
        emit(
            rows,
            kind="kernels",
            case=label,
            impl=impl,
            us_per_step=dict(sorted(times.items(), key=lambda kv: -kv[1])),
        )


def correctness(rows, quick: bool, variants: str | None = None, dtypes: str = "bfloat16,float16"):
    """Every differentiable catalogue variant's gradients, bf16 and fp16, against the rule, per input."""
    names = sorted(p.stem for p in (ROOT / "examples").glob("*.py"))
    if variants:
        names = [n for n in names if n in variants.split(",")]
    B, Hq, Hkv, M, D = (1, 4, 2, 256, 64) if quick else (1, 8, 2, 1024, 64)
    for dt in (getattr(torch, d) for d in dtypes.split(",")):
        for name in names:
            mod, op = example(name)
            if op.backward.error is not None:
                if dt is torch.bfloat16:
                    emit(rows, kind="check", variant=name, ok=None, reason=str(op.backward.error)[:300])
                continue
            if late():
                emit(rows, kind="skipped", variant=name, dtype=str(dt), reason="deadline")
                continue
            hq, hkv = getattr(mod, "HEADS", (Hq, Hkv))
            shape = ef.Shape(B, hq, M, M, D, D, hkv)
            try:
                g = torch.Generator(device="cuda").manual_seed(0)
                given = {
                    "q": torch.randn(B, hq, M, D, device="cuda", dtype=dt, generator=g),
                    "k": torch.randn(B, hkv, M, D, device="cuda", dtype=dt, generator=g),
                    "v": torch.randn(B, hkv, M, D, device="cuda", dtype=dt, generator=g),
                }
                if hasattr(mod, "extra_inputs"):
                    given.update(mod.extra_inputs(shape, device="cuda", dtype=dt))
                # parameters (inputs along no sequence: slopes, decays, gates) kept in fp32, as mixed-precision
                # training keeps them: a sum over every (m, n) pair overflows fp16 (causal_linear's decay)
                seqless = {t.name for t in op.cascade.inputs if not {"m", "n"} & set(t.ranks)}
                given = {
                    t.name: given[t.name].float()
                    if t.name in seqless and given[t.name].is_floating_point()
                    else given[t.name]
                    for t in op.cascade.inputs
                }
                leaves = trainable(op, given)
                t0 = time.time()
                out = op(**leaves)
                d_o = torch.randn(out.shape, device="cuda", dtype=dt, generator=g)
                out.backward(d_o)
                torch.cuda.synchronize()
                seconds = time.time() - t0
                verdicts = check_gradients(op, {n: x.grad for n, x in leaves.items() if x.requires_grad}, d_o, **given)
                emit(
                    rows,
                    kind="check",
                    variant=name,
                    dtype=str(dt).split(".")[1],
                    shape=[B, hq, hkv, M, M, D],
                    ok=all(v.ok for v in verdicts.values()),
                    first_call_s=seconds,
                    inputs={n: v.as_dict() for n, v in verdicts.items()},
                )
            except Exception as e:  # noqa: BLE001
                emit(
                    rows,
                    kind="check",
                    variant=name,
                    dtype=str(dt),
                    ok=False,
                    error=f"{type(e).__name__}: {str(e)[:300]}",
                    trace=traceback.format_exc()[-800:],
                )
            torch.cuda.empty_cache()


def summary(rows):
    by = {}
    for r in rows:
        if r.get("kind") == "perf" and "error" not in r:
            by.setdefault(r["case"], {})[r["impl"]] = r["tflops"]
    print("\nforward+backward TFLOP/s")
    print("case | einflash | best einflash | atomic dQ | cudnn | flash | flex | best/flex | best/cudnn")
    for case, d in by.items():
        mine = {k: v for k, v in d.items() if k.startswith("einflash")}
        best = max(mine.values()) if mine else math.nan
        flex, cudnn = d.get("flex", math.nan), d.get("sdpa-cudnn", math.nan)
        print(
            f"{case} | {d.get('einflash', math.nan):.1f} | {best:.1f} | {d.get('einflash[atomic dq]', math.nan):.1f}"
            f" | {cudnn:.1f} | {d.get('sdpa-flash', math.nan):.1f} | {flex:.1f} | {best / flex:.2f}"
            f" | {best / cudnn:.2f}"
        )
    checks = [r for r in rows if r.get("kind") == "check" and r.get("ok") is not None]
    if checks:
        bad = [f"{r['variant']} {r.get('dtype')}" for r in checks if not r["ok"]]
        print(
            f"\ngradients within the tolerance rule: {len(checks) - len(bad)} of {len(checks)}"
            + (f"; not: {', '.join(bad)}" if bad else "")
        )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument(
        "--sweep",
        nargs="?",
        type=int,
        const=len(SWEEP) + 1,
        default=0,
        help="also time the first N backward schedules of SWEEP and the atomic one (all by default)",
    )
    ap.add_argument("--only", default="perf,check")
    ap.add_argument("--deadline", type=float, default=500.0, help="seconds after which nothing new starts")
    ap.add_argument("--cases", default=None, help="comma-separated substrings of the perf rows to run")
    ap.add_argument("--variants", default=None, help="comma-separated catalogue variants to check")
    ap.add_argument("--dtypes", default="bfloat16,float16")
    ap.add_argument("--host-profile", action="store_true", help="cProfile einflash's training steps per row")
    a = ap.parse_args()
    DEADLINE[0] = a.deadline
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    OUT.append(out / "backward.json")
    rows = []
    emit(
        rows,
        kind="env",
        gpu=torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=triton.__version__,
        date=datetime.date.today().isoformat(),
    )
    steps = a.only.split(",")
    if "perf" in steps:
        perf(rows, a.quick, a.sweep, a.cases, a.host_profile)
    if "kernels" in steps:
        kernels(rows, a.quick, a.cases)
    if "check" in steps:
        correctness(rows, a.quick, a.variants, a.dtypes)
    summary(rows)


if __name__ == "__main__":
    main()
