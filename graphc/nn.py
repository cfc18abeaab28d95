"""graphc.nn: layers that build graph fragments and own their parameters; Sequential models.

Design:

* A layer holds hyper-parameters and, once initialised for an input shape, its host arrays:
  ``params`` (trainable; the optimiser updates them) and ``buffers`` (state that the forward pass
  updates in training, e.g. BatchNorm's running statistics). Layers never run anything: a layer's
  ``forward(x, scope)`` adds its ops to the graph of ``x``.
* The ``Scope`` decides how arrays enter a graph. ``Sequential.build`` makes the *inference
  graph*: weights are ``Param`` nodes (``Constant`` when frozen, so that BatchNorm folds and GEMM
  weights pack at compile time). Program graphs (``graphc.training``: a training step, an
  evaluation) take every array as a graph *input* named ``<layer>.<key>``, so one compiled program
  serves every step while the arrays change; in training mode the scope also feeds Dropout masks
  and collects the new BatchNorm running statistics.
* Dropout in training multiplies by a mask that is a graph input (``<layer>.mask``), drawn on the
  host for every step from the fit's seeded numpy Generator and already scaled by 1/(1-p).
  ONNX Dropout's own mask is fixed by its ``seed`` attribute, so it would repeat every step; a
  fed mask differs per step, is reproducible from the seed, and every backend runs it (a Mul).
* BatchNorm2d in training normalises with batch statistics (mean and biased variance over N, H, W,
  decomposed into ReduceMean/Sub/Mul/Sqrt/Div so autodiff and every backend handle it); its
  running statistics follow PyTorch: ``new = (1 - momentum) * old + momentum * batch`` with the
  unbiased batch variance. Inference uses BatchNormalization with the running statistics.
* Layouts: Linear's weight is (in, out), so ``y = x @ W + b`` is a plain Gemm (no transpose of a
  run-time operand); Conv2d's weight is ONNX/PyTorch's (out, in, kh, kw). Inputs are NCHW.
* Initialisation: Glorot-uniform (Glorot & Bengio 2010: U(-a, a), a = sqrt(6 / (fan_in +
  fan_out))) or He-normal (He et al. 2015: N(0, 2 / fan_in)); ``init="auto"`` picks He when the
  next activation after the layer in its Sequential is ReLU/LeakyReLU, else Glorot. Biases start
  at zero. One seed drives one numpy Generator through the layers in order, so a seed fixes every
  weight.
* Persistence: ``save`` writes one ``.npz``: the arrays by name plus a small JSON architecture
  (layer types and constructor arguments) under ``__architecture__``; ``load`` rebuilds the
  layers from a fixed table of types, never by unpickling code.
"""

from __future__ import annotations

import abc
import json
import os
from collections.abc import Sequence
from typing import ClassVar

import numpy as np

from . import ops
from .errors import GraphBuildError, GraphcError, ModelFileError, ShapeError
from .ir import Graph, Value

INPUT_NAME = "x"
FORMAT = "graphc.nn/1"
INITS = ("auto", "glorot", "he")


