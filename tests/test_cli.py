"""The graphc command line: inspect, run, --help, and one-line errors with exit status 2."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import graphc
from graphc.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "examples", "models", "lenet5.onnx")
INPUT = os.path.join(ROOT, "examples", "models", "lenet5_input.npy")


def test_shipped_model_is_what_the_example_script_builds():
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    try:
        from make_lenet5 import lenet5
    finally:
        sys.path.pop(0)
    shipped = graphc.import_onnx(MODEL)
    x = np.load(INPUT)
    np.testing.assert_array_equal(graphc.interpret(shipped, {"x": x})[0],
                                  graphc.interpret(lenet5(), {"x": x})[0])


def test_inspect_reports_ops_parameters_and_flops(capsys):
    assert main(["inspect", MODEL]) == 0
    out = capsys.readouterr().out
    assert out.startswith("graph lenet5(%x: f32[N,1,28,28]) {")
    params = sum(numpy_helper.to_array(t).size for t in onnx.load(MODEL).graph.initializer)
    assert f"parameters: {params:,}" in out
    assert re.search(r"^\s+Conv\s+2$", out, re.MULTILINE)
    assert re.search(r"^\s+Gemm\s+3$", out, re.MULTILINE)
    # symbolic batch N: FLOPs per sample; with a static batch of 2 exactly twice as many
    total = int(re.search(r"total FLOPs per unit of N: ([\d,]+)", out).group(1).replace(",", ""))
    conv1 = 2 * 6 * 28 * 28 * 1 * 5 * 5  # 2*K*OH*OW*C*kh*kw per sample
    assert re.search(r"\bConv\s+" + re.escape(f"{conv1 / 1e3:.2f}k"), out)
    assert main(["inspect", MODEL, "--no-ir", "--input-shape", "x=2,1,28,28"]) == 0
    out2 = capsys.readouterr().out
    total2 = int(re.search(r"total FLOPs: ([\d,]+)", out2).group(1).replace(",", ""))
    assert total2 == 2 * total and total > conv1
    assert "graph lenet5" not in out2


def test_run_prints_and_saves_outputs(tmp_path, capsys):
    out_path = tmp_path / "out.npz"
    assert main(["run", MODEL, "--input", f"x={INPUT}", "--output", str(out_path)]) == 0
    printed = capsys.readouterr().out
    graph = graphc.import_onnx(MODEL)
    (want,) = graphc.interpret(graph, {"x": np.load(INPUT)})
    saved = np.load(out_path)
    np.testing.assert_array_equal(saved[graph.outputs[0]], want)
    assert f"{graph.outputs[0]}: float32[2, 10]" in printed


def test_run_with_random_inputs_is_seeded(capsys):
    args = ["run", MODEL, "--input-shape", "x=1,1,28,28", "--random-inputs", "3"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first


@pytest.mark.parametrize("verb", ["inspect", "run"])
def test_help_of_each_verb(verb, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([verb, "--help"])
    assert exit_.value.code == 0
    assert f"usage: graphc {verb}" in capsys.readouterr().out


@pytest.mark.parametrize("args,needle", [
    (["inspect", "missing.onnx"], "missing.onnx"),
    (["run", MODEL], "missing feed for input 'x'"),
    (["run", MODEL, "--input", "x=nothere.npy"], "nothere.npy"),
    (["run", MODEL, "--input", f"y={INPUT}"], "unknown feed 'y'"),
])
def test_user_errors_are_one_line_with_status_2(args, needle, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("graphc: error: ") and needle in err and err.count("\n") == 1


def test_module_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "graphc", "--help"], capture_output=True,
                            text=True, cwd=ROOT, timeout=60, check=False)
    assert result.returncode == 0 and "inspect" in result.stdout and "run" in result.stdout


def test_compile_reports_the_rewrite_and_prints_after_a_pass(capsys):
    args = ["compile", MODEL, "--input-shape", "x=2,1,28,28", "--print-after", "winograd",
            "--conv", "winograd-f2", "--timing"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.count("IR after") == 1 and "// ----- IR after winograd -----" in out
    assert re.search(r"^\s+Conv\s+2 -> 0", out, re.MULTILINE)
    assert "WinogradOutput(" not in out.split("IR after winograd")[0]  # LeNet has 5x5 kernels
    for name in ("canonicalize", "fold-constants", "lower-conv", "fuse-epilogue", "total"):
        assert re.search(rf"^{name}\s+\d+\.\d+", out, re.MULTILINE), name


def test_compile_dump_dir_and_emit_ir(tmp_path, capsys):
    dump = tmp_path / "ir"
    assert main(["compile", MODEL, "--dump-dir", str(dump), "--emit", "ir"]) == 0
    out = capsys.readouterr().out
    files = sorted(os.listdir(dump))
    assert files[0] == "00-input.ir" and files[1] == "01-canonicalize.ir"
    final = (dump / files[-1]).read_text()
    assert final in out
    model = graphc.compile(graphc.import_onnx(MODEL))
    assert str(model.graph) == final
    assert str(graphc.Graph.parse(final, weights=model.graph.constant_arrays())) == final


def test_compile_per_node_override_and_bad_algorithm(capsys):
    conv = next(n.name for n in graphc.import_onnx(MODEL) if n.op == "Conv")
    assert main(["compile", MODEL, "--conv-node", f"{conv}=direct", "--emit", "ir"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"= FusedConv\(%x, ", out) and out.count("= Im2Col(") == 1
    assert main(["compile", MODEL, "--conv-node", "nope=im2col"]) == 2
    assert "not a Conv node" in capsys.readouterr().err


def test_passes_lists_every_pass_with_its_description(capsys):
    from passes import all_passes

    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    for name, info in all_passes().items():
        assert re.search(rf"^{re.escape(name)}\s+{re.escape(info.description)}", out, re.MULTILINE)
    assert "default pipeline for reference: canonicalize," in out
