"""The IR layer on its own: structural hash and canonical form, the printer, the dependency
graph, frozen values, and validation errors that name the user's line."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re

import networkx as nx
import pytest
import sympy
from catalogue import EXAMPLES, load_example

import einflash as ef
from einflash.compiler.analysis.key_passes import count_passes
from einflash.compiler.rewrite.pipeline import optimise
from einflash.errors import (
    CascadeError,
    CycleError,
    DeclarationError,
    RankMismatchError,
    UnknownRankError,
    UnknownTensorError,
    UnsupportedOperatorError,
)
from einflash.ir import Call, Cascade, Const, Einsum, Layout, Read, Reduction, Role, TensorDecl, validate
from einflash.ir.cascade import plain_read
from einflash.ir.expr import Coord, Merge, Param, Size, call
from einflash.ir.printer import format_einsum, format_expr
from einflash.ir.ranks import STANDARD_RANKS, coord


@functools.cache
def _op(name: str) -> ef.AttentionOp:
    return getattr(load_example(name), name)


def _at(fn, text: str) -> str:
    """'file:line' of the one line of ``fn``'s source that contains ``text``."""
    lines, first = inspect.getsourcelines(fn)
    hits = [first + i for i, ln in enumerate(lines) if text in ln]
    assert len(hits) == 1, (text, hits)
    return f"{inspect.getsourcefile(fn)}:{hits[0]}"


# -- structural hash and canonical form --------------------------------------------------------


def _plain_names(q, k, v):
    s = q @ k * ef.scale
    p = ef.softmax(s, "n")
    return p @ v


def _other_names(q, k, v):
    scores = q @ k * ef.scale
    weights = ef.softmax(scores, "n")
    return weights @ v


def _strict_causal(q, k, v):
    return ef.softmax(ef.mask(q @ k * ef.scale, ef.n < ef.m), "n") @ v


def _causal(q, k, v):
    return ef.softmax(ef.mask(q @ k * ef.scale, ef.n <= ef.m), "n") @ v


def _window_256(q, k, v, window: int = 256):
    return ef.softmax(ef.mask(q @ k * ef.scale, (ef.n <= ef.m) & (ef.m - ef.n < window)), "n") @ v


def _window_128(q, k, v, window: int = 128):
    return ef.softmax(ef.mask(q @ k * ef.scale, (ef.n <= ef.m) & (ef.m - ef.n < window)), "n") @ v


def test_same_maths_same_key_whatever_the_names():
    a, b = ef.attention(_plain_names).cascade, ef.attention(_other_names).cascade
    assert {e.out for e in a.einsums} != {e.out for e in b.einsums}  # the names really differ
    assert a.key == b.key
    assert a.canonical() == b.canonical()
    assert ef.attention(_plain_names).cascade.key == a.key  # tracing again is deterministic
    assert re.fullmatch(r"[0-9a-f]{16}", a.key)


@pytest.mark.parametrize(
    "first, second",
    [(_causal, _strict_causal), (_window_256, _window_128), (_causal, _plain_names)],
    ids=["another-mask", "another-default", "mask-or-not"],
)
def test_different_maths_different_key(first, second):
    assert ef.attention(first).cascade.key != ef.attention(second).cascade.key


def test_an_input_named_like_a_canonical_name_keeps_keys_apart():
    """Canonical names t1, t2... must not merge an input called t1 with an intermediate."""

    @ef.attention
    def added(q, k, v, t1: ef.Tensor["b h m n"]):
        return ef.softmax(q @ k + t1, "n") @ v

    @ef.attention
    def doubled(q, k, v, t1: ef.Tensor["b h m n"]):
        s = q @ k
        return ef.softmax(s + s, "n") @ v

    assert added.cascade.key != doubled.cascade.key
    validate(added.cascade.canonical())


def test_canonical_renames_intermediates_in_order_and_nothing_else():
    c = _op("softmax").cascade
    can = c.canonical()
    assert can.name == "cascade"
    assert [e.out for e in can.einsums] == ["t1", "t2", "t3", "t4", "t5", "o"]
    assert [t.name for t in can.inputs] == ["q", "k", "v"] and can.outputs == ("o",)
    assert [e.line for e in can.einsums] == [e.line for e in c.einsums]
    assert can.canonical() == can and can.key == c.key
    validate(can)


def test_library_and_examples_keys():
    """Examples with the same maths share a key (gqa is causal; the grouping is in the call shapes)."""
    names = sorted(p.stem for p in EXAMPLES.glob("*.py"))
    keys = {n: _op(n).cascade.key for n in names}
    assert keys["gqa"] == keys["causal"]
    others = [k for n, k in keys.items() if n != "gqa"]
    assert len(set(others)) == len(others)


