"""The ``einflash explain``, ``demo`` and ``aot`` commands."""

from __future__ import annotations

import json
import pathlib

import torch

from ..backends import get_target
from ..compiler.aot.build import build
from ..demo import main as demo
from ..errors import DeclarationError
from ..shape import Shape
from .common import add_shape_options, pairs, params_of, pick, shape_of

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent.parent / "examples"


def cmd_explain(args) -> int:
    op = pick(args.target_file)
    dims = {k: int(v) for k, v in (kv.split("=", 1) for kv in args.dim)}
    x = op.explain(shape_of(args), args.dtype, args.target, dims, **params_of(args))
    print(json.dumps(x.to_json(), indent=1) if args.json else x)
    return 0


def cmd_demo(args) -> int:
    return demo(pathlib.Path(args.examples), quick=args.quick, as_json=args.json, jobs=args.jobs)


def cmd_aot(args) -> int:
    op = pick(args.target_file)
    shapes = [Shape.parse(s, args.kv_heads, args.head_dim_v) for s in args.shape]
    params = params_of(args)
    dims = {k: int(v) for k, v in pairs(args.dim, "--dim").items()}
    inputs = {}
    for name, dtype in pairs(args.input, "--input").items():
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise DeclarationError(f"--input {name}={dtype}: {dtype!r} is not a torch dtype (float32, int64, ...)")
        inputs[name] = getattr(torch, dtype)
    manifest = build(
        op.forward,
        op.cascade,
        pathlib.Path(args.target_file.partition(":")[0]),
        shapes,
        args.dtype or ["bfloat16"],
        get_target(args.target),
        pathlib.Path(args.out),
        params=params,
        dims=dims,
        input_dtypes=inputs,
    )
    if args.json:
        print(json.dumps(manifest.to_json(), indent=1))
        return 0
    print(f"{manifest.variant} ({manifest.key}) for {manifest.target['name']} in {args.out}")
    for e in manifest.entries:
        print(f"  {e.label}: {' + '.join(e.launches)}")
    print(f"{'kernel':64} {'lengths':>7} {'warps':>5} {'stages':>6} {'smem B':>8} {'regs':>5} {'spill':>5}")
    for k in manifest.kernels.values():
        for b in k.binaries:
            print(
                f"{k.name:64} {b.lengths:>7} {b.num_warps:>5} {b.num_stages:>6} {b.shared_bytes:>8} "
                f"{b.registers:>5} {b.spill_bytes:>5}"
            )
    return 0


def add_commands(sub) -> None:
    """Add ``explain``, ``demo`` and ``aot`` to the ``einflash`` parser's subcommands."""
    ex = sub.add_parser("explain", help="passes, buffers, FLOPs, bytes and roofline of a declaration")
    ex.add_argument("target_file", metavar="FILE[:NAME]")
    ex.add_argument("--json", action="store_true")
    add_shape_options(ex, "2,16,4096,4096,128")
    ex.add_argument("--dtype", default="bfloat16", choices=("float16", "bfloat16", "float32"))
    ex.add_argument("--target", default="sm90", help="interpreter, sm80 or sm90")
    ex.add_argument("--param", action="append", default=[], metavar="NAME=VALUE")
    ex.add_argument("--dim", action="append", default=[], metavar="RANK=EXTENT", help="extent of an added rank")
    ex.set_defaults(fn=cmd_explain)
    de = sub.add_parser("demo", help="declare, explain, compile, run and check the catalogue on this machine")
    de.add_argument("--json", action="store_true")
    de.add_argument("--quick", action="store_true", help="a few variants only")
    de.add_argument("--examples", default=str(EXAMPLES))
    de.add_argument(
        "--jobs", type=int, default=None, help="variants run at a time (default: 3 on a GPU machine, 1 on the CPU)"
    )
    de.set_defaults(fn=cmd_demo)
    ao = sub.add_parser("aot", help="generate and compile kernels ahead of time for a GPU target (no GPU needed)")
    ao.add_argument("target_file", metavar="FILE[:NAME]")
    ao.add_argument("--shape", action="append", required=True, help="B,H,M,N,D (repeat for several)")
    ao.add_argument("--kv-heads", type=int, default=None)
    ao.add_argument("--head-dim-v", type=int, default=None)
    ao.add_argument(
        "--dtype",
        action="append",
        choices=("float16", "bfloat16", "float32"),
        help="default bfloat16 (repeat for several)",
    )
    ao.add_argument("--target", default="sm90", help="sm80 or sm90")
    ao.add_argument("--out", required=True, metavar="DIR")
    ao.add_argument("--param", action="append", default=[], metavar="NAME=VALUE")
    ao.add_argument("--dim", action="append", default=[], metavar="RANK=EXTENT", help="extent of an added rank")
    ao.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="NAME=DTYPE",
        help="dtype of an extra input (default: q's for per-token inputs, else float32)",
    )
    ao.add_argument("--json", action="store_true", help="print the manifest")
    ao.set_defaults(fn=cmd_aot)
