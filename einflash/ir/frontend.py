"""Tracing a Python function into a Cascade.

The declared function receives symbolic tensors and builds the maths with
ordinary operators, einsum strings and a few functions (``exp``, ``mask``,
``softmax``...). Each operation makes a structural node; equal nodes are equal
values, so writing the same expression twice gives one value. When the function
returns, every reduction, every mask and every value used by more than one
consumer becomes an Einsum; the rest is inlined into its consumer. Names of
intermediates come from the function's local variables where there is one.

>>> import einflash as ef
>>> @ef.attention
... def plain(q, k, v):
...     return ef.softmax(q @ k * ef.scale, "n") @ v
>>> print(plain.cascade.einsums[-1].out)
o
"""

from __future__ import annotations

import contextvars
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import sympy

from ..errors import DeclarationError, RankMismatchError, UnknownRankError, UnsupportedOperatorError
from .cascade import Cascade, Einsum, Layout, ParamDecl, Reduction, Role, TensorDecl
from .expr import Call, Const, Coord, Expr, Param, Read, Size, index_ranks
from .operators import OPERATORS, REDUCERS, Reducer
from .ranks import PARALLEL, STANDARD_RANKS, Rank, coord, extent_symbol, new_rank, rank_order
from .validate import validate

# -- declarations of inputs --------------------------------------------------------------


@dataclass(frozen=True)
class InputSpec:
    """How an extra input is laid out: see :class:`Query`, :class:`Key`, :class:`Tensor`."""

    layout: Layout
    ranks: tuple[str, ...]

    def all_ranks(self) -> tuple[str, ...]:
        if self.layout is Layout.QUERY:
            return ("b", "h", "m") + self.ranks
        if self.layout is Layout.KEY:
            return ("b", "h", "n") + self.ranks
        return self.ranks


def _spec_ranks(text: str) -> tuple[str, ...]:
    names = tuple(text.replace(",", " ").split())
    for r in names:
        if not r.isidentifier():
            raise DeclarationError(f"rank names must be identifiers, got {r!r} in {text!r}")
    twice = sorted({r for r in names if names.count(r) > 1})
    if twice:
        raise DeclarationError(f"a tensor's ranks are distinct; {text!r} names {', '.join(twice)} twice")
    return names


class Query:
    """An input laid out like q, ``[B, Hq, M, d]``: ``u: ef.Query["r"]``."""

    def __class_getitem__(cls, dim: str) -> InputSpec:
        return InputSpec(Layout.QUERY, _spec_ranks(dim))


class Key:
    """An input laid out like k and v, ``[B, Hkv, N, d]``: ``w: ef.Key["r"]``."""

    def __class_getitem__(cls, dim: str) -> InputSpec:
        return InputSpec(Layout.KEY, _spec_ranks(dim))


class Tensor:
    """An input with its ranks in the given order: ``slope: ef.Tensor["h"]``, ``doc: ef.Tensor["b n"]``."""

    def __class_getitem__(cls, ranks: str) -> InputSpec:
        return InputSpec(Layout.DECLARED, _spec_ranks(ranks))


# A 0-d tensor input, for a learnable scalar (a softcap, a threshold): it gets a gradient, where a
# Python-number parameter (``cap: float = 30.0``) is a constant of the kernel.
Scalar = InputSpec(Layout.DECLARED, ())

_STANDARD_INPUTS = {
    "q": InputSpec(Layout.QUERY, ("e",)),
    "k": InputSpec(Layout.KEY, ("e",)),
    "v": InputSpec(Layout.KEY, ("f",)),
}

# -- trace-time state --------------------------------------------------------------------


@dataclass
class _TraceState:
    code: Any
    lines: dict = field(default_factory=dict)
    ranks: dict[str, Rank] = field(default_factory=dict)
    params: dict[str, ParamDecl] = field(default_factory=dict)
    source: str = ""

    def line(self) -> int | None:
        f: FrameType | None = sys._getframe(1)
        while f is not None and f.f_code is not self.code:
            f = f.f_back
        return f.f_lineno if f is not None else None


_STATE: contextvars.ContextVar[_TraceState | None] = contextvars.ContextVar("einflash_trace", default=None)


def _where() -> str:
    st = _STATE.get()
    if st is None:
        return "<declaration>"
    return f"{st.source}:{st.line()}"


