"""The result tables of docs/benchmarks.md and the README's summary, generated from the JSON in benchmarks/results/.

    python3 benchmarks/report.py            # rewrite the generated sections of docs/benchmarks.md and README.md
    python3 benchmarks/report.py --check    # exit 1 (with a diff) if either file is stale against the JSON
    python3 benchmarks/report.py --print    # print every generated section, write nothing

Each generated section stands between ``<!-- report.py:NAME -->`` and ``<!-- /report.py:NAME -->`` in
its file; the text around the markers is written by hand and left alone. The sections come from the
runs in ``RUNS`` below (one entry per kept JSON file, with the commit it measured, which the older
files do not record themselves). Every ratio against a peer divides two numbers measured in the same
process of the same run; numbers from different runs are never divided.

To publish a new run: add its JSON under benchmarks/results/, point the entry of ``RUNS`` at it (with
its commit), list it in benchmarks/results/README.md, run this script and commit the result.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import pathlib
import re
import sys
from dataclasses import dataclass

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DOC = ROOT / "docs" / "benchmarks.md"
README = ROOT / "README.md"


@dataclass(frozen=True)
class Run:
    """One kept JSON file: what it holds, the commit it measured, and where its environment record is."""

    path: str  # under benchmarks/results
    commit: str
    what: str
    env_from: str | None = None  # a file of the same run with the env record, when this one has none


RUNS = {
    "forward": Run(
        "h100_2026-12-06_session4_01a8476/forward.json",
        "8b81de6 + the gather work of 01a8476 (NOTES.md)",
        "forward TFLOP/s, decode TB/s, anchors (gpu_session.py → bench_forward.py)",
    ),
    "checks": Run(
        "h100_2026-12-06_session4_01a8476/checks.json",
        "8b81de6 + the gather work of 01a8476 (NOTES.md)",
        "forward and gradient checks of the catalogue (gpu_session.py)",
        env_from="h100_2026-12-06_session4_01a8476/forward.json",
    ),
    "training": Run(
        "h100_2026-12-06_session3_b073019/backward.json",
        "b073019",
        "forward+backward TFLOP/s and gradient checks (bench_backward.py)",
    ),
    "lse": Run(
        "h200_2026-12-01_session_7a144e7/lse.json", "bad1f68", "log-sum-exp output checks (bench_forward.py --only lse)"
    ),
    "tune": Run(
        "h200_2026-12-01_session_7a144e7/tune.json",
        "7a144e7",
        "tuned against default, warm against cold studies (bench_tune.py)",
    ),
    "model_training": Run(
        "h100_2026-12-08_session13_costs/training.json",
        "7210a14",
        "training at model shapes beside Flex, cuDNN, FA2 (bench_training.py)",
    ),
    "costs": Run(
        "h100_2026-12-08_session13_costs/fit.json",
        "7210a14 (the rows); the fit at this session's head (NOTES.md)",
        "the cost model's predictions against the forward rows at seven schedules (calibrate.py)",
    ),
    "offsets": Run(
        "h100_2026-12-07_session7_bac3b24/offsets.json",
        "bac3b24",
        "tables read at offsets and gathered, beside ALiBi and FlexAttention (bench_offsets.py)",
    ),
    "passes": Run(
        "h100_2026-12-07_session5_2adf380/passes.json",
        "2adf380",
        "variants of two passes and the sink logit beside PyTorch compositions (bench_passes.py)",
    ),
    "beyond": Run(
        "h100_2026-12-07_session7_bac3b24/beyond.json",
        "bac3b24 (NOTES.md)",
        "multi-token attention and MoBA beside PyTorch compositions (bench_passes.py --variants multi_token,moba)",
    ),
    "topk": Run(
        "h100_2026-12-07_session8_17930b6/topk.json",
        "17930b6 (NOTES.md)",
        "top-k attention beside PyTorch compositions, and its checks (bench_passes.py --variants top_k)",
    ),
    "two_pass": Run(
        "h100_2026-12-07_session8_17930b6/two_pass.json",
        "17930b6",
        "the renormalised threshold's forward+backward beside PyTorch compositions (bench_passes.py)",
    ),
    "host_decode": Run(
        "h200_2026-12-01_replay_ffaa2dd/host.json",
        "ffaa2dd",
        "host time of a decode call (host_overhead.py)",
        env_from="h200_2026-12-01_replay_ffaa2dd/backward_sweep.json",
    ),
    "host_training": Run(
        "h200_2026-12-02_final_3466567/host_training.json",
        "3466567",
        "host time of a training step, launches stubbed out (host_training.py)",
        env_from="h200_2026-12-02_final_3466567/forward.json",
    ),
}

# implementation names in the JSON → column titles
PEERS = (("sdpa-cudnn", "cuDNN (SDPA)"), ("sdpa-flash", "FA2 (SDPA)"), ("flex", "FlexAttention"))


class ReportError(Exception):
    pass


# -- reading ---------------------------------------------------------------------------------------


def load(name: str):
    path = RESULTS / RUNS[name].path
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ReportError(f"{path} is missing (RUNS[{name!r}] names it)") from None
    except json.JSONDecodeError as e:
        raise ReportError(f"{path} is not valid JSON: {e}") from None


def env(name: str) -> dict:
    """The run's environment record (GPU, torch, Triton, date) with the commit from RUNS."""
    run = RUNS[name]
    source = run.env_from or run.path
    rows = json.loads((RESULTS / source).read_text())
    found = next((r for r in rows if isinstance(r, dict) and r.get("kind") == "env"), None)
    if found is None:
        raise ReportError(f"{source} has no env record")
    return {**found, "commit": run.commit}


