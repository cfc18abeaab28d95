"""A flaw of deep networks: a tiny, targeted perturbation flips the digits CNN's prediction.

    python examples/adversarial.py [--quick] [--model digits_cnn.npz] [--out DIR]

Szegedy et al. (2014, "Intriguing properties of neural networks") found that a correctly
classified image plus a perturbation too faint to change what a person sees can be classified
as something else entirely. Goodfellow et al. (2015) gave the fast gradient sign method (FGSM):
move every pixel by epsilon in the direction that increases the loss,

    x_adv = clip(x + epsilon * sign(dL/dx), 0, 1).

The gradient with respect to the *input* (not the weights) comes from ``graphc.grad``: the
trained CNN's inference graph (weights frozen to constants) plus the cross-entropy of the true
label, differentiated with respect to the graph input ``x``. One compiled graph returns the
logits, the loss and dL/dx for a whole batch; the gradient of the batch-mean loss is 1/N times
each image's own, and FGSM only uses its sign.

The example trains the CNN of examples/digits_cnn.py (or loads one it saved, ``--model``),
picks the first test digit that it classifies right, finds the smallest epsilon on a ladder
that flips the prediction, and shows the original, the perturbation and the adversarial image.
It also reports the test accuracy under FGSM for a few epsilons: the pixels are in [0, 1], and
a change of 0.1 per pixel -- a faint grey speckle -- already costs much of the accuracy.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
from example_support import pyplot, save_figure

import graphc
from graphc import nn, ops
from graphc.losses import CrossEntropy

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # the sibling example that trains the CNN

import digits_cnn

EPSILON_LADDER = np.round(np.arange(0.02, 0.62, 0.02), 2)
REPORTED_EPSILONS = (0.05, 0.1, 0.2)


def loss_gradient_graph(model: nn.Sequential) -> graphc.Graph:
    """Outputs: logits [N, 10], mean cross-entropy [], dL/dx [N, 1, 8, 8]; inputs: ``x`` and
    the one-hot labels ``target``."""
    graph = graphc.Graph("fgsm")
    x = graph.input("x", (None,) + model.input_shape)
    target = graph.input("target", (None,) + model.output_shape)
    head = model.forward(x, nn.Scope(graph, freeze=True))
    per_sample = CrossEntropy().per_sample(head, target)
    loss = ops.reduce_mean(per_sample, np.array([0], np.int64), keepdims=0)
    graph.output(head.output, loss)
    return graphc.grad(graph, of=loss.name, wrt=["x"])


class Attack:
    """The compiled loss-gradient graph and FGSM on top of it."""

    def __init__(self, model: nn.Sequential, target: str):
        self.compiled = graphc.compile(loss_gradient_graph(model), target=target)

    def run(self, images: np.ndarray, labels: np.ndarray):
        """(logits, gradient of the loss w.r.t. each image)."""
        one_hot = np.eye(10, dtype=np.float32)[labels]
        logits, _, gradient = self.compiled.run({"x": images, "target": one_hot})
        return logits, gradient

    def fgsm(self, images, labels, epsilon: float) -> np.ndarray:
        _, gradient = self.run(images, labels)
        return np.clip(images + np.float32(epsilon) * np.sign(gradient), 0.0, 1.0)

    def predict(self, images) -> np.ndarray:
        return self.run(images, np.zeros(len(images), np.int64))[0]


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def smallest_flip(attack: Attack, image: np.ndarray, label: int):
    """(epsilon, adversarial image, its prediction) for the first epsilon of the ladder that
    flips the prediction; (None, None, None) if none does."""
    for epsilon in EPSILON_LADDER:
        adversarial = attack.fgsm(image[None], np.array([label]), epsilon)
        predicted = int(np.argmax(attack.predict(adversarial)[0]))
        if predicted != label:
            return float(epsilon), adversarial[0], predicted
    return None, None, None


def load_or_train(path: str | None, quick: bool, target: str) -> nn.Sequential:
    if path:
        print(f"loaded the trained CNN from {path}")
        return nn.load(path)
    X_train, _, y_train, _ = digits_cnn.load_images()
    epochs = 8 if quick else 40
    print(f"training the CNN of examples/digits_cnn.py ({epochs} epochs)")
    return digits_cnn.train(X_train, y_train, epochs, target)


def save_plot(image, adversarial, label, predicted, epsilon, path: str) -> str | None:
    plt = pyplot()
    if plt is None:  # matplotlib is an optional extra
        return None
    perturbation = adversarial - image
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.4))
    panels = ((image, f"original: {label}", "gray_r", 0, 1),
              (perturbation, f"perturbation (+-{epsilon:.2f})", "RdBu_r", -epsilon, epsilon),
              (adversarial, f"adversarial: {predicted}", "gray_r", 0, 1))
    for ax, (picture, title, cmap, low, high) in zip(axes, panels):
        ax.imshow(picture[0], cmap=cmap, vmin=low, vmax=high)
        ax.set_title(title)
        ax.axis("off")
    return save_figure(fig, path)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="train fewer epochs")
    parser.add_argument("--model", help="a model saved by examples/digits_cnn.py (default: "
                        "train one)")
    parser.add_argument("--out", default=os.path.join(HERE, "output"),
                        help="folder for the PNG (default examples/output)")
    parser.add_argument("--target", default="cpu", choices=("cpu", "reference"))
    args = parser.parse_args(argv)

    model = load_or_train(args.model, args.quick, args.target)
    _, X_test, _, y_test = digits_cnn.load_images()
    attack = Attack(model, args.target)
    logits, _ = attack.run(X_test, y_test)
    correct = np.flatnonzero(np.argmax(logits, axis=1) == y_test)
    index = int(correct[0])
    image, label = X_test[index], int(y_test[index])
    confidence = float(softmax(logits[index])[label])
    epsilon, adversarial, predicted = smallest_flip(attack, image, label)
    print(f"test digit #{index}: label {label}, predicted {label} with probability "
          f"{confidence:.3f}")
    if epsilon is None:
        print(f"no epsilon up to {EPSILON_LADDER[-1]} flips it")
    else:
        p_adv = float(softmax(attack.predict(adversarial[None])[0])[predicted])
        print(f"FGSM with epsilon {epsilon:.2f} (pixels in [0, 1]): predicted {predicted} with "
              f"probability {p_adv:.3f}; perturbation L2 norm "
              f"{np.linalg.norm(adversarial - image):.2f} vs image {np.linalg.norm(image):.2f}")
    clean = float(np.mean(np.argmax(logits, axis=1) == y_test))
    under_attack = {}
    for eps in REPORTED_EPSILONS:
        attacked = attack.fgsm(X_test, y_test, eps)
        under_attack[eps] = float(np.mean(np.argmax(attack.predict(attacked), axis=1) == y_test))
    print(f"test accuracy: clean {clean:.1%}, " + ", ".join(
        f"FGSM eps={eps} {acc:.1%}" for eps, acc in under_attack.items()))
    os.makedirs(args.out, exist_ok=True)
    png = None
    if epsilon is not None:
        png = save_plot(image, adversarial, label, predicted, epsilon,
                        os.path.join(args.out, "adversarial.png"))
    print(f"saved {png}" if png else "no picture saved (matplotlib missing or no flip)")
    return {"index": index, "label": label, "epsilon": epsilon, "adversarial_prediction":
            predicted, "flipped": epsilon is not None, "clean_accuracy": clean,
            "accuracy_under_attack": under_attack, "png": png}


if __name__ == "__main__":
    sys.exit(0 if main()["flipped"] else 1)
