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

import hashlib
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
from llvmlite import ir

from backends.lower import BoundFunction, RunCheck, lower_node
from backends.memory_plan import MemoryPlan, plan_memory
from graphc.errors import FeedError
from graphc.interp import bind_dims, check_feeds
from graphc.ir import CONSTANT_OPS, INPUT, Graph
from graphc.types import TensorType

from .cache import CodeCache, code_key, fingerprint_graph
from .codegen import emit_kernel
from .runtime import KernelCall, ThreadedRunner, build_entry, default_threads
from .target import host_target

ALIGNMENT = 64
CODE_FILES = ("object.o", "source.ll", "optimised.ll", "kernels.txt")


@dataclass
class GeneratedCode:
    """What a specialisation runs: the JIT'd module and what its pointer table needs."""

    module: object                # backends.llvm.target.CompiledModule
    entry: str                    # the entry function's symbol
    slots: list[str]              # table slot -> value name (or name of a compile-time array)
    arrays: dict                  # compile-time arrays of BoundFunctions (packed weights, ...)
    kernels: list                 # BoundKernel / BoundFunction in order; [] when loaded from cache
    kernel_text: str
    checks: list = field(default_factory=list)  # RunCheck of kernels that record run-time errors


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
    kernel_description: str = field(default="", repr=False)
    cache_status: str = "off"     # "hit", "miss" (compiled, stored), "off", or "in process"
    key: str = ""
    seconds: float = 0.0          # time to build or load this specialisation
    checks: list = field(default_factory=list)  # RunCheck: errors kernels record during a run
    run_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def run(self, table: np.ndarray) -> None:
        """Run the entry over ``table``, then raise what a kernel recorded (e.g. a Gather index
        out of range: the kernel clamped it, so nothing was read out of bounds)."""
        with self.run_lock:  # the error slots are per specialisation, like the arena
            self.runner.run(table)
            self._raise_recorded()

    def run_patched(self, addresses: list[int]) -> None:
        """Run over the specialisation's own table with the external slots (in
        ``external_slots`` order, one address per buffer) patched in place: the run lock
        serialises runs, so no per-run copy of the table is needed."""
        with self.run_lock:
            table = self.table
            for slots, address in zip(self.external_slots.values(), addresses):
                for i in slots:
                    table[i] = address
            self.runner.run(table)
            self._raise_recorded()

    def _raise_recorded(self) -> None:
        for check in self.checks:
            check.raise_if_recorded(self.constants[check.slot])

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
        return self.kernel_description

    def report(self) -> str:
        dims = ", ".join(f"{k}={v}" for k, v in sorted(self.dims.items())) or "static"
        return (f"code cache: {self.cache_status} (key {self.key[:8]}, dims {dims}, "
                f"{self.seconds:.2f} s)")


def _aligned_bytes(nbytes: int) -> np.ndarray:
    raw = np.zeros(max(nbytes, 1) + ALIGNMENT, np.uint8)
    start = (-raw.ctypes.data) % ALIGNMENT
    return raw[start:start + max(nbytes, 1)]


def _aligned(array: np.ndarray) -> np.ndarray:
    """``array`` itself if its data is ALIGNMENT-aligned (mapped .npy data is), else an aligned
    copy (kernels may use aligned vector loads on compile-time arrays)."""
    if array.ctypes.data % ALIGNMENT == 0:
        return array
    copy = _aligned_bytes(array.nbytes)[:array.nbytes].view(array.dtype).reshape(array.shape)
    copy[...] = array
    return copy


def symbol_prefix(key: str) -> str:
    """Content-addressed symbol prefix ``graphc_g<digits>`` (60 bits of the key, in decimal so
    that names keep the ``graphc_g<number>_`` form): equal code gets equal names, and the target
    hands back the module already loaded instead of redefining them."""
    return f"graphc_g{int(key[:15], 16)}"


