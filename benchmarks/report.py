"""The README's results section, generated from the benchmark JSON in benchmarks/results/.

    python3 benchmarks/report.py benchmarks/results/<run>/forward.json [--backward .../backward.json]
                                 [--checks .../checks.json] [--commit REV] [--backward-commit REV]
                                 [--readme README.md]

Prints the Markdown (GPU, date, versions, one row per DESIGN §5 case with the ratios against
FlexAttention and cuDNN measured in the same run, the correctness summary of the catalogue);
with --readme, replaces what stands between the README's ``<!-- results -->`` and
``<!-- /results -->`` markers.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import re


def _best(d: dict, prefix: str) -> float:
    mine = [v for k, v in d.items() if k.startswith(prefix)]
    return max(mine) if mine else math.nan


def _cell(x: float, digits: int = 1) -> str:
    return "—" if x is None or math.isnan(x) else f"{x:.{digits}f}"


def forward_table(rows: list[dict]) -> list[str]:
    env = next(r for r in rows if r.get("kind") == "env")
    anchors = {r["case"]: r for r in rows if r.get("kind") == "anchor"}
    at = f", einflash at commit {env['commit']}" if env.get("commit") else ""
    lines = [f"Forward, bf16, {env['gpu']}, torch {env['torch']}, Triton {env['triton']}, {env['date']}{at}. "
             f"Anchors in the same run: bf16 matmul 8192³ "
             f"{_cell(anchors.get('matmul 8192^3 bf16', {}).get('tflops', math.nan), 0)} TFLOP/s, device copy "
             f"{_cell(anchors.get('device copy 1 GiB', {}).get('tbps', math.nan), 2)} TB/s.", "",
             "| case | einflash (default) | einflash (best of the run) | cuDNN SDPA | FA2 (SDPA flash) | FlexAttention "
             "| einflash / Flex | einflash / cuDNN |", "|---|---|---|---|---|---|---|---|"]
    by: dict[str, dict] = {}
    unit: dict[str, str] = {}
    for r in rows:
        if r.get("kind") in ("prefill", "decode") and "error" not in r:
            if "tflops" in r:
                by.setdefault(r["case"], {})[r["impl"]] = r["tflops"]
                unit[r["case"]] = "TFLOP/s"
                continue
            # decoding both ways: calls timed as the host issues them, and the GPU's own time from a CUDA graph
            for case, key in ((f"{r['case']}, per call", "tbps"), (f"{r['case']}, CUDA-graph replay", "graph_tbps")):
                if key in r:
                    by.setdefault(case, {})[r["impl"]] = r[key]
                    unit[case] = "TB/s of KV read"
    for case, d in by.items():
        default, tuned = d.get("einflash", math.nan), _best(d, "einflash")
        flex, cudnn = d.get("flex", math.nan), d.get("sdpa-cudnn", math.nan)
        lines.append(f"| {case} ({unit[case]}) | {_cell(default)} | {_cell(tuned)} | {_cell(cudnn)} | "
                     f"{_cell(d.get('sdpa-flash', math.nan))} | {_cell(flex)} | {_cell(tuned / flex, 2)} | "
                     f"{_cell(tuned / cudnn, 2)} |")
    lines.append("")
    lines.append("\"best of the run\" is the fastest schedule einflash ran in that run (its default and the schedules "
                 "a sweep or the tuner tried). TFLOP/s count 4·B·H·D per unmasked (query, key) pair, alike for every "
                 "implementation.")
    checks = [r for r in rows if r.get("kind") == "check"]
    if checks:
        ran = [r for r in checks if r.get("ok") is not None]
        failed = [r for r in ran if not r["ok"]]
        variants = sorted({r["variant"] for r in ran})
        worst = max((r for r in ran if r.get("tolerance")), key=lambda r: r["max_error"] / r["tolerance"], default=None)
        lines += ["", f"Correctness on the GPU: {len(ran)} checks ({len(variants)} lowered variants × bf16, fp16 × "
                      f"prefill and GQA decode) against the float64 reference under the tolerance rule, "
                      f"{len(ran) - len(failed)} passed" + (f", {len(failed)} failed: "
                      + ", ".join(sorted({r['variant'] for r in failed})) if failed else "") + "."]
        if worst is not None:
            lines.append(f"Closest to its tolerance: {worst['variant']} {worst['case']} {worst['dtype']}, error "
                         f"{worst['max_error']:.3g} against {worst['tolerance']:.3g}.")
        skipped = sorted({r["variant"] for r in checks if r.get("ok") is None})
        if skipped:
            lines.append(f"Not lowered yet (reference executor only): {', '.join(skipped)}.")
    return lines


def backward_table(rows: list[dict]) -> list[str]:
    """Forward+backward TFLOP/s per DESIGN §5 case, with the ratios against FlexAttention and cuDNN."""
    env = next(r for r in rows if r.get("kind") == "env")
    at = f", einflash at commit {env['commit']}" if env.get("commit") else ""
    lines = [f"Forward+backward, bf16, {env['gpu']}, torch {env['torch']}, Triton {env['triton']}, {env['date']}{at} "
             f"(TFLOP/s count 3.5× the forward's FLOPs per step: the forward, and 2.5× for the backward).", "",
             "| case | einflash (default) | einflash (best of the run) | cuDNN SDPA | FA2 (SDPA flash) | FlexAttention "
             "| einflash / Flex | einflash / cuDNN |", "|---|---|---|---|---|---|---|---|"]
    by: dict[str, dict] = {}
    for r in rows:
        if r.get("kind") == "perf" and "error" not in r:
            by.setdefault(r["case"], {})[r["impl"]] = r["tflops"]
    for case, d in by.items():
        mine, flex, cudnn = d.get("einflash", math.nan), d.get("flex", math.nan), d.get("sdpa-cudnn", math.nan)
        lines.append(f"| {case} | {_cell(mine)} | {_cell(_best(d, 'einflash'))} | {_cell(cudnn)} | "
                     f"{_cell(d.get('sdpa-flash', math.nan))} | {_cell(flex)} | {_cell(mine / flex, 2)} | "
                     f"{_cell(mine / cudnn, 2)} |")
    checks = [r for r in rows if r.get("kind") == "check" and r.get("ok") is not None]
    if checks:
        failed = sorted({r["variant"] for r in checks if not r["ok"]})
        dtypes = sorted({r["dtype"] for r in checks})
        per_dtype = ", ".join(f"{sum(r['dtype'] == t for r in checks)} in {t}" for t in dtypes)
        lines += ["", f"Gradients on the GPU: {len(checks)} checks of {len({r['variant'] for r in checks})} variants "
                      f"({per_dtype}; every floating-point input) against the float64 reference under the tolerance "
                      f"rule, {len(checks) - sum(not r['ok'] for r in checks)} passed"
                      + (f"; failed: {', '.join(failed)}" if failed else "") + "."]
    return lines


def splice(readme: pathlib.Path, lines: list[str]) -> None:
    text = readme.read_text()
    block = "<!-- results -->\n" + "\n".join(lines) + "\n<!-- /results -->"
    if "<!-- /results -->" in text:
        text = re.sub(r"<!-- results -->.*?<!-- /results -->", lambda _: block, text, flags=re.S)
    else:
        text = text.replace("<!-- results -->", block)
    readme.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("forward_json")
    ap.add_argument("--backward", default=None, help="the same run's backward.json (its checks may be merged in)")
    ap.add_argument("--checks", default=None, help="gpu_session.py's checks.json: each suite's checks join its table")
    ap.add_argument("--commit", default=None, help="the einflash commit the run measured (its tables name it)")
    ap.add_argument("--backward-commit", default=None,
                    help="the backward run's commit, where it is another run than the forward's (whose --checks then "
                         "stay out of the backward table)")
    ap.add_argument("--readme", default=None)
    a = ap.parse_args()
    checks = [] if a.checks is None else json.loads(pathlib.Path(a.checks).read_text())

    def rows(path: str, suite: str, commit: str | None, merged: bool = True) -> list[dict]:
        out = json.loads(pathlib.Path(path).read_text()) + [r for r in checks if merged and r.get("suite") == suite]
        return [dict(r, commit=commit) if r.get("kind") == "env" and commit else r for r in out]

    lines = forward_table(rows(a.forward_json, "forward", a.commit))
    if a.backward:
        lines += [""] + backward_table(rows(a.backward, "backward", a.backward_commit or a.commit,
                                            merged=a.backward_commit is None))
    print("\n".join(lines))
    if a.readme:
        splice(pathlib.Path(a.readme), lines)


if __name__ == "__main__":
    main()
