"""Training at the shapes real model families train at, on one GPU: einflash beside FlexAttention, cuDNN and
FlashAttention-2 (SDPA pinned to each; where they run the case), in one process.

    python3 benchmarks/bench_training.py --out DIR [--cases llama,gemma] [--checks] [--deadline 540]

Rows (bf16): Llama-3-8B (causal, GQA 32:8, head dim 128, N 8192 and 16384); Gemma-2 style (head dim 256, GQA
16:8, tanh soft-capping at 50, global causal and a 4096-key sliding window); packed documents, causal within each,
of log-normal lengths (4, 12 and 64 documents in 16384 tokens), as a document mask on ids and as a jagged batch
(``cu_seqlens``); head dims 64, 96 and 256 with many heads; an odd length (5000); q·k and v of different head dims
(192 and 128, as MLA trains). Forward and forward+backward, TFLOP/s over the pairs the mask keeps:
2·B·Hq·pairs·(E + F) for the forward, 3.5 times that for forward+backward, the same count for every
implementation. With ``--checks``, the gradients of the new shapes (GQA 4:1, head dims 256, 192/128, 96, 80, 64;
a jagged batch) in bf16 and fp16 against the float64 reference and the tolerance rule, at smaller lengths.
Written to DIR/training.json as it goes; past the deadline (seconds from the start) nothing new starts.
"""

from __future__ import annotations

import argparse
import dataclasses
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
from einflash.testing import check_gradients, trainable

DT = torch.bfloat16
T0 = time.time()


@ef.attention
def gemma_local(q, k, v, cap: float = 50.0, window: int = 4096):
    """Gemma-2's local layers: soft-capped scores over a sliding window of earlier keys."""
    s = ef.mask(cap * ef.tanh(q @ k * ef.scale / cap), (ef.n <= ef.m) & (ef.m - ef.n < window))
    return ef.softmax(s, "n") @ v


@ef.attention
def gemma_global(q, k, v, cap: float = 50.0):
    """Gemma-2's global layers: soft-capped causal scores."""
    s = ef.mask(cap * ef.tanh(q @ k * ef.scale / cap), ef.n <= ef.m)
    return ef.softmax(s, "n") @ v


@dataclasses.dataclass(frozen=True)
class Case:
    label: str
    form: str  # causal, window, softcap_causal, softcap_window, docs, jagged
    B: int
    Hq: int
    Hkv: int
    N: int
    E: int
    F: int
    docs: int = 0  # packed documents (forms docs and jagged)
    window: int = 4096


CASES = [
    Case("llama3-8b causal GQA 32:8 D128 N8192", "causal", 2, 32, 8, 8192, 128, 128),
    Case("llama3-8b causal GQA 32:8 D128 N16384", "causal", 1, 32, 8, 16384, 128, 128),
    Case("gemma2 global softcap 50 GQA 16:8 D256 N8192", "softcap_causal", 1, 16, 8, 8192, 256, 256),
    Case("gemma2 local window 4096 softcap 50 GQA 16:8 D256 N8192", "softcap_window", 1, 16, 8, 8192, 256, 256),
    Case("causal D256 B2 H8 N4096", "causal", 2, 8, 8, 4096, 256, 256),
    *(Case(f"packed {d} documents (mask) H16 D128 N16384", "docs", 1, 16, 16, 16384, 128, 128, d) for d in (4, 12, 64)),
    *(
        Case(f"packed {d} documents (jagged) H16 D128 N16384", "jagged", 1, 16, 16, 16384, 128, 128, d)
        for d in (4, 12, 64)
    ),
    Case("causal D96 B4 H12 N4096", "causal", 4, 12, 12, 4096, 96, 96),
    Case("causal D64 B8 H16 N2048", "causal", 8, 16, 16, 2048, 64, 64),
    Case("causal odd N5000 D128 B2 H16", "causal", 2, 16, 16, 5000, 128, 128),
    Case("causal E192 F128 (MLA) B1 H16 N8192", "causal", 1, 16, 16, 8192, 192, 128),
]


