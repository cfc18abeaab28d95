"""Generated SGEMM (backends/llvm/gemm.py) against numpy's BLAS sgemm.

Cases: square GEMMs (256 ... 2048) and the batched GEMMs of Winograd convolution on the 3x3
layers of VGG-16 (batch 1, 224x224): F(4x4,3x3) multiplies 36 pairs [tiles x C] @ [C x K],
F(2x2,3x3) 16 pairs. The Winograd filter transform is constant, so graphc also runs with B packed
ahead of time ("pre-packed" column); numpy has no such mode.

Method: both run with the same number of threads (numpy's OpenBLAS through its own pool, graphc
through ``Sgemm(threads=...)``); the implementations alternate in blocks for ``--rounds`` rounds
and each reports the median time per call. Each block is preceded by untimed calls of the same
implementation for ``WARM_S`` seconds: OpenBLAS's idle workers spin for about 0.1 s after a
call, and on a 2-core machine a spinning worker would steal a core from the next block; the
untimed calls absorb that, and keep the (virtual) cores clocked up instead of sleeping. Run it
without the OpenBLAS overrides this machine may export (they select a slower kernel for numpy):

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/gemm.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backends.llvm import host_target
from backends.llvm.gemm import GemmBlocking, Sgemm

WARM_S = 0.15        # untimed calls before each block: longer than OpenBLAS's idle spin
BLOCK_S = 0.2        # timed calls per block: about this long


@dataclass(frozen=True)
class Case:
    name: str
    batch: int       # 0: a plain 2-D GEMM
    m: int
    n: int
    k: int

    @property
    def flops(self) -> int:
        return 2 * max(self.batch, 1) * self.m * self.n * self.k

    @property
    def shape(self) -> str:
        core = f"{self.m}x{self.k} @ {self.k}x{self.n}"
        return f"{self.batch} x [{core}]" if self.batch else core


def winograd_case(layer: str, size: int, channels: int, m: int) -> Case:
    tiles = (-(-size // m)) ** 2
    alpha = (m + 2) ** 2
    return Case(f"F{m} {layer}", alpha, tiles, channels, channels)


SQUARES = [Case(f"square {n}", 0, n, n, n) for n in (256, 512, 1024, 2048)]
WINOGRAD = [winograd_case(f"{s}x{s}x{c}", s, c, m)
            for m in (4, 2) for s, c in ((56, 256), (28, 512), (14, 512))]


def blas_description() -> str:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "threadpoolctl not installed: BLAS unknown"
    parts = [f"{p.get('internal_api')} {p.get('version')} core={p.get('architecture')} "
             f"threads={p.get('num_threads')}"
             for p in threadpool_info() if p.get("user_api") == "blas"]
    return "; ".join(parts) or "no BLAS found by threadpoolctl"


def environment_report(threads: int, blocking: GemmBlocking) -> list[str]:
    target = host_target()
    host = (f"host: {target.cpu}, avx512f={target.has_feature('avx512f')}, "
            f"{os.cpu_count()} cpus; graphc threads={threads}, blocking={blocking}")
    lines = [host, f"numpy {np.__version__}: {blas_description()}"]
    overrides = {k: v for k, v in os.environ.items() if k in ("OPENBLAS_CORETYPE",
                                                              "OPENBLAS_L2_SIZE")}
    if overrides:
        lines.append(f"WARNING: {overrides} is set: numpy's BLAS is slowed; rerun with "
                     "env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE")
    return lines


def operands(case: Case, rng):
    lead = (case.batch,) if case.batch else ()
    a = rng.standard_normal(lead + (case.m, case.k)).astype(np.float32)
    b = rng.standard_normal(lead + (case.k, case.n)).astype(np.float32)
    return a, b, np.empty(lead + (case.m, case.n), np.float32)


def warm(fn, seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        fn()


def time_block(fn, reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def measure(case: Case, sgemm: Sgemm, rounds: int, rng) -> dict[str, float]:
    """Median seconds per call for numpy, graphc and graphc with B pre-packed."""
    a, b, out = operands(case, rng)
    packed = sgemm.pack_b(b)
    out_np = np.empty_like(out)
    runs = {"numpy": lambda: np.matmul(a, b, out=out_np),
            "graphc": lambda: sgemm(a, b, out=out),
            "graphc pre-packed": lambda: sgemm(a, packed, out=out)}
    for fn in runs.values():  # warm up: compile, page in, wake threads
        fn()
    check_result(case, out, a, b)
    reps = max(3, min(200, int(BLOCK_S * 300e9 / case.flops)))
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            warm(fn, WARM_S)
            times[name] += time_block(fn, reps)
    return {name: statistics.median(ts) for name, ts in times.items()}


def check_result(case: Case, out, a, b) -> None:
    want = np.matmul(a.astype(np.float64), b.astype(np.float64))
    scale = np.matmul(np.abs(a).astype(np.float64), np.abs(b).astype(np.float64))
    if not np.all(np.abs(out - want) <= 1e-5 * scale + 1e-30):
        raise SystemExit(f"{case.name}: graphc result differs from numpy")


def table(results: list[tuple[Case, dict[str, float]]]) -> list[str]:
    header = ("| case | shape | numpy GFLOPS | graphc GFLOPS | graphc / numpy "
              "| graphc pre-packed B | pre-packed / numpy |")
    rows = [header, "|---|---|---:|---:|---:|---:|---:|"]
    for case, med in results:
        gf = {name: case.flops / t / 1e9 for name, t in med.items()}
        rows.append(f"| {case.name} | {case.shape} | {gf['numpy']:.0f} | {gf['graphc']:.0f} "
                    f"| {gf['graphc'] / gf['numpy']:.2f} | {gf['graphc pre-packed']:.0f} "
                    f"| {gf['graphc pre-packed'] / gf['numpy']:.2f} |")
    return rows


def parse_blocking(text: str | None) -> GemmBlocking:
    if not text:
        return GemmBlocking()
    fields = dict(item.split("=") for item in text.split(","))
    return GemmBlocking(**{k: int(v) for k, v in fields.items()})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--cases", default="squares,winograd",
                        help="comma list of: squares, winograd")
    parser.add_argument("--blocking", default=None, help="e.g. mr=8,nr=32,kc=512,mc=128")
    parser.add_argument("--quick", action="store_true", help="2 rounds, small cases only")
    args = parser.parse_args(argv)
    blocking = parse_blocking(args.blocking)
    cases = [c for group in args.cases.split(",")
             for c in {"squares": SQUARES, "winograd": WINOGRAD}[group.strip()]]
    rounds = args.rounds
    if args.quick:
        cases, rounds = [c for c in cases if c.flops < 1e9], 2
    for line in environment_report(args.threads, blocking):
        print(line)
    sgemm = Sgemm(args.threads, blocking)
    rng = np.random.default_rng(0)
    results = []
    for case in cases:
        results.append((case, measure(case, sgemm, rounds, rng)))
        print(table(results[-1:])[-1], flush=True)
    print()
    print("\n".join(table(results)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