# -- nodes -------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Node:
    """A structural value: equal nodes are the same value.

    Hashing and comparing a node never recurse through its arguments (a chain of a few hundred operations is
    as deep): the hash is made once from the arguments' hashes, and equality walks the two trees with a stack.
    """

    kind: str  # leaf | map | reduce | filter | reindex
    op: str | None  # a map's or a reduce's (read it as .operator)
    args: tuple[Node, ...]
    ranks: tuple[str, ...]
    leaf: Expr | None = None  # set on a leaf, and only there
    reduce_ranks: tuple[str, ...] = ()
    arg: float | None = None
    index: tuple[sympy.Expr, ...] = ()
    key: int = field(init=False, repr=False)

    def __post_init__(self):
        own = (self.kind, self.op, self.ranks, self.leaf, self.reduce_ranks, self.arg, self.index)
        object.__setattr__(self, "key", hash((own, tuple(a.key for a in self.args))))

    @property
    def operator(self) -> str:
        """The operator of a map or a reduce node (the other kinds have none)."""
        assert self.op is not None, f"a {self.kind} node has no operator"
        return self.op

    def _own(self) -> tuple:
        return self.kind, self.op, self.ranks, self.leaf, self.reduce_ranks, self.arg, self.index, len(self.args)

    def __hash__(self) -> int:
        return self.key

    def __eq__(self, other) -> bool:
        if not isinstance(other, Node):
            return NotImplemented
        todo = [(self, other)]
        while todo:
            a, b = todo.pop()
            if a is b:
                continue
            if a.key != b.key or a._own() != b._own():
                return False
            todo.extend(zip(a.args, b.args))
        return True


def _record(node: Node) -> Node:
    st = _STATE.get()
    if st is not None and node not in st.lines:
        st.lines[node] = st.line()
    return node


def _leaf(expr: Expr, ranks=()) -> Traced:
    return Traced(_record(Node("leaf", None, (), rank_order(ranks), leaf=expr)))


def _to_node(x) -> Node:
    if isinstance(x, Traced):
        return x.node
    if isinstance(x, bool):
        return Node("leaf", None, (), (), leaf=Const(float(x)))
    if isinstance(x, (int, float)):
        return Node("leaf", None, (), (), leaf=Const(float(x)))
    raise DeclarationError(
        f"cannot use a {type(x).__name__} in an attention declaration (expected a traced tensor, int or float)",
        _where(),
    )


def _map(op: str, *args) -> Traced:
    nodes = tuple(_to_node(a) for a in args)
    ranks = rank_order(r for n in nodes for r in n.ranks)
    return Traced(_record(Node("map", op, nodes, ranks)))


def _divide(op: str, a, b) -> Traced:
    """``a // b`` or ``a % b``; a divisor written as 0 is refused here, where the line is known."""
    if isinstance(b, (int, float)) and not isinstance(b, bool) and b == 0:
        raise DeclarationError(f"{'//' if op == 'floordiv' else '%'} by 0", _where())
    return _map(op, a, b)


def _check_ranks(what: str, ranks: tuple[str, ...], node: Node) -> None:
    for r in ranks:
        if r not in node.ranks:
            raise UnknownRankError(
                f"{what} over rank {r!r}, but the operand has ranks ({', '.join(node.ranks)})", _where()
            )


