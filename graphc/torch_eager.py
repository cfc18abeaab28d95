"""Run a graphc ``Graph`` with PyTorch eager ops, node by node (the benchmark's PyTorch column).

``to_torch(graph)`` translates every node once into a closure over ``torch.nn.functional``
calls; calling the result runs the closures in topological order under
``torch.inference_mode()``. The translation answers "how fast is the same network in PyTorch
eager on this CPU", so it calls the op PyTorch itself would use (``F.conv2d``, ``torch.addmm``,
``F.max_pool2d``, ``F.batch_norm``...) and does no graph optimisation of its own, except that a
``ConstantOfShape`` of a constant shape (the weights of the light ONNX models) is built once.

Geometry is resolved at translation time by graphc's own shape rules (``window_geometry`` for
pads/``auto_pad``/``ceil_mode``, the stored output types for Reshape/Split), so the translation
cannot drift from graphc's definition of an op. Where PyTorch's native padding matches ONNX
(symmetric pads no larger than half the window) it is used; otherwise the input is padded
explicitly with ``F.pad`` first. ``torch`` is imported lazily: graphc imports without it.

An op with no translation (or an attribute PyTorch has no form for, e.g. MaxPool's Indices or
training-mode BatchNormalization) raises ``TorchTranslationError`` naming the op and node.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping

import numpy as np

from .errors import GraphcError, UnsupportedOpError
from .interp import check_feeds
from .ir import CONSTANT_OPS, INPUT, Graph, Node
from .ops import registry
from .ops.convolution import window_geometry
from .ops.pool import _window_counts, pool_window
from .ops.registry import OpCall
from .ops.rules import normalize_axes, normalize_axis
from .ops.shapes import _clamp_slice, _slice_params


class TorchTranslationError(UnsupportedOpError):
    """A node the PyTorch eager translation cannot express."""


class TorchUnavailableError(GraphcError):
    """PyTorch is not installed (it is an optional extra of graphc)."""


def torch_module():
    """``torch``, or ``TorchUnavailableError`` when it is not installed."""
    try:
        import torch
    except ImportError as exc:
        raise TorchUnavailableError(f"PyTorch is not installed ({exc}); `pip install torch` "
                                    "(CPU wheel) to run graphs with PyTorch") from None
    return torch


# A translator gets the node's OpCall (static input types, constant input values) and result
# types and returns a function of the node's inputs as tensors (None for absent ones).
Translator = Callable[[OpCall, tuple], Callable]
_TRANSLATORS: dict[str, Translator] = {}


def _translates(*ops: str):
    def register(translator: Translator) -> Translator:
        for op in ops:
            _TRANSLATORS[op] = translator
        return translator
    return register


def translatable_ops() -> list[str]:
    return sorted(_TRANSLATORS)


class TorchFunction:
    """A graph translated to PyTorch eager; ``fn(feeds)`` returns numpy arrays like
    ``graphc.interpret``. ``run_tensors`` keeps torch tensors (no conversion)."""

    def __init__(self, graph: Graph, constants: dict, steps: list):
        self.graph = graph
        self._constants = constants
        self._steps = steps  # (node name, function, input names, output names)

    def run_tensors(self, tensors: Mapping[str, object]) -> list:
        torch = torch_module()
        env = dict(self._constants)
        env.update(tensors)
        with torch.inference_mode():
            for _, fn, inputs, outputs in self._steps:
                results = fn(*[None if v is None else env[v] for v in inputs])
                if len(outputs) == 1:
                    results = (results,)
                for value, result in zip(outputs, results):
                    if value is not None:
                        env[value] = result
        return [env[v] for v in self.graph.outputs]

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        torch = torch_module()
        arrays = check_feeds(self.graph, feeds)
        tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
        return [t.numpy() for t in self.run_tensors(tensors)]


def to_torch(graph: Graph, device: str | None = None) -> TorchFunction:
    """Translate ``graph`` node by node; raises ``TorchTranslationError`` for an op with no
    PyTorch form, naming the op and node. ``device`` (e.g. "cuda") places the graph's constants
    there; ``run_tensors`` then takes input tensors on that device."""
    torch = torch_module()
    constants, steps = {}, []
    for node in graph.nodes():
        if node.op == INPUT:
            continue
        if node.op in CONSTANT_OPS:
            constants[node.output] = torch.from_numpy(np.array(node.attrs["value"]))
            if device is not None:
                constants[node.output] = constants[node.output].to(device)
            continue
        translator = _TRANSLATORS.get(node.op)
        if translator is None:
            raise TorchTranslationError(f"{node.op} node '{node.name}': no PyTorch translation "
                                        f"(translated ops: {', '.join(translatable_ops())})")
        types = tuple(t if v is not None else None for v, t in zip(node.outputs, node.types))
        fn = translator(_call_of(graph, node), types)
        steps.append((node.name, fn, node.inputs, node.outputs))
    return TorchFunction(graph, constants, steps)


def _call_of(graph: Graph, node: Node) -> OpCall:
    opdef = registry.get(node.op, node.name)
    in_types = [graph.type_of(v) if v is not None else None for v in node.inputs]
    return registry.make_call(opdef, node.name, node.attrs, in_types,
                              [graph.constant_value(v) for v in node.inputs], len(node.outputs))


def _refuse(call: OpCall, why: str) -> TorchTranslationError:
    return TorchTranslationError(f"{call.op} node '{call.node}': {why}")


def _const_ints(call: OpCall, i: int, what: str) -> list[int] | None:
    """Constant integer input ``i`` as a list (None when the slot is empty)."""
    if not call.has_input(i):
        return None
    value = call.in_values[i] if i < len(call.in_values) else None
    if value is None:
        raise _refuse(call, f"input {i} ({what}) must be a constant for the PyTorch translation")
    return [int(v) for v in np.asarray(value).ravel()]


def _has_extra_outputs(out_types: tuple) -> bool:
    """Whether the node produces an optional output beyond its first."""
    return any(t is not None for t in out_types[1:])


def _static_dims(call: OpCall, shape, what: str) -> tuple[int, ...]:
    if not all(isinstance(d, int) for d in shape):
        raise _refuse(call, f"{what} {tuple(shape)} has symbolic dims; fix the input shapes "
                            "(passes.infer_shapes.with_input_shapes) before translating")
    return tuple(shape)


# -- elementwise ---------------------------------------------------------------------------------
def _unary(name: str) -> Translator:
    def translate(call, out_types):
        torch = torch_module()
        return getattr(torch, name)
    return translate


for _op, _name in (("Relu", "relu"), ("Sigmoid", "sigmoid"), ("Tanh", "tanh"), ("Abs", "abs"),
                   ("Neg", "neg"), ("Exp", "exp"), ("Log", "log"), ("Sqrt", "sqrt"),
                   ("Reciprocal", "reciprocal"), ("Erf", "erf")):
    _translates(_op)(_unary(_name))


@_translates("Add", "Sub", "Mul", "Div")
def _binary(call, out_types):
    torch = torch_module()
    if call.op == "Div" and out_types[0].dtype[0] in "iu":
        return functools.partial(torch.div, rounding_mode="trunc")  # ONNX truncates
    return {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": torch.div}[call.op]


@_translates("Sum", "Mean", "Max", "Min")
def _variadic(call, out_types):
    torch = torch_module()
    pair = {"Sum": torch.add, "Mean": torch.add, "Max": torch.maximum,
            "Min": torch.minimum}[call.op]
    count = len(call.in_types)

    def run(*xs):
        y = functools.reduce(pair, xs)
        return y / count if call.op == "Mean" else y
    return run


@_translates("LeakyRelu", "Elu", "Selu", "HardSigmoid", "HardSwish", "Softplus", "Gelu")
def _activation(call, out_types):
    F = torch_module().nn.functional
    a = call.attrs
    if call.op == "LeakyRelu":
        return functools.partial(F.leaky_relu, negative_slope=a["alpha"])
    if call.op == "Elu":
        return functools.partial(F.elu, alpha=a["alpha"])
    if call.op == "Selu":
        return lambda x: a["gamma"] * F.elu(x, alpha=a["alpha"])
    if call.op == "HardSigmoid":
        return lambda x: (a["alpha"] * x + a["beta"]).clamp(0.0, 1.0)
    if call.op == "Gelu":
        return functools.partial(F.gelu, approximate=a["approximate"])
    return {"HardSwish": F.hardswish, "Softplus": F.softplus}[call.op]


@_translates("Clip")
def _clip(call, out_types):
    torch = torch_module()
    present = [i for i in (1, 2) if call.has_input(i)]
    if all(call.in_values[i] is not None for i in present):  # constant bounds: plain floats
        low, high = (call.in_values[i].item() if call.has_input(i) else None for i in (1, 2))
        return lambda x, *_: torch.clamp(x, low, high)
    return lambda x, low=None, high=None: torch.clamp(x, low, high)


# -- linear algebra -------------------------------------------------------------------------------
@_translates("Gemm")
def _gemm(call, out_types):
    torch = torch_module()
    alpha, beta = call["alpha"], call["beta"]
    trans_a, trans_b = call["transA"], call["transB"]

    def run(a, b, c=None):
        a = a.t() if trans_a else a
        b = b.t() if trans_b else b
        if c is None:
            return torch.mm(a, b) if alpha == 1.0 else alpha * torch.mm(a, b)
        return torch.addmm(c, a, b, beta=beta, alpha=alpha)  # what nn.Linear runs
    return run


@_translates("MatMul")
def _matmul(call, out_types):
    return torch_module().matmul


# -- convolution and pooling ---------------------------------------------------------------------
def _torch_pads(pads: tuple[int, ...]) -> list[int]:
    """ONNX pads (begins, then ends, first axis first) as F.pad's (last axis first)."""
    n = len(pads) // 2
    out: list[int] = []
    for i in reversed(range(n)):
        out += [pads[i], pads[n + i]]
    return out


