"""Training throughput (samples/s) on the scikit-learn digits: graphc vs PyTorch vs numpy.

    python benchmarks/training.py [--threads 1] [--rounds 5] [--epochs 3] [--cases mlp,cnn]
                                  [--markdown]

Cases (the issue's): the MLP 64-100-10 (sigmoid hidden layer, softmax cross-entropy, SGD with
momentum 0.9, batch 32) and the small CNN conv3x3(8)-ReLU-conv3x3(16)-ReLU-maxpool-linear
(batch 64), trained on all 1,797 digits. Runners, with the same model, batch, loss, optimiser
and thread count:

* graphc: ``model.fit(..., target="cpu")`` -- one compiled step graph per batch size (compiled
  before timing), parameters ping-ponged between two buffer sets;
* PyTorch eager: the same ``torch.nn.Sequential``, ``CrossEntropyLoss``, ``torch.optim.SGD``,
  ``torch.set_num_threads(threads)``;
* numpy (MLP only): a hand-written loop (forward, softmax cross-entropy gradient, backward,
  momentum update) over preallocated arrays -- the floor a compiler must beat.

Every runner shuffles once per epoch and trains ``--epochs`` epochs per sample; runners are
interleaved round by round (graphc, torch, numpy, graphc, ...) so that a slow period of a shared
machine hits all of them; the table shows medians and the ratios graphc / other (above 1:
graphc is faster). The thread count is fixed before numpy or torch import (BLAS/OpenMP
variables). A sanity line gives each runner's training accuracy after the last round.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def _threads_from_argv(default: int = 1) -> int:
    for i, arg in enumerate(sys.argv):
        if arg == "--threads" and i + 1 < len(sys.argv):
            return int(sys.argv[i + 1])
        if arg.startswith("--threads="):
            return int(arg.split("=", 1)[1])
    return default


THREADS = _threads_from_argv()
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "GRAPHC_NUM_THREADS"):
    os.environ[_var] = str(THREADS)
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # after the thread variables

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import graphc
from graphc import nn, optim

LR, MOMENTUM = 0.05, 0.9


def load_digits():
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    return (digits.data / 16.0).astype(np.float32), digits.target.astype(np.int64)


# -- models -------------------------------------------------------------------------------------
def graphc_mlp():
    return nn.Sequential(nn.Linear(64, 100), nn.Sigmoid(), nn.Linear(100, 10), seed=0)


def graphc_cnn():
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1),
                         nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(256, 10), seed=0)


def torch_model(model, torch):
    """The same network and initial weights in torch (Linear's weight is transposed)."""
    layers = []
    for layer in model.layers:
        if isinstance(layer, nn.Linear):
            t = torch.nn.Linear(layer.in_features, layer.out_features)
        elif isinstance(layer, nn.Conv2d):
            t = torch.nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size,
                                layer.stride, layer.padding)
        elif isinstance(layer, nn.MaxPool2d):
            t = torch.nn.MaxPool2d(layer.kernel_size, layer.stride)
        else:
            t = {"Sigmoid": torch.nn.Sigmoid, "ReLU": torch.nn.ReLU,
                 "Flatten": torch.nn.Flatten}[layer.kind]()
        with torch.no_grad():
            for key, value in layer.params.items():
                value = value.T if isinstance(layer, nn.Linear) and key == "weight" else value
                getattr(t, key).copy_(torch.tensor(np.ascontiguousarray(value)))
        layers.append(t)
    return torch.nn.Sequential(*layers)


# -- runners: each trains `epochs` epochs and returns the seconds it took -----------------------
class GraphcRunner:
    name = "graphc"

    def __init__(self, make, X, y, batch):
        self.model, self.X, self.y, self.batch = make(), X, y, batch
        self.opt = optim.SGD(lr=LR, momentum=MOMENTUM)
        self.train(1)  # compiles the step (and the last partial batch's) specialisation

    def train(self, epochs: int) -> float:
        start = time.perf_counter()
        self.model.fit(self.X, self.y, loss="cross_entropy", optimizer=self.opt, epochs=epochs,
                       batch_size=self.batch, target="cpu", threads=THREADS, progress=False)
        return time.perf_counter() - start

    def accuracy(self) -> float:
        return self.model.evaluate(self.X, self.y, target="cpu", threads=THREADS).accuracy


class TorchRunner:
    name = "PyTorch"

    def __init__(self, make, X, y, batch):
        import torch

        torch.set_num_threads(THREADS)
        self.torch = torch
        self.net = torch_model(make(), torch)
        self.X, self.y, self.batch = torch.tensor(X), torch.tensor(y), batch
        self.opt = torch.optim.SGD(self.net.parameters(), lr=LR, momentum=MOMENTUM)
        self.loss = torch.nn.CrossEntropyLoss()
        self.generator = torch.Generator().manual_seed(0)
        self.train(1)

    def train(self, epochs: int) -> float:
        torch, n = self.torch, len(self.X)
        start = time.perf_counter()
        for _ in range(epochs):
            order = torch.randperm(n, generator=self.generator)
            X, y = self.X[order], self.y[order]
            for i in range(0, n, self.batch):
                self.opt.zero_grad()
                loss = self.loss(self.net(X[i:i + self.batch]), y[i:i + self.batch])
                loss.backward()
                self.opt.step()
        return time.perf_counter() - start

    def accuracy(self) -> float:
        with self.torch.no_grad():
            return float((self.net(self.X).argmax(1) == self.y).float().mean())