class Traced:
    """A symbolic tensor inside an ``@einflash.attention`` function."""

    __slots__ = ("node",)

    def __init__(self, node: Node):
        self.node = node

    @property
    def ranks(self) -> tuple[str, ...]:
        return self.node.ranks

    def __repr__(self) -> str:
        return f"Traced[{', '.join(self.ranks)}]"

    # arithmetic
    def __add__(self, o):
        return _map("add", self, o)

    def __radd__(self, o):
        return _map("add", o, self)

    def __sub__(self, o):
        return _map("sub", self, o)

    def __rsub__(self, o):
        return _map("sub", o, self)

    def __mul__(self, o):
        return _map("mul", self, o)

    def __rmul__(self, o):
        return _map("mul", o, self)

    def __truediv__(self, o):
        return _map("div", self, o)

    def __rtruediv__(self, o):
        return _map("div", o, self)

    def __floordiv__(self, o):
        return _divide("floordiv", self, o)

    def __rfloordiv__(self, o):
        return _divide("floordiv", o, self)

    def __mod__(self, o):
        return _divide("mod", self, o)

    def __rmod__(self, o):
        return _divide("mod", o, self)

    def __neg__(self):
        return _map("neg", self)

    # comparisons and logic
    def __lt__(self, o):
        return _map("lt", self, o)

    def __le__(self, o):
        return _map("le", self, o)

    def __gt__(self, o):
        return _map("gt", self, o)

    def __ge__(self, o):
        return _map("ge", self, o)

    def __eq__(self, o):
        return _map("eq", self, o)

    def __ne__(self, o):
        return _map("ne", self, o)

    def __and__(self, o):
        return _map("and", self, o)

    def __rand__(self, o):
        return _map("and", o, self)

    def __or__(self, o):
        return _map("or", self, o)

    def __ror__(self, o):
        return _map("or", o, self)

    def __invert__(self):
        return _map("not", self)

    __hash__ = object.__hash__

    def __bool__(self):
        raise DeclarationError(
            "a traced value has no truth value at declaration time: Python `if`, "
            "`and`, `or` and `not` cannot branch on tensor data; use ef.where(cond, a, b) "
            "or ef.mask(x, cond), and `&`, `|`, `~` for predicates",
            _where(),
        )

    def __float__(self):
        raise DeclarationError(
            "a traced value is not a number at declaration time; keep it symbolic "
            "(use ef.exp, ef.log, ... instead of math.*)",
            _where(),
        )

    __index__ = __int__ = __float__

    # reductions
    def reduce(self, op: str | Reducer, ranks: str, arg: float | None = None) -> Traced:
        """Reduce over ``ranks`` (space separated) with a reducer: sum, max, min, kth_largest, or one made by
        :func:`reducer`."""
        op = op.name if isinstance(op, Reducer) else op
        if op not in REDUCERS or REDUCERS[op].lists:  # a top list is made by the rewrites, from kth_largest
            declared = sorted(r for r, red in REDUCERS.items() if not red.lists)
            raise UnsupportedOperatorError(f"unknown reducer {op!r}; expected one of {declared}", _where())
        if not isinstance(ranks, str):
            raise DeclarationError(f'reduce over rank names, a string such as "n"; got {ranks!r}', _where())
        rs = _spec_ranks(ranks)
        _check_ranks(op, rs, self.node)
        out = tuple(r for r in self.ranks if r not in rs)
        return Traced(_record(Node("reduce", op, (self.node,), out, reduce_ranks=rank_order(rs), arg=arg)))

    def sum(self, ranks: str) -> Traced:
        return self.reduce("sum", ranks)

    def max(self, ranks: str) -> Traced:
        return self.reduce("max", ranks)

    def min(self, ranks: str) -> Traced:
        return self.reduce("min", ranks)

    def kth_largest(self, k: int, ranks: str) -> Traced:
        """The k-th largest value over ``ranks`` (top-k routing thresholds); −inf where fewer than k values are
        present."""
        if not isinstance(k, int) or k < 1:
            raise DeclarationError(f"kth_largest needs a positive int k, got {k!r}", _where())
        return self.reduce("kth_largest", ranks, float(k))

    def __matmul__(self, other: Traced) -> Traced:
        """Contract over every rank both operands have (batch and head excepted)."""
        o = _to_node(other)
        shared = [r for r in self.ranks if r in o.ranks and r not in PARALLEL]
        if not shared:
            raise RankMismatchError(
                f"`@` contracts the ranks both operands share, but ({', '.join(self.ranks)})"
                f" and ({', '.join(o.ranks)}) share none; use ef.einsum",
                _where(),
            )
        return (self * Traced(o)).sum(" ".join(shared))

    def __getitem__(self, index) -> Traced:
        """Read this tensor at other coordinates: ``doc[ef.m]``, ``s[ef.m - i, ef.n - j]``."""
        index = index if isinstance(index, tuple) else (index,)
        node = self.node
        leaf = node.leaf
        # an input's coordinates bind in its declaration's order (tab: ef.Tensor["h x r"], tab[x, r]); a computed
        # value's, in the order of its ranks
        order = self.ranks
        if isinstance(leaf, Read) and all(i.is_Symbol for i in leaf.index):
            order = tuple(str(i) for i in leaf.index)
        own = [r for r in order if r not in PARALLEL]
        if len(index) != len(own):
            raise RankMismatchError(
                f"indexing a tensor with ranks ({', '.join(own)}) needs {len(own)} coordinates, got {len(index)}",
                _where(),
            )
        subs = {coord(r): _index_expr(i) for r, i in zip(own, index)}
        new = tuple(sympy.sympify(coord(r)).subs(subs, simultaneous=True) for r in self.ranks)
        ranks = rank_order(index_ranks(new))
        if node.kind == "leaf" and isinstance(node.leaf, Read):
            sub = {coord(r): v for r, v in zip(self.ranks, new)}
            idx = tuple(sympy.sympify(i).subs(sub, simultaneous=True) for i in node.leaf.index)
            return _leaf(Read(node.leaf.tensor, idx), ranks)
        return Traced(_record(Node("reindex", None, (node,), ranks, index=new)))


