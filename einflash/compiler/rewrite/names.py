"""Names and order of the tensors a rewrite adds: fresh names that collide with nothing, and declarations
in the order the Einsums assign them."""

from __future__ import annotations

from collections.abc import Set
from dataclasses import replace

from ...ir.cascade import Cascade, Einsum, Role, TensorDecl


def fresh_name(c: Cascade, base: str, taken: Set[str] = frozenset()) -> str:
    """``base``, or ``base2``, ``base3``... : a tensor name neither the cascade nor ``taken`` uses."""
    name, i = base, 2
    while c.has_tensor(name) or name in taken:
        name, i = f"{base}{i}", i + 1
    return name


def ordered_tensors(tensors: list[TensorDecl], einsums: list[Einsum]) -> list[TensorDecl]:
    """Inputs first, then tensors in the order Einsums first assign them; drop unused ones."""
    by = {t.name: t for t in tensors}
    out = [t for t in tensors if t.role is Role.INPUT]
    seen = {t.name for t in out}
    for e in einsums:
        if e.out not in seen:
            out.append(by[e.out])
            seen.add(e.out)
    return out


def drop_unused(c: Cascade) -> Cascade:
    """Remove Einsums (and their tensors) that nothing reads."""
    while True:
        used = {r.tensor for e in c.einsums for r in e.reads()} | set(c.outputs)
        dead = {e.out for e in c.einsums if e.out not in used}
        if not dead:
            return c
        c = replace(
            c,
            einsums=tuple(e for e in c.einsums if e.out not in dead),
            tensors=tuple(t for t in c.tensors if t.name not in dead),
        )
