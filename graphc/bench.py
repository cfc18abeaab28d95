"""Benchmark one graph on several runtimes: graphc vs ONNX Runtime vs PyTorch eager.

``bench_graph(graph, feeds)`` is the single harness behind ``graphc bench MODEL.onnx`` and
``benchmarks/compare.py``. For one graph it

1. fixes the input shapes to the feeds' (so FLOPs and code are for the measured shapes) and
   counts FLOPs on the ORIGINAL graph (``graphc.flops``: direct-convolution counts, so
   Winograd's savings show as "effective" GFLOPS, possibly above the machine's FMA peak);
2. builds each runner with the same thread count: ``graphc`` (target "cpu"),
   ``graphc-reference`` (the optimised graph on the interpreter, optional), ``onnxruntime``
   (the graph exported to ONNX bytes; ``intra_op_num_threads`` = threads, inter-op 1,
   sequential) and ``pytorch`` (``graphc.torch_eager``; ``torch.set_num_threads``);
3. checks every runner against the interpreter (``|got - want| <= atol + rtol * |want|``,
   rtol 2e-3, atol 1e-4); a runner that disagrees is reported as ``disagrees`` and NOT timed,
   since a fast wrong answer is not a result;
4. times the runners in interleaved rounds (r1 graphc, r1 ort, r1 torch, r2 graphc, ...) after
   warm-up, so that a slow period of a shared machine hits every runner alike. Each sample
   is a block of calls lasting at least ``min_sample_s`` (tiny graphs run in microseconds), and
   is preceded by ``settle_s`` of untimed calls of the same runner: ONNX Runtime's and
   OpenMP's idle workers spin for a while after a call and would otherwise steal cores from
   the runner timed next;
5. reports one ``BenchRow`` per runner: median ms per call, ratio graphc/runner (below 1:
   graphc is faster) and effective GFLOPS = FLOPs / median.

Optional runtimes that are missing give rows with status ``not installed``; a runner that fails
to build or run gives status ``failed`` with the error. ``format_markdown`` (one line per
runner) and ``format_summary`` (one line per case) render rows as Markdown tables.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from .errors import FeedError, GraphcError
from .interp import interpret
from .ir import Graph

RUNNERS = ("graphc", "graphc-reference", "onnxruntime", "pytorch")
DEFAULT_RUNNERS = ("graphc", "onnxruntime", "pytorch")
LABELS = {"graphc": "graphc", "graphc-reference": "graphc reference",
          "onnxruntime": "ONNX Runtime", "pytorch": "PyTorch"}
RTOL, ATOL = 2e-3, 1e-4

OK, DISAGREES, FAILED, NOT_INSTALLED = "ok", "disagrees", "failed", "not installed"


class NotInstalled(Exception):
    """An optional runtime (onnxruntime, torch) is missing: a row, not an error."""


@dataclass
class BenchRow:
    """One runner on one case. Times are per call; ``ratio`` is graphc's median over this
    runner's (1.0 on graphc's own row); ``gflops`` uses the unoptimised graph's FLOPs."""

    case: str
    runner: str
    status: str
    threads: int
    flops: int
    conv: str = "auto"
    median_ms: float | None = None
    ratio: float | None = None
    gflops: float | None = None
    setup_s: float | None = None  # compile (graphc), session (ORT) or translation (PyTorch)
    max_abs_error: float | None = None
    detail: str = ""
    samples_ms: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class _Runner:
    name: str
    call: Callable[[], list]
    setup_s: float
    calls_per_sample: int = 1


