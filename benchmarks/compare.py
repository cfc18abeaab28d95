"""graphc (target="cpu") vs ONNX Runtime vs PyTorch eager: same threads, interleaved rounds.

    python benchmarks/compare.py [--quick] [--threads 2] [--rounds 7] [--cases vgg16,mlp]
                                 [--markdown] [--no-torch] [--no-ort] [--json OUT.json]

Cases: every distinct VGG-16 3x3 conv layer at batch 1 (bias + ReLU) with im2col, Winograd F2
and F4; the whole VGG-16 at 224x224 (batch 1, and 8 without --quick); a ResNet basic block
(conv-BN-ReLU-conv-BN + identity, ReLU); an MLP 784-1000-1000-10 at batch 1 and 128. Each case
is built here with graphc's builder and handed to ``graphc.bench.bench_graph``, which checks
every runner against the interpreter (a runner that disagrees is reported, not timed), exports
the graph to ONNX for ONNX Runtime and translates it for PyTorch eager
(``graphc.torch_eager``), and times all of them in interleaved rounds with the same thread
count. Effective GFLOPS use the direct-convolution FLOP count of the unoptimised graph
(``graphc.flops``), so Winograd's savings show as GFLOPS above the machine's FMA peak.
PyTorch and ONNX Runtime are optional: a missing one shows as "not installed".
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

import graphc
from graphc import ops
from graphc.bench import DEFAULT_RUNNERS, bench_graph, format_markdown, format_summary, problems

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


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], graphc.Graph]
    conv: str = "auto"
    quick: bool = True  # part of --quick


def cases() -> list[Case]:
    out = []
    for i, (c, k, hw) in enumerate(VGG16_LAYERS):
        for conv in ("im2col", "winograd-f2", "winograd-f4"):
            out.append(Case(f"VGG-16 conv {c}->{k}@{hw}", lambda c=c, k=k, hw=hw:
                            conv_layer(c, k, hw), conv, quick=i in (1, 2)))
    out += [Case("VGG-16 224x224, batch 1", lambda: vgg16(1)),
            Case("VGG-16 224x224, batch 8", lambda: vgg16(8), quick=False),
            Case("ResNet basic block 64@56", basic_block),
            Case("MLP 784-1000-1000-10, batch 1", lambda: mlp(1)),
            Case("MLP 784-1000-1000-10, batch 128", lambda: mlp(128))]
    return out


def select(all_cases: list[Case], quick: bool, patterns: str | None) -> list[Case]:
    """--quick keeps the quick cases; --cases keeps names containing any pattern (any case)."""
    chosen = [c for c in all_cases if c.quick or not quick]
    if patterns:
        wanted = [p.strip().lower() for p in patterns.split(",") if p.strip()]
        chosen = [c for c in chosen if any(p in f"{c.name} {c.conv}".lower() for p in wanted)]
    return chosen


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="threads of every runner")
    parser.add_argument("--rounds", type=int, help="timed rounds (default 7; 3 with --quick)")
    parser.add_argument("--quick", action="store_true", help="fewer cases and rounds")
    parser.add_argument("--cases", metavar="PAT1,PAT2",
                        help="only cases whose name or conv contains one of these "
                             "(case-insensitive), e.g. 'mlp,winograd-f4'")
    parser.add_argument("--markdown", action="store_true",
                        help="print only the final Markdown table (one line per case)")
    parser.add_argument("--no-torch", action="store_true", help="leave PyTorch out")
    parser.add_argument("--no-ort", action="store_true", help="leave ONNX Runtime out")
    parser.add_argument("--json", metavar="OUT.json", help="also write every row as JSON")
    args = parser.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 7)
    runners = [r for r in DEFAULT_RUNNERS
               if not (r == "pytorch" and args.no_torch or r == "onnxruntime" and args.no_ort)]
    chosen = select(cases(), args.quick, args.cases)
    if not chosen:
        parser.error(f"no case matches --cases {args.cases!r}")
    rows = []
    for case in chosen:
        case_rows = bench_graph(case.build(), case=case.name, runners=runners,
                                threads=args.threads, conv=case.conv, rounds=rounds)
        rows += case_rows
        if not args.markdown:
            print(format_markdown(case_rows), flush=True)
            print(flush=True)
    print(format_summary(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.as_dict() for r in rows], f, indent=1)
    for row in problems(rows):
        print(f"{row.case}: {row.runner} {row.status}: {row.detail}", file=sys.stderr)
    return 1 if problems(rows) else 0


if __name__ == "__main__":
    sys.exit(main())
