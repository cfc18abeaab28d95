"""The pass manager: pipelines, verification, purity, printing, dumps, timing, errors."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest

import graphc
from graphc import ops
from passes import PassError, PassManager, PassOptions, parse_pipeline, register_pass


@register_pass("test-relu-to-sigmoid")
def relu_to_sigmoid(graph, options):
    """Replace every Relu by a Sigmoid (a test pass)."""
    g = graph.copy()
    for node in g.nodes():
        if node.op == "Relu":
            new = g.add_node("Sigmoid", node.inputs)[0]
            g.replace_uses(node.output, new)
            g.remove_node(node.name)
    return g


@register_pass("test-needs-sigmoid", requires=("test-relu-to-sigmoid",))
def needs_sigmoid(graph, options):
    """Return the graph unchanged (a test pass that requires another)."""
    return graph


@register_pass("test-mutates-input")
def mutates_input(graph, options):
    """Rename an output in place (a broken test pass)."""
    graph.outputs = list(reversed(graph.outputs))
    return graph


@register_pass("test-stale-type")
def stale_type(graph, options):
    """Store a wrong type (a broken test pass)."""
    g = graph.copy()
    node = next(n for n in g.nodes() if n.op == "Sigmoid")
    g.replace_node(node.name, types=(graphc.TensorType((1,)),))
    return g


@register_pass("test-raises")
def raises(graph, options):
    """Fail with a plain Python error (a broken test pass)."""
    return {}["missing"]


def _graph():
    g = graphc.Graph("t")
    x = g.input("x", (None, 4))
    g.output(ops.relu(x), ops.neg(x))
    return g


def test_pipeline_from_string_and_list():
    assert parse_pipeline(" test-relu-to-sigmoid, test-needs-sigmoid ") == [
        "test-relu-to-sigmoid", "test-needs-sigmoid"]
    with pytest.raises(PassError, match="unknown pass 'nope'.*test-relu-to-sigmoid"):
        parse_pipeline("nope")
    with pytest.raises(PassError, match="requires 'test-relu-to-sigmoid' earlier"):
        parse_pipeline(["test-needs-sigmoid", "test-relu-to-sigmoid"])


def test_run_rewrites_a_copy_and_records_timing():
    g = _graph()
    before = str(g)
    pm = PassManager("test-relu-to-sigmoid,test-needs-sigmoid")
    out = pm.run(g)
    assert str(g) == before
    assert out.op_histogram().get("Sigmoid") == 1 and "Relu" not in out.op_histogram()
    assert [t.name for t in pm.timings] == ["test-relu-to-sigmoid", "test-needs-sigmoid"]
    assert all(t.seconds >= 0 for t in pm.timings)
    assert "test-relu-to-sigmoid" in pm.timing_report() and "total" in pm.timing_report()


def test_print_after_and_print_after_all():
    buf = io.StringIO()
    PassManager("test-relu-to-sigmoid,test-needs-sigmoid", print_after=["test-needs-sigmoid"],
                out=buf).run(_graph())
    text = buf.getvalue()
    assert text.count("IR after") == 1 and "IR after test-needs-sigmoid" in text
    assert "= Sigmoid(%x)" in text
    buf = io.StringIO()
    PassManager("test-relu-to-sigmoid,test-needs-sigmoid", print_after_all=True, out=buf).run(
        _graph())
    assert buf.getvalue().count("IR after") == 2


def test_dump_dir_writes_numbered_files_that_parse(tmp_path):
    g = _graph()
    out = PassManager("test-relu-to-sigmoid,test-needs-sigmoid", dump_dir=tmp_path).run(g)
    assert sorted(os.listdir(tmp_path)) == ["00-input.ir", "01-test-relu-to-sigmoid.ir",
                                            "02-test-needs-sigmoid.ir"]
    assert (tmp_path / "00-input.ir").read_text() == str(g)
    assert (tmp_path / "02-test-needs-sigmoid.ir").read_text() == str(out)
    graphc.Graph.parse((tmp_path / "01-test-relu-to-sigmoid.ir").read_text())


@pytest.mark.parametrize("pipeline,needle", [
    ("test-relu-to-sigmoid,test-raises",
     r"in pass 'test-raises' \(after test-relu-to-sigmoid\).*KeyError"),
    ("test-relu-to-sigmoid,test-stale-type", "in pass 'test-stale-type'.*stored as"),
    ("test-mutates-input", "mutated its input"),
])
def test_failures_name_the_pass_and_the_passes_before(pipeline, needle):
    with pytest.raises(PassError, match=needle):
        PassManager(pipeline).run(_graph())


def test_pass_options_validate_conv_algorithms():
    with pytest.raises(graphc.GraphcError, match="winograd-f8"):
        PassOptions(conv="winograd-f8")
    with pytest.raises(graphc.GraphcError, match="bogus"):
        PassOptions(conv_per_node={"c": "bogus"})
    assert PassOptions(conv="im2col", conv_per_node={"a": "direct"}).conv_algorithm("a") == "direct"


def test_compile_api_checks_target_and_overrides():
    g = _graph()
    with pytest.raises(graphc.GraphcError, match="unknown target 'tpu'"):
        graphc.compile(g, target="tpu")
    with pytest.raises(graphc.GraphcError, match="not a Conv node"):
        graphc.compile(g, conv={"relu": "im2col"})
    model = graphc.compile(g, passes="test-relu-to-sigmoid")
    x = np.linspace(-2, 2, 8, dtype=np.float32).reshape(2, 4)
    y, _ = model(x=x)
    np.testing.assert_allclose(y, 1 / (1 + np.exp(-x)), rtol=1e-6)
    assert model.graph.op_histogram()["Sigmoid"] == 1 and "reference" in repr(model)


def test_to_dot_has_every_op_and_dataflow_edge():
    g = _graph()
    dot = g.to_dot()
    assert dot.startswith('digraph "t" {') and dot.rstrip().endswith("}")
    for node in g.nodes():
        assert f'"{node.name}"' in dot
    assert '"x" -> "relu"' in dot and '"x" -> "neg"' in dot


def test_render_needs_graphviz_and_says_so(monkeypatch, tmp_path):
    import shutil

    from graphc import dot

    g = _graph()
    if shutil.which("dot"):
        dot.render(g, str(tmp_path / "g.svg"))
        assert (tmp_path / "g.svg").read_text().lstrip().startswith(("<?xml", "<svg"))
    monkeypatch.setattr(dot.shutil, "which", lambda name: None)
    with pytest.raises(graphc.GraphcError, match="graphviz"):
        dot.render(g, str(tmp_path / "g.svg"))