def _index_expr(x) -> sympy.Expr:
    """A traced index (coordinates, ints, int parameters, + − · //) as a sympy expression."""
    if isinstance(x, int):
        return sympy.Integer(x)
    node = _to_node(x)
    if node.kind == "leaf":
        leaf = node.leaf
        if isinstance(leaf, Coord):
            return coord(leaf.rank)
        if isinstance(leaf, Const) and leaf.value == int(leaf.value):
            return sympy.Integer(int(leaf.value))
        if isinstance(leaf, Param):
            return extent_symbol(leaf.name)
        if isinstance(leaf, Size):
            st = _STATE.get()
            return ((st.ranks.get(leaf.rank) if st else None) or new_rank(leaf.rank)).extent
        if isinstance(leaf, Read):  # an integer input's entry: a gather (table[bucket[n − m + c]])
            return sympy.Function(leaf.tensor)(*leaf.index)
    if node.kind == "map" and node.op in ("add", "sub", "mul", "floordiv", "mod"):
        a, b = (_index_expr(Traced(n)) for n in node.args)
        return {"add": a + b, "sub": a - b, "mul": a * b, "floordiv": sympy.floor(a / b), "mod": sympy.Mod(a, b)}[
            node.op
        ]
    raise DeclarationError(
        "an index must be built from rank coordinates, ints, int parameters and entries of integer inputs with "
        "+, -, *, // and %",
        _where(),
    )


# -- the public vocabulary -----------------------------------------------------------------


def _unary(op: str):
    def f(x):
        return _map(op, x)

    f.__name__ = op
    f.__doc__ = f"Elementwise {op}."
    return f


exp, exp2, log, sqrt, tanh, sigmoid, relu, abs, sign = (
    _unary(o) for o in ("exp", "exp2", "log", "sqrt", "tanh", "sigmoid", "relu", "abs", "sign")
)


def maximum(a, b) -> Traced:
    return _map("maximum", a, b)


def minimum(a, b) -> Traced:
    return _map("minimum", a, b)


def where(cond, a, b) -> Traced:
    """Select ``a`` where ``cond`` holds, else ``b`` (both are computed)."""
    return _map("where", cond, a, b)


def mask(x, keep) -> Traced:
    """Keep ``x`` where the predicate ``keep`` holds; elsewhere it is absent (masked out).

    Reductions skip absent elements, so a fully masked row gives an empty sum and
    the output there is 0.
    """
    x, p = _to_node(x), _to_node(keep)
    if not (p.kind == "map" and (op := OPERATORS.get(p.operator)) is not None and op.boolean):
        raise DeclarationError(
            "ef.mask needs a predicate (a comparison such as ef.n <= ef.m, or & | ~ of comparisons)", _where()
        )
    ranks = rank_order(x.ranks + p.ranks)
    return Traced(_record(Node("filter", None, (x, p), ranks)))