# -- scopes: how a layer's arrays and modes enter a graph ---------------------------------------
class Scope:
    """Where a forward pass builds: the graph, training or inference, and how arrays enter it.

    ``as_inputs=False``: arrays become Param nodes (Constant nodes with ``freeze``).
    ``as_inputs=True``: arrays become graph inputs named ``<layer>.<key>``, listed in
    ``param_inputs``/``buffer_inputs``; training scopes add ``mask_inputs`` (Dropout) and record
    the new BatchNorm statistics in ``buffer_updates`` (buffer name -> Value).
    """

    def __init__(self, graph: Graph, *, training: bool = False, as_inputs: bool = False,
                 freeze: bool = False):
        if training and not as_inputs:
            raise GraphBuildError("a training scope feeds its arrays as graph inputs")
        self.graph = graph
        self.training = training
        self.as_inputs = as_inputs
        self.freeze = freeze
        self.param_inputs: dict[str, str] = {}    # array name -> graph input name
        self.buffer_inputs: dict[str, str] = {}
        self.mask_inputs: dict[str, Dropout] = {}  # mask input name -> the Dropout layer
        self.buffer_updates: dict[str, Value] = {}
        self._batch_size: Value | None = None

    def param(self, layer: Layer, key: str) -> Value:
        return self._array(layer, key, layer.params[key], self.param_inputs, trainable=True)

    def buffer(self, layer: Layer, key: str) -> Value:
        return self._array(layer, key, layer.buffers[key], self.buffer_inputs, trainable=False)

    def _array(self, layer, key, array, registry: dict, trainable: bool) -> Value:
        name = f"{layer.name}.{key}"
        if self.as_inputs:
            registry[name] = name
            return self.graph.input(name, array.shape)
        if self.freeze or not trainable:
            return self.graph.constant(array, name=name)
        return self.graph.param(array, name=name)

    def dropout_mask(self, layer: Dropout, x: Value) -> Value:
        name = f"{layer.name}.mask"
        self.mask_inputs[name] = layer
        return self.graph.input(name, (None,) + tuple(x.shape[1:]))

    def batch_size(self) -> Value:
        """The batch size as a float scalar input (BatchNorm's unbiased-variance factor)."""
        if self._batch_size is None:
            self._batch_size = self.graph.input("batch_size", ())
        return self._batch_size

    @property
    def uses_batch_size(self) -> bool:
        return self._batch_size is not None

    def update_buffer(self, layer: Layer, key: str, value: Value) -> None:
        self.buffer_updates[f"{layer.name}.{key}"] = value


# -- layers -------------------------------------------------------------------------------------
class Layer(abc.ABC):
    """Base class: ``config()`` (constructor arguments, JSON), ``initialise`` (arrays for an
    input shape), ``forward`` (ops on a graph)."""

    kind: ClassVar[str] = "Layer"
    has_params: ClassVar[bool] = False

    def __init__(self):
        self.name = self.kind.lower()
        self.params: dict[str, np.ndarray] = {}
        self.buffers: dict[str, np.ndarray] = {}

    def config(self) -> dict:
        return {}

    def initialise(self, in_shape: tuple, rng: np.random.Generator, init: str) -> None:
        """Create the arrays for per-sample input shape ``in_shape`` (default: none)."""

    @abc.abstractmethod
    def forward(self, x: Value, scope: Scope) -> Value:
        """Add the layer's ops after ``x``; returns the layer's output."""

    def error(self, message: str) -> ShapeError:
        return ShapeError(f"layer '{self.name}' ({self!r}): {message}")

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{self.kind}({args})"


def _glorot_uniform(rng, shape, fan_in: int, fan_out: int) -> np.ndarray:
    bound = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-bound, bound, shape).astype(np.float32)


def _he_normal(rng, shape, fan_in: int) -> np.ndarray:
    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)


def _check_init(init: str) -> str:
    if init not in INITS:
        raise GraphcError(f"init={init!r} is not one of {', '.join(INITS)}")
    return init


class Linear(Layer):
    """y = x @ W + b with W of shape (in_features, out_features)."""

    kind = "Linear"
    has_params = True

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 init: str = "auto"):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.bias = bool(bias)
        self.init = _check_init(init)

    def config(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias, "init": self.init}

    def initialise(self, in_shape, rng, init):
        if tuple(in_shape) != (self.in_features,):
            raise self.error(f"expects per-sample input ({self.in_features},), got "
                             f"{tuple(in_shape)} (add a Flatten before it?)")
        shape = (self.in_features, self.out_features)
        if init == "he":
            self.params["weight"] = _he_normal(rng, shape, self.in_features)
        else:
            self.params["weight"] = _glorot_uniform(rng, shape, *shape)
        if self.bias:
            self.params["bias"] = np.zeros(self.out_features, np.float32)

    def forward(self, x, scope):
        weight = scope.param(self, "weight")
        return ops.gemm(x, weight, scope.param(self, "bias") if self.bias else None)


def _pair(value, what: str) -> tuple[int, int]:
    pair = (value, value) if np.isscalar(value) else tuple(value)
    if len(pair) != 2 or any(int(v) != v or v < 0 for v in pair):
        raise GraphcError(f"{what} must be an int or a pair of ints >= 0, got {value!r}")
    return int(pair[0]), int(pair[1])


