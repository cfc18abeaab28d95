"""The infer-shapes pass and ``with_input_shapes``: new input types flow to every value."""

from __future__ import annotations

import numpy as np
import pytest

import graphc
from graphc import ops
from graphc.errors import GraphcError, VerificationError
from graphc.types import TensorType
from passes.infer_shapes import with_input_shapes

from .pass_testing import assert_same_outputs, run_passes

WEIGHTS = np.random.default_rng(0)
CONV_W = WEIGHTS.standard_normal((4, 3, 3, 3)).astype(np.float32)
CONV_B = WEIGHTS.standard_normal(4).astype(np.float32)
FC_W = WEIGHTS.standard_normal((4, 5)).astype(np.float32)


def _cnn(shape) -> graphc.Graph:
    """Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm: any batch and image size work."""
    g = graphc.Graph("cnn")
    x = g.input("x", shape)
    y = ops.relu(ops.conv(x, CONV_W, CONV_B, pads=[1, 1, 1, 1], name="conv"))
    g.output(ops.gemm(ops.flatten(ops.global_average_pool(y), axis=1), FC_W, name="fc"))
    return g


@pytest.mark.parametrize("shape", [(1, 3, 32, 32), (3, 3, 7, 5), (None, 3, 9, 11)])
def test_with_input_shapes_reinfers_every_type_and_runs_like_a_fresh_build(shape):
    g = _cnn((None, 3, 8, 8))
    before = str(g)
    new = with_input_shapes(g, {"x": shape})
    assert str(g) == before  # the original is untouched
    assert str(new) == str(_cnn(shape))  # exactly the types a fresh build infers
    graphc.verify(new)
    assert_same_outputs(_cnn(shape), new, batches=(2,), seed=1)


def test_with_input_shapes_names_the_node_whose_rule_fails():
    g = graphc.Graph("r")
    x = g.input("x", (2, 6))
    g.output(ops.reshape(x, np.array([3, 4]), name="to_3x4"))
    with pytest.raises(GraphcError, match="'to_3x4'"):
        with_input_shapes(g, {"x": (5, 6)})


def test_with_input_shapes_rejects_unknown_inputs_and_can_change_the_dtype():
    g = _cnn((None, 3, 8, 8))
    with pytest.raises(GraphcError, match="'y' is not an input"):
        with_input_shapes(g, {"y": (1, 3, 8, 8)})
    with pytest.raises(GraphcError, match="conv"):  # f64 X against the f32 weights
        with_input_shapes(g, {"x": TensorType((1, 3, 8, 8), "f64")})


def test_the_pass_repairs_stale_types_after_an_input_type_changes():
    g = _cnn((None, 3, 8, 8))
    stale = g.copy()
    stale.replace_node("x", types=(TensorType((2, 3, 6, 6)),))
    with pytest.raises(VerificationError):
        graphc.verify(stale)
    fixed = run_passes(stale, ["infer-shapes"])  # verifies the IR
    assert fixed.type_of("conv") == TensorType((2, 4, 6, 6))
    assert str(fixed) == str(_cnn((2, 3, 6, 6)))


def test_the_pass_leaves_a_valid_graph_as_it_is():
    g = _cnn((None, 3, 8, 8))
    once = run_passes(g, ["infer-shapes"])
    assert str(once) == str(g)
    assert str(run_passes(once, ["infer-shapes"])) == str(once)
