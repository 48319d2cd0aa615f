"""Forward benchmark on one GPU: einflash beside SDPA (cuDNN, FlashAttention-2) and FlexAttention,
for every row of docs/design.md §5, in one process; then the catalogue's correctness in bf16 and fp16.

    python3 benchmarks/bench_forward.py --out DIR [--quick] [--skip-check] [--only anchors,prefill,decode,lse,check]

Writes DIR/forward.json (one record per measurement) and prints the table with ratios.
TFLOP/s count 4·B·H·M·D per visited (query, key) pair: masked rows use the exact number of
unmasked pairs, the same for every implementation.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import pathlib
import sys
import time
import traceback

import torch
import triton
from triton.testing import do_bench

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import peers  # noqa: E402

import einflash as ef  # noqa: E402
from einflash.compiler.schedule import Schedule  # noqa: E402
from einflash.testing import check  # noqa: E402

DT = torch.bfloat16
ROWS = [
    # name, example, (B, H, N, D), params, mask kind for pair counting
    ("full (2,16,8192,128)", "softmax", (2, 16, 8192, 128), {}, None),
    ("causal (2,16,8192,128)", "causal", (2, 16, 8192, 128), {}, "causal"),
    ("full (4,32,4096,64)", "softmax", (4, 32, 4096, 64), {}, None),
    ("sliding window 1024 (2,16,8192,128)", "sliding_window", (2, 16, 8192, 128), {"window": 1024}, "window"),
    ("ALiBi (2,16,8192,128)", "alibi", (2, 16, 8192, 128), {}, None),
    ("softcap 30 (2,16,8192,128)", "softcap", (2, 16, 8192, 128), {"cap": 30.0}, None),
]
# fixed schedules timed with --sweep beside the default (the last field: ptxas's register cap, 0 for none)
SWEEP = [
    Schedule(128, 64, 8, 3),
    Schedule(128, 128, 8, 3),
    Schedule(128, 128, 8, 3, max_registers=240),
    Schedule(128, 64, 8, 3, max_registers=240),
    Schedule(64, 64, 4, 3),
    Schedule(64, 128, 4, 3),
]
DECODE = ("decode GQA 32:8 D128 B4 KV32768", "softmax", dict(B=4, Hq=32, Hkv=8, L=32768, D=128))


def example(name: str):
    spec = importlib.util.spec_from_file_location(f"ex_{name}", ROOT / "examples" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod, getattr(mod, name)


def pairs(kind, N, window=1024) -> int:
    if kind is None:
        return N * N
    if kind == "causal":
        return N * (N + 1) // 2
    return sum(min(m + 1, window) for m in range(N))


def bench(fn) -> float:
    return do_bench(fn, warmup=25, rep=100)


OUT: list[pathlib.Path] = []


def emit(rows, **kw):
    rows.append(kw)
    print(json.dumps(kw), flush=True)
    if OUT:  # written as it goes, so a run cut off at its time limit still leaves its results
        OUT[0].write_text(json.dumps(rows, indent=1))


def anchors(rows):
    a = torch.randn(8192, 8192, device="cuda", dtype=DT)
    ms = bench(lambda: a @ a)
    emit(rows, kind="anchor", case="matmul 8192^3 bf16", ms=ms, tflops=2 * 8192**3 / ms / 1e9)
    x = torch.empty(2**30, device="cuda", dtype=torch.uint8)
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x))
    emit(rows, kind="anchor", case="device copy 1 GiB", ms=ms, tbps=2 * 2**30 / ms / 1e9)


def row_setup(name: str, B: int, H: int, N: int, D: int, params: dict, kind, requires_grad: bool = False):
    """A row's op, its q, k, v (random bf16 on the GPU), extra inputs, and the FLOPs of its forward."""
    mod, op = example(name)
    q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=DT).requires_grad_(requires_grad) for _ in range(3))
    extra = {}
    if name == "alibi":
        extra = mod.extra_inputs(ef.Shape(B, H, N, N, D), device="cuda", dtype=torch.float32)
    return op, q, k, v, extra, 4 * B * H * D * pairs(kind, N, params.get("window", 1024))