def generate_code(graph: Graph, plan: MemoryPlan, dims: Mapping[str, int],
                  key: str) -> GeneratedCode:
    """Lower every executed node, build the entry and JIT the module (LLVM runs here)."""
    prefix = symbol_prefix(key)
    module = ir.Module(name=prefix)
    slots: list[str] = []
    slot_of: dict[str, int] = {}

    def slot(value: str) -> int:
        if value not in slot_of:
            slot_of[value] = len(slots)
            slots.append(value)
        return slot_of[value]

    calls, kernels, checks = [], [], []
    arrays: dict[str, np.ndarray] = {}
    for name in plan.order:
        node = graph.node(name)
        if node.op == INPUT or node.op in CONSTANT_OPS:
            continue
        if all(o is None or plan[o].reuse == "view" for o in node.outputs):
            continue  # a view: its bytes are already where the plan says
        for bound in lower_node(graph, node, dims):
            if isinstance(bound, BoundFunction):
                fn = bound.emit(module, f"{prefix}_{len(kernels)}_{bound.name}")
                arrays.update(bound.constants)
            else:
                fn = emit_kernel(module, bound.kernel, f"{prefix}_{len(kernels)}_"
                                                       f"{bound.kernel.name}")
                arrays.update(bound.scratch)
            if bound.run_check is not None:
                checks.append(bound.run_check)
            calls.append(KernelCall(fn, tuple(slot(v) for v in bound.values)))
            kernels.append(bound)
    entry = build_entry(module, calls, name=f"{prefix}_entry")
    compiled = host_target().compile(module, key=key)
    text = "\n\n".join(str(k) for k in kernels)
    return GeneratedCode(compiled, entry.name, slots, arrays, kernels, text, checks)


def _dependencies(module) -> list:
    """The modules ``module`` links against, transitively, each before its users."""
    ordered: dict[int, object] = {}

    def visit(m) -> None:
        for dep in m.dependencies:
            if id(dep) not in ordered:
                visit(dep)
                ordered[id(dep)] = dep
    visit(module)
    return list(ordered.values())


def store_code(cache: CodeCache, key: str, code: GeneratedCode) -> bool:
    """Store the code and the object code of the modules it links against; False if it holds
    an address of this process (see ``HostTarget.compile``) and so cannot be cached."""
    module = code.module
    if not module.relocatable:
        return False
    deps = _dependencies(module)
    meta = {"name": module.name, "entry": code.entry, "slots": code.slots,
            "checks": [[c.slot, c.message] for c in code.checks],
            "externals": sorted(module.addresses),
            "dependencies": [{"name": d.name, "externals": sorted(d.addresses)} for d in deps]}
    blobs = dict(zip(CODE_FILES, (module.object_code, module.source_ir.encode(),
                                  module.optimised_ir.encode(), code.kernel_text.encode())))
    blobs.update({f"dependency-{i}.o": d.object_code for i, d in enumerate(deps)})
    return cache.store("code", key, meta, blobs, code.arrays)


def load_code(cache: CodeCache, key: str) -> GeneratedCode | None:
    """The code stored under ``key`` loaded into the JIT (no LLVM run), or None (a miss)."""
    entry = cache.load("code", key)
    if entry is None:
        return None
    meta, target = entry.meta, host_target()
    for i, dep in enumerate(meta["dependencies"]):  # linked by symbol: load them first
        data = entry.read_bytes(f"dependency-{i}.o")
        target.load_object(f"object-{hashlib.sha256(data).hexdigest()}", dep["name"], data,
                           dep["externals"], _NOT_STORED, _NOT_STORED)
    module = target.load_object(
        key, meta["name"], entry.read_bytes("object.o"), meta["externals"],
        lambda: entry.read_text("source.ll"), lambda: entry.read_text("optimised.ll"))
    arrays = {name: _aligned(entry.load_array(i, writable=True))
              for i, name in enumerate(entry.arrays)}
    return GeneratedCode(module, meta["entry"], meta["slots"], arrays, [],
                         entry.read_text("kernels.txt"),
                         [RunCheck(slot, message) for slot, message in meta["checks"]])


