"""einflash: declare an attention variant as a cascade of Einsums; analyse, rewrite, compile, tune.

>>> import einflash as ef
>>> @ef.attention
... def causal(q, k, v):
...     s = ef.mask(q @ k * ef.scale, ef.n <= ef.m)
...     return ef.softmax(s, "n") @ v
>>> causal.cascade.outputs
('o',)
"""

from . import knobs

knobs.use_interpreter()  # before anything imports triton: on a machine without a GPU, kernels run interpreted

from . import errors  # noqa: E402
from .aot import AOTOp, load_aot  # noqa: E402
from .compiler.tuning.selection import set_deploy_mode  # noqa: E402
from .ir.frontend import (  # noqa: E402
    E,
    F,
    Key,
    M,
    N,
    Query,
    Scalar,
    Tensor,
    abs,
    ceil_div,
    einsum,
    exp,
    exp2,
    log,
    m,
    mask,
    maximum,
    minimum,
    n,
    rank,
    reducer,
    relu,
    scale,
    sigmoid,
    sign,
    size,
    softmax,
    sqrt,
    tanh,
    where,
)
from .op import AttentionOp, attention  # noqa: E402
from .shape import Shape  # noqa: E402

__all__ = [
    "attention",
    "AttentionOp",
    "AOTOp",
    "load_aot",
    "Shape",
    "errors",
    "set_deploy_mode",
    "Query",
    "Key",
    "Tensor",
    "Scalar",
    "einsum",
    "mask",
    "softmax",
    "where",
    "exp",
    "exp2",
    "log",
    "sqrt",
    "tanh",
    "sigmoid",
    "relu",
    "abs",
    "sign",
    "maximum",
    "minimum",
    "rank",
    "reducer",
    "size",
    "ceil_div",
    "scale",
    "m",
    "n",
    "M",
    "N",
    "E",
    "F",
]