def reducer(name: str, combine: Callable, identity: float, derivative: Callable | None = None) -> Reducer:
    """A reducer of your own: ``combine(a, b)`` folds two values, ``identity`` leaves any value as it is.

    ``combine`` is written with einflash's operators; it must be commutative and associative (checked on
    sample values), so that reductions fold in chunks and can run online. Use it with ``x.reduce(r, "n")``.
    ``derivative(x, r)``, the reduction's derivative with respect to one element ``x`` given the result ``r``,
    makes cascades that use it differentiable (checked against the combine on sample values).

    >>> import einflash as ef
    >>> logaddexp = ef.reducer("logaddexp", lambda a, b: ef.maximum(a, b) + ef.log(1 + ef.exp(-ef.abs(a - b))),
    ...                        identity=float("-inf"), derivative=lambda x, r: ef.exp(x - r))
    >>> logaddexp.identity
    -inf
    """
    from .user_ops import define_reducer

    a, b = _leaf(Param("a")), _leaf(Param("b"))

    def to_expr(node: Node, what: str) -> Expr:
        if node.leaf is not None:
            return node.leaf
        if node.kind == "map":
            return Call(node.operator, tuple(to_expr(x, what) for x in node.args))
        raise DeclarationError(
            f"reducer {name!r}: {what} must be elementwise in its two operands, but it uses a {node.kind}"
        )

    return define_reducer(
        name,
        to_expr(_to_node(combine(a, b)), "combine"),
        float(identity),
        None if derivative is None else to_expr(_to_node(derivative(a, b)), "derivative"),
    )


def softmax(x: Traced, rank: str) -> Traced:
    """Softmax over ``rank``, expanded into its max, exp, sum and divide Einsums."""
    if not isinstance(x, Traced):
        raise DeclarationError(f"softmax of a traced tensor, got {type(x).__name__}", _where())
    top = x.max(rank)
    num = exp(x - top)
    return num / num.sum(rank)


def einsum(spec: str, *operands: Traced) -> Traced:
    """A contraction in Einstein notation with named ranks: ``einsum("m e, n e -> m n", q, k)``.

    Batch and head ranks are implicit and never written.
    """
    if "->" not in spec:
        raise DeclarationError(f"an einsum spec needs '->', got {spec!r}", _where())
    lhs, rhs = spec.split("->")
    terms = [_spec_ranks(t) for t in lhs.split(",")]
    if len(terms) != len(operands):
        raise RankMismatchError(f"einsum {spec!r} names {len(terms)} operands, got {len(operands)}", _where())
    nodes = [_to_node(o) for o in operands]
    for i, (t, node) in enumerate(zip(terms, nodes)):
        own = tuple(r for r in node.ranks if r not in PARALLEL)
        if set(t) != set(own) or len(t) != len(own):
            raise RankMismatchError(
                f"einsum {spec!r}: operand {i + 1} has ranks ({', '.join(own)}), the spec says ({', '.join(t)})",
                _where(),
            )
    out = _spec_ranks(rhs)
    seen = {r for t in terms for r in t}
    for r in out:
        if r not in seen:
            raise UnknownRankError(f"einsum {spec!r}: output rank {r!r} is in no operand", _where())
    prod = Traced(nodes[0])
    for n in nodes[1:]:
        prod = prod * Traced(n)
    reduced = [r for r in rank_order(seen) if r not in out]
    return prod.sum(" ".join(reduced)) if reduced else prod


def rank(name: str, extent=None) -> Traced:
    """The coordinate of rank ``name`` as data; declares the rank when ``extent`` is given.

    ``c = ef.rank("c", ef.ceil_div(ef.N, block))`` declares key blocks.
    """
    st = _STATE.get()
    if st is None:
        raise DeclarationError("ef.rank is only available inside an @einflash.attention function")
    if extent is not None:
        st.ranks[name] = Rank(name, _index_expr(extent) if not isinstance(extent, sympy.Expr) else extent)
    elif name not in st.ranks:
        raise UnknownRankError(f"rank {name!r} is not declared: no input has it; give its extent", _where())
    return _leaf(Coord(name), (name,))


def ceil_div(a, b) -> sympy.Expr:
    """``ceil(a / b)`` of extents and int parameters, for rank extents."""
    return sympy.ceiling(_index_expr(a) / _index_expr(b))


def size(name: str) -> Traced:
    """The extent of a rank as data."""
    return _leaf(Size(name))


m, n = _leaf(Coord("m"), ("m",)), _leaf(Coord("n"), ("n",))
M, N, E, F = (_leaf(Size(r)) for r in ("m", "n", "e", "f"))
scale = _leaf(Param("scale"))

# -- tracing ---------------------------------------------------------------------------------


