"""A LeNet-style CNN on the scikit-learn digits, and what the compiler makes of it: Winograd.

    python examples/digits_cnn.py [--quick] [--out DIR] [--target cpu|reference]

LeNet's pattern on 8x8 digits: convolution, ReLU, max-pooling, twice, then two dense layers:

    conv 3x3 1->8 (pad 1) - ReLU - maxpool 2   [8, 4, 4]
    conv 3x3 8->16 (pad 1) - ReLU - maxpool 2  [16, 2, 2]
    flatten - dense 64->32 - ReLU - dense 32->10 (softmax cross-entropy)

Training (``fit``, SGD with momentum, 80/20 stratified split) compiles one step graph in which
the convolutions are im2col + GEMM: the weights change every step. The trained model's
*inference* graph is another matter: its weights are constants, so the default pipeline's cost
rule can choose Winograd's minimal filtering F(4x4, 3x3) for the second convolution (8 input
channels; the first, with one input channel, stays im2col). The example prints

* the inference graph as built (two ``Conv`` nodes),
* the IR right after the ``winograd`` pass: ``WinogradFilterTransform`` of the weights,
  ``WinogradInputTransform`` of the feature map into 6x6 tiles, one batched ``MatMul`` over the
  36 transformed positions and ``WinogradOutput`` (the 4x4 output tiles; here one tile, the
  map is 4x4),
* the fully optimised IR that target "cpu" runs (the filter transform folded into a constant,
  bias and ReLU fused into the output transform),

then the test accuracy of the compiled model, checked against the reference interpreter. The
trained model is saved as ``digits_cnn.npz`` in ``--out`` (examples/adversarial.py can load it).
"""

from __future__ import annotations

import argparse
import io
import os
import sys

import numpy as np
from example_support import pyplot, save_figure

import graphc
from graphc import nn, optim

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL_FILE = "digits_cnn.npz"
WINOGRAD_OPS = ("WinogradFilterTransform", "WinogradInputTransform", "WinogradOutput")


def load_images(seed: int = 0):
    """(X_train, X_test, y_train, y_test): digits as float32 images [n, 1, 8, 8] in [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    X = (digits.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    return train_test_split(X, digits.target, test_size=0.2, random_state=seed,
                            stratify=digits.target)


def build_model(seed: int = 0) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10), seed=seed,
        name="digits_cnn")


def train(X, y, epochs: int, target: str = "cpu", progress: bool = True) -> nn.Sequential:
    """The trained CNN. drop_last: one batch size, one compiled step specialisation."""
    model = build_model()
    model.fit(X, y, loss="cross_entropy", optimizer=optim.SGD(lr=0.05, momentum=0.9),
              epochs=epochs, batch_size=64, drop_last=True, target=target, progress=progress)
    return model


def compile_inference(model: nn.Sequential, target: str):
    """(graph as built, IR text after the winograd pass, compiled model) of the inference
    graph, weights frozen to constants so that the filter transform folds."""
    graph = model.build(freeze=True)
    after_winograd = io.StringIO()
    compiled = graphc.compile(graph, target=target, print_after=("winograd",),
                              out=after_winograd)
    return graph, after_winograd.getvalue(), compiled


def winograd_nodes(graph: graphc.Graph) -> list[str]:
    """One line per Winograd node: name, op, tile size m and tile grid."""
    return [f"{node.name}: {node.op} m={node.attrs.get('m')} tiles={node.attrs.get('tiles')}"
            for node in graph if node.op in WINOGRAD_OPS]


def save_plot(model, X_test, y_test, predicted, path: str) -> str | None:
    plt = pyplot()
    if plt is None:  # matplotlib is an optional extra
        return None
    filters = model.layers[0].params["weight"][:, 0]  # (8, 3, 3)
    wrong = np.flatnonzero(predicted != y_test)[:8]
    fig, axes = plt.subplots(2, 8, figsize=(12, 3.6))
    for i, ax in enumerate(axes[0]):
        ax.imshow(filters[i], cmap="RdBu_r")
        ax.set_title(f"conv1 filter {i}", fontsize=7)
    for ax, index in zip(axes[1], wrong):
        ax.imshow(X_test[index, 0], cmap="gray_r")
        ax.set_title(f"label {y_test[index]} -> {predicted[index]}", fontsize=7)
    for ax in axes.ravel():
        ax.axis("off")
    fig.suptitle("first-layer filters; misclassified test digits")
    return save_figure(fig, path)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer epochs")
    parser.add_argument("--epochs", type=int, default=None, help="default 40 (quick: 8)")
    parser.add_argument("--out", default=os.path.join(HERE, "output"),
                        help="folder for the PNG and the model (default examples/output)")
    parser.add_argument("--target", default="cpu", choices=("cpu", "reference"))
    args = parser.parse_args(argv)
    epochs = args.epochs or (8 if args.quick else 40)

    X_train, X_test, y_train, y_test = load_images()
    print(f"digits: {len(X_train)} training and {len(X_test)} test images 8x8; {epochs} epochs, "
          f"target {args.target}")
    model = train(X_train, y_train, epochs, args.target)
    graph, after_winograd, compiled = compile_inference(model, args.target)
    print("-- inference graph, as built --")
    print(graph)
    print(after_winograd.rstrip())
    print(f"// ----- IR after the whole pipeline ({','.join(compiled.pipeline)}) -----")
    print(compiled.graph)
    nodes = winograd_nodes(compiled.graph)
    print("Winograd nodes: " + ("; ".join(nodes) if nodes else "none"))

    (logits,) = compiled.run({"x": X_test})
    (oracle,) = graphc.interpret(graph, {"x": X_test})
    difference = float(np.abs(logits - oracle).max())
    predicted = np.argmax(logits, axis=1)
    accuracy = float(np.mean(predicted == y_test))
    print(f"test accuracy {accuracy:.2%} (compiled model, target {args.target}; max |logit "
          f"difference| to the interpreter on the unoptimised graph {difference:.1e})")

    os.makedirs(args.out, exist_ok=True)
    model_path = os.path.join(args.out, MODEL_FILE)
    model.save(model_path)
    png = save_plot(model, X_test, y_test, predicted, os.path.join(args.out, "digits_cnn.png"))
    print(f"saved {model_path}" + (f", {png}" if png else "; matplotlib not installed: no "
                                   "picture saved"))
    return {"accuracy": accuracy, "winograd_nodes": nodes, "interpreter_difference": difference,
            "ir_before": str(graph), "ir_after_winograd": after_winograd,
            "ir_optimised": str(compiled.graph), "model": model_path, "png": png}


if __name__ == "__main__":
    sys.exit(0 if main()["accuracy"] > 0.9 else 1)
