"""Every op's gradient rule against central finite differences (PyTorch gradcheck's tolerances).

For each case, a float64 graph computes ``loss = sum_i ReduceSum(output_i * R_i)`` for fixed
random ``R_i``; ``graphc.grad`` differentiates it w.r.t. the case's differentiated inputs and the
result is compared with ``(loss(x + eps) - loss(x - eps)) / (2 eps)`` per element, both run on
the interpreter. The test walks the registry: an op with a rule but no case fails, so a new rule
is checked as soon as it exists. Inputs keep clear of kinks by construction (Relu/Abs/Step away
from 0, distinct values for Max/Min/MaxPool, positive values for Log/Sqrt/Pow).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest

import graphc
from graphc.ops import registry

EPS, ATOL, RTOL = 1e-6, 1e-5, 1e-3
RNG = np.random.default_rng(1234)


def normal(*shape):
    return RNG.standard_normal(shape)


def away(*shape, low=0.2):
    """Values of either sign at least ``low`` from 0 (no kink of Relu, Abs, Step at 0)."""
    return RNG.choice([-1.0, 1.0], size=shape) * RNG.uniform(low, 1.5, size=shape)


def positive(*shape):
    return RNG.uniform(0.5, 2.0, size=shape)


def distinct(*shape):
    """Values at least 0.05 apart (no ties for Max/Min/MaxPool), in random order."""
    n = int(np.prod(shape))
    return (RNG.permutation(n) * 0.05 - n * 0.025 + RNG.uniform(0, 0.01, n)).reshape(shape)


def ints(*values):
    return np.asarray(values, dtype=np.int64)


@dataclass
class Case:
    """Inputs (arrays; float ones in ``wrt`` are differentiated, the rest become constants),
    attributes and the number of outputs the node produces."""

    inputs: list
    attrs: dict = field(default_factory=dict)
    wrt: tuple | None = None  # default: every float input
    n_outputs: int = 1
    label: str = ""

    def differentiated(self) -> list[int]:
        if self.wrt is not None:
            return list(self.wrt)
        return [i for i, a in enumerate(self.inputs)
                if a is not None and np.asarray(a).dtype.kind == "f"]


def conv_cases():
    return [
        Case([normal(2, 3, 5, 6), normal(4, 3, 3, 3), normal(4)], {"pads": [1, 1, 1, 1]},
             label="same3x3"),
        Case([normal(1, 2, 7, 6), normal(3, 2, 3, 2)], {"strides": [2, 2]}, label="stride2"),
        Case([normal(2, 4, 6, 7), normal(4, 2, 3, 3)],
             {"strides": [2, 1], "pads": [1, 0, 2, 1], "group": 2}, label="groups-pads"),
        Case([normal(1, 2, 8, 7), normal(2, 2, 2, 3)], {"dilations": [2, 1], "pads": [0, 1, 1, 0]},
             label="dilated"),
        Case([normal(2, 3, 9), normal(2, 3, 3)], {"strides": [3], "pads": [2, 0]}, label="1d"),
    ]


CASES: dict[str, list[Case]] = {
    "Add": [Case([normal(2, 3, 4), normal(3, 1)]), Case([normal(1, 4), normal(3, 1)])],
    "Sub": [Case([normal(3, 4), normal(4)])],
    "Mul": [Case([normal(2, 3, 4), normal(2, 1, 4)]), Case([normal(5), normal(1)])],
    "Div": [Case([normal(3, 4), away(4)])],
    "Pow": [Case([positive(3, 4), normal(4)]),
            Case([normal(3, 4), ints(3)], label="integer-exponent")],
    "Sum": [Case([normal(3, 4), normal(4), normal(1, 4)])],
    "Mean": [Case([normal(3, 4), normal(3, 1)])],
    "Max": [Case([distinct(3, 4), distinct(4) + 0.01]),
            Case([distinct(2, 3), distinct(2, 3) + 0.02, distinct(1, 3) + 0.03])],
    "Min": [Case([distinct(3, 4), distinct(3, 1) + 0.01])],
    "Neg": [Case([normal(3, 4)])],
    "Abs": [Case([away(3, 4)])],
    "Exp": [Case([normal(3, 4)])],
    "Log": [Case([positive(3, 4)])],
    "Sqrt": [Case([positive(3, 4)])],
    "Reciprocal": [Case([away(3, 4)])],
    "Relu": [Case([away(3, 5)])],
    "LeakyRelu": [Case([away(3, 5)], {"alpha": 0.2})],
    "PRelu": [Case([away(2, 3, 4), normal(3, 1)]), Case([away(3, 4), normal(4)])],
    "Sigmoid": [Case([normal(3, 4)])],
    "Tanh": [Case([normal(3, 4)])],
    "Elu": [Case([away(3, 4)], {"alpha": 0.7})],
    "Selu": [Case([away(3, 4)])],
    "Softplus": [Case([normal(3, 4)])],
    "HardSigmoid": [Case([away(4, 6) * 3], {"alpha": 0.3, "beta": 0.4})],
    "HardSwish": [Case([np.concatenate([away(3, 4) * 2, away(3, 4) + 4.5])])],
    "Gelu": [Case([normal(3, 4)]), Case([normal(3, 4)], {"approximate": "tanh"})],
    "Erf": [Case([normal(3, 4)])],
    "Clip": [Case([np.array([-2.0, -1.2, -0.3, 0.4, 0.9, 1.7]), np.array(-1.0),
                   np.array(1.0)]),
             Case([np.array([[-2.0, 0.5], [0.4, 3.0]]), None, np.array(1.0)], label="max-only")],
    "Gemm": [Case([normal(3, 4), normal(4, 5), normal(5)]),
             Case([normal(4, 3), normal(5, 4), normal(3, 5)],
                  {"transA": 1, "transB": 1, "alpha": 0.7, "beta": 1.3}),
             Case([normal(4, 3), normal(4, 2), normal(1, 2)], {"transA": 1}),
             Case([normal(3, 4), normal(2, 4)], {"transB": 1, "beta": 0.5})],
    "MatMul": [Case([normal(3, 4), normal(4, 2)]),
               Case([normal(2, 1, 3, 4), normal(3, 4, 2)], label="batched-broadcast"),
               Case([normal(4), normal(2, 4, 3)], label="vector-left"),
               Case([normal(2, 3, 4), normal(4)], label="vector-right"),
               Case([normal(4), normal(4)], label="dot")],
    "Softmax": [Case([normal(3, 5)]), Case([normal(2, 3, 4)], {"axis": 1})],
    "LogSoftmax": [Case([normal(3, 5)]), Case([normal(2, 3, 4)], {"axis": 0})],
    "ReduceSum": [Case([normal(2, 3, 4), ints(1)]),
                  Case([normal(2, 3, 4), ints(0, 2)], {"keepdims": 0}),
                  Case([normal(2, 3)], {"keepdims": 0}, label="all")],
    "ReduceMean": [Case([normal(2, 3, 4), ints(-1)]),
                   Case([normal(2, 3, 4), ints(0, 1)], {"keepdims": 0})],
    "Flatten": [Case([normal(2, 3, 4)], {"axis": 2})],
    "Reshape": [Case([normal(2, 3, 4), ints(4, -1)])],
    "Squeeze": [Case([normal(2, 1, 4), ints(1)])],
    "Unsqueeze": [Case([normal(2, 4), ints(0, 3)])],
    "Transpose": [Case([normal(2, 3, 4)], {"perm": [2, 0, 1]})],
    "Concat": [Case([normal(2, 3), normal(2, 1), normal(2, 2)], {"axis": 1})],
    "Split": [Case([normal(5, 3), ints(2, 3)], {"axis": 0}, n_outputs=2),
              Case([normal(2, 6)], {"axis": 1, "num_outputs": 3}, n_outputs=3)],
    "Slice": [Case([normal(5, 6), ints(1, 0), ints(4, 5)]),
              Case([normal(7, 5), ints(6, 1), ints(0, 5), ints(0, 1), ints(-2, 2)],
                   label="steps"),
              Case([normal(4, 6), ints(-1), ints(-100), ints(1), ints(-3)], label="negative")],
    "Pad": [Case([normal(3, 4), ints(1, 0, 2, 1)]),
            Case([normal(3, 5), ints(-1, 2, 1, -2), np.array(0.5)], label="crop-value")],
    "Identity": [Case([normal(3, 4)])],
    "Cast": [Case([normal(3, 4)], {"to": 11})],
    "Gather": [Case([normal(5, 3), ints(0, 3, 3, -1)], {"axis": 0}),
               Case([normal(2, 4, 3), np.array([[1, 0], [3, 1]], np.int64)], {"axis": 1})],
    "Conv": conv_cases(),
    "ConvTranspose": [
        Case([normal(1, 2, 3, 4), normal(2, 3, 3, 3), normal(3)]),
        Case([normal(2, 4, 3, 3), normal(4, 1, 3, 2)],
             {"strides": [2, 2], "pads": [1, 0, 0, 1], "group": 2}),
        Case([normal(1, 2, 4), normal(2, 2, 3)], {"strides": [2], "output_padding": [1]})],
    "MaxPool": [Case([distinct(2, 2, 4, 5)], {"kernel_shape": [2, 2], "strides": [2, 2],
                                               "ceil_mode": 1}),
                Case([distinct(1, 2, 5, 5)], {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]},
                     label="overlapping")],
    "AveragePool": [
        Case([normal(2, 2, 4, 5)], {"kernel_shape": [2, 2], "strides": [2, 2]}),
        Case([normal(1, 2, 5, 5)], {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1],
                                    "strides": [2, 2]}, label="pads"),
        Case([normal(1, 2, 5, 6)], {"kernel_shape": [3, 2], "pads": [1, 0, 1, 1],
                                    "count_include_pad": 1}, label="count-pad"),
        Case([normal(1, 1, 5, 5)], {"kernel_shape": [2, 2], "strides": [2, 2],
                                    "ceil_mode": 1}, label="ceil")],
    "GlobalAveragePool": [Case([normal(2, 3, 4, 5)])],
    "GlobalMaxPool": [Case([distinct(2, 3, 3, 4)])],
    "BatchNormalization": [
        Case([normal(4, 3, 2, 3), normal(3), normal(3), normal(3), positive(3)],
             {"training_mode": 1}, wrt=(0, 1, 2), label="training"),
        Case([normal(5, 3), normal(3), normal(3), normal(3), positive(3)],
             {"training_mode": 1}, wrt=(0, 1, 2), label="training-2d"),
        Case([normal(2, 3, 4), normal(3), normal(3), normal(3), positive(3)],
             label="inference")],
    "Dropout": [Case([normal(4, 6), np.array(0.3), np.array(True)], {"seed": 7}, wrt=(0,),
                     label="training"),
                Case([normal(3, 4)], label="inference")],
    "LRN": [Case([normal(2, 5, 3, 2)], {"size": 3, "alpha": 0.2, "beta": 0.6, "bias": 1.5}),
            Case([normal(1, 4, 3)], {"size": 2, "alpha": 0.5})],
    # gradient-only ops are differentiable too where a second-order graph needs them
    "Step": [Case([away(3, 4)])],
    "BroadcastLike": [Case([normal(3, 1), normal(2, 3, 4)], wrt=(0,))],
}


def build(op: str, case: Case):
    """(forward graph computing the loss, its loss name, the differentiated input names)."""
    g = graphc.Graph(op)
    names, wrt = [], []
    diff = case.differentiated()
    for i, a in enumerate(case.inputs):
        if a is None:
            names.append(None)
        elif i in diff:
            names.append(g.add_input(f"x{i}", graphc.TensorType.of(np.asarray(a, np.float64))))
            wrt.append(names[-1])
        else:
            names.append(g.add_constant(np.asarray(a)))
    outputs = [f"y{j}" for j in range(case.n_outputs)]
    g.add_node(op, names, case.attrs, outputs=outputs)
    loss = None
    weights = np.random.default_rng(7)
    for y in outputs:
        t = g.type_of(y)
        if t.dtype != "f64":
            continue
        r = g.add_constant(weights.standard_normal(t.shape))
        (prod,) = g.add_node("Mul", [y, r])
        (part,) = g.add_node("ReduceSum", [prod], {"keepdims": 0})
        loss = part if loss is None else g.add_node("Add", [loss, part])[0]
    g.set_outputs([loss])
    return g, loss, wrt


def feeds_of(case: Case) -> dict:
    diff = case.differentiated()
    return {f"x{i}": np.asarray(a, np.float64) for i, a in enumerate(case.inputs) if i in diff}


def numeric_grad(g, feeds: dict, name: str) -> np.ndarray:
    out = np.zeros_like(feeds[name])
    for index in np.ndindex(out.shape):
        values = []
        for sign in (1, -1):
            shifted = dict(feeds)
            shifted[name] = feeds[name].copy()
            shifted[name][index] += sign * EPS
            values.append(graphc.interpret(g, shifted)[0].item())
        out[index] = (values[0] - values[1]) / (2 * EPS)
    return out


def all_cases():
    for op, cases in CASES.items():
        for i, case in enumerate(cases):
            yield pytest.param(op, case, id=f"{op}-{case.label or i}")


@pytest.mark.parametrize("op, case", list(all_cases()))
def test_rule_matches_finite_differences(op, case):
    g, loss, wrt = build(op, case)
    gg = graphc.grad(g, loss, wrt)
    graphc.verify(gg)
    feeds = feeds_of(case)
    analytic = graphc.interpret(gg, feeds)[1:]
    for name, got in zip(wrt, analytic):
        want = numeric_grad(g, feeds, name)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL,
                                   err_msg=f"{op}: d loss / d {name}")


def test_every_rule_has_a_case():
    with_rules = {name for name, opdef in registry.all_ops().items() if opdef.grad is not None}
    assert with_rules - set(CASES) == set(), "ops with a gradient rule but no gradcheck case"
    assert set(CASES) - with_rules == set(), "gradcheck cases of ops without a rule"


def test_max_pool_grad_takes_max_pool_attributes():
    assert set(registry.get("MaxPoolGrad").attrs) == set(registry.get("MaxPool").attrs)
