"""Optimisers whose update rule is graph ops appended to the training-step graph.

``graphc.training`` builds one graph per model: forward, loss, backward (``graphc.grad``) and,
from here, for every parameter p with gradient g, the ops that compute the new parameter and the
new optimiser state (``update``). The step graph is compiled once; per step the host feeds the
current parameters and state and receives the new ones (two buffer sets used in turn).

Hyper-parameters that change during training are scalar graph inputs, so schedules never
recompile: ``lr`` for every optimiser, and Adam's bias corrections, which depend on the step
count. Hyper-parameters fixed for a fit (momentum, betas, eps, weight decay) are constants, which
the passes fold into the update's fused elementwise kernel.

The rules follow PyTorch's ``torch.optim`` exactly (so runs can be compared step by step):

* SGD: g' = g + wd p; with momentum, b' = mu b + g' (b starts at 0) and the step direction is b'
  (Nesterov: g' + mu b'); p' = p - lr d.
* Adam (Kingma & Ba 2015; weight decay as L2 added to the gradient, not AdamW):
  m' = b1 m + (1 - b1) g', v' = b2 v + (1 - b2) g'^2,
  p' = p - lr / (1 - b1^t) * m' / (sqrt(v') / sqrt(1 - b2^t) + eps).

The optimiser object owns its state arrays (``state``: ``<param>.<slot>`` -> array), like
PyTorch's, so a second ``fit`` with the same optimiser continues where the first stopped.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping

import numpy as np

from . import ops
from .errors import GraphcError
from .ir import Value

LR_INPUT = "lr"


class Optimizer(abc.ABC):
    """Base class: ``slots`` (state arrays per parameter, same shape), ``scalar_inputs`` (names
    of per-step scalar graph inputs), ``update`` (graph ops), ``scalar_values`` (their values)."""

    slots: tuple[str, ...] = ()
    scalar_inputs: tuple[str, ...] = (LR_INPUT,)

    def __init__(self, lr: float, weight_decay: float = 0.0):
        self.lr = _non_negative(lr, "lr")
        self.weight_decay = _non_negative(weight_decay, "weight_decay")
        self.state: dict[str, np.ndarray] = {}
        self.steps = 0

    def graph_key(self) -> tuple:
        """What the update graph depends on (everything but the per-step scalars)."""
        return (type(self).__name__, self.weight_decay)

    def init_state(self, params: Mapping[str, np.ndarray]) -> None:
        """Zero state for parameters that have none of the right shape (new or resized)."""
        for name, array in params.items():
            for slot in self.slots:
                key = f"{name}.{slot}"
                if key not in self.state or self.state[key].shape != array.shape:
                    self.state[key] = np.zeros_like(array, dtype=np.float32)

    def scalar_values(self, step: int) -> dict[str, np.ndarray]:
        """Per-step scalar feeds for step number ``step`` (counting from 1)."""
        return {LR_INPUT: np.array(self.lr, np.float32)}

    def _regularised(self, param: Value, grad: Value) -> Value:
        if self.weight_decay == 0.0:
            return grad
        return grad + param * np.float32(self.weight_decay)

    @abc.abstractmethod
    def update(self, param: Value, grad: Value, state: dict[str, Value],
               scalars: dict[str, Value]) -> tuple[Value, dict[str, Value]]:
        """Graph ops for one parameter: (new parameter, new state by slot)."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"

    def config(self) -> dict:
        return {"lr": self.lr, "weight_decay": self.weight_decay}


def _non_negative(value, what: str) -> float:
    value = float(value)
    if not value >= 0.0:
        raise GraphcError(f"optimiser {what} must be >= 0, got {value}")
    return value


class SGD(Optimizer):
    """Stochastic gradient descent with optional (Nesterov) momentum and L2 weight decay."""

    def __init__(self, lr: float = 0.01, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0):
        super().__init__(lr, weight_decay)
        self.momentum = _non_negative(momentum, "momentum")
        self.nesterov = bool(nesterov)
        if self.nesterov and self.momentum == 0.0:
            raise GraphcError("SGD with nesterov=True needs momentum > 0")
        self.slots = ("momentum",) if self.momentum else ()

    def graph_key(self):
        return super().graph_key() + (self.momentum, self.nesterov)

    def config(self):
        return {**super().config(), "momentum": self.momentum, "nesterov": self.nesterov}

    def update(self, param, grad, state, scalars):
        g = self._regularised(param, grad)
        if not self.momentum:
            return param - scalars[LR_INPUT] * g, {}
        mu = np.float32(self.momentum)
        buffer = state["momentum"] * mu + g
        direction = g + buffer * mu if self.nesterov else buffer
        return param - scalars[LR_INPUT] * direction, {"momentum": buffer}


class Adam(Optimizer):
    """Adam with bias correction; weight_decay adds L2 to the gradient (PyTorch's Adam)."""

    slots = ("m", "v")
    scalar_inputs = (LR_INPUT, "adam.bias_scale1", "adam.bias_scale2")

    def __init__(self, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        super().__init__(lr, weight_decay)
        self.beta1, self.beta2 = (float(b) for b in betas)
        if not (0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0):
            raise GraphcError(f"Adam betas must be in [0, 1), got {tuple(betas)}")
        self.eps = _non_negative(eps, "eps")

    def graph_key(self):
        return super().graph_key() + (self.beta1, self.beta2, self.eps)

    def config(self):
        return {**super().config(), "betas": (self.beta1, self.beta2), "eps": self.eps}

    def scalar_values(self, step):
        # 1 / (1 - b1^t) and 1 / sqrt(1 - b2^t), in float64 before rounding, as PyTorch
        return {LR_INPUT: np.array(self.lr, np.float32),
                "adam.bias_scale1": np.array(1.0 / (1.0 - self.beta1 ** step), np.float32),
                "adam.bias_scale2": np.array(1.0 / np.sqrt(1.0 - self.beta2 ** step),
                                             np.float32)}

    def update(self, param, grad, state, scalars):
        g = self._regularised(param, grad)
        b1, b2 = np.float32(self.beta1), np.float32(self.beta2)
        m = state["m"] * b1 + g * (np.float32(1) - b1)
        v = state["v"] * b2 + g * g * (np.float32(1) - b2)
        denominator = ops.sqrt(v) * scalars["adam.bias_scale2"] + np.float32(self.eps)
        step_size = scalars[LR_INPUT] * scalars["adam.bias_scale1"]
        return param - step_size * m / denominator, {"m": m, "v": v}


OPTIMIZERS = {"sgd": SGD, "adam": Adam}


def get_optimizer(optimizer) -> Optimizer:
    """An optimiser instance from an instance, or a name ("sgd", "adam") with defaults."""
    if isinstance(optimizer, Optimizer):
        return optimizer
    if isinstance(optimizer, str) and optimizer.lower() in OPTIMIZERS:
        return OPTIMIZERS[optimizer.lower()]()
    raise GraphcError(f"unknown optimizer {optimizer!r}; pass graphc.optim.SGD(...), "
                      f"graphc.optim.Adam(...) or one of {', '.join(OPTIMIZERS)}")


__all__ = ["LR_INPUT", "OPTIMIZERS", "SGD", "Adam", "Optimizer", "get_optimizer"]
