"""A relative-position table read at offsets, beside einflash's own ALiBi and FlexAttention, on one GPU.

    python3 benchmarks/bench_offsets.py --out DIR [--shape 2,16,8192,128]

In one process, bf16 q, k, v: einflash's ALiBi (examples/alibi.py), einflash with a per-head table of M + N − 1
biases read at ``rel[h, n − m + M − 1]``, and FlexAttention with the same table gathered in its score_mod;
forward and forward+backward (the table frozen: its gradient is not lowered yet), TFLOP/s counting the
forward as 4·B·H·M·N·D and forward+backward as 3.5 times that. Before timing, einflash's table kernel is
checked against the float64 reference (bf16 and fp16; forward and the gradients of q, k, v). DIR/offsets.json.
"""

import argparse
import datetime
import json
import pathlib
import sys
import traceback

import torch
import triton
from triton.testing import do_bench

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import peers
from bench_forward import example

import einflash as ef
from einflash.testing import check, check_gradients


@ef.attention
def relative(q, k, v, rel: ef.Tensor["h r"]):  # noqa: F722 -- rank names, einflash's DSL
    return ef.softmax(q @ k * ef.scale + rel[ef.n - ef.m + ef.M - 1], "n") @ v


def _checks(rows: list) -> None:
    for dtype in (torch.bfloat16, torch.float16):
        for B, H, M, N, D in ((2, 4, 300, 517, 128), (2, 4, 1, 4099, 64)):
            g = torch.Generator(device="cuda").manual_seed(0)
            q = torch.randn(B, H, M, D, device="cuda", dtype=dtype, generator=g)
            k, v = (torch.randn(B, H, N, D, device="cuda", dtype=dtype, generator=g) for _ in range(2))
            rel = torch.randn(H, M + N - 1, device="cuda", dtype=dtype, generator=g)
            ok = check(relative, relative(q, k, v, rel), q, k, v, rel=rel).ok
            row = dict(kind="check", dtype=str(dtype), shape=[B, H, M, N, D], forward=ok)
            leaves = [x.clone().requires_grad_() for x in (q, k, v)]
            grad = torch.randn_like(q)
            relative(*leaves, rel).backward(grad)
            verdicts = check_gradients(relative, dict(zip("qkv", (x.grad for x in leaves))), grad, q, k, v, rel=rel)
            row["gradients"] = {n: v.as_dict() for n, v in verdicts.items()}
            row["ok"] = row["forward"] and all(v.ok for v in verdicts.values())
            rows.append(row)
            print(json.dumps(row), flush=True)


def _time(rows: list, label: str, forward, train, flops: float) -> None:
    row: dict = {"kind": "perf", "case": label}

    def inference():
        with torch.no_grad():
            return forward()

    for part, fn, count in (("forward", inference, 1.0), ("forward+backward", train, 3.5)):
        try:
            fn()
            ms = do_bench(fn, warmup=25, rep=100)
            row[part] = {"ms": ms, "tflops": count * flops / ms / 1e9}
        except Exception as e:  # noqa: BLE001 -- a peer that cannot run the case is reported, not fatal
            row[part] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            traceback.print_exc()
    rows.append(row)
    print(json.dumps(row), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--shape", default="2,16,8192,128")
    a = ap.parse_args()
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    B, H, N, D = map(int, a.shape.split(","))
    rows: list = [
        {
            "kind": "env",
            "gpu": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "triton": triton.__version__,
            "date": datetime.date.today().isoformat(),
        }
    ]
    _checks(rows)
    dt = torch.bfloat16
    q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=dt, requires_grad=True) for _ in range(3))
    grad = torch.randn_like(q)
    rel = torch.randn(H, 2 * N - 1, device="cuda", dtype=dt)
    flops = 4 * B * H * N * N * D

    def training(fn):
        def step():
            fn().backward(grad)

        return step

    mod, alibi = example("alibi")
    slopes = mod.extra_inputs(ef.Shape(B, H, N, N, D), device="cuda", dtype=torch.float32)

    def alibi_fwd():
        return alibi(q, k, v, **slopes)

    def table_fwd():
        return relative(q, k, v, rel)

    def flex_table(score, b, h, qi, ki):
        return score + rel[h, ki - qi + N - 1]

    _time(rows, "einflash alibi", alibi_fwd, training(alibi_fwd), flops)
    _time(rows, "einflash relative table", table_fwd, training(table_fwd), flops)
    try:
        flex_fwd = peers.flex(q, k, v, score_mod=flex_table)
        _time(rows, "flex relative table", flex_fwd, training(flex_fwd), flops)
    except Exception as e:  # noqa: BLE001 -- Flex that cannot compile the case is reported
        rows.append({"kind": "perf", "case": "flex relative table", "error": f"{type(e).__name__}: {str(e)[:300]}"})
    (out / "offsets.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
