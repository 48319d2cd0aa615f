"""A differential fuzzer: random declarations from the public vocabulary, each refused with a typed einflash error
or computed right. Two families: softmax-like attention (score transforms, masks, biases and tables, normalisers,
gates) and linear attention (feature maps of q and k, decays, causal and anti-causal masks, a normaliser over the
keys, at lengths on both sides of the chunked form's crossover).

Every generated declaration is a real Python file with an ``@ef.attention`` function, and beside it the same
maths written in plain torch, built by the generator itself (not by einflash). A declaration passes when

- it is refused, at declaration, lowering or call, with an ``einflash.errors.EinflashError``; or
- the float64 reference executor agrees with the plain-torch evaluation (a wrong oracle is caught too), the
  kernel's output (fp32, on this machine's backend) is within the tolerance rule of the reference, and, where
  the cascade has a backward, every gradient (fp16) is within the rule of torch.autograd through the plain-torch
  evaluation.

Anything else is a defect: an untyped exception, a silent mismatch. The tests run a fixed-seed share of it
(tests/fuzz); a long run, which collects distinct defects and writes each failing declaration to a folder::

    python -m einflash.fuzz --minutes 30 [--seed 0] [--out fuzz-failures]

needs the ``test`` extra (``hypothesis``).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib.util
import pathlib
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from .errors import DifferentiationError, EinflashError, LoweringError

# ---------------------------------------------------------------------------------------------------------------
# Declarations and their plain-torch twins
# ---------------------------------------------------------------------------------------------------------------

Env = dict  # the plain-torch evaluation's values: q, k, v ([B, Hq, ·, ·], k and v repeated over the group), extras,
# parameters, and the coordinates m ([1, 1, M, 1]) and n ([1, 1, 1, N]) as float64


@dataclass(frozen=True)
class Expr:
    """An expression of a declaration: its source text, and its value in plain torch (float64, broadcasting
    against ``[B, Hq, M, N]``); ``kind`` is "score" (varies like a score), "int" (an integer-valued coordinate
    expression), "bool" or "scalar"."""

    src: str
    value: Callable[[Env], torch.Tensor]
    kind: str


@dataclass(frozen=True)
class Extra:
    """An extra input: its annotation in the declaration and how a call makes it at a shape."""

    annotation: str
    make: Callable[[Shape, torch.Generator], torch.Tensor]


@dataclass(frozen=True)
class Shape:
    B: int
    Hkv: int
    group: int
    M: int
    N: int
    E: int
    F: int

    @property
    def Hq(self) -> int:
        return self.Hkv * self.group


@dataclass
class Program:
    """A generated declaration: its statements (source), its extra inputs and parameters, and the plain-torch
    evaluation of each statement, in order."""

    shape: Shape
    extras: dict[str, Extra] = field(default_factory=dict)
    params: dict[str, tuple[str, float]] = field(default_factory=dict)  # name -> (annotation, value)
    lines: list[str] = field(default_factory=list)
    steps: list[Callable[[Env], None]] = field(default_factory=list)  # each sets its statement's value in env
    result: str = "o"

    def assign(self, name: str, src: str, fn: Callable[[Env], torch.Tensor]) -> None:
        """A statement ``name = src`` and its plain-torch value ``fn(env)``."""
        self.lines.append(f"{name} = {src}")

        def step(env, name=name, fn=fn):
            env[name] = fn(env)

        self.steps.append(step)

    def source(self, name: str) -> str:
        args = ["q", "k", "v"] + [f"{n}: {e.annotation}" for n, e in self.extras.items()]
        args += [f"{n}: {a} = {v!r}" for n, (a, v) in self.params.items()]
        body = "\n".join(f"    {line}" for line in self.lines)
        return (
            f"import einflash as ef\n\n\n@ef.attention\ndef {name}({', '.join(args)}):\n{body}\n"
            f"    return {self.result}\n\n\n"
            f"# checked at {self.shape} (Hq = Hkv·group), inputs of Program.inputs(seed=0)\n"
        )

    def inputs(self, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        s = self.shape
        out = {
            "q": torch.randn(s.B, s.Hq, s.M, s.E, generator=g),
            "k": torch.randn(s.B, s.Hkv, s.N, s.E, generator=g),
            "v": torch.randn(s.B, s.Hkv, s.N, s.F, generator=g),
        }
        out = {k: v.to(dtype) for k, v in out.items()}
        for name, e in self.extras.items():
            x = e.make(s, g)
            out[name] = x.to(dtype) if x.is_floating_point() else x
        return out

    def evaluate(self, inputs: dict[str, torch.Tensor], dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The declaration's output in plain torch, computed in ``dtype``."""
        s = self.shape
        env: Env = {name: (x.to(dtype) if x.is_floating_point() else x) for name, x in inputs.items()}
        env["k"] = env["k"].repeat_interleave(s.group, dim=1)
        env["v"] = env["v"].repeat_interleave(s.group, dim=1)
        env["m"] = torch.arange(s.M, dtype=dtype).view(1, 1, s.M, 1)
        env["n"] = torch.arange(s.N, dtype=dtype).view(1, 1, 1, s.N)
        env["M"], env["N"], env["dtype"] = float(s.M), float(s.N), dtype
        env.update({p: float(v) for p, (_, v) in self.params.items()})
        for step in self.steps:
            step(env)
        return env[self.result]


