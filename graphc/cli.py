"""The ``graphc`` command line: ``inspect``, ``run``, ``compile`` and ``bench`` an ONNX model;
``passes``; ``cache info|clear``; ``demo``, a tour on built-in defaults.

Every user error ends as one line ``graphc: error: ...`` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np

from .errors import FeedError, GraphcError


def _shape_arg(text: str) -> tuple[str, tuple]:
    name, _, dims = text.partition("=")
    if not name or not dims:
        raise argparse.ArgumentTypeError(f"expected NAME=D0,D1,..., got {text!r}")
    try:
        return name, tuple(int(d) for d in dims.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"dims must be integers in {text!r}") from None


def _input_arg(text: str) -> tuple[str, str]:
    name, _, path = text.partition("=")
    if not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=FILE.npy, got {text!r}")
    return name, path


def _load(args):
    from . import import_onnx

    return import_onnx(args.model, input_shapes=dict(args.input_shape or []) or None)


def _format_count(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def cmd_inspect(args) -> int:
    from .flops import flops_by_node, symbols

    graph = _load(args)
    if not args.no_ir:
        print(graph)
    print("ops:")
    for op, count in graph.op_histogram().items():
        print(f"  {op:<24}{count:>6}")
    print(f"parameters: {graph.parameter_count():,}")
    flops = flops_by_node(graph)
    print("FLOPs per node" + (f" (symbolic dims {', '.join(symbols(graph))} counted as 1)"
                              if symbols(graph) else "") + ":")
    for name, f in flops.items():
        if f:
            node = graph.node(name)
            print(f"  {name:<40} {node.op:<20} {_format_count(f):>10}")
    total = sum(flops.values())
    per = f" per unit of {', '.join(symbols(graph))}" if symbols(graph) else ""
    print(f"total FLOPs{per}: {total:,} ({_format_count(total)})")
    return 0


def _read_feeds(graph, pairs, random_seed: int | None) -> dict:
    feeds = {}
    for name, path in pairs or []:
        try:
            feeds[name] = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise FeedError(f"cannot read input '{name}' from '{path}': {exc}") from None
    if random_seed is not None:
        rng = np.random.default_rng(random_seed)
        for name in graph.inputs:
            if name not in feeds:
                t = graph.type_of(name)
                if not t.is_static:
                    raise FeedError(f"input '{name}' has symbolic shape {t}; give --input-shape "
                                    f"{name}=... to feed random data")
                feeds[name] = rng.standard_normal(t.shape).astype(t.np_dtype)
    return feeds


def cmd_run(args) -> int:
    from . import interpret

    graph = _load(args)
    feeds = _read_feeds(graph, args.input, args.random_inputs)
    results = interpret(graph, feeds)
    for name, array in zip(graph.outputs, results):
        flat = array.ravel()
        head = np.array2string(flat[:6], precision=5, separator=", ")
        print(f"{name}: {array.dtype}{list(array.shape)} {head}{' ...' if flat.size > 6 else ''}")
    if args.output:
        np.savez(args.output, **dict(zip(graph.outputs, results)))
        print(f"wrote {args.output}")
    return 0


def _conv_node_arg(text: str) -> tuple[str, str]:
    name, _, algo = text.partition("=")
    if not name or not algo:
        raise argparse.ArgumentTypeError(f"expected NODE=ALGORITHM, got {text!r}")
    return name, algo


def cmd_compile(args) -> int:
    from . import compile as compile_graph

    graph = _load(args)
    conv = {"*": args.conv, **dict(args.conv_node or [])} if args.conv_node else args.conv
    out = sys.stdout
    model = compile_graph(graph, target=args.target, conv=conv, passes=args.passes,
                          print_after=args.print_after or (), print_after_all=args.print_after_all,
                          dump_dir=args.dump_dir, out=out, threads=args.threads,
                          cache=False if args.no_cache else None)
    if args.emit == "dot":
        print(model.graph.to_dot(), file=out)
    elif args.emit:
        print(model.emit(args.emit, dims=dict(_symbol_dims(graph, args))), file=out)
    before, after = graph.op_histogram(), model.graph.op_histogram()
    print(f"compiled '{graph.name}' for target {args.target}: {len(graph)} -> "
          f"{len(model.graph)} nodes; pipeline {','.join(model.pipeline)}", file=out)
    for op in sorted(set(before) | set(after), key=lambda o: (-after.get(o, 0), o)):
        print(f"  {op:<24}{before.get(op, 0):>6} -> {after.get(op, 0):<6}", file=out)
    if args.dump_dir:
        print(f"IR after each pass written to {args.dump_dir}/", file=out)
    if args.timing:
        print(model.timing_report(), file=out)
    return 0


def _symbol_dims(graph, args):
    """Symbolic dims set to 1 unless --input-shape fixed them (for --emit of code stages)."""
    for v in graph.inputs:
        for d in graph.type_of(v).shape:
            if isinstance(d, str):
                yield d, 1


def cmd_passes(args) -> int:
    from passes import DEFAULT_PIPELINES, all_passes

    registered = all_passes()
    width = max(map(len, registered)) + 2
    for name, info in registered.items():
        requires = f" (requires {', '.join(info.requires)})" if info.requires else ""
        print(f"{name:<{width}}{info.description}{requires}")
    for target, pipeline in DEFAULT_PIPELINES.items():
        print(f"default pipeline for {target}: {','.join(pipeline)}")
    return 0


def cmd_demo(args) -> int:
    """The tour of ``graphc.demo``: train, compile, time and export a small digits CNN."""
    from .demo import run

    run(args)
    return 0


def cmd_bench(args) -> int:
    """Time the model on graphc, ONNX Runtime and PyTorch; exit 1 if a runner disagrees."""
    from .bench import bench_graph, format_markdown, problems

    if args.batch is not None and args.input_shape:
        raise FeedError("give --batch or --input-shape, not both")
    graph = _load(args)
    if args.batch is not None:
        from passes.infer_shapes import with_input_shapes

        graph = with_input_shapes(graph, _batched_shapes(graph, args.batch))
    graph = _symbolic_dims_to_one(graph)
    feeds = _read_feeds(graph, None, args.seed)
    runners = [r for r, on in (("graphc", True), ("graphc-reference", args.reference),
                               ("onnxruntime", not args.no_ort),
                               ("pytorch", not args.no_torch)) if on]
    rows = bench_graph(graph, feeds, case=graph.name, runners=runners, threads=args.threads,
                       conv=args.conv, rounds=args.rounds, warmup=args.warmup)
    print(format_markdown(rows))
    graphc_row = rows[0]
    if graphc_row.setup_s is not None:
        print(f"graphc compile: {graphc_row.setup_s:.2f} s; {graphc_row.threads} threads; "
              f"{graphc_row.flops:,} FLOPs per run (unoptimised graph)")
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump([r.as_dict() for r in rows], f, indent=1)
        print(f"wrote {args.json}")
    for row in problems(rows):
        print(f"graphc: {row.runner} {row.status}: {row.detail}", file=sys.stderr)
    return 1 if problems(rows) else 0


def _symbolic_dims_to_one(graph):
    """Code and FLOPs are for static shapes: a dim left symbolic (a batch N) becomes 1."""
    shapes = {v: tuple(1 if isinstance(d, str) else d for d in graph.type_of(v).shape)
              for v in graph.inputs if not graph.type_of(v).is_static}
    if not shapes:
        return graph
    from passes.infer_shapes import with_input_shapes

    print(f"symbolic dims set to 1 (use --batch or --input-shape to choose): "
          f"{', '.join(f'{v}={list(s)}' for v, s in shapes.items())}")
    return with_input_shapes(graph, shapes)


def _batched_shapes(graph, batch: int) -> dict:
    """Every input's first dim set to ``batch`` (the rest as imported)."""
    if batch < 1:
        raise FeedError(f"--batch must be >= 1, got {batch}")
    return {v: (batch,) + tuple(graph.type_of(v).shape[1:]) for v in graph.inputs
            if graph.type_of(v).rank >= 1}


