"""Reverse-mode automatic differentiation as a graph transform: ``grad(graph, of, wrt)``.

The result is a new graph (the input is untouched): a copy of the forward graph plus, for each
node between the ``wrt`` values and ``of``, the nodes of its vector-Jacobian product, emitted
by the op's gradient rule (``OpDef.grad``). Gradient graphs are ordinary graphs: they print,
verify, run on the interpreter, go through the passes and compile for every target.

The sweep (micrograd's, on a graph):

1. mark the values that depend on a ``wrt`` value and that ``of`` depends on (the *path*);
2. seed d(of)/d(of) = 1 (a constant of of's one-element shape);
3. visit the path's nodes in reverse topological order; for each, sum the gradient
   contributions of each output (``Add`` when a value has several uses, including the same
   value read twice by one node as in ``Mul(x, x)``) and call the op's rule, which returns one
   gradient per input slot;
4. the outputs are the original outputs followed by d(of)/d(w) for each ``w`` in ``wrt``.

Gradient rules live next to their ops in ``graphc/ops/*.py`` (attached with
``graphc.ops.gradients.vjp``). A rule is ``rule(ctx, node, grad_outputs) -> list`` where
``ctx`` is a ``GradContext``: it emits ops into the gradient graph (``ctx.op("Mul", a, b)`` or
the ``Value`` operators), gives the forward values (``ctx.input(i)``, ``ctx.output(i)``),
their types, the values of constant inputs (``ctx.const(i)``), full attributes (``ctx.attrs``)
and helpers for broadcasting (``ctx.unbroadcast``, ``ctx.broadcast_like``) and reshaping
that work with symbolic dims. ``ctx.needs(i)`` tells a rule which inputs need a gradient, so that
it emits nothing for the others (a frozen weight, an index).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .errors import GraphcError
from .ir import Graph, Node, Value
from .ops import apply
from .types import FLOAT_DTYPES, TensorType


class GradientError(GraphcError):
    """``grad`` cannot differentiate: a bad name, a non-scalar ``of``, or a node on the path
    that has no gradient (no rule, integer values, a run-time shape input)."""


def grad(graph: Graph, of: str, wrt: Sequence[str]) -> Graph:
    """A new graph whose outputs are ``graph``'s outputs followed by d(of)/d(w) for each ``w``.

    ``of`` names a float value with exactly one element (reduce a batch loss to a scalar first,
    e.g. with ReduceMean). ``wrt`` names graph inputs or Constant/Param values (or any other
    value of the graph). Each gradient has its ``w``'s type. A ``w`` that ``of`` does not
    depend on gets a gradient of zeros, built as a constant (its shape must then be static).
    Raises ``GradientError`` naming the value or node at fault.
    """
    if isinstance(wrt, str):
        wrt = [wrt]
    wrt = list(wrt)
    _check_names(graph, of, wrt)
    out = graph.copy(name=f"{graph.name}_grad")
    path = _path(graph, of, wrt)
    sweep = _Sweep(out, path)
    sweep.seed(of)
    for node in reversed(graph.nodes()):
        if node.inputs and any(o in path for o in node.outputs if o is not None):
            sweep.visit(node)  # leaves (inputs, constants, params) only collect gradients
    grads = [sweep.result(w) for w in wrt]
    out.set_outputs(list(graph.outputs) + grads)
    return out


# -- checks and the path ---------------------------------------------------------------------------
def _check_names(graph: Graph, of: str, wrt: list[str]) -> None:
    if of not in graph:
        raise GradientError(f"grad: of='{of}' is not a value of graph '{graph.name}' "
                            f"(outputs: {', '.join(graph.outputs) or 'none'})")
    t = graph.type_of(of)
    if t.dtype not in FLOAT_DTYPES:
        raise GradientError(f"grad: of='{of}' has type {t}; it must be a float scalar")
    if not t.is_static or t.numel != 1:
        raise GradientError(f"grad: of='{of}' has type {t}; it must have exactly one element "
                            f"(a scalar): reduce it first, e.g. with ReduceMean or ReduceSum")
    if not wrt:
        raise GradientError("grad: wrt is empty; name the inputs or parameters to "
                            "differentiate with respect to")
    for w in wrt:
        if not isinstance(w, str) or w not in graph:
            raise GradientError(f"grad: wrt name {w!r} is not a value of graph '{graph.name}' "
                                f"(inputs: {', '.join(graph.inputs) or 'none'})")
        if graph.type_of(w).dtype not in FLOAT_DTYPES:
            raise GradientError(f"grad: wrt '{w}' has type {graph.type_of(w)}; only float "
                                f"values have gradients")
        if wrt.count(w) > 1:
            raise GradientError(f"grad: wrt names '{w}' twice")


def _path(graph: Graph, of: str, wrt: list[str]) -> set[str]:
    """Values that depend on some ``wrt`` value and that ``of`` depends on."""
    nodes = graph.nodes()
    depends = set(wrt)
    for node in nodes:
        if any(v in depends for v in node.inputs if v is not None):
            depends.update(o for o in node.outputs if o is not None)
    needed = {of}
    for node in reversed(nodes):
        if any(o in needed for o in node.outputs if o is not None):
            needed.update(v for v in node.inputs if v is not None)
    return depends & needed


# -- the reverse sweep -----------------------------------------------------------------------------
class _Sweep:
    """Gradient contributions per forward value, summed when the value's producer is visited."""

    def __init__(self, graph: Graph, path: set[str]):
        self.graph = graph
        self.path = path
        self.contributions: dict[str, list[Value]] = {}
        self.totals: dict[str, Value] = {}

    def seed(self, of: str) -> None:
        t = self.graph.type_of(of)
        ones = np.ones(t.shape, dtype=t.np_dtype)
        self.contributions[of] = [Value(self.graph, self.graph.add_constant(ones, f"d_{of}"))]

    def total(self, value: str) -> Value | None:
        """The summed gradient of ``value`` (None if nothing flows into it)."""
        if value not in self.totals:
            parts = self.contributions.pop(value, [])
            if not parts:
                return None
            acc = parts[0]
            for p in parts[1:]:
                acc = apply("Add", (acc, p))
            self.totals[value] = acc
        return self.totals[value]

    def visit(self, node: Node) -> None:
        grads = [self.total(o) if o is not None and o in self.path else None
                 for o in node.outputs]
        if all(g is None for g in grads):
            return
        ctx = GradContext(self.graph, node,
                          tuple(v is not None and v in self.path for v in node.inputs))
        _check_differentiable(ctx, self.path)
        results = list(node.opdef.grad(ctx, node, grads))
        results += [None] * (len(node.inputs) - len(results))
        for i, v in enumerate(node.inputs):
            if not ctx.needs(i):
                continue
            g = results[i]
            if g is None:
                raise ctx.error(f"has no gradient w.r.t. input {i} ('{v}')")
            if g.type != ctx.in_type(i):
                raise ctx.error(f"gradient rule gives {g.type} for input {i} ('{v}') of type "
                                f"{ctx.in_type(i)} (a bug in the rule)")
            self.contributions.setdefault(v, []).append(g)

    def result(self, w: str) -> str:
        g = self.total(w)
        if g is None:
            t = self.graph.type_of(w)
            if not t.is_static:
                raise GradientError(f"grad: the output does not depend on '{w}' ({t}); its zero "
                                    f"gradient has symbolic dims and cannot be a constant")
            return self.graph.add_constant(np.zeros(t.shape, t.np_dtype),
                                           self.graph.fresh_name(f"grad_{w}"))
        return apply("Identity", (g,), name=self.graph.fresh_name(f"grad_{w}")).name