# ---------------------------------------------------------------------------------------------------------------
# The generator (hypothesis strategies)
# ---------------------------------------------------------------------------------------------------------------


def _strategies():
    """The strategies, built on first use: hypothesis is a test dependency, not a run-time one."""
    from hypothesis import strategies as st

    shapes = st.builds(
        Shape,
        B=st.sampled_from([1, 2]),
        Hkv=st.sampled_from([1, 2]),
        group=st.sampled_from([1, 2]),
        M=st.sampled_from([1, 3, 16, 17, 40]),
        N=st.sampled_from([1, 5, 16, 33, 40]),
        E=st.sampled_from([8, 16, 20]),
        F=st.sampled_from([8, 16]),
    )

    def coord(d: int):
        """An integer-valued expression of coordinates, lengths and small constants."""
        leaves = st.sampled_from(
            [
                Expr("ef.m", lambda env: env["m"], "int"),
                Expr("ef.n", lambda env: env["n"], "int"),
                Expr("ef.M", lambda env: torch.tensor(env["M"], dtype=env["dtype"]), "int"),
                Expr("ef.N", lambda env: torch.tensor(env["N"], dtype=env["dtype"]), "int"),
            ]
        ) | st.integers(0, 9).map(
            lambda c: Expr(str(c), lambda env, c=c: torch.tensor(float(c), dtype=env["dtype"]), "int")
        )
        if d <= 0:
            return leaves

        def binary(a: Expr, op: str, b: Expr) -> Expr:
            fn = {"+": torch.add, "-": torch.sub}[op]
            return Expr(f"({a.src} {op} {b.src})", lambda env: fn(a.value(env), b.value(env)), "int")

        def scaled(a: Expr, c: int) -> Expr:
            return Expr(f"({a.src} * {c})", lambda env: a.value(env) * c, "int")

        def divided(a: Expr, op: str, c: int) -> Expr:
            fn = {"//": torch.floor_divide, "%": torch.remainder}[op]
            return Expr(f"({a.src} {op} {c})", lambda env: fn(a.value(env), c), "int")

        sub = coord(d - 1)
        return (
            leaves
            | st.builds(binary, sub, st.sampled_from(["+", "-"]), sub)
            | st.builds(scaled, sub, st.integers(2, 3))
            | st.builds(divided, sub, st.sampled_from(["//", "%"]), st.integers(2, 8))
        )

    def comparison(a: Expr, op: str, b: Expr) -> Expr:
        fn = {"<=": torch.le, "<": torch.lt, ">=": torch.ge, ">": torch.gt, "==": torch.eq, "!=": torch.ne}[op]
        return Expr(f"({a.src} {op} {b.src})", lambda env: fn(a.value(env), b.value(env)), "bool")

    def combined(a: Expr, op: str, b: Expr) -> Expr:
        fn = {"&": torch.logical_and, "|": torch.logical_or}[op]
        return Expr(f"({a.src} {op} {b.src})", lambda env: fn(a.value(env), b.value(env)), "bool")

    comparisons = st.builds(comparison, coord(2), st.sampled_from(["<=", "<", ">=", ">", "==", "!="]), coord(2))
    predicates = st.recursive(
        comparisons, lambda sub: st.builds(combined, sub, st.sampled_from(["&", "|"]), sub), max_leaves=3
    )
    return st, shapes, predicates


def _score_transform(st):
    """One step applied to the scores ``s``: a map, a bias from an extra input, a selection."""
    return st.tuples(
        st.sampled_from(
            [
                *("scale", "softcap", "alibi", "bias", "relative", "bucketed", "pairs", "abs", "sign"),
                *("max", "min", "where", "sigmoid", "tanh", "exp"),
            ]
        ),
        st.sampled_from([0.5, 2.0, 3.0]),
    )


