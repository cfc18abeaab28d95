"""Canonicalization: a table of small local rewrites that put common patterns in one form.

    graph g(%x: f32[N,8]) {                             graph g(%x: f32[N,8]) {
      %w = Constant() {...} : f32[8,4]                    %w = Constant() {...} : f32[8,4]
      %m = MatMul(%x, %w) : f32[N,4]                      %b = Constant() {...} : f32[4]
      %b = Constant() {...} : f32[4]              ->      %a = Gemm(%x, %w, %b) : f32[N,4]
      %a = Add(%m, %b) : f32[N,4]                         %r = Relu(%a) : f32[N,4]
      %d = Dropout(%a) : f32[N,4]                         return %r
      %i = Identity(%d) : f32[N,4]                      }
      %r = Relu(%i) : f32[N,4]
      return %r
    }

Rules (``RULES``, keyed by the op they match at; each returns True when it rewrote):

* ``MatMul(A[M,K], B const[K,N]) + C`` -> ``Gemm(A, B, C)`` when C broadcasts to [M,N];
* ``Dropout(x)`` -> ``x`` in inference (a used ``mask`` becomes a constant all-true tensor when
  its shape is static; otherwise the Dropout stays); a training-mode Dropout stays;
* ``Identity(x)`` -> ``x``; ``Sum/Mean/Max/Min(x)`` -> ``x``; ``Sum(a, b)`` -> ``Add(a, b)``;
* Reshape, Flatten, Squeeze, Unsqueeze to the input's own type -> removed; one of them applied to
  another -> one ``Reshape``; ``Flatten`` with a static result -> ``Reshape``;
* ``Transpose`` with the identity perm -> removed; ``Transpose(Transpose(x, p), q)`` ->
  ``Transpose(x, p[q])`` (removed when that is the identity);
* ``Gemm {alpha != 1}`` with neither A nor B constant -> ``Gemm(Mul(A, alpha), B, ...)``
  (the smaller operand is scaled): a backend folds alpha into a constant operand when there is
  one; without one, the scaling is an explicit elementwise op (the rounding of the product
  changes as by that folding, well within float32 tolerances).

Graph outputs keep their names: a removed node whose value is a graph output becomes
``Identity(source)`` (and such Identities stay). Rewritten nodes keep their name and position;
the nodes a rewrite leaves unread go at once. The rewriting helpers live in ``rewrite.py``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from graphc.ir import Graph, Node

from .dce import remove_dead
from .manager import PassOptions, register_pass
from .rewrite import forward, retarget, substitute

RESHAPE_LIKE = ("Reshape", "Flatten", "Squeeze", "Unsqueeze")  # same elements, same order


def dropout_is_identity(g: Graph, node: Node) -> bool:
    """True if this Dropout passes its input through: not in training mode, or ratio 0."""
    ratio = g.constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
    if ratio is not None and float(ratio) == 0:
        return True
    mode = node.inputs[2] if len(node.inputs) > 2 else None
    if mode is None:
        return True
    value = g.constant_value(mode)
    return value is not None and not bool(value)  # a run-time mode may be true


def static_shape_constant(g: Graph, shape: tuple, base: str) -> tuple[str, dict]:
    """A new int64 constant holding ``shape`` for a Reshape, and the Reshape's attributes (a
    0 in ``shape`` means an empty dim, not "copy", so it needs allowzero)."""
    attrs = {"allowzero": 1} if 0 in shape else {}
    return g.add_constant(np.array(shape, dtype=np.int64), g.fresh_name(base)), attrs


# -- rules ----------------------------------------------------------------------------------------
Rule = Callable[[Graph, Node, PassOptions], bool]


def drop_identity(g: Graph, node: Node, options: PassOptions) -> bool:
    """Identity(x) -> x, unless the Identity names a graph output."""
    return node.output not in g.outputs and forward(g, node, node.inputs[0])


def drop_inference_dropout(g: Graph, node: Node, options: PassOptions) -> bool:
    """Dropout(x) -> x in inference; mask -> constant all-true (only if its shape is static)."""
    if options.training or not dropout_is_identity(g, node) or node.outputs[0] is None:
        return False
    subs: dict = {node.outputs[0]: node.inputs[0]}
    mask = node.outputs[1] if len(node.outputs) > 1 else None
    if mask is not None and g.uses(mask):
        mask_type = g.type_of(mask)
        if not mask_type.is_static:
            return False
        subs[mask] = np.ones(mask_type.shape, dtype=bool)
    substitute(g, node, subs)
    return True


def drop_variadic_of_one(g: Graph, node: Node, options: PassOptions) -> bool:
    """Sum(x) = Mean(x) = Max(x) = Min(x) = x."""
    return len(node.inputs) == 1 and forward(g, node, node.inputs[0])


def sum_of_two_to_add(g: Graph, node: Node, options: PassOptions) -> bool:
    """Sum(a, b) -> Add(a, b) (the same single rounding)."""
    return len(node.inputs) == 2 and retarget(g, node, "Add", node.inputs, {})


def matmul_add_to_gemm(g: Graph, node: Node, options: PassOptions) -> bool:
    """Add(MatMul(A, B), C) -> Gemm(A, B, C): A 2-D, B a constant matrix, C broadcasting to the
    product's [M, N] (either operand order; the MatMul has no other reader)."""
    for side in (0, 1):
        product, bias = node.inputs[side], node.inputs[1 - side]
        matmul = g.producer(product)
        if matmul.op != "MatMul" or g.uses(product) != 1 or node.types[0] != matmul.types[0]:
            continue
        a, b = matmul.inputs
        if (g.type_of(a).rank == 2 and g.type_of(b).rank == 2 and g.constant_value(b) is not None
                and retarget(g, node, "Gemm", (a, b, bias), {})):
            return True
    return False


