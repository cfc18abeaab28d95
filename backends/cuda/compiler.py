"""The CUDA compiler: an optimised graph -> generated CUDA kernels over one device arena.

Stages, each inspectable (``CudaModel.emit``):

1. ``plan_memory`` (backends/memory_plan.py, shared with the CPU backend): every intermediate
   value gets an offset in one arena (liveness reuse, views alias, pointwise ops in place);
   outputs are computed straight into the arrays handed back to the caller.
2. Lowering, shared with the CPU backend: ``backends.lower.lower_node`` turns each node into
   kernel-IR kernels (``emit("kernel")`` prints them), except the GEMM-shaped nodes, which
   ``gemm.describe_gemm`` turns into a strided batched GEMM description (the CPU lowers those to
   its LLVM SGEMM instead).
3. Code: ``codegen.kernel_source`` / ``gemm.gemm_source`` render CUDA kernels as Python text
   for ``numba.cuda.jit`` (``emit("cuda")``); kernels are compiled once per text digest.
4. Run: the arena is allocated on the device once per shape specialisation and constants are
   uploaded once per model; a run copies host inputs to the device (device arrays -- numba's or
   any ``__cuda_array_interface__`` object -- are used in place), launches every step in order
   on the default stream (which orders them), and copies the outputs back unless
   ``device_outputs=True``.

A graph with symbolic dims (a batch ``N``) is specialised per binding on first use, as the CPU
backend does. Concurrent ``run`` calls are serialised (the arena is per model).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from graphc.errors import FeedError, GraphcError
from graphc.interp import bind_dims, check_feeds
from graphc.ir import CONSTANT_OPS, INPUT, Graph

from ..lower import BoundKernel, LoweringError, lower_node
from ..memory_plan import MemoryPlan, plan_memory
from .codegen import (
    DEVICE_LAUNCH,
    PRELUDE,
    SIMULATOR_LAUNCH,
    LaunchConfig,
    compile_source,
    kernel_source,
    launch_shape,
)
from .device import as_device_array, flat, is_device_array, is_simulator, require_cuda
from .gemm import (
    DEVICE_TILING,
    GEMM_OPS,
    SIMULATOR_TILING,
    GemmTiling,
    context,
    describe_gemm,
    gemm_source,
)

ALIGNMENT = 256  # bytes: the start of every arena buffer is aligned for coalesced access


@dataclass
class Step:
    """One kernel launch: ``kernel[grid, block](*buffers bound to values)``."""

    node: str
    kernel: object = field(repr=False)
    source: str = field(repr=False)
    grid: tuple
    block: tuple
    values: tuple
    plan_text: str = field(default="", repr=False)  # kernel IR or the GEMM description
    scratch: dict = field(default_factory=dict, repr=False)  # lowering-time arrays (error slots)
    run_check: object = None                                   # backends.lower.RunCheck


@dataclass
class CudaSpecialisation:
    """The compiled form of a graph for one binding of its symbolic dims."""

    dims: dict
    plan: MemoryPlan
    steps: list
    arena: object = field(repr=False)
    static: dict = field(default_factory=dict, repr=False)   # value -> device array
    external: dict = field(default_factory=dict)              # value -> input/output buffer
    checks: list = field(default_factory=list)                # RunCheck of the kernels

    def raise_recorded_errors(self) -> None:
        """After a run: raise what a kernel recorded (e.g. a Gather index out of range)."""
        for check in self.checks:
            check.raise_if_recorded(self.static[check.slot].copy_to_host())

    def source(self) -> str:
        return "\n\n".join([PRELUDE] + [s.source for s in self.steps])

    def kernel_text(self) -> str:
        return "\n\n".join(s.plan_text for s in self.steps)


class CudaModel:
    """An optimised graph compiled to CUDA kernels; ``run(feeds)`` executes them on the GPU (or
    the CUDA simulator). ``tiling`` and ``launch`` default to the device's or the simulator's."""

    def __init__(self, graph: Graph, tiling: GemmTiling | None = None,
                 launch: LaunchConfig | None = None):
        self.cuda = require_cuda()
        self.graph = graph
        simulator = is_simulator(self.cuda)
        self.tiling = tiling or (SIMULATOR_TILING if simulator else DEVICE_TILING)
        self.launch = launch or (SIMULATOR_LAUNCH if simulator else DEVICE_LAUNCH)
        self.pipeline: list[str] = []
        self._constants: dict[str, object] = {}
        self._specs: dict[tuple, CudaSpecialisation] = {}
        self._lock = threading.RLock()
        self._symbols = [d for v in graph.inputs for d in graph.type_of(v).shape
                         if isinstance(d, str)]
        if not self._symbols:
            self.specialise({})

    # -- compiling --------------------------------------------------------------------------------
    def specialise(self, dims: Mapping[str, int]) -> CudaSpecialisation:
        key = tuple(sorted(dims.items()))
        with self._lock:
            if key not in self._specs:
                self._specs[key] = self._build(dict(dims))
            return self._specs[key]

    def _build(self, dims: dict) -> CudaSpecialisation:
        plan = plan_memory(self.graph, dims, alignment=ALIGNMENT)
        steps = []
        for name in plan.order:
            node = self.graph.node(name)
            if node.op == INPUT or node.op in CONSTANT_OPS:
                continue
            if all(o is None or plan[o].reuse == "view" for o in node.outputs):
                continue  # a view: its bytes are already where the plan says
            steps += self._lower(node, dims)
        arena = self.cuda.device_array(max(plan.arena_bytes, 1), np.uint8)
        spec = CudaSpecialisation(dims, plan, steps, arena)
        for step in steps:  # scratch arrays of the kernels (error slots): one device copy each
            spec.static.update({name: self.cuda.to_device(array)
                                for name, array in step.scratch.items()})
            if step.run_check is not None:
                spec.checks.append(step.run_check)
        for step in steps:
            for value in step.values:
                self._bind(spec, value)
        return spec

    def _lower(self, node, dims: dict) -> list[Step]:
        if node.op in GEMM_OPS:
            ctx = context(self.graph, node, dims)
            gemm = gemm_source(ctx, describe_gemm(ctx), self.tiling)
            if gemm.empty:
                return []
            kernel = compile_source(self.cuda, gemm.source)
            return [Step(node.name, kernel, gemm.source, gemm.grid, gemm.block, gemm.values,
                         f"// {node.op} node '{node.name}': {gemm.problem.describe()}")]
        steps = []
        for bound in lower_node(self.graph, node, dims):
            if not isinstance(bound, BoundKernel):
                raise LoweringError(f"{node.op} node '{node.name}': its lowering is not kernel "
                                    f"IR ({type(bound).__name__}); target 'cuda' cannot run it")
            ck = kernel_source(bound.kernel)
            grid, block = launch_shape(ck.extent, self.launch)
            steps.append(Step(node.name, compile_source(self.cuda, ck.source), ck.source,
                              (grid,), (block,), bound.values, str(bound), bound.scratch,
                              bound.run_check))
        return steps

    def _bind(self, spec: CudaSpecialisation, value: str) -> None:
        """Where ``value``'s bytes are: an arena view or a constant now, else at run time."""
        if value in spec.static or value in spec.external:
            return
        p = spec.plan[value]
        dtype = p.type.np_dtype
        if p.storage == "arena":
            spec.static[value] = spec.arena[p.offset:p.offset + p.nbytes].view(dtype)
        elif p.storage == "constant":
            spec.static[value] = self._constant(p.buffer).view(dtype)
        else:
            spec.external[value] = p.buffer

    def _constant(self, name: str):
        """The device copy of constant ``name`` (uploaded once per model)."""
        if name not in self._constants:
            host = np.ascontiguousarray(self.graph.constant_value(name))
            self._constants[name] = self.cuda.to_device(host.reshape(host.size))
        return self._constants[name]

    # -- running ----------------------------------------------------------------------------------
    def check_dims(self, dims: Mapping[str, int]) -> dict:
        """``dims`` for every symbolic dim of the inputs (a single-specialisation model may omit
        them: its one binding is used)."""
        return bind_dims(self._symbols, dims, [s.dims for s in self._specs.values()])

    def run(self, feeds: Mapping[str, object], into: Mapping[str, np.ndarray] | None = None,
            device_outputs: bool = False) -> list:
        """Outputs for ``feeds`` (numpy arrays or device arrays): numpy arrays, or device arrays
        with ``device_outputs=True``; outputs named in ``into`` are copied into those host
        arrays, which are returned in their places."""
        inputs = self._device_inputs(feeds)
        dims = {}
        for v in self.graph.inputs:
            for want, got in zip(self.graph.type_of(v).shape, inputs[v].shape):
                if isinstance(want, str):
                    dims[want] = int(got)
        with self._lock:
            spec = self.specialise(dims)
            buffers = dict(inputs)
            for v in self.graph.outputs:
                p = spec.plan[v]
                if p.storage == "output" and p.buffer not in buffers:
                    t = spec.plan[p.buffer].type
                    buffers[p.buffer] = self.cuda.device_array(t.shape, t.np_dtype)
            for step in spec.steps:
                args = [spec.static[v] if v in spec.static else flat(buffers[spec.external[v]])
                        for v in step.values]
                step.kernel[step.grid, step.block](*args)
            spec.raise_recorded_errors()
            outputs = [self._output(spec, v, buffers) for v in self.graph.outputs]
        if device_outputs:
            return outputs
        targets = self._check_into(into or {}, outputs)
        return [o.copy_to_host(targets[v]) if v in targets else o.copy_to_host()
                for v, o in zip(self.graph.outputs, outputs)]

    def _check_into(self, into: Mapping[str, np.ndarray], outputs: list) -> dict:
        types = dict(zip(self.graph.outputs, outputs))
        for name, array in into.items():
            if name not in types:
                raise FeedError(f"into names '{name}', which is not an output of graph "
                                f"'{self.graph.name}'")
            want = types[name]
            if (not isinstance(array, np.ndarray) or array.shape != want.shape
                    or array.dtype != want.dtype or not array.flags.c_contiguous
                    or not array.flags.writeable):
                raise FeedError(f"into['{name}'] must be a writeable C-contiguous numpy array "
                                f"of shape {want.shape} and dtype {want.dtype}")
        return dict(into)

    def cache_report(self) -> str:
        """What a compiled model says about caching (kernels are cached in memory only)."""
        return ""

    def _device_inputs(self, feeds: Mapping[str, object]) -> dict:
        """Feeds checked against the graph's inputs, as device arrays (host arrays copied)."""
        if not isinstance(feeds, Mapping):
            raise FeedError(f"feeds must be a dict of input name -> array, got "
                            f"{type(feeds).__name__}")
        on_device = {n: as_device_array(self.cuda, x) for n, x in feeds.items()
                     if is_device_array(self.cuda, x)}
        # check shapes and dtypes with the interpreter's rules; device arrays are stood in for
        # by zero-stride host arrays of their shape (nothing is copied)
        stand_ins = {n: np.lib.stride_tricks.as_strided(np.zeros(1, x.dtype), x.shape,
                                                        (0,) * len(x.shape))
                     for n, x in on_device.items()}
        host = check_feeds(self.graph, {**feeds, **stand_ins})
        out = {}
        for name in self.graph.inputs:
            if name in on_device:
                x = on_device[name]
                if not x.is_c_contiguous():
                    raise FeedError(f"device array fed to input '{name}' is not C-contiguous "
                                    f"(strides {x.strides}); pass a contiguous array")
                out[name] = x
            else:
                out[name] = self.cuda.to_device(np.ascontiguousarray(host[name]))
        return out

    def _output(self, spec: CudaSpecialisation, value: str, buffers: dict):
        p = spec.plan[value]
        if p.storage == "output" and p.buffer in buffers and p.buffer not in self.graph.inputs:
            return buffers[p.buffer]
        if value in self.graph.inputs:  # an input returned as is: a copy, never an alias
            fed = buffers[value]
            copy = self.cuda.device_array(fed.shape, fed.dtype)
            copy.copy_to_device(fed)
            return copy
        return self.cuda.to_device(np.array(self.graph.constant_value(value), copy=True))

    def __call__(self, feeds=None, **named):
        return self.run({**(feeds or {}), **named})

    # -- inspecting -------------------------------------------------------------------------------
    def emit(self, what: str = "cuda", dims: Mapping[str, int] | None = None) -> str:
        """"cuda": the generated kernel source (helpers first); "kernel": the shared kernel IR
        (GEMMs as their description); "ir": the graph."""
        if what == "ir":
            return str(self.graph)
        if what not in ("cuda", "kernel"):
            raise GraphcError(f"cannot emit '{what}' for target 'cuda' (choices: ir, kernel, "
                              f"cuda)")
        spec = self.specialise(self.check_dims(dims or {}))
        return spec.source() if what == "cuda" else spec.kernel_text()


def compile_graph(graph: Graph, conv: str | Mapping[str, str] = "auto", passes=None, *,
                  tiling: GemmTiling | None = None, launch: LaunchConfig | None = None,
                  verify_each: bool = True) -> CudaModel:
    """Optimise ``graph`` with the inference pipeline and compile it for CUDA (what
    ``graphc.compile(graph, target="cuda")`` does); ``conv`` as in ``graphc.compile``."""
    from passes import PassManager, PassOptions, default_pipeline
    from passes.manager import DEFAULT_PIPELINES

    require_cuda()  # fail before optimising when there is nowhere to run
    if isinstance(conv, str):
        options = PassOptions(target="cuda", conv=conv)
    else:
        options = PassOptions(target="cuda", conv=conv.get("*", "auto"),
                              conv_per_node={k: v for k, v in conv.items() if k != "*"})
    # the CUDA target runs the CPU's inference pipeline until passes lists its own
    pipeline = passes or default_pipeline("cuda" if "cuda" in DEFAULT_PIPELINES else "cpu")
    manager = PassManager(pipeline, options, verify_each=verify_each)
    model = CudaModel(manager.run(graph), tiling=tiling, launch=launch)
    model.pipeline = list(manager.pipeline)
    return model

