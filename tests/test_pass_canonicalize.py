"""The canonicalize pass: each rule of its table, the cases it must leave alone, and its
guarantees (graph output names survive, idempotence, purity)."""

from __future__ import annotations

import numpy as np
import pytest

import graphc
from graphc import ops
from passes import PassOptions

from .pass_testing import assert_same_outputs, run_passes

RNG = np.random.default_rng(0)


def _canon(g: graphc.Graph, training: bool = False) -> graphc.Graph:
    out = run_passes(g, ["canonicalize"], PassOptions(training=training))
    again = run_passes(out, ["canonicalize"], PassOptions(training=training))
    assert str(again) == str(out)  # idempotent
    return out


def _ops(g):
    return [n.op for n in g.nodes() if n.op not in ("Input", "Constant")]


# -- MatMul + Add -> Gemm --------------------------------------------------------------------------
@pytest.mark.parametrize("bias_shape", [(5,), (1, 5), ()])
@pytest.mark.parametrize("bias_first", [False, True])
def test_matmul_plus_bias_becomes_gemm(bias_shape, bias_first):
    g = graphc.Graph("mm")
    x = g.input("x", (None, 4))
    product = ops.matmul(x, RNG.standard_normal((4, 5)))
    bias = RNG.standard_normal(bias_shape).astype(np.float32)
    g.output(ops.add(bias, product, name="y") if bias_first else ops.add(product, bias,
                                                                          name="y"))
    out = _canon(g)
    assert _ops(out) == ["Gemm"] and out.outputs == ["y"]
    assert_same_outputs(g, out, seed=RNG)  # the same two roundings


def test_matmul_plus_add_stays_when_the_pattern_does_not_hold():
    g = graphc.Graph("mm")
    x3 = g.input("x3", (2, 3, 4))
    x = g.input("x", (3, 4))
    w = g.input("w", (4, 5))
    b = RNG.standard_normal(5).astype(np.float32)
    batched = ops.matmul(x3, RNG.standard_normal((4, 5))) + b    # A is 3-D
    run_time_b = ops.matmul(x, w) + b                             # B is not a constant
    shared = ops.matmul(x, RNG.standard_normal((4, 5)))           # the product has 2 readers
    widening = ops.matmul(x, RNG.standard_normal((4, 5))) + RNG.standard_normal((2, 1, 5))
    g.output(batched, run_time_b, shared + b, shared, widening)
    out = _canon(g)
    assert str(out) == str(g)


# -- Dropout ---------------------------------------------------------------------------------------
def test_inference_dropout_goes_and_a_used_static_mask_becomes_all_true():
    g = graphc.Graph("drop")
    x = g.input("x", (3, 4))
    ratio = g.add_constant(np.array(0.3, np.float32))
    y, mask = (g.value(v) for v in g.add_node("Dropout", ["x", ratio], outputs=["y", "mask"]))
    plain = ops.dropout(ops.relu(x), name="plain")
    g.output(ops.relu(y, name="r"), ops.cast(mask, to=1, name="as_float"), plain)
    out = _canon(g)
    assert out.op_histogram() == {"Constant": 1, "Relu": 2, "Cast": 1, "Identity": 1,
                                  "Input": 1}
    assert out.producer("r").inputs == ("x",) and out.producer("plain").op == "Identity"
    assert out.producer("mask").op == "Constant" and out.constant_value("mask").all()
    assert out.outputs == g.outputs
    assert_same_outputs(g, out, batches=(1,), seed=RNG)


def test_dropout_stays_in_training_and_when_its_mode_is_true_or_its_mask_symbolic():
    g = graphc.Graph("drop")
    x = g.input("x", (None, 4))
    mode = g.input("mode", (), dtype="bool")
    _, symbolic_mask = g.add_node("Dropout", ["x"], outputs=["y", "mask"])
    g.output(g.value(symbolic_mask),
             ops.dropout(x, np.array(0.5, np.float32), np.array(True)),
             ops.dropout(x, np.array(0.5, np.float32), mode))
    assert _ops(_canon(g)) == ["Dropout"] * 3
    h = graphc.Graph("train")
    h.output(ops.relu(ops.dropout(h.input("x", (2, 4)))))
    assert _ops(_canon(h, training=True)) == ["Dropout", "Relu"]


# -- Identity, variadic ops ------------------------------------------------------------------------
def test_identities_go_except_where_they_name_a_graph_output():
    g = graphc.Graph.parse("""
    graph t(%x: f32[2]) {
      %i1 = Identity(%x) : f32[2]
      %i2 = Identity(%i1) : f32[2]
      %r = Relu(%i2) : f32[2]
      %out = Identity(%r) : f32[2]
      return %out, %r
    }""")
    out = _canon(g)
    assert str(out) == str(graphc.Graph.parse("""
    graph t(%x: f32[2]) {
      %r = Relu(%x) : f32[2]
      %out = Identity(%r) : f32[2]
      return %out, %r
    }"""))


def test_sum_of_one_is_its_input_sum_of_two_is_add_sum_of_three_stays():
    g = graphc.Graph.parse("""
    graph t(%x: f32[N,3], %y: f32[3], %z: f32[3]) {
      %s1 = Sum(%x) : f32[N,3]
      %m1 = Max(%s1) : f32[N,3]
      %s2 = Sum(%m1, %y) : f32[N,3]
      %s3 = Sum(%s2, %y, %z) : f32[N,3]
      return %s3
    }""")
    out = _canon(g)
    assert _ops(out) == ["Add", "Sum"]
    assert out.producer("s2").inputs == ("x", "y")
    assert_same_outputs(g, out, seed=RNG)


