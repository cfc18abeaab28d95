"""BatchNorm folding: per-channel affine maps next to a Conv/Gemm go into its weights and bias.

    graph g(%x: f32[N,3,8,8]) {                        graph g(%x: f32[N,3,8,8]) {
      %w = Constant() {...} : f32[4,3,3,3]               %c_w = Constant() {...} : f32[4,3,3,3]
      %c = Conv(%x, %w) {pads=[1,1,1,1]} : f32[N,4,8,8]  %c_b = Constant() {...} : f32[4]
      %y = BatchNormalization(%c, %g, %b, %m, %v)  ->    %c = Conv(%x, %c_w, %c_b) {...}
          : f32[N,4,8,8]                                   : f32[N,4,8,8]
      %r = Relu(%y) : f32[N,4,8,8]                       %r = Relu(%c) : f32[N,4,8,8]
      return %r                                          return %r
    }                                                  }

With ``s = gamma / sqrt(var + eps)`` an inference-mode BatchNormalization is ``y = x * s + t``,
``t = beta - mean * s``, per output channel; so are ``Mul``/``Add`` by a constant that varies
only along the channel axis ([C,1,1], [1,C,1,1], a scalar; [N] or [1,N] after a Gemm). Such a
map *after* the layer (the layer's only reader) folds as ``W' = W * s`` (along output channels)
and ``b' = b * s + t``. A map *before* the layer (its value read only by the layer) folds along
input channels: a scale always (Conv pads with zeros, and ``0 * s = 0``), a shift ``a`` only into
an unpadded Conv or a Gemm (``b' = b + sum(W * a)``): at a padded border the shifted input would
be padded with 0, not ``a``, so a shift before a padded Conv stays. The folded weights are
computed in float64 and stored in the layer's dtype.

A BatchNormalization that stays (its producer is a Concat, a pool, ...) still absorbs a
per-channel Mul/Add after it into its ``scale`` and ``B`` (DenseNet's BN -> Mul -> Add); it is
not turned into Mul + Add itself.

Left alone: a BatchNormalization in training mode or with Param (trainable) or run-time
parameters, one whose producer has other readers (e.g. a residual branch) or is not a Conv/Gemm
with constant weights. A Gemm's ``beta`` is multiplied into its new ``C``. The folded Conv keeps
its name (so per-node convolution choices still apply); the value the folded node had named
survives as an Identity only where it was a graph output.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from graphc.errors import GraphcError
from graphc.ir import Graph, Node
from graphc.ops import registry
from graphc.ops.convolution import conv_window
from graphc.types import FLOAT_DTYPES

from .dce import remove_dead
from .manager import PassOptions, register_pass
from .rewrite import forward

HOSTS = ("Conv", "Gemm")
BATCH_NORM = "BatchNormalization"
AFFINE_OPS = ("Mul", "Add")


@dataclass(frozen=True)
class Layer:
    """A Conv or Gemm as one affine map: ``y = X (*) weight + bias``.

    Conv: ``weight`` is W (M, C/group, *kernel), ``bias`` B (M,) or None. Gemm: ``weight`` is
    B' (K, N) (B transposed back if ``transB``), ``bias`` beta * C (broadcasting to (M, N)) or
    None; the product is scaled by ``alpha``. The arrays are the stored ones until a fold
    replaces them by float64 results (every fold multiplies or adds a float64 vector).
    """

    node: Node
    x: str  # the data operand (input 0)
    weight: np.ndarray
    bias: np.ndarray | None
    weight_changed: bool = False
    bias_changed: bool = False

    @staticmethod
    def of(g: Graph, node: Node) -> Layer | None:
        """The layer view of a Conv/Gemm with constant weights (and bias); None otherwise."""
        if node.op not in HOSTS or node.types[0].dtype not in FLOAT_DTYPES:
            return None
        weight = _constant(g, node.inputs[1])
        has_bias = len(node.inputs) > 2 and node.inputs[2] is not None
        bias = _constant(g, node.inputs[2]) if has_bias else None
        if weight is None or (has_bias and bias is None):
            return None
        if node.op == "Gemm":
            attrs = _attrs(node)
            weight = weight.T if attrs["transB"] else weight
            bias = None if bias is None else bias.astype(np.float64) * attrs["beta"]
        return Layer(node, node.inputs[0], weight, bias)

    # -- geometry ----------------------------------------------------------------------------
    @property
    def out_channels(self) -> int:
        return self.weight.shape[0] if self.node.op == "Conv" else self.weight.shape[1]

    @property
    def groups(self) -> int:
        return _attrs(self.node)["group"] if self.node.op == "Conv" else 1

    @property
    def in_channels(self) -> int:
        if self.node.op == "Conv":
            return self.weight.shape[1] * self.groups
        return self.weight.shape[0]

    @property
    def in_axis(self) -> int:
        """The axis of X (Conv) or A (Gemm) that holds the input channels."""
        return 1 if self.node.op == "Conv" or not _attrs(self.node)["transA"] else 0

    # -- affine maps folded in (each returns a new Layer) --------------------------------------
    def scale_out(self, s: np.ndarray) -> Layer:
        """Layer then ``* s`` per output channel: W' = W * s (rows), b' = b * s."""
        if self.node.op == "Conv":
            weight = self.weight * s.reshape((-1,) + (1,) * (self.weight.ndim - 1))
        else:
            weight = self.weight * s
        bias = None if self.bias is None else self.bias * s
        return replace(self, weight=weight, bias=bias, weight_changed=True,
                       bias_changed=self.bias is not None or self.bias_changed)

    def shift_out(self, t: np.ndarray) -> Layer:
        """Layer then ``+ t`` per output channel: b' = b + t."""
        bias = t if self.bias is None else self.bias + t
        return replace(self, bias=bias, bias_changed=True)

    def scale_in(self, s: np.ndarray) -> Layer:
        """``x * s`` per input channel, then the layer: W' = W * s (along input channels)."""
        if self.node.op == "Gemm":
            return replace(self, weight=self.weight * s[:, None], weight_changed=True)
        w = self.weight.reshape(self.groups, self.out_channels // self.groups,
                                self.weight.shape[1], -1)
        w = w * s.reshape(self.groups, 1, -1, 1)
        return replace(self, weight=w.reshape(self.weight.shape), weight_changed=True)

    def shift_in(self, a: np.ndarray) -> Layer:
        """``x + a`` per input channel, then the layer: b' = b + (the layer applied to a),
        valid only where every tap reads the input (no padding)."""
        if self.node.op == "Gemm":
            return self.shift_out(_attrs(self.node)["alpha"] * (a @ self.weight))
        w = self.weight.reshape(self.groups, self.out_channels // self.groups,
                                self.weight.shape[1], -1)
        contribution = np.einsum("gmct,gc->gm", w.astype(np.float64),
                                 a.reshape(self.groups, -1))
        return self.shift_out(contribution.reshape(-1))

    def shift_in_allowed(self, g: Graph) -> bool:
        if self.node.op == "Gemm":
            return True
        node = self.node
        in_types = [g.type_of(v) if v is not None else None for v in node.inputs]
        call = registry.make_call(registry.get(node.op), node.name, node.attrs, in_types)
        try:
            return not any(conv_window(call).pads)
        except GraphcError:
            return False

    # -- back into the graph --------------------------------------------------------------------
    def store(self, g: Graph) -> None:
        """Rewrite the node (in place, same name and results) with this layer's operands."""
        node, attrs = self.node, dict(self.node.attrs)
        dtype = node.types[0].np_dtype
        inputs = list(node.inputs) + [None] * (3 - len(node.inputs))
        inputs[0] = self.x
        if self.weight_changed:
            weight = self.weight.T if node.op == "Gemm" and attrs.get("transB") else self.weight
            inputs[1] = g.add_constant(weight.astype(dtype), g.fresh_name(f"{node.name}_w"))
        if self.bias_changed:
            inputs[2] = g.add_constant(self.bias.astype(dtype), g.fresh_name(f"{node.name}_b"))
            attrs.pop("beta", None)  # beta is in the new C (and Conv has none)
        while inputs[-1] is None:
            inputs.pop()
        g.replace_node(node.name, inputs=tuple(inputs), attrs=attrs)


