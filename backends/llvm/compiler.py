"""The CPU compiler: an optimised graph -> one LLVM module with one entry -> a runnable model.

Stages, each inspectable:

1. ``plan_memory`` (backends/memory_plan.py): every intermediate gets an offset in one arena,
   sized at compile time; views alias their input; outputs are computed into the caller's arrays.
2. ``lower_node`` (backends/lower*.py): each executed node becomes kernel-IR kernels bound to
   graph values (``emit="kernel"`` prints them).
3. ``emit_kernel`` (codegen.py) + ``build_entry`` (runtime.py): the kernels and one entry function
   ``void entry(i8** table, i32 tid, i32 n_threads, i32* barrier)`` in one module
   (``emit="llvm"``), verified, optimised at O3 and JIT-compiled (``emit="asm"``).
4. ``ThreadedRunner``: one ctypes call per thread per run; the pointer table is built once per
   specialisation and only the input/output slots change between runs.

A graph with symbolic dims (a batch ``N``) is specialised per concrete binding on first use and
the specialisation is kept.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from llvmlite import ir

from backends.lower import BoundFunction, lower_node
from backends.memory_plan import MemoryPlan, plan_memory
from graphc.errors import FeedError
from graphc.interp import check_feeds
from graphc.ir import CONSTANT_OPS, INPUT, Graph
from graphc.types import TensorType

from .codegen import emit_kernel
from .runtime import KernelCall, ThreadedRunner, build_entry, default_threads
from .target import host_target

ALIGNMENT = 64
_SERIAL = itertools.count()


@dataclass
class Specialisation:
    """The compiled form of a graph for one binding of its symbolic dims."""

    dims: dict
    plan: MemoryPlan
    kernels: list                 # BoundKernel / BoundFunction, in execution order
    module: object                # backends.llvm.target.CompiledModule
    runner: ThreadedRunner
    slots: list[str]              # table slot -> value name
    arena: np.ndarray = field(repr=False)
    table: np.ndarray = field(repr=False)
    external_slots: dict = field(default_factory=dict)  # buffer name -> slots to patch per run
    constants: dict = field(default_factory=dict, repr=False)  # keeps the table's targets alive

    @property
    def llvm_ir(self) -> str:
        return self.module.source_ir

    @property
    def optimised_ir(self) -> str:
        return self.module.optimised_ir

    @property
    def assembly(self) -> str:
        return self.module.assembly

    def kernel_text(self) -> str:
        return "\n\n".join(str(k) for k in self.kernels)


def _aligned_bytes(nbytes: int) -> np.ndarray:
    raw = np.zeros(max(nbytes, 1) + ALIGNMENT, np.uint8)
    start = (-raw.ctypes.data) % ALIGNMENT
    return raw[start:start + max(nbytes, 1)]


def build_specialisation(graph: Graph, dims: Mapping[str, int], threads: int) -> Specialisation:
    plan = plan_memory(graph, dims, alignment=ALIGNMENT)
    serial = next(_SERIAL)
    module = ir.Module(name=f"graphc_graph{serial}")
    slots: list[str] = []
    slot_of: dict[str, int] = {}

    def slot(value: str) -> int:
        if value not in slot_of:
            slot_of[value] = len(slots)
            slots.append(value)
        return slot_of[value]

    calls, kernels = [], []
    extra: dict[str, np.ndarray] = {}  # compile-time arrays of BoundFunctions (packed weights)
    for name in plan.order:
        node = graph.node(name)
        if node.op == INPUT or node.op in CONSTANT_OPS:
            continue
        if all(o is None or plan[o].reuse == "view" for o in node.outputs):
            continue  # a view: its bytes are already where the plan says
        for bound in lower_node(graph, node, dims):
            if isinstance(bound, BoundFunction):
                symbol = f"graphc_g{serial}_{len(kernels)}_{bound.name}"
                fn = bound.emit(module, symbol)
                extra.update(bound.constants)
            else:
                symbol = f"graphc_g{serial}_{len(kernels)}_{bound.kernel.name}"
                fn = emit_kernel(module, bound.kernel, symbol)
            calls.append(KernelCall(fn, tuple(slot(v) for v in bound.values)))
            kernels.append(bound)
    entry = build_entry(module, calls, name=f"graphc_g{serial}_entry")
    compiled = host_target().compile(module)
    arena = _aligned_bytes(plan.arena_bytes)
    table = np.zeros(len(slots), np.uintp)
    # the table holds raw addresses: the arrays they point into live as long as the model
    constants = {k: np.ascontiguousarray(v) for k, v in graph.constant_arrays().items()}
    external: dict[str, list[int]] = {}
    constants.update({k: np.ascontiguousarray(v) for k, v in extra.items()})
    for i, value in enumerate(slots):
        if value in extra:
            table[i] = constants[value].ctypes.data
            continue
        p = plan[value]
        if p.storage == "arena":
            table[i] = arena.ctypes.data + p.offset
        elif p.buffer in constants:
            table[i] = constants[p.buffer].ctypes.data
        else:
            external.setdefault(p.buffer, []).append(i)
    runner = ThreadedRunner(compiled.address(entry.name), threads)
    return Specialisation(dict(dims), plan, kernels, compiled, runner, slots, arena, table,
                          external, constants)


class CpuModel:
    """An optimised graph compiled for the host CPU; ``run(feeds)`` executes generated code."""

    def __init__(self, graph: Graph, threads: int | None = None):
        self.graph = graph
        self.threads = default_threads() if threads is None else int(threads)
        self._specs: dict[tuple, Specialisation] = {}
        self._lock = threading.Lock()
        self._symbols = [d for v in graph.inputs for d in graph.type_of(v).shape
                         if isinstance(d, str)]
        if not self._symbols:
            self.specialise({})

    def specialise(self, dims: Mapping[str, int]) -> Specialisation:
        key = tuple(sorted(dims.items()))
        with self._lock:
            if key not in self._specs:
                self._specs[key] = build_specialisation(self.graph, dims, self.threads)
            return self._specs[key]

    def check_dims(self, dims: Mapping[str, int]) -> dict:
        """``dims`` for every symbolic dim of the inputs (a single-specialisation model may omit
        them: its one binding is used)."""
        missing = [d for d in self._symbols if d not in dims]
        if missing and len(self._specs) == 1:
            return dict(next(iter(self._specs.values())).dims)
        if missing:
            raise FeedError(f"symbolic dims {', '.join(sorted(set(missing)))} need values to "
                            f"generate code (e.g. dims={{'{missing[0]}': 1}})")
        return {d: int(dims[d]) for d in self._symbols}

    def _dims_of(self, feeds: dict) -> dict:
        dims: dict = {}
        for v in self.graph.inputs:
            for want, got in zip(self.graph.type_of(v).shape, feeds[v].shape):
                if isinstance(want, str):
                    dims[want] = int(got)
        return dims

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        arrays = {k: np.ascontiguousarray(v) for k, v in check_feeds(self.graph, feeds).items()}
        spec = self.specialise(self._dims_of(arrays))
        outputs = {}  # computed straight into fresh arrays the caller keeps
        for v in self.graph.outputs:
            p = spec.plan[v]
            if p.storage == "output" and p.buffer not in outputs:
                t: TensorType = spec.plan[p.buffer].type
                outputs[p.buffer] = np.empty(t.shape, t.np_dtype)
        buffers = {**arrays, **outputs}
        table = spec.table.copy()
        for buffer, slots in spec.external_slots.items():
            if buffer not in buffers:
                raise FeedError(f"internal: no array for buffer '{buffer}'")
            for i in slots:
                table[i] = buffers[buffer].ctypes.data
        spec.runner.run(table)
        return [self._output(spec, v, buffers, arrays) for v in self.graph.outputs]

    def _output(self, spec, value, buffers, feeds) -> np.ndarray:
        p = spec.plan[value]
        if p.storage == "output" and p.buffer in buffers:
            return buffers[p.buffer]
        # an output that is a graph input or a constant: copied, never aliased to the caller
        if value in feeds:
            return feeds[value].copy()
        return np.array(self.graph.constant_value(value), copy=True)

    def __call__(self, feeds=None, **named):
        return self.run({**(feeds or {}), **named})
