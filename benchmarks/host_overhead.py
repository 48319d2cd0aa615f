"""Where a decode call's host time goes, on one GPU: the GQA decode row of docs/design.md §5 (bf16, B=4, 32:8 heads,
D=128, KV 32768), which the GPU finishes in about 70 µs, so the host's time per call decides its rate.

    python3 benchmarks/host_overhead.py --out DIR

Writes DIR/host.json: µs per call, launched back to back with one synchronisation at the end, of
(1) the whole call, replayed (einflash.compiler.runtime.replay); (2) the whole call not replayed (recorded anew each
time); (3) the call's Python with its launches captured, not run (not replayed); (4) the two launches alone
through Triton's JIT, their arguments built beforehand; (5) the GPU's time per call from a CUDA graph; and
DIR/host_profile.txt, the replayed call's cProfile (functions by own time).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pathlib
import pstats
import sys
import time

import torch
import triton

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_forward import DT, decode_inputs  # noqa: E402

from einflash.compiler.runtime.launch import jit_launch  # noqa: E402


def per_call_us(fn, calls: int = 2000) -> float:
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / calls * 1e6


def _unreplayed(op, measure):
    """``measure()`` with ``op``'s calls recorded but never replayed."""
    replays = op._replays
    op._replays = type(replays)(capacity=0)
    try:
        return measure()
    finally:
        op._replays = replays


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    op, q, k, v, _ = decode_inputs()
    Hkv = k.shape[1]
    op(q, k, v)
    fwd = op.forward
    from einflash.backends import for_device
    from einflash.compiler.tuning.selection import choose
    from einflash.ir.reference import bind_extents, bind_params

    inputs = {"q": q, "k": k, "v": v}
    extents = bind_extents(fwd.rewritten, inputs, {})
    values = bind_params(fwd.rewritten, {}, extents)
    schedule = choose(op.cascade, fwd, for_device("cuda"), DT, extents, Hkv)
    launches = []
    fwd.run(inputs, values, schedule, extents, launcher=lambda src, call: launches.append((src, call)))
    rows = {
        "schedule": str(schedule),
        "whole call (replayed)": per_call_us(lambda: op(q, k, v)),
        "whole call, not replayed": _unreplayed(op, lambda: per_call_us(lambda: op(q, k, v))),
        "einflash Python (launches captured)": per_call_us(
            lambda: fwd.run(inputs, values, schedule, extents, launcher=lambda src, call: None)
        ),
        "the launches alone (Triton JIT)": per_call_us(lambda: [jit_launch(s, c) for s, c in launches]),
        "GPU per call (CUDA graph)": triton.testing.do_bench_cudagraph(lambda: op(q, k, v), rep=100) * 1e3,
        "arguments per launch": [len(c.args) for _, c in launches],
    }
    (out / "host.json").write_text(json.dumps(rows, indent=1))
    print(json.dumps(rows, indent=1))
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(500):
        op(q, k, v)
    torch.cuda.synchronize()
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(25)
    (out / "host_profile.txt").write_text(text.getvalue())


if __name__ == "__main__":
    main()