def programs():
    """The strategy of random Programs."""
    st, shapes, predicates = _strategies()

    @st.composite
    def build(draw) -> Program:
        if draw(st.integers(0, 4)) == 0:
            return draw(linear_programs())
        shape = draw(shapes)
        p = Program(shape)
        assign = p.assign

        assign(
            "s", "q @ k * ef.scale", lambda env: torch.einsum("bhme,bhne->bhmn", env["q"], env["k"]) * (shape.E**-0.5)
        )
        # the plain-torch side's own: where the scores are present
        p.steps.append(lambda env: env.update(keep=torch.ones(shape.B, shape.Hq, shape.M, shape.N, dtype=torch.bool)))
        for kind, c in draw(st.lists(_score_transform(st), max_size=3)):
            if kind == "scale":
                assign("s", f"s * {c}", lambda env, c=c: env["s"] * c)
            elif kind == "softcap":
                assign("s", f"{c} * ef.tanh(s / {c})", lambda env, c=c: c * torch.tanh(env["s"] / c))
            elif kind == "alibi":
                p.extras.setdefault("slope", Extra('ef.Tensor["h"]', lambda s, g: torch.rand(s.Hq, generator=g)))
                assign(
                    "s",
                    "s + slope * (ef.n - ef.m)",
                    lambda env: env["s"] + env["slope"].view(1, -1, 1, 1) * (env["n"] - env["m"]),
                )
            elif kind == "bias":
                p.extras.setdefault(
                    "bias", Extra('ef.Tensor["h m n"]', lambda s, g: torch.randn(s.Hq, s.M, s.N, generator=g))
                )
                assign("s", "s + bias", lambda env: env["s"] + env["bias"].unsqueeze(0))
            elif kind == "relative":  # a table of the offsets n − m, read at an affine offset
                p.extras.setdefault(
                    "rel", Extra('ef.Tensor["h r"]', lambda s, g: torch.randn(s.Hq, s.M + s.N - 1, generator=g))
                )
                assign(
                    "s",
                    "s + rel[ef.n - ef.m + ef.M - 1]",
                    lambda env: env["s"] + env["rel"][:, _offsets(env)].unsqueeze(0),
                )
            elif kind == "bucketed":  # T5's form: the offset's bucket read from data, then the bucket's entry
                p.extras.setdefault("table", Extra('ef.Tensor["h r"]', lambda s, g: torch.randn(s.Hq, 5, generator=g)))
                p.extras.setdefault(
                    "bucket", Extra('ef.Tensor["d"]', lambda s, g: torch.randint(0, 5, (s.M + s.N - 1,), generator=g))
                )
                assign(
                    "s",
                    "s + table[bucket[ef.n - ef.m + ef.M - 1]]",
                    lambda env: env["s"] + env["table"][:, env["bucket"][_offsets(env)]].unsqueeze(0),
                )
            elif kind == "pairs":  # a bias per pair of segments, the query's segment read at its key position
                p.extras.setdefault(
                    "pair", Extra('ef.Tensor["h x y"]', lambda s, g: torch.randn(s.Hq, 3, 3, generator=g))
                )
                p.extras.setdefault(
                    "seg", Extra('ef.Tensor["b n"]', lambda s, g: torch.randint(0, 3, (s.B, s.N), generator=g))
                )
                assign("here", "ef.m + ef.N - ef.M", lambda env: env["m"] + env["N"] - env["M"])
                assign("s", "s + pair[seg[here], seg[ef.n]]", _segment_pairs)
            elif kind == "abs":
                assign("s", "ef.abs(s)", lambda env: env["s"].abs())
            elif kind == "sign":
                assign("s", "s * ef.sign(s)", lambda env: env["s"] * torch.sign(env["s"]))
            elif kind == "max":
                assign("s", f"ef.maximum(s, {-c})", lambda env, c=c: torch.clamp(env["s"], min=-c))
            elif kind == "min":
                assign("s", f"ef.minimum(s, {c})", lambda env, c=c: torch.clamp(env["s"], max=c))
            elif kind == "where":
                assign(
                    "s",
                    f"ef.where(s > 0, s, s * {1 / c})",
                    lambda env, c=c: torch.where(env["s"] > 0, env["s"], env["s"] / c),
                )
            elif kind == "sigmoid":
                assign("s", f"{c} * ef.sigmoid(s)", lambda env, c=c: c * torch.sigmoid(env["s"]))
            elif kind == "tanh":
                assign("s", "ef.tanh(s)", lambda env: torch.tanh(env["s"]))
            else:
                assign("s", f"ef.exp(s / {2 * c})", lambda env, c=c: torch.exp(env["s"] / (2 * c)))
        mask = draw(st.sampled_from(["none", "coords", "coords", "shared", "window", "documents", "threshold"]))
        if mask == "coords":
            pred = draw(predicates)
            assign("s", f"ef.mask(s, {pred.src})", lambda env: env["s"])
            p.steps.append(lambda env, pred=pred: env.update(keep=env["keep"] & pred.value(env).expand_as(env["keep"])))
        elif mask in ("shared", "window"):
            window = draw(st.integers(1, 9))
            p.params["window"] = ("int", window)
            if mask == "shared":  # a sub-expression used twice, as users write end-aligned windows
                assign("qp", "ef.m + ef.N - ef.M", lambda env: env["m"] + env["N"] - env["M"])
                pred_src = "(ef.n <= qp) & (qp - ef.n < window)"
            else:
                pred_src = "(ef.n - ef.m <= ef.N - ef.M) & (ef.m - ef.n + ef.N - ef.M < window)"
            assign("s", f"ef.mask(s, {pred_src})", lambda env: env["s"])

            def windowed(env):
                qp = env["m"] + env["N"] - env["M"]
                env["keep"] = env["keep"] & ((env["n"] <= qp) & (qp - env["n"] < env["window"]))

            p.steps.append(windowed)
        elif mask == "documents":

            def ids(length: int):
                return lambda s, g: torch.randint(0, 3, (s.B, length(s)), generator=g).sort(dim=-1).values

            p.extras["doc_q"] = Extra('ef.Tensor["b m"]', ids(lambda s: s.M))
            p.extras["doc_k"] = Extra('ef.Tensor["b n"]', ids(lambda s: s.N))
            assign("s", "ef.mask(s, doc_q == doc_k)", lambda env: env["s"])
            p.steps.append(
                lambda env: env.update(
                    keep=env["keep"] & (env["doc_q"][:, None, :, None] == env["doc_k"][:, None, None, :])
                )
            )
        elif mask == "threshold":
            p.extras["theta"] = Extra('ef.Tensor["h"]', lambda s, g: torch.randn(s.Hq, generator=g) * 0.3)
            assign("s", "ef.mask(s, s >= theta)", lambda env: env["s"])
            p.steps.append(lambda env: env.update(keep=env["keep"] & (env["s"] >= env["theta"].view(1, -1, 1, 1))))
        norm = draw(st.sampled_from(["softmax", "softmax", "manual", "sigmoid", "softmax_m", "threshold", "renormed"]))
        if norm in ("threshold", "renormed"):  # weights cut after the softmax: a second pass over the keys
            assign(
                "w",
                'ef.relu(ef.softmax(s, "n") - 0.05)',
                lambda env: torch.relu(_softmax(env["s"], env["keep"], -1) - 0.05),
            )
            if norm == "threshold":
                assign("p", "w", lambda env: env["w"])
            else:
                assign(
                    "p",
                    'w / w.sum("n")',
                    lambda env: env["w"] / torch.where(env["keep"], env["w"], 0.0).sum(-1, keepdim=True),
                )
        elif norm in ("softmax", "manual"):
            if norm == "softmax":
                assign("p", 'ef.softmax(s, "n")', lambda env: _softmax(env["s"], env["keep"], -1))
            else:
                p.lines += ['top = s.max("n")', "e = ef.exp(s - top)"]
                assign("p", 'e / e.sum("n")', lambda env: _softmax(env["s"], env["keep"], -1))
        elif norm == "softmax_m":
            assign("p", 'ef.softmax(s, "m")', lambda env: _softmax(env["s"], env["keep"], -2))
        else:
            assign("p", "ef.sigmoid(s)", lambda env: torch.where(env["keep"], torch.sigmoid(env["s"]), 0.0))
        assign(
            "o", "p @ v", lambda env: torch.einsum("bhmn,bhnf->bhmf", torch.where(env["keep"], env["p"], 0.0), env["v"])
        )
        # a row that saw no key has an absent output, stored as 0
        p.steps.append(lambda env: env.update(rows=env["keep"].any(-1, keepdim=True)))
        gate = draw(st.sampled_from(["none", "none", "head", "token"]))
        if gate == "head":
            p.extras["lam"] = Extra('ef.Tensor["h"]', lambda s, g: torch.rand(s.Hq, generator=g))
            assign("o", "o * lam", lambda env: env["o"] * env["lam"].view(1, -1, 1, 1))
        elif gate == "token":
            p.extras["gate"] = Extra('ef.Tensor["b h m"]', lambda s, g: torch.randn(s.B, s.Hq, s.M, generator=g))
            assign("o", "o * ef.sigmoid(gate)", lambda env: env["o"] * torch.sigmoid(env["gate"]).unsqueeze(-1))
        p.steps.append(lambda env: env.update(o=torch.where(env["rows"], env["o"], 0.0)))
        return p

    return build()


