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
import os
import statistics
import sys
import time

import numpy as np

import graphc
from backends.cuda import compile_graph
from graphc.flops import flops_by_node
from graphc.torch_eager import to_torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare import vgg16  # the same network as the CPU comparison


def torch_forward(graph: graphc.Graph, torch):
    """PyTorch eager on the GPU computing ``graph`` with its weights (graphc/torch_eager.py)."""
    function = to_torch(graph, device="cuda")
    return lambda x: function.run_tensors({"x": x})[0]


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
