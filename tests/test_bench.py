"""The benchmark harness (graphc.bench), the PyTorch eager translation and ``graphc bench``.

The translation is checked against the interpreter on random inputs (several shapes, batch 1
and >1) op by op and on whole networks; the harness on tiny graphs with 2 rounds, checking only
that its rows are consistent with themselves, never a timing.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import graphc
from graphc import bench, ops
from graphc.cli import main as cli_main

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples", "models")
FAST = {"rounds": 2, "warmup": 1, "min_sample_s": 0.0, "settle_s": 0.0, "threads": 1}


def _feeds(graph, seed=0):
    return bench.random_feeds(graph, seed)


def _assert_matches_interpreter(graph, seed=0):
    from graphc.torch_eager import to_torch

    feeds = _feeds(graph, seed)
    want = graphc.interpret(graph, feeds)
    got = to_torch(graph)(feeds)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_allclose(g, w, rtol=2e-4, atol=1e-5)


def _he(rng, *shape):
    return (rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))).astype(np.float32)


def small_cnn(batch, hw=13, pads=(1, 1, 1, 1), group=1, dilations=(1, 1), ceil_mode=0):
    rng = np.random.default_rng(batch + hw)
    g = graphc.Graph("cnn")
    x = g.input("x", (batch, 4, hw, hw))
    h = ops.conv(x, _he(rng, 8, 4 // group, 3, 3), rng.standard_normal(8).astype(np.float32),
                 pads=list(pads), group=group, dilations=list(dilations))
    h = ops.batch_normalization(h, rng.uniform(0.5, 1.5, 8), rng.standard_normal(8),
                                rng.standard_normal(8), rng.uniform(0.5, 1.5, 8))
    h = ops.leaky_relu(h, alpha=0.1)
    h = ops.max_pool(h, kernel_shape=[3, 3], strides=[2, 2], pads=[1, 0, 1, 0],
                     ceil_mode=ceil_mode)
    h = ops.average_pool(h, kernel_shape=[2, 2], pads=[0, 0, 1, 1], count_include_pad=1)
    h = ops.lrn(h, size=4, alpha=1e-2, beta=0.75, bias=1.5)
    h = ops.flatten(ops.global_average_pool(h), axis=1)
    g.output(ops.softmax(ops.gemm(h, _he(rng, 5, 8), np.ones(5, np.float32), transB=1,
                                  alpha=0.5, beta=2.0)))
    return g


def mlp(batch, width=37):
    rng = np.random.default_rng(batch)
    g = graphc.Graph("mlp")
    h = g.input("x", (batch, 20))
    h = ops.tanh(ops.gemm(h, _he(rng, 20, width), np.zeros(width, np.float32)))
    h = ops.sigmoid(ops.matmul(h, _he(rng, width, width)))
    h = ops.clip(h, np.float32(0.1), np.float32(0.8))
    g.output(ops.gemm(h, _he(rng, 3, width), None, transB=1))
    return g


def residual_block(batch, hw=9):
    rng = np.random.default_rng(hw)
    g = graphc.Graph("block")
    x = g.input("x", (batch, 6, hw, hw))

    def conv_bn(h):
        h = ops.conv(h, _he(rng, 6, 6, 3, 3), None, pads=[1, 1, 1, 1])
        return ops.batch_normalization(h, rng.uniform(0.5, 1.5, 6), rng.standard_normal(6),
                                       rng.standard_normal(6), rng.uniform(0.5, 1.5, 6))

    g.output(ops.relu(conv_bn(ops.relu(conv_bn(x))) + x))
    return g


def shape_ops(batch):
    """Reshape, Transpose, Concat, Split, Slice (negative step), Pad, Squeeze/Unsqueeze,
    Dropout, Identity, Sub/Mul/Div and a constant."""
    g = graphc.Graph("shapes")
    x = g.input("x", (batch, 6, 5))
    a, b = ops.split(x, np.array([2, 4]), axis=1)
    t = ops.transpose(b, perm=[0, 2, 1])
    s = ops.slice(t, np.array([4, 3]), np.array([-6, 0]), np.array([1, 2]),
                  np.array([-2, -1]))
    p = ops.pad(a, np.array([0, 1, 0, 0, 0, 2]), np.float32(0.5))
    e = ops.pad(a, np.array([0, 0, 2, 0, 0, -1]), mode="edge")
    r = ops.pad(a, np.array([0, 0, 1, 0, 0, 2]), mode="reflect")
    q = ops.squeeze(ops.unsqueeze(p, np.array([1])), np.array([1]))
    c = ops.concat(ops.flatten(q, axis=1), ops.reshape(s, np.array([batch, -1])),
                   ops.flatten(e, axis=1), ops.flatten(r, axis=1), axis=1)
    d = ops.dropout(ops.identity(c))
    g.output((d - np.float32(0.25)) * np.float32(3.0) / (ops.abs(d) + np.float32(1.0)))
    return g


torch_cases = [
    ("cnn b1", lambda: small_cnn(1)),
    ("cnn b3 odd", lambda: small_cnn(3, hw=11)),
    ("cnn asymmetric pads", lambda: small_cnn(2, hw=10, pads=(0, 1, 2, 1))),
    ("cnn groups dilations ceil", lambda: small_cnn(2, hw=15, group=2, dilations=(2, 1),
                                                    ceil_mode=1)),
    ("mlp b1", lambda: mlp(1)),
    ("mlp b5", lambda: mlp(5)),
    ("residual b1", lambda: residual_block(1)),
    ("residual b2", lambda: residual_block(2, hw=7)),
    ("shape ops b1", lambda: shape_ops(1)),
    ("shape ops b3", lambda: shape_ops(3)),
]


@pytest.mark.parametrize("build", [b for _, b in torch_cases], ids=[n for n, _ in torch_cases])
def test_torch_translation_matches_interpreter(build):
    pytest.importorskip("torch")
    _assert_matches_interpreter(build())


def test_torch_translation_of_pools_with_auto_pad_and_dilation():
    pytest.importorskip("torch")
    g = graphc.Graph("pools")
    x = g.input("x", (2, 3, 12, 9))
    m = ops.max_pool(x, kernel_shape=[3, 2], strides=[2, 2], auto_pad="SAME_UPPER")
    d = ops.max_pool(x, kernel_shape=[2, 2], dilations=[2, 2], pads=[2, 1, 2, 1], ceil_mode=1)
    a = ops.average_pool(x, kernel_shape=[3, 3], strides=[2, 2], pads=[1, 0, 0, 2],
                         ceil_mode=1)
    g.output(ops.flatten(m, axis=1))
    g.output(ops.flatten(d, axis=1))
    g.output(ops.flatten(a, axis=1))
    _assert_matches_interpreter(g)


@pytest.mark.parametrize("name", ["light_bvlc_alexnet", "light_squeezenet",
                                  "light_inception_v1", "light_shufflenet"])
def test_torch_translation_of_light_onnx_models(name):
    pytest.importorskip("torch")
    from tests.test_light_models import _load, with_random_weights

    _assert_matches_interpreter(graphc.import_onnx(with_random_weights(_load(name))))


def test_untranslatable_op_names_op_and_node():
    pytest.importorskip("torch")
    from graphc.torch_eager import TorchTranslationError, to_torch

    g = graphc.Graph("t")
    x = g.input("x", (1, 2, 4, 4))
    g.output(ops.conv_transpose(x, np.ones((2, 2, 3, 3), np.float32), name="upsample"))
    with pytest.raises(TorchTranslationError, match="ConvTranspose node 'upsample'"):
        to_torch(g)
    assert issubclass(TorchTranslationError, graphc.GraphcError)


# -- harness --------------------------------------------------------------------------------------
def _rows_by_runner(rows):
    return {r.runner: r for r in rows}


def test_rows_are_internally_consistent():
    g = mlp(3)
    rows = bench.bench_graph(g, runners=bench.DEFAULT_RUNNERS, case="tiny", **FAST)
    by = _rows_by_runner(rows)
    flops = bench.total_flops(g)
    graphc_row = by["graphc"]
    assert graphc_row.status == bench.OK and graphc_row.ratio == pytest.approx(1.0)
    for row in rows:
        assert row.case == "tiny" and row.flops == flops and row.threads == 1
        if row.status != bench.OK:
            assert row.status == bench.NOT_INSTALLED, row.detail
            continue
        assert len(row.samples_ms) == 2
        assert row.median_ms == pytest.approx(float(np.median(row.samples_ms)))
        assert row.ratio == pytest.approx(graphc_row.median_ms / row.median_ms)
        assert row.gflops == pytest.approx(flops / (row.median_ms * 1e-3) / 1e9)
        assert row.max_abs_error <= 1e-3
    table = bench.format_markdown(rows)
    assert table.count("\n") == len(rows) + 1 and "ONNX Runtime" in table


def test_disagreeing_runner_is_reported_and_not_timed():
    g = mlp(2)
    feeds = _feeds(g, 1)
    right = graphc.interpret(g, feeds)

    def wrong(f):
        return [right[0] + np.float32(0.01)]

    rows = bench.bench_graph(g, feeds, runners=("graphc",), **FAST,
                             extra_runners={"off-by-0.01": wrong, "exact": lambda f: right})
    by = _rows_by_runner(rows)
    assert by["off-by-0.01"].status == bench.DISAGREES
    assert by["off-by-0.01"].median_ms is None and by["off-by-0.01"].samples_ms == []
    assert "differ from the interpreter" in by["off-by-0.01"].detail
    assert by["exact"].status == bench.OK and by["exact"].median_ms is not None
    assert bench.problems(rows) == [by["off-by-0.01"]]
    assert "DISAGREES" in bench.format_markdown(rows)
    assert "disagrees" in bench.format_summary(rows)


def test_failing_runner_is_reported():
    def broken(feeds):
        raise RuntimeError("kaboom")

    rows = bench.bench_graph(mlp(1), runners=(), extra_runners={"broken": broken}, **FAST)
    assert rows[0].status == bench.FAILED and "kaboom" in rows[0].detail


def test_symbolic_batch_is_specialised_to_the_feeds():
    g = graphc.Graph("sym")
    x = g.input("x", (None, 8))
    g.output(ops.relu(ops.gemm(x, np.ones((8, 4), np.float32), None)))
    feeds = {"x": np.ones((6, 8), np.float32)}
    (row,) = bench.bench_graph(g, feeds, runners=("graphc",), **FAST)
    assert row.status == bench.OK and row.flops == bench.total_flops(
        bench._specialise(g, feeds)) > bench.total_flops(g)


def test_bad_harness_arguments_are_graphc_errors():
    with pytest.raises(graphc.GraphcError, match="unknown runner 'tvm'"):
        bench.bench_graph(mlp(1), runners=("tvm",))
    with pytest.raises(graphc.GraphcError, match="rounds"):
        bench.bench_graph(mlp(1), rounds=0)


# -- the command line -----------------------------------------------------------------------------
def test_cli_bench_lenet5(tmp_path, capsys):
    out = tmp_path / "rows.json"
    status = cli_main(["bench", os.path.join(EXAMPLES, "lenet5.onnx"), "--rounds", "2",
                       "--warmup", "1", "--threads", "1", "--json", str(out)])
    text = capsys.readouterr().out
    assert status == 0, text
    assert "| lenet5 | auto | graphc |" in text and "graphc compile:" in text
    for label in ("ONNX Runtime", "PyTorch"):
        assert f"| lenet5 | auto | {label} |" in text
    rows = json.loads(out.read_text())
    assert [r["runner"] for r in rows] == ["graphc", "onnxruntime", "pytorch"]


def test_cli_bench_without_optional_runners_and_with_batch(capsys):
    status = cli_main(["bench", os.path.join(EXAMPLES, "lenet5.onnx"), "--rounds", "1",
                       "--warmup", "0", "--threads", "1", "--batch", "2", "--no-torch",
                       "--no-ort", "--conv", "im2col", "--reference"])
    text = capsys.readouterr().out
    assert status == 0 and "PyTorch" not in text and "ONNX Runtime" not in text
    assert "| lenet5 | im2col | graphc reference |" in text


def test_cli_bench_rejects_batch_with_input_shape(capsys):
    status = cli_main(["bench", os.path.join(EXAMPLES, "lenet5.onnx"), "--batch", "2",
                       "--input-shape", "x=1,1,28,28"])
    assert status == 2 and "not both" in capsys.readouterr().err


def test_missing_optional_runtimes_are_rows_not_errors(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    rows = bench.bench_graph(mlp(1), **FAST)
    by = _rows_by_runner(rows)
    assert by["graphc"].status == bench.OK
    assert by["pytorch"].status == by["onnxruntime"].status == bench.NOT_INSTALLED
    assert "not installed" in bench.format_summary(rows)
