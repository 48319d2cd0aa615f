"""What every command shares: the declarations a file holds, and the shape and parameter options."""

from __future__ import annotations

import argparse

from ..errors import DeclarationError
from ..op import AttentionOp, load_ops
from ..shape import Shape


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


def shape_of(args) -> Shape:
    """The shape the ``--shape``, ``--kv-heads`` and ``--head-dim-v`` options give."""
    return Shape.parse(args.shape, args.kv_heads, args.head_dim_v)


def params_of(args) -> dict[str, float | int | bool]:
    """The ``--param NAME=VALUE`` options as numbers: ``16`` an int, ``0.5`` a float, ``true``/``false`` a bool."""
    return {k: _number(k, v) for k, v in pairs(args.param, "--param").items()}


def _number(name: str, text: str) -> float | int | bool:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise DeclarationError(f"--param {name}={text}: a value is a number (or true/false)") from None


def pairs(items: list[str], what: str) -> dict[str, str]:
    """``NAME=VALUE`` options as a dict; an item without ``=`` is refused."""
    bad = [kv for kv in items if "=" not in kv]
    if bad:
        raise DeclarationError(f"{what} is NAME=VALUE, got {bad[0]!r}")
    return dict(kv.split("=", 1) for kv in items)
