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
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from llvmlite import ir

from graphc.errors import GraphcError

I32 = ir.IntType(32)
I8P = ir.IntType(8).as_pointer()
ENTRY_NAME = "graph_entry"
BARRIER_NAME = "graphc_barrier_wait"


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
    pause = module.declare_intrinsic("llvm.x86.sse2.pause", fnty=ir.FunctionType(ir.VoidType(), []))
    b.call(pause, [])
    same = b.icmp_signed("==", b.load_atomic(generation, "acquire", 4), gen)
    b.cbranch(same, wait, done)

    ir.IRBuilder(done).ret_void()
    return fn


def build_entry(module: ir.Module, calls: Sequence[KernelCall],
                name: str = ENTRY_NAME) -> ir.Function:
    """The graph's entry function ``name``: every kernel call in order, barriers between them
    (symbols are process-wide in the JIT, so each compiled graph passes its own name)."""
    barrier = build_barrier(module)
    fnty = ir.FunctionType(ir.VoidType(), [I8P.as_pointer(), I32, I32, I32.as_pointer()])
    fn = ir.Function(module, fnty, name)
    table, thread_id, n_threads, state = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    for step, call in enumerate(calls):
        params = call.function.function_type.args
        if len(params) != len(call.table_slots) + 2:
            raise GraphcError(f"kernel {call.function.name} takes {len(params) - 2} pointers, "
                              f"step {step} passes {len(call.table_slots)}")
        args = []
        for slot, ptype in zip(call.table_slots, params):
            raw = b.load(b.gep(table, [I32(slot)], inbounds=True))
            args.append(b.bitcast(raw, ptype))
        b.call(call.function, [*args, thread_id, n_threads])
        if call.barrier_after and step < len(calls) - 1:
            b.call(barrier, [state, n_threads])
    b.ret_void()
    return fn


ENTRY_CTYPE = ctypes.CFUNCTYPE(None, ctypes.POINTER(ctypes.c_void_p), ctypes.c_int32,
                               ctypes.c_int32, ctypes.POINTER(ctypes.c_int32))


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

    One call at a time per runner (a lock guards it): the table, the arena and the barrier are
    per-model state, so concurrent ``run`` calls from several Python threads are serialised.
    """

    def __init__(self, entry_address: int, threads: int | None = None):
        self.threads = default_threads() if threads is None else int(threads)
        limit = available_cores()
        if not 1 <= self.threads <= limit:
            raise RuntimeConfigError(f"threads={self.threads}: must be between 1 and the {limit} "
                                     f"cores available (the barrier spins, one thread per core)")
        self._entry = ENTRY_CTYPE(entry_address)
        self._barrier = np.zeros(2, np.int32)
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(self.threads - 1) if self.threads > 1 else None

    def run(self, table: np.ndarray) -> None:
        """Run the entry over ``table`` (a uint64/uintp array of buffer addresses)."""
        table_ptr = table.ctypes.data_as(ctypes.POINTER(ctypes.c_void_p))
        with self._lock:
            barrier = self._barrier.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
            n = self.threads
            futures = [self._pool.submit(self._entry, table_ptr, tid, n, barrier)
                       for tid in range(1, n)] if self._pool else []
            self._entry(table_ptr, 0, n, barrier)
            for f in futures:
                f.result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