def cmd_cache(args) -> int:
    """``graphc cache info`` / ``graphc cache clear``: the CPU backend's on-disk code cache."""
    from backends.llvm.cache import CodeCache

    cache = CodeCache()
    if args.action == "clear":
        print(f"removed {cache.clear()} entries from {cache.directory}")
    else:
        print(cache.info())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="graphc", description="graphc: a compiler-style graph library for neural networks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add_model(p):
        p.add_argument("model", help="path of an ONNX model")
        p.add_argument("--input-shape", action="append", type=_shape_arg, metavar="NAME=D0,D1,..",
                       help="make an input's shape static (e.g. fix the batch size)")

    inspect = sub.add_parser("inspect", help="print the IR, op histogram, parameters and FLOPs",
                             description="Import MODEL and print its IR text, an op histogram, "
                                         "the parameter count and FLOPs per node and in total.")
    add_model(inspect)
    inspect.add_argument("--no-ir", action="store_true", help="omit the IR text")
    inspect.set_defaults(func=cmd_inspect)

    run = sub.add_parser("run", help="run a model on .npy inputs with the reference interpreter",
                         description="Import MODEL and run it with the reference interpreter.")
    add_model(run)
    run.add_argument("--input", action="append", type=_input_arg, metavar="NAME=FILE.npy",
                     help="feed input NAME from a .npy file (repeat for several inputs)")
    run.add_argument("--random-inputs", type=int, nargs="?", const=0, metavar="SEED",
                     help="feed inputs not given by --input with seeded random normal data")
    run.add_argument("--output", metavar="OUT.npz", help="save all outputs to an .npz file")
    run.set_defaults(func=cmd_run)

    from passes.manager import CONV_ALGORITHMS

    comp = sub.add_parser("compile", help="optimise a model with the pass pipeline",
                          description="Import MODEL, run the target's pass pipeline and report "
                                      "what each pass did.")
    add_model(comp)
    comp.add_argument("--target", default="reference", choices=("reference", "cpu", "cuda"),
                      help="reference: the optimised graph on the interpreter (default); cpu: "
                           "generated LLVM code; cuda: generated CUDA kernels (numba-cuda and "
                           "a GPU, or NUMBA_ENABLE_CUDASIM=1)")
    comp.add_argument("--threads", type=int, help="threads for target cpu (default: "
                      "GRAPHC_NUM_THREADS or all cores)")
    comp.add_argument("--conv", default="auto", choices=CONV_ALGORITHMS,
                      help="convolution algorithm for every Conv (default: auto = cost rule)")
    comp.add_argument("--conv-node", action="append", type=_conv_node_arg, metavar="NODE=ALGO",
                      help="convolution algorithm for one Conv node (repeatable)")
    comp.add_argument("--passes", metavar="P1,P2,..", help="pass pipeline instead of the default")
    comp.add_argument("--print-after", action="append", metavar="PASS",
                      help="print the IR after PASS (repeatable)")
    comp.add_argument("--print-after-all", action="store_true", help="print the IR after each pass")
    comp.add_argument("--dump-dir", metavar="DIR",
                      help="write the IR before and after each pass as DIR/NN-<pass>.ir")
    comp.add_argument("--timing", action="store_true", help="print the time of each pass (and, "
                      "for --target cpu, what the code cache did)")
    comp.add_argument("--no-cache", action="store_true", help="target cpu: neither read nor "
                      "write the code cache (GRAPHC_CACHE_DIR, default ~/.cache/graphc)")
    comp.add_argument("--emit", choices=("ir", "dot", "kernel", "llvm", "llvm-opt", "asm",
                                        "cuda"),
                      help="print a stage: the optimised graph as IR text or Graphviz DOT; for "
                           "--target cpu the loop-level kernels, LLVM IR (before/after O3) or "
                           "assembly; for --target cuda the kernels or the CUDA kernel source "
                           "(symbolic dims = 1 unless --input-shape fixes them)")
    comp.set_defaults(func=cmd_compile)

    bench = sub.add_parser("bench", help="time a model on graphc vs ONNX Runtime and PyTorch",
                           description="Compile MODEL for target cpu and time it against ONNX "
                                       "Runtime and PyTorch eager (when installed) on seeded "
                                       "random inputs: same threads, interleaved rounds, "
                                       "medians, graphc/other ratios and effective GFLOPS. Each "
                                       "runner is first checked against the interpreter; one "
                                       "that disagrees is reported (exit status 1), not timed.")
    add_model(bench)
    bench.add_argument("--threads", type=int, help="threads of every runner (default: "
                       "GRAPHC_NUM_THREADS or all cores)")
    bench.add_argument("--batch", type=int, help="set the first dim of every input (symbolic "
                       "dims left over are set to 1)")
    bench.add_argument("--rounds", type=int, default=7, help="timed rounds (default 7)")
    bench.add_argument("--warmup", type=int, default=2, help="untimed calls first (default 2)")
    bench.add_argument("--conv", default="auto", choices=CONV_ALGORITHMS,
                       help="graphc's convolution algorithm (default: auto)")
    bench.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    bench.add_argument("--no-torch", action="store_true", help="leave PyTorch out")
    bench.add_argument("--no-ort", action="store_true", help="leave ONNX Runtime out")
    bench.add_argument("--reference", action="store_true", help="also time target reference "
                       "(the optimised graph on the numpy interpreter; slow)")
    bench.add_argument("--json", metavar="OUT.json", help="also write the rows as JSON")
    bench.set_defaults(func=cmd_bench)

    passes_cmd = sub.add_parser("passes", help="list the passes and default pipelines",
                                description="List every registered pass with its description.")
    passes_cmd.set_defaults(func=cmd_passes)

    from .demo import add_arguments as add_demo_arguments

    demo = sub.add_parser("demo", help="a one-minute tour: train, compile, time and export a "
                                       "small CNN on the digits",
                          description="Train a LeNet-style CNN on 8x8 digits (scikit-learn's, "
                                      "else built-in synthetic ones), show the pass pipeline "
                                      "with its Winograd rewrite, report test accuracy, time "
                                      "the compiled model against the interpreter and ONNX "
                                      "Runtime, and export it to ONNX.")
    add_demo_arguments(demo)
    demo.set_defaults(func=cmd_demo)

    cache = sub.add_parser("cache", help="show or empty the CPU backend's code cache",
                           description="info: location, entries and total size of the code "
                                       "cache (GRAPHC_CACHE_DIR, limit GRAPHC_CACHE_MAX); "
                                       "clear: remove every entry.")
    cache.add_argument("action", choices=("info", "clear"))
    cache.set_defaults(func=cmd_cache)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except GraphcError as exc:
        print(f"graphc: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into head/less that closed early
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