# -- feeds and shapes ----------------------------------------------------------------------------
def random_feeds(graph: Graph, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded standard-normal data for every (static, float) input of ``graph``."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for name in graph.inputs:
        t = graph.type_of(name)
        if not t.is_static:
            raise FeedError(f"input '{name}' has symbolic shape {t}; fix it (--batch or "
                            f"--input-shape {name}=...) to benchmark with random data")
        if t.dtype not in ("f16", "f32", "f64"):
            raise FeedError(f"input '{name}' is {t}; random feeds are float only, give a feed")
        feeds[name] = rng.standard_normal(t.shape).astype(t.np_dtype)
    return feeds


def _specialise(graph: Graph, feeds: Mapping[str, np.ndarray]) -> Graph:
    """``graph`` with its inputs typed by the feeds' shapes (a no-op for static graphs)."""
    if all(graph.type_of(v).is_static for v in graph.inputs):
        return graph
    from passes.infer_shapes import with_input_shapes

    missing = [v for v in graph.inputs if v not in feeds]
    if missing:
        raise FeedError(f"missing feed for input '{missing[0]}' ({graph.type_of(missing[0])})")
    return with_input_shapes(graph, {v: np.shape(feeds[v]) for v in graph.inputs})


def total_flops(graph: Graph) -> int:
    from .flops import flops_by_node

    return sum(flops_by_node(graph).values())


# -- runners -------------------------------------------------------------------------------------
def _build_graphc(graph, feeds, threads, conv, target="cpu") -> Callable[[], list]:
    from .compile import compile as compile_graph

    model = compile_graph(graph, target=target, conv=conv, threads=threads)
    return lambda: model.run(feeds)


def _build_onnxruntime(graph, feeds, threads, conv) -> Callable[[], list]:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise NotInstalled(str(exc)) from None
    from .onnx_export import export_onnx

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    session = ort.InferenceSession(export_onnx(graph).SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return lambda: session.run(None, feeds)


def _build_pytorch(graph, feeds, threads, conv) -> Callable[[], list]:
    from .torch_eager import TorchUnavailableError, to_torch, torch_module

    try:
        torch = torch_module()
    except TorchUnavailableError as exc:
        raise NotInstalled(str(exc)) from None
    torch.set_num_threads(threads)
    function = to_torch(graph)
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()}
    return lambda: [t.numpy() for t in function.run_tensors(tensors)]


_BUILDERS = {"graphc": _build_graphc,
             "graphc-reference": lambda g, f, t, c: _build_graphc(g, f, t, c, "reference"),
             "onnxruntime": _build_onnxruntime, "pytorch": _build_pytorch}


def _build(name, make: Callable[[], Callable[[], list]], row: BenchRow) -> _Runner | None:
    """Build one runner, recording a missing runtime or a failure in ``row``."""
    start = time.perf_counter()
    try:
        call = make()
    except NotInstalled as exc:
        row.status, row.detail = NOT_INSTALLED, str(exc)
        return None
    except Exception as exc:  # noqa: BLE001 - any runtime's failure is a result to report
        row.status, row.detail = FAILED, _describe(exc)
        return None
    row.setup_s = time.perf_counter() - start
    return _Runner(name, call, row.setup_s)


def _describe(exc: Exception) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:300]


# -- agreement -----------------------------------------------------------------------------------
def compare_outputs(got: Sequence, want: Sequence, names: Sequence[str],
                    rtol: float = RTOL, atol: float = ATOL) -> tuple[float, str]:
    """(max |got - want|, "" if every output is within tolerance else what differs)."""
    if len(got) != len(want):
        return math.inf, f"{len(got)} outputs, expected {len(want)}"
    worst = 0.0
    for name, g, w in zip(names, got, want):
        g, w = np.asarray(g), np.asarray(w)
        if g.shape != w.shape:
            return math.inf, f"output '{name}' has shape {g.shape}, expected {w.shape}"
        if w.size == 0:
            continue
        diff = np.abs(g.astype(np.float64) - w.astype(np.float64))
        bad = ~(diff <= atol + rtol * np.abs(w.astype(np.float64)))  # NaN counts as bad
        error = float(np.nanmax(diff)) if not np.isnan(diff).all() else math.inf
        worst = max(worst, error)
        if bad.any():
            return worst, (f"output '{name}': {int(bad.sum())} of {w.size} elements differ "
                           f"from the interpreter beyond rtol={rtol:g}, atol={atol:g} "
                           f"(max |error| {error:.3g})")
    return worst, ""


