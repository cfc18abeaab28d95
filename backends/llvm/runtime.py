"""The threaded runtime of the CPU backend: one entry function per graph, N threads, barriers.

Design ("keep Python out of the hot path"): the generated module exports ONE entry

    void graph_entry(i8** table, i32 thread_id, i32 n_threads, i32* barrier)

that calls every kernel of the graph in order, each with its buffer pointers loaded from the
pointer ``table`` plus the thread's id and count, and waits at a barrier between dependent
kernels. Kernels split their own work by ``(thread_id, n_threads)``. ``run()`` therefore costs
one ctypes call per thread (ctypes releases the GIL, so the calls run in parallel), not one per op.

The barrier is a counting barrier in generated code over two i32 words, ``count`` and
``generation``: each arriving thread increments ``count``; the last one resets it and bumps
``generation`` (release); the others spin, with the ``pause`` hint, until ``generation`` changes
(acquire). Spinning assumes at most one thread per core, which ``ThreadedRunner`` enforces.

Between runs the runner's threads wait in native code too: they are a ``WorkerPool`` of
backends/llvm/gemm.py, whose workers spin (``pause``) on a job generation counter for
``SPIN_S`` after each job, then block. A run therefore costs the job words, one release store
and the final count, not a thread wake-up, when runs follow each other; an idle model burns no
CPU once the spin has run out.

Profiling (``GRAPHC_PROFILE=1`` when the entry is built, or ``build_entry(..., profile=True)``):
the entry reads ``llvm.readcyclecounter`` around every kernel call and every barrier and adds
the differences to a per-thread, per-step int64 buffer that follows the barrier words in the
runner's state array (``ThreadedRunner.profile``; ``profile_report()`` prints it). Every entry
answers a probe call with ``tid = -1`` by storing its number of profiled steps (0: none) and a
pointer to their labels into the state it is given; that is how a runner built from a bare
entry address sizes its state and names the steps. No address is baked into the code, so a
profiled entry may be cached on disk and loaded by another process.
"""

from __future__ import annotations

import ctypes
import os
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

import llvmlite.binding as llvm
import numpy as np
from llvmlite import ir

from graphc.errors import GraphcError

from .gemm import KIND_ENTRY, WorkerPool, _worker_functions

I32 = ir.IntType(32)
I64 = ir.IntType(64)
I8P = ir.IntType(8).as_pointer()
ENTRY_NAME = "graph_entry"
BARRIER_NAME = "graphc_barrier_wait"
YIELD_EVERY = 1024            # barrier polls between sched_yield calls (a power of 2)
SPIN_S = 2e-4                 # a worker spins this long after a run before it blocks
PROFILE_ENV = "GRAPHC_PROFILE"
PROFILE_OFFSET = 64           # bytes: barrier words first, then the profile's cycle buffer


class RuntimeConfigError(GraphcError):
    """A runtime setting (thread count) the machine cannot honour."""


@dataclass(frozen=True)
class KernelCall:
    """One step of the entry: call ``function`` with the pointers at ``table_slots`` (cast to
    the function's pointer parameter types), then ``thread_id`` and ``n_threads``."""

    function: ir.Function
    table_slots: tuple[int, ...]
    barrier_after: bool = True


