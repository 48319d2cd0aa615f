"""A kernel's parameters, as data: read from the rendered kernel itself, and bound by name.

A template owns its signature: the parameters a generated kernel takes are the ones its
rendered ``def`` lists, in that order, and nothing else says what they are. Lowering declares
the generated part (tensor pointers with their strides, scalar parameters) through the naming
helpers below, and a launch gives every argument by name; ``Signature.bind`` orders them as the
kernel does and refuses a launch that leaves one out or names one the kernel lacks.

>>> text = '''
... @triton.jit
... def k(q_ptr, stride_q_0, M, BLOCK_M: tl.constexpr):
...     pass
... '''
>>> sig = Signature.of(text, "k")
>>> sig.runtime, sig.constexpr
(('q_ptr', 'stride_q_0', 'M'), ('BLOCK_M',))
>>> sig.bind({"BLOCK_M": 64, "M": 9, "stride_q_0": 1, "q_ptr": "a tensor"})
{'q_ptr': 'a tensor', 'stride_q_0': 1, 'M': 9, 'BLOCK_M': 64}
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ...errors import LoweringError


@dataclass(frozen=True)
class Signature:
    """The parameters of kernel ``kernel``: ``runtime`` ones given at launch, then ``constexpr`` ones
    (``tl.constexpr``, compile-time), each in the order the kernel declares them."""

    kernel: str
    runtime: tuple[str, ...]
    constexpr: tuple[str, ...]

    @classmethod
    def of(cls, text: str, kernel: str) -> Signature:
        """The signature of the function ``kernel`` defined at the top level of a module's ``text``."""
        fn = next((n for n in ast.parse(text).body if isinstance(n, ast.FunctionDef) and n.name == kernel), None)
        if fn is None:
            raise LoweringError(f"internal: the rendered source defines no kernel {kernel!r}")
        runtime: list[str] = []
        constexpr: list[str] = []
        for a in fn.args.args:
            compile_time = a.annotation is not None and ast.unparse(a.annotation) == "tl.constexpr"
            (constexpr if compile_time else runtime).append(a.arg)
        return cls(kernel, tuple(runtime), tuple(constexpr))

    @property
    def names(self) -> tuple[str, ...]:
        """Every parameter, in the kernel's order."""
        return self.runtime + self.constexpr

    def bind(self, values: Mapping[str, object]) -> dict[str, object]:
        """``values`` in the kernel's order; every parameter must be given, and nothing else."""
        missing = [n for n in self.names if n not in values]
        extra = [n for n in values if n not in self.constexpr and n not in self.runtime]
        if missing or extra:
            raise LoweringError(
                f"internal: the launch of {self.kernel} does not match its signature"
                + (f"; missing {missing}" if missing else "")
                + (f"; unknown {extra}" if extra else "")
            )
        return {n: values[n] for n in self.names}


def pointer_params(name: str, ndim: int) -> list[str]:
    """The parameters a tensor ``name`` of ``ndim`` dimensions takes: its pointer, then one stride per dimension.

    >>> pointer_params("q", 2)
    ['q_ptr', 'stride_q_0', 'stride_q_1']
    """
    return [f"{name}_ptr", *(f"stride_{name}_{d}" for d in range(ndim))]


def pointer(name: str, tensor: torch.Tensor) -> dict[str, object]:
    """The arguments of ``pointer_params`` for ``tensor``, by name.

    >>> pointer("q", torch.empty(2, 3))["stride_q_0"]
    3
    """
    return dict(zip(pointer_params(name, tensor.dim()), [tensor, *tensor.stride()]))


def param_name(name: str) -> str:
    """The kernel parameter of a scalar parameter of the cascade."""
    return f"p_{name}"


@dataclass(frozen=True)
class KernelCall:
    """One launch of a generated kernel: the grid, every kernel parameter by name in the kernel's order
    (runtime values and compile-time constants alike), and Triton's compile options (``max_registers``:
    Triton's ``maxnreg``, 0 for none)."""

    grid: tuple[int, int, int]
    args: dict[str, object]
    num_warps: int
    num_stages: int
    max_registers: int = 0

    @property
    def options(self) -> dict[str, int]:
        """The compile options as Triton's launch takes them."""
        extra = {"maxnreg": self.max_registers} if self.max_registers else {}
        return {"num_warps": self.num_warps, "num_stages": self.num_stages, **extra}