def stamp(name: str) -> str:
    e = env(name)
    return (
        f"{e['gpu']}, torch {e['torch']}, Triton {e['triton']}, {e['date']}, einflash at commit {e['commit']} "
        f"(`{RUNS[name].path}`)"
    )


def cell(x: float | None, digits: int = 1) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def ratio(a: float | None, b: float | None) -> str:
    return "—" if a is None or b is None or not b else f"{a / b:.2f}"


def table(head: list[str], rows: list[list[str]], align: list[str] | None = None) -> list[str]:
    align = align or ["l"] + ["r"] * (len(head) - 1)
    rule = ["---" if a == "l" else "---:" for a in align]
    return ["| " + " | ".join(head) + " |", "| " + " | ".join(rule) + " |"] + [
        "| " + " | ".join(r) + " |" for r in rows
    ]


def by_case(rows: list[dict], kinds: tuple[str, ...], value: str) -> dict[str, dict[str, float]]:
    """{case: {impl: value}} over the records of ``kinds`` that have ``value``, in the order they came."""
    out: dict[str, dict[str, float]] = {}
    for r in rows:
        if r.get("kind") in kinds and value in r and "error" not in r:
            out.setdefault(r["case"], {})[r["impl"]] = r[value]
    return out


def other_schedules(cases: dict[str, dict[str, float]]) -> list[str]:
    """The einflash[...] implementations (fixed schedules beside the default) a run timed, in order."""
    seen: list[str] = []
    for d in cases.values():
        seen += [i for i in d if i.startswith("einflash[") and i not in seen]
    return seen


# -- sections --------------------------------------------------------------------------------------


def runs_section() -> list[str]:
    rows = []
    for name, run in RUNS.items():
        e = env(name)
        rows.append([f"`{run.path}`", run.what, e["gpu"], e["torch"], e["triton"], f"`{e['commit']}`", e["date"]])
    return table(
        ["file", "what it holds", "GPU", "torch", "Triton", "commit", "date"], rows, ["l", "l", "l", "l", "l", "l", "l"]
    )