def _NOT_STORED() -> str:
    return "; the IR of a module linked from the code cache is not stored, only its object code\n"


def build_specialisation(graph: Graph, dims: Mapping[str, int], threads: int, *,
                         graph_digest: str | None = None,
                         cache: CodeCache | None = None) -> Specialisation:
    """Compile (or load from ``cache``) the code of ``graph`` for ``dims``."""
    start = time.perf_counter()
    target = host_target()
    key = code_key(graph_digest or fingerprint_graph(graph), dims, target)
    plan = plan_memory(graph, dims, alignment=ALIGNMENT)
    code, status = None, "in process"
    if target.loaded(key) is None and cache is not None:
        code = load_code(cache, key)
        status = "hit" if code is not None else "miss"
    if code is None:
        status = status if target.loaded(key) is not None else (
            "miss" if cache is not None else "off")
        code = generate_code(graph, plan, dims, key)
        if status == "miss" and not store_code(cache, key, code):
            status = "miss (not cacheable: the code holds addresses of this process)"
    spec = assemble(graph, plan, code, dict(dims), threads)
    spec.cache_status, spec.key = status, key
    spec.seconds = time.perf_counter() - start
    return spec


def assemble(graph: Graph, plan: MemoryPlan, code: GeneratedCode, dims: dict,
             threads: int) -> Specialisation:
    """The arena, the pointer table and the runner around generated code."""
    arena = _aligned_bytes(plan.arena_bytes)
    table = np.zeros(len(code.slots), np.uintp)
    # the table holds raw addresses: the arrays they point into live as long as the model
    constants = {k: np.ascontiguousarray(v) for k, v in graph.constant_arrays().items()}
    external: dict[str, list[int]] = {}
    constants.update({k: np.ascontiguousarray(v) for k, v in code.arrays.items()})
    for i, value in enumerate(code.slots):
        if value in code.arrays:
            table[i] = constants[value].ctypes.data
            continue
        p = plan[value]
        if p.storage == "arena":
            table[i] = arena.ctypes.data + p.offset
        elif p.buffer in constants:
            table[i] = constants[p.buffer].ctypes.data
        else:
            external.setdefault(p.buffer, []).append(i)
    runner = ThreadedRunner(code.module.address(code.entry), threads)
    return Specialisation(dims, plan, code.kernels, code.module, runner, code.slots, arena, table,
                          external, constants, code.kernel_text, checks=list(code.checks))