@register_pass("fold-batchnorm")
def fold_batchnorm(graph: Graph, options: PassOptions) -> Graph:
    """Fold inference BatchNorm and per-channel Mul/Add by constants into adjacent Conv/Gemm."""
    g = graph.copy()
    # topological order: a Conv/Gemm is visited before the BatchNormalization it may absorb
    for name in [n.name for n in g.nodes() if n.op in HOSTS + (BATCH_NORM,)]:
        while name in g.nx and _fold_one_neighbour(g, name):
            pass
    return g


def _fold_one_neighbour(g: Graph, name: str) -> bool:
    node = g.node(name)
    if node.op == BATCH_NORM:
        return _fold_into_batch_norm(g, node)
    layer = Layer.of(g, node)
    if layer is None:
        return False
    return _fold_reader(g, layer) or _fold_producer(g, layer)


def _fold_reader(g: Graph, layer: Layer) -> bool:
    """The layer's only reader is a BatchNormalization or per-channel Mul/Add: fold it."""
    out = layer.node.output
    reader = _only_reader(g, out)
    if reader is None:
        return False
    if reader.op == BATCH_NORM and reader.inputs[0] == out:
        affine = _batch_norm_affine(g, reader)
        if affine is None:
            return False
        folded = layer.scale_out(affine[0]).shift_out(affine[1])
    else:
        affine = _channel_affine(g, reader, out, layer.out_channels)
        if affine is None:
            return False
        op, vector = affine
        folded = layer.scale_out(vector) if op == "Mul" else layer.shift_out(vector)
    folded.store(g)
    forward(g, reader, out)
    remove_dead(g, list(reader.inputs) + list(layer.node.inputs))
    return True