def build_barrier(module: ir.Module) -> ir.Function:
    """``void graphc_barrier_wait(i32* barrier, i32 n_threads)`` (see the module docstring)."""
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [I32.as_pointer(), I32]),
                     BARRIER_NAME)
    fn.linkage = "internal"
    state, n_threads = fn.args
    entry, last, wait, done = (fn.append_basic_block(n) for n in ("entry", "last", "wait", "done"))
    b = ir.IRBuilder(entry)
    count = b.gep(state, [I32(0)], inbounds=True)
    generation = b.gep(state, [I32(1)], inbounds=True)
    gen = b.load_atomic(generation, "acquire", 4)
    arrived = b.add(b.atomic_rmw("add", count, I32(1), "acq_rel"), I32(1))
    b.cbranch(b.icmp_signed("==", arrived, n_threads), last, wait)

    b = ir.IRBuilder(last)  # the last thread releases the others
    b.store_atomic(I32(0), count, "monotonic", 4)
    b.atomic_rmw("add", generation, I32(1), "release")
    b.branch(done)

    b = ir.IRBuilder(wait)
    spins = b.phi(I32, name="spins")
    spins.add_incoming(I32(0), entry)
    pause = module.declare_intrinsic("llvm.x86.sse2.pause", fnty=ir.FunctionType(ir.VoidType(), []))
    b.call(pause, [])
    # every YIELD_EVERY polls, give the core away: when other processes crowd the cores, the
    # thread this one waits for may be the one that needs it
    polled = b.add(spins, I32(1))
    with b.if_then(b.icmp_unsigned("==", b.and_(polled, I32(YIELD_EVERY - 1)), I32(0))):
        b.call(_sched_yield(module), [])
    spins.add_incoming(polled, b.block)
    same = b.icmp_signed("==", b.load_atomic(generation, "acquire", 4), gen)
    b.cbranch(same, wait, done)

    ir.IRBuilder(done).ret_void()
    return fn


def build_entry(module: ir.Module, calls: Sequence[KernelCall], name: str = ENTRY_NAME,
                profile: bool | None = None) -> ir.Function:
    """The graph's entry function ``name``: every kernel call in order, barriers between them
    (symbols are process-wide in the JIT, so each compiled graph passes its own name).
    ``profile`` (default: ``GRAPHC_PROFILE`` is set) adds per-step cycle counting."""
    barrier = build_barrier(module)
    fnty = ir.FunctionType(ir.VoidType(), [I8P.as_pointer(), I32, I32, I32.as_pointer()])
    fn = ir.Function(module, fnty, name)
    table, thread_id, n_threads, state = fn.args
    profiled = profiling_requested() if profile is None else profile
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    _answer_probe(module, fn, b, calls if profiled else None)
    clock = _StepClock(module, b, state, thread_id, len(calls)) if profiled else None
    for step, call in enumerate(calls):
        params = call.function.function_type.args
        if len(params) != len(call.table_slots) + 2:
            raise GraphcError(f"kernel {call.function.name} takes {len(params) - 2} pointers, "
                              f"step {step} passes {len(call.table_slots)}")
        args = []
        for slot, ptype in zip(call.table_slots, params):
            raw = b.load(b.gep(table, [I32(slot)], inbounds=True))
            args.append(b.bitcast(raw, ptype))
        mark = clock.now(b) if clock else None
        b.call(call.function, [*args, thread_id, n_threads])
        mark = clock.add(b, step, 0, mark) if clock else None
        if call.barrier_after and step < len(calls) - 1:
            b.call(barrier, [state, n_threads])
            if clock:
                clock.add(b, step, 1, mark)
    b.ret_void()
    return fn


def _answer_probe(module: ir.Module, fn: ir.Function, b: ir.IRBuilder,
                  calls: Sequence[KernelCall] | None) -> None:
    """``tid < 0`` is a probe, not a run: store the number of profiled steps (0: none) into
    state[0] and a pointer to their NUL-separated labels into state[2:4], and return."""
    _, thread_id, _, state = fn.args
    probe, run = fn.append_basic_block("probe"), fn.append_basic_block("run")
    b.cbranch(b.icmp_signed("<", thread_id, I32(0)), probe, run)
    b.position_at_end(probe)
    b.store(I32(len(calls) if calls is not None else 0), state)
    if calls is not None:
        text = bytearray("\0".join(c.function.name for c in calls).encode() + b"\0")
        labels = ir.GlobalVariable(module, ir.ArrayType(ir.IntType(8), len(text)),
                                   f"{fn.name}.labels")
        labels.global_constant, labels.linkage = True, "internal"
        labels.initializer = ir.Constant(ir.ArrayType(ir.IntType(8), len(text)), text)
        slot = b.bitcast(b.gep(state, [I32(2)], inbounds=True), I8P.as_pointer())
        b.store(b.bitcast(labels, I8P), slot)
    b.ret_void()
    b.position_at_end(run)


