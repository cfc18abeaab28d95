"""Every example in examples/ runs in --quick mode and its key result holds; ``graphc demo``.

The examples run in-process (``main([...])`` of the file loaded by path): faster than a
subprocess, and the compiled programs of one example are reused by the next where they share
an architecture. ``graphc demo --quick`` runs as a subprocess, as a user would start it. Tiny
models use the interpreter where LLVM compile time would dominate (see each example).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import numpy as np
import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
BOOLEAN_INPUTS = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], np.float32)


def load_example(name: str):
    """The example module examples/<name>.py (its folder on sys.path for sibling imports)."""
    if EXAMPLES not in sys.path:
        sys.path.insert(0, EXAMPLES)
    spec = importlib.util.spec_from_file_location(f"example_{name}",
                                                  os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def check_png(path) -> None:
    if has("matplotlib"):
        assert path and os.path.getsize(path) > 0
    else:
        assert path is None


@pytest.fixture(autouse=True)
def no_progress_bar(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")


# -- the lecture's small networks -----------------------------------------------------------------
def test_perceptron_learns_and_or_but_not_xor(tmp_path):
    summary = load_example("perceptron").main(["--quick", "--out", str(tmp_path)])
    problems = summary["problems"]
    for name, targets in (("AND", [-1, -1, -1, 1]), ("OR", [-1, 1, 1, 1])):
        w0, w1, w2 = problems[name]["weights"]
        # the printed line itself separates the classes
        np.testing.assert_array_equal(np.sign(w0 + BOOLEAN_INPUTS @ [w1, w2]), targets)
        assert problems[name]["accuracy"] == 1.0
    assert problems["XOR"]["best_accuracy"] < 1.0
    assert problems["XOR"]["accuracy"] <= 0.75
    assert problems["XOR"]["best_random_line"] == 0.75  # no line gets all four
    check_png(summary["png"])


def test_xor_mlp_learns_xor(tmp_path):
    summary = load_example("xor_mlp").main(["--quick", "--out", str(tmp_path)])
    assert summary["accuracy"] == 1.0
    np.testing.assert_array_equal(summary["outputs"] > 0.5, [False, True, True, False])
    assert summary["first_perfect_epoch"] is not None
    check_png(summary["png"])


def test_autoencoder_finds_eight_distinct_codes(tmp_path):
    summary = load_example("autoencoder_838").main(["--quick", "--out", str(tmp_path)])
    hidden = summary["hidden"]
    assert hidden.shape == (8, 3)
    assert summary["distinct_codes"] == 8
    assert len({tuple(np.round(h)) for h in hidden}) == 8
    assert summary["reproduced"]
    np.testing.assert_array_equal(np.argmax(summary["outputs"], axis=1), np.arange(8))
    assert summary["max_distance_from_binary"] < 0.4  # nearly binary
    check_png(summary["png"])


# -- image filters, ONNX, Winograd ----------------------------------------------------------------
@pytest.mark.skipif(not has("sklearn"), reason="the photograph ships with scikit-learn")
def test_edge_detection_matches_numpy(tmp_path):
    summary = load_example("edge_detection").main(["--quick", "--out", str(tmp_path)])
    assert set(summary["errors"]) >= {"sobel", "laplace", "gaussian", "canny_magnitude"}
    assert max(summary["errors"].values()) < 1e-4
    assert sum(summary["directions"].values()) == pytest.approx(1.0)
    check_png(summary["png"])


@pytest.mark.skipif(not has("onnxruntime"), reason="compares with ONNX Runtime")
def test_onnx_roundtrip_agrees_with_onnxruntime(tmp_path):
    summary = load_example("onnx_roundtrip").main(["--quick", "--out", str(tmp_path)])
    assert summary["errors"]["onnxruntime"] < 1e-3
    assert summary["errors"]["re-exported"] < 1e-3
    assert os.path.exists(tmp_path / "roundtrip.onnx")


def test_vgg16_winograd_measures_three_algorithms(tmp_path):
    rows = load_example("vgg16_winograd").main(
        ["--quick", "--batches", "1", "--rounds", "1", "--out", str(tmp_path)])
    assert len(rows) == 3
    for (c, k, hw, batch), result in rows:
        assert set(result) == {"im2col", "F(2x2,3x3)", "F(4x4,3x3)"}
        assert all(r["ms"] > 0 and r["gflops"] > 0 for r in result.values())
        assert result["im2col"]["speedup"] == pytest.approx(1.0)


# -- the digits ----------------------------------------------------------------------------------
@pytest.mark.skipif(not has("sklearn"), reason="the digits ship with scikit-learn")
def test_digits_mlp_early_stopping_and_cross_validation(tmp_path):
    summary = load_example("digits_mlp").main(["--quick", "--out", str(tmp_path)])
    assert summary["test_accuracy"] > 0.9
    assert summary["epochs_run"] <= 15
    assert 1 <= summary["best_epoch"] <= summary["epochs_run"]
    assert len(summary["cv_scores"]) == 5
    assert min(summary["cv_scores"]) > 0.85
    for png in summary["pngs"]:
        check_png(png)


@pytest.fixture(scope="module")
def digits_cnn_run(tmp_path_factory):
    if not has("sklearn"):
        pytest.skip("the digits ship with scikit-learn")
    out = tmp_path_factory.mktemp("digits_cnn")
    os.environ["TQDM_DISABLE"] = "1"  # module scope: monkeypatch is function-scoped
    try:
        return load_example("digits_cnn").main(["--quick", "--out", str(out)])
    finally:
        del os.environ["TQDM_DISABLE"]


def test_digits_cnn_accuracy_and_winograd_rewrite(digits_cnn_run):
    summary = digits_cnn_run
    assert summary["accuracy"] > 0.85
    assert summary["interpreter_difference"] < 1e-3
    assert "Winograd" not in summary["ir_before"]
    assert "WinogradFilterTransform" in summary["ir_after_winograd"]
    assert any("WinogradOutput" in line for line in summary["winograd_nodes"])
    assert "WinogradOutput" in summary["ir_optimised"]
    assert os.path.exists(summary["model"])
    check_png(summary["png"])


def test_adversarial_fgsm_flips_the_prediction(digits_cnn_run, tmp_path):
    summary = load_example("adversarial").main(
        ["--model", digits_cnn_run["model"], "--target", "reference", "--out", str(tmp_path)])
    assert summary["flipped"]
    assert summary["adversarial_prediction"] != summary["label"]
    assert 0 < summary["epsilon"] <= 0.6
    attacked = summary["accuracy_under_attack"]
    assert attacked[0.2] < attacked[0.05] <= summary["clean_accuracy"]
    check_png(summary["png"])


# -- graphc demo ----------------------------------------------------------------------------------
def test_graphc_demo_quick_runs_and_reports_accuracy(tmp_path):
    env = {**os.environ, "TQDM_DISABLE": "1"}
    command = [sys.executable, "-m", "graphc.cli", "demo", "--quick", "--out", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    match = re.search(r"test accuracy: ([\d.]+)%", done.stdout)
    assert match, done.stdout[-2000:]
    assert float(match.group(1)) > 80.0
    assert "WinogradOutput" in done.stdout
    assert "numpy interpreter" in done.stdout
    assert (tmp_path / "demo_cnn.onnx").exists()


def test_demo_glyph_digits_are_a_balanced_image_set():
    from graphc.demo import glyph_digits

    X, y = glyph_digits(per_class=20, seed=3)
    assert X.shape == (200, 1, 8, 8) and X.dtype == np.float32
    assert 0.0 <= X.min() and X.max() <= 1.0
    np.testing.assert_array_equal(np.bincount(y), [20] * 10)
    # digits differ: the mean images of two classes are far apart compared with the noise
    means = np.stack([X[y == d].mean(axis=0).ravel() for d in range(10)])
    distances = np.linalg.norm(means[:, None] - means[None], axis=-1)
    assert distances[~np.eye(10, dtype=bool)].min() > 0.5


def test_demo_without_scikit_learn_uses_glyphs_or_says_what_is_missing(monkeypatch):
    from graphc.demo import load_data
    from graphc.errors import GraphcError

    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # import raises ImportError
    X, _, description = load_data("auto")
    assert X.shape[1:] == (1, 8, 8) and "glyph" in description
    assert "scikit-learn not installed" in description
    with pytest.raises(GraphcError, match="--data digits needs scikit-learn"):
        load_data("digits")
