"""The ``einflash`` command line: ``explain``, ``demo``, ``tune``, ``cache`` and ``aot``.

    einflash explain examples/softmax.py --json
    einflash demo [--json] [--quick]
    einflash tune examples/causal.py --shape 2,16,8192,8192,128 --dtype bfloat16 [--trials 30] [--storage URL]
    einflash cache list|show|export|import|clear [--json]
    einflash aot examples/causal.py --shape 2,16,4096,4096,128 --shape 4,32,1,32768,128 --kv-heads 8 --out DIR
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import sys

from .errors import DeclarationError, EinflashError
from .op import AttentionOp
from .shape import Shape

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def load_ops(path: str) -> dict[str, AttentionOp]:
    """The attention ops a Python file declares, by name."""
    file = pathlib.Path(path)
    if not file.is_file():
        raise DeclarationError(f"no such file: {path}")
    spec = importlib.util.spec_from_file_location(f"einflash_user_{file.stem}", file)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return {v.name: v for v in vars(mod).values() if isinstance(v, AttentionOp)}


def pick(target: str) -> AttentionOp:
    """``FILE[:NAME]`` → the op it names (or the only one the file declares)."""
    path, _, name = target.partition(":")
    ops = load_ops(path)
    if not ops:
        raise DeclarationError(f"{path} declares no @einflash.attention function")
    if name:
        if name not in ops:
            raise DeclarationError(f"{path} has no attention op {name!r}; it has {sorted(ops)}")
        return ops[name]
    if len(ops) > 1:
        raise DeclarationError(f"{path} declares several attention ops {sorted(ops)}; name one as FILE:NAME")
    return next(iter(ops.values()))


def add_shape_options(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    """``--shape B,H,M,N,D``, ``--kv-heads`` and ``--head-dim-v``: how every command that takes a shape takes it."""
    parser.add_argument("--shape", default=default, required=default is None, help="B,H,M,N,D (query heads H)")
    parser.add_argument("--kv-heads", type=int, default=None, help="key/value heads (GQA/MQA); default H")
    parser.add_argument("--head-dim-v", type=int, default=None, help="head dim of v; default D")


def _shape(args) -> Shape:
    return Shape.parse(args.shape, args.kv_heads, args.head_dim_v)


def _params(args) -> dict[str, float]:
    return {k: float(v) for k, v in (kv.split("=", 1) for kv in args.param)}


def cmd_explain(args) -> int:
    op = pick(args.target_file)
    dims = {k: int(v) for k, v in (kv.split("=", 1) for kv in args.dim)}
    x = op.explain(_shape(args), args.dtype, args.target, dims, **_params(args))
    print(json.dumps(x.to_json(), indent=1) if args.json else x)
    return 0


def cmd_demo(args) -> int:
    from .demo import main as demo

    return demo(pathlib.Path(args.examples), quick=args.quick, as_json=args.json)


def _pairs(items: list[str], what: str) -> dict[str, str]:
    bad = [kv for kv in items if "=" not in kv]
    if bad:
        raise DeclarationError(f"{what} is NAME=VALUE, got {bad[0]!r}")
    return dict(kv.split("=", 1) for kv in items)


def cmd_aot(args) -> int:
    import torch

    from .backends import get_target
    from .compiler.aot.build import build

    op = pick(args.target_file)
    shapes = [Shape.parse(s, args.kv_heads, args.head_dim_v) for s in args.shape]
    params = {k: float(v) for k, v in _pairs(args.param, "--param").items()}
    dims = {k: int(v) for k, v in _pairs(args.dim, "--dim").items()}
    inputs = {}
    for name, dtype in _pairs(args.input, "--input").items():
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise DeclarationError(f"--input {name}={dtype}: {dtype!r} is not a torch dtype (float32, int64, ...)")
        inputs[name] = getattr(torch, dtype)
    manifest = build(op.forward, op.cascade, pathlib.Path(args.target_file.partition(":")[0]), shapes,
                     args.dtype or ["bfloat16"], get_target(args.target), pathlib.Path(args.out), params=params,
                     dims=dims, input_dtypes=inputs)
    if args.json:
        print(json.dumps(manifest.to_json(), indent=1))
        return 0
    print(f"{manifest.variant} ({manifest.key}) for {manifest.target['name']} in {args.out}")
    for e in manifest.entries:
        print(f"  {e.label}: {' + '.join(e.launches)}")
    print(f"{'kernel':64} {'lengths':>7} {'warps':>5} {'stages':>6} {'smem B':>8} {'regs':>5} {'spill':>5}")
    for k in manifest.kernels.values():
        for b in k.binaries:
            print(f"{k.name:64} {b.lengths:>7} {b.num_warps:>5} {b.num_stages:>6} {b.shared_bytes:>8} "
                  f"{b.registers:>5} {b.spill_bytes:>5}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="einflash", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
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
    de.set_defaults(fn=cmd_demo)
    ao = sub.add_parser("aot", help="generate and compile kernels ahead of time for a GPU target (no GPU needed)")
    ao.add_argument("target_file", metavar="FILE[:NAME]")
    ao.add_argument("--shape", action="append", required=True, help="B,H,M,N,D (repeat for several)")
    ao.add_argument("--kv-heads", type=int, default=None)
    ao.add_argument("--head-dim-v", type=int, default=None)
    ao.add_argument("--dtype", action="append", choices=("float16", "bfloat16", "float32"),
                    help="default bfloat16 (repeat for several)")
    ao.add_argument("--target", default="sm90", help="sm80 or sm90")
    ao.add_argument("--out", required=True, metavar="DIR")
    ao.add_argument("--param", action="append", default=[], metavar="NAME=VALUE")
    ao.add_argument("--dim", action="append", default=[], metavar="RANK=EXTENT", help="extent of an added rank")
    ao.add_argument("--input", action="append", default=[], metavar="NAME=DTYPE",
                    help="dtype of an extra input (default: q's for per-token inputs, else float32)")
    ao.add_argument("--json", action="store_true", help="print the manifest")
    ao.set_defaults(fn=cmd_aot)
    from .tuning_cli import add_commands

    add_commands(sub)
    args = ap.parse_args(argv)
    try:
        return args.fn(args)
    except EinflashError as e:
        print(f"einflash: {type(e).__name__}: {e}", file=sys.stderr)
        return 2