# -- reshapes and transposes -----------------------------------------------------------------------
def test_reshape_chains_collapse_and_same_shape_reshapes_go():
    g = graphc.Graph("reshapes")
    x = g.input("x", (2, 3, 4))
    a = ops.reshape(x, np.array([6, 4]))
    b = ops.unsqueeze(ops.flatten(a, axis=1), np.array([0]))     # [1, 6, 4]
    c = ops.reshape(b, np.array([2, 3, 4]), name="back")         # x's own shape
    same = ops.reshape(ops.relu(x), np.array([0, 3, -1]), name="same")
    g.output(ops.neg(c), same, ops.squeeze(b, np.array([0]), name="sq"))
    out = _canon(g)
    assert sorted(_ops(out)) == ["Identity", "Neg", "Relu", "Reshape"]
    assert out.producer(out.outputs[0]).inputs == ("x",)  # Neg(x)
    assert out.producer("sq").inputs[0] == "x"  # Squeeze(Unsqueeze(Flatten(Reshape(x))))
    np.testing.assert_array_equal(out.constant_value(out.producer("sq").inputs[1]), [6, 4])
    assert out.producer("same").op == "Identity"  # a graph output keeps its name
    assert_same_outputs(g, out, batches=(1,), seed=RNG)


def test_flatten_becomes_reshape_when_static_and_symbolic_chains_keep_their_spec():
    g = graphc.Graph("flat")
    x = g.input("x", (None, 2, 3))
    static = g.input("s", (0, 2, 3))  # empty: the new Reshape must not read 0 as "copy"
    merged = ops.reshape(ops.reshape(x, np.array([-1, 6])), np.array([-1, 3, 2]))
    g.output(ops.flatten(x, axis=1), merged, ops.flatten(static, axis=2, name="fs"))
    out = _canon(g)
    assert [out.producer(v).op for v in out.outputs] == ["Flatten", "Reshape", "Reshape"]
    assert out.producer(out.outputs[1]).inputs[0] == "x"
    assert out.producer("fs").attrs == {"allowzero": 1}
    assert_same_outputs(g, out, seed=RNG)  # s is empty: its feed is np.zeros((0, 2, 3))


def test_transposes_compose_and_identity_permutations_go():
    g = graphc.Graph("t")
    x = g.input("x", (2, 3, 4, 5))
    t1 = ops.transpose(x, perm=[0, 2, 3, 1])
    composed = ops.transpose(t1, perm=[1, 0, 3, 2], name="composed")
    back = ops.transpose(t1, perm=[0, 3, 1, 2], name="back")
    rev = ops.transpose(ops.transpose(ops.relu(x)), name="rev")       # default perms
    g.output(composed, ops.neg(back), rev, ops.transpose(x, perm=[0, 1, 2, 3], name="ident"))
    out = _canon(g)
    assert out.producer("composed").attrs["perm"] == (2, 0, 1, 3)
    assert out.producer("composed").inputs == ("x",)
    assert out.producer(out.outputs[1]).inputs == ("x",)                # Neg(x)
    assert [out.producer(v).op for v in ("rev", "ident")] == ["Identity", "Identity"]
    assert _ops(out).count("Transpose") == 1
    assert_same_outputs(g, out, batches=(1,), seed=RNG)


def test_canonicalize_through_the_manager_on_a_small_mlp_with_dropout():
    g = graphc.Graph("mlp")
    x = g.input("x", (None, 8))
    h = ops.relu(ops.matmul(x, RNG.standard_normal((8, 6))) + RNG.standard_normal(6))
    h = ops.identity(ops.dropout(h, np.array(0.5, np.float32)))
    g.output(ops.sum(ops.matmul(h, RNG.standard_normal((6, 3))), RNG.standard_normal(3)))
    out = _canon(g)
    assert _ops(out) == ["Gemm", "Relu", "Gemm"]  # Sum -> Add -> Gemm
    assert_same_outputs(g, out, rtol=1e-6, atol=1e-6, seed=RNG)


@pytest.mark.parametrize("shapes,trans", [(((5, 3), (3, 7)), {}), (((3, 5), (7, 3)),
                                                                  {"transA": 1, "transB": 1})])
def test_gemm_alpha_with_run_time_operands_becomes_an_explicit_scale(shapes, trans):
    g = graphc.Graph("gemm_alpha")
    a = g.input("a", shapes[0])
    b = g.input("b", shapes[1])
    g.output(ops.gemm(a, b, np.ones(7, np.float32), alpha=0.25, beta=2.0, **trans))
    out = _canon(g)
    gemm = next(n for n in out if n.op == "Gemm")
    assert gemm.attrs["alpha"] == 1.0 and gemm.attrs["beta"] == 2.0
    assert "Mul" in _ops(out)
    assert_same_outputs(g, out, rtol=1e-6, atol=1e-6)  # alpha now scales an operand
    feeds = {"a": np.random.default_rng(0).standard_normal(shapes[0]).astype(np.float32),
             "b": np.random.default_rng(1).standard_normal(shapes[1]).astype(np.float32)}
    (got,) = graphc.compile(g, target="cpu", cache=False).run(feeds)
    np.testing.assert_allclose(got, graphc.interpret(g, feeds)[0], rtol=1e-5, atol=1e-5)


def test_gemm_alpha_stays_when_an_operand_is_constant():
    g = graphc.Graph("gemm_alpha_const")
    a = g.input("a", (4, 3))
    g.output(ops.gemm(a, np.ones((3, 2), np.float32), alpha=0.5))
    gemm = next(n for n in _canon(g) if n.op == "Gemm")
    assert gemm.attrs["alpha"] == 0.5