class NumpyMLPRunner:
    """64-100-10 sigmoid MLP, softmax cross-entropy, SGD with momentum, written by hand."""

    name = "numpy"

    def __init__(self, make, X, y, batch):
        model = make()
        model.initialise(X.shape[1:])
        p = model.parameters()
        self.w1, self.b1 = p["linear0.weight"].copy(), p["linear0.bias"].copy()
        self.w2, self.b2 = p["linear2.weight"].copy(), p["linear2.bias"].copy()
        self.params = [self.w1, self.b1, self.w2, self.b2]
        self.velocity = [np.zeros_like(a) for a in self.params]
        self.X, self.y, self.batch = X, y, batch
        self.one_hot = np.eye(10, dtype=np.float32)[y]
        self.rng = np.random.default_rng(0)
        self.train(1)

    def step(self, x, t) -> None:
        h = 1.0 / (1.0 + np.exp(-(x @ self.w1 + self.b1)))
        z = h @ self.w2 + self.b2
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        dz = (e / e.sum(axis=1, keepdims=True) - t) / np.float32(len(x))
        dh = (dz @ self.w2.T) * h * (1.0 - h)
        grads = [x.T @ dh, dh.sum(axis=0), h.T @ dz, dz.sum(axis=0)]
        for param, v, g in zip(self.params, self.velocity, grads):
            v *= MOMENTUM
            v += g
            param -= np.float32(LR) * v

    def train(self, epochs: int) -> float:
        n = len(self.X)
        start = time.perf_counter()
        for _ in range(epochs):
            order = self.rng.permutation(n)
            X, T = self.X[order], self.one_hot[order]
            for i in range(0, n, self.batch):
                self.step(X[i:i + self.batch], T[i:i + self.batch])
        return time.perf_counter() - start

    def accuracy(self) -> float:
        h = 1.0 / (1.0 + np.exp(-(self.X @ self.w1 + self.b1)))
        return float(((h @ self.w2 + self.b2).argmax(1) == self.y).mean())


CASES = {
    "mlp": ("digits MLP 64-100-10, batch 32", graphc_mlp, 32, False, ("graphc", "torch", "numpy")),
    "cnn": ("digits CNN conv8-conv16-pool-linear, batch 64", graphc_cnn, 64, True,
            ("graphc", "torch")),
}
RUNNERS = {"graphc": GraphcRunner, "torch": TorchRunner, "numpy": NumpyMLPRunner}


def bench_case(key, rounds, epochs, X, y):
    title, make, batch, images, names = CASES[key]
    data = X.reshape(-1, 1, 8, 8) if images else X
    runners = []
    for name in names:
        try:
            runners.append(RUNNERS[name](make, data, y, batch))
        except ImportError as exc:
            print(f"  {name}: not installed ({exc})", file=sys.stderr)
    samples = {r.name: [] for r in runners}
    for _ in range(rounds):
        for runner in runners:  # interleaved: a slow period hits every runner alike
            samples[runner.name].append(len(X) * epochs / runner.train(epochs))
    medians = {name: statistics.median(values) for name, values in samples.items()}
    sanity = ", ".join(f"{r.name} {r.accuracy():.3f}" for r in runners)
    return title, medians, sanity


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=3, help="epochs per timed sample")
    parser.add_argument("--cases", default="mlp,cnn")
    parser.add_argument("--markdown", action="store_true", help="print only the table")
    args = parser.parse_args(argv)
    X, y = load_digits()
    rows = []
    for key in args.cases.split(","):
        if key not in CASES:
            parser.error(f"unknown case {key!r} (cases: {', '.join(CASES)})")
        title, medians, sanity = bench_case(key, args.rounds, args.epochs, X, y)
        rows.append((title, medians))
        if not args.markdown:
            print(f"{title}: training accuracy after the runs: {sanity}", file=sys.stderr)
    print(f"threads={args.threads}, {args.rounds} rounds x {args.epochs} epochs of "
          f"{len(X)} samples, medians (graphc {graphc.__version__})\n")
    print("| case | graphc samples/s | PyTorch samples/s | numpy samples/s | graphc/PyTorch "
          "| graphc/numpy |")
    print("|---|---|---|---|---|---|")
    for title, m in rows:
        print(format_row(title, m))


def format_row(title: str, medians: dict) -> str:
    cells = [f"{medians[n]:,.0f}" if n in medians else "-" for n in ("graphc", "PyTorch", "numpy")]
    g = medians.get("graphc")
    ratios = [f"{g / medians[n]:.2f}" if g and n in medians else "-" for n in ("PyTorch", "numpy")]
    return f"| {title} | {' | '.join(cells + ratios)} |"

if __name__ == "__main__":
    main()
