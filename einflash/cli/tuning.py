"""The ``einflash tune`` and ``einflash cache`` commands .

    einflash tune FILE[:NAME] --shape B,H,M,N,D --dtype DTYPE [--kv-heads HKV] [--head-dim-v F]
                  [--trials N] [--seconds S] [--storage URL] [--json]
    einflash cache list|show [PATTERN]|export FILE|import FILE|clear [--json]

``--storage`` names an Optuna storage that several ``einflash tune`` processes share to tune one
study together: a journal file path for the processes of one machine (one per GPU, with
CUDA_VISIBLE_DEVICES), an RDB URL such as ``postgresql://user@host/db`` across machines.
"""

from __future__ import annotations

import json
import pathlib
import sys

from ..errors import CacheError, DTypeError
from .common import add_shape_options, params_of, pick, shape_of


def cmd_tune(args) -> int:
    import torch

    from ..backends import detect
    from ..testing import random_inputs

    op = pick(args.target_file)
    target = detect()
    dtype = args.dtype or ("float32" if target.is_interpreter else "bfloat16")
    if target.is_interpreter and dtype == "bfloat16":
        raise DTypeError(
            "Triton's interpreter computes bfloat16 wrongly, so no bfloat16 schedule would pass the "
            "reference check here; tune float16 or float32 on this machine, bfloat16 on a GPU"
        )
    device = "cpu" if target.is_interpreter else "cuda"
    inputs = random_inputs(op, shape_of(args), device, getattr(torch, dtype), args.seed)
    result = op.tune(
        **inputs,
        **params_of(args),
        trials=args.trials,
        seconds=args.seconds,
        storage=args.storage,
        seed=args.seed,
        sampler=args.sampler,
        warm_start=not args.cold,
        progress=not args.json and sys.stderr.isatty(),
    )
    print(json.dumps(result.to_json(), indent=1) if args.json else result)
    return 0


def _here() -> dict:
    from ..backends import detect
    from ..compiler.tuning.cache_keys import environment

    return environment(detect())


def cmd_cache(args) -> int:
    from ..compiler.tuning.cache import TuneCache
    from ..compiler.tuning.cache_format import MAX_BUNDLE_BYTES, read_json, schedule_from_json

    cache = TuneCache()
    if args.action == "list":
        here = _here()
        rows = [{**f.to_json(), "here": f.problem is None and f.data["environment"] == here} for f in cache.files()]
        if args.json:
            print(json.dumps({"folder": str(cache.root), "files": rows}, indent=1))
            return 0
        print(f"{cache.root}: {len(rows)} file(s)")
        for r in rows:
            if not r["ok"]:
                print(f"  CORRUPT  {pathlib.Path(r['path']).name}: {r['problem']}")
                continue
            env = r["environment"]
            skipped = f", {len(r['skipped'])} skipped (see `einflash cache show`)" if r["skipped"] else ""
            print(
                f"  {'here' if r['here'] else 'other':7}  {r['name']} {r['dtype']} on {env['device']} "
                f"({env['target']}, Triton {env['triton']}, torch {env['torch']}): {len(r['entries'])} shape "
                f"bucket(s){skipped}  [{pathlib.Path(r['path']).name}]"
            )
        return 0
    if args.action == "show":
        files = [
            f
            for f in cache.files()
            if f.problem is None and (not args.arg or args.arg in f.path.name or args.arg == f.data.get("name"))
        ]
        if args.json:
            print(json.dumps([{"path": str(f.path), **f.data} for f in files], indent=1))
            return 0
        for f in files:
            print(f"{f.data['name']} {f.data['dtype']} on {f.data['environment']['device']}  [{f.path.name}]")
            for label, e in f.data["entries"].items():
                if label in f.skipped:
                    print(f"  {label}: SKIPPED: {f.skipped[label]}")
                    continue
                best, default = e["best"], e.get("default") or {}
                speed = (
                    f"{default['ms'] / best['ms']:.2f}x over the default"
                    if best and default.get("ms")
                    else "no default time"
                )
                what = (
                    f"{schedule_from_json(best['schedule']).describe()} {best['ms']:.4f} ms, {speed}"
                    if best
                    else "nothing passed"
                )
                print(f"  {label}: {what}  ({len(e['measured'])} measured, {len(e['failed'])} failed)")
        return 0
    if args.action == "export":
        if not args.arg:
            raise CacheError("cache export needs a file to write the bundle to")
        bundle = cache.export()
        pathlib.Path(args.arg).write_text(json.dumps(bundle, indent=1))
        summary = {
            "path": args.arg,
            "files": len(bundle["files"]),
            "entries": sum(len(f["entries"]) for f in bundle["files"]),
        }
        print(
            json.dumps(summary)
            if args.json
            else f"wrote {summary['entries']} entries of {summary['files']} file(s) to {args.arg}"
        )
        return 0
    if args.action == "import":
        if not args.arg:
            raise CacheError("cache import needs a bundle written by `einflash cache export`")
        bundle, bad = read_json(pathlib.Path(args.arg), MAX_BUNDLE_BYTES)
        if bad or bundle is None:
            raise CacheError(
                f"cannot read the bundle {args.arg}: {bad or 'no such file'}; give a file written by "
                f"`einflash cache export`"
            )
        n = cache.import_bundle(bundle)
        print(json.dumps({"imported": n}) if args.json else f"imported {n} entries into {cache.root}")
        return 0
    n = cache.clear()
    print(json.dumps({"removed": n}) if args.json else f"removed {n} cache file(s) and the studies from {cache.root}")
    return 0


def add_commands(sub) -> None:
    """Add ``tune`` and ``cache`` to the ``einflash`` parser's subcommands."""
    tu = sub.add_parser("tune", help="tune a declaration's schedule at a shape on this machine; store the winner")
    tu.add_argument("target_file", metavar="FILE[:NAME]")
    add_shape_options(tu)
    tu.add_argument(
        "--dtype",
        default=None,
        choices=("float16", "bfloat16", "float32"),
        help="default: bfloat16 on a GPU, float32 under the interpreter",
    )
    tu.add_argument("--param", action="append", default=[], metavar="NAME=VALUE")
    tu.add_argument("--trials", type=int, default=None, help="schedules to measure (default 30)")
    tu.add_argument("--seconds", type=float, default=None, help="wall-time budget (default 600)")
    tu.add_argument(
        "--storage",
        default=None,
        metavar="URL",
        help="Optuna storage shared by several tuning processes: a journal file path, or an RDB URL",
    )
    tu.add_argument("--seed", type=int, default=0)
    tu.add_argument("--sampler", default="auto", choices=("auto", "tpe", "grid"))
    tu.add_argument("--cold", action="store_true", help="no warm start from the default and cached neighbours")
    tu.add_argument("--json", action="store_true")
    tu.set_defaults(fn=cmd_tune)
    ca = sub.add_parser("cache", help="list, show, export, import or clear the autotune cache")
    ca.add_argument("action", choices=("list", "show", "export", "import", "clear"))
    ca.add_argument(
        "arg",
        nargs="?",
        default=None,
        metavar="PATTERN|FILE",
        help="show: a variant name or part of a file name; export/import: the bundle file",
    )
    ca.add_argument("--json", action="store_true")
    ca.set_defaults(fn=cmd_cache)