def forward_section() -> list[str]:
    rows = load("forward")
    anchors = {r["case"]: r for r in rows if r.get("kind") == "anchor"}
    cases = by_case(rows, ("prefill",), "tflops")
    extra = other_schedules(cases)
    head = (
        ["case (B,H,N,D), bf16", "einflash"]
        + [f"einflash {i[8:]}" for i in extra]
        + [t for _, t in PEERS]
        + ["einflash / Flex", "einflash / cuDNN"]
    )
    body = []
    for case, d in cases.items():
        mine = d.get("einflash")
        body.append(
            [case, cell(mine)]
            + [cell(d.get(i)) for i in extra]
            + [cell(d.get(p)) for p, _ in PEERS]
            + [ratio(mine, d.get("flex")), ratio(mine, d.get("sdpa-cudnn"))]
        )
    mm, cp = anchors.get("matmul 8192^3 bf16", {}), anchors.get("device copy 1 GiB", {})
    return (
        [f"Forward TFLOP/s. {stamp('forward')}.", ""]
        + table(head, body)
        + [
            "",
            f"Anchors measured in the same run: bf16 matrix product 8192³ {cell(mm.get('tflops'), 0)} TFLOP/s; "
            f"device-to-device copy of 1 GiB {cell(cp.get('tbps'), 2)} TB/s (bytes read and written).",
        ]
    )


def decode_section() -> list[str]:
    rows = load("forward")
    copy = next((r["tbps"] for r in rows if r.get("kind") == "anchor" and "tbps" in r), None)
    decode = [r for r in rows if r.get("kind") == "decode" and "error" not in r]
    if not decode:
        return ["(no decode records in the run)"]
    case = decode[0]["case"]
    per_call = {r["impl"]: r["tbps"] for r in decode}
    graph = {r["impl"]: r.get("graph_tbps") for r in decode}
    us = {r["impl"]: (r["ms"] * 1e3, r.get("graph_ms", math.nan) * 1e3) for r in decode}
    order = ["einflash"] + [i for i in per_call if i.startswith("einflash[")] + [p for p, _ in PEERS if p in per_call]
    titles = dict(PEERS)
    body = [
        [
            titles.get(i, i),
            cell(us[i][0], 0),
            cell(per_call[i], 2),
            cell(us[i][1], 0),
            cell(graph[i], 2),
            ratio(graph[i], copy),
        ]
        for i in order
    ]
    mine = per_call.get("einflash"), graph.get("einflash")
    return (
        [f"Decoding, {case}: TB/s of K and V read. {stamp('forward')}.", ""]
        + table(
            [
                "implementation",
                "µs per call",
                "TB/s per call",
                "µs from a CUDA graph",
                "TB/s from a CUDA graph",
                "CUDA graph / copy",
            ],
            body,
        )
        + [
            "",
            f"einflash / Flex: {ratio(mine[0], per_call.get('flex'))} per call, {ratio(mine[1], graph.get('flex'))} "
            f"from a CUDA graph; einflash / cuDNN: {ratio(mine[0], per_call.get('sdpa-cudnn'))} and "
            f'{ratio(mine[1], graph.get("sdpa-cudnn"))}. "copy" is the device copy anchor of the same run '
            f"({cell(copy, 2)} TB/s).",
        ]
    )


def training_section() -> list[str]:
    rows = load("training")
    cases = by_case(rows, ("perf",), "tflops")
    extra = other_schedules(cases)
    head = (
        ["case (B,H,N,D), bf16", "einflash"]
        + [f"einflash {i[8:]}" for i in extra]
        + [t for _, t in PEERS]
        + ["einflash / Flex", "einflash / cuDNN"]
    )
    body = []
    for case, d in cases.items():
        mine = d.get("einflash")
        body.append(
            [case, cell(mine)]
            + [cell(d.get(i)) for i in extra]
            + [cell(d.get(p)) for p, _ in PEERS]
            + [ratio(mine, d.get("flex")), ratio(mine, d.get("sdpa-cudnn"))]
        )
    ms = by_case(rows, ("perf",), "fwd_bwd_ms")
    ms_body = [[case, cell(d.get("einflash"), 2)] + [cell(d.get(p), 2) for p, _ in PEERS] for case, d in ms.items()]
    return (
        [f"Forward+backward TFLOP/s (3.5 × the forward's FLOPs per step). {stamp('training')}.", ""]
        + table(head, body)
        + ["", "The same steps in ms (forward and backward, mean of `do_bench`):", ""]
        + table(["case", "einflash"] + [t for _, t in PEERS], ms_body)
    )