def _signature_inputs(fn: Callable, st: _TraceState) -> tuple[list[TensorDecl], dict[str, Traced]]:
    decls, args = [], {}
    where = f"{st.source}:{fn.__code__.co_firstlineno}"  # the signature's line (its first decorator's)
    try:  # annotations written under `from __future__ import annotations` are strings until evaluated
        signature = inspect.signature(fn, eval_str=True)
    except Exception as err:  # noqa: BLE001 -- any error of the user's annotation, named
        raise DeclarationError(f"an annotation of {fn.__name__} does not evaluate: {err}", where) from None
    for p in signature.parameters.values():
        ann = p.annotation
        if isinstance(ann, InputSpec) or (ann is inspect.Parameter.empty and p.default is inspect.Parameter.empty):
            spec = ann if isinstance(ann, InputSpec) else _STANDARD_INPUTS.get(p.name)
            if spec is None:
                raise DeclarationError(
                    f'parameter {p.name!r} needs a declaration: ef.Query["d"], ef.Key["d"], '
                    f'ef.Tensor["ranks"], or a number default for a scalar parameter',
                    where,
                )
            ranks = spec.all_ranks()
            for r in ranks:
                st.ranks.setdefault(r, new_rank(r))
            decls.append(TensorDecl(p.name, ranks, Role.INPUT, spec.layout))
            args[p.name] = _leaf(Read(p.name, tuple(coord(r) for r in ranks)), ranks)
        else:
            default = p.default if p.default is not inspect.Parameter.empty else None
            if default is not None and not isinstance(default, (int, float)):
                raise DeclarationError(
                    f"parameter {p.name!r}: a scalar parameter's default must be a number, got {default!r}", where
                )
            # a bool parameter is an int that is 0 or 1 (as Python's bool is)
            integer = ann in (int, bool) or isinstance(default, int)
            boolean = ann is bool or isinstance(default, bool)
            st.params[p.name] = ParamDecl(
                p.name,
                None if default is None else sympy.sympify(int(default) if boolean else default),
                integer,
                boolean=boolean,
            )
            args[p.name] = _leaf(Param(p.name))
    return decls, args


def trace(fn: Callable, name: str | None = None) -> Cascade:
    """Trace ``fn`` into a validated Cascade (see the module docstring)."""
    src = inspect.getsourcefile(fn) or "<unknown>"
    st = _TraceState(fn.__code__, source=f"{src}")
    token = _STATE.set(st)
    try:
        inputs, args = _signature_inputs(fn, st)
        local_names: dict[str, Any] = {}

        def profiler(frame, event, _arg):
            if event == "return" and frame.f_code is fn.__code__:
                local_names.update(frame.f_locals)

        old = sys.getprofile()
        sys.setprofile(profiler)
        try:
            result = fn(**args)
        finally:
            sys.setprofile(old)
        if not isinstance(result, Traced):
            raise DeclarationError(
                f"the function must return the attention output, a traced tensor; it returned {type(result).__name__}",
                st.source,
            )
        own = [r for r in result.ranks if r not in PARALLEL]
        if len(own) != 2 or own[0] != "m" or "n" in own:
            hint = "; did you forget `@ v`?" if "n" in own else ""
            raise RankMismatchError(
                f"the function must return the attention output [B, H, M, F], over rank m and one value rank "
                f"(f, or e); it returns ranks ({', '.join(own)}){hint}",
                f"{st.source}:{st.lines.get(result.node) or fn.__code__.co_firstlineno}",
            )
        names = {v.node: k for k, v in local_names.items() if isinstance(v, Traced) and k not in args}
        cascade = _build(name or fn.__name__, st, inputs, result.node, names)
        extents = {str(r.extent): r.name for r in cascade.ranks}
        for param in cascade.params:
            if param.name in extents:
                raise DeclarationError(
                    f"parameter {param.name!r} has the name of the extent of rank {extents[param.name]!r}, which "
                    f"an index may mean too; give the parameter another name",
                    f"{st.source}:{fn.__code__.co_firstlineno}",
                )
    finally:
        _STATE.reset(token)
    validate(cascade)
    return cascade


MAX_INLINED_DEPTH = 32  # of an expression the frontend writes into one Einsum