def document_lengths(total: int, count: int, seed: int = 0) -> list[int]:
    """``count`` lengths from a log-normal (σ 1) that add up to ``total``, each at least 1."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.exp(torch.randn(count, generator=g, dtype=torch.float64))
    lengths = [max(1, int(x)) for x in (raw / raw.sum() * total).tolist()]
    lengths[lengths.index(max(lengths))] += total - sum(lengths)
    return lengths


def kept_pairs(case: Case, lengths: list[int]) -> int:
    """The (query, key) pairs the case's mask keeps."""
    if case.form in ("docs", "jagged"):
        return sum(n * (n + 1) // 2 for n in lengths)
    if case.form in ("window", "softcap_window"):
        return sum(min(m + 1, case.window) for m in range(case.N))
    return case.N * (case.N + 1) // 2


def implementations(case: Case, q, k, v, lengths: list[int]) -> tuple[dict, dict]:
    """Each implementation's forward (a zero-argument callable), and the error of each peer that cannot run."""
    causal = example("causal")[1]
    impls, failed = {}, {}
    flex_mask, flex_score = peers.causal_mask, None
    if case.form in ("docs", "jagged"):
        ids = torch.repeat_interleave(torch.arange(len(lengths), device="cuda"), torch.tensor(lengths, device="cuda"))
        if case.form == "docs":
            op = example("document_mask")[1]
            doc = ids[None].to(torch.int32)
            impls["einflash"] = lambda: op(q, k, v, doc=doc)
        else:
            cu = torch.tensor([0, *lengths], device="cuda").cumsum(0).to(torch.int32)
            impls["einflash"] = lambda: causal(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu)

        def flex_mask(b, h, qi, ki):
            return (ids[qi] == ids[ki]) & (qi >= ki)

    elif case.form == "softcap_causal":
        impls["einflash"] = lambda: gemma_global(q, k, v, cap=50.0)
        flex_score = peers.softcap_mod(50.0)
    elif case.form == "softcap_window":
        impls["einflash"] = lambda: gemma_local(q, k, v, cap=50.0, window=case.window)
        flex_mask, flex_score = peers.sliding_mask(case.window), peers.softcap_mod(50.0)
    else:
        impls["einflash"] = lambda: causal(q, k, v)
        for peer in peers.SDPA_BACKENDS:
            try:
                impls[peer] = peers.sdpa(peer, q, k, v, causal=True)
            except Exception as e:  # noqa: BLE001 -- a peer that refuses the case is reported
                failed[peer] = e
    try:
        impls["flex"] = peers.flex(q, k, v, mask_mod=flex_mask, score_mod=flex_score)
    except Exception as e:  # noqa: BLE001
        failed["flex"] = e
    return impls, failed


def emit(rows: list, out: pathlib.Path, **record) -> None:
    rows.append(record)
    print(json.dumps(record), flush=True)
    out.write_text(json.dumps(rows, indent=1))


def perf(rows: list, out: pathlib.Path, case: Case, deadline: float) -> None:
    lengths = document_lengths(case.N, case.docs) if case.docs else []
    q = torch.randn(case.B, case.Hq, case.N, case.E, device="cuda", dtype=DT, requires_grad=True)
    k = torch.randn(case.B, case.Hkv, case.N, case.E, device="cuda", dtype=DT, requires_grad=True)
    v = torch.randn(case.B, case.Hkv, case.N, case.F, device="cuda", dtype=DT, requires_grad=True)
    grad = torch.randn(case.B, case.Hq, case.N, case.F, device="cuda", dtype=DT)
    flops = 2 * case.B * case.Hq * kept_pairs(case, lengths) * (case.E + case.F)
    impls, failed = implementations(case, q, k, v, lengths)
    for peer, e in failed.items():
        emit(rows, out, kind="perf", case=case.label, impl=peer, error=f"{type(e).__name__}: {str(e)[:300]}")
    for impl, fn in impls.items():
        if time.time() - T0 > deadline:
            emit(rows, out, kind="skipped", case=case.label, impl=impl, reason="deadline")
            continue
        record = dict(kind="perf", case=case.label, impl=impl, shape=dataclasses.asdict(case), documents=lengths)
        try:
            with torch.no_grad():
                fn()
                record["fwd_ms"] = do_bench(fn, warmup=10, rep=50)

            def step(fn=fn):
                fn().backward(grad)

            step()
            record["fwd_bwd_ms"] = do_bench(step, warmup=5, rep=30, grad_to_none=[q, k, v])
            record["fwd_tflops"] = flops / record["fwd_ms"] / 1e9
            record["fwd_bwd_tflops"] = 3.5 * flops / record["fwd_bwd_ms"] / 1e9
        except Exception as e:  # noqa: BLE001 -- a case an implementation cannot run is reported
            record["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            record["trace"] = traceback.format_exc()[-600:]
        emit(rows, out, **record)
        q.grad = k.grad = v.grad = None
    torch.cuda.empty_cache()


CHECKS = [  # (B, Hq, Hkv, M = N, E, F): GQA 4:1 at each head dim
    (2, 8, 2, 300, 256, 256),
    (2, 8, 2, 300, 192, 128),
    (2, 8, 2, 300, 96, 96),
    (2, 8, 2, 300, 80, 80),
    (2, 8, 2, 300, 64, 64),
]


def checks(rows: list, out: pathlib.Path) -> None:
    """Gradients at the new shapes (and a jagged batch) against the float64 reference, bf16 and fp16."""
    causal = example("causal")[1]
    for dtype in (torch.bfloat16, torch.float16):
        for B, Hq, Hkv, N, E, F in CHECKS:
            g = torch.Generator(device="cuda").manual_seed(0)
            given = {
                "q": torch.randn(B, Hq, N, E, device="cuda", dtype=dtype, generator=g),
                "k": torch.randn(B, Hkv, N, E, device="cuda", dtype=dtype, generator=g),
                "v": torch.randn(B, Hkv, N, F, device="cuda", dtype=dtype, generator=g),
            }
            for name, op in (("causal", causal), ("gemma_local", gemma_local)):
                params = {"window": 100} if name == "gemma_local" else {}
                leaves = trainable(op, given)
                o = op(**leaves, **params)
                d_o = torch.randn_like(o)
                o.backward(d_o)
                verdicts = check_gradients(op, {n: x.grad for n, x in leaves.items()}, d_o, **given, **params)
                emit(
                    rows,
                    out,
                    kind="check",
                    variant=name,
                    dtype=str(dtype),
                    shape=[B, Hq, Hkv, N, E, F],
                    ok=all(x.ok for x in verdicts.values()),
                    gradients={n: x.as_dict() for n, x in verdicts.items()},
                )
        _jagged_check(rows, out, causal, dtype)


def _jagged_check(rows: list, out: pathlib.Path, op, dtype) -> None:
    """A jagged batch's gradients, each sequence's slice against the float64 reference on that sequence."""
    lengths = [300, 1000, 17, 777, 129]
    cu = torch.tensor([0, *lengths], device="cuda").cumsum(0)
    g = torch.Generator(device="cuda").manual_seed(1)
    T = int(cu[-1])
    given = {
        n: torch.randn(1, h, T, 128, device="cuda", dtype=dtype, generator=g) for n, h in (("q", 8), ("k", 2), ("v", 2))
    }
    leaves = trainable(op, given)
    o = op(**leaves, cu_seqlens_q=cu, cu_seqlens_k=cu)
    d_o = torch.randn_like(o)
    o.backward(d_o)
    ok = True
    for start, n in zip(cu.tolist(), lengths):
        part = {name: x.narrow(2, start, n) for name, x in given.items()}
        grads = {name: x.grad.narrow(2, start, n) for name, x in leaves.items()}
        ok &= all(x.ok for x in check_gradients(op, grads, d_o.narrow(2, start, n), **part).values())
    emit(rows, out, kind="check", variant="causal (jagged)", dtype=str(dtype), lengths=lengths, ok=bool(ok))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--cases", default=None, help="comma-separated substrings of the rows to run")
    ap.add_argument("--checks", action="store_true", help="also the gradient checks at the new shapes")
    ap.add_argument("--deadline", type=float, default=540.0, help="seconds after which nothing new starts")
    a = ap.parse_args()
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "training.json"
    rows: list = [peers.environment()]
    for case in CASES:
        if a.cases and not any(c in case.label for c in a.cases.split(",")):
            continue
        perf(rows, path, case, a.deadline)
    if a.checks and time.time() - T0 < a.deadline:
        checks(rows, path)
    for r in rows:
        if r.get("kind") == "perf" and "fwd_tflops" in r:
            print(
                f"{r['case'][:60]:60s} {r['impl']:12s} fwd {r['fwd_tflops']:6.1f}  fwd+bwd {r['fwd_bwd_tflops']:6.1f}"
            )


if __name__ == "__main__":
    main()
