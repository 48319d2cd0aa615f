"""Calibration of a target's cost model on one GPU: the rate of each unit the model counts, measured with
micro-kernels, and the forward rows timed at several schedules, for the fit of the model's efficiencies.

    python3 benchmarks/calibrate.py --out DIR [--deadline 400]     # on the GPU: DIR/calibration.json
    python3 benchmarks/calibrate.py --fit DIR                         # anywhere: fits and prints the efficiencies
    python3 benchmarks/calibrate.py --defaults DIR                    # on the GPU: the model's defaults, timed

Micro-kernels: for every elementwise operator einflash emits, a kernel applies the operator's own Triton text
(``einflash.ir.operators``) to registers in a dependent chain, ``REPEAT`` times per element, over enough
programs to fill the GPU; its time less that of the same chain with only the step that keeps the values in range
(a fused multiply-add) gives the operator's results per second. Row reductions (max, sum over a tile's columns)
and the conversion of fp32 to bf16 are measured the same way. The tensor-core rate is a bf16 matrix product
(8192³) through PyTorch, the memory rate a device-to-device copy, the launch overhead an empty kernel.

Rows: the forward benchmark rows of docs/design.md §5 (bench_forward.ROWS) and the decode row, einflash only,
at the default schedule and at bench_forward.SWEEP's. The fit (``--fit``) chooses the efficiencies of
``CostModel`` (the tensor cores' fraction reached in the attention loop, how much of the elementwise work
overlaps the matrix products) that minimise the worst ratio of predicted to measured time over those rows, and
prints them with every row's prediction; the values go into ``einflash/backends/catalog.py`` with the run they
came from.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import pathlib
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

REPEAT = 64
BLOCK = 2048  # fp32 values per program: 16 per thread at 4 warps
# the operand each operator is chained through, and the step that keeps the chain in the operator's domain
# (x stays in [1, 2] for every operator below; y is a loaded value in [1, 2], loop-invariant)
CHAINS = {
    "add": "{op}",
    "sub": "{op}",
    "mul": "{op}",
    "div": "{op}",
    "maximum": "{op}",
    "minimum": "{op}",
    "exp": "{op}",
    "exp2": "{op}",
    "log": "{op}",
    "sqrt": "{op}",
    "tanh": "{op}",
    "sigmoid": "{op}",
    "abs": "{op}",
    "relu": "{op}",
    "floordiv": "{op}",
    "where": "{op}",  # a comparison and the select (a comparison alone is one ALU instruction)
}

_KERNEL = """
import triton
import triton.language as tl


