"""Backpropagation learns XOR: a 2-2-1 sigmoid network draws two lines where one cannot do.

    python examples/xor_mlp.py [--quick] [--out DIR] [--target reference|cpu]

The perceptron (examples/perceptron.py) fails on XOR because no single line separates it. One
hidden layer of two sigmoid units fixes that: each hidden unit learns a line (typically one
OR-like and one AND-like), and the output unit combines the two half-planes into the band
between them -- a non-linear decision region. The network is trained by backpropagation
(``graphc.grad`` inside ``fit``) on the squared error E = 1/2 (t - o)^2 with full-batch SGD and
momentum; the targets are 0/1 and an output above 0.5 means "true".

The printed summary shows the truth table with the network's outputs, the epoch at which all
four patterns were first right, and each hidden unit's line w0 + w1*x1 + w2*x2 = 0 (where its
pre-activation is zero, i.e. its sigmoid is 0.5). The plot shows the output over the input
plane, the 0.5 contour (the decision boundary) and the hidden units' lines.

The network is tiny, so the default target is the reference interpreter: compiling for the
CPU would take longer than the training.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
from example_support import pyplot, save_figure

from graphc import nn, optim

HERE = os.path.dirname(os.path.abspath(__file__))
INPUTS = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], np.float32)
XOR = np.array([0, 1, 1, 0], np.float32)
HIDDEN = 2


def build_model(seed: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Linear(2, HIDDEN), nn.Sigmoid(), nn.Linear(HIDDEN, 1), nn.Sigmoid(),
                         seed=seed)


def train(epochs: int, target: str) -> tuple[nn.Sequential, object]:
    model = build_model()
    history = model.fit(INPUTS, XOR, loss="mse", optimizer=optim.SGD(lr=2.0, momentum=0.9),
                        epochs=epochs, batch_size=len(INPUTS), shuffle=False, target=target,
                        progress=False)
    return model, history


def hidden_lines(model: nn.Sequential) -> list[tuple[float, float, float]]:
    """(w0, w1, w2) of each hidden unit: its pre-activation is w0 + w1*x1 + w2*x2."""
    params = model.layers[0].params
    return [(float(params["bias"][j]), float(params["weight"][0, j]),
             float(params["weight"][1, j])) for j in range(HIDDEN)]


def line_text(w0: float, w1: float, w2: float) -> str:
    return f"{w0:+.2f} {w1:+.2f}*x1 {w2:+.2f}*x2 = 0"


def first_perfect_epoch(history) -> int | None:
    """1-based epoch at which every pattern was first classified right (None: never)."""
    perfect = [i for i, a in enumerate(history["accuracy"]) if a == 1.0]
    return perfect[0] + 1 if perfect else None


def save_plot(model, history, target: str, path: str) -> str | None:
    plt = pyplot()
    if plt is None:  # matplotlib is an optional extra
        return None
    grid = np.linspace(-0.5, 1.5, 121, dtype=np.float32)
    x1, x2 = np.meshgrid(grid, grid)
    plane = np.stack([x1.ravel(), x2.ravel()], axis=1)
    output = model.predict(plane, target=target)[:, 0].reshape(x1.shape)
    fig, (ax, ax_loss) = plt.subplots(1, 2, figsize=(11, 4.8))
    shade = ax.contourf(x1, x2, output, levels=np.linspace(0, 1, 11), cmap="RdBu")
    fig.colorbar(shade, ax=ax, label="network output")
    ax.contour(x1, x2, output, levels=[0.5], colors="k", linewidths=2)
    for j, (w0, w1, w2) in enumerate(hidden_lines(model)):
        ax.contour(x1, x2, w0 + w1 * x1 + w2 * x2, levels=[0], colors="#2ca02c",
                   linestyles="--")
        ax.plot([], [], "--", color="#2ca02c", label="hidden units' lines" if j == 0 else None)
    ax.plot([], [], "k-", label="decision boundary (0.5)")
    for t, marker in ((0, "o"), (1, "s")):
        chosen = INPUTS[XOR == t]
        ax.scatter(chosen[:, 0], chosen[:, 1], marker=marker, s=120, c="w", edgecolors="k",
                   label=f"t = {t}")
    ax.set_title("XOR: decision regions of a 2-2-1 sigmoid network")
    ax.set_xlabel("x1")
    ax.set_ylabel("x2")
    ax.set_aspect("equal")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, fontsize=8)
    ax_loss.semilogy(np.arange(1, len(history["loss"]) + 1), history["loss"])
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss 1/2 (t - o)^2")
    ax_loss.set_title("training loss")
    return save_figure(fig, path)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer epochs")
    parser.add_argument("--epochs", type=int, default=None, help="default 1000 (quick: 400)")
    parser.add_argument("--out", default=os.path.join(HERE, "output"),
                        help="folder for the PNG (default examples/output)")
    parser.add_argument("--target", default="reference", choices=("reference", "cpu"))
    args = parser.parse_args(argv)
    epochs = args.epochs or (400 if args.quick else 1000)

    model, history = train(epochs, args.target)
    outputs = model.predict(INPUTS, target=args.target)[:, 0]
    accuracy = float(np.mean((outputs > 0.5) == (XOR > 0.5)))
    print(f"2-{HIDDEN}-1 sigmoid network, squared error, full-batch SGD (lr 2, momentum 0.9), "
          f"{epochs} epochs, target {args.target}")
    print(" x1  x2 | XOR | output")
    for (a, b), t, o in zip(INPUTS, XOR, outputs):
        print(f" {a:.0f}   {b:.0f}  |  {t:.0f}  | {o:.3f}")
    print(f"accuracy {accuracy:.0%}, final loss {history['loss'][-1]:.2e}, all four right "
          f"from epoch {first_perfect_epoch(history)}")
    for j, line in enumerate(hidden_lines(model)):
        print(f"hidden unit {j}: {line_text(*line)}")
    os.makedirs(args.out, exist_ok=True)
    png = save_plot(model, history, args.target, os.path.join(args.out, "xor_mlp.png"))
    print(f"saved {png}" if png else "matplotlib not installed: no picture saved")
    return {"accuracy": accuracy, "outputs": outputs, "hidden_lines": hidden_lines(model),
            "first_perfect_epoch": first_perfect_epoch(history), "png": png}


if __name__ == "__main__":
    sys.exit(0 if main()["accuracy"] == 1.0 else 1)
