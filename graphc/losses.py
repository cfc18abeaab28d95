"""Losses as graph builders: each adds a per-sample loss (shape (N,)) to a model's graph.

A training step takes the mean of the per-sample losses over the batch; an evaluation sums
them over the samples it was given (so padded evaluation chunks drop out exactly). Conventions:

* ``"mse"``: the delta rule's E = 1/2 sum_k (t_k - o_k)^2 over a sample's outputs (so that
  dE/do = o - t), averaged over the batch. PyTorch's ``MSELoss`` is the mean over every element
  without the 1/2: for k outputs, ``"mse"`` = k/2 * MSELoss.
* ``"cross_entropy"``: softmax cross-entropy on integer class labels, -sum_k t_k log softmax(z)_k,
  averaged over the batch (PyTorch's ``CrossEntropyLoss``). It works on logits z through
  LogSoftmax (max-subtracted, so no overflow); when the model ends with a Softmax layer, the
  Softmax's input is taken as the logits. Labels become one-hot float rows on the host, once per
  fit: the label pick is then a Mul and a ReduceSum, whose gradient (softmax(z) - t) is plain
  elementwise work on every backend, whereas a Gather with run-time indices has a scatter as its
  gradient and no CPU lowering. Soft labels (rows of probabilities) are accepted as they are.
* ``"bce"``: binary cross-entropy, averaged over a sample's outputs and then the batch
  (PyTorch's ``BCELoss``). When the model ends with a Sigmoid it uses the logits z:
  softplus(z) - t z (stable for any z); otherwise the outputs are probabilities, clipped to
  [1e-7, 1 - 1e-7] before the logs.

Accuracy (host side, on the model's outputs): argmax agreement for several outputs; for one
output, "bce" thresholds at 0.5 and "mse" picks the nearest of the class values seen in training
(0/1 or -1/1 for the perceptron); "mse" with many distinct target values is a regression and has
no accuracy (NaN).
"""

from __future__ import annotations

import abc

import numpy as np

from . import ops
from .errors import FeedError, GraphcError, ShapeError
from .ir import Value

MAX_CLASS_VALUES = 16  # a one-output "mse" target with more distinct values is a regression
PROBABILITY_CLIP = 1e-7


def _sample_axes(value: Value) -> np.ndarray:
    return np.arange(1, len(value.shape), dtype=np.int64)


class Loss(abc.ABC):
    """One loss: its graph (``per_sample``), host-side target preparation and accuracy."""

    name = ""

    def target_shape(self, output_shape: tuple) -> tuple:
        """Per-sample shape of the target fed to the graph."""
        return tuple(output_shape)

    def prepare_targets(self, y, output_shape: tuple, what: str = "y") -> np.ndarray:
        """``y`` as float32 rows of ``target_shape`` (a (n,) vector fits one output)."""
        t = np.asarray(y, dtype=np.float32)
        shape = self.target_shape(output_shape)
        if t.ndim == 1 and shape == (1,):
            t = t.reshape(-1, 1)
        if t.shape[1:] != shape:
            raise FeedError(f"{what} has shape {t.shape}; loss '{self.name}' needs (n,) + {shape}"
                            f" for model outputs of shape {tuple(output_shape)}")
        return np.ascontiguousarray(t)

    @abc.abstractmethod
    def per_sample(self, head, target: Value) -> Value:
        """The loss of each sample, shape (N,), from the model's head and the target."""

    def class_values(self, targets: np.ndarray) -> np.ndarray | None:
        """What accuracy compares against, fixed from the training targets (see the module
        docstring); None when there is no accuracy."""
        return None

    def correct(self, outputs: np.ndarray, targets: np.ndarray, classes) -> np.ndarray | None:
        """Per-sample booleans: is the prediction right? None when accuracy is undefined."""
        if outputs.ndim == 2 and outputs.shape[1] > 1:
            return np.argmax(outputs, axis=1) == np.argmax(targets, axis=1)
        return None

    def __repr__(self) -> str:
        return f"<loss {self.name}>"