class Conv2d(Layer):
    """2-D convolution over NCHW input; weight (out, in, kh, kw), bias (out,)."""

    kind = "Conv2d"
    has_params = True

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 bias: bool = True, init: str = "auto"):
        super().__init__()
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = _pair(stride, "stride")
        self.padding = _pair(padding, "padding")
        self.bias = bool(bias)
        self.init = _check_init(init)

    def config(self) -> dict:
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride),
                "padding": list(self.padding), "bias": self.bias, "init": self.init}

    def initialise(self, in_shape, rng, init):
        if len(in_shape) != 3 or in_shape[0] != self.in_channels:
            raise self.error(f"expects per-sample input ({self.in_channels}, H, W), got "
                             f"{tuple(in_shape)}")
        kh, kw = self.kernel_size
        shape = (self.out_channels, self.in_channels, kh, kw)
        fan_in, fan_out = self.in_channels * kh * kw, self.out_channels * kh * kw
        if init == "he":
            self.params["weight"] = _he_normal(rng, shape, fan_in)
        else:
            self.params["weight"] = _glorot_uniform(rng, shape, fan_in, fan_out)
        if self.bias:
            self.params["bias"] = np.zeros(self.out_channels, np.float32)

    def forward(self, x, scope):
        weight = scope.param(self, "weight")
        bias = scope.param(self, "bias") if self.bias else None
        ph, pw = self.padding
        return ops.conv(x, weight, bias, kernel_shape=self.kernel_size,
                        strides=self.stride, pads=[ph, pw, ph, pw])


class _Pool2d(Layer):
    op = ""

    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__()
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = self.kernel_size if stride is None else _pair(stride, "stride")
        self.padding = _pair(padding, "padding")

    def config(self) -> dict:
        return {"kernel_size": list(self.kernel_size), "stride": list(self.stride),
                "padding": list(self.padding)}

    def forward(self, x, scope):
        ph, pw = self.padding
        return ops.apply(self.op, (x,), kernel_shape=self.kernel_size, strides=self.stride,
                         pads=[ph, pw, ph, pw])


class MaxPool2d(_Pool2d):
    """Max over kernel_size windows (stride defaults to the kernel size)."""

    kind = "MaxPool2d"
    op = "MaxPool"


class AvgPool2d(_Pool2d):
    """Mean over kernel_size windows; padded taps are not counted (ONNX's default)."""

    kind = "AvgPool2d"
    op = "AveragePool"


class Flatten(Layer):
    """(N, d1, d2, ...) -> (N, d1 * d2 * ...)."""

    kind = "Flatten"

    def forward(self, x, scope):
        return ops.flatten(x, axis=1)


class BatchNorm2d(Layer):
    """Per-channel normalisation of NCHW input; params weight/bias (gamma/beta), buffers
    running_mean/running_var (see the module docstring for the training form)."""

    kind = "BatchNorm2d"
    has_params = True

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.num_features, self.eps, self.momentum = int(num_features), float(eps), float(momentum)
        if not 0.0 <= self.momentum <= 1.0:
            raise GraphcError(f"BatchNorm2d momentum must be in [0, 1], got {momentum}")

    def config(self) -> dict:
        return {"num_features": self.num_features, "eps": self.eps, "momentum": self.momentum}

    def initialise(self, in_shape, rng, init):
        if len(in_shape) != 3 or in_shape[0] != self.num_features:
            raise self.error(f"expects per-sample input ({self.num_features}, H, W), got "
                             f"{tuple(in_shape)}")
        c = self.num_features
        self.params = {"weight": np.ones(c, np.float32), "bias": np.zeros(c, np.float32)}
        self.buffers = {"running_mean": np.zeros(c, np.float32),
                        "running_var": np.ones(c, np.float32)}

    def forward(self, x, scope):
        gamma, beta = scope.param(self, "weight"), scope.param(self, "bias")
        mean, var = scope.buffer(self, "running_mean"), scope.buffer(self, "running_var")
        if not scope.training:
            return ops.batch_normalization(x, gamma, beta, mean, var, epsilon=self.eps)
        return self._train_forward(x, scope, gamma, beta, mean, var)

    def _train_forward(self, x, scope, gamma, beta, running_mean, running_var):
        channel = np.array([1, self.num_features, 1, 1], np.int64)
        axes = np.array([0, 2, 3], np.int64)
        batch_mean = ops.reduce_mean(x, axes, keepdims=1)
        centred = x - batch_mean
        batch_var = ops.reduce_mean(centred * centred, axes, keepdims=1)  # biased, as PyTorch
        normalised = centred / ops.sqrt(batch_var + np.float32(self.eps))
        y = normalised * ops.reshape(gamma, channel) + ops.reshape(beta, channel)
        # running statistics use the unbiased variance: var * n / (n - 1), n = N * H * W
        count = scope.batch_size() * np.float32(x.shape[2] * x.shape[3])
        unbiased = ops.reshape(batch_var, np.array([-1], np.int64)) * (count / (count - 1.0))
        m = np.float32(self.momentum)
        flat_mean = ops.reshape(batch_mean, np.array([-1], np.int64))
        scope.update_buffer(self, "running_mean", running_mean * (1 - m) + flat_mean * m)
        scope.update_buffer(self, "running_var", running_var * (1 - m) + unbiased * m)
        return y