# feature maps of linear attention: (source with X for the input, plain torch); softmax over n for keys only
FEATURES = {
    "plain": ("X", lambda x: x),
    "relu1": ("ef.relu(X) + 1.0", lambda x: torch.relu(x) + 1.0),
    "exp": ("ef.exp(X * 0.5)", lambda x: torch.exp(x * 0.5)),
    "softmax_e": ('ef.softmax(X, "e")', lambda x: torch.softmax(x, -1)),
    "softmax_n": ('ef.softmax(X, "n")', lambda x: torch.softmax(x, 2)),
}


def linear_programs():
    """The strategy of random linear-attention Programs: feature maps of q and k contracted into weights, a decay
    between positions, a causal or anti-causal mask, a normaliser over the keys; lengths past the chunked form's
    crossover as well as below it (its kernels, the two stages' and the quadratic ones)."""
    from hypothesis import strategies as st

    shapes = st.builds(
        Shape,
        B=st.sampled_from([1, 2]),
        Hkv=st.sampled_from([1, 2]),
        group=st.sampled_from([1, 2]),
        M=st.sampled_from([17, 40, 96, 130]),
        N=st.sampled_from([17, 40, 96, 130]),
        E=st.sampled_from([8, 16]),
        F=st.sampled_from([8, 16]),
    )

    @st.composite
    def build(draw) -> Program:
        shape = draw(shapes)
        if draw(st.booleans()):  # the chunked form runs only where there are as many queries as keys
            shape = replace(shape, M=shape.N)
        p = Program(shape)
        fq, fk = draw(st.sampled_from(sorted(FEATURES)[:-1])), draw(st.sampled_from(sorted(FEATURES)))
        for side, name in (("q", fq), ("k", fk)):
            src, fn = FEATURES[name]
            p.assign(f"f{side}", src.replace("X", side), lambda env, fn=fn, side=side: fn(env[side]))
        mask = draw(st.sampled_from(["none", "causal", "causal", "after"]))
        keep = {"none": lambda env: env["m"] >= 0, "causal": lambda env: env["n"] <= env["m"]}
        keep["after"] = lambda env: env["n"] >= env["m"]
        # a decay between positions: per head (γ^|m − n|), per position or per feature (cumulative log gates G, read
        # at the query's and the key's position: exp(G[m] − G[n]), GLA's); the gates need as many queries as keys
        decay = draw(st.sampled_from(["none", "head", "position", "feature"])) if mask != "none" else "none"
        if decay in ("position", "feature"):
            p.shape = shape = replace(shape, M=shape.N)
        sign = 1.0 if mask == "causal" else -1.0  # exp(sign·(G[m] − G[n])) ≤ 1 on the kept side
        if decay == "feature":
            p.extras["g"] = Extra('ef.Query["e"]', lambda s, g: _gates(s, g, s.E))
            between = 'g - g[ef.n, ef.rank("e")]' if mask == "causal" else 'g[ef.n, ef.rank("e")] - g'
            p.assign(
                "a",
                f'(fq * fk * ef.exp({between})).sum("e")',
                lambda env, sign=sign: torch.einsum(
                    "bhme,bhne,bhmne->bhmn",
                    env["fq"],
                    env["fk"],
                    torch.exp(sign * (env["g"].unsqueeze(3) - env["g"].unsqueeze(2))),
                ),
            )
        else:
            p.assign("a", "fq @ fk", lambda env: torch.einsum("bhme,bhne->bhmn", env["fq"], env["fk"]))
        if decay == "head":
            p.extras["decay"] = Extra('ef.Tensor["h"]', lambda s, g: 0.7 + 0.3 * torch.rand(s.Hq, generator=g))
            gap = "ef.m - ef.n" if mask == "causal" else "ef.n - ef.m"
            p.assign(
                "a",
                f"a * ef.exp(({gap}) * ef.log(decay))",
                lambda env, sign=sign: (
                    env["a"] * torch.exp(sign * (env["m"] - env["n"]) * torch.log(env["decay"]).view(1, -1, 1, 1))
                ),
            )
        elif decay == "position":
            p.extras["g"] = Extra('ef.Tensor["b h m"]', lambda s, g: _gates(s, g, 1).squeeze(-1))
            between = "g - g[ef.n]" if mask == "causal" else "g[ef.n] - g"
            p.assign(
                "a",
                f"a * ef.exp({between})",
                lambda env, sign=sign: env["a"] * torch.exp(sign * (env["g"].unsqueeze(-1) - env["g"].unsqueeze(-2))),
            )
        if mask != "none":
            pred = "ef.n <= ef.m" if mask == "causal" else "ef.n >= ef.m"
            p.assign("a", f"ef.mask(a, {pred})", lambda env: env["a"])
        p.steps.append(lambda env, mask=mask: env.update(keep=keep[mask](env).expand(env["a"].shape)))

        def weighted(env) -> torch.Tensor:
            return torch.einsum("bhmn,bhnf->bhmf", torch.where(env["keep"], env["a"], 0.0), env["v"])

        positive = "plain" not in (fq, fk)  # a row sum of weights of either sign may come near 0
        if positive and draw(st.booleans()):
            p.assign(
                "o",
                '(a @ v) / a.sum("n")',
                lambda env: weighted(env) / torch.where(env["keep"], env["a"], 0.0).sum(-1, keepdim=True),
            )
        else:
            p.assign("o", "a @ v", weighted)
        p.steps.append(lambda env: env.update(o=torch.where(env["keep"].any(-1, keepdim=True), env["o"], 0.0)))
        return p

    return build()


