"""Autotuning on one GPU, for the rows of docs/design.md §5: tuned against default schedules, tuning time per
shape, and a warm-started study against a cold one.

    python3 benchmarks/bench_tune.py --out DIR [--trials 12] [--deadline 500] [--quick] [--pairs-only]

1. Each row (benchmarks/bench_forward.py's ROWS and DECODE, bf16) is tuned with a fixed budget
   (``--trials`` schedules, each checked against the float64 reference on a slice, timed by
   ``triton.testing.do_bench`` median) into a fresh cache of this run.
2. The winner and the heuristic default are then timed again in the same process, alternately,
   three times each (median), and reported as ms, TFLOP/s (or TB/s of KV read) and the speedup.
3. Warm against cold: at a neighbouring shape of a tuned row (N = 4096 instead of 8192), a study
   warm-started from the cache (the default, the tuned row's winner, then the cost model's fastest
   schedules), one that starts from the default and the cost model's fastest alone (a separate empty
   cache: a shape never tuned nearby) and a cold one (nothing enqueued, a separate empty cache) each get
   ``--trials``; reported is how many schedules each tried before one came within 5% of the best any found,
   and the cost model's first choice against that best.

Everything stops cleanly at ``--deadline`` seconds after start (each study gets an equal share of the
time left), and DIR/tune.json is rewritten after every record, DIR/cache-bundle.json (the cache, as
``einflash cache export`` writes it) after every study, so a run cut short still leaves its results.
Prints a table at the end. Needs optuna (and its dependencies), platformdirs, rich, filelock.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import math
import os
import pathlib
import statistics
import sys
import tempfile
import time
import traceback

import optuna
import torch
import triton

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_forward as bf  # noqa: E402

import einflash as ef  # noqa: E402
from einflash.compiler.tuning.cache import TuneCache  # noqa: E402
from einflash.compiler.tuning.tuner import gpu_timer  # noqa: E402

START = time.monotonic()
DEVICE = "cuda"
WITHIN = 1.05  # "within 5% of the best"
REPEATS = 3  # alternate timings of tuned and default


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--trials", type=int, default=12, help="schedules measured per study")
    ap.add_argument("--deadline", type=float, default=500.0, help="seconds after start to stop at")
    ap.add_argument("--quick", action="store_true", help="two rows, one warm/cold pair, 4 trials")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pairs-only", action="store_true", help="only the cold / model / warm studies (no tuned rows)")
    a = ap.parse_args()
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    # this run's own cache, outside DIR (kernels, studies and locks are many small files); its content is
    # copied into DIR/cache-bundle.json after every study
    os.environ["EINFLASH_CACHE_DIR"] = tempfile.mkdtemp(prefix="einflash-bench-tune-")
    bf.OUT.append(out / "tune.json")
    rows: list[dict] = []
    bf.emit(
        rows,
        kind="env",
        gpu=torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=triton.__version__,
        optuna=optuna.__version__,
        date=datetime.date.today().isoformat(),
        trials=a.trials,
        deadline_s=a.deadline,
    )
    trials = 4 if a.quick else a.trials
    deadline = START + a.deadline
    cases, pairs = ([] if a.pairs_only else _cases(a.quick)), _pairs(a.quick)
    studies = len(cases) + 3 * len(pairs)  # each study gets an equal share of the time that is left
    for case in cases:
        if not _time_left(deadline, rows, case["label"]):
            break
        _tune_row(rows, case, trials, _share(deadline, studies), a.seed)
        studies -= 1
        _save_cache(out)
    for case in pairs:
        if not _time_left(deadline, rows, case["label"]):
            break
        _warm_vs_cold(rows, case, trials, deadline, studies, a.seed)
        studies -= 3
        _save_cache(out)
    _summary(rows)


def _save_cache(out: pathlib.Path) -> None:
    """The cache as one bundle (``einflash cache import`` reads it): every entry with every trial."""
    (out / "cache-bundle.json").write_text(json.dumps(TuneCache().export(), indent=1))


def _share(deadline: float, studies: int) -> float:
    """Seconds for the next study: an equal part of what is left, less a margin for timing and the last trial."""
    return max(10.0, (deadline - time.monotonic()) / max(1, studies) - 10)


def _cases(quick: bool) -> list[dict]:
    cases = []
    for label, name, (B, H, N, D), params, kind in bf.ROWS[:1] if quick else bf.ROWS:
        cases.append(dict(label=label, name=name, B=B, Hq=H, Hkv=H, M=N, N=N, D=D, params=params, kind=kind))
    label, name, p = bf.DECODE
    cases.append(
        dict(
            label=label,
            name=name,
            B=p["B"],
            Hq=p["Hq"],
            Hkv=p["Hkv"],
            M=1,
            N=p["L"],
            D=p["D"],
            params={},
            kind="decode",
        )
    )
    return cases


def _pairs(quick: bool) -> list[dict]:
    """Neighbouring shapes of tuned rows: the same variant at M = N = 4096 instead of 8192."""
    by_label = {c["label"]: c for c in _cases(False)}
    picks = ["full (2,16,8192,128)"] if quick else ["full (2,16,8192,128)", "causal (2,16,8192,128)"]
    return [{**by_label[p], "M": 4096, "N": 4096, "label": p.replace("8192", "4096")} for p in picks]


def _time_left(deadline: float, rows: list, label: str, need: float = 20.0) -> bool:
    if time.monotonic() + need < deadline:
        return True
    bf.emit(rows, kind="skipped", case=label, reason=f"deadline: {deadline - time.monotonic():.0f} s left")
    return False


def _problem(case: dict):
    mod, op = bf.example(case["name"])
    g = torch.Generator(device=DEVICE).manual_seed(0)
    B, Hq, Hkv, M, N, D = (case[k] for k in ("B", "Hq", "Hkv", "M", "N", "D"))
    q = torch.randn(B, Hq, M, D, device=DEVICE, dtype=bf.DT, generator=g)
    k = torch.randn(B, Hkv, N, D, device=DEVICE, dtype=bf.DT, generator=g)
    v = torch.randn(B, Hkv, N, D, device=DEVICE, dtype=bf.DT, generator=g)
    extra = {}
    if hasattr(mod, "extra_inputs"):
        extra = mod.extra_inputs(ef.Shape(B, Hq, M, N, D, D, Hkv), device=DEVICE, dtype=torch.float32)
    return op, (q, k, v), {**extra, **case["params"]}


def _rate(case: dict, ms: float) -> dict:
    if case["kind"] == "decode":
        return {"tbps": 2 * case["B"] * case["Hkv"] * case["N"] * case["D"] * 2 / ms / 1e9}
    pairs = bf.pairs(case["kind"], case["N"], case["params"].get("window", 1024))
    return {"tflops": 4 * case["B"] * case["Hq"] * case["D"] * pairs / ms / 1e9}


def _sched(s) -> dict:
    return dataclasses.asdict(s)


def _tune_row(rows, case, trials, seconds, seed):
    try:
        op, args, kw = _problem(case)
        t0 = time.monotonic()
        r = op.tune(*args, **kw, trials=trials, seconds=seconds, seed=seed)
        tuning_s = time.monotonic() - t0
        best, default = [], []
        for _ in range(REPEATS):  # alternate, so that clock or thermal drift hits both alike
            best.append(gpu_timer(functools.partial(op, *args, **kw, schedule=r.best), r.best))
            default.append(gpu_timer(functools.partial(op, *args, **kw, schedule=r.default), r.default))
        b, d = statistics.median(best), statistics.median(default)
        bf.emit(
            rows,
            kind="tuned",
            case=case["label"],
            bucket=r.bucket.label,
            tuning_s=tuning_s,
            sampler=r.sampler,
            space=r.space.to_json(),
            measured=len(r.measured),
            failed=len(r.failed),
            failures=[f"{f['kind']}: {f['reason'][:160]}" for f in r.failed],
            best=_sched(r.best),
            default=_sched(r.default),
            tuned_ms=b,
            default_ms=d,
            speedup=d / b,
            tuned_rate=_rate(case, b),
            default_rate=_rate(case, d),
            study_best_ms=r.best_ms,
            study_default_ms=r.default_ms,
            checked=r.checked,
            cache=str(r.path),
        )
        del args
        torch.cuda.empty_cache()
    except Exception as e:  # noqa: BLE001 -- one row failing must not lose the others
        bf.emit(
            rows,
            kind="tuned",
            case=case["label"],
            error=f"{type(e).__name__}: {str(e)[:400]}",
            trace=traceback.format_exc()[-800:],
        )


def _to_within(result, best_ms: float) -> int | None:
    """Schedules tried (measured or failed, in trial order) until the first within 5% of ``best_ms``."""
    tried = sorted([(m["trial"], m["ms"]) for m in result.measured] + [(f["trial"], math.inf) for f in result.failed])
    return next((i + 1 for i, (_, ms) in enumerate(tried) if ms <= WITHIN * best_ms), None)


def _warm_vs_cold(rows, case, trials, deadline, studies, seed):
    label = case["label"]
    try:
        op, args, kw = _problem(case)
        runs = {}
        for i, mode in enumerate(("cold", "model", "warm")):
            if not _time_left(deadline, rows, f"{label} {mode}"):
                return
            seconds = _share(deadline, studies - i)
            t0 = time.monotonic()
            if mode == "cold":  # nothing enqueued, and a cache of its own, empty
                r = op.tune(
                    *args,
                    **kw,
                    trials=trials,
                    seconds=seconds,
                    seed=seed,
                    warm_start=False,
                    cache=TuneCache(tempfile.mkdtemp(prefix="einflash-cold-")),
                )
            elif mode == "model":  # the default and the cost model's fastest, no cached neighbour
                r = op.tune(
                    *args,
                    **kw,
                    trials=trials,
                    seconds=seconds,
                    seed=seed,
                    cache=TuneCache(tempfile.mkdtemp(prefix="einflash-model-")),
                )
            else:  # the default, then the winners of the nearest cached shapes (the tuned rows)
                r = op.tune(*args, **kw, trials=trials, seconds=seconds, seed=seed)
            runs[mode] = (r, time.monotonic() - t0)
        best = min(r.best_ms for r, _ in runs.values())
        record = {"kind": "warm_vs_cold", "case": label, "best_ms": best, "trials": trials}
        first = runs["model"][0].model_first
        if first is not None:  # the model's first choice, measured wherever a study measured it
            times = [m["ms"] for r, _ in runs.values() for m in r.measured if m["schedule"] == _sched(first[0])]
            record["model_first"] = {
                "schedule": _sched(first[0]),
                "predicted_ms": first[1],
                "ms": min(times, default=None),
                "within_5pct": bool(times) and min(times) <= 1.05 * best,
            }
        for mode, (r, seconds) in runs.items():
            record[mode] = {
                "to_within_5pct": _to_within(r, best),
                "best_ms": r.best_ms,
                "seconds": seconds,
                "best": _sched(r.best),
                "warm_starts": [m.get("warm_start") for m in r.measured if m.get("warm_start")],
                "ms_in_order": [m["ms"] for m in sorted(r.measured, key=lambda m: m["trial"])],
            }
        bf.emit(rows, **record)
        del args
        torch.cuda.empty_cache()
    except Exception as e:  # noqa: BLE001
        bf.emit(
            rows,
            kind="warm_vs_cold",
            case=label,
            error=f"{type(e).__name__}: {str(e)[:400]}",
            trace=traceback.format_exc()[-800:],
        )


def _summary(rows):
    print(f"\ntotal {time.monotonic() - START:.0f} s")
    print("case | default ms | tuned ms | speedup | default → tuned rate | tuning s | measured/failed | best")
    for r in rows:
        if r.get("kind") != "tuned":
            continue
        if "error" in r:
            print(f"{r['case']} | error: {r['error'][:120]}")
            continue
        unit = "TFLOP/s" if "tflops" in r["tuned_rate"] else "TB/s"
        d, t = (next(iter(x.values())) for x in (r["default_rate"], r["tuned_rate"]))
        b = r["best"]
        sched = (
            f"{b['block_m']}x{b['block_n']} w{b['num_warps']} s{b['num_stages']}"
            + (f" splits {b['splits']}" if b["splits"] > 1 else "")
            + (" rev" if b["reverse_m"] else "")
        )
        print(
            f"{r['case']} | {r['default_ms']:.3f} | {r['tuned_ms']:.3f} | {r['speedup']:.2f}x | {d:.1f} → {t:.1f} "
            f"{unit} | {r['tuning_s']:.0f} | {r['measured']}/{r['failed']} | {sched}"
        )
    print("\nwarm vs cold (schedules tried until within 5% of the best either found)")
    for r in rows:
        if r.get("kind") == "warm_vs_cold":
            if "error" in r:
                print(f"{r['case']} | error: {r['error'][:120]}")
            else:
                print(
                    f"{r['case']} | cold {r['cold']['to_within_5pct']} | model {r['model']['to_within_5pct']} | "
                    f"warm {r['warm']['to_within_5pct']} | "
                    f"best {r['best_ms']:.3f} ms (of {r['trials']} each)"
                )
    for r in rows:
        if r.get("kind") == "skipped":
            print(f"skipped {r['case']}: {r['reason']}")


if __name__ == "__main__":
    main()
