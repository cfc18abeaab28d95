"""The epilogue shared by GEMM-like ops: ``y = activation(acc + bias + residual)``.

Epilogue-capable ops (FusedConv, FusedGemm, ConvGemm, WinogradOutput, ...) take ``bias`` and
``residual`` as their last two optional inputs and these attributes:

* ``activation``: "" (none) or a name of ``ACTIVATIONS``;
* ``activation_params``: the activation's parameters in the order ``ACTIVATIONS`` gives.

The activation math is not written again here: each activation runs its elementwise op's
registry reference (Relu, LeakyRelu, Clip, ...), so fused and unfused graphs agree exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..types import TensorType
from . import registry
from .registry import Attr, OpCall, string


@dataclass(frozen=True)
class Activation:
    op: str                        # the elementwise op it stands for
    attrs: tuple[str, ...] = ()    # its float attributes, in activation_params order
    inputs: tuple[str, ...] = ()   # its scalar-input parameters (Clip's min, max)

    @property
    def n_params(self) -> int:
        return len(self.attrs) + len(self.inputs)


ACTIVATIONS = {
    "relu": Activation("Relu"),
    "leaky_relu": Activation("LeakyRelu", ("alpha",)),
    "sigmoid": Activation("Sigmoid"),
    "tanh": Activation("Tanh"),
    "clip": Activation("Clip", inputs=("min", "max")),
    "elu": Activation("Elu", ("alpha",)),
    "selu": Activation("Selu", ("alpha", "gamma")),
    "hard_sigmoid": Activation("HardSigmoid", ("alpha", "beta")),
    "hard_swish": Activation("HardSwish"),
    "softplus": Activation("Softplus"),
}
BY_OP = {a.op: name for name, a in ACTIVATIONS.items()}

EPILOGUE_ATTRS = {
    "activation": string("", choices=("", *ACTIVATIONS)),
    "activation_params": Attr("floats", ()),
}


def check_epilogue(call: OpCall, out: TensorType, bias_index: int) -> None:
    """Shape rule part: params count, residual == output type (bias is checked by its op)."""
    name = call["activation"]
    if name and len(call["activation_params"]) != ACTIVATIONS[name].n_params:
        raise call.error(f"activation '{name}' takes {ACTIVATIONS[name].n_params} "
                         f"activation_params, got {len(call['activation_params'])}")
    residual = call.in_types[bias_index + 1] if len(call.in_types) > bias_index + 1 else None
    if residual is not None and residual != out:
        raise call.error(f"residual input is {residual}, expected the output type {out}")


def apply_activation(name: str, params, y: np.ndarray, node: str = "epilogue") -> np.ndarray:
    if not name:
        return y
    act = ACTIVATIONS[name]
    opdef = registry.get(act.op)
    params = list(params)
    attrs = dict(zip(act.attrs, params[: len(act.attrs)]))
    extra = [np.asarray(p, dtype=y.dtype) for p in params[len(act.attrs):]]
    in_types = [TensorType.of(y)] + [TensorType.of(e) for e in extra]
    call = registry.make_call(opdef, node, attrs, in_types)
    return opdef.reference(call, y, *extra)


def apply_epilogue(call: OpCall, acc: np.ndarray, bias: np.ndarray | None,
                   residual: np.ndarray | None, bias_axis: int = 1) -> np.ndarray:
    """``activation(acc + bias + residual)`` in the accumulator's dtype; a 1-D ``bias`` runs
    along ``bias_axis`` of ``acc``."""
    y = acc
    if bias is not None:
        if bias.ndim == 1 and acc.ndim > 1:
            axis = bias_axis % acc.ndim
            bias = bias.reshape((-1,) + (1,) * (acc.ndim - 1 - axis))
        y = y + bias.astype(y.dtype, copy=False)
    if residual is not None:
        y = y + residual
    return apply_activation(call["activation"], call["activation_params"], y, call.node)


def activation_of(graph, node) -> tuple[str, tuple[float, ...]] | None:
    """(activation name, params) if ``node`` is an activation op that can join an epilogue."""
    name = BY_OP.get(node.op)
    if name is None:
        return None
    act = ACTIVATIONS[name]
    full = registry.get(node.op).full_attrs(node.attrs)
    params = [float(full[a]) for a in act.attrs]
    for i, _ in enumerate(act.inputs, start=1):
        value = graph.constant_value(node.inputs[i]) if i < len(node.inputs) else None
        if node.inputs[i:i + 1] and node.inputs[i] is not None and value is None:
            return None  # a run-time bound cannot become an attribute
        default = -np.inf if i == 1 else np.inf
        params.append(float(np.asarray(value).reshape(())) if value is not None else default)
    return name, tuple(params)


def epilogue_text(attrs: dict) -> str:
    """Short description, e.g. ``relu`` or ``clip(0, 6)``, for reports."""
    name = attrs.get("activation", "")
    params = attrs.get("activation_params", ())
    return f"{name}({', '.join(f'{p:g}' for p in params)})" if params else name

