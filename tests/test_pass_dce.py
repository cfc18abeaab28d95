"""The dce pass: nodes that reach no graph output go; graph inputs and used results stay."""

from __future__ import annotations

import numpy as np

import graphc
from graphc import ops
from passes import PassOptions
from passes.dce import dce, remove_dead

from .pass_testing import assert_same_outputs, run_passes

TEXT = """
graph t(%x: f32[2,3], %unused: f32[4]) {
  %a = Relu(%x) : f32[2,3]
  %dead1 = Neg(%x) : f32[2,3]
  %k = Constant() {value=tensor<f32[3]> [1.0, 2.0, 3.0]} : f32[3]
  %dead2 = Mul(%dead1, %k) : f32[2,3]
  %p, %q = Split(%a) {axis=0, num_outputs=2} : f32[1,3], f32[1,3]
  return %p
}
"""


def test_dead_nodes_go_inputs_and_partly_used_nodes_stay():
    g = graphc.Graph.parse(TEXT)
    out = run_passes(g, ["dce"])
    assert [n.op for n in out.nodes()] == ["Input", "Input", "Relu", "Split"]
    assert out.inputs == ["x", "unused"] and out.outputs == ["p"]
    assert_same_outputs(g, out, batches=(1,))


def test_dce_is_idempotent_and_keeps_a_live_graph_as_is():
    out = run_passes(graphc.Graph.parse(TEXT), ["dce"])
    assert str(run_passes(out, ["dce"])) == str(out)


def test_a_dead_chain_of_many_nodes_goes_in_one_run():
    g = graphc.Graph("chain")
    x = g.input("x", (None, 4))
    y = x
    for _ in range(300):  # long enough that a quadratic walk would show
        y = ops.relu(y + np.ones(4, np.float32))
    g.output(ops.neg(x))
    out = dce(g, PassOptions())
    assert out.op_histogram() == {"Input": 1, "Neg": 1}


def test_remove_dead_drops_only_what_a_rewrite_orphaned():
    g = graphc.Graph.parse(TEXT)
    g2 = g.copy()
    # make Relu's reader read x instead: Relu is orphaned, the pre-existing dead nodes are not
    g2.replace_node("p", inputs=("x",))
    remove_dead(g2, ["a"])
    assert "a" not in g2 and "dead2" in g2 and "dead1" in g2