def _gates(s: Shape, g: torch.Generator, width: int) -> torch.Tensor:
    """Cumulative log forget gates ``[B, Hq, M, width]``: non-increasing along the sequence (GLA's, 1/16 normalised)."""
    logits = torch.randn(s.B, s.Hq, s.M, width, generator=g)
    return (torch.nn.functional.logsigmoid(logits) / 16).cumsum(dim=2)


def _offsets(env: Env) -> torch.Tensor:
    """n − m + M − 1 at every pair, [M, N]: the position of the offset n − m in a table of M + N − 1."""
    return (env["n"] - env["m"] + env["M"] - 1).long()[0, 0]


def _segment_pairs(env: Env) -> torch.Tensor:
    """``s + pair[seg[m + N − M], seg[n]]``: the query's segment read at its end-aligned key position (a
    position outside ``seg`` is the declaration's ShapeError before this runs)."""
    seg, pair = env["seg"], env["pair"]
    here = (env["m"] + env["N"] - env["M"]).long()[0, 0, :, 0]  # [M]
    rows, cols = seg[:, here], seg  # [B, M], [B, N]
    bias = pair[:, rows[:, :, None], cols[:, None, :]]  # [H, B, M, N]
    return env["s"] + bias.transpose(0, 1)


def _softmax(s: torch.Tensor, keep: torch.Tensor, dim: int) -> torch.Tensor:
    """A softmax over ``dim`` of the present scores: absent ones get weight 0, a fiber with none all 0 (no NaN,
    nor a NaN gradient)."""
    masked = torch.where(keep, s, float("-inf"))
    top = masked.amax(dim, keepdim=True)
    top = torch.where(torch.isfinite(top), top, 0.0)
    e = torch.where(keep, torch.exp(s - top), 0.0)
    den = e.sum(dim, keepdim=True)
    return e / torch.where(den > 0, den, 1.0)


