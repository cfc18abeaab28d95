"""The reference interpreter: runs any valid graph with the ops' numpy references.

It is the oracle of every pass and backend, so it stays simple: nodes in topological order,
each op's ``reference`` called on numpy arrays, every result checked against its stored type.
Values are freed after their last use so that large models (VGG-19 at 224x224) fit in memory.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from .errors import FeedError, GraphcError
from .ir import CONSTANT_OPS, INPUT, Graph
from .ops import registry
from .types import TensorType, dtype_name


def bind_dims(symbols: Sequence[str], dims: Mapping[str, int], known: Sequence[dict]) -> dict:
    """A value for each symbolic dim in ``symbols`` (those of a graph's inputs), from ``dims``;
    a backend that has specialised for one binding only (``known``) may be asked without dims
    (e.g. to print its code) and answers with that binding."""
    missing = [d for d in symbols if d not in dims]
    if missing and len(known) == 1:
        return dict(known[0])
    if missing:
        raise FeedError(f"symbolic dims {', '.join(sorted(set(missing)))} need values to "
                        f"generate code (e.g. dims={{'{missing[0]}': 1}})")
    return {d: int(dims[d]) for d in symbols}


def check_feeds(graph: Graph, feeds: Mapping[str, np.ndarray]) -> dict:
    """Validate feeds against the graph inputs; returns them as arrays and the symbol bindings."""
    if not isinstance(feeds, Mapping):
        raise FeedError(f"feeds must be a dict of input name -> array, got {type(feeds).__name__}")
    unknown = sorted(set(feeds) - set(graph.inputs))
    if unknown:
        raise FeedError(f"unknown feed '{unknown[0]}': graph '{graph.name}' has inputs "
                        f"{', '.join(f'{v}: {graph.type_of(v)}' for v in graph.inputs)}")
    bindings: dict = {}
    arrays = {}
    for name in graph.inputs:
        want = graph.type_of(name)
        if name not in feeds:
            raise FeedError(f"missing feed for input '{name}' ({want})")
        array = np.asarray(feeds[name])
        try:
            got_dtype = dtype_name(array.dtype)
        except GraphcError:
            got_dtype = str(array.dtype)
        if got_dtype != want.dtype:
            raise FeedError(f"feed '{name}' has dtype {array.dtype}, expected {want}")
        if array.ndim != want.rank:
            raise FeedError(f"feed '{name}' has rank {array.ndim} (shape {array.shape}), "
                            f"expected {want}")
        if not want.matches(array, bindings):
            raise FeedError(f"feed '{name}' has shape {array.shape}, expected {want}"
                            + (f" with {bindings}" if bindings else ""))
        arrays[name] = array
    return arrays


def interpret(graph: Graph, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Run ``graph`` on ``feeds`` (input name -> array); returns the outputs in graph order."""
    env: dict[str, np.ndarray] = dict(check_feeds(graph, feeds))
    nodes = graph.nodes()
    last_use = _last_uses(graph, nodes)
    for step, node in enumerate(nodes):
        if node.op == INPUT:
            continue
        results = run_node(graph, node, [env[v] if v is not None else None for v in node.inputs])
        for value, array in zip(node.outputs, results):
            if value is not None:
                env[value] = array
        for v in set(node.inputs) | set(node.outputs):
            if v is not None and last_use.get(v, len(nodes)) <= step and v not in graph.outputs:
                env.pop(v, None)
    return [env[v] for v in graph.outputs]


def run_node(graph: Graph, node, arrays: list) -> list:
    """Run one node's numpy reference on ``arrays`` and check the results' types."""
    opdef = registry.get(node.op, node.name)
    in_types = [TensorType.of(a) if a is not None else None for a in arrays]
    call = registry.make_call(opdef, node.name, node.attrs, in_types,
                              [graph.constant_value(v) for v in node.inputs], len(node.outputs))
    with np.errstate(all="ignore"):  # NaN/inf propagate as IEEE says; no warnings from numpy
        results = opdef.reference(call, *arrays)
    if not isinstance(results, (tuple, list)):
        results = (results,)
    results = [np.asarray(r) for r in results]
    for value, stored, array in zip(node.outputs, node.types, results):
        if value is not None and node.op not in CONSTANT_OPS and not stored.matches(array):
            raise GraphcError(
                f"{node.op} node '{node.name}': the reference produced {TensorType.of(array)} for "
                f"'{value}' but its type is {stored} (feeds inconsistent with the graph's types?)")
    return results


def _last_uses(graph: Graph, nodes) -> dict[str, int]:
    last: dict[str, int] = {}
    for step, node in enumerate(nodes):
        for v in node.inputs:
            if v is not None:
                last[v] = step
        for v in node.outputs:
            if v is not None:
                last.setdefault(v, step)
    return last
