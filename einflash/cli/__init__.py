"""The ``einflash`` command line: ``explain``, ``demo``, ``tune``, ``cache`` and ``aot``.

einflash explain examples/softmax.py --json
einflash demo [--json] [--quick]
einflash tune examples/causal.py --shape 2,16,8192,8192,128 --dtype bfloat16 [--trials 30] [--storage URL]
einflash cache list|show|export|import|clear [--json]
einflash aot examples/causal.py --shape 2,16,4096,4096,128 --shape 4,32,1,32768,128 --kv-heads 8 --out DIR
"""

from __future__ import annotations

import argparse
import sys

from ..errors import EinflashError
from . import run, tuning


def main(argv: list[str] | None = None) -> int:
    """Run the ``einflash`` command line; the exit status (2 for an einflash error, printed with its type)."""
    ap = argparse.ArgumentParser(prog="einflash", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    run.add_commands(sub)
    tuning.add_commands(sub)
    args = ap.parse_args(argv)
    try:
        return args.fn(args)
    except EinflashError as e:
        print(f"einflash: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
