"""Lavin & Gray's experiment here: VGG-16's 3x3 layers with im2col, F(2x2,3x3) and F(4x4,3x3).

    python examples/vgg16_winograd.py [--quick] [--batches 1,8,64] [--threads N] [--out DIR]

Winograd's minimal filtering algorithm F(m x m, 3x3) computes an m x m output tile from an
(m+2) x (m+2) input tile with (m+2)^2 multiplications instead of 9 m^2: 2.25x fewer for F(2x2)
and 4x fewer for F(4x4) (Lavin & Gray 2015, arXiv:1509.09308). The transforms cost additions, and
the batched GEMMs over the transformed tiles are smaller than one big im2col GEMM, so the measured
speedup is below the arithmetic reduction. This example compiles every distinct 3x3 layer of
VGG-16 (bias + ReLU, 'same' padding) three times for the CPU -- conv="im2col", "winograd-f2",
"winograd-f4" -- times each at several batch sizes (interleaved rounds, medians), and prints the
effective GFLOPS (direct-convolution FLOPs / time: Winograd can exceed the FMA peak), the
arithmetic reduction and the measured speedup over im2col; it plots GFLOPS per layer.

``--quick`` takes the three smallest-FLOP layers at a quarter of their spatial size, batch 1 and 2.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
from example_support import pyplot, save_figure

import graphc
from graphc import ops

HERE = os.path.dirname(os.path.abspath(__file__))
# (input channels, output channels, height = width) of every distinct VGG-16 3x3 layer
VGG16_LAYERS = [(3, 64, 224), (64, 64, 224), (64, 128, 112), (128, 128, 112), (128, 256, 56),
                (256, 256, 56), (256, 512, 28), (512, 512, 28), (512, 512, 14)]
ALGORITHMS = {"im2col": "im2col", "F(2x2,3x3)": "winograd-f2", "F(4x4,3x3)": "winograd-f4"}
MULTIPLY_REDUCTION = {"im2col": 1.0, "F(2x2,3x3)": 36 / 16, "F(4x4,3x3)": 144 / 36}


def conv_layer(c: int, k: int, hw: int, batch: int, seed: int = 0) -> graphc.Graph:
    rng = np.random.default_rng(seed)
    g = graphc.Graph(f"conv{c}_{k}_{hw}")
    x = g.input("x", (batch, c, hw, hw))
    w = (rng.standard_normal((k, c, 3, 3)) * np.sqrt(2.0 / (9 * c))).astype(np.float32)
    g.output(ops.relu(ops.conv(x, w, np.zeros(k, np.float32), pads=[1, 1, 1, 1])))
    return g


def direct_flops(c: int, k: int, hw: int, batch: int) -> int:
    """2 * multiply-adds of a direct 3x3 convolution with 'same' padding."""
    return 2 * batch * k * c * 9 * hw * hw


def time_models(models: dict, feeds: dict, rounds: int) -> dict[str, float]:
    """Median seconds per run of each model, in interleaved rounds (one run of each per round)."""
    for model in models.values():
        model.run(feeds)  # warm-up: specialisation, caches
    samples = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            start = time.perf_counter()
            model.run(feeds)
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in samples.items()}


def measure_layer(c, k, hw, batch, threads, rounds) -> dict:
    graph = conv_layer(c, k, hw, batch)
    feeds = {"x": np.random.default_rng(1).standard_normal((batch, c, hw, hw), np.float32)}
    models = {label: graphc.compile(graph, target="cpu", conv=conv, threads=threads)
              for label, conv in ALGORITHMS.items()}
    want = graphc.interpret(graph, feeds)[0]
    for label, model in models.items():  # the speed of a wrong answer is worth nothing
        got = model.run(feeds)[0]
        error = np.abs(got - want).max() / np.abs(want).max()
        if error > 1e-4:
            raise AssertionError(f"{label} on conv {c}->{k}@{hw}: relative error {error:.1e}")
    seconds = time_models(models, feeds, rounds)
    flops = direct_flops(c, k, hw, batch)
    return {label: {"ms": s * 1e3, "gflops": flops / s / 1e9,
                    "speedup": seconds["im2col"] / s} for label, s in seconds.items()}


def print_table(rows: list) -> None:
    print(f"| layer | batch | {' | '.join(f'{a} ms' for a in ALGORITHMS)} | "
          f"{' | '.join(f'{a} GFLOPS' for a in ALGORITHMS)} | F2 speedup (arith.) | "
          f"F4 speedup (arith.) |")
    print("|" + "---|" * (2 + 2 * len(ALGORITHMS) + 2))
    for (c, k, hw, batch), r in rows:
        ms = " | ".join(f"{r[a]['ms']:.2f}" for a in ALGORITHMS)
        gf = " | ".join(f"{r[a]['gflops']:.0f}" for a in ALGORITHMS)
        speedups = " | ".join(f"{r[a]['speedup']:.2f}x ({MULTIPLY_REDUCTION[a]:.2f}x)"
                              for a in ("F(2x2,3x3)", "F(4x4,3x3)"))
        print(f"| {c}->{k}@{hw} | {batch} | {ms} | {gf} | {speedups} |")


def plot(rows: list, path: str) -> str | None:
    plt = pyplot()
    if plt is None:  # matplotlib is an optional extra
        return None
    batches = sorted({key[3] for key, _ in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4.5), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        mine = [(key, r) for key, r in rows if key[3] == batch]
        labels = [f"{c}->{k}\n@{hw}" for (c, k, hw, _), _ in mine]
        x = np.arange(len(mine))
        for i, algorithm in enumerate(ALGORITHMS):
            ax.bar(x + (i - 1) * 0.27, [r[algorithm]["gflops"] for _, r in mine], 0.27,
                   label=algorithm)
        ax.set_xticks(x, labels, fontsize=7)
        ax.set_ylabel("effective GFLOPS (direct-conv FLOPs / time)")
        ax.set_title(f"VGG-16 3x3 layers, batch {batch}")
        ax.legend()
    return save_figure(fig, path)


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batches", default=None, help="comma-separated (default 1,8,64)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--out", default=os.path.join(HERE, "output"))
    args = parser.parse_args(argv)

    if args.quick:
        layers = [(c, k, hw // 4) for c, k, hw in VGG16_LAYERS[1:4]]
        batches, rounds = [1, 2], args.rounds or 3
    else:
        layers, batches, rounds = VGG16_LAYERS, [1, 8, 64], args.rounds or 5
    if args.batches:
        batches = [int(b) for b in args.batches.split(",")]
    rows = []
    for batch in batches:
        for c, k, hw in layers:
            rows.append(((c, k, hw, batch), measure_layer(c, k, hw, batch, args.threads, rounds)))
            print(f"measured conv {c}->{k}@{hw} batch {batch}", file=sys.stderr)
    print_table(rows)
    os.makedirs(args.out, exist_ok=True)
    png = plot(rows, os.path.join(args.out, "vgg16_winograd.png"))
    print(f"saved {png}" if png else "matplotlib not installed: no plot saved")
    return rows


if __name__ == "__main__":
    main()
