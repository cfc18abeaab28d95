"""The fold-constants pass: nodes of constants become Constants of the same name."""

from __future__ import annotations

import numpy as np
import pytest

import graphc
from graphc import ops
from passes import PassOptions
from passes.fold_constants import fold_constants

from .pass_testing import assert_same_outputs, assert_same_outputs_on, run_passes

# run_node computes both sides: every check is bit for bit


def test_a_constant_subexpression_folds_under_its_own_name():
    g = graphc.Graph.parse("""
    graph t(%x: f32[2,3]) {
      %a = Constant() {value=tensor<f32[3]> [1.0, 2.0, 3.0]} : f32[3]
      %b = Constant() {value=tensor<f32[3]> [0.5, 0.5, 0.5]} : f32[3]
      %c = Add(%a, %b) : f32[3]
      %y = Mul(%x, %c) : f32[2,3]
      return %y
    }""")
    out = run_passes(g, ["fold-constants"])
    assert str(out) == str(graphc.Graph.parse("""
    graph t(%x: f32[2,3]) {
      %c = Constant() {value=tensor<f32[3]> [1.5, 2.5, 3.5]} : f32[3]
      %y = Mul(%x, %c) : f32[2,3]
      return %y
    }"""))
    assert_same_outputs_on(g, out, {"x": np.arange(6, dtype=np.float32).reshape(2, 3)})


def test_scalars_fold_to_scalars_and_views_to_arrays_of_their_own():
    g = graphc.Graph("scalars")
    x = g.input("x", (2, 3))
    one = g.constant(np.array(1.0, np.float32), name="one")
    w = g.constant(np.arange(6, dtype=np.float32).reshape(3, 2), name="w")
    g.output(x * ops.add(one, one, name="two"), x + ops.transpose(w, name="wt"))
    out = run_passes(g, ["fold-constants"])
    assert out.type_of("two") == graphc.TensorType((), "f32")
    assert out.constant_value("wt").flags.c_contiguous
    assert_same_outputs_on(g, out, {"x": np.ones((2, 3), np.float32)})


def test_chains_fold_completely_and_graph_outputs_keep_their_names():
    g = graphc.Graph("chain")
    x = g.input("x", (None, 6))
    w = g.constant(np.arange(12, dtype=np.float32).reshape(3, 4), name="w")
    flat = ops.reshape(ops.transpose(w, name="wt"), np.array([1, 12]), name="flat")
    k = ops.gather(flat, np.array([0, 5, 7, 11, 1, 2]), axis=1, name="k")
    g.output(x * ops.sqrt(ops.abs(k)), flat)
    out = run_passes(g, ["fold-constants"])
    assert out.op_histogram() == {"Constant": 2, "Input": 1, "Mul": 1}
    assert out.outputs == g.outputs and out.producer("flat").op == "Constant"
    assert_same_outputs(g, out, seed=np.random.default_rng(0))


def test_shape_of_a_static_value_folds_and_of_a_symbolic_one_does_not():
    g = graphc.Graph("shapes")
    x = g.input("x", (2, 3, 5))
    n = g.input("n", (None, 3))
    g.output(ops.shape(x, name="sx"), ops.shape(x, start=1, end=-1, name="mid"),
             ops.shape(n, name="sn"), ops.shape(ops.relu(x, name="only_for_shape")))
    out = run_passes(g, ["fold-constants"])
    assert [out.producer(v).op for v in out.outputs] == ["Constant", "Constant", "Shape",
                                                         "Constant"]
    assert "only_for_shape" not in out  # its value was needed for its shape only
    np.testing.assert_array_equal(out.constant_value("sx"), [2, 3, 5])
    np.testing.assert_array_equal(out.constant_value("mid"), [3])
    assert_same_outputs_on(g, out, {"x": np.zeros((2, 3, 5), np.float32),
                                    "n": np.zeros((4, 3), np.float32)})


def test_params_are_trainable_so_they_do_not_fold():
    g = graphc.Graph("p")
    x = g.input("x", (2,))
    w = g.param(np.ones(2, np.float32), name="w")
    g.output(x + ops.neg(w))
    assert str(run_passes(g, ["fold-constants"])) == str(g)


def test_training_mode_dropout_is_random_so_it_does_not_fold():
    g = graphc.Graph("d")
    c = g.constant(np.ones((4, 4), np.float32), name="c")
    ratio = np.array(0.5, np.float32)
    train = ops.dropout(c, ratio, np.array(True), name="train")
    infer = ops.dropout(c, ratio, np.array(False), name="infer")
    g.output(train, infer)
    out = run_passes(g, ["fold-constants"])
    assert out.producer("train").op == "Dropout" and out.producer("infer").op == "Constant"
    assert_same_outputs_on(g, out, {})


def test_a_multi_result_node_folds_into_one_constant_per_result_keeping_names():
    g = graphc.Graph("split")
    x = g.input("x", (2,))
    c = g.constant(np.arange(6, dtype=np.float32), name="c")
    a, b, _ = ops.split(c, axis=0, num_outputs=3, name="s")
    g.output(a, x * b)
    out = run_passes(g, ["fold-constants"])
    assert out.producer("s").op == "Constant" and out.producer("s_1").op == "Constant"
    assert "s_2" not in out and "c" not in out  # unread result and folded-away operand
    assert out.outputs == g.outputs
    assert_same_outputs_on(g, out, {"x": np.array([2, 3], np.float32)})


def test_nodes_nothing_reads_are_left_for_dce():
    g = graphc.Graph("dead")
    x = g.input("x", (2,))
    ops.neg(g.constant(np.ones(2, np.float32)), name="dead")
    g.output(ops.relu(x))
    assert fold_constants(g, PassOptions()).producer("dead").op == "Neg"


@pytest.mark.parametrize("batch", [1, 3])
def test_folding_is_idempotent_on_a_small_cnn(batch):
    rng = np.random.default_rng(batch)
    g = graphc.Graph("cnn")
    x = g.input("x", (batch, 2, 7, 5))
    w = ops.reshape(g.constant(rng.standard_normal(36).astype(np.float32)),
                    np.array([2, 2, 3, 3]))
    scale = ops.sqrt(g.constant(rng.uniform(1, 2, (1, 2, 1, 1)).astype(np.float32)))
    g.output(ops.conv(x, w * scale, None, pads=[1, 1, 1, 1]))
    once = run_passes(g, ["fold-constants"])
    assert once.op_histogram() == {"Constant": 1, "Conv": 1, "Input": 1}
    assert str(run_passes(once, ["fold-constants"])) == str(once)
    assert_same_outputs(g, once, batches=(batch,), seed=rng)