@triton.jit
def chain(x_ptr, y_ptr, out_ptr, BLOCK: tl.constexpr, REPEAT: tl.constexpr, OP: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    y = tl.load(y_ptr + offs)
    for _ in range(REPEAT):
        if OP:
            r = {expr}
        else:
            r = x
        # back into [1, 2] whatever the operator gave (one fused multiply-add and its clamp)
        x = tl.minimum(tl.maximum(r * 0.25 + 1.25, 1.0), 2.0)
    tl.store(out_ptr + offs, x)


@triton.jit
def rows(x_ptr, out_ptr, COLS: tl.constexpr, REPEAT: tl.constexpr, KIND: tl.constexpr):
    r = tl.program_id(0) * 64 + tl.arange(0, 64)
    x = tl.load(x_ptr + r[:, None] * COLS + tl.arange(0, COLS)[None, :])
    acc = tl.zeros((64,), dtype=tl.float32)
    for i in range(REPEAT):
        x = x * 0.5 + acc[:, None] * 0.001  # keeps the reduction inside the loop
        if KIND == 0:
            acc = tl.max(x, axis=1)
        elif KIND == 1:
            acc = tl.sum(x, axis=1)
        else:
            acc = tl.sum(x.to(tl.bfloat16).to(tl.float32), axis=1)
    tl.store(out_ptr + r, acc)


@triton.jit
def empty(x_ptr):
    pass
"""


def _kernels(op: str):
    """The micro-kernel module for ``op`` (its Triton text as einflash renders it), in a file Triton can read."""
    from einflash.ir.operators import OPERATORS

    o = OPERATORS[op]
    fmt = o.triton
    args = ["x", "y", "x"][: o.arity] if op != "where" else ["(x < y)", "x", "y"]
    if op == "div":  # the chained value is the divisor: a loop-invariant one would be hoisted
        args = ["y", "x"]
    expr = fmt.format(*args)
    if o.boolean:
        expr = f"tl.where({expr}, x, y)"
    src = _KERNEL.replace("{expr}", expr)
    path = pathlib.Path(tempfile.mkdtemp()) / f"micro_{op}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def unit_rates() -> dict:
    """Results per second (whole GPU) of each operator, reduction and conversion; tensor, memory, launch."""
    import torch
    from triton.testing import do_bench

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    programs = sms * 64
    x = 1.0 + torch.rand(programs * BLOCK, device="cuda")
    y = 1.0 + torch.rand_like(x)
    out = torch.empty_like(x)
    rates = {}
    base = None
    for op in ["add", *CHAINS]:
        mod = _kernels(op)
        if base is None:
            base = do_bench(lambda m=mod: m.chain[(programs,)](x, y, out, BLOCK, REPEAT, False), warmup=10, rep=50)
        ms = do_bench(lambda m=mod: m.chain[(programs,)](x, y, out, BLOCK, REPEAT, True), warmup=10, rep=50)
        rates[op] = {"per_s": x.numel() * REPEAT / max(ms - base, 1e-6) * 1e3, "ms": ms, "base_ms": base}
    mod = _kernels("add")
    cols = 128
    xr = torch.rand(programs * 64, cols, device="cuda")
    outr = torch.empty(programs * 64, device="cuda")
    for kind, name in enumerate(("row_max", "row_sum", "to_bf16")):
        ms = do_bench(lambda k=kind: mod.rows[(programs,)](xr, outr, cols, REPEAT, k), warmup=10, rep=50)
        rates[name] = {"ms": ms}
    # kept as measured (with the loop's own step in them; the fit prices reductions at their instruction counts);
    # the conversion less the sum
    for name in ("row_max", "row_sum"):
        rates[name]["per_s"] = xr.numel() * REPEAT / rates[name]["ms"] * 1e3
    rates["to_bf16"]["per_s"] = xr.numel() * REPEAT / max(rates["to_bf16"]["ms"] - rates["row_sum"]["ms"], 1e-6) * 1e3
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = do_bench(lambda: a @ a, warmup=10, rep=50)
    rates["tensor_bf16"] = {"per_s": 2 * 8192**3 / ms * 1e3, "ms": ms}
    src = torch.empty(2**30, device="cuda", dtype=torch.uint8)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=10, rep=50)
    rates["hbm_copy"] = {"per_s": 2 * 2**30 / ms * 1e3, "ms": ms}
    ms = do_bench(lambda: mod.empty[(1,)](x), warmup=50, rep=200)
    rates["launch"] = {"s": ms * 1e-3}
    return {"sms": sms, "rates": rates}


def _untuned(op, shape, inputs: dict, params: dict):
    """The schedule a call of ``op`` at ``shape`` runs with nothing tuned (what the default rows time)."""
    import torch

    from einflash.backends import for_device
    from einflash.compiler.tuning.ranking import untuned_default
    from einflash.compiler.tuning.space import element_bytes

    extents = shape.extents([r.name for r in op.cascade.ranks])
    elem = element_bytes(op.cascade, inputs, torch.bfloat16)
    return untuned_default(op.forward, for_device("cuda"), extents, shape.Hkv, elem, params)


def _call(op, args: tuple, kwargs: dict, schedule):
    """A call of ``op`` at ``schedule``, as a function of nothing for do_bench."""
    extra = kwargs | {"schedule": schedule}
    return lambda: op(*args, **extra)


def rows(deadline: float, t0: float) -> list[dict]:
    """The forward rows and the decode row, einflash only, at the default schedule and bench_forward's sweep."""
    import torch
    from bench_forward import DECODE, ROWS, SWEEP, decode_inputs, row_setup
    from triton.testing import do_bench

    import einflash as ef
    from einflash.compiler.schedule import Schedule

    out = []
    for label, name, (B, H, N, D), params, kind in ROWS:
        op, q, k, v, extra, _ = row_setup(name, B, H, N, D, params, kind)
        ran = _untuned(op, ef.Shape(B, H, N, N, D), {"q": q, "k": k, "v": v} | extra, params)
        for sch in (ran, *SWEEP):
            if time.time() - t0 > deadline:
                return out
            try:
                fn = _call(op, (q, k, v), extra | params, sch)
                fn()
                ms = do_bench(fn, warmup=10, rep=50)
                out.append(
                    dict(
                        case=label,
                        example=name,
                        shape=[B, H, H, N, N, D],
                        params=params,
                        schedule=sch.to_ints(),
                        default=sch is ran,
                        ms=ms,
                    )
                )
            except Exception as e:  # noqa: BLE001 -- a schedule that cannot run is recorded
                out.append(
                    dict(
                        case=label,
                        schedule=sch.to_ints(),
                        error=f"{type(e).__name__}: {str(e)[:200]}",
                    )
                )
            print(json.dumps(out[-1]), flush=True)
        del q, k, v
        torch.cuda.empty_cache()
    op, q, k, v, _ = decode_inputs()
    p = DECODE[2]
    ran = _untuned(op, ef.Shape(p["B"], p["Hq"], 1, p["L"], p["D"], Hkv=p["Hkv"]), {"q": q, "k": k, "v": v}, {})
    for sch in (
        ran,
        Schedule(16, 64, 4, 4, 8, True),
        Schedule(16, 64, 4, 3, 16, True),
        Schedule(16, 128, 8, 3, 4, True),
    ):
        fn = _call(op, (q, k, v), {}, sch)
        fn()
        ms = do_bench(fn, warmup=10, rep=50)
        shape = [p["B"], p["Hq"], p["Hkv"], 1, p["L"], p["D"]]
        out.append(
            dict(
                case=DECODE[0],
                example=DECODE[1],
                shape=shape,
                params={},
                schedule=sch.to_ints(),
                default=sch is ran,
                ms=ms,
            )
        )
        print(json.dumps(out[-1]), flush=True)
    return out


def measured_model(record: dict, dot_efficiency: float, overlap: tuple[float, float], source: str):
    """A cost model of the measured operator rates, with the given efficiencies. Row reductions, conversions and
    operators not measured take their instruction counts (``INSTRUCTIONS``) at the measured rate of one ALU
    instruction (``add``'s) and one special-function one (``exp2``'s): the row-reduction micro-kernel's tile is
    not laid out as the attention loop's (its reductions cross threads and its broadcast goes through shared
    memory), so its time is not what a reduction costs there."""
    from einflash.backends.catalog import INSTRUCTIONS, sfu_shares
    from einflash.backends.target import CostModel

    rates = record["rates"]
    alu, sfu = float(rates["add"]["per_s"]), float(rates["exp2"]["per_s"])
    chained = set(CHAINS) | {"add"}

    def rate(op: str) -> float:
        if op in chained:
            return float(rates[op]["per_s"])
        mufu, other = INSTRUCTIONS[op]
        return 1.0 / (mufu / sfu + other / alu)

    ops = tuple((op, rate(op)) for op in INSTRUCTIONS)
    shares = sfu_shares(sfu, alu)
    return CostModel(ops, shares, dot_efficiency, overlap, float(rates["launch"]["s"]), source)


def _target(record: dict, model):
    """sm90 with this run's measured rates and ``model``."""
    import dataclasses

    from einflash.backends import get_target

    return dataclasses.replace(
        get_target("sm90"),
        costs=model,
        tensor_flops=record["rates"]["tensor_bf16"]["per_s"],
        hbm_bandwidth=record["rates"]["hbm_copy"]["per_s"],
        sm_count=record["sms"],
    )


def launches(record: dict) -> list[tuple[dict, object]]:
    """Each measured row with the launch the cost model prices for it (einflash's explain at its schedule)."""
    from bench_forward import example

    import einflash as ef
    from einflash.compiler.schedule import Schedule

    target = _target(record, measured_model(record, 1.0, (0.0, 0.0), "fit"))
    out = []
    for row in record["rows"]:
        if "ms" not in row:
            continue
        B, Hq, Hkv, M, N, D = row["shape"]
        op = example(row["example"])[1]
        sch = Schedule.from_ints(row["schedule"])
        x = op.explain(ef.Shape(B, Hq, M, N, D, Hkv=Hkv), target=target, schedule=sch, **row["params"])
        out.append((row | {"priced": x.predicted["schedule"]}, x.launch))
    return out


def fit(record: dict) -> tuple[float, tuple[float, float], list]:
    """The (dot efficiency, overlaps) that minimise the worst |log(predicted / measured)| over the rows run at their
    default schedule (the benchmark rows), then the mean over every row (the sweep's: how schedules rank); and
    each row's prediction with them."""
    from einflash.compiler.analysis.timing import predict

    rows = launches(record)
    best = None
    for eff in [0.6 + 0.02 * i for i in range(16)]:
        for one in [0.1 * i for i in range(4)]:
            for several in [0.1 * i for i in range(9)]:
                target = _target(record, measured_model(record, eff, (one, several), "fit"))
                got = [(r, predict(launch, target)) for r, launch in rows]
                errors = [(abs(math.log(p.ms / r["ms"])), r["default"]) for r, p in got]
                score = (round(max(e for e, d in errors if d), 2), sum(e for e, _ in errors) / len(errors))
                if best is None or score < best[0]:
                    best = (score, eff, (one, several), got)
    assert best is not None
    return best[1], best[2], best[3]


DEFAULT_SHAPES = [  # (B, Hq, Hkv, N, D): the check's prefill, the benchmark rows', and the training rows' shapes
    (1, 8, 8, 4096, 128),
    (2, 16, 16, 8192, 128),
    (4, 32, 32, 4096, 64),
    (8, 16, 16, 2048, 64),
    (2, 8, 8, 4096, 256),
]


def defaults(deadline: float, t0: float, variants: list[str] | None = None) -> list[dict]:
    """Every catalogue variant (or those of ``variants``, in that order) at DEFAULT_SHAPES where the cost model's
    default differs from the hand-set one: both timed (bf16), and the model's output held to the tolerance rule
    against the float64 reference."""
    import torch
    from bench_forward import example, seeded_inputs
    from triton.testing import do_bench

    import einflash as ef
    from einflash.backends import for_device
    from einflash.compiler.tuning.ranking import untuned_default
    from einflash.compiler.tuning.space import fitting_default
    from einflash.testing import check

    target = for_device("cuda")
    out = []
    names = variants or sorted(p.stem for p in (ROOT / "examples").glob("*.py"))
    for stem in names:
        path = ROOT / "examples" / f"{stem}.py"
        mod, op = example(stem)
        if op.forward.error is not None:
            continue
        for B, H, Hkv, N, D in DEFAULT_SHAPES:
            if time.time() - t0 > deadline:
                return out
            hq, hkv = getattr(mod, "HEADS", (H, Hkv))
            shape = ef.Shape(B, hq, N, N, D, D, hkv)
            extents = shape.extents([r.name for r in op.cascade.ranks])
            hand = fitting_default(op.forward, target, extents, hkv, 2)
            model = untuned_default(op.forward, target, extents, hkv, 2, {})
            if hand == model:
                continue
            record = dict(variant=path.stem, shape=[B, hq, hkv, N, D], hand=hand.describe(), model=model.describe())
            try:
                q, k, v, extra = seeded_inputs(mod, shape, torch.bfloat16)
                args = (q, k) if path.stem == "mla_decode" else (q, k, v)
                for name, sch in (("hand", hand), ("model", model)):
                    fn = _call(op, args, extra, sch)
                    fn()
                    record[f"{name}_ms"] = do_bench(fn, warmup=10, rep=50)
                if B * hq * N * N <= 2**28:  # the float64 reference's scores fit
                    record["model_ok"] = check(op, op(*args, **extra, schedule=model), *args, **extra).ok
            except Exception as e:  # noqa: BLE001 -- a case that cannot run is recorded
                record["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            out.append(record)
            print(json.dumps(record), flush=True)
            torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="directory for calibration.json (measures on the GPU)")
    ap.add_argument("--fit", help="a directory holding calibration.json: fit the model's efficiencies")
    ap.add_argument("--deadline", type=float, default=400.0)
    ap.add_argument("--defaults", help="a directory for defaults.json: the model's defaults against the hand-set")
    ap.add_argument("--variants", help="with --defaults: the examples to compare, in order (default: all)")
    a = ap.parse_args()
    t0 = time.time()
    if a.out:
        import peers

        out = pathlib.Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        record = {"env": peers.environment(), **unit_rates()}
        (out / "calibration.json").write_text(json.dumps(record, indent=1))
        print(json.dumps(record["rates"]), flush=True)
        record["rows"] = rows(a.deadline, t0)
        (out / "calibration.json").write_text(json.dumps(record, indent=1))
    if a.defaults:
        out = pathlib.Path(a.defaults)
        out.mkdir(parents=True, exist_ok=True)
        import peers

        records = [peers.environment()]
        for r in defaults(a.deadline, t0, a.variants.split(",") if a.variants else None):
            records.append({"kind": "default", **r})
            (out / "defaults.json").write_text(json.dumps(records, indent=1))
    if a.fit:
        record = json.loads((pathlib.Path(a.fit) / "calibration.json").read_text())
        eff, overlap, fitted = fit(record)
        print(f"dot_efficiency {eff:.2f}  overlap {overlap[0]:.1f} (one program per SM), {overlap[1]:.1f} (several)")
        result = [
            record["env"],
            {"kind": "fit", "dot_efficiency": eff, "overlap": list(overlap)},
            *(
                {"kind": "row"}
                | {k: row[k] for k in ("case", "schedule", "priced", "default", "ms")}
                | {"predicted": p.to_json()}
                for row, p in fitted
            ),
        ]
        (pathlib.Path(a.fit) / "fit.json").write_text(json.dumps(result, indent=1))
        for row, p in fitted:
            print(
                f"{row['case'][:40]:40s} {row['schedule']!s:32s} measured {row['ms']:.3f}  predicted {p.ms:.3f}  "
                f"{p.ms / row['ms']:.2f}  {p.bound}"
            )


if __name__ == "__main__":
    main()