def _build(name: str, st: _TraceState, inputs: list[TensorDecl], out: Node, names: dict[Node, str]) -> Cascade:
    order: list[Node] = []  # arguments before the nodes that read them
    parents: dict[Node, set[Node]] = {}
    seen: set[Node] = set()
    stack: list[tuple[Node, bool]] = [(out, False)]
    while stack:  # a depth-first walk with a stack: a traced chain may be deeper than Python's recursion limit
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
            continue
        if node in seen:
            continue
        seen.add(node)
        stack.append((node, True))
        for a in reversed(node.args):
            parents.setdefault(a, set()).add(node)
            if a not in seen:
                stack.append((a, False))

    def materialised(node: Node) -> bool:
        if node is out or node.kind in ("reduce", "filter") or node in deep:
            return True
        # a shared predicate stays inline: an Einsum's filter must be a predicate expression, not a read
        if (
            node.kind == "map"
            and node.ranks
            and len(parents.get(node, ())) > 1
            and not OPERATORS[node.operator].boolean
        ):
            return True
        return any(p.kind == "reindex" for p in parents.get(node, ()))

    # a map inlined into its reader deeper than MAX_INLINED_DEPTH becomes an Einsum of its own, so that no
    # expression of the cascade nests deeper than that (its analyses and code generation recurse through it)
    deep: set[Node] = set()
    depth: dict[Node, int] = {}
    for node in order:
        d = 1 + max((0 if materialised(a) else depth[a] for a in node.args), default=0)
        if d > MAX_INLINED_DEPTH and node.kind == "map" and not OPERATORS[node.operator].boolean:
            deep.add(node)
            d = 0
        depth[node] = d

    used = {t.name for t in inputs} | set(st.params)
    tensor_name: dict[Node, str] = {}

    def fresh(node: Node) -> str:
        if node is out:
            return "o"
        base = names.get(node) or _default_name(node)
        cand, i = base, 2
        while cand in used or cand == "o":
            cand, i = f"{base}{i}", i + 1
        used.add(cand)
        return cand

    def to_expr(node: Node, top: bool = False) -> Expr:
        if not top and node in tensor_name:
            return Read(tensor_name[node], tuple(coord(r) for r in node.ranks))
        if node.leaf is not None:
            return node.leaf
        if node.kind == "map":
            return Call(node.operator, tuple(to_expr(a) for a in node.args))
        if node.kind == "reindex":
            base = node.args[0]
            return Read(tensor_name[base], node.index)
        raise AssertionError(node.kind)  # reduce/filter nodes are always materialised

    tensors, einsums = list(inputs), []
    for node in order:
        if not materialised(node):
            continue
        name_ = fresh(node)
        line = st.lines.get(node)
        if node.kind == "reduce":
            body = node.args[0]
            e = Einsum(
                name_, node.ranks, to_expr(body), Reduction(node.operator, node.reduce_ranks, node.arg), line=line
            )
        elif node.kind == "filter":
            e = Einsum(name_, node.ranks, to_expr(node.args[0]), where=to_expr(node.args[1]), line=line)
        else:
            e = Einsum(name_, node.ranks, to_expr(node, top=True), line=line)
        tensor_name[node] = name_
        tensors.append(TensorDecl(name_, node.ranks, Role.OUTPUT if node is out else Role.INTERMEDIATE))
        einsums.append(e)
    used_ranks = {r for t in tensors for r in t.ranks} | {r for e in einsums for r in e.iteration_ranks}
    ranks = tuple(st.ranks.get(r) or new_rank(r) for r in rank_order(used_ranks))
    params = tuple(st.params.values())
    if any(isinstance(x, Param) and x.name == "scale" for e in einsums for x in e.nodes()) and "scale" not in st.params:
        params += (ParamDecl("scale", STANDARD_RANKS["e"].extent ** sympy.Rational(-1, 2), positive=True),)
    return Cascade(name, ranks, tuple(tensors), params, tuple(einsums), ("o",), source=st.source)


def _default_name(node: Node) -> str:
    """A readable name for an intermediate the user did not name: dot_e, max_n, exp, masked..."""
    if node.kind == "reduce":
        body = node.args[0]
        kind = "dot" if node.op == "sum" and body.kind == "map" and body.op == "mul" else node.op
        return f"{kind}_{''.join(node.reduce_ranks)}"
    return "masked" if node.kind == "filter" else node.op or "t"
