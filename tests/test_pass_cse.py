"""The cse pass: equal expressions and identical Constants are computed once (the first stays)."""

from __future__ import annotations

import numpy as np

import graphc
from graphc import ops

from .pass_testing import assert_same_outputs, assert_same_outputs_on, run_passes

# merging never changes a value: every check is bit for bit


def test_duplicate_nodes_merge_into_the_first_and_merges_cascade():
    g = graphc.Graph.parse("""
    graph t(%x: f32[N,3]) {
      %a = Relu(%x) : f32[N,3]
      %b = Relu(%x) : f32[N,3]
      %sa = Sigmoid(%a) : f32[N,3]
      %sb = Sigmoid(%b) : f32[N,3]
      %s = Add(%sa, %sb) : f32[N,3]
      return %s
    }""")
    out = run_passes(g, ["cse"])
    assert str(out) == str(graphc.Graph.parse("""
    graph t(%x: f32[N,3]) {
      %a = Relu(%x) : f32[N,3]
      %sa = Sigmoid(%a) : f32[N,3]
      %s = Add(%sa, %sa) : f32[N,3]
      return %s
    }"""))
    assert str(run_passes(out, ["cse"])) == str(out)
    assert_same_outputs(g, out, seed=np.random.default_rng(0))


def test_constants_merge_only_when_dtype_shape_and_bytes_agree():
    g = graphc.Graph("c")
    x = g.input("x", (2,))
    arrays = {"a": np.array([1.0, 2.0], np.float32),
              "same_as_a": np.array([1.0, 2.0], np.float32),
              "f64": np.array([1.0, 2.0], np.float64),
              "column": np.array([[1.0], [2.0]], np.float32),
              "zero": np.array([0.0, np.nan], np.float32),
              "minus_zero": np.array([-0.0, np.nan], np.float32),  # -0.0 == 0.0, other bytes
              "nan_copy": np.array([0.0, np.nan], np.float32)}       # the same NaN bits
    consts = {name: g.constant(a, name=name) for name, a in arrays.items()}
    g.output(*(ops.identity(c, name=f"id_{n}") for n, c in consts.items()), ops.relu(x))
    out = run_passes(g, ["cse"])
    readers = {n: out.producer(f"id_{n}").inputs[0] for n in arrays}
    assert readers == {"a": "a", "same_as_a": "a", "f64": "f64", "column": "column",
                       "zero": "zero", "minus_zero": "minus_zero", "nan_copy": "zero"}
    assert "same_as_a" not in out and "nan_copy" not in out
    assert_same_outputs_on(g, out, {"x": np.ones(2, np.float32)})


def test_large_equal_weights_merge_and_distinct_ones_of_one_shape_do_not():
    rng = np.random.default_rng(0)
    w1, w2 = (rng.standard_normal((8, 4, 3, 3)).astype(np.float32) for _ in range(2))
    g = graphc.Graph("w")
    x = g.input("x", (1, 4, 5, 5))
    convs = [ops.conv(x, w, None, pads=[1, 1, 1, 1]) for w in (w1, w2, w1.copy())]
    g.output(*convs)
    out = run_passes(g, ["cse"])
    assert out.op_histogram() == {"Constant": 2, "Conv": 2, "Identity": 1, "Input": 1}
    assert_same_outputs(g, out, batches=(1,), seed=rng)


def test_attributes_compare_with_defaults_filled_in_and_arrays_by_value():
    g = graphc.Graph("attrs")
    x = g.input("x", (2, 3, 4))
    shape = g.constant(np.array([2, 3]), name="shape")
    f1 = ops.flatten(x, name="f1")
    f2 = ops.flatten(x, axis=1, name="f2")        # the default, spelled out
    f3 = ops.flatten(x, axis=2, name="f3")
    c1 = ops.constant_of_shape(shape, value=np.array([7.0], np.float32), name="c1")
    c2 = ops.constant_of_shape(shape, value=np.array([7.0], np.float32), name="c2")
    c3 = ops.constant_of_shape(shape, value=np.array([8.0], np.float32), name="c3")
    g.output(ops.concat(f1, f2, axis=0), f3, ops.concat(c1, c2, c3, axis=0))
    out = run_passes(g, ["cse"])
    assert "f2" not in out and "f3" in out and "c2" not in out and "c3" in out
    assert_same_outputs_on(g, out, {"x": np.arange(24, dtype=np.float32).reshape(2, 3, 4)})


