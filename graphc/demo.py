"""``graphc demo``: a one-minute tour of graphc on built-in defaults.

The tour trains a small LeNet-style CNN on 8x8 digit images and walks it through the library:

1. data: scikit-learn's digits when it is installed, else ``glyph_digits`` -- digits drawn from
   a 5x7 pixel font embedded here, shifted, dimmed and noised -- so that the demo needs nothing
   beyond graphc's own dependencies;
2. the model (``graphc.nn.Sequential``) and its training (``fit`` on target "cpu": one compiled
   step graph with forward, loss, backward and SGD update; a tqdm progress bar when tqdm is
   installed);
3. the compiler: the inference graph (weights frozen to constants) before and after the default
   pipeline, with the Winograd F(4x4, 3x3) rewrite of the second convolution;
4. the test accuracy of the compiled model, checked against the reference interpreter;
5. speed: the compiled model against the numpy interpreter and, when installed, ONNX Runtime,
   with ``graphc.bench``'s harness (same threads, interleaved rounds, medians);
6. export to ONNX (``onnx.checker``-valid; run in ONNX Runtime when installed).

Optional packages that are missing (scikit-learn, tqdm, onnxruntime) skip their part with a
note; nothing else changes. ``run(argv)`` returns a summary dict; the CLI verb prints the tour.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from .errors import GraphcError

DEFAULT_OUT = "graphc-demo"
# 5x7 pixel font for the fallback data set (1 = ink), rows top to bottom
GLYPHS = {
    0: ("01110", "10001", "10011", "10101", "11001", "10001", "01110"),
    1: ("00100", "01100", "00100", "00100", "00100", "00100", "01110"),
    2: ("01110", "10001", "00001", "00010", "00100", "01000", "11111"),
    3: ("11111", "00010", "00100", "00010", "00001", "10001", "01110"),
    4: ("00010", "00110", "01010", "10010", "11111", "00010", "00010"),
    5: ("11111", "10000", "11110", "00001", "00001", "10001", "01110"),
    6: ("00110", "01000", "10000", "11110", "10001", "10001", "01110"),
    7: ("11111", "00001", "00010", "00100", "01000", "01000", "01000"),
    8: ("01110", "10001", "10001", "01110", "10001", "10001", "01110"),
    9: ("01110", "10001", "10001", "01111", "00001", "00010", "01100"),
}
BATCH_SIZE = 64
BENCH_BATCH = 64


# -- data ---------------------------------------------------------------------------------------
def glyph_digits(per_class: int = 180, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic 8x8 digits: each 5x7 glyph at a random offset, with random ink strength,
    blurred edges (a 2x2 box filter half the time) and Gaussian noise; values in [0, 1]."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for digit, rows in GLYPHS.items():
        glyph = np.array([[int(c) for c in row] for row in rows], np.float32)
        for _ in range(per_class):
            canvas = np.zeros((8, 8), np.float32)
            top, left = rng.integers(0, 2), rng.integers(0, 4)
            canvas[top:top + 7, left:left + 5] = glyph * rng.uniform(0.6, 1.0)
            if rng.random() < 0.5:
                padded = np.pad(canvas, ((0, 1), (0, 1)))
                canvas = (padded[:-1, :-1] + padded[1:, :-1] + padded[:-1, 1:]
                          + padded[1:, 1:]) / 2.0
            canvas += rng.normal(0.0, 0.15, canvas.shape)
            images.append(np.clip(canvas, 0.0, 1.0))
            labels.append(digit)
    return np.stack(images)[:, None].astype(np.float32), np.array(labels)


def load_data(choice: str) -> tuple[np.ndarray, np.ndarray, str]:
    """(images [n, 1, 8, 8] in [0, 1], labels, description)."""
    if choice in ("auto", "digits"):
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            if choice == "digits":
                raise GraphcError("--data digits needs scikit-learn (pip install "
                                  "scikit-learn); --data glyphs needs nothing") from None
        else:
            digits = load_digits()
            X = (digits.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
            return X, digits.target, "scikit-learn digits (1,797 handwritten 8x8 images)"
    X, y = glyph_digits()
    note = " (scikit-learn not installed)" if choice == "auto" else ""
    return X, y, f"glyph digits (a 5x7 font, shifted and noised, {len(X)} images){note}"


def split(X, y, test_fraction: float = 0.2, seed: int = 0):
    order = np.random.default_rng(seed).permutation(len(X))
    n_test = round(len(X) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return X[train], X[test], y[train], y[test]


# -- the tour -----------------------------------------------------------------------------------
def section(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 76 - len(title)))


def build_model():
    from . import nn

    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10), seed=0, name="demo_cnn")


def train(model, X, y, epochs: int):
    from . import optim

    try:
        import tqdm  # noqa: F401
    except ImportError:
        print("(tqdm not installed: no progress bar; pip install tqdm)")
    start = time.perf_counter()
    history = model.fit(X, y, loss="cross_entropy", optimizer=optim.SGD(lr=0.05, momentum=0.9),
                        epochs=epochs, batch_size=BATCH_SIZE, drop_last=True, target="cpu")
    seconds = time.perf_counter() - start
    print(f"{epochs} epochs in {seconds:.1f} s (the first step includes compiling the step "
          f"graph); training loss {history['loss'][0]:.3f} -> {history['loss'][-1]:.3f}, "
          f"accuracy {history['accuracy'][-1]:.1%}")
    return history


def compile_and_show(model):
    """The inference graph before and after the default CPU pipeline."""
    from . import compile as compile_graph

    graph = model.build(freeze=True)
    compiled = compile_graph(graph, target="cpu")
    print("-- before: the inference graph as built --")
    print(graph)
    print(f"-- after: {','.join(compiled.pipeline)} --")
    print(compiled.graph)
    winograd = [f"{n.name} ({n.op}, m={n.attrs['m']}, tiles={list(n.attrs['tiles'])})"
                for n in compiled.graph if n.op.startswith("Winograd")]
    if winograd:
        print("Winograd nodes: " + ", ".join(winograd) + "\n(the filter transform of the "
              "constant weights is folded at compile time; bias and ReLU fuse into "
              "WinogradOutput)")
    else:
        print("the cost rule chose no Winograd convolution for this model")
    print(compiled.timing_report())
    return graph, compiled, winograd


def test_accuracy(graph, compiled, X_test, y_test) -> tuple[float, float]:
    from .interp import interpret

    (logits,) = compiled.run({"x": X_test})
    (oracle,) = interpret(graph, {"x": X_test})
    accuracy = float(np.mean(np.argmax(logits, axis=1) == y_test))
    difference = float(np.abs(logits - oracle).max())
    print(f"test accuracy: {accuracy:.1%} ({len(X_test)} images, compiled model; max |logit "
          f"difference| to the interpreter {difference:.1e})")
    return accuracy, difference


def measure_speed(graph, X_batch, rounds: int) -> dict[str, float | None]:
    from .bench import OK, bench_graph
    from .interp import interpret

    rows = bench_graph(graph, {"x": X_batch}, case="demo_cnn", rounds=rounds, warmup=1,
                       runners=("graphc", "onnxruntime"), min_sample_s=0.01, settle_s=0.05,
                       extra_runners={"interpreter": lambda feeds: interpret(graph, feeds)})
    labels = {"graphc": "graphc (compiled, cpu)", "onnxruntime": "ONNX Runtime",
              "interpreter": "numpy interpreter"}
    medians = {row.runner: row.median_ms if row.status == OK else None for row in rows}
    graphc_ms = medians.get("graphc")
    print(f"batch of {len(X_batch)} images, {rows[0].threads} threads, median of {rounds} "
          f"interleaved rounds (timings on a shared machine are noisy):")
    for row in rows:
        if row.status != OK:
            print(f"  {labels[row.runner]:<24} {row.status}" + (
                " (pip install onnxruntime)" if row.runner == "onnxruntime" else
                f": {row.detail}"))
            continue
        speed = "" if row.runner == "graphc" or not graphc_ms else _relative(
            row.median_ms / graphc_ms)
        print(f"  {labels[row.runner]:<24} {row.median_ms:8.3f} ms{speed}")
    return medians


def _relative(ratio: float) -> str:
    """How graphc compares to a runner taking ``ratio`` times graphc's time."""
    if ratio >= 1.0:
        return f"   graphc is {ratio:.1f}x faster"
    return f"   graphc is {1.0 / ratio:.1f}x slower"


