"""Every GPU measurement of a session in one command, each part under its own time limit.

    python3 benchmarks/gpu_session.py --out DIR [--seconds 570] [--sweep] [--parts forward,backward,tune,checks]

Timings run alone on the GPU, one after another: the forward benchmark beside the peers
(bench_forward.py), the forward+backward benchmark (bench_backward.py, all rows in one process), the
tuner's tuned-against-default study (bench_tune.py). Then the correctness checks, which are bound
by compiling, run together in several processes: the forward catalogue (bf16, fp16; prefill and decode) and the
gradients of the catalogue. Each part's JSON lands in DIR, all output in DIR/session.log; a part
cut off at its limit keeps what it wrote.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
EXAMPLES = HERE.parent / "examples"
# fractions of the session's seconds each step may take
SHARES = {"forward": 0.14, "backward": 0.22, "tune": 0.30, "checks": 0.34}
SWEEP_SHARES = {"forward": 0.30, "backward": 0.16, "tune": 0.19, "checks": 0.35}  # with the forward's schedule sweep


def _run(args: list[str], log: pathlib.Path, seconds: float) -> int:
    with log.open("a") as f:
        f.write(f"\n[gpu_session] {' '.join(args)}\n")
        f.flush()
        try:
            return subprocess.run(
                [sys.executable, *args], stdout=f, stderr=subprocess.STDOUT, timeout=seconds
            ).returncode
        except subprocess.TimeoutExpired:
            f.write(f"\n[gpu_session] stopped at its limit of {seconds:.0f} s\n")
            return 124


def _backward(out: pathlib.Path, seconds: float) -> None:
    """The forward+backward benchmark, every row in one process, into DIR/backward.json. (One process per row
    once kept a sliding-window anomaly seen in a shared process out; it did not recur with every row in one
    process, h200_2026-12-02_final_3466567, and a per-row share of the session left the peers untimed.)"""
    _run(
        [str(HERE / "bench_backward.py"), "--only", "perf", "--deadline", str(seconds - 10), "--out", str(out)],
        out / "session.log",
        seconds,
    )


SLOW_TO_CHECK = ("gla", "sink_window", "prefix_lm")  # compile longest: each starts a worker's share


def _checks(out: pathlib.Path, seconds: float, workers: int) -> None:
    """Forward and gradient checks of the catalogue, split over processes; merged into DIR/checks.json."""
    names = sorted(p.stem for p in EXAMPLES.glob("*.py"))
    names = [n for n in SLOW_TO_CHECK if n in names] + [n for n in names if n not in SLOW_TO_CHECK]
    scratch = pathlib.Path(tempfile.mkdtemp(prefix="einflash_checks_"))
    jobs = []
    for k in range(workers):
        share = ",".join(names[k::workers])
        jobs.append(
            (
                "forward",
                scratch / f"f{k}",
                [
                    str(HERE / "bench_forward.py"),
                    "--only",
                    "check",
                    "--variants",
                    share,
                    "--out",
                    str(scratch / f"f{k}"),
                ],
            )
        )
        jobs.append(
            (
                "backward",
                scratch / f"b{k}",
                [
                    str(HERE / "bench_backward.py"),
                    "--only",
                    "check",
                    "--variants",
                    share,
                    "--deadline",
                    str(seconds - 20),
                    "--out",
                    str(scratch / f"b{k}"),
                ],
            )
        )
    procs = []
    with (out / "session.log").open("a") as log:
        for _, folder, args in jobs:
            folder.mkdir(parents=True, exist_ok=True)
            procs.append(subprocess.Popen([sys.executable, *args], stdout=log, stderr=subprocess.STDOUT))
        end = time.monotonic() + seconds
        for p in procs:
            try:
                p.wait(timeout=max(1.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                log.write("[gpu_session] a check process was stopped at the limit\n")
    rows = []
    for kind, folder, _ in jobs:
        for part in folder.glob("*.json"):
            rows += [dict(r, suite=kind) for r in json.loads(part.read_text()) if r.get("kind") == "check"]
    (out / "checks.json").write_text(json.dumps(rows, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--seconds", type=float, default=570.0)
    ap.add_argument("--workers", type=int, default=4, help="processes per check suite")
    ap.add_argument("--sweep", action="store_true", help="the forward benchmark also times fixed schedules")
    ap.add_argument("--parts", default=",".join(SHARES), help="which of forward, backward, tune, checks to run")
    a = ap.parse_args()
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    parts = a.parts.split(",")
    shares = {k: v for k, v in (SWEEP_SHARES if a.sweep else SHARES).items() if k in parts}
    limit = {k: v / sum(shares.values()) * a.seconds for k, v in shares.items()}  # the parts left share the time
    if "forward" in limit:
        _run(
            [str(HERE / "bench_forward.py"), "--only", "anchors,prefill,decode", "--out", str(out)]
            + ["--sweep"] * a.sweep,
            out / "session.log",
            limit["forward"],
        )
    if "backward" in limit:
        _backward(out, limit["backward"])
    if "tune" in limit:
        _run(
            [str(HERE / "bench_tune.py"), "--trials", "8", "--deadline", str(limit["tune"] - 15), "--out", str(out)],
            out / "session.log",
            limit["tune"],
        )
    if "checks" in limit:
        _checks(out, limit["checks"], a.workers)


if __name__ == "__main__":
    main()
