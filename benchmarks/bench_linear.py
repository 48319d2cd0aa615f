"""Linear attention beside flash-linear-attention (fla) and SDPA's softmax attention, on one GPU.

    python3 benchmarks/bench_linear.py --out DIR [--lengths 4096,8192,16384,32768] [--deadline S] [--checks]

In one process, bf16, B = 2, H = 16, D = 128, T = M = N per row: einflash's ``linear`` (efficient attention, not
causal: its two stages, a summary of the keys and then the query tiles), ``plain_causal_linear`` (no decay, no
normaliser), ``causal_linear`` (a per-head decay) and ``gla`` (fp32 cumulative gates beside bf16 q, k, v), whose
forwards run chunk by chunk past their crossover; fla's ``chunk_linear_attn`` (causal, no normaliser),
``chunk_lightning_attn`` (causal, per-head decays of its own) and ``chunk_gla`` where fla is installed (its first
calls autotune: each is run once before timing); SDPA's causal softmax attention as the quadratic reference point.
Forward and forward+backward (where there is a backward) in ms, and the peak memory a forward+backward step adds
(the forward's, without one). ``--checks`` runs einflash's three against the float64 reference first (bf16, fp16;
forward, and gradients where there is a backward). DIR/linear.json.
"""

import argparse
import json
import pathlib
import sys
import time
import traceback

import torch
from triton.testing import do_bench

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import peers
from bench_forward import example

import einflash as ef
from einflash.testing import check, check_gradients, trainable

B, H, D = 2, 16, 128
EINFLASH = ("linear", "plain_causal_linear", "causal_linear", "gla")
OUT = pathlib.Path("linear.json")  # where rows are kept: DIR/linear.json, set by main


@ef.attention
def plain_causal_linear(q, k, v):
    """Causal linear attention with no decay and no normaliser: what fla's chunk_linear_attn(normalize=False) is."""
    return ef.mask(q @ k, ef.n <= ef.m) @ v


def _einflash(name: str, T: int, dtype=torch.bfloat16, b: int = B, h: int = H) -> tuple:
    """The op and its inputs at length T: q, k, v in ``dtype``; a decay per head; GLA's gates in fp32."""
    mod, op = (None, plain_causal_linear) if name == "plain_causal_linear" else example(name)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(b, h, T, D, device="cuda", dtype=dtype, generator=g) for _ in range(3))
    extra = mod.extra_inputs(ef.Shape(b, h, T, T, D), device="cuda") if hasattr(mod, "extra_inputs") else {}
    return op, {"q": q, "k": k, "v": v, **extra}


def _fla(name: str, T: int) -> tuple | None:
    """fla's function and its inputs ([B, T, H, D] layout), or None where fla is not installed."""
    try:
        if name == "chunk_gla":
            from fla.ops.gla import chunk_gla as fn
        elif name == "chunk_lightning_attn":
            from fla.ops.lightning_attn import chunk_lightning_attn as fn
        else:
            from fla.ops.linear_attn import chunk_linear_attn as fn
    except ImportError:
        return None
    q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    args = {"q": q, "k": k, "v": v}
    if name == "chunk_gla":
        gates = torch.nn.functional.logsigmoid(torch.randn(B, T, H, D, device="cuda")) / 16
        args["g"] = gates.to(torch.bfloat16)
        return fn, args, {}
    if name == "chunk_lightning_attn":
        return fn, args, {"layer_idx": 0, "num_layers": 2}
    return fn, args, {"normalize": False}


def _time(rows: list, label: str, T: int, run, inputs: dict, backward: bool) -> None:
    """Forward ms, forward+backward ms (``backward``) and the peak memory one step adds, as a row."""
    row: dict = {"kind": "perf", "case": label, "T": T}
    try:
        with torch.no_grad():
            run(inputs)
            row["forward_ms"] = do_bench(lambda: run(inputs), warmup=25, rep=100)
        if backward:
            leaves = {n: (x.detach().requires_grad_() if x.is_floating_point() else x) for n, x in inputs.items()}
            grad = torch.randn_like(run(leaves))

            def step():
                run(leaves).backward(grad)

            step()
            row["forward_backward_ms"] = do_bench(step, warmup=10, rep=50, grad_to_none=list(leaves.values()))
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        if backward:
            step()
        else:
            with torch.no_grad():
                run(inputs)
        torch.cuda.synchronize()
        row["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    except Exception as e:  # noqa: BLE001 -- a peer or a case that fails is reported, not fatal
        row["error"] = f"{type(e).__name__}: {e}"[:400]
        traceback.print_exc()
    _keep(rows, row)


def _keep(rows: list, row: dict) -> None:
    """Append ``row``, print it and rewrite the JSON: a run cut at its limit keeps every row it measured."""
    rows.append(row)
    print(json.dumps(row), flush=True)
    OUT.write_text(json.dumps(rows, indent=1))


def _causal_softmax(x: dict) -> torch.Tensor:
    return torch.nn.functional.scaled_dot_product_attention(**x, is_causal=True)


def _checks(rows: list) -> None:
    for name in EINFLASH:
        for dtype in (torch.bfloat16, torch.float16):
            op, inputs = _einflash(name, 640 if name == "gla" else 1500, dtype, b=1, h=4)
            out = op(**inputs)
            row = dict(kind="check", variant=name, dtype=str(dtype), forward=check(op, out, **inputs).as_dict())
            row["ok"] = row["forward"]["ok"]
            if op.backward.error is None:
                leaves = trainable(op, inputs)
                out = op(**leaves)
                grad = torch.randn_like(out)
                out.backward(grad)
                got = {n: x.grad for n, x in leaves.items() if isinstance(x, torch.Tensor) and x.requires_grad}
                verdicts = check_gradients(op, got, grad, **inputs)
                row["gradients"] = {n: v.as_dict() for n, v in verdicts.items()}
                row["ok"] = row["ok"] and all(v.ok for v in verdicts.values())
            _keep(rows, row)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--lengths", default="4096,8192,16384,32768")
    parser.add_argument("--deadline", type=float, default=float("inf"), help="seconds; later rows are left out")
    parser.add_argument("--checks", action="store_true")
    args = parser.parse_args()
    global OUT
    pathlib.Path(args.out).mkdir(parents=True, exist_ok=True)
    OUT = pathlib.Path(args.out) / "linear.json"
    rows: list = [peers.environment(shape=[B, H, D], dtype="bfloat16")]
    started = time.time()
    if args.checks:
        _checks(rows)
    for T in (int(t) for t in args.lengths.split(",")):
        for name in EINFLASH:
            if time.time() - started > args.deadline:
                break
            op, inputs = _einflash(name, T)
            _time(rows, f"einflash {name}", T, lambda x, op=op: op(**x), inputs, op.backward.error is None)
        for name in ("chunk_linear_attn", "chunk_lightning_attn", "chunk_gla"):
            made = None if time.time() - started > args.deadline else _fla(name, T)
            if made is not None:
                fn, inputs, kw = made
                _time(rows, f"fla {name}", T, lambda x, fn=fn, kw=kw: fn(**x, **kw)[0], inputs, True)
        if time.time() - started <= args.deadline:
            q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            qkv = {"query": q, "key": k, "value": v}
            _time(rows, "sdpa causal softmax", T, _causal_softmax, qkv, True)


if __name__ == "__main__":
    main()
