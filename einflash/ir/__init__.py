"""The Einsum-cascade IR: ranks, operators, expressions, cascades, tracing, validation,
printing and the float64 reference executor (the oracle of every test)."""

from .cascade import Cascade, Einsum, Layout, ParamDecl, Reduction, Role, TensorDecl
from .expr import Call, Const, Coord, Expr, Merge, Param, Read, Size
from .frontend import trace
from .operators import OPERATORS, REDUCERS
from .printer import format_cascade
from .ranks import Rank, RankRole
from .validate import validate

__all__ = [
    "Cascade",
    "Einsum",
    "Layout",
    "ParamDecl",
    "Reduction",
    "Role",
    "TensorDecl",
    "Call",
    "Const",
    "Coord",
    "Expr",
    "Merge",
    "Param",
    "Read",
    "Size",
    "trace",
    "OPERATORS",
    "REDUCERS",
    "format_cascade",
    "Rank",
    "RankRole",
    "validate",
]