class CpuModel:
    """An optimised graph compiled for the host CPU; ``run(feeds)`` executes generated code.

    ``cache`` (a ``CodeCache``) stores and loads each specialisation's code on disk; without one
    (the default here; ``graphc.compile`` passes one unless the cache is off) code is still
    shared within the process. ``graph_digest`` is ``fingerprint_graph(graph)`` when the caller
    already knows it (computed on first specialisation otherwise)."""

    def __init__(self, graph: Graph, threads: int | None = None, *,
                 cache: CodeCache | None = None, graph_digest: str | None = None):
        self.graph = graph
        self.threads = default_threads() if threads is None else int(threads)
        self.cache = cache
        self._digest = graph_digest
        self._specs: dict[tuple, Specialisation] = {}
        self._lock = threading.Lock()
        self._symbols = [d for v in graph.inputs for d in graph.type_of(v).shape
                         if isinstance(d, str)]
        self._fast: _FastRun | None = None
        if not self._symbols:
            self._fast = _FastRun.build(graph, self.specialise({}))

    @property
    def graph_digest(self) -> str:
        if self._digest is None:
            self._digest = fingerprint_graph(self.graph)
        return self._digest

    def specialise(self, dims: Mapping[str, int]) -> Specialisation:
        key = tuple(sorted(dims.items()))
        with self._lock:
            if key not in self._specs:
                self._specs[key] = build_specialisation(
                    self.graph, dims, self.threads, graph_digest=self.graph_digest,
                    cache=self.cache)
            return self._specs[key]

    def profile(self, dims: Mapping[str, int] | None = None) -> str:
        """Cycles per kernel and per barrier wait, summed over runs, of the specialisation for
        ``dims`` (compile with ``GRAPHC_PROFILE=1`` set to have the entry count them)."""
        return self.specialise(self.check_dims(dims or {})).runner.profile_report()

    @property
    def cache_hits(self) -> int:
        """Specialisations of this model loaded from the on-disk cache."""
        return sum(s.cache_status == "hit" for s in self._specs.values())

    def cache_report(self) -> str:
        """One line per specialisation: ``code cache: hit (key 1a2b3c4d, dims N=1, 0.12 s)``."""
        return "\n".join(s.report() for s in self._specs.values())

    def check_dims(self, dims: Mapping[str, int]) -> dict:
        """``dims`` for every symbolic dim of the inputs (a single-specialisation model may omit
        them: its one binding is used)."""
        return bind_dims(self._symbols, dims, [s.dims for s in self._specs.values()])

    def _dims_of(self, feeds: dict) -> dict:
        dims: dict = {}
        for v in self.graph.inputs:
            for want, got in zip(self.graph.type_of(v).shape, feeds[v].shape):
                if isinstance(want, str):
                    dims[want] = int(got)
        return dims

    def run(self, feeds: Mapping[str, np.ndarray],
            into: Mapping[str, np.ndarray] | None = None) -> list[np.ndarray]:
        """Run on ``feeds``; the outputs are fresh arrays, except those named in ``into``
        (output name -> C-contiguous array of the output's shape and dtype, aliasing no feed),
        which are written in place and returned as they are."""
        if self._fast is not None and not into:
            ready = self._fast.accepts(feeds)
            if ready is not None:
                return self._fast.run(ready)
        arrays = {k: np.ascontiguousarray(v) for k, v in check_feeds(self.graph, feeds).items()}
        spec = self.specialise(self._dims_of(arrays))
        targets = check_into(self.graph, into or {}, arrays, lambda v: spec.plan[v].type)
        outputs = {}  # computed straight into the caller's arrays, or fresh ones it keeps
        for v in self.graph.outputs:
            p = spec.plan[v]
            if p.storage == "output" and p.buffer not in outputs:
                t: TensorType = spec.plan[p.buffer].type
                outputs[p.buffer] = targets.get(p.buffer)
                if outputs[p.buffer] is None:
                    outputs[p.buffer] = np.empty(t.shape, t.np_dtype)
        buffers = {**arrays, **outputs}
        missing = [b for b in spec.external_slots if b not in buffers]
        if missing:
            raise FeedError(f"internal: no array for buffer '{missing[0]}'")
        spec.run_patched([buffers[b].ctypes.data for b in spec.external_slots])
        return [self._output(spec, v, buffers, arrays, targets) for v in self.graph.outputs]

    def _output(self, spec, value, buffers, feeds, targets) -> np.ndarray:
        p = spec.plan[value]
        if p.storage == "output" and p.buffer in buffers:
            return buffers[p.buffer]
        # an output that is a graph input or a constant: copied, never aliased to the caller
        source = feeds[value] if value in feeds else self.graph.constant_value(value)
        if value in targets:
            np.copyto(targets[value], source)
            return targets[value]
        return np.array(source, copy=True)

    def __call__(self, feeds=None, **named):
        return self.run({**(feeds or {}), **named})