def prefill(rows, quick: bool, sweep: bool, cases: str | None = None):
    for label, name, dims, params, kind in ROWS[:2] if quick else ROWS:
        if cases and not any(c in label for c in cases.split(",")):
            continue
        _prefill_row(rows, label, name, dims, params, kind, sweep)
        torch.cuda.empty_cache()  # the row's tensors went with its call


def _prefill_row(rows, label: str, name: str, dims: tuple, params: dict, kind, sweep: bool):
    B, H, N, D = dims
    op, q, k, v, extra, flops = row_setup(name, B, H, N, D, params, kind)
    impls = {"einflash": lambda: op(q, k, v, **extra, **params)}
    if sweep:
        for sch in SWEEP:
            impls[f"einflash[{sch.describe()}]"] = lambda sch=sch: op(q, k, v, **extra, **params, schedule=sch)
    runnable, failed = peers.row_peers(name, kind, q, k, v, extra, params)
    impls.update(runnable)
    for peer, e in failed.items():
        emit(rows, kind="prefill", case=label, impl=peer, error=str(e)[:300])
    for impl, fn in impls.items():
        try:
            t0 = time.time()
            fn()
            torch.cuda.synchronize()
            first = time.time() - t0
            ms = bench(fn)
            emit(
                rows,
                kind="prefill",
                case=label,
                impl=impl,
                B=B,
                H=H,
                N=N,
                D=D,
                ms=ms,
                tflops=flops / ms / 1e9,
                first_call_s=first,
            )
        except Exception as e:  # noqa: BLE001
            emit(rows, kind="prefill", case=label, impl=impl, error=f"{type(e).__name__}: {str(e)[:300]}")


def seeded_inputs(mod, shape: ef.Shape, dt: torch.dtype):
    """q, k, v and the example's extra inputs at ``shape``, seeded, on the GPU: what the checks run on."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(shape.B, shape.Hq, shape.M, shape.E, device="cuda", dtype=dt, generator=g)
    k = torch.randn(shape.B, shape.Hkv, shape.N, shape.E, device="cuda", dtype=dt, generator=g)
    v = torch.randn(shape.B, shape.Hkv, shape.N, shape.F, device="cuda", dtype=dt, generator=g)
    extra = mod.extra_inputs(shape, device="cuda", dtype=dt) if hasattr(mod, "extra_inputs") else {}
    return q, k, v, extra


def decode_inputs():
    """The decode row's op and q, k, v (random bf16 on the GPU), and the bytes of K and V it reads."""
    _, name, p = DECODE
    _, op = example(name)
    B, Hq, Hkv, L, D = p["B"], p["Hq"], p["Hkv"], p["L"], p["D"]
    q = torch.randn(B, Hq, 1, D, device="cuda", dtype=DT)
    k = torch.randn(B, Hkv, L, D, device="cuda", dtype=DT)
    v = torch.randn(B, Hkv, L, D, device="cuda", dtype=DT)
    return op, q, k, v, 2 * B * Hkv * L * D * 2


def decode(rows, sweep: bool):
    label = DECODE[0]
    op, q, k, v, kv_bytes = decode_inputs()
    impls = {"einflash": lambda: op(q, k, v)}
    if sweep:
        for bn, splits, w, st in [
            (64, 8, 4, 4),
            (64, 12, 4, 3),
            (64, 9, 8, 3),
            (64, 9, 4, 5),
            (32, 9, 4, 4),
            (128, 9, 8, 3),
            (64, 6, 4, 4),
        ]:
            sch = Schedule(16, bn, w, st, splits, True)
            impls[f"einflash[bn{bn} splits{splits} w{w} s{st}]"] = lambda sch=sch: op(q, k, v, schedule=sch)
    for peer in ("sdpa-cudnn", "sdpa-flash"):
        try:
            impls[peer] = peers.sdpa(peer, q, k, v)
        except Exception as e:  # noqa: BLE001
            emit(rows, kind="decode", case=label, impl=peer, error=str(e)[:200])
    try:
        impls["flex"] = peers.flex(q, k, v)
    except Exception as e:  # noqa: BLE001
        emit(rows, kind="decode", case=label, impl="flex", error=str(e)[:300])
    for impl, fn in impls.items():
        try:
            fn()
            ms = bench(fn)
            # replayed from a CUDA graph, as serving loops run decoding: the GPU's time without the host's
            graph_ms = triton.testing.do_bench_cudagraph(fn, rep=100)
            emit(
                rows,
                kind="decode",
                case=label,
                impl=impl,
                ms=ms,
                tbps=kv_bytes / ms / 1e9,
                graph_ms=graph_ms,
                graph_tbps=kv_bytes / graph_ms / 1e9,
            )
        except Exception as e:  # noqa: BLE001
            emit(rows, kind="decode", case=label, impl=impl, error=f"{type(e).__name__}: {str(e)[:300]}")


