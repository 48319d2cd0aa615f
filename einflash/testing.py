"""The tolerance rule every kernel is held to (docs/design.md §7), and random inputs for a declaration.

A kernel's error against the float64 reference may be at most twice the error of
the same maths done by PyTorch in the kernel's dtype (the reference executor run in
that dtype), plus a small floor of a few units in the last place of the output, beyond
what computing the maths in another order than PyTorch's may move it (:func:`rounding_allowance`).

>>> import torch, einflash as ef
>>> @ef.attention
... def plain(q, k, v):
...     return ef.softmax(q @ k * ef.scale, "n") @ v
>>> q = torch.randn(1, 2, 9, 16)
>>> check(plain, plain(q, q, q, backend="reference"), q, q, q).ok
True

Gradients are held to the same rule (:func:`check_gradients`): each input's gradient against
torch.autograd through the float64 reference, with the error of autograd through the reference
run in the kernel's dtype as the measure of what that dtype allows, beyond what the backward's row term may
move it: a FlashAttention-form backward reads a softmax's row term from the rounded output where autograd
rebuilds it from the same products it cancels against (:func:`row_term_allowance`), and it recomputes the
scores in another order than the forward while normalising with the forward's row states
(:func:`recompute_allowance`); a chain from the scores that is steep (an exp before the softmax) amplifies both
far above either dtype's error.

Where the same maths overflows in the kernel's dtype (fp16 stops at 65504: a decay raised to a long
distance, a sum of a million terms) while the exact result is finite, PyTorch's run has no error to measure
there, and the rule would shrink to its floor; a kernel that keeps fp32 inside is right to stay finite. There
the float32 run's deviation from the exact result, scaled by the ratio of the two dtypes' epsilons, stands in
(:func:`overflow_stand_in`): the error that maths makes at the kernel's precision given the range. Where even
that run is not finite (``exp(exp(s))`` leaves fp32's range), a kernel output that is not finite there is the
dtype's answer, not an error (:func:`deviation`); a finite one is still measured.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .ir.reference import bind_extents, bind_params, run_reference

ULP_FLOOR = 4  # units in the last place of the output's dtype, times the output's magnitude
ROW_TERM_SIGN_DRAWS = 8  # sign patterns of the rows' roundings tried by row_term_allowance
RECOMPUTE_DRAWS = 4  # sign patterns of the recomputed scores' roundings tried by recompute_allowance


@dataclass(frozen=True)
class Verdict:
    max_error: float
    tolerance: float
    lowp_error: float  # the error of plain PyTorch in the kernel's dtype
    ok: bool
    allowance: float = 0.0  # the largest allowance used (rounding_allowance; row_term + recompute_allowance)

    def as_dict(self) -> dict:
        return {
            "max_error": self.max_error,
            "tolerance": self.tolerance,
            "lowp_error": self.lowp_error,
            "allowance": self.allowance,
            "ok": self.ok,
        }


def tolerance_floor(dtype: torch.dtype, magnitude: float) -> float:
    return ULP_FLOOR * torch.finfo(dtype).eps * max(1.0, magnitude)


def overflow_stand_in(
    lowp: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype, wide: Callable[[], torch.Tensor]
) -> torch.Tensor:
    """``lowp`` (the same maths in ``dtype``) where it is finite or the exact result is not; elsewhere the
    float32 run (``wide()``, computed only then) deviating from ``exact`` by its error times eps(dtype)/eps(fp32).

    >>> exact = torch.tensor([1.0, 2.0], dtype=torch.float64)
    >>> lowp = torch.tensor([1.0009765625, float("inf")], dtype=torch.float64)
    >>> overflow_stand_in(lowp, exact, torch.float16, lambda: torch.tensor([1.0, 2.0 + 2**-22])).tolist()
    [1.0009765625, 2.001953125]
    """
    lost = ~torch.isfinite(lowp) & torch.isfinite(exact)
    if dtype == torch.float32 or not bool(lost.any()):
        return lowp
    ratio = torch.finfo(dtype).eps / torch.finfo(torch.float32).eps
    return torch.where(lost, exact + (wide().double() - exact) * ratio, lowp)


def lowp_error(lowp: torch.Tensor, exact: torch.Tensor) -> float:
    """Plain PyTorch's error in the kernel's dtype, where it is finite: where it overflows (a masked
    ``exp(·)`` that a mask's where multiplies by 0 gives NaN) it has no error to compare with.

    >>> lowp_error(torch.tensor([1.0, float("nan"), 2.5]), torch.tensor([1.5, 2.0, 2.0]))
    0.5
    """
    finite = torch.isfinite(lowp)
    return float((lowp - exact)[finite].abs().max()) if finite.any() else 0.0


def check(op, out: torch.Tensor, *args, **kwargs) -> Verdict:
    """Hold ``out`` (what a kernel returned for these arguments) to the tolerance rule."""
    with torch.no_grad():  # values to compare, whether or not the arguments require grad: no graph to keep
        exact = op.reference(*args, **kwargs)
        lowp = op.reference(*args, dtype=out.dtype, **kwargs).double()
        wide = lambda: op.reference(*args, dtype=torch.float32, **kwargs)  # noqa: E731 -- only on overflow
        moved = lambda: rounding_allowance(op, *args, **kwargs)  # noqa: E731 -- only outside the rule without it
        return judge(out, exact, overflow_stand_in(lowp, exact, out.dtype, wide), moved)


def references(cascade, inputs: dict, params: dict, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 reference output and the same maths in ``dtype`` (as float64): what ``judge`` compares with."""
    exact = run_reference(cascade, inputs, params)
    lowp = run_reference(cascade, inputs, params, dtype=dtype).double()
    wide = lambda: run_reference(cascade, inputs, params, dtype=torch.float32)  # noqa: E731 -- only on overflow
    return exact, overflow_stand_in(lowp, exact, dtype, wide)


def deviation(out: torch.Tensor, exact: torch.Tensor, lowp: torch.Tensor) -> torch.Tensor:
    """``|out − exact|`` per entry, infinite where ``out`` is not finite, except where the same maths in the
    kernel's dtype (``lowp``) is not finite either: the values left that dtype's range there (``exp(exp(s))`` in
    fp32), and a kernel that says so (NaN or ±inf) is right; a finite wrong number there is still measured.

    >>> deviation(torch.tensor([1.0, float("nan"), float("nan")]), torch.tensor([1.5, 2.0, 2.0]),
    ...           torch.tensor([1.0, float("nan"), 2.0])).tolist()
    [0.5, 0.0, inf]
    """
    lost = ~torch.isfinite(out)
    diff = (out.double() - exact).abs()
    return torch.where(lost & ~torch.isfinite(lowp), 0.0, torch.where(lost, float("inf"), diff))


def judge(
    out: torch.Tensor, exact: torch.Tensor, lowp: torch.Tensor, allowance: Callable[[], torch.Tensor] | None = None
) -> Verdict:
    """The tolerance rule for ``out`` against precomputed ``references`` (a tuner checks many outputs against one):
    its error beyond each entry's ``allowance`` (what computing the maths in another order may move it:
    :func:`rounding_allowance`; called only for an output outside the rule without it) at most twice PyTorch's
    error in the kernel's dtype plus the floor."""
    if out.numel() == 0:
        return Verdict(0.0, 0.0, 0.0, True)
    diff = deviation(out, exact, lowp)
    lowp_err = lowp_error(lowp, exact)
    tol = 2 * lowp_err + tolerance_floor(out.dtype, float(exact.abs().max()))
    bad = float(diff.max())
    if bad <= tol or allowance is None:
        return Verdict(bad, tol, lowp_err, bad <= tol)
    allowed = allowance()
    return Verdict(bad, tol, lowp_err, float((diff - allowed).max()) <= tol, float(allowed.max()))


def reference_gradients(
    op, grad_output: torch.Tensor, *args, dtype: torch.dtype = torch.float64, **kwargs
) -> dict[str, torch.Tensor | None]:
    """torch.autograd's gradient of ``Σ out·grad_output`` for every floating-point input, through the reference
    executor computing in ``dtype`` (each gradient in that dtype; None for integer inputs)."""
    inputs, params = op.bind(args, kwargs)
    leaves = {n: (x.detach().to(dtype).requires_grad_() if x.is_floating_point() else x) for n, x in inputs.items()}
    floats = [n for n, x in leaves.items() if x.is_floating_point()]
    out = op.reference(**leaves, **params, dtype=dtype)
    grads = torch.autograd.grad(out, [leaves[n] for n in floats], grad_output.to(dtype), allow_unused=True)
    made = {n: (torch.zeros_like(leaves[n]) if g is None else g) for n, g in zip(floats, grads)}
    return {n: made.get(n) for n in inputs}


def row_term_allowance(
    op, grad_output: torch.Tensor, *args, dtype: torch.dtype, **kwargs
) -> dict[str, torch.Tensor | None]:
    """How far rounding in the backward's row term may move each floating-point gradient, to first order, for a
    kernel computing in ``dtype`` (zeros where ``op`` has no log-sum-exp).

    A FlashAttention-form backward makes a softmax's ``dS = p·(dP − Δ)`` with the row term ``Δ = Σ_f dO·O`` read
    from the stored output, where autograd subtracts ``Σ_n p·dP`` built from the very ``dP`` it subtracts it
    from: equal in exact arithmetic, but ``Δ`` carries the output's rounding in ``dtype``
    (``|Σ_f dO·(round(O) − O)|``), and ``Δ`` and ``dP`` two float32 sums' of F products each (within
    ``F·eps(fp32)·Σ_f |dO·O|`` each), together ``w`` per row.
    A change ``δ`` of ``Δ`` moves ``dS`` by ``−δ·p = −δ·∂lse/∂s``, so each gradient by ``δ·∂lse/∂input``: the
    allowance is ``|∂(Σ_m ±w_m·lse_m)/∂input|``, the largest over all rows moving one way and a few seeded
    sign patterns.
    It matters where the chain from the scores amplifies ``dS`` (an ``exp`` before the softmax) or sums it
    against large factors (a slope's gradient ``Σ dS·(n − m)`` at decode offsets); elsewhere it is below the floor.

    >>> import torch, einflash as ef
    >>> @ef.attention
    ... def plain(q, k, v):
    ...     return ef.softmax(q @ k * ef.scale, "n") @ v
    >>> q, k, v, g = torch.randn(4, 1, 1, 5, 16).unbind()
    >>> float(row_term_allowance(plain, g, q, k, v, dtype=torch.float16)["q"].max()) < 1e-2
    True
    """
    inputs, params = op.bind(args, kwargs)
    leaves = {n: (x.detach().double().requires_grad_() if x.is_floating_point() else x) for n, x in inputs.items()}
    floats = [n for n, x in leaves.items() if x.is_floating_point()]
    if op.lse_error is not None:
        return {n: (torch.zeros_like(leaves[n]) if n in floats else None) for n in inputs}
    out, lse = op.reference(**leaves, **params, return_lse=True)
    exact = out.detach()
    d_o = grad_output.double()
    stored = (d_o * (exact.to(dtype).double() - exact)).sum(-1).abs()  # the output's rounding in its dtype
    # the float32 sums': the row term's and the backward's dP = Σ_f dO·V it is subtracted from, F products each,
    # each within the textbook bound F·eps(fp32)·Σ|terms| (the fuzzer found 6.5 times one eps's at F = 8)
    summed = 2 * d_o.shape[-1] * torch.finfo(torch.float32).eps * (d_o.abs() * exact.abs()).sum(-1)
    live = torch.isfinite(lse)  # an empty row has no row term
    weight, lse = torch.where(live, stored + summed, 0.0), torch.where(live, lse, 0.0)
    # the rows' roundings have their own signs: rows whose terms would cancel in one sum need not cancel in the
    # kernel, so besides all rows moving one way, a few seeded sign patterns; each entry keeps the largest move
    g = torch.Generator().manual_seed(0)
    signs = [torch.ones_like(weight)] + [
        (torch.randint(0, 2, weight.shape, generator=g).double() * 2 - 1).to(weight.device)
        for _ in range(ROW_TERM_SIGN_DRAWS)
    ]
    made = {n: torch.zeros_like(leaves[n]) for n in floats}
    for i, sign in enumerate(signs):
        moved = (sign * weight * lse).sum()
        last = i + 1 == len(signs)
        grads = torch.autograd.grad(moved, [leaves[n] for n in floats], allow_unused=True, retain_graph=not last)
        for n, grad in zip(floats, grads):
            if grad is not None:
                made[n] = torch.maximum(made[n], grad.abs())
    return {n: made.get(n) for n in inputs}


def recompute_allowance(
    op, grad_output: torch.Tensor, *args, draws: int = RECOMPUTE_DRAWS, **kwargs
) -> dict[str, torch.Tensor | None]:
    """How far the backward's recomputed scores may move each floating-point gradient (zeros where ``op`` has
    no backward).

    The backward recomputes ``q·k`` with float32 sums in another order than the forward's, so each score differs
    by about ``eps(fp32)·|q|·|k|``, while the row states it normalises with (the maximum, the log-sum-exp) are the
    forward's. Through a transform steep in the scores (``exp(exp(s))``: a slope of ``x·exp(s)``) that difference
    becomes one of the exponent, and every weight moves with it. Here the gradient cascade runs on the float64
    reference against the unmoved forward's states, with the inputs the scores contract (``q`` and ``k``: those
    with the rank ``e``) moved by ``eps(fp32)`` of their magnitude in seeded sign patterns; each entry keeps the
    largest change. For plain softmax it is far below the floor (tested).

    >>> import torch, einflash as ef
    >>> @ef.attention
    ... def plain(q, k, v):
    ...     return ef.softmax(q @ k * ef.scale, "n") @ v
    >>> q, k, v, g = torch.randn(4, 1, 1, 5, 16).unbind()
    >>> float(recompute_allowance(plain, g, q, k, v)["q"].max()) < 1e-5
    True
    """
    inputs, params = op.bind(args, kwargs)
    given = {n: (x.detach().double() if x.is_floating_point() else x) for n, x in inputs.items()}
    none = {n: (torch.zeros_like(x) if x.is_floating_point() else None) for n, x in given.items()}
    if op.backward.error is not None or op.backward.differentiates_stages:  # the stages' backward saves nothing
        return none
    c = op.forward.rewritten
    values = bind_params(c, params, bind_extents(c, given, params))

    def gradients(moved: dict) -> dict:
        return op.backward.on_reference(moved, values, grad_output, states_from=given)

    base = gradients(given)
    made = dict(none)
    for moved in _scores_moved(op, given, draws):
        for n, grad in gradients(moved).items():
            if grad is not None and base.get(n) is not None:
                change = (grad - base[n]).abs()  # where float64 itself overflows there is nothing to allow
                made[n] = torch.maximum(made[n], torch.where(torch.isfinite(change), change, 0.0))
    return made


def rounding_allowance(op, *args, draws: int = RECOMPUTE_DRAWS, **kwargs) -> torch.Tensor:
    """How far computing the maths in another order than PyTorch's may move each output entry.

    A kernel sums ``q·k`` in its own order (tensor-core tiles), folds a product's constants into one
    (``scale·27·log2 e``), and makes every later value (the weights, their sums) with other roundings than
    PyTorch's: each score differs by about ``eps(fp32)·|q|·|k|``, each intermediate by about ``eps(fp32)`` of
    itself, whichever way either computes it. Where the scores are large (a softmax of ``27·s`` reaches ~100) or
    a step cancels (a threshold on the weights, ``relu(p − τ)`` with ``p`` near ``τ``, renormalised), that moves
    the output by more than PyTorch's own error happens to be at the worst entry. The float64 reference runs with
    the inputs the scores contract (``q`` and ``k``: those with the rank ``e``) moved by ``eps(fp32)`` of their
    magnitude and every Einsum's values rounded by ``eps(fp32)`` of themselves, in seeded sign patterns; each
    entry keeps the largest change. For plain softmax it is of the size of PyTorch's own fp32 error (tested).

    >>> import torch, einflash as ef
    >>> @ef.attention
    ... def plain(q, k, v):
    ...     return ef.softmax(q @ k * ef.scale, "n") @ v
    >>> q, k, v = torch.randn(3, 1, 1, 5, 16).unbind()
    >>> float(rounding_allowance(plain, q, k, v).max()) < 1e-5
    True
    """
    inputs, params = op.bind(args, kwargs)
    given = {n: (x.detach().double() if x.is_floating_point() else x) for n, x in inputs.items()}
    offsets = {k: v for k, v in kwargs.items() if k not in inputs and k not in params}  # a jagged batch's
    base = op.reference(**given, **params, **offsets)
    made = torch.zeros_like(base)
    gen = torch.Generator().manual_seed(1)
    eps = torch.finfo(torch.float32).eps

    def rounded(_name: str, values: torch.Tensor) -> torch.Tensor:
        sign = torch.randint(0, 2, values.shape, generator=gen).double().to(values.device) * 2 - 1
        return values * (1 + eps * sign)

    for moved in _scores_moved(op, given, draws):
        change = (op.reference(**moved, **params, **offsets, rounding=rounded) - base).abs()
        made = torch.maximum(made, torch.where(torch.isfinite(change), change, 0.0))  # float64 overflow: nothing
    return made


def _scores_moved(op, given: dict, draws: int):
    """``given`` with the inputs the scores contract (those with the rank ``e``) moved by eps(fp32) of their
    magnitude, once per seeded sign pattern."""
    scored = [t.name for t in op.cascade.inputs if "e" in t.ranks and given[t.name].is_floating_point()]
    gen = torch.Generator().manual_seed(0)
    eps = torch.finfo(torch.float32).eps
    for _ in range(draws):
        moved = dict(given)
        for n in scored:
            sign = (torch.randint(0, 2, given[n].shape, generator=gen).double() * 2 - 1).to(given[n].device)
            moved[n] = given[n] * (1 + eps * sign)
        yield moved


def gradient_allowances(op, grad_output: torch.Tensor, *args, dtype: torch.dtype, **kwargs) -> dict:
    """Per floating-point input, :func:`row_term_allowance` plus :func:`recompute_allowance` (None for others)."""
    moves = recompute_allowance(op, grad_output, *args, **kwargs)
    return {
        n: None if a is None else a + moves[n]
        for n, a in row_term_allowance(op, grad_output, *args, dtype=dtype, **kwargs).items()
    }


def gradient_magnitude(exact: dict[str, torch.Tensor | None]) -> float:
    """The largest finite entry of the exact gradients: a gradient may cancel to 0 where its terms do not (q's,
    when every weight is 1), so the floor scales with the largest gradient of the call, as the terms do.

    >>> gradient_magnitude({"q": torch.tensor([1.0, -3.0]), "k": torch.tensor([float("nan"), 2.0]), "i": None})
    3.0
    """
    finite = [g[torch.isfinite(g)] for g in exact.values() if g is not None]
    return max([float(g.abs().max()) for g in finite if g.numel()] + [0.0])


def judge_gradient(
    got: torch.Tensor,
    want: torch.Tensor,
    lowp: torch.Tensor,
    magnitude: float,
    allowance: Callable[[], torch.Tensor] | None = None,
    beyond_float64: bool = False,
) -> Verdict:
    """The tolerance rule for one gradient: its error beyond each entry's allowance (what the backward's row term
    and recomputed scores may move it: :func:`gradient_allowances`) at most twice PyTorch's error in the kernel's
    dtype (``lowp``, already stood in for overflow) plus the floor, which scales with ``magnitude`` (the call's
    largest gradient). ``allowance`` costs reference runs, so it is called only for a gradient outside the rule
    without it. ``beyond_float64``: the float64 forward output is not finite somewhere (the maths left even
    float64's range in this call), so a non-finite kernel entry is the dtype's answer anywhere in the gradient."""
    # where even the float64 maths has no number (exp(exp(s)) past 1e308, then inf − inf) there is nothing to
    # compare with, as for outputs; the rule holds at every other entry
    known = torch.isfinite(want)
    if not bool(known.all()):
        got, want, lowp = got[known], want[known], lowp[known]
        fixed = allowance
        allowance = None if fixed is None else (lambda: fixed()[known])
    if got.numel() == 0:
        return Verdict(0.0, tolerance_floor(got.dtype, magnitude), 0.0, True)
    # where even the float32 stand-in overflowed (exp(exp(s)) past 3e38), or float64's forward did (exp(exp(exp(s)))
    # past 1e308), the maths left the dtype's range for this call, and which entries plain PyTorch still gets finite
    # is its formula's accident (a row whose maximum is inf): the kernel's non-finite entries are the dtype's answer
    # anywhere in the gradient, finite ones measured
    left = beyond_float64 or bool((~torch.isfinite(lowp) & torch.isfinite(want)).any())
    diff = deviation(got, want, torch.full_like(lowp, float("nan")) if left else lowp)
    lowp_err = lowp_error(lowp, want)
    tol = 2 * lowp_err + tolerance_floor(got.dtype, magnitude)
    verdict = _beyond(got, want, diff, torch.zeros_like(diff), lowp_err, tol)
    return verdict if verdict.ok or allowance is None else _beyond(got, want, diff, allowance(), lowp_err, tol)


def _beyond(got, want, diff, allowance, lowp_err: float, tol: float) -> Verdict:
    # where what the allowance admits does not fit the gradient's dtype, its overflow is one of those values
    overflows = ~torch.isfinite(got) & (want.abs() + allowance > torch.finfo(got.dtype).max)
    diff = torch.where(overflows, 0.0, diff)
    bad, beyond = float(diff.max()), float((diff - allowance).max())
    return Verdict(bad, tol, lowp_err, beyond <= tol, float(allowance.max()))


def check_gradients(
    op, grads: dict[str, torch.Tensor | None], grad_output: torch.Tensor, *args, **kwargs
) -> dict[str, Verdict]:
    """Hold each floating-point gradient in ``grads`` (what the backward returned for the incoming gradient
    ``grad_output`` at these arguments) to the tolerance rule; one verdict per input. The same maths in
    torch is autograd through the reference run in the dtype of the op's first input (the kernel's).

    >>> import torch, einflash as ef
    >>> @ef.attention
    ... def plain(q, k, v):
    ...     return ef.softmax(q @ k * ef.scale, "n") @ v
    >>> q, k, v = torch.randn(3, 1, 1, 5, 16).unbind()
    >>> out = plain(q.requires_grad_(), k, v, backend="reference")
    >>> g = torch.randn_like(out)
    >>> (grad,) = torch.autograd.grad(out, q, g)
    >>> check_gradients(plain, {"q": grad}, g, q, k, v)["q"].ok
    True
    """
    exact = reference_gradients(op, grad_output, *args, **kwargs)
    with torch.no_grad():
        beyond = not bool(torch.isfinite(op.reference(*args, **kwargs)).all())
    # the kernel computes in the dtype of q, k and v (a gradient of an fp32 slope is made of fp16 products)
    inputs, _ = op.bind(args, kwargs)
    kernel = inputs[op.cascade.inputs[0].name].dtype
    lowps = reference_gradients(op, grad_output, *args, dtype=kernel, **kwargs)
    wides = functools.cache(lambda: reference_gradients(op, grad_output, *args, dtype=torch.float32, **kwargs))
    allowed = functools.cache(lambda: gradient_allowances(op, grad_output, *args, dtype=kernel, **kwargs))
    magnitude = gradient_magnitude(exact)
    verdicts = {}
    for name, got in grads.items():
        want = exact.get(name)
        if got is None or want is None:
            continue
        lowp = overflow_stand_in(lowps[name].double(), want, kernel, lambda name=name: wides()[name])
        verdicts[name] = judge_gradient(got, want, lowp, magnitude, lambda name=name: allowed()[name], beyond)
    return verdicts


def trainable(op, given: dict) -> dict:
    """``given`` with each input the backward differentiates a fresh leaf that requires grad: floating-point
    inputs but frozen ones (a table read at computed positions: ``op.backward.frozen``).

    >>> import torch, einflash as ef
    >>> @ef.attention
    ... def plain(q, k, v):
    ...     return ef.softmax(q @ k, "n") @ v
    >>> given = {"q": torch.ones(1, 1, 2, 4), "k": torch.ones(1, 1, 3, 4), "v": torch.ones(1, 1, 3, 4)}
    >>> sorted(n for n, x in trainable(plain, given).items() if x.requires_grad)
    ['k', 'q', 'v']
    """
    frozen = {n for n, _ in op.backward.frozen} if op.backward.error is None else set()
    return {
        k: (v.detach().clone().requires_grad_() if v.is_floating_point() and k not in frozen else v)
        for k, v in given.items()
    }


def random_inputs(op, shape, device="cpu", dtype: torch.dtype = torch.float32, seed: int = 0) -> dict:
    """Seeded inputs of ``op`` at ``shape`` (an ``einflash.Shape``): q ``[B, Hq, M, E]``, k ``[B, Hkv, N, E]``,
    v ``[B, Hkv, N, F]``, and whatever ``extra_inputs(shape, device=, dtype=)`` in the op's own file gives.

    Raises MissingInputError naming an input neither a shape nor ``extra_inputs`` can make.

    >>> import einflash as ef
    >>> @ef.attention
    ... def plain(q, k, v):
    ...     return ef.softmax(q @ k * ef.scale, "n") @ v
    >>> {k: tuple(v.shape) for k, v in random_inputs(plain, ef.Shape(1, 4, 8, 16, 32, Hkv=2)).items()}
    {'q': (1, 4, 8, 32), 'k': (1, 2, 16, 32), 'v': (1, 2, 16, 32)}
    """
    from .errors import MissingInputError
    from .ir.cascade import Layout

    torch.manual_seed(seed)  # extra_inputs draws from the global generator
    make = op.fn.__globals__.get("extra_inputs")
    extra = dict(make(shape, device=device, dtype=dtype)) if make is not None else {}
    g = torch.Generator(device=device).manual_seed(seed)
    rows = {Layout.QUERY: (shape.Hq, shape.M), Layout.KEY: (shape.Hkv, shape.N)}
    widths = {"e": shape.E, "f": shape.F}
    out = {}
    for t in op.cascade.inputs:
        if t.name in extra:
            out[t.name] = extra[t.name]
        elif t.layout in rows and t.ranks[-1] in widths:
            out[t.name] = torch.randn(
                shape.B, *rows[t.layout], widths[t.ranks[-1]], device=device, dtype=dtype, generator=g
            )
        else:
            raise MissingInputError(
                f"{op.name}: input {t.name!r} (ranks {', '.join(t.ranks)}) cannot be made from a "
                f"shape; define extra_inputs(shape, device, dtype) returning it in the file that "
                f"declares {op.name}"
            )
    return out