class _FastRun:
    """``run`` without the general checks, for a static-shape model whose feeds are exactly
    its inputs as C-contiguous ndarrays of the right dtype and shape (anything else takes the
    general path, which validates, copies and raises as before). Everything that does not
    depend on the feeds is computed once: which buffers to allocate, which slots to patch,
    where each output comes from."""

    def __init__(self, graph: Graph, spec: Specialisation):
        self.spec = spec
        self.inputs = list(graph.inputs)
        self.want = [(tuple(graph.type_of(v).shape), graph.type_of(v).np_dtype)
                     for v in self.inputs]
        fresh = list(dict.fromkeys(  # the output buffers, as the general path allocates them
            spec.plan[v].buffer for v in graph.outputs if spec.plan[v].storage == "output"
            and spec.plan[v].buffer not in graph.inputs))
        self.allocations = [(tuple(spec.plan[b].type.shape), spec.plan[b].type.np_dtype)
                            for b in fresh]
        order = {b: i for i, b in enumerate(fresh)}
        # external buffer -> ("feed", input index) or ("fresh", allocation index)
        self.patches = [("feed", self.inputs.index(b)) if b in graph.inputs else
                        ("fresh", order[b]) for b in spec.external_slots]
        self.sources = [self._source(graph, spec, v, order) for v in graph.outputs]

    @classmethod
    def build(cls, graph: Graph, spec: Specialisation) -> _FastRun | None:
        """None when a buffer has no array to bind (the general path reports it)."""
        known = set(graph.inputs) | {spec.plan[v].buffer for v in graph.outputs
                                     if spec.plan[v].storage == "output"}
        if any(b not in known for b in spec.external_slots):
            return None
        return cls(graph, spec)

    def _source(self, graph: Graph, spec: Specialisation, value: str, order: dict):
        """Where output ``value`` comes from, as ``CpuModel._output`` decides it."""
        p = spec.plan[value]
        if p.storage == "output" and p.buffer in order:
            return "fresh", order[p.buffer]
        if p.storage == "output" and p.buffer in graph.inputs:
            return "alias", self.inputs.index(p.buffer)
        if value in graph.inputs:  # copied, never aliased to the caller
            return "feed", self.inputs.index(value)
        return "constant", graph.constant_value(value)

    def accepts(self, feeds) -> list[np.ndarray] | None:
        """The feeds in input order if they fit the fast path, else None."""
        if type(feeds) is not dict or len(feeds) != len(self.inputs):
            return None
        arrays = []
        for name, (shape, dtype) in zip(self.inputs, self.want):
            array = feeds.get(name)
            if type(array) is not np.ndarray or array.shape != shape or \
                    array.dtype != dtype or not array.flags.c_contiguous:
                return None
            arrays.append(array)
        return arrays

    def run(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        fresh = [np.empty(shape, dtype) for shape, dtype in self.allocations]
        pools = {"feed": arrays, "fresh": fresh}
        self.spec.run_patched([pools[kind][i].ctypes.data for kind, i in self.patches])
        return [fresh[where] if kind == "fresh" else arrays[where] if kind == "alias" else
                np.array(arrays[where] if kind == "feed" else where, copy=True)
                for kind, where in self.sources]


def check_into(graph: Graph, into: Mapping[str, np.ndarray], feeds: Mapping[str, np.ndarray],
               type_of: Callable[[str], TensorType]) -> dict:
    """Validate caller-provided output arrays: each names an output, is a writable C-contiguous
    ndarray of that output's concrete type, and shares no memory with a feed or another one."""
    checked: dict[str, np.ndarray] = {}
    for name, array in into.items():
        if name not in graph.outputs:
            raise FeedError(f"into names '{name}', which is not an output of graph "
                            f"'{graph.name}' (outputs: {', '.join(graph.outputs)})")
        want = type_of(name)
        if not isinstance(array, np.ndarray) or not array.flags.c_contiguous \
                or not array.flags.writeable:
            raise FeedError(f"into['{name}'] must be a writable C-contiguous numpy array")
        if array.shape != tuple(want.shape) or array.dtype != want.np_dtype:
            raise FeedError(f"into['{name}'] is {array.dtype}{list(array.shape)}; output "
                            f"'{name}' is {want.np_dtype}{list(want.shape)}")
        for other, data in [*feeds.items(), *checked.items()]:
            if np.may_share_memory(array, data):
                what = "feed" if other in feeds and data is feeds[other] else "into array"
                raise FeedError(f"into['{name}'] shares memory with {what} '{other}'")
        checked[name] = array
    return checked
