"""Whole models through ``graphc.compile(target="cpu")`` against the interpreter / ONNX Runtime.

The light models with random weights run against ONNX Runtime; four of them compile for 15-55 s
each (no object-code cache yet), so they are marked ``slow`` (run with ``-m slow``)."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

import graphc

from . import test_light_models as light

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLOW = {"light_densenet121", "light_inception_v1", "light_inception_v2", "light_vgg19"}
PARAMS = [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in light.MODELS]


@pytest.mark.parametrize("name", PARAMS)
def test_light_model_on_the_cpu_matches_onnxruntime(name):
    light.assert_matches_onnxruntime(
        name, lambda graph: graphc.compile(graph, target="cpu", threads=2).run, rtol=5e-3)


@pytest.mark.parametrize("conv", ["im2col", "winograd-f2", "winograd-f4"])
def test_lenet_on_the_cpu_for_each_conv_algorithm_and_batch(conv):
    graph = graphc.import_onnx(os.path.join(ROOT, "examples", "models", "lenet5.onnx"))
    model = graphc.compile(graph, target="cpu", conv=conv, threads=2)
    rng = np.random.default_rng(0)
    for batch in (1, 3):
        x = rng.standard_normal((batch, 1, 28, 28)).astype(np.float32)
        np.testing.assert_allclose(model.run({"x": x})[0], graphc.interpret(graph, {"x": x})[0],
                                   rtol=1e-4, atol=1e-6)


def test_cpu_stages_are_inspectable():
    graph = graphc.import_onnx(os.path.join(ROOT, "examples", "models", "lenet5.onnx"))
    model = graphc.compile(graph, target="cpu", threads=1)
    assert "kernel " in model.emit("kernel", dims={"N": 2})
    assert re.search(r'define void @"?graphc_g\d+_entry"?\(', model.emit("llvm", dims={"N": 2}))
    assert "ret" in model.emit("asm", dims={"N": 2})
    with pytest.raises(graphc.GraphcError, match="cannot emit 'bogus'"):
        model.emit("bogus")
    with pytest.raises(graphc.GraphcError, match="cannot emit 'llvm'"):
        graphc.compile(graph).emit("llvm")