def correctness_in_parallel(rows, quick: bool, workers: int):
    """The catalogue check split over ``workers`` processes sharing the GPU: compiling dominates it."""
    import subprocess
    import tempfile

    scratch = pathlib.Path(tempfile.mkdtemp(prefix="einflash_check_"))
    names = sorted(p.stem for p in (ROOT / "examples").glob("*.py"))
    shares = [names[k::workers] for k in range(workers)]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--only",
                "check",
                "--variants",
                ",".join(share),
                "--out",
                str(scratch / f"check{k}"),
            ]
            + (["--quick"] if quick else []),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        for k, share in enumerate(shares)
    ]
    for proc in procs:
        proc.wait()
    for k in range(workers):
        part = scratch / f"check{k}" / "forward.json"
        got = json.loads(part.read_text()) if part.exists() else []
        for r in got:
            if r.get("kind") == "check":
                emit(rows, **r)
        if not got:
            emit(rows, kind="check", variant=",".join(shares[k]), ok=False, error="worker wrote no results")


def correctness(rows, quick: bool, variants: str | None = None):
    """Every lowered catalogue variant, bf16 and fp16, prefill and GQA decode, against the rule."""
    names = sorted(p.stem for p in (ROOT / "examples").glob("*.py"))
    if variants:
        names = [n for n in names if n in variants.split(",")]
    cases = [("prefill", 1, 8, 8, 4096, 4096, 128), ("decode", 2, 32, 8, 1, 32768, 128)]
    # the float64 reference materialises GLA's M×N×E decay: 137 GB at 4096², 8.6 GB at 1024²
    broadcast = [("prefill", 1, 8, 8, 1024, 1024, 128)]
    if quick:
        cases = [("prefill", 1, 4, 4, 1024, 1024, 64), ("decode", 2, 8, 2, 1, 4096, 64)]
    for name in names:
        mod, op = example(name)
        if op.forward.error is not None:
            emit(rows, kind="check", variant=name, ok=None, reason=str(op.forward.error))
            continue
        for case, B, Hq, Hkv, M, N, D in broadcast if op.forward.broadcast and not quick else cases:
            hq, hkv = getattr(mod, "HEADS", (Hq, Hkv))
            if name == "gla" and M != N:
                continue
            shape = ef.Shape(B, hq, M, N, D, D, hkv)
            for dt in (torch.bfloat16, torch.float16):
                try:
                    q, k, v, extra = seeded_inputs(mod, shape, dt)
                    args = (q, k) if name == "mla_decode" else (q, k, v)
                    out = op(*args, **extra)
                    verdict = check(op, out, *args, **extra)
                    emit(
                        rows,
                        kind="check",
                        variant=name,
                        case=case,
                        dtype=str(dt).split(".")[1],
                        shape=[B, hq, hkv, M, N, D],
                        **verdict.as_dict(),
                    )
                except Exception as e:  # noqa: BLE001
                    emit(
                        rows,
                        kind="check",
                        variant=name,
                        case=case,
                        dtype=str(dt),
                        ok=False,
                        error=f"{type(e).__name__}: {str(e)[:300]}",
                        trace=traceback.format_exc()[-600:],
                    )
                torch.cuda.empty_cache()


