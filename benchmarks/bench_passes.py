"""Variants of more than one pass over the keys (and the sink logit and multi-token attention's convolution over
the scores, new with them), beside the same maths composed in PyTorch, on one GPU.

    python3 benchmarks/bench_passes.py --out DIR [--shape 1,16,4096,128]

In one process, bf16 q, k, v: einflash's kernels of examples/post_norm_threshold.py and renorm_threshold.py (two
passes over the keys: the row's maximum and sum, then the thresholded weights), sink_logit.py (one pass) and
multi_token.py (one pass, each score recomputed at its 3×3 neighbours: nine q·k products per tile, forward only)
and moba.py (two passes: the key blocks' sums, then attention over each query's own block and its 2 routed past
blocks of 512 keys; forward only), top_k.py (two passes: each row's 9 largest scores, kept as a list merged with
every key tile's, then the softmax of the 8 largest);
beside each, the formula of tests' style written in plain PyTorch, eager and under torch.compile, which
materialise the M×N weights; einflash's plain softmax for the cost of one pass. Forward, with each call's peak
memory beyond its inputs; forward+backward, every tensor input learning (the sink logit's included). After
timing, the kernels are checked against the float64 reference (bf16 and fp16; prefill, and decode with one
query; the gradients of every floating-point input). DIR/passes.json.
"""

import argparse
import contextlib
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
from einflash.testing import check, check_gradients, trainable

TAU = 0.0001  # post_norm_threshold's: below 1/N at the benchmark's N, so that some weights are kept
RELATIVE_TAU = 0.5  # renorm_threshold's, a fraction of 1/N: weights below half the uniform one are cut
MOBA_BLOCK = 512  # key blocks as MoBA's paper routes 32K contexts: its own block and 2 past ones per query