def _check_differentiable(ctx: GradContext, path: set[str]) -> None:
    node = ctx.node
    for i, o in enumerate(node.outputs):
        if o is not None and node.types[i].dtype not in FLOAT_DTYPES and o in path:
            raise ctx.error(f"output '{o}' is an integer/bool tensor ({node.types[i]}) that the "
                            f"differentiated value depends on; gradients cannot flow through it")
    for i, v in enumerate(node.inputs):
        if ctx.needs(i) and ctx.in_type(i).dtype not in FLOAT_DTYPES:
            raise ctx.error(f"input {i} ('{v}') is an integer/bool tensor "
                            f"({ctx.in_type(i)}); gradients cannot flow through it")
    if node.opdef.grad is None:
        raise ctx.error("has no gradient rule; the differentiated value depends on it")


# -- what a rule sees ------------------------------------------------------------------------------
class GradContext:
    """A forward node as its gradient rule sees it, and the graph the rule emits into."""

    def __init__(self, graph: Graph, node: Node, needs: tuple[bool, ...]):
        self.graph = graph
        self.node = node
        self._needs = needs
        self.attrs = node.opdef.full_attrs(node.attrs)

    # -- the forward node
    def needs(self, i: int) -> bool:
        """True if input ``i`` needs a gradient (it depends on a ``wrt`` value)."""
        return i < len(self._needs) and self._needs[i]

    def input(self, i: int) -> Value:
        return Value(self.graph, self.node.inputs[i])

    def has_input(self, i: int) -> bool:
        return i < len(self.node.inputs) and self.node.inputs[i] is not None

    def output(self, i: int = 0) -> Value:
        name = self.node.outputs[i]
        if name is None:  # the forward node does not produce it: a rule must recompute
            raise self.error(f"output {i} is not produced by the forward node")
        return Value(self.graph, name)

    def in_type(self, i: int) -> TensorType:
        return self.graph.type_of(self.node.inputs[i])

    def out_type(self, i: int = 0) -> TensorType:
        return self.node.types[i]

    def const(self, i: int) -> np.ndarray | None:
        """The array of constant input ``i``; None for run-time (or absent) inputs."""
        return self.graph.constant_value(self.node.inputs[i]) if self.has_input(i) else None

    def const_input(self, i: int, what: str) -> np.ndarray:
        value = self.const(i)
        if value is None:
            raise self.error(f"input {i} ({what}) must be a constant to differentiate this node")
        return value

    def error(self, message: str) -> GradientError:
        return GradientError(f"grad: {self.node.op} node '{self.node.name}' {message}")

    # -- emitting ops
    def op(self, op: str, *operands, **attrs):
        """Add ``op`` applied to ``operands`` (Values, arrays, numbers) to the gradient graph."""
        return apply(op, operands, **attrs)

    def scalar(self, value: float, like: Value) -> Value:
        """A constant scalar of ``like``'s dtype."""
        return Value(self.graph, self.graph.add_constant(np.asarray(value, like.type.np_dtype)))

    def ints(self, values: Sequence[int]) -> Value:
        """A constant 1-D int64 tensor (axes, shapes, pads)."""
        return Value(self.graph, self.graph.add_constant(np.asarray(list(values), np.int64)))

    def constant(self, array: np.ndarray, like: Value) -> Value:
        return Value(self.graph, self.graph.add_constant(np.asarray(array, like.type.np_dtype)))

    def step(self, x: Value) -> Value:
        """1 where x > 0, else 0."""
        return self.op("Step", x)

    def reduce_sum(self, x: Value, axes: Sequence[int], keepdims: bool = True) -> Value:
        if not axes:
            return x
        return self.op("ReduceSum", x, self.ints(axes), keepdims=int(keepdims))

    # -- shapes
    def unbroadcast(self, g: Value, i_or_type) -> Value:
        """Sum ``g`` over the axes numpy broadcasting added to input ``i`` (or a type), so that
        the result has that shape: leading axes are summed away, size-1 axes kept."""
        target = self.in_type(i_or_type) if isinstance(i_or_type, int) else i_or_type
        extra = g.type.rank - target.rank
        g = self.reduce_sum(g, list(range(extra)), keepdims=False)
        axes = [a for a, (d, t) in enumerate(zip(g.shape, target.shape)) if t == 1 and d != 1]
        g = self.reduce_sum(g, axes, keepdims=True)
        if g.type != target:
            raise self.error(f"cannot reduce gradient {g.type} to the input's type {target}")
        return g

    def broadcast_like(self, g: Value, like: Value) -> Value:
        """``g`` broadcast to ``like``'s shape (no-op when the shapes agree)."""
        if g.shape == like.shape:
            return g
        return self.op("BroadcastLike", g, like)

    def reshape(self, x: Value, shape: Sequence) -> Value:
        """Reshape ``x`` to ``shape``, which may hold symbolic dims: one copied from the same
        position of ``x`` (spec 0) and at most one other, inferred (spec -1)."""
        shape = tuple(shape)
        if x.shape == shape:
            return x
        spec = []
        for pos, d in enumerate(shape):
            if isinstance(d, int):
                if d == 0:
                    raise self.error(f"cannot reshape {x.type} to an empty shape {shape}")
                spec.append(d)
            elif pos < x.type.rank and x.shape[pos] == d:
                spec.append(0)
            else:
                spec.append(-1)
        if spec.count(-1) > 1:
            raise self.error(f"cannot reshape gradient {x.type} to {shape}: several symbolic "
                             f"dims move (give the graph static shapes)")
        return self.op("Reshape", x, self.ints(spec))

    def reshape_like(self, x: Value, i: int) -> Value:
        return self.reshape(x, self.in_type(i).shape)

    def transpose(self, x: Value, perm: Sequence[int]) -> Value:
        perm = list(perm)
        if perm == list(range(len(perm))):
            return x
        return self.op("Transpose", x, perm=perm)

    def upsample(self, x: Value, axis: int, factor: int) -> Value:
        """``x`` with ``factor - 1`` zeros after each element along ``axis`` (a static dim):
        element j moves to j * factor. Unsqueeze, Pad and Reshape, so every target runs it."""
        if factor == 1:
            return x
        size = x.shape[axis]
        if not isinstance(size, int):
            raise self.error(f"cannot spread symbolic dim {size} of {x.type}")
        rank = x.type.rank + 1
        spread = self.op("Unsqueeze", x, self.ints([axis + 1]))
        pads = [0] * (2 * rank)
        pads[rank + axis + 1] = factor - 1
        spread = self.op("Pad", spread, self.ints(pads))
        shape = list(x.shape)
        shape[axis] = size * factor
        return self.reshape(spread, shape)
