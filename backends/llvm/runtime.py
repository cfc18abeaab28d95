"""The threaded runtime of the CPU backend: one entry function per graph, N threads, barriers.

Design ("keep Python out of the hot path"): the generated module exports ONE entry

    void graph_entry(i8** table, i32 thread_id, i32 n_threads, i32* barrier)

that runs every kernel of the graph in order, each with its buffer pointers loaded from the
pointer ``table``, and waits between dependent kernels. Kernels split their own work by
``(chunk, n_threads)``. ``run()`` therefore costs one ctypes call per thread (ctypes releases
the GIL, so the calls run in parallel), not one per op.

Chunks are claimed, not assigned: the steps form phases (a phase ends at a step with
``barrier_after``), and in each phase every thread takes the next of the ``n_threads`` chunk
numbers from the phase's counter (compare-and-swap) and runs the phase's kernels with it as the
"thread id", until none is left; it then waits until the phase's done counter reaches
``n_threads``. So a worker the OS has not scheduled holds nothing up: the threads that run
take its chunks (measured on the 2-core test machine with two CPU hogs beside it: a 2-thread
MLP at batch 1 went from 3-12x ONNX Runtime's mean time to ~1.1x). Counters are never
reset: run ``r`` claims ``[r * n, (r + 1) * n)``, and the runner bumps the run word in the state
after each run. Waits spin (``pause``, ``sched_yield`` every 1024 polls) for
``BARRIER_SPIN_S`` and then sleep on the counter's futex (backends/llvm/target.py), so that a
waiting thread gives its core away when other processes crowd the cores.

Between runs the runner's threads wait in native code too: they are a ``WorkerPool`` of
backends/llvm/gemm.py, whose workers spin on a job generation counter for ``SPIN_S`` after
each job, then sleep on its futex (no Python on the wake-up path). A run costs the job words,
one store and ``close_job``, which waits only for the workers that joined the run. An idle
model burns no CPU once the spin has run out.

Profiling (``GRAPHC_PROFILE=1`` when the entry is built, or ``build_entry(..., profile=True)``):
the entry reads ``llvm.readcyclecounter`` around every kernel call and every barrier and adds
the differences to a per-thread, per-step int64 buffer that follows the phase counters in the
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

import numpy as np
from llvmlite import ir

from graphc.errors import GraphcError

from .gemm import (
    KIND_ENTRY,
    WorkerPool,
    _Emitter,
    _store_and_wake,
    _wait_until,
    _worker_functions,
)

I32 = ir.IntType(32)
I64 = ir.IntType(64)
I8P = ir.IntType(8).as_pointer()
ENTRY_NAME = "graph_entry"
BARRIER_NAME = "graphc_barrier_wait"
SPIN_S = 2e-4                 # a worker spins this long after a run before it sleeps
BARRIER_SPIN_S = 5e-5         # a thread spins this long at a barrier before it sleeps
# the runner's state, int64 words: the run number (chunk counters are relative to it), the
# barrier's spin budget and its sleepers; from PHASE_WORDS on, (claimed, done) per phase;
# then (profiled entries) the cycle buffer
STATE_RUN, STATE_SPIN_TICKS, STATE_SLEEPERS, PHASE_WORDS = 0, 1, 2, 8
PROFILE_ENV = "GRAPHC_PROFILE"


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
    """``void graphc_barrier_wait(i64* done, i64 target, i64* state)``: wait (spin, then sleep
    on ``done``'s futex, counted in the state's sleepers word) until ``*done >= target``."""
    i64p = I64.as_pointer()
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [i64p, I64, i64p]), BARRIER_NAME)
    fn.linkage = "internal"
    done, target, words = fn.args
    em = _Emitter(module, fn)
    b = em.b

    def finished():
        value = b.load_atomic(done, "seq_cst", 8)
        return b.icmp_signed(">=", value, target), value

    spin = b.load(b.gep(words, [I64(STATE_SPIN_TICKS)], inbounds=True))
    _wait_until(em, finished, done, b.gep(words, [I64(STATE_SLEEPERS)], inbounds=True), spin,
                "barrier")
    b.ret_void()
    return fn


def phases_of(calls: Sequence[KernelCall]) -> list[list[int]]:
    """Steps grouped into phases: a phase ends at a step with ``barrier_after`` (or the last)."""
    phases: list[list[int]] = [[]]
    for step, call in enumerate(calls):
        phases[-1].append(step)
        if call.barrier_after and step < len(calls) - 1:
            phases.append([])
    return phases


def build_entry(module: ir.Module, calls: Sequence[KernelCall], name: str = ENTRY_NAME,
                profile: bool | None = None) -> ir.Function:
    """The graph's entry function ``name``: every phase of kernel calls in order, each a
    claim loop over its ``n_threads`` chunks, then a wait for the phase's chunks (symbols are
    process-wide in the JIT, so each compiled graph passes its own name). ``profile``
    (default: ``GRAPHC_PROFILE`` is set) adds per-step cycle counting."""
    for step, call in enumerate(calls):
        params = call.function.function_type.args
        if len(params) != len(call.table_slots) + 2:
            raise GraphcError(f"kernel {call.function.name} takes {len(params) - 2} pointers, "
                              f"step {step} passes {len(call.table_slots)}")
    barrier = build_barrier(module)
    fnty = ir.FunctionType(ir.VoidType(), [I8P.as_pointer(), I32, I32, I32.as_pointer()])
    fn = ir.Function(module, fnty, name)
    table, thread_id, n_threads, state = fn.args
    profiled = profiling_requested() if profile is None else profile
    phases = phases_of(calls)
    em = _Emitter(module, fn)
    b = em.b
    _answer_probe(module, fn, b, calls if profiled else None, len(phases))
    words = b.bitcast(state, I64.as_pointer())
    clock = (_StepClock(module, b, words, thread_id, len(calls), profile_words(len(phases)))
             if profiled else None)
    base = b.mul(b.load(b.gep(words, [I64(STATE_RUN)], inbounds=True)), b.sext(n_threads, I64))
    limit = b.add(base, b.sext(n_threads, I64))
    for index, steps in enumerate(phases):
        claimed, done = (b.gep(words, [I64(PHASE_WORDS + 2 * index + k)], inbounds=True)
                         for k in (0, 1))
        for chunk in _claims(b, claimed, base, limit, f"phase{index}"):
            for step in steps:
                _call_step(b, table, calls[step], chunk, n_threads, clock, step)
            _store_and_wake(b, done, b.gep(words, [I64(STATE_SLEEPERS)], inbounds=True),
                            lambda done=done: b.atomic_rmw("add", done, I64(1), "seq_cst"))
        mark = clock.now(b) if clock else None
        if index < len(phases) - 1:
            b.call(barrier, [done, limit, words])
        else:  # workers may leave at once: the caller (thread 0) waits for the last phase
            with b.if_then(b.icmp_signed("==", thread_id, I32(0))):
                b.call(barrier, [done, limit, words])
        if clock:
            clock.add(b, steps[-1], 1, mark)
    b.ret_void()
    return fn


def _claims(b: ir.IRBuilder, claimed, base, limit, name: str):
    """Emit ``while (c = claim next of [base, limit) from *claimed) != none: body(c - base)``;
    a generator that yields the chunk index (i32) with the builder inside the body. Claims use
    compare-and-swap, so the counter stops at ``limit`` and the next run starts from it."""
    head, claim, body, out = (b.append_basic_block(f"{name}.{part}")
                              for part in ("head", "claim", "body", "out"))
    b.branch(head)
    b.position_at_end(head)
    current = b.load_atomic(claimed, "monotonic", 8)
    b.cbranch(b.icmp_signed("<", current, limit), claim, out)
    b.position_at_end(claim)
    result = b.cmpxchg(claimed, current, b.add(current, I64(1)), "acq_rel", "monotonic")
    b.cbranch(b.extract_value(result, 1), body, head)
    b.position_at_end(body)
    yield b.trunc(b.sub(current, base), I32)
    b.branch(head)
    b.position_at_end(out)


def _call_step(b: ir.IRBuilder, table, call: KernelCall, chunk, n_threads, clock, step) -> None:
    params = call.function.function_type.args
    args = []
    for slot, ptype in zip(call.table_slots, params):
        raw = b.load(b.gep(table, [I32(slot)], inbounds=True))
        args.append(b.bitcast(raw, ptype))
    mark = clock.now(b) if clock else None
    b.call(call.function, [*args, chunk, n_threads])
    if clock:
        clock.add(b, step, 0, mark)


def profile_words(phases: int) -> int:
    """Where the profile's cycle buffer starts in the state (int64 words)."""
    return PHASE_WORDS + 2 * phases