# -- timing --------------------------------------------------------------------------------------
def _time_block(runner: _Runner) -> float:
    """Milliseconds per call over one block of ``calls_per_sample`` calls."""
    start = time.perf_counter()
    for _ in range(runner.calls_per_sample):
        runner.call()
    return (time.perf_counter() - start) / runner.calls_per_sample * 1e3


def _settle(runner: _Runner, seconds: float) -> None:
    """Untimed calls of the runner about to be timed, so that the previous runner's spinning
    workers have gone idle and this one's are awake."""
    deadline = time.perf_counter() + seconds
    runner.call()
    while time.perf_counter() < deadline:
        runner.call()


def _warm_up(runners: list[_Runner], warmup: int, min_sample_s: float) -> None:
    for runner in runners:
        for _ in range(max(1, warmup)):
            once_ms = _time_block(runner)
        runner.calls_per_sample = max(1, math.ceil(min_sample_s * 1e3 / max(once_ms, 1e-3)))


def time_interleaved(runners: list[_Runner], rounds: int, warmup: int, min_sample_s: float,
                     settle_s: float) -> dict[str, list[float]]:
    """Samples (ms per call) per runner, one sample of each runner per round."""
    _warm_up(runners, warmup, min_sample_s)
    samples: dict[str, list[float]] = {r.name: [] for r in runners}
    for _ in range(rounds):
        for runner in runners:
            if settle_s > 0:
                _settle(runner, settle_s)
            samples[runner.name].append(_time_block(runner))
    return samples


# -- the harness ---------------------------------------------------------------------------------
def bench_graph(graph: Graph, feeds: Mapping[str, np.ndarray] | None = None, *,
                case: str | None = None, runners: Iterable[str] = DEFAULT_RUNNERS,
                threads: int | None = None, conv: str | Mapping[str, str] = "auto",
                rounds: int = 7, warmup: int = 2, min_sample_s: float = 0.02,
                settle_s: float = 0.1, seed: int = 0, rtol: float = RTOL, atol: float = ATOL,
                extra_runners: Mapping[str, Callable[[Mapping], list]] | None = None,
                ) -> list[BenchRow]:
    """Check and time ``graph`` on ``runners`` (names from ``RUNNERS``) plus ``extra_runners``
    (name -> function of the feeds returning the outputs); see the module docstring.

    ``feeds`` default to seeded random data (``seed``); ``threads`` defaults to graphc's
    (``GRAPHC_NUM_THREADS`` or every core) and is used by every runner.
    """
    runners = list(runners)
    unknown = [r for r in runners if r not in RUNNERS]
    if unknown:
        raise GraphcError(f"unknown runner '{unknown[0]}' (choices: {', '.join(RUNNERS)})")
    if rounds < 1 or warmup < 0:
        raise GraphcError(f"rounds must be >= 1 and warmup >= 0, got {rounds} and {warmup}")
    if threads is None:
        from backends.llvm.runtime import default_threads

        threads = default_threads()
    feeds = dict(random_feeds(graph, seed) if feeds is None else feeds)
    graph = _specialise(graph, feeds)
    want = interpret(graph, feeds)
    base = {"case": case or graph.name, "threads": threads, "flops": total_flops(graph),
            "conv": conv if isinstance(conv, str) else ",".join(f"{k}={v}" for k, v in
                                                                 conv.items())}
    makers = {name: (lambda name=name: _BUILDERS[name](graph, feeds, threads, conv))
              for name in runners}
    for name, fn in (extra_runners or {}).items():
        makers[name] = lambda fn=fn: (lambda: fn(feeds))
    with _torch_threads_restored():
        rows, built = _build_and_check(makers, want, graph.outputs, base, rtol, atol)
        samples = time_interleaved(built, rounds, warmup, min_sample_s, settle_s)
    _fill_times(rows, samples)
    return rows