def model_training_section() -> list[str]:
    rows = load("model_training")
    fwd = by_case(rows, ("perf",), "fwd_tflops")
    step = by_case(rows, ("perf",), "fwd_bwd_tflops")
    body = []
    for case, d in fwd.items():
        s = step.get(case, {})
        body.append(
            [case]
            + [cell(d.get(i)) for i in ("einflash", "flex", "sdpa-cudnn")]
            + [ratio(d.get("einflash"), d.get("flex"))]
            + [cell(s.get(i)) for i in ("einflash", "flex", "sdpa-cudnn")]
            + [ratio(s.get("einflash"), s.get("flex"))]
        )
    head = ["case, bf16, TFLOP/s of kept pairs", "fwd: einflash", "Flex", "cuDNN", "÷ Flex"]
    head += ["fwd+bwd: einflash", "Flex", "cuDNN", "÷ Flex"]
    return [f"{stamp('model_training')}.", ""] + table(head, body)


def costs_section() -> list[str]:
    rows = load("costs")
    fit = next(r for r in rows if r.get("kind") == "fit")
    measured = [r for r in rows if r.get("kind") == "row"]
    body = [
        [
            r["case"],
            r["priced"],
            cell(r["ms"], 3),
            cell(r["predicted"]["ms"], 3),
            f"{r['predicted']['ms'] / r['ms']:.2f}",
            r["predicted"]["bound"],
            " / ".join(cell(r["predicted"]["units_ms"][u], 2) for u in ("tensor-core", "special-function", "ALU")),
        ]
        for r in measured
        if r["default"]
    ]
    others = [r["predicted"]["ms"] / r["ms"] for r in measured if not r["default"]]
    return (
        [
            f"Predicted against measured, at the default schedules. {stamp('costs')}; the products at "
            f"{fit['dot_efficiency']:.2f} of the tensor-core rate, overlap {fit['overlap'][0]:.1f} with one "
            f"program per SM and {fit['overlap'][1]:.1f} with several.",
            "",
        ]
        + table(
            ["case", "schedule", "measured ms", "predicted ms", "ratio", "binds", "tensor / SFU / ALU ms"],
            body,
        )
        + [
            "",
            f"At the {len(others)} other schedules of the same rows, the ratio ran from {min(others):.2f} to "
            f"{max(others):.2f}.",
        ]
    )


def offsets_section() -> list[str]:
    rows = load("offsets")
    checks = [r for r in rows if r.get("kind") == "check"]
    perf = {r["case"]: r for r in rows if r.get("kind") == "perf"}
    alibi = perf.get("einflash alibi", {})

    def rate(case: str, part: str) -> float | None:
        return perf.get(case, {}).get(part, {}).get("tflops")

    parts = ("forward", "forward+backward")
    body = []
    for case in perf:
        flex = "flex" + case.removeprefix("einflash") if case.startswith("einflash") else case  # its peer row
        body.append(
            [case]
            + [cell(rate(case, part)) for part in parts]
            + [ratio(rate(case, part), rate(flex, part)) if flex in perf else "—" for part in parts]
            + [ratio(rate(case, part), alibi.get(part, {}).get("tflops")) for part in parts]
        )
    ok = sum(1 for r in checks if r.get("ok"))
    tables = any({"rel", "table"} & set(r.get("gradients", {})) for r in checks)  # runs before tables learned: no
    return [
        f"bf16 (2,16,8192,128), TFLOP/s: a per-head table of 2N − 1 biases read at `rel[h, n − m + M − 1]` and "
        f"T5's bucketed bias `table[h, bucket[n − m + M − 1]]`, frozen and learning (forward+backward only), beside "
        f"einflash's ALiBi and FlexAttention making the same reads in its score_mod. Checked after timing against "
        f"the float64 reference: {ok} of {len(checks)} (bf16, fp16; prefill and decode; forward and the "
        f"gradients of q, k, v{' and the table' if tables else ''}). "
        f"{stamp('offsets')}.",
        "",
    ] + table(
        ["case", "forward", "forward+backward", "/ Flex fwd", "/ Flex fwd+bwd", "/ ALiBi fwd", "/ ALiBi fwd+bwd"],
        body,
    )