def test_annotations_written_as_strings_declare_inputs():
    """This module has ``from __future__ import annotations``: its annotations reach the decorator as strings, which
    are evaluated; one that does not evaluate is a DeclarationError naming the signature's line."""

    @ef.attention
    def biased(q, k, v, bias: ef.Tensor["h m n"]):
        return ef.softmax(q @ k * ef.scale + bias, "n") @ v

    assert [t.name for t in biased.cascade.inputs] == ["q", "k", "v", "bias"]
    with pytest.raises(DeclarationError, match="does not evaluate") as err:

        @ef.attention
        def broken(q, k, v, bias: undefined_name):  # noqa: F821 -- the point of the test
            return ef.softmax(q @ k + bias, "n") @ v

    assert "test_ir.py:" in str(err.value)


def test_read_padded_prints_and_keys_only_where_set():
    """A padded read (a rewrite's, outside the input absent) shows in the printer and the canonical text; a plain read's
    repr is as it always was, so the keys of every cascade without one stay."""
    m = sympy.Symbol("m", integer=True, nonnegative=True)
    assert repr(Read("q", (m,))) == "Read(tensor='q', index=(m,), prev=False)"
    assert "padded=True" in repr(Read("q", (m - 1,), padded=True))
    assert format_expr(Read("q", (m - 1,), padded=True)) == "q@padded[m - 1]"


def test_key_changes_with_the_rewrites():
    written = _op("softmax").cascade
    assert _op("softmax").forward.rewritten.key != written.key


# -- printer ------------------------------------------------------------------------------------


def _einsum_lines(c: Cascade) -> list[str]:
    return [ln.split("    # line")[0].strip() for ln in str(c).splitlines()[-len(c.einsums) :]]


def test_printer_softmax_as_written():
    c = _op("softmax").cascade
    text = str(c).splitlines()
    assert text[0] == f"cascade softmax  ({c.source})"
    assert text[1] == "  inputs: q[m,e]  k[n,e]  v[n,f]"
    assert text[2] == "  params: scale = 1/sqrt(E)"
    assert _einsum_lines(c) == [
        "dot_e[m,n] = Σ_e q[m,e]·k[n,e]",
        "s[m,n] = dot_e[m,n]·scale",
        "top[m] = max_n s[m,n]",
        "num[m,n] = exp(s[m,n] − top[m])",
        "den[m] = Σ_n num[m,n]",
        "o[m,f] = Σ_n num[m,n]/den[m]·v[n,f]",
    ]
    assert len(text) == 3 + len(c.einsums)  # one Einsum a line


def test_printer_names_each_einsums_source_line():
    op = _op("softmax")
    statements = {
        "s": 'ef.einsum("m e, n e',
        "top": "s.max",
        "num": "ef.exp(s - top)",
        "den": "num.sum",
        "o": 'ef.einsum("m n, n f',
    }
    for name, text in statements.items():
        e = op.cascade.producer(name)
        assert op.cascade.where(e) == _at(op.fn, text)
        assert str(op.cascade).count(f"# line {e.line}") >= 1


def test_printer_masks_and_params():
    c = _op("sliding_window").cascade
    assert "  params: window = 256, scale = 1/sqrt(E)" in str(c).splitlines()
    assert "s[m,n] = dot_e[m,n]·scale  :: n ≤ m ∧ m − n < window" in _einsum_lines(c)
    kth = _op("moba").cascade.producer("thr")
    assert format_einsum(kth) == "thr[m] = kth2_c masked2[m,c]"


def test_printer_loop_block_and_states():
    c = _op("softmax").forward.rewritten
    lines = str(c).splitlines()
    states = [t.name for t in c.states]
    assert lines[3] == "  states: " + "  ".join(f"{s}[{'m,f' if s == 'o_acc' else 'm'}]" for s in states)
    assert lines[4] == "  for each chunk of n:"
    body = lines[5:]
    assert [ln.startswith("    ") for ln in body] == [e.loop for e in c.einsums]
    for s in states:  # each running state is updated from its previous value with a ∪ merge
        update = next(ln for ln in body if ln.strip().startswith(f"{s}["))
        assert f"{s}@prev[" in update and "∪" in update


_m, _n = coord("m"), coord("n")