def _fold_into_batch_norm(g: Graph, bn: Node) -> bool:
    """An inference BatchNormalization's only reader is a per-channel Mul/Add (DenseNet's
    BN -> Mul -> Add): ``(x_hat * gamma + beta) * m + a = x_hat * (gamma m) + (beta m + a)``."""
    out = bn.outputs[0]
    reader = _only_reader(g, out)
    if reader is None or _batch_norm_affine(g, bn) is None:
        return False
    gamma, beta = (_constant(g, v) for v in bn.inputs[1:3])
    affine = _channel_affine(g, reader, out, gamma.shape[0])
    if affine is None:
        return False
    op, vector = affine
    new_gamma = gamma * vector if op == "Mul" else gamma
    new_beta = beta * vector if op == "Mul" else beta + vector
    inputs = list(bn.inputs)
    for i, (old, new) in enumerate(((gamma, new_gamma), (beta, new_beta)), start=1):
        if new is not old:
            inputs[i] = g.add_constant(new.astype(old.dtype), g.fresh_name(f"{bn.name}_p"))
    g.replace_node(bn.name, inputs=tuple(inputs))
    forward(g, reader, out)
    remove_dead(g, list(reader.inputs) + list(bn.inputs))
    return True


def _only_reader(g: Graph, value: str) -> Node | None:
    """The one node that reads ``value`` once, if nothing else (no graph output) does."""
    if g.uses(value) != 1 or value in g.outputs:
        return None
    return g.consumers(value)[0]


def _channel_affine(g: Graph, reader: Node, value: str,
                    channels: int) -> tuple[str, np.ndarray] | None:
    """("Mul" or "Add", float64 vector) if ``reader`` multiplies or shifts ``value`` by a
    per-channel constant (axis 1) without broadcasting it to a larger shape."""
    if reader.op not in AFFINE_OPS or reader.types[0] != g.type_of(value):
        return None
    other = reader.inputs[1] if reader.inputs[0] == value else reader.inputs[0]
    vector = _per_channel(_constant(g, other), reader.types[0].rank, 1, channels)
    return None if vector is None else (reader.op, vector)


def _fold_producer(g: Graph, layer: Layer) -> bool:
    """The layer's data operand is a per-input-channel Mul/Add read only by the layer: fold it."""
    producer = g.producer(layer.x)
    if producer.op not in AFFINE_OPS or g.uses(layer.x) != 1:
        return False
    if producer.op == "Add" and not layer.shift_in_allowed(g):
        return False
    x_type = g.type_of(layer.x)
    a, b = producer.inputs
    for data, other in ((a, b), (b, a)):
        vector = _per_channel(_constant(g, other), x_type.rank, layer.in_axis,
                              layer.in_channels)
        if vector is None or g.type_of(data) != x_type:
            continue
        folded = layer.scale_in(vector) if producer.op == "Mul" else layer.shift_in(vector)
        replace(folded, x=data).store(g)
        remove_dead(g, [layer.x] + list(layer.node.inputs[1:]))
        return True
    return False


def _batch_norm_affine(g: Graph, bn: Node) -> tuple[np.ndarray, np.ndarray] | None:
    """(s, t) with BN(x) = x * s + t per channel, for an inference BN with constant params."""
    attrs = _attrs(bn)
    if attrs["training_mode"] or any(o is not None for o in bn.outputs[1:]):
        return None
    params = [_constant(g, v) for v in bn.inputs[1:]]
    if any(p is None for p in params):
        return None
    gamma, beta, mean, var = (p.astype(np.float64) for p in params)
    s = gamma / np.sqrt(var + attrs["epsilon"])
    return s, beta - mean * s


def _per_channel(value: np.ndarray | None, rank: int, axis: int, size: int) -> np.ndarray | None:
    """``value`` as a float64 vector of ``size`` if, broadcast against a rank-``rank`` tensor,
    it varies along ``axis`` only (e.g. [C,1,1] or [1,C,1,1] for axis 1 of NCHW, or a scalar);
    None otherwise."""
    if value is None or value.ndim > rank:
        return None
    shape = (1,) * (rank - value.ndim) + value.shape
    if shape[axis] not in (1, size) or any(d != 1 for i, d in enumerate(shape) if i != axis):
        return None
    return np.broadcast_to(value.astype(np.float64).reshape(-1), (size,)).copy()


def _constant(g: Graph, value: str | None) -> np.ndarray | None:
    """The array of a Constant (not a Param: trainable weights do not fold)."""
    if value is None or g.producer(value).op != "Constant":
        return None
    return g.constant_value(value)


def _attrs(node: Node) -> dict:
    return registry.get(node.op).full_attrs(node.attrs)