def passes_section(run: str = "passes") -> list[str]:
    rows = load(run)
    env = next(r for r in rows if r.get("kind") == "env")
    checks = [r for r in rows if r.get("kind") == "check"]
    perf = {(r["case"], r.get("part", "forward")): r for r in rows if r.get("kind") == "perf"}

    def ms(case: str, part: str) -> float | None:
        return perf.get((case, part), {}).get(part, {}).get("ms")

    body = []
    for (case, part), r in perf.items():
        name = case.split()[-1]
        body.append(
            [case, part, cell(ms(case, part), 3), cell(r.get("peak_extra_mib"), 1)]
            + [
                ratio(ms(f"{peer} {name}", part), ms(case, part))
                if case.startswith("einflash") and (f"{peer} {name}", part) in perf
                else "—"
                for peer in ("torch.compile", "torch eager")
            ]
        )
    ok = sum(1 for r in checks if r.get("ok"))
    checked = (
        f"Checked against the float64 reference: {ok} of {len(checks)} (bf16, fp16; prefill, and decode with one "
        f"query and GQA; with the gradients of every input where the backward exists)"
        if checks
        else "No checks in this run"
    )
    return [
        f"bf16 {tuple(env.get('shape', ()))} (B, H, N, D), milliseconds and the peak memory a call adds (MiB): "
        f"einflash beside the same maths composed in PyTorch, eager and under torch.compile (which materialise "
        f"the M×N weights); the speed-up columns are the peer's time over einflash's. {checked}. {stamp(run)}.",
        "",
    ] + table(["case", "part", "ms", "peak MiB", "torch.compile / einflash", "eager / einflash"], body)


def _ratio_of(v: dict) -> float:
    return v["max_error"] / v["tolerance"] if v.get("tolerance") else math.inf


def checks_section() -> list[str]:
    rows = [r for r in load("checks") if r.get("suite") == "forward"]
    ran = [r for r in rows if r.get("ok") is not None]
    cols = [("prefill", "bfloat16"), ("prefill", "float16"), ("decode", "bfloat16"), ("decode", "float16")]
    shapes = {
        c: next((r["shape"] for r in ran if (r.get("case"), r.get("dtype")) == c and r["variant"] == "softmax"), None)
        for c in cols
    }
    grid: dict[str, dict[tuple, dict]] = {}
    for r in ran:
        grid.setdefault(r["variant"], {})[(r.get("case"), r.get("dtype"))] = r

    def mark(r: dict | None) -> str:
        if r is None:
            return "—"
        if "max_error" not in r:
            return "✗ " + r.get("error", "failed")[:60]
        return ("✓ " if r["ok"] else "✗ ") + f"{_ratio_of(r):.3f}"

    body = [[f"`{v}`"] + [mark(cells.get(c)) for c in cols] for v, cells in sorted(grid.items())]
    failed = [r for r in ran if not r["ok"]]
    skipped = sorted({r["variant"] for r in rows if r.get("ok") is None})
    worst = max((r for r in ran if "max_error" in r), key=_ratio_of, default=None)
    lines = [
        f"Forward checks: {len(ran)} runs of {len(grid)} lowered variants, {len(ran) - len(failed)} within the "
        f"tolerance rule{', ' + str(len(failed)) + ' not' if failed else ''}. {stamp('checks')}.",
        "",
        "Each cell: ✓ when within the rule, and the largest error divided by its tolerance (1.000 would be "
        "at the limit). Shapes [B, Hq, Hkv, M, N, D]: prefill "
        f"{shapes[cols[0]]}, decode {shapes[cols[2]]} (a variant's own head counts or a smaller size where "
        "its module says so).",
        "",
    ]
    lines += table(["variant", "prefill bf16", "prefill fp16", "decode bf16", "decode fp16"], body)
    if worst is not None:
        lines += [
            "",
            f"Closest to its tolerance: `{worst['variant']}` {worst['case']} {worst['dtype']}, error "
            f"{worst['max_error']:.3g} against {worst['tolerance']:.3g}.",
        ]
    if skipped:
        lines += ["", f"Not lowered yet (reference executor only): {', '.join(f'`{s}`' for s in skipped)}."]
    grads = [r for r in load("checks") if r.get("suite") == "backward" and r.get("ok") is not None]
    if grads:
        lines += [
            "",
            f"The same run checked the gradients of the backward as it was at that commit (two launches): "
            f"{sum(r['ok'] for r in grads)} of {len(grads)} within the rule.",
        ]
    return lines


