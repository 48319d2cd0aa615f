"""AttentionOp: what ``@einflash.attention`` returns; checks call arguments and dispatches."""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping

import torch

from .errors import DeviceError, DTypeError, MissingInputError, ShapeError
from .ir import Cascade, Layout, trace
from .ir.reference import run_reference

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class AttentionOp:
    """An attention variant declared as a cascade of Einsums.

    ``op(q, k, v, **inputs)`` takes q ``[B, Hq, M, E]``, k ``[B, Hkv, N, E]``, v
    ``[B, Hkv, N, F]`` (``Hq`` a multiple of ``Hkv``), the declared extra inputs
    and scalar parameters as keywords, and an optional ``scale``; it returns
    ``[B, Hq, M, F]`` in q's dtype.

    >>> import torch, einflash as ef
    >>> @ef.attention
    ... def plain(q, k, v):
    ...     return ef.softmax(q @ k * ef.scale, "n") @ v
    >>> q = torch.randn(1, 2, 5, 8)
    >>> plain.reference(q, q, q).shape
    torch.Size([1, 2, 5, 8])
    """

    def __init__(self, fn: Callable, name: str | None = None):
        self.fn = fn
        self.name = name or fn.__name__
        self.cascade: Cascade = trace(fn, self.name)
        self.__doc__ = fn.__doc__
        self.__wrapped__ = fn

    def __repr__(self) -> str:
        return f"<einflash.AttentionOp {self.name} {self.cascade.key}>"

    # -- arguments ---------------------------------------------------------------------

    def bind(self, args: tuple, kwargs: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Split call arguments into checked input tensors and scalar parameters."""
        names = [t.name for t in self.cascade.inputs]
        if len(args) > len(names):
            raise MissingInputError(f"{self.name} takes {len(names)} tensor inputs ({', '.join(names)}), "
                                    f"got {len(args)} positional arguments")
        inputs = dict(zip(names, args))
        params: dict[str, float] = {}
        declared = {p.name for p in self.cascade.params}
        for key, val in kwargs.items():
            if key in names:
                if key in inputs:
                    raise MissingInputError(f"{self.name}: input {key!r} given twice")
                inputs[key] = val
            elif key in declared:
                if val is not None:
                    params[key] = val
            elif key == "scale":
                if val is not None:
                    raise MissingInputError(f"{self.name} does not use ef.scale, so `scale` cannot be given")
            else:
                raise MissingInputError(f"{self.name} got an unexpected argument {key!r}; it takes inputs "
                                        f"{names} and parameters {sorted(declared)}")
        missing = [n for n in names if n not in inputs]
        if missing:
            raise MissingInputError(f"{self.name} is missing input(s) {missing}")
        self._check_tensors(inputs)
        return inputs, params

    def _check_tensors(self, inputs: dict[str, Any]) -> None:
        device, qkv_dtype = None, None
        for t in self.cascade.inputs:
            x = inputs[t.name]
            if not isinstance(x, torch.Tensor):
                raise DTypeError(f"{t.name} must be a torch.Tensor, got {type(x).__name__}")
            if device is None:
                device = x.device
            elif x.device != device:
                raise DeviceError(f"{t.name} is on {x.device}, but {self.cascade.inputs[0].name} is on {device}; "
                                  f"move all inputs to one device")
            if t.layout in (Layout.QUERY, Layout.KEY):
                if x.dtype not in FLOAT_DTYPES:
                    raise DTypeError(f"{t.name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
                if qkv_dtype is None:
                    qkv_dtype = x.dtype
                elif x.dtype != qkv_dtype:
                    raise DTypeError(f"{t.name} is {x.dtype} but {self.cascade.inputs[0].name} is {qkv_dtype}; "
                                     f"q, k and v must share a dtype")
                if x.dim() != 4:
                    raise ShapeError(f"{t.name} must be 4-D {'[B, Hq, M, d]' if t.layout is Layout.QUERY else '[B, Hkv, N, d]'}"
                                     f", got shape {tuple(x.shape)}")
            elif x.dtype.is_complex:
                raise DTypeError(f"{t.name} must be a real tensor, got {x.dtype}")

    # -- running -------------------------------------------------------------------------

    def reference(self, *args, **kwargs) -> torch.Tensor:
        """The float64 reference executor on these inputs (the oracle); returns float64."""
        inputs, params = self.bind(args, kwargs)
        return run_reference(self.cascade, inputs, params)

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        """Run the op. Kernels are not generated yet: this runs the reference executor in float64
        and casts the result to q's dtype."""
        inputs, params = self.bind(args, kwargs)
        out = run_reference(self.cascade, inputs, params)
        return out.to(inputs[self.cascade.inputs[0].name].dtype)


def attention(fn: Callable | None = None, *, name: str | None = None):
    """Declare an attention variant; see :class:`AttentionOp`.

    Use as ``@einflash.attention`` or ``@einflash.attention(name="...")``.
    """
    if fn is None:
        return lambda f: AttentionOp(f, name)
    if not callable(fn) or not inspect.isfunction(fn):
        raise TypeError(f"@einflash.attention decorates a function, got {type(fn).__name__}")
    return AttentionOp(fn, name)