def drop_same_shape(g: Graph, node: Node, options: PassOptions) -> bool:
    """A Reshape/Flatten/Squeeze/Unsqueeze to its input's own type is the identity."""
    return g.type_of(node.inputs[0]) == node.types[0] and forward(g, node, node.inputs[0])


def merge_reshapes(g: Graph, node: Node, options: PassOptions) -> bool:
    """reshape-like(reshape-like(x)) -> Reshape(x, final shape) (element order never changes).

    The final shape is a new constant when static; a symbolic one keeps the outer Reshape's
    own shape operand when it has no 0 ("copy this dim" would refer to another input).
    """
    inner = g.producer(node.inputs[0])
    if inner.op not in RESHAPE_LIKE:
        return False
    x, out = inner.inputs[0], node.types[0]
    if g.type_of(x) == out:
        return forward(g, node, x)
    if out.is_static:
        shape, attrs = static_shape_constant(g, out.shape, f"{node.name}_shape")
        if retarget(g, node, "Reshape", (x, shape), attrs):
            return True
        remove_dead(g, [shape])
        return False
    spec = g.constant_value(node.inputs[1]) if node.op == "Reshape" else None
    if spec is None or (0 in spec and not node.attrs.get("allowzero")):
        return False
    return retarget(g, node, "Reshape", (x, node.inputs[1]), dict(node.attrs))


def flatten_to_reshape(g: Graph, node: Node, options: PassOptions) -> bool:
    """Flatten(x) with a static result -> Reshape(x, [rows, cols])."""
    out = node.types[0]
    if not out.is_static:
        return False
    shape, attrs = static_shape_constant(g, out.shape, f"{node.name}_shape")
    if retarget(g, node, "Reshape", (node.inputs[0], shape), attrs):
        return True
    remove_dead(g, [shape])
    return False


def transpose_perm(g: Graph, node: Node) -> tuple[int, ...]:
    """A Transpose's permutation, the default (reversed axes) spelled out."""
    perm = node.attrs.get("perm")
    return tuple(perm) if perm else tuple(reversed(range(g.type_of(node.inputs[0]).rank)))