def gradients_section() -> list[str]:
    # gpu_session.py's checks part runs the gradient checks beside the forward ones (suite "backward")
    rows = [r for r in load("checks") if r.get("kind") == "check" and r.get("suite") == "backward"]
    ran = [r for r in rows if r.get("ok") is not None]
    dtypes = ["bfloat16", "float16"]
    grid: dict[str, dict[str, dict]] = {}
    for r in ran:
        grid.setdefault(r["variant"], {})[r["dtype"]] = r

    def mark(r: dict | None) -> str:
        if r is None:
            return "— (not in the JSON)"
        if "inputs" not in r:
            return "✗ " + r.get("error", "failed")[:60]
        worst = max(r["inputs"].items(), key=lambda kv: _ratio_of(kv[1]))
        return ("✓ " if r["ok"] else "✗ ") + f"{_ratio_of(worst[1]):.3f} ({worst[0]})"

    body = [
        [f"`{v}`", ", ".join(next(iter(cells.values()))["inputs"]) if "inputs" in next(iter(cells.values())) else ""]
        + [mark(cells.get(t)) for t in dtypes]
        for v, cells in sorted(grid.items())
    ]
    shape = next((r["shape"] for r in ran if r["variant"] == "softmax"), None)
    failed = [r for r in ran if not r["ok"]]
    skipped = sorted({r["variant"] for r in rows if r.get("ok") is None})
    lines = [
        f"Gradient checks: {len(ran)} in the JSON, {len(ran) - len(failed)} within the tolerance rule. "
        f"{stamp('checks')}.",
        "",
        f"Shape [B, Hq, Hkv, M, N, D] {shape}; every floating-point input's gradient is checked. Each cell: "
        "the input whose error is closest to its tolerance, as error / tolerance.",
        "",
    ]
    lines += table(["variant", "inputs", "bf16", "fp16"], body, ["l", "l", "r", "r"])
    if skipped:
        lines += ["", f"No backward (not lowered): {', '.join(f'`{s}`' for s in skipped)}."]
    return lines


def lse_section() -> list[str]:
    rows = [r for r in load("lse") if r.get("kind") == "lse"]
    ok = [r for r in rows if r.get("ok")]
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    worst = max(rows, key=lambda r: r["max_error"] / r["tolerance"] if "tolerance" in r else math.inf)
    return [
        f"`return_lse=True`: {len(ok)} of {len(rows)} checks within tolerance ({', '.join(variants)}; bf16 and "
        f"fp16; prefill 4096² and GQA decode at 32768 keys), rows without keys −inf where the reference's are; "
        f"largest error {max(r['max_error'] for r in rows):.2g}; closest to its tolerance: {worst['variant']} "
        f"{worst['case']} {worst['dtype']}, {worst['max_error']:.2g} against {worst['tolerance']:.2g}. "
        f"{stamp('lse')}."
    ]