def lse_check(rows, variants: str | None = None):
    """The log-sum-exp output (return_lse=True) of softmax variants against the float64 reference's, bf16 and
    fp16, prefill and GQA decode (split-KV): the largest absolute error over finite rows, and whether the
    rows without keys agree (−inf)."""
    names = (variants or "softmax,causal,sliding_window,alibi,softcap").split(",")
    for name in names:
        mod, op = example(name)
        for case, B, Hq, Hkv, M, N, D in [("prefill", 1, 8, 8, 4096, 4096, 128), ("decode", 2, 32, 8, 1, 32768, 128)]:
            shape = ef.Shape(B, Hq, M, N, D, D, Hkv)
            for dt in (torch.bfloat16, torch.float16):
                try:
                    q, k, v, extra = seeded_inputs(mod, shape, dt)
                    _, lse = op(q, k, v, **extra, return_lse=True)
                    _, ref = op(q, k, v, **extra, return_lse=True, backend="reference")
                    fin = torch.isfinite(ref)
                    err = (lse.double() - ref.double())[fin].abs().max().item() if fin.any() else 0.0
                    same_inf = bool((torch.isinf(lse) == ~fin).all())
                    # fp32 states: a few ulps of |lse| plus the exp2/log rounding
                    tol = 1e-5 * max(1.0, ref[fin].abs().max().item()) + 1e-4
                    emit(
                        rows,
                        kind="lse",
                        variant=name,
                        case=case,
                        dtype=str(dt).split(".")[1],
                        max_error=err,
                        tolerance=tol,
                        empty_rows_agree=same_inf,
                        ok=err <= tol and same_inf,
                    )
                except Exception as e:  # noqa: BLE001
                    emit(
                        rows,
                        kind="lse",
                        variant=name,
                        case=case,
                        dtype=str(dt),
                        ok=False,
                        error=f"{type(e).__name__}: {str(e)[:300]}",
                    )
                torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="also time a few fixed schedules")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--only", default="anchors,prefill,decode,check")
    ap.add_argument("--cases", default=None, help="comma-separated substrings of the prefill rows to run")
    ap.add_argument("--variants", default=None, help="comma-separated examples the check runs (default: all)")
    ap.add_argument("--check-workers", type=int, default=1, help="processes the check is split over")
    a = ap.parse_args()
    rows = []
    emit(
        rows,
        kind="env",
        gpu=torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=triton.__version__,
        date=datetime.date.today().isoformat(),
    )
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    OUT.append(out / "forward.json")
    steps = a.only.split(",")
    if "anchors" in steps:
        anchors(rows)
    if "prefill" in steps:
        prefill(rows, a.quick, a.sweep, a.cases)
    if "decode" in steps:
        decode(rows, a.sweep)
    summary(rows)
    if "lse" in steps:
        lse_check(rows, a.variants)
    if "check" in steps and not a.skip_check:
        if a.check_workers > 1:
            correctness_in_parallel(rows, a.quick, a.check_workers)
        else:
            correctness(rows, a.quick, a.variants)


def summary(rows):
    by = {}
    for r in rows:
        if r.get("kind") in ("prefill", "decode") and "error" not in r:
            by.setdefault(r["case"], {})[r["impl"]] = r.get("tflops") or r.get("tbps")
    for r in rows:
        if r.get("kind") == "decode" and "graph_tbps" in r:
            print(f"decode from a CUDA graph: {r['impl']} {r['graph_tbps']:.2f} TB/s")
    print("\ncase | einflash | best einflash | cudnn | flash | flex | best/flex | best/cudnn")
    for case, d in by.items():
        mine = {k: v for k, v in d.items() if k.startswith("einflash")}
        best = max(mine.values()) if mine else math.nan
        flex = d.get("flex", math.nan)
        cudnn = d.get("sdpa-cudnn", math.nan)
        print(
            f"{case} | {d.get('einflash', math.nan):.1f} | {best:.1f} | {cudnn:.1f}"
            f" | {d.get('sdpa-flash', math.nan):.1f} | {flex:.1f} | {best / flex:.2f} | {best / cudnn:.2f}"
        )


if __name__ == "__main__":
    main()
