"""An MLP on the scikit-learn digits: train/validation/test, early stopping, 5-fold CV.

    python examples/digits_mlp.py [--quick] [--out DIR] [--target cpu|reference]

The 1,797 8x8 digit images (grey levels 0..16, scaled to [0, 1]) are split, stratified, into
60% training, 20% validation and 20% test data. A 64-32-10 network (sigmoid hidden units,
softmax cross-entropy) is trained by SGD with momentum; after every epoch the validation loss
decides: when it has not improved for ``--patience`` epochs, training stops and the weights of
the best epoch come back (early stopping). The test set is touched once, at the end.

5-fold cross-validation then estimates how much the accuracy depends on the split: the 80%
that is not test data is cut into 5 folds, and 5 fresh networks train (for the epoch count
early stopping chose) on 4 folds each and are scored on the fifth. graphc compiles the training
step once and every fold reuses it.

Pictures: the learning curves (training and validation loss and accuracy per epoch, the best
epoch marked) and the learnt input-to-hidden weights, one 8x8 image per hidden unit: what each
hidden unit "looks for" in a digit (its hidden representation).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
from example_support import pyplot, save_figure

import graphc
from graphc import nn, optim

HERE = os.path.dirname(os.path.abspath(__file__))
HIDDEN = 32


def load_split(seed: int = 0):
    """(train, validation, test) pairs of float32 images [n, 64] in [0, 1] and labels."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    X = (digits.data / 16.0).astype(np.float32)
    X_rest, X_test, y_rest, y_test = train_test_split(
        X, digits.target, test_size=0.2, random_state=seed, stratify=digits.target)
    X_train, X_val, y_train, y_val = train_test_split(
        X_rest, y_rest, test_size=0.25, random_state=seed, stratify=y_rest)
    return (X_train, y_train), (X_val, y_val), (X_test, y_test)


def build_model(seed: int = 0) -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, HIDDEN), nn.Sigmoid(), nn.Linear(HIDDEN, 10), seed=seed)


def fit_options(target: str) -> dict:
    """What every training run of this example shares (a fresh optimiser each time).
    drop_last: the few samples past the last full batch wait for the next epoch's shuffle,
    so target "cpu" compiles the step for one batch size only (not one per fold size)."""
    return {"loss": "cross_entropy", "optimizer": optim.SGD(lr=0.1, momentum=0.9),
            "batch_size": 32, "drop_last": True, "target": target}


def train_with_early_stopping(train, val, epochs: int, patience: int, target: str):
    model = build_model()
    history = model.fit(*train, validation_data=val, epochs=epochs, early_stopping=patience,
                        **fit_options(target))
    return model, history


def cross_validate(X, y, epochs: int, target: str):
    return graphc.kfold(build_model, X, y, k=5, epochs=epochs, progress=False,
                        **fit_options(target))


def plot_learning_curves(history, path: str) -> str | None:
    plt = pyplot()
    if plt is None:  # matplotlib is an optional extra
        return None
    epochs = np.arange(1, history.epochs_run + 1)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in zip(axes, ("loss", "accuracy")):
        ax.plot(epochs, history[metric], label="training")
        ax.plot(epochs, history[f"val_{metric}"], label="validation")
        if history.best_epoch is not None:
            ax.axvline(history.best_epoch + 1, color="k", linestyle=":", label="best epoch")
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.legend()
    axes[0].set_yscale("log")
    fig.suptitle("digits MLP 64-32-10: learning curves")
    return save_figure(fig, path)


def plot_hidden_weights(model: nn.Sequential, path: str) -> str | None:
    plt = pyplot()
    if plt is None:  # matplotlib is an optional extra
        return None
    weights = model.layers[0].params["weight"]  # (64 inputs, HIDDEN units)
    columns = 8
    rows = -(-HIDDEN // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.3, rows * 1.4))
    limit = float(np.abs(weights).max())
    for unit, ax in enumerate(axes.ravel()):
        ax.axis("off")
        if unit < HIDDEN:
            ax.imshow(weights[:, unit].reshape(8, 8), cmap="RdBu_r", vmin=-limit, vmax=limit)
            ax.set_title(f"unit {unit}", fontsize=7)
    fig.suptitle("input-to-hidden weights as 8x8 images (red +, blue -)")
    return save_figure(fig, path)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer epochs, shorter patience")
    parser.add_argument("--epochs", type=int, default=None, help="at most (default 200, "
                        "quick: 15)")
    parser.add_argument("--patience", type=int, default=None, help="early stopping (default "
                        "10, quick: 3)")
    parser.add_argument("--out", default=os.path.join(HERE, "output"),
                        help="folder for the PNGs (default examples/output)")
    parser.add_argument("--target", default="cpu", choices=("cpu", "reference"))
    args = parser.parse_args(argv)
    epochs = args.epochs or (15 if args.quick else 200)
    patience = args.patience or (3 if args.quick else 10)

    train, val, test = load_split()
    print(f"digits: {len(train[0])} training, {len(val[0])} validation, {len(test[0])} test "
          f"images; MLP 64-{HIDDEN}-10 (sigmoid), SGD lr 0.1 momentum 0.9, batch 32, "
          f"target {args.target}")
    model, history = train_with_early_stopping(train, val, epochs, patience, args.target)
    best = history.best_epoch
    print(f"early stopping (patience {patience}): ran {history.epochs_run} of {epochs} "
          f"epochs, {'stopped early' if history.stopped_early else 'did not stop early'}, "
          f"best epoch {best + 1}: validation loss {history['val_loss'][best]:.4f}, accuracy "
          f"{history['val_accuracy'][best]:.2%}")
    test_result = model.evaluate(*test, target=args.target)
    print(f"test accuracy {test_result.accuracy:.2%} (loss {test_result.loss:.4f})")

    X_rest = np.concatenate([train[0], val[0]])
    y_rest = np.concatenate([train[1], val[1]])
    folds = cross_validate(X_rest, y_rest, best + 1, args.target)
    print(f"5-fold cross-validation on the {len(X_rest)} non-test images, {best + 1} epochs "
          f"each: " + ", ".join(f"{s:.2%}" for s in folds.scores)
          + f"; mean {folds.mean:.2%} +- {folds.std:.2%}")

    os.makedirs(args.out, exist_ok=True)
    pngs = [plot_learning_curves(history, os.path.join(args.out, "digits_mlp_curves.png")),
            plot_hidden_weights(model, os.path.join(args.out, "digits_mlp_weights.png"))]
    print("saved " + ", ".join(pngs) if all(pngs) else "matplotlib not installed: no "
          "pictures saved")
    return {"test_accuracy": test_result.accuracy, "best_epoch": best + 1,
            "epochs_run": history.epochs_run, "stopped_early": history.stopped_early,
            "cv_scores": folds.scores, "cv_mean": folds.mean, "cv_std": folds.std,
            "pngs": pngs}


if __name__ == "__main__":
    sys.exit(0 if main()["test_accuracy"] > 0.9 else 1)