def post_norm_threshold(q, k, v, tau):
    p = torch.softmax((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5, dim=-1)
    return torch.relu(p - tau) @ v


def renorm_threshold(q, k, v, tau):
    w = torch.relu(torch.softmax((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5, dim=-1) - tau / k.shape[2])
    return (w / w.sum(dim=-1, keepdim=True)) @ v


def sink_logit(q, k, v, sink):
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    full = torch.cat([s, sink.view(1, -1, 1, 1).expand(*s.shape[:-1], 1).to(s.dtype)], dim=-1)
    return torch.softmax(full, dim=-1)[..., :-1] @ v


def multi_token(q, k, v, theta):
    """Causal scores (masked ones 0) convolved over (query, key) offsets by θ[h] (conv2d, one group per head,
    padded above and to the left), masked causally again, softmax."""
    n = q.shape[2]
    causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    s = ((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5).masked_fill(~causal, 0.0)
    window_m, window_n = theta.shape[1:]
    padded = torch.nn.functional.pad(s, (window_n - 1, 0, window_m - 1, 0))
    weight = theta.flip(-1, -2).unsqueeze(1).to(s.dtype)
    conv = torch.nn.functional.conv2d(padded, weight, groups=q.shape[1])
    return torch.softmax(conv.masked_fill(~causal, float("-inf")), dim=-1) @ v


def moba(q, k, v, block, topk=2):
    """Each query's own key block and the topk past blocks with the largest q·mean(k over the block), causal."""
    n = k.shape[2]
    blocks = torch.arange(n, device=q.device) // block
    count = torch.bincount(blocks).to(k.dtype)
    kbar = torch.zeros(*k.shape[:2], len(count), k.shape[3], device=k.device, dtype=k.dtype).index_add_(2, blocks, k)
    gates = q @ (kbar / count[:, None]).transpose(-1, -2)
    own = torch.arange(q.shape[2], device=q.device)[:, None] // block
    c = torch.arange(len(count), device=q.device)[None, :]
    past = c < own
    picks = gates.masked_fill(~past, float("-inf")).topk(min(topk, len(count)), dim=-1).indices
    routed = (torch.zeros_like(gates, dtype=torch.bool).scatter_(-1, picks, True) & past) | (c == own)
    causal = torch.ones(q.shape[2], n, dtype=torch.bool, device=q.device).tril()
    s = ((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5).masked_fill(~(routed[..., blocks] & causal), float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def top_k(q, k, v, topk=8):
    """The softmax of each row's topk largest scores (ties at the k-th all kept)."""
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    tau = s.topk(topk, dim=-1).values[..., -1:]
    return torch.softmax(s.masked_fill(s < tau, float("-inf")), dim=-1) @ v


def _extra(name: str, shape: ef.Shape, dtype) -> dict:
    if name == "moba":
        return {"block": MOBA_BLOCK}
    if name in ("multi_token", "sink_logit"):  # their tables, as the examples make them
        return example(name)[0].extra_inputs(shape, device="cuda", dtype=torch.float32)
    if name == "top_k":
        return {}
    return {"tau": RELATIVE_TAU if name == "renorm_threshold" else TAU}


def _measure(rows: list, label: str, fn, flops: float, part: str = "forward") -> None:
    row: dict = {"kind": "perf", "case": label, "part": part}
    try:
        with torch.no_grad() if part == "forward" else contextlib.nullcontext():
            fn()
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            row["peak_extra_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
            ms = do_bench(fn, warmup=25, rep=100)
        row[part] = {"ms": ms, "tflops": flops / ms / 1e9}
    except Exception as e:  # noqa: BLE001 -- a composition that cannot run (out of memory) is reported
        row[part] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        traceback.print_exc()
    rows.append(row)
    print(json.dumps(row), flush=True)


VARIANTS = ("post_norm_threshold", "renorm_threshold", "sink_logit", "multi_token", "moba", "top_k")


def _checks(rows: list, variants: tuple[str, ...]) -> None:
    for name, dtype in itertools.product(variants, (torch.bfloat16, torch.float16)):
        op = example(name)[1]
        for B, Hq, Hkv, M, N, D in ((2, 4, 2, 300, 517, 128), (2, 8, 2, 1, 4099, 64)):
            shape = ef.Shape(B, Hq, M, N, D, Hkv=Hkv)
            g = torch.Generator(device="cuda").manual_seed(0)
            q = torch.randn(B, Hq, M, D, device="cuda", dtype=dtype, generator=g)
            k, v = (torch.randn(B, Hkv, N, D, device="cuda", dtype=dtype, generator=g) for _ in range(2))
            # thresholds that bite at these lengths and keep every row
            extra = {
                "post_norm_threshold": {"tau": 0.5 / N},
                "renorm_threshold": {"tau": 0.9},
                "moba": {"block": 32},
            }.get(name) or _extra(name, shape, dtype)
            verdict = check(op, op(q, k, v, **extra), q, k, v, **extra)
            row = dict(kind="check", variant=name, dtype=str(dtype), shape=[B, Hq, Hkv, M, N, D], ok=verdict.ok)
            row.update(verdict.as_dict())
            if op.backward.error is None:  # every floating-point input's gradient (the sink's included)
                tensors = {n: x for n, x in {"q": q, "k": k, "v": v, **extra}.items() if isinstance(x, torch.Tensor)}
                leaves = trainable(op, tensors) | {n: x for n, x in extra.items() if n not in tensors}
                out = op(**leaves)
                grad = torch.randn_like(out)
                out.backward(grad)
                got = {n: x.grad for n, x in leaves.items() if isinstance(x, torch.Tensor) and x.requires_grad}
                verdicts = check_gradients(op, got, grad, q, k, v, **extra)
                row["gradients"] = {n: v.as_dict() for n, v in verdicts.items()}
                row["ok"] = verdict.ok and all(v.ok for v in verdicts.values())
            rows.append(row)
            print(json.dumps(row), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--shape", default="1,16,4096,128")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="which of them, comma-separated")
    a = ap.parse_args()
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    B, H, N, D = map(int, a.shape.split(","))
    rows: list = [peers.environment(shape=[B, H, N, D])]
    q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    flops = 4 * B * H * N * N * D  # of one pass: a second pass's recomputed scores are not counted
    softmax = example("softmax")[1]
    _measure(rows, "einflash softmax (one pass)", lambda: softmax(q, k, v), flops)
    learning = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    grad_one = torch.randn_like(q)
    _measure(
        rows,
        "einflash softmax (one pass)",
        lambda: softmax(*learning).backward(grad_one),
        3.5 * flops,
        "forward+backward",
    )
    shape = ef.Shape(B, H, N, N, D)
    variants = tuple(a.variants.split(","))
    formulas = dict(
        post_norm_threshold=post_norm_threshold,
        renorm_threshold=renorm_threshold,
        sink_logit=sink_logit,
        multi_token=multi_token,
        moba=moba,
        top_k=top_k,
    )
    for name in variants:
        formula = formulas[name]
        op, extra = example(name)[1], _extra(name, shape, torch.bfloat16)
        compiled = torch.compile(formula)
        _measure(rows, f"einflash {name}", lambda op=op, extra=extra: op(q, k, v, **extra), flops)
        _measure(rows, f"torch eager {name}", lambda f=formula, extra=extra: f(q, k, v, *extra.values()), flops)
        _measure(rows, f"torch.compile {name}", lambda f=compiled, extra=extra: f(q, k, v, *extra.values()), flops)
        if op.backward.error is None:  # forward and backward, every tensor input learning (3.5 times the FLOPs)
            qkv = [x.detach().clone().requires_grad_() for x in (q, k, v)]
            given = {n: (x.detach().clone().requires_grad_() if torch.is_tensor(x) else x) for n, x in extra.items()}
            grad = torch.randn_like(q)

            def step(fn, qkv=qkv, given=given, grad=grad, named=False):
                if named:  # einflash's parameters by name
                    return lambda: fn(*qkv, **given).backward(grad)
                return lambda: fn(*qkv, *given.values()).backward(grad)

            _measure(rows, f"einflash {name}", step(op, named=True), 3.5 * flops, "forward+backward")
            _measure(rows, f"torch eager {name}", step(formula), 3.5 * flops, "forward+backward")
            _measure(rows, f"torch.compile {name}", step(compiled), 3.5 * flops, "forward+backward")
        (out / "passes.json").write_text(json.dumps(rows, indent=1))
    _checks(rows, variants)  # after the timings, which a cut-off run keeps
    (out / "passes.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