def _sched(s: dict) -> str:
    text = f"{s['block_m']}x{s['block_n']} w{s['num_warps']} s{s['num_stages']}"
    if s.get("splits", 1) > 1:
        text += f" splits {s['splits']}"
    if s.get("max_registers"):
        text += f" r{s['max_registers']}"
    if s.get("reverse_m"):
        text += " reversed"
    return text


def tuning_section() -> list[str]:
    rows = load("tune")
    e = next(r for r in rows if r.get("kind") == "env")
    tuned = [r for r in rows if r.get("kind") == "tuned"]
    body = [
        [
            r["case"],
            _sched(r["default"]),
            cell(r["default_ms"], 3),
            _sched(r["best"]),
            cell(r["tuned_ms"], 3),
            f"{r['speedup']:.2f}×",
            f"{r['measured']}",
            cell(r["tuning_s"], 1),
        ]
        for r in tuned
    ]
    lines = [
        f"Tuned against default. {stamp('tune')}; Optuna {e.get('optuna', '?')}, a budget of "
        f"{e.get('trials', '?')} schedules per study.",
        "",
    ]
    lines += table(["case", "default", "ms", "tuned", "ms", "speedup", "measured", "tuning s"], body)
    warm = [r for r in rows if r.get("kind") == "warm_vs_cold"]
    if warm:

        def first(x):
            return "not within 5%" if x is None else str(x)

        wbody = [
            [
                r["case"],
                first(r["cold"]["to_within_5pct"]),
                cell(r["cold"]["best_ms"], 3),
                cell(r["cold"]["seconds"], 1),
                first(r["warm"]["to_within_5pct"]),
                cell(r["warm"]["best_ms"], 3),
                cell(r["warm"]["seconds"], 1),
            ]
            for r in warm
        ]
        lines += [
            "",
            "Warm against cold studies at a neighbouring shape (N = 4096, the tuned N = 8192 row in the "
            f"cache), {warm[0]['trials']} schedules each: how many schedules each measured before one came "
            "within 5% of the best either found, its best, and its seconds.",
            "",
        ]
        lines += table(
            ["case", "cold: schedules", "cold: best ms", "cold: s", "warm: schedules", "warm: best ms", "warm: s"],
            wbody,
        )
    return lines


def host_section() -> list[str]:
    d = load("host_decode")
    keys = [k for k, v in d.items() if isinstance(v, (int, float))]
    lines = [
        f"Host time of the decode call (GQA 32:8, D 128, B 4, 32768 keys, bf16), µs per call over 2000 calls "
        f"issued back to back. {stamp('host_decode')}. Schedule: `{d.get('schedule')}`.",
        "",
    ]
    lines += table(["what", "µs per call"], [[k, cell(d[k], 0)] for k in keys])
    t = load("host_training")
    lines += [
        "",
        f"Host time of a training step ({t['variant']}, B={t['B']}, H={t['H']}, N={t['N']}, D={t['D']}, "
        f"{t['dtype']}, on {t['device']}) with every kernel launch stubbed out, median of five rounds of "
        f"100 steps. {stamp('host_training')}.",
        "",
    ]
    paths = [
        ("custom ops (as a `torch.compile`d step runs)", "custom_ops_us"),
        ("autograd Function, every call recorded anew", "function_recorded_us"),
        ("autograd Function, replayed (the eager default)", "function_replayed_us"),
    ]
    lines += table(["path", "ms per step"], [[what, cell(t[key] / 1e3, 2)] for what, key in paths])
    return lines


