"""Build LeNet-5 with graphc's builder and export it to ONNX: the small model the README runs.

    python examples/make_lenet5.py            # writes examples/models/lenet5.onnx (+ an input)

The weights are seeded He-initialised values (training arrives with the training API), so the
model is a fixed, reproducible architecture test case rather than a digit classifier.
"""

from __future__ import annotations

import os

import numpy as np

import graphc
from graphc import ops

HERE = os.path.dirname(os.path.abspath(__file__))


def he(rng, *shape):
    fan_in = int(np.prod(shape[1:]))
    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)


def lenet5(seed: int = 0) -> graphc.Graph:
    rng = np.random.default_rng(seed)
    g = graphc.Graph("lenet5")
    x = g.input("x", (None, 1, 28, 28))
    h = ops.relu(ops.conv(x, he(rng, 6, 1, 5, 5), np.zeros(6, np.float32), pads=[2, 2, 2, 2]))
    h = ops.max_pool(h, kernel_shape=[2, 2], strides=[2, 2])
    h = ops.relu(ops.conv(h, he(rng, 16, 6, 5, 5), np.zeros(16, np.float32)))
    h = ops.max_pool(h, kernel_shape=[2, 2], strides=[2, 2])
    h = ops.flatten(h, axis=1)
    h = ops.relu(ops.gemm(h, he(rng, 120, 400), np.zeros(120, np.float32), transB=1))
    h = ops.relu(ops.gemm(h, he(rng, 84, 120), np.zeros(84, np.float32), transB=1))
    y = ops.softmax(ops.gemm(h, he(rng, 10, 84), np.zeros(10, np.float32), transB=1), axis=-1)
    g.output(y)
    return g


def main() -> None:
    out = os.path.join(HERE, "models")
    os.makedirs(out, exist_ok=True)
    graphc.export_onnx(lenet5(), os.path.join(out, "lenet5.onnx"))
    x = np.random.default_rng(1).standard_normal((2, 1, 28, 28)).astype(np.float32)
    np.save(os.path.join(out, "lenet5_input.npy"), x)
    print(f"wrote {out}/lenet5.onnx and lenet5_input.npy")


if __name__ == "__main__":
    main()