@pytest.mark.parametrize(
    "expr, text",
    [
        (call("sub", Param("a"), call("sub", Param("b"), Param("c"))), "a − (b − c)"),
        (call("sub", call("sub", Param("a"), Param("b")), Param("c")), "a − b − c"),
        (call("div", Param("a"), call("mul", Param("b"), Param("c"))), "a/(b·c)"),
        (call("mul", call("add", Param("a"), Param("b")), Param("c")), "(a + b)·c"),
        (call("neg", call("add", Param("a"), Param("b"))), "−(a + b)"),
        (call("add", Read("x", (_m,), prev=True), Read("y", (_m,)), merge=Merge.ANY), "x@prev[m] +∪ y[m]"),
        (call("maximum", Const(float("-inf")), Size("n")), "maximum(−∞, |n|)"),
        (
            call("and", call("le", Coord("n"), Coord("m")), call("not", call("eq", Coord("n"), Const(0.0)))),
            "n ≤ m ∧ ¬n == 0",
        ),
        (Read("s", (_m - coord("i"), _n // 4)), "s[-i + m,floor(n/4)]"),  # indices print as sympy does
    ],
)
def test_format_expr(expr, text):
    assert format_expr(expr) == text


# -- graph --------------------------------------------------------------------------------------


def test_graph_of_softmax_has_the_dataflow_edges():
    c = _op("softmax").cascade
    g = c.graph()
    pos = {e.out: i for i, e in enumerate(c.einsums)}
    want = {("dot_e", "s"), ("s", "top"), ("s", "num"), ("top", "num"), ("num", "den"), ("num", "o"), ("den", "o")}
    assert {(c.einsums[u].out, c.einsums[v].out) for u, v in g.edges} == want
    assert g.edges[pos["top"], pos["num"]]["tensor"] == "top"
    assert nx.is_directed_acyclic_graph(g)


def test_graph_of_a_loop_leaves_out_previous_values():
    c = _op("softmax").forward.rewritten
    g = c.graph()
    assert nx.is_directed_acyclic_graph(g)
    for s in c.states:
        i = next(i for i, e in enumerate(c.einsums) if e.out == s.name)
        # the update reads its own previous value (no edge) and the chunk's reduction (an edge)
        assert not g.has_edge(i, i)
        assert f"{s.name}_chunk" in {g.edges[u, i]["tensor"] for u in g.predecessors(i)}


# -- frozen values ------------------------------------------------------------------------------


def _frozen_values():
    op = _op("softmax")
    c = op.cascade
    e = c.einsums[-1]
    _, steps = optimise(c)
    return [
        (c, "name"),
        (e, "out"),
        (c.tensors[0], "role"),
        (c.params[0], "default"),
        (e.reduce, "op"),
        (Read("x", ()), "tensor"),
        (call("exp", Param("a")), "op"),
        (Const(1.0), "value"),
        (STANDARD_RANKS["n"], "extent"),
        (count_passes(c), "passes"),
        (count_passes(c).reasons[0], "index"),
        (steps[0], "cascade"),
        (ef.Shape(1, 1, 1, 1, 16), "B"),
    ]


@pytest.mark.parametrize(
    "value, field", _frozen_values(), ids=lambda x: type(x).__name__ if not isinstance(x, str) else x
)
def test_values_are_frozen(value, field):
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(value, field, None)


# -- validation: declarations --------------------------------------------------------------------


def _unknown_output_rank(q, k, v):
    s = ef.einsum("m e, n e -> m x", q, k)
    return s @ v


def _reduce_missing_rank(q, k, v):
    s = (q @ k).sum("f")
    return s @ v


def _operand_mismatch(q, k, v):
    s = ef.einsum("m f, n e -> m n", q, k)
    return s @ v


def _python_if(q, k, v):
    s = q @ k
    if s > 0:
        s = s * 2
    return ef.softmax(s, "n") @ v


def _text_default(q, k, v, tau="0.1"):
    return ef.softmax(q @ k, "n") @ v


def _undeclared_input(q, k, v, bias):
    return ef.softmax(q @ k + bias, "n") @ v


def _mask_not_predicate(q, k, v):
    s = ef.mask(q @ k, ef.n - ef.m)
    return ef.softmax(s, "n") @ v


def _output_without_m(q, k, v):
    return ef.einsum("m e, n f -> n f", q, v)


def _output_summed_over_m(q, k, v):
    return (ef.softmax(q @ k, "n") @ v).sum("m")


def _unknown_reducer(q, k, v):
    return ef.softmax((q @ k).reduce("product", "n"), "n") @ v


def _math_on_traced(q, k, v):
    import math

    return ef.softmax(q @ k * math.exp(ef.scale), "n") @ v


def _rank_not_declared(q, k, v):
    return ef.softmax(q @ k + ef.rank("zz"), "n") @ v


@pytest.mark.parametrize(
    "fn, error, text, words",
    [
        (_unknown_output_rank, UnknownRankError, "-> m x", ["'x'", "no operand"]),
        (_reduce_missing_rank, UnknownRankError, 'sum("f")', ["'f'", "(b, h, m, n)"]),
        (_operand_mismatch, RankMismatchError, "m f, n e", ["operand 1", "(m, e)", "(m, f)"]),
        (_python_if, DeclarationError, "if s > 0", ["truth value", "ef.where"]),
        (_text_default, DeclarationError, "def _text_default", ["'tau'", "'0.1'", "number"]),
        (_undeclared_input, DeclarationError, "def _undeclared_input", ["'bias'", "ef.Tensor"]),
        (_mask_not_predicate, DeclarationError, "ef.mask(", ["predicate"]),
        (_output_without_m, RankMismatchError, "n f -> n f", ["rank m", "(n, f)"]),
        (_output_summed_over_m, RankMismatchError, 'sum("m")', ["rank m", "(f)"]),
        (_unknown_reducer, UnsupportedOperatorError, "product", ["'product'", "'sum'"]),
        (_math_on_traced, DeclarationError, "math.exp", ["not a number", "ef.exp"]),
        (_rank_not_declared, UnknownRankError, "ef.rank", ["'zz'", "extent"]),
    ],
    ids=lambda x: x.__name__.strip("_") if callable(x) and not isinstance(x, type) else None,
)
def test_declaration_errors_name_the_line(fn, error, text, words):
    with pytest.raises(error) as info:
        ef.attention(fn)
    err = info.value
    assert err.where == _at(fn, text)
    assert str(err).startswith(err.where + ": ")
    for w in words:
        assert w in str(err)


# -- validation: hand-built cascades -----------------------------------------------------------------

_RANKS = tuple(STANDARD_RANKS.values())
_INPUTS = (
    TensorDecl("q", ("b", "h", "m", "e"), Role.INPUT, Layout.QUERY),
    TensorDecl("k", ("b", "h", "n", "e"), Role.INPUT, Layout.KEY),
    TensorDecl("v", ("b", "h", "n", "f"), Role.INPUT, Layout.KEY),
)
_Q, _K, _V = (plain_read(t) for t in _INPUTS)


_S = TensorDecl("s", ("b", "h", "m", "n"))
_SCORE = Einsum("s", _S.ranks, call("mul", _Q, _K), Reduction("sum", ("e",)), line=10)


def _hand(*einsums: Einsum, tensors=()) -> Cascade:
    """o = Σ_n s·v after the given Einsums (which assign s); source 'hand.py', lines as given."""
    out = Einsum("o", ("b", "h", "m", "f"), call("mul", plain_read(_S), _V), Reduction("sum", ("n",)), line=99)
    decls = _INPUTS + tuple(tensors) + (TensorDecl("o", ("b", "h", "m", "f"), Role.OUTPUT),)
    return Cascade("hand", _RANKS, decls, (), einsums + (out,), source="hand.py")


def test_a_hand_built_cascade_is_valid():
    validate(_hand(_SCORE, tensors=(_S,)))


def test_cycle():
    x, y = TensorDecl("x", _S.ranks), TensorDecl("y", _S.ranks)
    c = _hand(
        Einsum("x", x.ranks, call("mul", plain_read(y), Const(2.0)), line=3),
        Einsum("y", y.ranks, call("mul", plain_read(x), Const(3.0)), line=4),
        Einsum("s", _S.ranks, plain_read(y), line=5),
        tensors=(x, y, _S),
    )
    with pytest.raises(CycleError) as info:
        validate(c)
    assert info.value.where in ("hand.py:3", "hand.py:4")
    assert "x → y → x" in str(info.value) or "y → x → y" in str(info.value)


def test_read_before_assignment():
    t = TensorDecl("t", _S.ranks)
    c = _hand(
        Einsum("s", _S.ranks, call("mul", plain_read(t), Const(2.0)), line=7),
        Einsum("t", t.ranks, call("mul", _Q, _K), Reduction("sum", ("e",)), line=8),
        tensors=(_S, t),
    )
    with pytest.raises(CascadeError, match="'s' reads 't' before") as info:
        validate(c)
    assert info.value.where == "hand.py:7"


def _expect(c: Cascade, error: type, where: str, *words: str) -> None:
    with pytest.raises(error) as info:
        validate(c)
    assert info.value.where == where
    for w in words:
        assert w in str(info.value)


def test_undeclared_tensor():
    ghost = Read("ghost", plain_read(_S).index)
    _expect(
        _hand(Einsum("s", _S.ranks, call("mul", ghost, Const(2.0)), line=12), tensors=(_S,)),
        UnknownTensorError,
        "hand.py:12",
        "'ghost'",
        "not declared",
    )
    _expect(
        _hand(_SCORE, Einsum("nowhere", ("b", "h", "m"), Const(1.0), line=13), tensors=(_S,)),
        UnknownTensorError,
        "hand.py:13",
        "'nowhere'",
    )


def test_unknown_operator_and_arity():
    bad = Einsum("s", _S.ranks, Call("frobnicate", (_Q, _K)), Reduction("sum", ("e",)), line=21)
    _expect(_hand(bad, tensors=(_S,)), UnsupportedOperatorError, "hand.py:21", "'frobnicate'", "'exp'")
    two = Einsum("s", _S.ranks, Call("exp", (_Q, _K)), Reduction("sum", ("e",)), line=22)
    _expect(_hand(two, tensors=(_S,)), UnsupportedOperatorError, "hand.py:22", "exp takes 1", "got 2")
    red = dataclasses.replace(_SCORE, reduce=Reduction("median", ("e",)), line=23)
    _expect(_hand(red, tensors=(_S,)), UnsupportedOperatorError, "hand.py:23", "'median'")


def test_rank_errors_of_hand_built_einsums():
    _expect(
        _hand(dataclasses.replace(_SCORE, reduce=Reduction("sum", ("f",)), line=31), tensors=(_S,)),
        UnknownRankError,
        "hand.py:31",
        "rank 'f'",
    )
    wrong = dataclasses.replace(_SCORE, ranks=("b", "h", "m"), line=32)
    _expect(
        _hand(wrong, tensors=(dataclasses.replace(_S, ranks=("b", "h", "m")),)),
        RankMismatchError,
        "hand.py:32",
        "(b, h, m)",
        "(b, h, m, n)",
    )
    short = dataclasses.replace(_SCORE, expr=call("mul", Read("q", (_m,)), _K), line=33)
    _expect(_hand(short, tensors=(_S,)), RankMismatchError, "hand.py:33", "4 ranks", "1 indices")


def test_mask_must_be_a_predicate():
    pre = TensorDecl("pre", _S.ranks)
    raw = dataclasses.replace(_SCORE, out="pre")
    masked = Einsum("s", _S.ranks, plain_read(pre), where=call("sub", Coord("n"), Coord("m")), line=41)
    _expect(_hand(raw, masked, tensors=(pre, _S)), CascadeError, "hand.py:41", "predicate")
    ok = dataclasses.replace(masked, where=call("le", Coord("n"), Coord("m")))
    validate(_hand(raw, ok, tensors=(pre, _S)))


def test_previous_values_only_in_loops_and_of_states():
    prev = dataclasses.replace(_SCORE, expr=call("mul", Read("q", _Q.index, prev=True), _K), line=51)
    _expect(_hand(prev, tensors=(_S,)), CascadeError, "hand.py:51", "previous value")


def test_output_needs_the_query_rank():
    c = _hand(_SCORE, tensors=(_S,))
    no_m = dataclasses.replace(c.einsums[-1], ranks=("b", "h", "f"), reduce=Reduction("sum", ("m", "n")))
    bad = dataclasses.replace(
        c, einsums=c.einsums[:-1] + (no_m,), tensors=c.tensors[:-1] + (TensorDecl("o", ("b", "h", "f"), Role.OUTPUT),)
    )
    _expect(bad, RankMismatchError, "hand.py:99", "query rank m", "(f)")


def test_a_top_list_is_not_declared_and_needs_its_list_rank():
    def top(q, k, v):
        return ef.softmax((q @ k).reduce("top", "n", 2), "n") @ v

    with pytest.raises(UnsupportedOperatorError, match=r"unknown reducer 'top'.*'kth_largest'"):
        ef.attention(top)
    t8 = TensorDecl("t8", ("b", "h", "m"))
    listed = Einsum("t8", t8.ranks, plain_read(_S), Reduction("top", ("n",), 8.0), line=13)
    _expect(_hand(_SCORE, listed, tensors=(_S, t8)), CascadeError, "hand.py:13", "a top list needs one LIST rank")
