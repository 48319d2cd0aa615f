"""Tables read at offsets and gathered, beside einflash's own ALiBi and FlexAttention, on one GPU.

    python3 benchmarks/bench_offsets.py --out DIR [--shape 2,16,8192,128]

In one process, bf16 q, k, v: einflash's ALiBi (examples/alibi.py); a per-head table of M + N − 1 biases read at
``rel[h, n − m + M − 1]``; T5's bucketed bias (examples/t5_bias.py: ``table[h, bucket[n − m + M − 1]]``, two
gathers); each beside FlexAttention with the same reads in its score_mod. Forward and forward+backward, the
tables frozen and learning (their gradients summed along the pairs' diagonals), TFLOP/s counting the forward as
4·B·H·M·N·D and forward+backward as 3.5 times that. After timing, einflash's table kernels are checked against
the float64 reference (bf16 and fp16; forward and the gradients of q, k, v and the table). DIR/offsets.json.
"""

import argparse
import itertools
import json
import pathlib
import sys
import traceback

import torch
from triton.testing import do_bench

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import peers
from bench_forward import example

import einflash as ef
from einflash.testing import check, check_gradients

T5, _ = example("t5_bias")


@ef.attention
def relative(q, k, v, rel: ef.Tensor["h r"]):  # noqa: F722 -- rank names, einflash's DSL
    return ef.softmax(q @ k * ef.scale + rel[ef.n - ef.m + ef.M - 1], "n") @ v


def _tables(op, shape: ef.Shape, dtype, g) -> dict:
    if op is relative:
        return {"rel": torch.randn(shape.Hq, shape.M + shape.N - 1, device="cuda", dtype=dtype, generator=g)}
    return T5.extra_inputs(shape, device="cuda", dtype=dtype)


def _checks(rows: list) -> None:
    for op, dtype in itertools.product((relative, T5.t5_bias), (torch.bfloat16, torch.float16)):
        for B, H, M, N, D in ((2, 4, 300, 517, 128), (2, 4, 1, 4099, 64)):
            g = torch.Generator(device="cuda").manual_seed(0)
            q = torch.randn(B, H, M, D, device="cuda", dtype=dtype, generator=g)
            k, v = (torch.randn(B, H, N, D, device="cuda", dtype=dtype, generator=g) for _ in range(2))
            tables = _tables(op, ef.Shape(B, H, M, N, D), dtype, g)
            ok = check(op, op(q, k, v, **tables), q, k, v, **tables).ok
            row = dict(kind="check", variant=op.name, dtype=str(dtype), shape=[B, H, M, N, D], forward=ok)
            given = {"q": q, "k": k, "v": v, **tables}
            leaves = {n: (x.clone().requires_grad_() if x.is_floating_point() else x) for n, x in given.items()}
            grad = torch.randn_like(q)
            op(**leaves).backward(grad)
            grads = {n: x.grad for n, x in leaves.items() if x.is_floating_point()}
            verdicts = check_gradients(op, grads, grad, **given)
            row["gradients"] = {n: v.as_dict() for n, v in verdicts.items()}
            row["ok"] = row["forward"] and all(v.ok for v in verdicts.values())
            rows.append(row)
            print(json.dumps(row), flush=True)


def _time(rows: list, label: str, forward, train, flops: float) -> None:
    """Forward (unless None) and forward+backward of one case."""
    row: dict = {"kind": "perf", "case": label}

    def inference():
        with torch.no_grad():
            return forward()

    parts = (("forward", inference, 1.0),) if forward is not None else ()
    for part, fn, count in (*parts, ("forward+backward", train, 3.5)):
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
    ap.add_argument("--no-flex", action="store_true", help="einflash's rows only (Flex compiles for a minute)")
    a = ap.parse_args()
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    B, H, N, D = map(int, a.shape.split(","))
    rows: list = [peers.environment()]
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

    t5 = T5.extra_inputs(ef.Shape(B, H, N, N, D), device="cuda", dtype=dt)
    table, bucket = t5["table"], t5["bucket"]

    def t5_fwd():
        return T5.t5_bias(q, k, v, **t5)

    def flex_t5(score, b, h, qi, ki):
        return score + table[h, bucket[ki - qi + N - 1]]

    rel_learning, table_learning = rel.detach().clone().requires_grad_(), table.detach().clone().requires_grad_()

    def table_learning_fwd():
        return relative(q, k, v, rel_learning)

    def t5_learning_fwd():
        return T5.t5_bias(q, k, v, table_learning, bucket)

    def flex_table_learning(score, b, h, qi, ki):
        return score + rel_learning[h, ki - qi + N - 1]

    def flex_t5_learning(score, b, h, qi, ki):
        return score + table_learning[h, bucket[ki - qi + N - 1]]

    _time(rows, "einflash alibi", alibi_fwd, training(alibi_fwd), flops)
    _time(rows, "einflash relative table", table_fwd, training(table_fwd), flops)
    _time(rows, "einflash t5 bucketed bias", t5_fwd, training(t5_fwd), flops)
    _time(rows, "einflash relative table (learning)", None, training(table_learning_fwd), flops)
    _time(rows, "einflash t5 bucketed bias (learning)", None, training(t5_learning_fwd), flops)
    flex_cases = (
        ()
        if a.no_flex
        else (
            ("flex relative table", flex_table, True),
            ("flex t5 bucketed bias", flex_t5, True),
            ("flex relative table (learning)", flex_table_learning, False),
            ("flex t5 bucketed bias (learning)", flex_t5_learning, False),
        )
    )
    for label, score_mod, frozen in flex_cases:
        try:
            flex_fwd = peers.flex(q, k, v, score_mod=score_mod)
            _time(rows, label, flex_fwd if frozen else None, training(flex_fwd), flops)
        except Exception as e:  # noqa: BLE001 -- Flex that cannot compile the case is reported
            rows.append({"kind": "perf", "case": label, "error": f"{type(e).__name__}: {str(e)[:300]}"})
    (out / "offsets.json").write_text(json.dumps(rows, indent=1))
    _checks(rows)  # after the timings, which a cut-off run keeps
    (out / "offsets.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
