"""CudaModel end to end: a LeNet-5 forward pass, symbolic batch specialisation, device-array
inputs and outputs without copies, the emitted source, and the errors a user can cause."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

import graphc
from backends.cuda import CudaUnavailableError, compile_graph, device
from graphc import ops
from graphc.errors import FeedError, GraphcError

from .helpers import random_input

pytestmark = pytest.mark.cuda
EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "examples")


def _lenet():
    sys.path.insert(0, EXAMPLES)
    try:
        from make_lenet5 import lenet5
    finally:
        sys.path.remove(EXAMPLES)
    return lenet5()


def test_lenet5_end_to_end_batch_2():
    g = _lenet()
    model = compile_graph(g)
    x = random_input(np.random.default_rng(0), (2, 1, 28, 28))
    (got,) = model.run({"x": x})
    (want,) = graphc.interpret(g, {"x": x})
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def _small_graph():
    rng = np.random.default_rng(1)
    g = graphc.Graph("small")
    x = g.input("x", (None, 6))
    h = ops.relu(ops.gemm(x, rng.standard_normal((6, 5)).astype(np.float32),
                          rng.standard_normal(5).astype(np.float32)))
    g.output(ops.softmax(h, axis=-1), ops.unsqueeze(h, np.array([0])))  # a view output
    return g


def _compare(got, g, feeds):
    for a, b in zip(got, graphc.interpret(g, feeds)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_symbolic_batch_is_specialised_per_value_and_kept():
    g = _small_graph()
    model = compile_graph(g)
    for batch in (1, 3, 1):
        feeds = {"x": random_input(np.random.default_rng(batch), (batch, 6))}
        _compare(model.run(feeds), g, feeds)
    assert sorted(model._specs) == [(("N", 1),), (("N", 3),)]


def test_device_arrays_in_and_out(cuda_device):
    g = _small_graph()
    model = compile_graph(g)
    x = random_input(np.random.default_rng(2), (4, 6))
    outs = model.run({"x": cuda_device.to_device(x)}, device_outputs=True)
    assert all(device.is_device_array(cuda_device, o) for o in outs)
    _compare([o.copy_to_host() for o in outs], g, {"x": x})


class _Foreign:
    """A device buffer of another library: only ``__cuda_array_interface__`` (on the
    simulator, device memory is host memory, so a numpy array's address stands in)."""

    def __init__(self, host: np.ndarray):
        self.host = host
        self.__cuda_array_interface__ = {"shape": host.shape, "typestr": host.dtype.str,
                                         "data": (host.ctypes.data, False), "strides": None,
                                         "version": 3}


def test_cuda_array_interface_feeds_are_used_without_a_copy(cuda_device):
    if not device.is_simulator(cuda_device):
        pytest.skip("a foreign host address is only device memory on the simulator")
    g = _small_graph()
    x = random_input(np.random.default_rng(3), (2, 6))
    foreign = _Foreign(x)
    wrapped = device.as_device_array(cuda_device, foreign)
    assert np.shares_memory(wrapped._ary, x)
    _compare(compile_graph(g).run({"x": foreign}), g, {"x": x})


def test_emitted_source_shows_grid_stride_kernels_and_the_gemm():
    model = compile_graph(_small_graph())
    source = model.emit("cuda", dims={"N": 2})
    assert "def fmax(a, b)" in source  # the helpers come first
    assert "for i0 in range(start, 2, step):" in source  # the softmax rows: grid-stride
    assert "cuda.shared.array" in source and "cuda.syncthreads()" in source
    assert "kernel softmax" in model.emit("kernel", dims={"N": 2})
    with pytest.raises(GraphcError, match="cannot emit 'asm'"):
        model.emit("asm")


def test_feed_errors_name_the_input(cuda_device):
    model = compile_graph(_small_graph())
    with pytest.raises(FeedError, match="'x'"):
        model.run({"x": np.zeros((2, 7), np.float32)})
    with pytest.raises(FeedError, match="'x'"):
        model.run({"x": cuda_device.to_device(np.zeros((2, 6), np.float64))})
    with pytest.raises(FeedError, match="missing feed"):
        model.run({})


def test_outputs_that_are_inputs_or_constants_are_copies():
    g = graphc.Graph("passthrough")
    x = g.input("x", (3,))
    g.output(x, g.constant(np.arange(3, dtype=np.float32)), x + np.float32(1))
    feeds = {"x": np.ones(3, np.float32)}
    got = compile_graph(g).run(feeds)
    _compare(got, g, feeds)
    assert not np.shares_memory(got[0], feeds["x"])


def test_no_gpu_and_no_simulator_is_a_graphc_error(monkeypatch):
    class NoDevice:
        @staticmethod
        def is_available():
            return False

    monkeypatch.setattr(device, "import_cuda", lambda: NoDevice)
    with pytest.raises(CudaUnavailableError, match="no CUDA GPU.*NUMBA_ENABLE_CUDASIM"):
        compile_graph(_small_graph())
    monkeypatch.setattr(device, "import_cuda", lambda: None)
    with pytest.raises(CudaUnavailableError, match="numba-cuda"):
        compile_graph(_small_graph())
    assert issubclass(CudaUnavailableError, GraphcError)


def test_outputs_into_caller_arrays():
    g = _small_graph()
    model = compile_graph(g)
    feeds = {"x": random_input(np.random.default_rng(5), (2, 6))}
    target = np.empty((2, 5), np.float32)
    got = model.run(feeds, into={"softmax": target})
    assert got[0] is target
    _compare(got, g, feeds)
    with pytest.raises(FeedError, match="into\\['softmax'\\]"):
        model.run(feeds, into={"softmax": np.empty((3, 5), np.float32)})


def test_graphc_compile_target_cuda_runs_the_default_pipeline_and_emits_source():
    g = _lenet()
    model = graphc.compile(g, target="cuda", conv="winograd-f2")
    assert model.pipeline[0] == "canonicalize" and model.target == "cuda"
    x = random_input(np.random.default_rng(3), (3, 1, 28, 28))
    np.testing.assert_allclose(model.run({"x": x})[0], graphc.interpret(g, {"x": x})[0],
                               rtol=1e-4, atol=1e-6)
    assert "@cuda.jit" in model.emit("cuda", dims={"N": 3})


def test_cli_emits_cuda_source(tmp_path, capsys):
    from graphc.cli import main

    path = tmp_path / "lenet.onnx"
    graphc.export_onnx(_lenet(), path)
    assert main(["compile", str(path), "--target", "cuda", "--emit", "cuda"]) == 0
    assert "@cuda.jit" in capsys.readouterr().out


@pytest.mark.parametrize("idx_dtype", [np.int32, np.int64])
def test_gather_with_run_time_indices_and_the_out_of_range_error(idx_dtype):
    g = graphc.Graph("lookup")
    data = g.input("data", (6, 4))
    idx = g.input("idx", (2, 3), dtype="i32" if idx_dtype == np.int32 else "i64")
    g.output(ops.gather(data, idx, axis=0, name="lookup"))
    model = compile_graph(g)
    rng = np.random.default_rng(5)
    feeds = {"data": rng.standard_normal((6, 4)).astype(np.float32),
             "idx": rng.integers(-6, 6, (2, 3)).astype(idx_dtype)}
    np.testing.assert_array_equal(model.run(feeds)[0], graphc.interpret(g, feeds)[0])
    feeds["idx"] = np.array([[0, 7, 1], [-7, 2, 3]], idx_dtype)
    with pytest.raises(FeedError, match=r"Gather node 'lookup': 2 indices .* first is 7"):
        model.run(feeds)
