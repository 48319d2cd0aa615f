"""einflash: declare an attention variant as a cascade of Einsums; analyse, rewrite, compile, tune."""

from .ir.frontend import (E, F, Key, M, N, Query, Tensor, abs, ceil_div, einsum, exp, exp2, log, m, mask,
                          maximum, minimum, n, rank, relu, scale, sigmoid, sign, size, softmax, sqrt, tanh, where)
from .ir.frontend import trace as _trace


def attention(fn):
    """Declare an attention variant (temporary: returns the traced cascade holder)."""
    class _Op:
        cascade = _trace(fn)
    return _Op