def drop_identity_transpose(g: Graph, node: Node, options: PassOptions) -> bool:
    """Transpose(x, [0, 1, ..., r-1]) -> x."""
    perm = transpose_perm(g, node)
    return perm == tuple(range(len(perm))) and forward(g, node, node.inputs[0])


def merge_transposes(g: Graph, node: Node, options: PassOptions) -> bool:
    """Transpose(Transpose(x, p), q) -> Transpose(x, [p[q[0]], p[q[1]], ...]):
    result axis j is the inner result's axis q[j], i.e. x's axis p[q[j]]."""
    inner = g.producer(node.inputs[0])
    if inner.op != "Transpose":
        return False
    p, q = transpose_perm(g, inner), transpose_perm(g, node)
    composed = tuple(p[j] for j in q)
    if composed == tuple(range(len(composed))):
        return forward(g, node, inner.inputs[0])
    return retarget(g, node, "Transpose", (inner.inputs[0],), {"perm": composed})


def scale_run_time_gemm_operand(g: Graph, node: Node, options: PassOptions) -> bool:
    """Gemm(A, B, C) {alpha} with run-time A and B -> Gemm(Mul(X, alpha), ...) {alpha=1}, X the
    operand with fewer elements."""
    alpha = node.attrs.get("alpha", 1.0)
    a, b = node.inputs[:2]
    if alpha == 1 or g.constant_value(a) is not None or g.constant_value(b) is not None:
        return False
    ta, tb = g.type_of(a), g.type_of(b)
    side = 1 if tb.is_static and (not ta.is_static or tb.numel < ta.numel) else 0
    scale = g.add_constant(np.asarray(alpha, dtype=ta.np_dtype), name=f"{node.name}_alpha")
    (scaled,) = g.add_node("Mul", (node.inputs[side], scale), {}, name=f"{node.name}_scaled")
    inputs = list(node.inputs)
    inputs[side] = scaled
    return retarget(g, node, "Gemm", tuple(inputs), {**node.attrs, "alpha": 1.0})


RULES: dict[str, tuple[Rule, ...]] = {
    "Gemm": (scale_run_time_gemm_operand,),
    "Add": (matmul_add_to_gemm,),
    "Dropout": (drop_inference_dropout,),
    "Identity": (drop_identity,),
    "Sum": (drop_variadic_of_one, sum_of_two_to_add),
    "Mean": (drop_variadic_of_one,),
    "Max": (drop_variadic_of_one,),
    "Min": (drop_variadic_of_one,),
    "Reshape": (drop_same_shape, merge_reshapes),
    "Flatten": (drop_same_shape, merge_reshapes, flatten_to_reshape),
    "Squeeze": (drop_same_shape, merge_reshapes),
    "Unsqueeze": (drop_same_shape, merge_reshapes),
    "Transpose": (drop_identity_transpose, merge_transposes),
}


@register_pass("canonicalize")
def canonicalize(graph: Graph, options: PassOptions) -> Graph:
    """Apply the canonical-form rule table (MatMul+Add->Gemm, no Identity/Dropout, ...)."""
    g = graph.copy()
    while _sweep(g, options):  # every rule removes a node or moves it nearer the inputs
        pass
    return g


def _sweep(g: Graph, options: PassOptions) -> bool:
    """One pass over the nodes in topological order, each rewritten until no rule applies."""
    changed = False
    for name in [n.name for n in g.nodes()]:
        while name in g.nx:
            node = g.node(name)
            if not _apply_first_rule(g, node, options):
                break
            changed = True
    return changed


def _apply_first_rule(g: Graph, node: Node, options: PassOptions) -> bool:
    for rule in RULES.get(node.op, ()):
        if rule(g, node, options):
            remove_dead(g, node.inputs)  # what only the old node read
            return True
    return False