class MeanSquaredError(Loss):
    name = "mse"

    def per_sample(self, head, target):
        diff = head.output - target
        return ops.reduce_sum(diff * diff, _sample_axes(diff), keepdims=0) * np.float32(0.5)

    def class_values(self, targets):
        if targets.ndim == 2 and targets.shape[1] == 1:
            values = np.unique(targets)
            return values if len(values) <= MAX_CLASS_VALUES else None
        return None

    def correct(self, outputs, targets, classes):
        if outputs.ndim == 2 and outputs.shape[1] == 1:
            if classes is None:
                return None
            nearest = classes[np.argmin(np.abs(outputs - classes[None, :]), axis=1)]
            return nearest == targets[:, 0]
        return super().correct(outputs, targets, classes)


class CrossEntropy(Loss):
    name = "cross_entropy"

    def prepare_targets(self, y, output_shape, what="y"):
        if len(output_shape) != 1:
            raise ShapeError(f"loss 'cross_entropy' needs model outputs of shape (classes,) per "
                             f"sample, got {tuple(output_shape)}")
        classes = output_shape[0]
        labels = np.asarray(y)
        if labels.ndim == 2 and labels.shape[1] == classes and labels.dtype.kind == "f":
            return np.ascontiguousarray(labels, dtype=np.float32)  # one-hot or soft labels
        if labels.ndim == 2 and labels.shape[1] == 1:
            labels = labels[:, 0]
        if labels.ndim != 1:
            raise FeedError(f"{what} has shape {labels.shape}; loss 'cross_entropy' needs integer"
                            f" labels (n,) or one-hot rows (n, {classes})")
        as_int = labels.astype(np.int64)
        if not np.array_equal(as_int, labels) or as_int.min(initial=0) < 0 \
                or as_int.max(initial=0) >= classes:
            bad = labels[(as_int != labels) | (as_int < 0) | (as_int >= classes)][0]
            raise FeedError(f"{what} holds label {bad}; loss 'cross_entropy' needs integers in"
                            f" [0, {classes}) for {classes} model outputs")
        one_hot = np.zeros((len(as_int), classes), np.float32)
        one_hot[np.arange(len(as_int)), as_int] = 1.0
        return one_hot

    def per_sample(self, head, target):
        logits = head.logits if head.activation == "Softmax" else head.output
        log_probs = ops.log_softmax(logits, axis=1)
        return ops.neg(ops.reduce_sum(target * log_probs, np.array([1], np.int64), keepdims=0))

    def correct(self, outputs, targets, classes):
        return np.argmax(outputs, axis=1) == np.argmax(targets, axis=1)


class BinaryCrossEntropy(Loss):
    name = "bce"

    def prepare_targets(self, y, output_shape, what="y"):
        t = super().prepare_targets(y, output_shape, what)
        if t.size and (t.min() < 0 or t.max() > 1):
            raise FeedError(f"{what} holds values outside [0, 1]; loss 'bce' needs probabilities")
        return t

    def per_sample(self, head, target):
        if head.activation == "Sigmoid":
            z = head.logits
            elementwise = ops.softplus(z) - target * z
        else:
            p = ops.clip(head.output, np.float32(PROBABILITY_CLIP),
                         np.float32(1 - PROBABILITY_CLIP))
            elementwise = ops.neg(target * ops.log(p) + (1.0 - target) * ops.log(1.0 - p))
        return ops.reduce_mean(elementwise, _sample_axes(elementwise), keepdims=0)

    def correct(self, outputs, targets, classes):
        right = (outputs > 0.5) == (targets > 0.5)
        return right.reshape(len(right), -1).all(axis=1)


LOSSES: dict[str, type[Loss]] = {cls.name: cls for cls in (
    MeanSquaredError, CrossEntropy, BinaryCrossEntropy)}


def get_loss(loss) -> Loss:
    """A ``Loss`` from its name ("mse", "cross_entropy", "bce") or a ``Loss`` instance."""
    if isinstance(loss, Loss):
        return loss
    if isinstance(loss, str) and loss in LOSSES:
        return LOSSES[loss]()
    raise GraphcError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")


def accuracy(loss: Loss, outputs: np.ndarray, targets: np.ndarray, classes) -> float:
    """Fraction of samples predicted right (NaN when the loss defines no accuracy)."""
    right = loss.correct(outputs, targets, classes)
    if right is None or len(right) == 0:
        return float("nan")
    return float(np.mean(right))


__all__ = [
    "LOSSES",
    "BinaryCrossEntropy",
    "CrossEntropy",
    "Loss",
    "MeanSquaredError",
    "accuracy",
    "get_loss",
]