def summary_section() -> list[str]:
    """The README's one table: forward and training beside FlexAttention and cuDNN, no commits, no narrative."""
    f, t = load("forward"), load("training")
    fwd, trn = by_case(f, ("prefill",), "tflops"), by_case(t, ("perf",), "tflops")
    ef, et = env("forward"), env("training")
    body = []
    fr, tr = [], []
    for case in fwd:
        a, b = fwd[case], trn.get(case, {})
        body.append(
            [
                case,
                cell(a.get("einflash")),
                cell(a.get("flex")),
                cell(a.get("sdpa-cudnn")),
                cell(b.get("einflash")),
                cell(b.get("flex")),
                cell(b.get("sdpa-cudnn")),
            ]
        )
        if a.get("flex"):
            fr.append(a["einflash"] / a["flex"])
        if b.get("flex"):
            tr.append(b["einflash"] / b["flex"])
    gpu = ef["gpu"] if ef["gpu"] == et["gpu"] else f"{ef['gpu']} (forward), {et['gpu']} (training)"
    lines = table(["bf16, TFLOP/s", "forward: einflash", "Flex", "cuDNN", "training: einflash", "Flex", "cuDNN"], body)
    dates = sorted({ef["date"], et["date"]})
    lines += [
        "",
        f"{gpu}, torch {ef['torch']}, Triton {ef['triton']}, {' and '.join(dates)}; einflash's default "
        f"schedules, each number beside the peers timed in the same process. einflash / FlexAttention: "
        f"{min(fr):.2f} to {max(fr):.2f} forward, {min(tr):.2f} to {max(tr):.2f} training. cuDNN (through "
        f"SDPA) has no window, ALiBi or softcap form (—). Decoding, the checks, tuning and host time: "
        f"[docs/benchmarks.md](docs/benchmarks.md).",
    ]
    return lines


SECTIONS = {
    DOC: {
        "runs": runs_section,
        "forward": forward_section,
        "decode": decode_section,
        "training": training_section,
        "model_training": model_training_section,
        "costs": costs_section,
        "offsets": offsets_section,
        "passes": passes_section,
        "beyond": lambda: passes_section("beyond"),
        "two_pass": lambda: passes_section("two_pass"),
        "topk": lambda: passes_section("topk"),
        "checks": checks_section,
        "gradients": gradients_section,
        "lse": lse_section,
        "tuning": tuning_section,
        "host": host_section,
    },
    README: {"summary": summary_section},
}


# -- splicing --------------------------------------------------------------------------------------


def splice(text: str, name: str, body: list[str], path: pathlib.Path) -> str:
    start, end = f"<!-- report.py:{name} -->", f"<!-- /report.py:{name} -->"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise ReportError(f"{path.relative_to(ROOT)} has no {start} ... {end} section")
    return pattern.sub(lambda _: start + "\n" + "\n".join(body) + "\n" + end, text, count=1)


def render(path: pathlib.Path) -> tuple[str, str]:
    """The file's text now, and as it would be with every generated section regenerated."""
    try:
        old = path.read_text()
    except FileNotFoundError:
        raise ReportError(f"{path} is missing") from None
    new = old
    for name, fn in SECTIONS[path].items():
        new = splice(new, name, fn(), path)
    return old, new


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="fail if docs/benchmarks.md or README.md is stale")
    mode.add_argument("--print", action="store_true", help="print the generated sections, write nothing")
    a = ap.parse_args(argv)
    try:
        if a.print:
            for path, sections in SECTIONS.items():
                for name, fn in sections.items():
                    print(f"<!-- {path.relative_to(ROOT)}: {name} -->\n" + "\n".join(fn()) + "\n")
            return 0
        stale = []
        rendered = {path: render(path) for path in SECTIONS}  # every file rendered before any is written
        for path, (old, new) in rendered.items():
            if old == new:
                continue
            if a.check:
                stale.append(path)
                rel = str(path.relative_to(ROOT))
                sys.stdout.writelines(
                    difflib.unified_diff(
                        old.splitlines(True), new.splitlines(True), f"{rel} (committed)", f"{rel} (from the JSON)"
                    )
                )
            else:
                path.write_text(new)
                print(f"wrote {path.relative_to(ROOT)}")
        if stale:
            print(
                f"\nstale: {', '.join(str(p.relative_to(ROOT)) for p in stale)}; run python3 benchmarks/report.py",
                file=sys.stderr,
            )
            return 1
        return 0
    except ReportError as e:
        print(f"report.py: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