def export(model, compiled, X_test, out: str) -> str:
    import onnx

    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "demo_cnn.onnx")
    model.export_onnx(path)
    onnx.checker.check_model(path)
    print(f"exported {path} (onnx.checker: valid)")
    try:
        import onnxruntime as ort
    except ImportError:
        print("(onnxruntime not installed: the exported file is not run)")
        return path
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    (want,) = session.run(None, {"x": X_test})
    (got,) = compiled.run({"x": X_test})
    print(f"ONNX Runtime on the exported file: max |logit difference| to graphc "
          f"{np.abs(got - want).max():.1e}")
    return path


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="graphc demo", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return parser.parse_args(argv)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="fewer epochs and timing rounds (what the test suite runs)")
    parser.add_argument("--out", default=DEFAULT_OUT,
                        help=f"folder for the exported ONNX model (default ./{DEFAULT_OUT})")
    parser.add_argument("--data", default="auto", choices=("auto", "digits", "glyphs"),
                        help="digits: scikit-learn's; glyphs: built-in synthetic digits; auto: "
                             "digits when scikit-learn is installed")
    parser.add_argument("--epochs", type=int, help="training epochs (default 30, quick 6)")


def run(args) -> dict:
    """The tour for parsed ``args`` (see ``add_arguments``); returns its summary."""
    epochs = args.epochs or (6 if args.quick else 30)
    section("1. data")
    X, y, description = load_data(args.data)
    X_train, X_test, y_train, y_test = split(X, y)
    print(f"{description}: {len(X_train)} for training, {len(X_test)} for testing")
    section("2. a LeNet-style CNN, trained with graphc.nn on target cpu")
    model = build_model()
    model.ensure_initialised(X.shape[1:])
    print(f"{model!r}\n{model.parameter_count():,} parameters")
    history = train(model, X_train, y_train, epochs)
    section("3. the compiler: default pipeline, Winograd rewrite")
    graph, compiled, winograd = compile_and_show(model)
    section("4. test accuracy")
    accuracy, difference = test_accuracy(graph, compiled, X_test, y_test)
    section("5. speed: compiled vs interpreter vs ONNX Runtime")
    medians = measure_speed(graph, X_test[:BENCH_BATCH], rounds=3 if args.quick else 7)
    section("6. export to ONNX")
    path = export(model, compiled, X_test, args.out)
    return {"accuracy": accuracy, "interpreter_difference": difference, "epochs": epochs,
            "final_loss": history["loss"][-1], "winograd_nodes": winograd,
            "median_ms": medians, "onnx": path, "data": description}


def main(argv=None) -> int:
    run(parse_args(argv))
    return 0