class Dropout(Layer):
    """Zeroes each element with probability p in training (scaling the rest by 1/(1-p));
    the identity in inference."""

    kind = "Dropout"

    def __init__(self, p: float = 0.5):
        super().__init__()
        self.p = float(p)
        if not 0.0 <= self.p < 1.0:
            raise GraphcError(f"Dropout p must be in [0, 1), got {p}")

    def config(self) -> dict:
        return {"p": self.p}

    def forward(self, x, scope):
        if not scope.training or self.p == 0.0:
            return x
        return x * scope.dropout_mask(self, x)


def draw_dropout_mask(rng: np.random.Generator, p: float, out: np.ndarray) -> np.ndarray:
    """Fill ``out`` with a fresh inverted-dropout mask: 0 with probability p, else 1/(1-p)."""
    keep = rng.random(out.shape, dtype=np.float32) >= p
    return np.multiply(keep, np.float32(1.0 / (1.0 - p)), out=out)


class _Activation(Layer):
    op = ""

    def forward(self, x, scope):
        return ops.apply(self.op, (x,))


class ReLU(_Activation):
    kind, op = "ReLU", "Relu"


class Sigmoid(_Activation):
    kind, op = "Sigmoid", "Sigmoid"


class Tanh(_Activation):
    kind, op = "Tanh", "Tanh"


class LeakyReLU(Layer):
    kind = "LeakyReLU"

    def __init__(self, negative_slope: float = 0.01):
        super().__init__()
        self.negative_slope = float(negative_slope)

    def config(self) -> dict:
        return {"negative_slope": self.negative_slope}

    def forward(self, x, scope):
        return ops.leaky_relu(x, alpha=self.negative_slope)


class Softmax(Layer):
    kind = "Softmax"

    def __init__(self, axis: int = -1):
        super().__init__()
        self.axis = int(axis)

    def config(self) -> dict:
        return {"axis": self.axis}

    def forward(self, x, scope):
        return ops.softmax(x, axis=self.axis)


LAYER_TYPES: dict[str, type[Layer]] = {cls.kind: cls for cls in (
    Linear, Conv2d, MaxPool2d, AvgPool2d, Flatten, BatchNorm2d, Dropout, ReLU, Sigmoid, Tanh,
    LeakyReLU, Softmax)}
_RELU_LIKE = (ReLU, LeakyReLU)
_TRANSPARENT = (BatchNorm2d, Dropout, Flatten, MaxPool2d, AvgPool2d)  # skipped by init="auto"


# -- Sequential ---------------------------------------------------------------------------------
class Head:
    """What a loss needs to know about the model's last layer: its output, and for a final
    Softmax or Sigmoid the value before it (so that losses work on logits, stably)."""

    def __init__(self, output: Value, activation: str | None = None, logits: Value | None = None):
        self.output, self.activation, self.logits = output, activation, logits