def test_commutative_ops_merge_in_either_operand_order_others_do_not():
    g = graphc.Graph.parse("""
    graph t(%x: f32[3], %y: f32[3]) {
      %a1 = Add(%x, %y) : f32[3]
      %a2 = Add(%y, %x) : f32[3]
      %m1 = Max(%x, %y) : f32[3]
      %m2 = Max(%y, %x) : f32[3]
      %s1 = Sub(%x, %y) : f32[3]
      %s2 = Sub(%y, %x) : f32[3]
      %u1 = Sum(%a1, %a2, %m1) : f32[3]
      %u2 = Sum(%m2, %s1, %s2) : f32[3]
      return %u1, %u2
    }""")
    out = run_passes(g, ["cse"])
    assert "a2" not in out and "m2" not in out and "s1" in out and "s2" in out
    assert_same_outputs(g, out, batches=(1,), seed=1)


def test_params_and_random_dropouts_are_never_merged():
    g = graphc.Graph("keep")
    x = g.input("x", (4,))
    mode = g.input("training", (), dtype="bool")
    p1 = g.param(np.ones(4, np.float32), name="p1")
    p2 = g.param(np.ones(4, np.float32), name="p2")
    ratio = g.constant(np.array(0.5, np.float32), name="ratio")
    d1 = ops.dropout(x, ratio, mode, name="d1")
    d2 = ops.dropout(x, ratio, mode, name="d2")
    g.output(d1 * p1, d2 * p2)
    out = run_passes(g, ["cse"])
    assert str(out) == str(g)


def test_duplicates_that_are_graph_outputs_keep_their_names_as_identities():
    g = graphc.Graph("outs")
    x = g.input("x", (3,))
    g.output(ops.relu(x, name="first"), ops.relu(x, name="second"), ops.relu(x, name="third"))
    out = run_passes(g, ["cse"])
    assert out.outputs == ["first", "second", "third"]
    assert [out.producer(v).op for v in out.outputs] == ["Relu", "Identity", "Identity"]
    assert out.producer("third").inputs == ("first",)
    assert str(run_passes(out, ["cse"])) == str(out)
    assert_same_outputs_on(g, out, {"x": np.array([-1, 0, 2], np.float32)})


def test_window_defaults_spelt_out_or_left_out_merge():
    """Conv lowering writes Im2Col {dilations=[1, 1], strides=[1, 1]}, the weight-gradient
    rule leaves them out: the same expression. Explicit non-default values still differ."""
    g = graphc.Graph.parse("""
    graph t(%x: f32[N,2,5,5]) {
      %a = Im2Col(%x) {kernel_shape=[3, 3], pads=[1, 1, 1, 1]} : f32[N,1,18,25]
      %b = Im2Col(%x) {SPELT_OUT} : f32[N,1,18,25]
      %c = Im2Col(%x) {kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2]} : f32[N,1,18,9]
      %d = Im2Col(%x) {kernel_shape=[3, 3]} : f32[N,1,18,9]
      %e = Im2Col(%x) {kernel_shape=[3, 3], pads=[0, 0, 0, 0]} : f32[N,1,18,9]
      %p = MaxPool(%x) {kernel_shape=[2, 2]} : f32[N,2,4,4]
      %q = MaxPool(%x) {kernel_shape=[2, 2], strides=[1, 1], dilations=[1, 1]} : f32[N,2,4,4]
      %t = Transpose(%x) : f32[5,5,2,N]
      %u = Transpose(%x) {perm=[3, 2, 1, 0]} : f32[5,5,2,N]
      return %a, %b, %c, %d, %e, %p, %q, %t, %u
    }""".replace("SPELT_OUT", "dilations=[1, 1], group=1, kernel_shape=[3, 3], "
                              "pads=[1, 1, 1, 1], strides=[1, 1]"))
    out = run_passes(g, ["cse"])
    kept = {n.op: set() for n in out.nodes()}
    for node in out.nodes():
        kept[node.op].add(node.name)
    assert kept["Im2Col"] == {"a", "c", "d"}
    assert kept["MaxPool"] == {"p"} and kept["Transpose"] == {"t"}
    rng = np.random.default_rng(0)
    for batch in (1, 3):
        x = rng.standard_normal((batch, 2, 5, 5)).astype(np.float32)
        assert_same_outputs_on(g, out, {"x": x})


def test_conv_pads_from_auto_pad_are_not_filled_in():
    """With auto_pad the pads derive from it: no pads default is filled in, so a Conv with
    auto_pad=SAME_UPPER never merges with one spelling pads=[0, 0, 0, 0]."""
    rng = np.random.default_rng(1)
    g = graphc.Graph("auto_pad")
    x = g.input("x", (None, 2, 6, 6))
    w = rng.standard_normal((3, 2, 2, 2)).astype(np.float32)
    same = ops.conv(x, w, auto_pad="SAME_UPPER", name="same")
    valid = ops.conv(x, w, pads=[0, 0, 0, 0], auto_pad="SAME_UPPER", name="valid")
    g.output(same, valid)
    out = run_passes(g, ["cse"])
    assert {n.name for n in out.nodes() if n.op == "Conv"} == {"same", "valid"}