# ---------------------------------------------------------------------------------------------------------------
# Checking one declaration
# ---------------------------------------------------------------------------------------------------------------


class Defect(AssertionError):
    """A declaration einflash got wrong: ``kind`` says how, the declaration's source is in the message."""

    def __init__(self, kind: str, detail: str, source: str):
        self.kind, self.detail, self.source = kind, detail, source
        super().__init__(f"{kind}: {detail}\n--- declaration ---\n{source}")

    @property
    def signature(self) -> str:
        """What tells this defect from others (the kind and the first line of the detail, numbers left out)."""
        first = self.detail.splitlines()[0] if self.detail else ""
        return self.kind + ": " + "".join(ch for ch in first if not ch.isdigit())[:160]


@dataclass
class Outcome:
    """What one declaration came to: ``refused`` (with the typed error's message), or checked."""

    refused: str | None = None
    stage: str = ""


_COUNTER = [0]


def load(source: str, name: str):
    """The AttentionOp a source declares, imported from a real file (tracing reads the source's lines)."""
    folder = pathlib.Path(tempfile.mkdtemp(prefix="einflash_fuzz_"))
    path = folder / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"einflash_fuzz_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return getattr(mod, name)


def _typed(stage: str, source: str, fn: Callable):
    """``fn()``, a typed einflash error as a refusal, any other exception as a defect."""
    try:
        return fn(), None
    except EinflashError as e:
        return None, Outcome(f"{type(e).__name__}: {e}", stage)
    except Exception as e:  # noqa: BLE001 -- an untyped exception is the defect being looked for
        raise Defect(
            f"untyped error at {stage}", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=-3)}", source
        ) from None