def _build_and_check(makers, want, names, base, rtol, atol):
    rows, built = [], []
    for name, make in makers.items():
        row = BenchRow(runner=name, status=OK, **base)
        rows.append(row)
        runner = _build(name, make, row)
        if runner is None:
            continue
        try:
            got = runner.call()
        except Exception as exc:  # noqa: BLE001 - reported in the row
            row.status, row.detail = FAILED, _describe(exc)
            continue
        row.max_abs_error, problem = compare_outputs(got, want, names, rtol, atol)
        if problem:
            row.status, row.detail = DISAGREES, problem
        else:
            built.append(runner)
    return rows, built


def _fill_times(rows: list[BenchRow], samples: Mapping[str, list[float]]) -> None:
    for row in rows:
        if row.runner in samples:
            row.samples_ms = samples[row.runner]
            row.median_ms = statistics.median(row.samples_ms)
            row.gflops = row.flops / row.median_ms / 1e6
    graphc = next((r for r in rows if r.runner == "graphc" and r.median_ms), None)
    for row in rows:
        if graphc is not None and row.median_ms:
            row.ratio = graphc.median_ms / row.median_ms


@contextlib.contextmanager
def _torch_threads_restored():
    """``torch.set_num_threads`` is process-wide: put the caller's setting back afterwards."""
    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    try:
        yield
    finally:
        torch = sys.modules.get("torch")
        if torch is not None and before is not None:
            torch.set_num_threads(before)


def problems(rows: Iterable[BenchRow]) -> list[BenchRow]:
    """Rows whose runner disagreed with the interpreter or failed (not: not installed)."""
    return [r for r in rows if r.status in (DISAGREES, FAILED)]


# -- tables --------------------------------------------------------------------------------------
def _number(value: float | None, digits: int = 3) -> str:
    if value is None:
        return ""
    if value >= 10 ** digits:
        return f"{value:.0f}"
    return f"{value:.{digits}g}"


def _table(header: Sequence[str], lines: Iterable[Sequence[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cells) + " |" for cells in lines]
    return "\n".join(out)


def format_markdown(rows: Sequence[BenchRow]) -> str:
    """One line per runner: median ms, graphc/runner, effective GFLOPS, setup time, status."""
    header = ["case", "conv", "runner", "median ms", "graphc/runner", "GFLOPS", "setup s",
              "status"]
    lines = []
    for r in rows:
        status = r.status if r.status == OK else f"**{r.status.upper()}**: {r.detail}"
        lines.append([r.case, r.conv, LABELS.get(r.runner, r.runner), _number(r.median_ms),
                      _number(r.ratio), _number(r.gflops), _number(r.setup_s), status])
    return _table(header, lines)


def format_summary(rows: Sequence[BenchRow]) -> str:
    """One line per (case, conv): each runner's median ms, graphc/runner ratios, graphc's
    GFLOPS and compile time; a runner that did not produce a time shows its status."""
    cases: dict[tuple, dict[str, BenchRow]] = {}
    for r in rows:
        cases.setdefault((r.case, r.conv), {})[r.runner] = r
    runners = [n for n in [*RUNNERS, *sorted({r.runner for r in rows} - set(RUNNERS))]
               if any(n in by for by in cases.values())]
    others = [n for n in runners if n != "graphc"]
    header = (["case", "conv"] + [f"{LABELS.get(n, n)} ms" for n in runners]
              + [f"graphc/{LABELS.get(n, n)}" for n in others]
              + ["graphc GFLOPS", "graphc compile s"])
    lines = []
    for (case, conv), by in cases.items():
        graphc = by.get("graphc")
        lines.append([case, conv] + [_cell(by, n, "median_ms") for n in runners]
                     + [_cell(by, n, "ratio") for n in others]
                     + [_number(graphc.gflops) if graphc else "",
                        _number(graphc.setup_s) if graphc else ""])
    return _table(header, lines)


def _cell(by_runner: Mapping[str, BenchRow], runner: str, attribute: str) -> str:
    """A runner's number, or its status where it has none (failed, disagrees...)."""
    row = by_runner.get(runner)
    if row is None:
        return ""
    return _number(getattr(row, attribute)) if row.status == OK else row.status