def _native_padding(pads: tuple[int, ...], limits) -> tuple[int, ...] | None:
    """Symmetric pads PyTorch's own ``padding=`` accepts (each within its limit), else None."""
    n = len(pads) // 2
    begins, ends = pads[:n], pads[n:]
    if begins == ends and all(p <= limit for p, limit in zip(begins, limits)):
        return tuple(begins)
    return None


def _functional(call, family: str, spatial: int):
    if spatial not in (1, 2, 3):
        raise _refuse(call, f"{spatial} spatial axes; PyTorch has {family}1d/2d/3d only")
    return getattr(torch_module().nn.functional, f"{family}{spatial}d")


@_translates("Conv")
def _conv(call, out_types):
    F = torch_module().nn.functional
    x = call.in_types[0]
    kernel = call.static_shape(1)[2:]
    win = window_geometry(call, x.shape[2:], kernel)
    conv = _functional(call, "conv", len(kernel))
    group = call["group"]
    padding = _native_padding(win.pads, [math.inf] * len(kernel))
    if padding is not None:
        return lambda x, w, b=None: conv(x, w, b, win.strides, padding, win.dilations, group)
    widths = _torch_pads(win.pads)
    return lambda x, w, b=None: conv(F.pad(x, widths), w, b, win.strides, 0, win.dilations,
                                     group)