class Sequential:
    """Layers applied in order; the model object of the training API.

    ``input_shape`` (per sample, no batch dim) may be given now or is taken from the first data
    the model sees; ``seed`` fixes the initial weights. Layers are named ``<kind><index>``
    (``linear0``, ``relu1``, ...), and their arrays ``<layer>.<key>`` (``linear0.weight``).
    """

    def __init__(self, *layers: Layer, input_shape: Sequence[int] | None = None, seed: int = 0,
                 name: str = "sequential"):
        if len(layers) == 1 and isinstance(layers[0], (list, tuple)):
            layers = tuple(layers[0])
        for i, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                raise GraphBuildError(f"Sequential item {i} is {type(layer).__name__}, "
                                      "not a graphc.nn layer")
            layer.name = f"{layer.kind.lower()}{i}"
        if not layers:
            raise GraphBuildError("Sequential needs at least one layer")
        self.layers = list(layers)
        self.seed = int(seed)
        self.name = name
        self.input_shape: tuple | None = None
        self.output_shape: tuple | None = None
        self.training_config: dict = {}   # loss of the last fit (evaluate's default)
        self._programs: dict = {}          # compiled programs, see graphc.training
        if input_shape is not None:
            self.initialise(input_shape)

    # -- arrays -----------------------------------------------------------------------------------
    def initialise(self, input_shape: Sequence[int]) -> None:
        """Create every layer's arrays for per-sample ``input_shape`` from the seed."""
        shape = tuple(int(d) for d in input_shape)
        rng = np.random.default_rng(self.seed)
        scratch = Graph("shapes")
        x = scratch.input(INPUT_NAME, (None,) + shape)
        scope = Scope(scratch)
        for i, layer in enumerate(self.layers):
            layer.params, layer.buffers = {}, {}
            layer.initialise(tuple(x.shape[1:]), rng, self._init_for(i))
            x = layer.forward(x, scope)  # the ops' shape rules give the next input shape
        self.input_shape, self.output_shape = shape, tuple(x.shape[1:])
        self._programs.clear()

    def ensure_initialised(self, input_shape: Sequence[int]) -> None:
        shape = tuple(int(d) for d in input_shape)
        if self.input_shape is None:
            self.initialise(shape)
        elif shape != self.input_shape:
            raise ShapeError(f"model '{self.name}' takes samples of shape {self.input_shape}, "
                             f"got {shape}")

    def _init_for(self, index: int) -> str:
        layer = self.layers[index]
        init = getattr(layer, "init", "auto")
        if init != "auto":
            return init
        for nxt in self.layers[index + 1:]:
            if isinstance(nxt, _RELU_LIKE):
                return "he"
            if not isinstance(nxt, _TRANSPARENT):
                break
        return "glorot"

    def _require_initialised(self) -> None:
        if self.input_shape is None:
            raise GraphcError(f"model '{self.name}' has no input shape yet: pass input_shape= "
                              "or fit it on data first")

    def parameters(self) -> dict[str, np.ndarray]:
        """Trainable arrays by name (``linear0.weight``), in layer order."""
        return {f"{layer.name}.{k}": v for layer in self.layers for k, v in layer.params.items()}

    def buffers(self) -> dict[str, np.ndarray]:
        """Non-trainable state (BatchNorm running statistics) by name."""
        return {f"{layer.name}.{k}": v for layer in self.layers for k, v in layer.buffers.items()}

    def state_dict(self) -> dict[str, np.ndarray]:
        return {**self.parameters(), **self.buffers()}

    def load_state_dict(self, arrays: dict, source: str = "state dict") -> None:
        """Replace every array by the one of the same name (shapes must match)."""
        self._require_initialised()
        for layer in self.layers:
            for store in (layer.params, layer.buffers):
                for key, old in store.items():
                    name = f"{layer.name}.{key}"
                    if name not in arrays:
                        raise GraphcError(f"{source} lacks array '{name}'")
                    new = np.asarray(arrays[name])
                    if new.shape != old.shape:
                        raise ShapeError(f"{source}: array '{name}' has shape {new.shape}, "
                                         f"the model needs {old.shape}")
                    store[key] = np.ascontiguousarray(new, dtype=np.float32)

    def parameter_count(self) -> int:
        return sum(int(a.size) for a in self.parameters().values())

    # -- graphs -----------------------------------------------------------------------------------
    def forward(self, x: Value, scope: Scope) -> Head:
        """Add every layer to ``x``'s graph; returns the head (output, final activation)."""
        before = x
        for layer in self.layers:
            before, x = x, layer.forward(x, scope)
        last = self.layers[-1]
        if isinstance(last, (Softmax, Sigmoid)):
            return Head(x, last.kind, before)
        return Head(x)

    def build(self, input_shape: Sequence[int] | None = None, *, freeze: bool = False) -> Graph:
        """The inference graph: input ``x`` (batch dim symbolic), weights as Param nodes
        (Constants with ``freeze``), one output."""
        if input_shape is not None:
            self.ensure_initialised(input_shape)
        self._require_initialised()
        graph = Graph(self.name)
        x = graph.input(INPUT_NAME, (None,) + self.input_shape)
        graph.output(self.forward(x, Scope(graph, freeze=freeze)).output)
        return graph

    # -- training API (graphc.training does the work) --------------------------------------------
    def fit(self, X, y, **options):
        """Train on ``X``, ``y``; see ``graphc.training.fit`` for the options. Returns History."""
        from .training import fit

        return fit(self, X, y, **options)

    def evaluate(self, X, y, **options):
        """(loss, accuracy) on ``X``, ``y``; see ``graphc.training.evaluate``."""
        from .training import evaluate

        return evaluate(self, X, y, **options)

    def predict(self, X, **options) -> np.ndarray:
        """The model's outputs for ``X`` as a numpy array; see ``graphc.training.predict``."""
        from .training import predict

        return predict(self, X, **options)

    def export_onnx(self, path=None, opset: int | None = None):
        """The inference graph as ONNX (weights as initializers); returns the ModelProto."""
        from .onnx_export import export_onnx

        return export_onnx(self.build(), path, opset=opset)

    # -- persistence ------------------------------------------------------------------------------
    def architecture(self) -> dict:
        return {"format": FORMAT, "name": self.name, "seed": self.seed,
                "input_shape": list(self.input_shape) if self.input_shape else None,
                "layers": [{"type": layer.kind, "config": layer.config()}
                           for layer in self.layers]}

    def save(self, path) -> None:
        """Write the arrays and the JSON architecture to one ``.npz`` file."""
        self._require_initialised()
        arrays = dict(self.state_dict())
        arrays["__architecture__"] = np.array(json.dumps(self.architecture()))
        with open(path, "wb") as f:  # np.savez would append ".npz" to a path without it
            np.savez(f, **arrays)

    def __repr__(self) -> str:
        body = "".join(f"\n  ({layer.name}): {layer!r}" for layer in self.layers)
        return f"Sequential({body}\n)"


