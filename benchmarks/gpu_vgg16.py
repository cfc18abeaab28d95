"""VGG-16 at 224x224 on a GPU: graphc (target "cuda") vs PyTorch (cuDNN), same weights.

    python benchmarks/gpu_vgg16.py [--batches 1,8,32] [--rounds 10] [--conv auto]

For each batch: build VGG-16 with graphc's builder (He-initialised weights, seeded), compile it
for CUDA, run PyTorch's functional VGG-16 on the same weights (``cudnn.benchmark`` on, fp32,
TF32 off so both sides do full fp32 math), check that the outputs agree, then time both in
alternating rounds with the input already on the device and the output left there
(``device_outputs=True``), synchronising after each run. Prints the GPU's name, medians, the
graphc/PyTorch ratio and effective TFLOPS (the direct-convolution FLOP count of the unoptimised
graph, ``graphc.flops``, so Winograd's savings show as TFLOPS above what was executed).
Meant for ``benchmarks/gpu_check.sh`` on a lent GPU machine; it needs numba-cuda and torch.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

import graphc
from backends.cuda import compile_graph
from graphc import ops
from graphc.flops import flops_by_node

BLOCKS = [(64, 2), (128, 2), (256, 3), (512, 3), (512, 3)]


def he(rng, *shape):
    return (rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))).astype(np.float32)


def vgg16(batch: int) -> graphc.Graph:
    rng = np.random.default_rng(0)
    g = graphc.Graph("vgg16")
    h = g.input("x", (batch, 3, 224, 224))
    c = 3
    for k, n in BLOCKS:
        for _ in range(n):
            h = ops.relu(ops.conv(h, he(rng, k, c, 3, 3), np.zeros(k, np.float32),
                                  pads=[1, 1, 1, 1]))
            c = k
        h = ops.max_pool(h, kernel_shape=[2, 2], strides=[2, 2])
    h = ops.flatten(h, axis=1)
    for units in (4096, 4096):
        h = ops.relu(ops.gemm(h, he(rng, units, h.shape[1]), np.zeros(units, np.float32),
                              transB=1))
    g.output(ops.gemm(h, he(rng, 1000, 4096), np.zeros(1000, np.float32), transB=1))
    return g


def torch_forward(graph: graphc.Graph, torch):
    """A PyTorch function computing ``graph`` (Conv, Relu, MaxPool, Flatten, Gemm with
    transB=1: the ops of ``vgg16``) with the graph's weights on the GPU."""
    import torch.nn.functional as F

    steps = []
    for node in graph.nodes():
        const = [graph.constant_value(v) for v in node.inputs]
        tensors = [torch.from_numpy(np.ascontiguousarray(c)).cuda() if c is not None else None
                   for c in const]
        if node.op == "Conv":
            steps.append(lambda h, w=tensors[1], b=tensors[2]: F.conv2d(h, w, b, padding=1))
        elif node.op == "Relu":
            steps.append(F.relu)
        elif node.op == "MaxPool":
            steps.append(lambda h: F.max_pool2d(h, 2, 2))
        elif node.op == "Flatten":
            steps.append(lambda h: torch.flatten(h, 1))
        elif node.op == "Gemm":
            steps.append(lambda h, w=tensors[1], b=tensors[2]: F.linear(h, w, b))
        elif node.op not in ("Input", "Constant"):
            raise SystemExit(f"torch_forward: no PyTorch step for {node.op}")

    def forward(x):
        for step in steps:
            x = step(x)
        return x

    return forward


def median_ms(fn, sync, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measure(batch: int, conv: str, rounds: int, torch, cuda) -> dict:
    graph = vgg16(batch)
    flops = sum(flops_by_node(graph).values())
    start = time.perf_counter()
    model = compile_graph(graph, conv=conv)
    x = np.random.default_rng(1).standard_normal((batch, 3, 224, 224)).astype(np.float32)
    x_dev = cuda.to_device(x)
    (ours,) = model.run({"x": x_dev})  # first run: numba compiles the kernels
    compile_s = time.perf_counter() - start
    forward = torch_forward(graph, torch)
    x_torch = torch.from_numpy(x).cuda()
    with torch.no_grad():
        theirs = forward(x_torch).cpu().numpy()
        scale = np.abs(theirs).max()
        error = float(np.abs(ours - theirs).max() / scale)
        ours_ms, torch_ms = [], []
        for _ in range(rounds):  # alternate so that clocks and heat treat both alike
            ours_ms.append(median_ms(lambda: model.run({"x": x_dev}, device_outputs=True),
                                     cuda.synchronize, 1))
            torch_ms.append(median_ms(lambda: forward(x_torch), torch.cuda.synchronize, 1))
    ours_med, torch_med = statistics.median(ours_ms), statistics.median(torch_ms)
    return {"batch": batch, "graphc_ms": ours_med, "torch_ms": torch_med,
            "ratio": ours_med / torch_med, "tflops": flops / ours_med / 1e9,
            "torch_tflops": flops / torch_med / 1e9, "max_rel_error": error,
            "compile_s": compile_s}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--conv", default="auto", help="graphc conv algorithm (auto, im2col, "
                                                        "winograd-f2, winograd-f4)")
    args = parser.parse_args(argv)
    import torch
    from numba import cuda

    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    print(f"GPU: {torch.cuda.get_device_name(0)}; torch {torch.__version__}, cuDNN "
          f"{torch.backends.cudnn.version()}; conv={args.conv}")
    print("| VGG-16 224x224 | graphc ms | PyTorch ms | graphc/PyTorch | graphc TFLOPS | "
          "PyTorch TFLOPS | max rel. error | compile+1st run s |")
    print("|---|---|---|---|---|---|---|---|")
    for batch in (int(b) for b in args.batches.split(",")):
        r = measure(batch, args.conv, args.rounds, torch, cuda)
        print(f"| batch {r['batch']} | {r['graphc_ms']:.2f} | {r['torch_ms']:.2f} | "
              f"{r['ratio']:.2f} | {r['tflops']:.2f} | {r['torch_tflops']:.2f} | "
              f"{r['max_rel_error']:.1e} | {r['compile_s']:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
