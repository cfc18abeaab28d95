"""ONNX in, ONNX out: import a model, watch each pass rewrite it, run it, compare with ONNX Runtime.

    python examples/onnx_roundtrip.py [--quick] [--model PATH.onnx] [--out DIR]

1. The model: with PyTorch installed, a small CNN (conv-BN-ReLU twice, max-pool, linear) is built
   in PyTorch and exported with ``torch.onnx.export``; without it, the LeNet-5 shipped in
   ``examples/models/``; or any file given with ``--model``.
2. ``graphc.import_onnx`` turns it into a graph; ``graphc.compile(..., print_after_all=True)``
   prints the IR after each pass of the CPU pipeline (BatchNorm folds into the convs, the 3x3
   convs become Winograd or im2col + GEMM, bias and ReLU fuse into the GEMMs).
3. The compiled model runs on random input; its output is compared with ONNX Runtime on the
   original file (and with PyTorch when the model came from it), then the imported graph is
   exported back to ONNX and run in ONNX Runtime again.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import warnings
from pathlib import Path

import numpy as np

import graphc

HERE = os.path.dirname(os.path.abspath(__file__))
LENET = os.path.join(HERE, "models", "lenet5.onnx")


def torch_cnn_onnx(batch: int = 2):
    """A PyTorch CNN in eval mode exported to ONNX bytes, with an input and its PyTorch output;
    None when torch is not installed."""
    try:
        import torch
    except ImportError:
        return None
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.MaxPool2d(2), torch.nn.Flatten(), torch.nn.Linear(16 * 14 * 14, 10))
    for m in net:
        if isinstance(m, torch.nn.BatchNorm2d):  # non-trivial statistics, so the fold shows
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    net.eval()
    x = torch.randn(batch, 1, 28, 28)
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript exporter needs no onnxscript; it warns
        warnings.simplefilter("ignore", DeprecationWarning)
        # no constant folding in the exporter: graphc's fold-batchnorm pass does it, visibly
        torch.onnx.export(net, (x,), buffer, dynamo=False, input_names=["x"],
                          output_names=["y"], do_constant_folding=False)
    with torch.inference_mode():
        want = net(x).numpy()
    return buffer.getvalue(), x.numpy(), want


def onnxruntime_outputs(model_bytes: bytes, feeds: dict):
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def random_feeds(graph: graphc.Graph, batch: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    feeds = {}
    for name in graph.inputs:
        t = graph.type_of(name)
        shape = [batch if isinstance(d, str) else d for d in t.shape]
        feeds[name] = rng.standard_normal(shape).astype(t.np_dtype)
    return feeds


def report(label: str, got: np.ndarray, want: np.ndarray | None) -> float | None:
    if want is None:
        print(f"  vs {label:<22} not installed")
        return None
    error = float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-12))
    print(f"  vs {label:<22} max relative difference {error:.1e}")
    return error


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="an ONNX file (default: a PyTorch export, else LeNet-5)")
    parser.add_argument("--quick", action="store_true",
                        help="print the IR only before and after the pipeline, not per pass")
    parser.add_argument("--out", default=os.path.join(HERE, "output"))
    args = parser.parse_args(argv)

    torch_want, feeds = None, None
    if args.model:
        source, model_bytes = args.model, Path(args.model).read_bytes()
    elif (exported := torch_cnn_onnx()) is not None:
        model_bytes, x, torch_want = exported
        source, feeds = "PyTorch CNN (torch.onnx.export)", {"x": x}
    else:
        source, model_bytes = LENET, Path(LENET).read_bytes()
    graph = graphc.import_onnx(model_bytes)
    feeds = feeds or random_feeds(graph, batch=2)
    print(f"model: {source}: {len(graph)} nodes, inputs "
          + ", ".join(f"{n}: {graph.type_of(n)}" for n in graph.inputs))

    compiled = graphc.compile(graph, target="cpu", print_after_all=not args.quick,
                              out=sys.stdout)
    if args.quick:
        print("-- imported --\n" + str(graph) + "\n-- optimised --\n" + str(compiled.graph))
    print(compiled.timing_report())
    (got,) = compiled.run(feeds)[:1]

    ort_want = onnxruntime_outputs(model_bytes, feeds)
    print(f"output {got.shape}, compiled for the CPU:")
    errors = {"onnxruntime": report("ONNX Runtime", got, None if ort_want is None
                                    else ort_want[0])}
    if torch_want is not None:
        errors["torch"] = report("PyTorch", got, torch_want)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "roundtrip.onnx")
    graphc.export_onnx(graph, path)
    again = onnxruntime_outputs(Path(path).read_bytes(), feeds)
    errors["re-exported"] = report("ONNX Runtime, re-export", got,
                                   None if again is None else again[0])
    print(f"re-exported the imported graph to {path}")
    return {"errors": errors, "source": source}


if __name__ == "__main__":
    summary = main()
    worst = max((e for e in summary["errors"].values() if e is not None), default=0.0)
    sys.exit(0 if worst < 1e-3 else 1)