def _answer_probe(module: ir.Module, fn: ir.Function, b: ir.IRBuilder,
                  calls: Sequence[KernelCall] | None, phases: int) -> None:
    """``tid < 0`` is a probe, not a run: store the number of profiled steps (0: none) into
    the i32 state[0], the number of phases into state[1] and a pointer to the steps'
    NUL-separated labels into state[2:4], and return."""
    _, thread_id, _, state = fn.args
    probe, run = fn.append_basic_block("probe"), fn.append_basic_block("run")
    b.cbranch(b.icmp_signed("<", thread_id, I32(0)), probe, run)
    b.position_at_end(probe)
    b.store(I32(len(calls) if calls is not None else 0), state)
    b.store(I32(phases), b.gep(state, [I32(1)], inbounds=True))
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
    cycle buffer that follows the phase counters in the runner's state (``profile_words``)."""

    def __init__(self, module: ir.Module, b: ir.IRBuilder, words, thread_id, steps: int,
                 offset: int):
        self.steps = steps
        self.clock = module.globals.get("llvm.readcyclecounter") or ir.Function(
            module, ir.FunctionType(I64, []), "llvm.readcyclecounter")
        self.base = b.gep(words, [I64(offset)], inbounds=True)
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
    native code (spin, then sleep on a futex). One call at a time per runner (a lock guards it): the
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
        probe = np.zeros(4, np.int64)
        self._entry(None, -1, 0, probe.ctypes.data)
        steps, phases = (int(v) for v in probe.view(np.int32)[:2])
        offset = profile_words(phases)
        self._state = _aligned_words(offset + self.threads * steps * 2)
        if self.threads > 1:  # alone, thread 0 never waits (and needs no worker module)
            ticks = _worker_functions()["ticks_per_s"]
            self._state[STATE_SPIN_TICKS] = int(BARRIER_SPIN_S * ticks)
        self._barrier_address = self._state.ctypes.data
        self._run_word = self._state[STATE_RUN:STATE_RUN + 1]
        if not steps:
            return None
        labels = ctypes.string_at(int(probe[1]), _labels_length(int(probe[1]), steps))
        cycles = self._state[offset:].reshape(self.threads, steps, 2)
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
            finally:  # the workers that joined use the table and the state until they leave
                if pool is not None:
                    pool.close_job()
            # every phase's chunks are claimed: its counter is at (run + 1) * threads, where
            # the next run's claims start
            self._run_word += 1
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


def _aligned_words(count: int) -> np.ndarray:
    """``count`` zeroed int64 words starting on a cache line."""
    raw = np.zeros(count + 8, np.int64)
    start = (-raw.ctypes.data % 64) // 8
    return raw[start:start + count]


def _labels_length(address: int, count: int) -> int:
    """Bytes of ``count`` NUL-terminated strings at ``address``, the last NUL excluded."""
    end = address
    for _ in range(count):
        end += len(ctypes.string_at(end)) + 1
    return end - address - 1
