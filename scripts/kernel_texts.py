"""Every kernel text einflash generates for the catalogue, written to a folder or compared with one.

A refactor that must not change code generation is checked by writing the texts before it and
comparing after it (tinygrad calls this process replay):

    python scripts/kernel_texts.py write /tmp/before      # on the commit before
    python scripts/kernel_texts.py compare /tmp/before    # on the commit after: lists every difference

For each example under examples/ that lowers, at head dims 40, 64 and 128, in float16, bfloat16 and
float32: the forward, its split-KV form and combine, the training forward, the forward with the
log-sum-exp output, and the backward's kernels (rows, dK/dV, dQ, one launch, the atomic dK/dV, and
the dK/dV and dQ of q's gradient alone). Nothing is compiled or launched.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import pathlib
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
HEAD_DIMS = (40, 64, 128)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _examples():
    for file in sorted((ROOT / "examples").glob("*.py")):
        spec = importlib.util.spec_from_file_location(f"einflash_example_{file.stem}", file)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        yield file.stem, getattr(mod, file.stem)


def _texts(op, head_dim: int) -> dict[str, str]:
    """Every kernel text of ``op`` at one head dim, by a readable key."""
    import einflash as ef
    from einflash.ir.reference import bind_extents
    from einflash.testing import random_inputs

    out: dict[str, str] = {}
    if op.forward.error is not None:
        return out
    inputs = random_inputs(op, ef.Shape(1, 2, 8, 8, head_dim, Hkv=1))
    extents = bind_extents(op.forward.rewritten, inputs, {})
    dims = op.forward.dims(extents)
    ints = frozenset(k for k, v in inputs.items() if not v.is_floating_point())
    for dtype in DTYPES:
        tag = f"{op.name}/d{head_dim}/{str(dtype).removeprefix('torch.')}"
        if op.forward.stages is not None:  # a key stage, then the query tiles; no split, no backward
            keys, queries = op.forward.stage_sources(dtype, dims, ints)
            out[f"{tag}/keys"], out[f"{tag}/queries"] = keys.text, queries.text
            continue
        out[f"{tag}/forward"] = op.forward.source(dtype, dims, False, ints).text
        if op.forward.splittable:
            out[f"{tag}/split"] = op.forward.source(dtype, dims, True, ints).text
            out[f"{tag}/combine"] = op.forward._combine_source(dtype, dims).text
        if op.forward_lse is not None:
            out[f"{tag}/forward_lse"] = op.forward_lse.source(dtype, dims, False, ints).text
        if op.backward.error is not None:
            continue
        out[f"{tag}/train"] = op.forward.source(dtype, dims, False, ints, op.backward.saved).text
        kinds = [("rows", False), ("kv", False), ("q", False), ("one", False), ("kv", True)]
        for kind, atomic in kinds:
            if kind == "rows" and op.backward.parts.rows is None:
                continue
            if kind in ("q", "one") and op.backward.parts.q is None:
                continue
            if kind == "one" and op.backward.parts.kv is None:
                continue
            key = f"{tag}/bwd_{kind}{'_atomic' if atomic else ''}"
            out[key] = op.backward.kernel(kind, dtype, dims, ints, atomic).text
        q_only = frozenset({"q"})
        cut = op.backward.cut(q_only).parts
        for kind in ("kv", "q"):
            if getattr(cut, kind) is not None:
                out[f"{tag}/bwd_{kind}_q_only"] = op.backward.kernel(kind, dtype, dims, ints, needed=q_only).text
    return out


def collect() -> dict[str, str]:
    texts: dict[str, str] = {}
    for _, op in _examples():
        for d in HEAD_DIMS:
            texts.update(_texts(op, d))
    return texts


def _file(folder: pathlib.Path, key: str) -> pathlib.Path:
    return folder / (key.replace("/", "__") + ".py")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("write", "compare"))
    parser.add_argument("folder", type=pathlib.Path)
    a = parser.parse_args(argv)
    texts = collect()
    if a.action == "write":
        a.folder.mkdir(parents=True, exist_ok=True)
        for key, text in texts.items():
            _file(a.folder, key).write_text(text)
        print(f"{len(texts)} kernel texts written to {a.folder}")
        return 0
    before = {p.stem.replace("__", "/"): p.read_text() for p in a.folder.glob("*.py")}
    missing = sorted(set(before) - set(texts))
    added = sorted(set(texts) - set(before))
    changed = sorted(k for k in set(texts) & set(before) if texts[k] != before[k])
    for k in missing:
        print(f"missing now: {k}")
    for k in added:
        print(f"new: {k}")
    for k in changed:
        print(f"changed: {k}")
    digest = hashlib.sha256("".join(texts[k] for k in sorted(texts)).encode()).hexdigest()[:16]
    same = not (missing or added or changed)
    print(
        f"{len(texts)} kernel texts, {len(before)} before: {'byte-identical' if same else 'DIFFERENT'} "
        f"(digest {digest})"
    )
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