def load(path) -> Sequential:
    """Read a model written by ``Sequential.save``."""
    label = os.fspath(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise ModelFileError(f"model file '{label}' does not exist") from None
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"'{label}' is not a graphc model file (.npz): {exc}") from None
    if "__architecture__" not in arrays:
        raise ModelFileError(f"'{label}' has no __architecture__ entry: not saved by graphc.nn")
    try:
        arch = json.loads(str(arrays.pop("__architecture__")))
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"'{label}': the architecture is not valid JSON: {exc}") from None
    if not isinstance(arch, dict) or arch.get("format") != FORMAT:
        raise ModelFileError(f"'{label}': unknown architecture format "
                             f"{arch.get('format') if isinstance(arch, dict) else arch!r}")
    model = Sequential(*_layers_from(arch, label), seed=arch.get("seed", 0),
                       name=arch.get("name", "sequential"))
    if arch.get("input_shape") is not None:
        model.initialise(arch["input_shape"])
        try:
            model.load_state_dict(arrays, source=f"model file '{label}'")
        except GraphcError as exc:
            raise ModelFileError(str(exc)) from None
    return model


def _layers_from(arch: dict, label: str) -> list[Layer]:
    layers = []
    for i, spec in enumerate(arch.get("layers", [])):
        cls = LAYER_TYPES.get(spec.get("type"))
        if cls is None:
            raise ModelFileError(f"'{label}': layer {i} has unknown type {spec.get('type')!r} "
                                 f"(known: {', '.join(LAYER_TYPES)})")
        try:
            layers.append(cls(**spec.get("config", {})))
        except (TypeError, ValueError, GraphcError) as exc:
            raise ModelFileError(f"'{label}': layer {i} ({spec.get('type')}): {exc}") from None
    return layers


__all__ = ["AvgPool2d", "BatchNorm2d", "Conv2d", "Dropout", "Flatten", "Layer", "LeakyReLU",
           "Linear", "MaxPool2d", "ReLU", "Scope", "Sequential", "Sigmoid", "Softmax", "Tanh",
           "load"]