def check(program: Program, seed: int = 0, gradients: bool = True, jagged: bool = False) -> Outcome:
    """Declare, reference, run and differentiate ``program``; raise Defect where einflash is wrong. With ``jagged``,
    also its batch packed as a jagged batch (``_check_jagged``)."""
    from .testing import (
        gradient_allowances,
        gradient_magnitude,
        judge,
        judge_gradient,
        overflow_stand_in,
        rounding_allowance,
        trainable,
    )

    digest = hashlib.sha256("\n".join(program.lines).encode()).hexdigest()[:8]
    name = f"fuzz_{digest}"
    source = program.source(name)
    op, refused = _typed("declaration", source, lambda: load(source, name))
    if refused:
        return refused
    inputs = program.inputs(seed, torch.float32)
    params = {p: v for p, (_, v) in program.params.items()}
    ref, refused = _typed("reference", source, lambda: op.reference(**inputs, **params))
    if refused:
        return refused
    plain = program.evaluate(inputs)
    if ref.shape != plain.shape:
        raise Defect(
            "oracle disagrees", f"reference shape {tuple(ref.shape)}, plain torch {tuple(plain.shape)}", source
        )
    # where the maths overflows even in float64 (exp of exp of exp), both must say so at the same places; the
    # numbers are compared where both are finite
    finite = torch.isfinite(ref) & torch.isfinite(plain)
    scale = float(plain[finite].abs().max()) if finite.any() else 0.0
    bad = float((ref - plain)[finite].abs().max()) if finite.any() else 0.0
    same_elsewhere = torch.equal(ref.isnan(), plain.isnan()) and torch.equal(
        ref[~finite].nan_to_num(), plain[~finite].nan_to_num()
    )
    if not (bad <= 1e-9 * max(1.0, scale)) or not same_elsewhere:
        raise Defect(
            "oracle disagrees", f"reference against plain torch: max error {bad:.3e} (magnitude {scale:.3e})", source
        )
    out, refused = _typed("call", source, lambda: op(**inputs, **params))
    if refused:
        return refused
    lowp = program.evaluate(inputs, torch.float32).double()
    # where the maths is not finite the kernel must not be either; elsewhere the rule holds
    if (torch.isfinite(out) & ~finite).any():
        raise Defect("silent wrong result", "a finite kernel output where the maths overflows", source)
    out, plain, lowp = out[finite], plain[finite], lowp[finite]
    verdict = judge(out, plain, lowp, lambda: rounding_allowance(op, **inputs, **params)[finite])
    if not verdict.ok:
        raise Defect(
            "silent wrong result",
            f"kernel max error {verdict.max_error:.3e} > tolerance {verdict.tolerance:.3e} (beyond an allowance of "
            f"up to {verdict.allowance:.3e} for the maths' rounding order)",
            source,
        )
    if jagged:
        _check_jagged(op, inputs, params, source, gradients and op.backward.error is None)
    if not gradients or op.backward.error is not None:
        return Outcome(None, "forward")
    # gradients in fp16: the tolerance rule compares with plain PyTorch in the kernel's dtype, and in fp32 a backward
    # that recomputes the scores (every FlashAttention-style one) errs by up to a few times PyTorch's, which
    # stores them (docs/training.md, Numerics); in fp16 the inputs' rounding dominates both
    half = {k: (x.half() if x.is_floating_point() else x) for k, x in inputs.items()}
    leaves = trainable(op, half)  # a table read at gathered positions is frozen: its scatter is not lowered
    d_o = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed + 1)).half()  # out may be masked

    def backward():
        op(**leaves, **params).backward(d_o)
        return {k: x.grad for k, x in leaves.items() if x.requires_grad}

    grads, refused = _typed("backward", source, backward)
    if refused:
        return refused
    exact = _plain_grads(program, half, d_o, torch.float64)
    lowp = _plain_grads(program, half, d_o, torch.float16)
    wide = functools.cache(lambda: _plain_grads(program, half, d_o, torch.float32))
    allowed = functools.cache(lambda: gradient_allowances(op, d_o, dtype=torch.float16, **half, **params))
    magnitude = gradient_magnitude(exact)
    beyond = not bool(torch.isfinite(program.evaluate(half)).all())  # the float64 forward left its range
    for k, want in exact.items():
        if not leaves[k].requires_grad:
            continue
        got = grads.get(k)
        if got is None:
            got = torch.zeros_like(want)
        stood_in = overflow_stand_in(lowp[k].double(), want, torch.float16, lambda k=k: wide()[k])
        verdict = judge_gradient(got, want, stood_in, magnitude, lambda k=k: allowed()[k], beyond)
        if not verdict.ok:
            raise Defect(
                "silent wrong gradient",
                f"d{k}: max error {verdict.max_error:.3e} > tolerance {verdict.tolerance:.3e} "
                f"(beyond an allowance of up to {verdict.allowance:.3e} for the backward's row term and recomputed "
                f"scores)",
                source,
            )
    return Outcome(None, "gradients")