class _StepClock:
    """Emits the profiling code: ``llvm.readcyclecounter`` reads, and adds into the int64
    cycle buffer that follows the runner's barrier words (``PROFILE_OFFSET`` bytes in)."""

    def __init__(self, module: ir.Module, b: ir.IRBuilder, state, thread_id, steps: int):
        self.steps = steps
        self.clock = module.globals.get("llvm.readcyclecounter") or ir.Function(
            module, ir.FunctionType(I64, []), "llvm.readcyclecounter")
        base = b.gep(state, [I32(PROFILE_OFFSET // 4)], inbounds=True)
        self.base = b.bitcast(base, I64.as_pointer())
        self.row = b.mul(b.sext(thread_id, I64), I64(steps * 2))

    def now(self, b: ir.IRBuilder):
        return b.call(self.clock, [])

    def add(self, b: ir.IRBuilder, step: int, what: int, since):
        """cycles[tid, step, what] += now - since; returns now."""
        now = self.now(b)
        slot = b.gep(self.base, [b.add(self.row, I64(step * 2 + what))], inbounds=True)
        b.store(b.add(b.load(slot), b.sub(now, since)), slot)
        return now


def profiling_requested() -> bool:
    """``GRAPHC_PROFILE`` set to anything but "", "0": compiled entries count cycles."""
    return os.environ.get(PROFILE_ENV, "") not in ("", "0")


@dataclass
class EntryProfile:
    """Cycles of one runner's profiled entry, summed over its runs: ``cycles[tid, step, 0]``
    inside the step's kernel and ``cycles[tid, step, 1]`` waiting at the barrier after it (a
    view of the runner's state array, which the generated code writes)."""

    labels: tuple[str, ...]
    cycles: np.ndarray = field(repr=False)
    runs: int = 0

    def reset(self) -> None:
        self.cycles[:] = 0
        self.runs = 0

    def per_run_us(self) -> np.ndarray:
        """[threads, steps, 2] microseconds per run (kernel, barrier wait)."""
        ticks = _worker_functions()["ticks_per_s"]
        return self.cycles / max(self.runs, 1) / ticks * 1e6

    def report(self) -> str:
        """One line per step: the slowest thread's kernel time, the mean barrier wait and the
        step's share of the summed kernel time, per run."""
        us = self.per_run_us()
        kernel = us[:, :, 0].max(axis=0)
        wait = us[:, :, 1].mean(axis=0)
        total = max(kernel.sum(), 1e-12)
        lines = [f"profile: {self.runs} runs, {len(us)} threads, per run (us)",
                 f"{'step':>4}  {'kernel':>9}  {'wait':>8}  {'share':>6}  function"]
        for step, label in enumerate(self.labels):
            lines.append(f"{step:>4}  {kernel[step]:>9.2f}  {wait[step]:>8.2f}  "
                         f"{100 * kernel[step] / total:>5.1f}%  {label}")
        lines.append(f"{'sum':>4}  {kernel.sum():>9.2f}  {wait.sum():>8.2f}")
        return "\n".join(lines)


def _sched_yield(module: ir.Module) -> ir.Function:
    """libc's ``sched_yield``, declared in ``module`` (the JIT resolves it in the process:
    its address is registered with LLVM when this module is imported)."""
    existing = module.globals.get("sched_yield")
    return existing or ir.Function(module, ir.FunctionType(I32, []), "sched_yield")


def _register_sched_yield() -> None:
    libc = ctypes.CDLL(None)
    llvm.add_symbol("sched_yield", ctypes.cast(libc.sched_yield, ctypes.c_void_p).value)


_register_sched_yield()


ENTRY_CTYPE = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32,
                               ctypes.c_void_p)


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def default_threads() -> int:
    """``GRAPHC_NUM_THREADS`` if set, else every core this process may run on."""
    env = os.environ.get("GRAPHC_NUM_THREADS")
    if env:
        try:
            return int(env)
        except ValueError:
            raise RuntimeConfigError(f"GRAPHC_NUM_THREADS={env!r} is not an integer") from None
    return available_cores()


class ThreadedRunner:
    """Calls a JIT'd entry once per thread, in parallel, over a pointer table.

    Thread 0 is the caller; threads 1.. are a ``WorkerPool`` that waits between runs in
    native code (spin, then block). One call at a time per runner (a lock guards it): the
    table, the arena and the barrier are per-model state, so concurrent ``run`` calls from
    several Python threads are serialised. ``close()`` ends the workers (also done when the
    runner is garbage-collected).
    """

    def __init__(self, entry_address: int, threads: int | None = None):
        self.threads = default_threads() if threads is None else int(threads)
        limit = available_cores()
        if not 1 <= self.threads <= limit:
            raise RuntimeConfigError(f"threads={self.threads}: must be between 1 and the {limit} "
                                     f"cores available (the barrier spins, one thread per core)")
        self._address = int(entry_address)
        self._entry = ENTRY_CTYPE(self._address)
        self._lock = threading.Lock()
        self.profile = self._probe_profile()  # also allocates the barrier (state) words
        self._pool = None
        if self.threads > 1:
            self._pool = WorkerPool(self.threads, spin_s=SPIN_S, name="graphc-graph")
            self._close = weakref.finalize(self, self._pool.close)

    def _probe_profile(self) -> EntryProfile | None:
        """Ask the entry whether it is profiled; allocate the state it uses: the barrier's
        count and generation on a cache line of their own, then the cycle buffer if any."""
        probe = np.zeros(PROFILE_OFFSET // 8, np.int64)
        self._entry(None, -1, 0, probe.ctypes.data)
        steps = int(probe.view(np.int32)[0])
        self._state = np.zeros(PROFILE_OFFSET // 8 + self.threads * steps * 2, np.int64)
        self._barrier_address = self._state.ctypes.data
        if not steps:
            return None
        labels = ctypes.string_at(int(probe[1]), _labels_length(int(probe[1]), steps))
        cycles = self._state[PROFILE_OFFSET // 8:].reshape(self.threads, steps, 2)
        return EntryProfile(tuple(x.decode() for x in labels.split(b"\0")), cycles)

    def run(self, table: np.ndarray) -> None:
        """Run the entry over ``table`` (a uint64/uintp array of buffer addresses)."""
        if table.dtype.itemsize != ctypes.sizeof(ctypes.c_void_p) or not table.flags.c_contiguous:
            raise RuntimeConfigError(f"the pointer table must be a contiguous uintp array, got "
                                     f"{table.dtype}{'' if table.flags.c_contiguous else ' view'}")
        address = table.ctypes.data
        with self._lock:
            pool, n = self._pool, self.threads
            if n > 1 and pool is None:
                raise RuntimeConfigError("this runner was closed: its worker threads are gone")
            if pool is not None:
                pool.start(KIND_ENTRY, self._address, (address, self._barrier_address), n)
            try:
                self._entry(address, 0, n, self._barrier_address)
            finally:  # the workers use the table and the barrier until they are done
                if pool is not None:
                    pool.finish()
            if self.profile is not None:
                self.profile.runs += 1

    def profile_report(self) -> str:
        if self.profile is None:
            return (f"not profiled: set {PROFILE_ENV}=1 before compiling (or build the entry "
                    f"with profile=True)")
        return self.profile.report()

    def close(self) -> None:
        if self._pool is not None:
            self._close()
            self._pool = None


def _labels_length(address: int, count: int) -> int:
    """Bytes of ``count`` NUL-terminated strings at ``address``, the last NUL excluded."""
    end = address
    for _ in range(count):
        end += len(ctypes.string_at(end)) + 1
    return end - address - 1
