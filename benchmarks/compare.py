"""graphc (target="cpu") vs ONNX Runtime, same threads, interleaved rounds, medians.

    python benchmarks/compare.py [--quick] [--threads 2] [--rounds 7]

PyTorch is not compared yet. Cases: every distinct VGG-16 3x3 conv layer at batch 1
(bias + ReLU) with im2col, Winograd F2
and F4; the whole VGG-16 at 224x224 (batch 1, and 8 without --quick); a ResNet basic block; an
MLP 784-1000-1000-10 at batch 1 and 128. Each case is built with graphc's builder, exported to
ONNX for ONNX Runtime (same weights, same threads), checked for agreement, then timed in
alternating rounds. Effective GFLOPS use the direct-convolution FLOP count of the unoptimised
graph (graphc.flops), so Winograd's savings show as GFLOPS above the machine's FMA peak.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

import graphc
from graphc import ops
from graphc.flops import flops_by_node

VGG16_LAYERS = [(3, 64, 224), (64, 64, 224), (64, 128, 112), (128, 128, 112), (128, 256, 56),
                (256, 256, 56), (256, 512, 28), (512, 512, 28), (512, 512, 14)]
VGG16_BLOCKS = [(64, 2), (128, 2), (256, 3), (512, 3), (512, 3)]


def he(rng, *shape):
    return (rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))).astype(np.float32)


def conv_layer(c, k, hw):
    rng = np.random.default_rng(0)
    g = graphc.Graph(f"conv{c}_{k}_{hw}")
    x = g.input("x", (1, c, hw, hw))
    g.output(ops.relu(ops.conv(x, he(rng, k, c, 3, 3), np.zeros(k, np.float32),
                               pads=[1, 1, 1, 1])))
    return g


def vgg16(batch):
    rng = np.random.default_rng(0)
    g = graphc.Graph("vgg16")
    h = x = g.input("x", (batch, 3, 224, 224))
    c = 3
    for k, n in VGG16_BLOCKS:
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
    del x
    return g


def basic_block():
    rng = np.random.default_rng(0)
    g = graphc.Graph("resnet_basic_block")
    x = g.input("x", (1, 64, 56, 56))

    def conv_bn(h):
        h = ops.conv(h, he(rng, 64, 64, 3, 3), None, pads=[1, 1, 1, 1])
        return ops.batch_normalization(h, rng.uniform(0.5, 1.5, 64), rng.standard_normal(64),
                                       rng.standard_normal(64), rng.uniform(0.5, 1.5, 64))

    g.output(ops.relu(conv_bn(ops.relu(conv_bn(x))) + x))
    return g


def mlp(batch):
    rng = np.random.default_rng(0)
    g = graphc.Graph("mlp")
    h = g.input("x", (batch, 784))
    for units in (1000, 1000):
        h = ops.relu(ops.gemm(h, he(rng, units, h.shape[1]), np.zeros(units, np.float32),
                              transB=1))
    g.output(ops.gemm(h, he(rng, 10, 1000), np.zeros(10, np.float32), transB=1))
    return g


def median_ms(fn, rounds, block):
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(block):
            fn()
        times.append((time.perf_counter() - start) / block * 1e3)
    return statistics.median(times)


def measure(name, graph, conv, threads, rounds, ort):
    feeds = {v: np.random.default_rng(1).standard_normal(graph.type_of(v).shape)
             .astype(np.float32) for v in graph.inputs}
    start = time.perf_counter()
    model = graphc.compile(graph, target="cpu", conv=conv, threads=threads)
    compile_s = time.perf_counter() - start
    flops = sum(flops_by_node(graph).values())
    ours = model.run(feeds)
    runners = {"graphc": lambda: model.run(feeds)}
    if ort is not None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(graphc.export_onnx(graph).SerializeToString(), options,
                                       providers=["CPUExecutionProvider"])
        theirs = session.run(None, feeds)
        scale = max(float(np.abs(theirs[0]).max()), 1e-30)
        error = float(np.abs(ours[0] - theirs[0]).max()) / scale
        runners["ort"] = lambda: session.run(None, feeds)
    else:
        error = float("nan")
    for fn in runners.values():  # warm-up
        fn()
    block = max(1, int(0.05 / max(1e-4, _once(runners["graphc"]))))
    samples = {k: [] for k in runners}
    for _ in range(rounds):  # interleaved: each round times every runner once
        for key, fn in runners.items():
            samples[key].append(median_ms(fn, 1, block))
    med = {k: statistics.median(v) for k, v in samples.items()}
    row = {"case": name, "conv": conv, "graphc ms": med["graphc"],
           "graphc GFLOPS": flops / med["graphc"] / 1e6, "compile s": compile_s,
           "rel err vs ORT": error}
    if "ort" in med:
        row.update({"ORT ms": med["ort"], "ORT GFLOPS": flops / med["ort"] / 1e6,
                    "graphc/ORT": med["graphc"] / med["ort"]})
    return row


def _once(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def print_table(rows):
    keys = ["case", "conv", "graphc ms", "ORT ms", "graphc/ORT", "graphc GFLOPS", "ORT GFLOPS",
            "compile s", "rel err vs ORT"]
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        cells = []
        for k in keys:
            v = r.get(k, "")
            cells.append(f"{v:.3g}" if isinstance(v, float) else str(v))
        print("| " + " | ".join(cells) + " |")
    sys.stdout.flush()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="fewer cases and rounds")
    args = parser.parse_args(argv)
    try:
        import onnxruntime as ort
    except ImportError:
        ort = None
        print("onnxruntime is not installed: graphc numbers only")
    rounds = 3 if args.quick else args.rounds
    rows = []
    layers = VGG16_LAYERS[1:3] if args.quick else VGG16_LAYERS
    for c, k, hw in layers:
        for conv in ("im2col", "winograd-f2", "winograd-f4"):
            rows.append(measure(f"vgg16 3x3 {c}->{k}@{hw}", conv_layer(c, k, hw), conv,
                                args.threads, rounds, ort))
            print_table(rows[-1:])
    cases = [("vgg16 b1", vgg16(1)), ("resnet basic block", basic_block()),
             ("mlp b1", mlp(1)), ("mlp b128", mlp(128))]
    if not args.quick:
        cases.insert(1, ("vgg16 b8", vgg16(8)))
    for name, graph in cases:
        rows.append(measure(name, graph, "auto", args.threads, rounds, ort))
        print_table(rows[-1:])
    print()
    print_table(rows)


if __name__ == "__main__":
    main()
