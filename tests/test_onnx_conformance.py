"""ONNX's own node test cases (shipped with the onnx package) through import + interpreter.

Every case whose nodes are all registered graphc ops runs; the ones that cannot pass are listed
in EXCLUDED with the reason. The summary line at the end of the run gives the counts.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import graphc
from graphc.ops import registry
from graphc.types import dtype_name

from .conftest import CONFORMANCE

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from onnx.backend.test.case.node import collect_testcases

    ALL_CASES = collect_testcases()

# case name -> why it cannot pass (filled in as cases are triaged)
EXCLUDED: dict[str, str] = {
}


def _ops_of(case) -> set[str]:
    return {(n.domain or "", n.op_type) for n in case.model.graph.node}


def _supported(case) -> bool:
    return all(domain in ("", "ai.onnx") and registry.has(op) and op != "Param"
               for domain, op in _ops_of(case))


def _arrays(values) -> list:
    """Case data as numpy arrays (some cases store TensorProtos)."""
    return [numpy_helper.to_array(v) if isinstance(v, onnx.TensorProto)
            else np.asarray(v) if isinstance(v, np.generic) else v for v in values]


def _dtype_problem(case) -> str | None:
    """A reason when the case's data uses a dtype graphc does not have at all."""
    for inputs, outputs in case.data_sets:
        for array in _arrays(inputs) + _arrays(outputs):
            if not isinstance(array, np.ndarray):
                return f"non-tensor value {type(array).__name__} (sequence/optional)"
            try:
                dtype_name(array.dtype)
            except graphc.GraphcError:
                return f"dtype {array.dtype} is not supported by graphc"
    return None


def import_case(case, inputs: list) -> tuple[graphc.Graph, dict]:
    """Import a case's model and split its inputs into feeds and bound constants.

    graphc compiles static shapes: integer inputs (target shapes, axes, pads, indices) are bound
    as constants, as a user would with ``input_values=``.
    """
    names = [vi.name for vi in case.model.graph.input
             if vi.name not in {t.name for t in case.model.graph.initializer}]
    bound = {n: a for n, a in zip(names, inputs) if a.dtype.kind in "iub"}
    graph = graphc.import_onnx(case.model, input_values=bound)
    return graph, {n: a for n, a in zip(names, inputs) if n not in bound}


CASES = [c for c in ALL_CASES if c.kind == "node" and _supported(c)]


def _assert_close(got: np.ndarray, want: np.ndarray, rtol: float, atol: float, what: str):
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    if want.dtype.kind in "fc":
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, equal_nan=True, err_msg=what)
    else:
        np.testing.assert_array_equal(got, want, err_msg=what)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_node_case(case):
    reason = EXCLUDED.get(case.name) or _dtype_problem(case)
    if reason:
        CONFORMANCE[case.name] = f"excluded: {reason}"
        pytest.skip(reason)
    CONFORMANCE[case.name] = "failed"
    for inputs, outputs in case.data_sets:
        inputs, outputs = _arrays(inputs), _arrays(outputs)
        graph, feeds = import_case(case, inputs)
        got = graphc.interpret(graph, feeds)
        assert len(got) == len(outputs)
        for i, (g, w) in enumerate(zip(got, outputs)):
            _assert_close(g, np.asarray(w), case.rtol, case.atol, f"{case.name} output {i}")
    CONFORMANCE[case.name] = "passed"
