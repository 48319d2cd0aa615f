"""Host time of one eager training step (forward and backward), with the kernels' launches stubbed out, so
that only the host's work is timed: through the custom ops (as a traced step runs), through the autograd
Function recording every call anew, and through the autograd Function with its replays.

    python3 benchmarks/host_training.py --out DIR [--device cuda] [--variant sliding_window] [--n 512]
    TRITON_INTERPRET=1 python3 benchmarks/host_training.py --out DIR --device cpu   # on a machine without GPU

Writes DIR/host_training.json: µs per step for each path (the median of five rounds of 100 steps), and the
shape. On a GPU the allocations are real (the caching allocator's) and only the launches are stubbed.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_forward import example  # noqa: E402

from einflash.compiler.runtime import launch  # noqa: E402


class _NoLaunch:
    """What ``launch.load_kernel`` returns instead of a kernel: launching it does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def per_step_us(step, rounds: int = 5, steps: int = 100) -> float:
    for _ in range(10):
        step()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(steps):
            step()
        times.append((time.perf_counter() - t) / steps * 1e6)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--variant", default="sliding_window")
    ap.add_argument("--n", type=int, default=512)
    a = ap.parse_args()
    launch.load_kernel = lambda src: _NoLaunch()
    _, op = example(a.variant)
    params = {"window": 256} if a.variant == "sliding_window" else {}
    B, H, N, D = 2, 16, a.n, 128
    q, k, v = (torch.randn(B, H, N, D, device=a.device, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grad = torch.randn(B, H, N, D, device=a.device, dtype=torch.bfloat16)
    training = op._training
    values = [float(params[p.name]) if p.name in params else float("nan") for p in op.cascade.params]
    schedule = [0, 0]  # no forward schedule, no backward schedule: both chosen in the op

    def step(run):
        run().backward(grad)
        q.grad = k.grad = v.grad = None

    def without_replays(run):
        kept = training.forward_replays.capacity, training.backward_replays.capacity
        training.forward_replays.capacity = training.backward_replays.capacity = 0
        training.forward_replays.clear()
        training.backward_replays.clear()
        try:
            return per_step_us(lambda: step(run))
        finally:
            training.forward_replays.capacity, training.backward_replays.capacity = kept

    eager = lambda: op(q, k, v, **params)  # noqa: E731
    result = {
        "variant": a.variant,
        "device": a.device,
        "B": B,
        "H": H,
        "N": N,
        "D": D,
        "dtype": "bfloat16",
        "custom_ops_us": without_replays(lambda: training.custom_op([q, k, v], values, schedule)[0]),
        "function_recorded_us": without_replays(eager),
        "function_replayed_us": per_step_us(lambda: step(eager)),
    }
    print(json.dumps(result))
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "host_training.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
