"""fuse-elementwise and the FusedElementwise op: fused trees, their printed bodies, and that
fused graphs compute bit for bit what the unfused ones do (every body operation runs its op's
registry reference, so results are compared with ``assert_array_equal``, NaN equal to NaN)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import graphc
from graphc import ops
from graphc.errors import InvalidAttributeError, ShapeError
from graphc.ops import registry
from graphc.ops.fused_expression import depth, parse_expr, to_text
from passes.fuse_elementwise import MAX_BODY_DEPTH, literal_of

from .pass_testing import SEED_BY_BATCH, assert_same_outputs, run_passes


def fuse(g: graphc.Graph, pipeline=("fuse-elementwise",)) -> graphc.Graph:
    return run_passes(g, pipeline)


def fused_exprs(g: graphc.Graph) -> list[str]:
    return [n.attrs["expr"] for n in g.nodes() if n.op == "FusedElementwise"]


def fused_node(out: graphc.Graph, expr: str):
    assert fused_exprs(out) == [expr], str(out)
    return next(n for n in out.nodes() if n.op == "FusedElementwise")


# -- what fuses ------------------------------------------------------------------------------------
def test_broadcasting_chain_becomes_one_node():
    g = graphc.Graph("t")
    x = g.input("x", (None, 3, 5))
    y = g.input("y", (3, 1))
    z = g.input("z", (5,))
    r = ops.relu(x * y + z)
    g.output(r)
    out = fuse(g)
    node = fused_node(out, "relu(x0 * x1 + x2)")
    assert node.inputs == ("x", "y", "z") and node.output == r.name
    assert out.op_histogram() == {"Input": 3, "FusedElementwise": 1}
    assert node.types == (r.type,)
    assert_same_outputs(g, out, seed=SEED_BY_BATCH, strict=True)


def test_scalar_constants_become_literals_and_their_nodes_go():
    g = graphc.Graph("t")
    x = g.input("x", (None, 4))
    g.output(ops.sigmoid(x * np.float32(0.1) - np.array([2.5], np.float32)))
    out = fuse(g)
    fused_node(out, "sigmoid(x0 * 0.1 - 2.5)")
    assert "Constant" not in out.op_histogram()
    assert_same_outputs(g, out, seed=SEED_BY_BATCH, strict=True)


def test_literal_that_would_drop_a_broadcast_dim_stays_an_input():
    # f32[5] * f32[1,1] is f32[1,5]: a literal would make it f32[5]
    g = graphc.Graph("t")
    x = g.input("x", (5,))
    g.output(ops.exp(x * np.ones((1, 1), np.float32)))
    out = fuse(g)
    node = fused_node(out, "exp(x0 * x1)")
    assert out.type_of(node.output).shape == (1, 5)
    assert_same_outputs(g, out, seed=SEED_BY_BATCH, strict=True)


def test_value_with_two_uses_is_one_input_and_not_fused():
    g = graphc.Graph("t")
    x = g.input("x", (None, 4))
    y = g.input("y", (4,))
    t = x + y
    g.output(ops.relu(t) * t)
    out = fuse(g)
    node = fused_node(out, "relu(x0) * x0")
    assert node.inputs == (t.name,) and out.op_histogram()["Add"] == 1
    assert_same_outputs(g, out, seed=SEED_BY_BATCH, strict=True)


def test_value_read_twice_by_a_fused_body_stays_an_input():
    g = graphc.Graph("t")
    x = g.input("x", (None, 4))
    t = x + x
    g.output(x + (t + t))
    out = fuse(g)
    node = fused_node(out, "x0 + (x1 + x1)")
    assert node.inputs == ("x", t.name)
    assert str(fuse(out)) == str(out)  # t is still read twice: not recomputed inside
    assert_same_outputs(g, out, seed=SEED_BY_BATCH, strict=True)


def test_graph_output_in_the_middle_splits_the_tree():
    g = graphc.Graph("t")
    x = g.input("x", (None, 4))
    mid = ops.tanh(-x)
    g.output(ops.abs(mid) / np.float32(3.0), mid)
    out = fuse(g)
    assert sorted(fused_exprs(out)) == ["abs(x0) / 3.0", "tanh(-x0)"]
    assert_same_outputs(g, out, seed=SEED_BY_BATCH, strict=True)


@pytest.mark.parametrize("build", [
    lambda x: ops.relu(x),
    lambda x: x + np.float32(1.0),
    lambda x: ops.softmax(ops.exp(x), axis=-1),
    lambda x: ops.exp(ops.cast(ops.relu(x), to=11)),
], ids=["one-op", "one-op-with-constant", "reduce-between", "cast-between"])
def test_single_ops_are_left_alone(build):
    g = graphc.Graph("t")
    x = g.input("x", (None, 4))
    g.output(build(x))
    out = fuse(g)
    assert str(out) == str(g)


def test_integer_chains_are_not_fused():
    g = graphc.Graph("t")
    x = g.input("x", (4,), "i32")
    g.output(ops.relu(x * x + x))
    assert str(fuse(g)) == str(g)


def test_fused_nodes_merge_and_the_pass_is_idempotent():
    g = graphc.Graph("t")
    x = g.input("x", (None, 4))
    y = g.input("y", (None, 4))
    inner = ops.apply("FusedElementwise", (y, x), expr="x0 - x1 * 2.0")
    g.output(ops.clip(ops.sqrt(ops.abs(inner)) + x, None, np.float32(6.0)))
    out = fuse(g)
    fused_node(out, "clip(sqrt(abs(x0 - x1 * 2.0)) + x1, -inf, 6.0)")
    assert_same_outputs(g, out, seed=SEED_BY_BATCH, strict=True)
    assert str(fuse(out)) == str(out) == str(fuse(g, ["fuse-elementwise"] * 2))


def test_long_chains_split_into_bodies_of_bounded_depth():
    g = graphc.Graph("t")
    x = g.input("x", (None, 4))
    v = x
    for i in range(150):
        v = ops.tanh(v) if i % 2 else v * np.float32(1.01)
    g.output(v)
    out = fuse(g)
    depths = [depth(parse_expr(e)) for e in fused_exprs(out)]
    assert sum(depths) == 150 and max(depths) == MAX_BODY_DEPTH
    assert str(fuse(out)) == str(out)
    assert_same_outputs(g, out, seed=SEED_BY_BATCH, strict=True)


# -- every function against its op -----------------------------------------------------------------
CASES = {
    "add-sub-mul-div": (lambda x, y: (x + y) * (x - y) / y, "(x0 + x1) * (x0 - x1) / x1"),
    "right-nested": (lambda x, y: x - (y - x), "x0 - (x1 - x0)"),
    "neg-reciprocal": (lambda x, y: ops.reciprocal(-(x * y)), "reciprocal(-(x0 * x1))"),
    "exp-log-sqrt": (lambda x, y: ops.log(ops.abs(x)) + ops.sqrt(ops.exp(y)),
                     "log(abs(x0)) + sqrt(exp(x1))"),
    "erf-softplus": (lambda x, y: ops.erf(x) * ops.softplus(y), "erf(x0) * softplus(x1)"),
    "sigmoid-tanh": (lambda x, y: ops.sigmoid(x) - ops.tanh(y), "sigmoid(x0) - tanh(x1)"),
    "hard": (lambda x, y: ops.hard_swish(x) + ops.hard_sigmoid(y, alpha=0.3, beta=0.25),
             "hard_swish(x0) + hard_sigmoid(x1, 0.3, 0.25)"),
    "leaky-elu": (lambda x, y: ops.leaky_relu(x, alpha=0.1) * ops.elu(y, alpha=0.5),
                  "leaky_relu(x0, 0.1) * elu(x1, 0.5)"),
    "selu": (lambda x, y: ops.selu(x + y, alpha=1.5, gamma=1.25), "selu(x0 + x1, 1.5, 1.25)"),
    "gelu": (lambda x, y: ops.gelu(x) + ops.gelu(y, approximate="tanh"),
             "gelu(x0) + gelu_tanh(x1)"),
    "clip-constant-bounds": (lambda x, y: ops.clip(x + y, np.float32(-0.5), np.float32(0.5)),
                             "clip(x0 + x1, -0.5, 0.5)"),
    "pow": (lambda x, y: ops.pow(ops.abs(x), y * np.float32(0.5)), "pow(abs(x0), x1 * 0.5)"),
    "pow-int-exponent": (lambda x, y: ops.pow(x + y, np.array(3, np.int64)),
                         "pow(x0 + x1, x2)"),
    "prelu": (lambda x, y: ops.prelu(x - y, np.array([0.1, 0.2, 0.3, 0.4], np.float32)),
              "prelu(x0 - x1, x2)"),
    "variadic": (lambda x, y: ops.max(x, y, np.float32(0.25)) + ops.min(x, y)
                 - ops.sum(x, y, x) * ops.mean(y, x),
                 "max(x0, x1, 0.25) + min(x0, x1) - sum(x0, x1, x0) * mean(x1, x0)"),
}


@pytest.mark.parametrize("case", CASES)
def test_every_function_computes_exactly_its_op(case):
    build, expr = CASES[case]
    g = graphc.Graph("t")
    x = g.input("x", (None, 4))
    y = g.input("y", (3, 4))
    g.output(build(x, y))
    out = fuse(g)
    exprs = fused_exprs(out)
    assert exprs == [expr], str(out)
    assert_same_outputs(g, out, batches=(3,), seed=SEED_BY_BATCH, strict=True)


def test_clip_bounds_computed_at_run_time_join_the_tree():
    g = graphc.Graph("t")
    x = g.input("x", (None, 4))
    s = g.input("s", (1,))
    g.output(ops.clip(x * x, -ops.abs(s), ops.exp(s)))
    out = fuse(g)
    fused_node(out, "clip(x0 * x0, -abs(x1), exp(x1))")
    assert_same_outputs(g, out, seed=SEED_BY_BATCH, strict=True)


def test_float64_chains_fuse_with_float64_literals():
    g = graphc.Graph("t")
    x = g.input("x", (None, 4), "f64")
    g.output(ops.tanh(x * np.float64(0.1) + np.float64(1 / 3)))
    out = fuse(g)
    fused_node(out, "tanh(x0 * 0.1 + 0.3333333333333333)")
    assert_same_outputs(g, out, seed=SEED_BY_BATCH, strict=True)


def test_literals_hold_the_exact_bits_of_their_constants():
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**32, 4000, dtype=np.uint64).astype(np.uint32)
    values = bits.view(np.float32)
    values = values[np.isfinite(values)]
    for v in values:
        text = to_text(literal_of(np.array([v])))
        assert np.float32(float(text)).tobytes() == v.tobytes(), (v, text)
    for v in (np.float16(0.1), np.float16(-65504), np.float64(0.1), np.float32(-0.0)):
        back = np.asarray(literal_of(np.array(v)).value, dtype=v.dtype)
        assert back.tobytes() == np.asarray(v).tobytes()


# -- the expression language -----------------------------------------------------------------------
@pytest.mark.parametrize("text", [
    "relu(x0 * x1 + x2)", "x0 - (x1 - x2)", "x0 + (x1 + x2)", "(x0 + x1) * x2", "-(x0 * x1)",
    "x0 * -2.0", "--x0", "-x0 * x1", "x0 / (x1 * x2)", "x0 - -1e-07",
    "clip(x0, -inf, 6.0)", "leaky_relu(x0, 0.1)", "max(x0, x1, 2.0)", "pow(x0, 0.5)",
    "selu(x0, 1.6732632423543772, 1.0507009873554805)", "x0 * nan",
])
def test_expression_text_is_canonical(text):
    assert to_text(parse_expr(text)) == text


@pytest.mark.parametrize("loose,canonical", [
    ("((x0))+x1*x2", "x0 + x1 * x2"), ("2*x0", "2.0 * x0"), (".5 + x0", "0.5 + x0"),
    ("x0 - - 1", "x0 - -1.0"), ("(x0 - x1) - x2", "x0 - x1 - x2"),
])
def test_expression_printing_drops_only_redundant_parentheses(loose, canonical):
    assert to_text(parse_expr(loose)) == canonical


@pytest.mark.parametrize("expr,match", [
    ("x0 +", "expected an operand"), ("foo(x0)", "unknown function 'foo'"),
    ("x2 + x0", "uses x2 but the node has 2"), ("relu(x0", "expected '\\)'"),
    ("leaky_relu(x0, x1)", "parameter alpha must be a number"),
    ("2.0 + 3.0", "every operand"), ("-(2.0) * x0 + x1", "every operand of '-\\(2.0\\)'"),
    ("1.0", "bare literal"), ("x0 $ x1", "unexpected character"),
    ("relu(x0, x1)", "relu takes 1 operand"), ("x0", "does not use x1"),
    ("add(x0, x1)", "unknown function 'add'"), ("", "empty"), ("x0 x1", "unexpected 'x1'"),
    ("clip(x0, x1)", "clip takes 3 operand"), ("y + x1", "unknown name 'y'"),
    ("relu(" * 2000 + "x0 + x1" + ")" * 2000, "nested too deeply"),
])
def test_malformed_expressions_name_the_node(expr, match):
    g = graphc.Graph("t")
    x = g.input("x", (4,))
    with pytest.raises(InvalidAttributeError, match=f"FusedElementwise node 'bad'.*{match}"):
        ops.apply("FusedElementwise", (x, x * 2.0), expr=expr, name="bad")


def test_shape_errors_name_the_node_and_the_subexpression():
    g = graphc.Graph("t")
    x = g.input("x", (4,))
    y = g.input("y", (3,))
    with pytest.raises(ShapeError, match=r"node 'bad': in 'x0 \+ x1'.*do not broadcast"):
        ops.apply("FusedElementwise", (x, y), expr="relu(x0 + x1)", name="bad")
    with pytest.raises(ShapeError, match="Sqrt takes float"):
        ops.apply("FusedElementwise", (g.input("i", (4,), "i64"),), expr="sqrt(x0)")


def test_flops_count_every_body_operation():
    g = graphc.Graph("t")
    x = g.input("x", (2, 4))
    node = g.node(ops.apply("FusedElementwise", (x, x), expr="relu(x0 * x1 + 1.0)").name)
    opdef = registry.get("FusedElementwise")
    call = registry.make_call(opdef, node.name, node.attrs, [x.type, x.type])
    assert opdef.flops(call, node.types) == 3 * 8


# -- graphs through the text IR and the pipeline ---------------------------------------------------
def small_cnn() -> graphc.Graph:
    rng = np.random.default_rng(3)
    g = graphc.Graph("cnn")
    x = g.input("x", (None, 3, 7, 6))
    h = ops.relu(ops.conv(x, rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
                          rng.standard_normal(4).astype(np.float32), pads=[1, 1, 1, 1]))
    gate = ops.sigmoid(h * np.float32(1.702))  # swish-like: h * sigmoid(1.702 h)
    g.output(ops.global_average_pool(h * gate - np.float32(0.5)))
    return g


def test_epilogue_then_elementwise_fusion_on_a_small_cnn():
    g = small_cnn()
    out = fuse(g, ["fuse-epilogue", "fuse-elementwise"])
    assert fused_exprs(out) == ["x0 * sigmoid(x0 * 1.702) - 0.5"]
    assert set(out.op_histogram()) == {"Input", "Constant", "FusedConv", "FusedElementwise",
                                       "GlobalAveragePool"}
    assert_same_outputs(g, out, seed=SEED_BY_BATCH, strict=True)


def test_fused_expression_round_trips_through_the_text_ir():
    out = fuse(small_cnn(), ["fuse-epilogue", "fuse-elementwise"])
    text = str(out)
    assert 'expr="x0 * sigmoid(x0 * 1.702) - 0.5"' in text
    back = graphc.Graph.parse(text, weights=out.constant_arrays())
    assert str(back) == text
    assert_same_outputs(out, back, seed=SEED_BY_BATCH, strict=True)


# -- property: random elementwise graphs -----------------------------------------------------------
UNARY = [ops.relu, ops.sigmoid, ops.tanh, ops.neg, ops.abs, ops.exp, ops.softplus,
         lambda v: ops.leaky_relu(v, alpha=0.3), lambda v: ops.clip(v, -1.0, 1.0)]
BINARY = [lambda a, b: a + b, lambda a, b: a - b, lambda a, b: a * b, lambda a, b: a / b,
          lambda a, b: ops.max(a, b), lambda a, b: a * np.float32(0.75)]


@st.composite
def elementwise_graph(draw):
    """A random DAG of elementwise ops over broadcasting inputs; values may be reused (two uses)
    and some intermediates are graph outputs."""
    g = graphc.Graph("r")
    values = [g.input("a", (None, 3, 4)), g.input("b", (3, 1)), g.input("c", (4,))]
    outputs = []
    for _ in range(draw(st.integers(1, 8))):
        if draw(st.booleans()):
            v = draw(st.sampled_from(UNARY))(draw(st.sampled_from(values)))
        else:
            v = draw(st.sampled_from(BINARY))(draw(st.sampled_from(values)),
                                              draw(st.sampled_from(values)))
        values.append(v)
        if draw(st.integers(0, 4)) == 0:
            outputs.append(v)
    g.output(*dict.fromkeys(outputs + [values[-1]]))
    return g


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(g=elementwise_graph())
def test_random_elementwise_graphs_fuse_exactly_and_idempotently(g):
    out = fuse(g)
    assert_same_outputs(g, out, seed=SEED_BY_BATCH, strict=True)
    assert str(fuse(out)) == str(out)
    for node in out.nodes():
        if node.op == "FusedElementwise":
            assert to_text(parse_expr(node.attrs["expr"])) == node.attrs["expr"]
    back = graphc.Graph.parse(str(out), weights=out.constant_arrays())
    assert str(back) == str(out)
