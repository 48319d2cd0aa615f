"""einflash: declare an attention variant as a cascade of Einsums; analyse, rewrite, compile, tune.

>>> import einflash as ef
>>> @ef.attention
... def causal(q, k, v):
...     s = ef.mask(q @ k * ef.scale, ef.n <= ef.m)
...     return ef.softmax(s, "n") @ v
>>> causal.cascade.outputs
('o',)
"""

from . import errors
from .ir.frontend import (E, F, Key, M, N, Query, Tensor, abs, ceil_div, einsum, exp, exp2, log, m, mask, maximum,
                          minimum, n, rank, relu, scale, sigmoid, sign, size, softmax, sqrt, tanh, where)
from .op import AttentionOp, attention
from .shape import Shape

__all__ = ["attention", "AttentionOp", "Shape", "errors", "Query", "Key", "Tensor", "einsum", "mask", "softmax", "where",
           "exp", "exp2", "log", "sqrt", "tanh", "sigmoid", "relu", "abs", "sign", "maximum", "minimum", "rank",
           "size", "ceil_div", "scale", "m", "n", "M", "N", "E", "F"]