def _check_jagged(op, inputs: dict, params: dict, source: str, gradients: bool) -> None:
    """The batch's sequences packed into a jagged batch (``cu_seqlens``) must give each sequence's output, and
    gradients, as the stacked call does: the same kernels, per sequence. A declaration the jagged path refuses
    (reads at computed positions, masks on per-token data) is skipped, as is one with a per-batch input not laid
    out along its one sequence rank, or one read at computed positions (whose bounds are per sequence)."""
    if op.cascade.computed_reads:
        return
    B = inputs["q"].shape[0]
    along: dict[str, int] = {}  # each input's sequence dimension, packed
    for t in op.cascade.inputs:
        seq = [r for r in t.ranks if r in ("m", "n")]
        packable = len(seq) == 1 and "b" in t.ranks
        if not packable and (seq or "b" in t.ranks):
            return
        if seq:
            along[t.name] = t.ranks.index(seq[0])

    def pack(x: torch.Tensor, d: int) -> torch.Tensor:  # [B, ..., L, ...] to [1, ..., B·L, ...]
        return x.movedim(0, d - 1).flatten(d - 1, d).unsqueeze(0)

    def unpack(x: torch.Tensor, d: int) -> torch.Tensor:
        return x.squeeze(0).unflatten(d - 1, (B, -1)).movedim(d - 1, 0)

    def leaves(given: dict) -> dict:
        return {
            k: (x.detach().clone().requires_grad_(gradients) if x.is_floating_point() else x) for k, x in given.items()
        }

    stacked = leaves(inputs)
    jagged = leaves({k: (pack(x, along[k]) if k in along else x) for k, x in inputs.items()})
    cu = [torch.tensor([0] + [inputs[x].shape[2]] * B).cumsum(0) for x in ("q", "k")]
    try:
        out = op(**jagged, **params, cu_seqlens_q=cu[0], cu_seqlens_k=cu[1])
    except (LoweringError, DifferentiationError):
        return
    want = op(**stacked, **params)
    got = unpack(out, 2)  # NaN where the maths overflows: at the same places in both
    if not (torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())):
        if op.forward.linear is None and op.forward.stages is None:
            raise Defect("jagged disagrees", f"output: max difference {float((got - want).abs().max()):.3e}", source)
        # the stacked call may run another plan than a jagged batch (the chunked form, a key stage split along the
        # keys), adding in another order: the jagged one is held to the rule
        from .testing import check as held

        given = {k: x.detach() for k, x in jagged.items()}
        verdict = held(op, out.detach(), **given, **params, cu_seqlens_q=cu[0], cu_seqlens_k=cu[1])
        if not verdict.ok:
            raise Defect("silent wrong result", f"jagged batch: {verdict}", source)
    if not gradients:
        return
    d_o = torch.randn(want.shape, generator=torch.Generator().manual_seed(5))
    try:  # a backward refused with a typed error is the stacked check's to judge
        out.backward(pack(d_o, 2))
    except (LoweringError, DifferentiationError):
        return
    want.backward(d_o)
    for k, x in stacked.items():
        if x.grad is None:
            continue
        got = jagged[k].grad
        got = unpack(got, along[k]) if k in along else got
        tolerance = 1e-6 * float(x.grad.nan_to_num().abs().max().clamp(min=1))
        if not torch.allclose(got, x.grad, rtol=1e-5, atol=tolerance, equal_nan=True):
            raise Defect("jagged disagrees", f"d{k}: max difference {float((got - x.grad).abs().max()):.3e}", source)


def _plain_grads(program: Program, inputs: dict, d_o: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    leaves = {k: (x.detach().to(dtype).requires_grad_() if x.is_floating_point() else x) for k, x in inputs.items()}
    out = program.evaluate(leaves, dtype)
    floats = [k for k, x in leaves.items() if x.is_floating_point()]
    grads = torch.autograd.grad(out, [leaves[k] for k in floats], d_o.to(dtype), allow_unused=True)
    return {k: (torch.zeros_like(leaves[k]) if g is None else g).double() for k, g in zip(floats, grads)}


# ---------------------------------------------------------------------------------------------------------------
# The long run
# ---------------------------------------------------------------------------------------------------------------


def run(minutes: float, seed: int = 0, out: pathlib.Path | None = None, log=print) -> dict[str, Defect]:
    """Fuzz for ``minutes``; return the distinct defects found (by signature), each with its smallest
    declaration (hypothesis shrinks it). ``out``: a folder each defect's declaration is written to."""
    from hypothesis import HealthCheck, Phase, given, settings

    deadline = time.monotonic() + 60 * minutes
    found: dict[str, Defect] = {}
    checked = [0, 0]  # declarations checked, refused

    class Stop(Exception):
        pass

    while time.monotonic() < deadline:

        @settings(
            max_examples=10**6,
            deadline=None,
            database=None,
            derandomize=False,
            suppress_health_check=list(HealthCheck),
            phases=[Phase.generate, Phase.shrink],
            report_multiple_bugs=False,
        )
        @given(programs())
        def prop(p: Program):
            if time.monotonic() > deadline:
                raise Stop
            try:
                outcome = check(p, jagged=True)
            except Defect as d:
                if d.signature in found:
                    return  # known: look for others
                raise
            checked[0] += 1
            checked[1] += outcome.refused is not None

        try:
            prop._hypothesis_internal_use_seed = seed  # type: ignore[attr-defined]
            prop()
        except Stop:
            break
        except Defect as d:
            found[d.signature] = d
            log(f"defect {len(found)}: {d.signature}")
            if out is not None:
                out.mkdir(parents=True, exist_ok=True)
                (out / f"defect_{len(found):02d}.txt").write_text(str(d))
        seed += 1
    log(f"{checked[0]} declarations checked ({checked[1]} refused with a typed error), {len(found)} distinct defects")
    return found


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m einflash.fuzz", description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=pathlib.Path, default=None, help="a folder for the failing declarations")
    a = ap.parse_args(argv)
    found = run(a.minutes, a.seed, a.out)
    for d in found.values():
        print(f"\n{d}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["Program", "Shape", "Defect", "Outcome", "programs", "check", "run"]