def _explicit_pads(win, spatial) -> list[int]:
    """F.pad widths that give the window exactly the extent its output size reads (ONNX's
    ceil_mode included); negative end widths crop what no window reaches."""
    n = len(spatial)
    ends = [(win.out[i] - 1) * win.strides[i] + win.effective[i] - win.pads[i] - spatial[i]
            for i in range(n)]
    return _torch_pads(tuple(win.pads[:n]) + tuple(ends))


@_translates("MaxPool")
def _max_pool(call, out_types):
    F = torch_module().nn.functional
    if _has_extra_outputs(out_types):
        raise _refuse(call, "the Indices output has no PyTorch translation (ONNX flattens "
                            "indices differently from return_indices)")
    win = pool_window(call)
    pool = _functional(call, "max_pool", len(win.kernel))
    spatial = _static_dims(call, call.in_types[0].shape[2:], "input spatial shape")
    padding = _native_padding(win.pads, [e // 2 for e in win.effective])
    if padding is not None:
        ceil = bool(call["ceil_mode"]) and call["auto_pad"] == "NOTSET"
        return lambda x: pool(x, win.kernel, win.strides, padding, win.dilations, ceil)
    widths = _explicit_pads(win, spatial)
    return lambda x: pool(F.pad(x, widths, value=-math.inf), win.kernel, win.strides, 0,
                          win.dilations)


@_translates("AveragePool")
def _average_pool(call, out_types):
    torch = torch_module()
    F = torch.nn.functional
    win = pool_window(call)
    spatial = _static_dims(call, call.in_types[0].shape[2:], "input spatial shape")
    include_pad = call["count_include_pad"] == 1
    padding = _native_padding(win.pads, [k // 2 for k in win.kernel])
    if padding is not None and set(win.dilations) == {1}:
        pool = _functional(call, "avg_pool", len(win.kernel))
        ceil = bool(call["ceil_mode"]) and call["auto_pad"] == "NOTSET"
        return lambda x: pool(x, win.kernel, win.strides, padding, ceil, include_pad)
    # Dilated or asymmetric: window sums as a depthwise conv with a ones kernel, divided by
    # graphc's own per-window tap counts (which padding taps count is ONNX's rule).
    conv = _functional(call, "conv", len(win.kernel))
    channels = _static_dims(call, call.in_types[0].shape[1:2], "channel dim")[0]
    dtype = getattr(torch, np.dtype(call.in_types[0].np_dtype).name)
    ones = torch.ones((channels, 1) + win.kernel, dtype=dtype)
    counts = torch.from_numpy(_window_counts(win, spatial, include_pad).astype(ones.numpy().dtype))
    widths = _explicit_pads(win, spatial)
    return lambda x: conv(F.pad(x, widths), ones, None, win.strides, 0, win.dilations,
                          channels) / counts


@_translates("GlobalAveragePool", "GlobalMaxPool")
def _global_pool(call, out_types):
    axes = tuple(range(2, call.in_types[0].rank))
    if call.op == "GlobalAveragePool":
        return lambda x: x.mean(dim=axes, keepdim=True)
    return lambda x: x.amax(dim=axes, keepdim=True)


# -- normalisation --------------------------------------------------------------------------------
@_translates("BatchNormalization")
def _batch_norm(call, out_types):
    F = torch_module().nn.functional
    if call["training_mode"] or _has_extra_outputs(out_types):
        raise _refuse(call, "training-mode BatchNormalization is not translated (inference "
                            "only)")
    eps = call["epsilon"]
    return lambda x, scale, b, mean, var: F.batch_norm(x, mean, var, scale, b, False, 0.0, eps)


@_translates("LRN")
def _lrn(call, out_types):
    F = torch_module().nn.functional
    size, alpha, beta, bias = call["size"], call["alpha"], call["beta"], call["bias"]
    before = (size - 1) // 2  # ONNX: floor((size-1)/2) channels before c (F.local_response_norm
    after = size - 1 - before  # puts the larger half before c, which differs for even sizes)

    def run(x):
        squares = (x * x).reshape(x.shape[0], 1, x.shape[1], -1)
        mean = F.avg_pool2d(F.pad(squares, [0, 0, before, after]), (size, 1), stride=1)
        return x / (bias + alpha * mean.reshape(x.shape)).pow(beta)
    return run


@_translates("Softmax", "LogSoftmax")
def _softmax(call, out_types):
    F = torch_module().nn.functional
    axis = normalize_axis(call["axis"], call.in_types[0].rank, call)
    fn = F.softmax if call.op == "Softmax" else F.log_softmax
    return functools.partial(fn, dim=axis)


@_translates("Dropout")
def _dropout(call, out_types):
    torch = torch_module()
    training = call.in_values[2] if call.has_input(2) else np.zeros((), bool)
    if training is None or bool(np.asarray(training)):
        raise _refuse(call, "training_mode must be a constant false (inference only)")
    if _has_extra_outputs(out_types):  # inference keeps every element: the mask is all true
        return lambda x, *_: (x, torch.ones_like(x, dtype=torch.bool))
    return lambda x, *_: x


# -- shapes ---------------------------------------------------------------------------------------
@_translates("Identity")
def _identity(call, out_types):
    return lambda x: x


@_translates("Reshape", "Flatten", "Squeeze", "Unsqueeze")
def _reshape(call, out_types):
    """All four only reshape: the result's (static) type gives the shape; one symbolic dim
    (a batch) becomes -1."""
    shape = out_types[0].shape
    symbolic = [d for d in shape if not isinstance(d, int)]
    if len(symbolic) > 1:
        _static_dims(call, shape, "result shape")
    target = tuple(-1 if not isinstance(d, int) else d for d in shape)
    return lambda x, *_: x.reshape(target)


@_translates("Transpose")
def _transpose(call, out_types):
    rank = call.in_types[0].rank
    perm = tuple(call["perm"]) if call["perm"] else tuple(reversed(range(rank)))
    return lambda x: x.permute(perm)


@_translates("Concat")
def _concat(call, out_types):
    torch = torch_module()
    axis = normalize_axis(call["axis"], call.in_types[0].rank, call)
    return lambda *xs: torch.cat(xs, dim=axis)


@_translates("Split")
def _split(call, out_types):
    torch = torch_module()
    axis = normalize_axis(call["axis"], call.in_types[0].rank, call)
    sizes = _static_dims(call, [t.shape[axis] for t in out_types], "split sizes")
    return lambda x, *_: torch.split(x, list(sizes), dim=axis)


@_translates("Slice")
def _slice(call, out_types):
    x = call.in_types[0]
    shape = _static_dims(call, x.shape, "input shape")
    starts, ends = _const_ints(call, 1, "starts"), _const_ints(call, 2, "ends")
    params = _slice_params(call, x.rank, starts, ends, _const_ints(call, 3, "axes"),
                           _const_ints(call, 4, "steps"))
    index, flips = [slice(None)] * x.rank, []
    for axis, start, end, step in params:
        start, end, length = _clamp_slice(shape[axis], start, end, step)
        if length == 0:
            index[axis] = slice(0, 0)
        elif step > 0:
            index[axis] = slice(start, end, step)
        else:  # torch has no negative steps: take the same elements forwards, then flip
            index[axis] = slice(start + step * (length - 1), start + 1, -step)
            flips.append(axis)
    index = tuple(index)
    if flips:
        return lambda x, *_: x[index].flip(flips)
    return lambda x, *_: x[index]


@_translates("Pad")
def _pad(call, out_types):
    torch = torch_module()
    x = call.in_types[0]
    pads = _const_ints(call, 1, "pads")
    axes = _const_ints(call, 3, "axes")
    axes = list(range(x.rank)) if axes is None else list(normalize_axes(axes, x.rank, call))
    widths = [(0, 0)] * x.rank
    for i, axis in enumerate(axes):
        widths[axis] = (pads[i], pads[len(axes) + i])
    mode = call["mode"]
    if mode == "constant":
        flat = [w for pair in reversed(widths) for w in pair]  # F.pad crops on negatives

        def run(x, pads=None, value=None, *_):
            fill = 0.0 if value is None else value.reshape(()).item()
            return torch.nn.functional.pad(x, flat, value=fill)
        return run

    def run_mode(x, *_):
        for axis, (begin, end) in enumerate(widths):
            x = _pad_axis(torch, x, axis, begin, end, mode)
        return x
    return run_mode


def _pad_axis(torch, x, axis: int, begin: int, end: int, mode: str):
    """One axis of a reflect/edge/wrap Pad: crop negatives, then concatenate the borrowed
    pieces (F.pad's non-constant modes only pad the last 1-3 axes of a batched tensor)."""
    size = x.shape[axis]
    x = x.narrow(axis, -min(begin, 0), size + min(begin, 0) + min(end, 0))
    begin, end, size = max(begin, 0), max(end, 0), x.shape[axis]
    if not begin and not end:
        return x
    if mode == "edge":
        head = x.narrow(axis, 0, 1).repeat_interleave(begin, dim=axis)
        tail = x.narrow(axis, size - 1, 1).repeat_interleave(end, dim=axis)
    elif mode == "reflect":
        head = x.narrow(axis, 1, begin).flip(axis)
        tail = x.narrow(axis, size - 1 - end, end).flip(axis)
    else:  # wrap
        head = x.narrow(axis, size - begin, begin)
        tail = x.narrow(axis, 0, end)
    return torch.cat([head, x, tail], dim=axis)


@_translates("ConstantOfShape")
def _constant_of_shape(call, out_types):
    torch = torch_module()
    shape = _static_dims(call, out_types[0].shape, "result shape")
    value = call["value"]
    fill = np.zeros(1, out_types[0].np_dtype) if value is None else np.asarray(value)
    filled = torch.from_numpy(np.full(shape, fill.ravel()[0], dtype=out_types[0].np_dtype))
    return lambda *_: filled  # built once, like the weights it stands for


@_translates("Shape")
def _shape(call, out_types):
    torch = torch_module()
    rank = call.in_types[0].rank
    start = call["start"] if call["start"] is not None else 0
    end = call["end"] if call["end"] is not None else rank
    return lambda x: torch.tensor(x.shape[slice(start, end)], dtype=torch.int64)


@_translates("Gather")
def _gather(call, out_types):
    axis = normalize_axis(call["axis"], call.in_types[0].rank, call)

    def run(data, indices):
        flat = indices.reshape(-1) % data.shape[axis]  # ONNX allows negative indices
        picked = data.index_select(axis, flat)
        return picked.reshape(data.shape[:axis] + indices.shape + data.shape[axis + 1:])
    return run


@_translates("Cast")
def _cast(call, out_types):
    torch = torch_module()
    dtype = getattr(torch, np.dtype(out_types[0].np_dtype).name)
    return lambda x: x.to(dtype)
