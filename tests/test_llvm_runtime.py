"""The threaded runtime: one entry per graph, kernels split by thread id, barriers between them."""

from __future__ import annotations

import gc
import itertools
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from llvmlite import ir

from backends.llvm import host_target
from backends.llvm.runtime import (
    I32,
    KernelCall,
    RuntimeConfigError,
    ThreadedRunner,
    available_cores,
    build_entry,
    default_threads,
)

two_cores = pytest.mark.skipif(available_cores() < 2, reason="needs 2 cores")

F32P = ir.FloatType().as_pointer()
_names = itertools.count()


def _split_loop(fn, n: int, body):
    """for i in [tid*chunk, min(n, (tid+1)*chunk)): body(builder, i) -- the thread split."""
    *_, tid, nthreads = fn.args
    entry, loop, step, done = (fn.append_basic_block(x) for x in ("entry", "loop", "step", "done"))
    b = ir.IRBuilder(entry)
    chunk = b.sdiv(b.add(I32(n), b.sub(nthreads, I32(1))), nthreads)
    start = b.mul(tid, chunk)
    end = b.select(b.icmp_signed("<", b.add(start, chunk), I32(n)), b.add(start, chunk), I32(n))
    b.branch(loop)
    b = ir.IRBuilder(loop)
    i = b.phi(I32)
    i.add_incoming(start, entry)
    b.cbranch(b.icmp_signed("<", i, end), step, done)
    b = ir.IRBuilder(step)
    body(b, i)
    nxt = b.add(i, I32(1))
    i.add_incoming(nxt, step)
    b.branch(loop)
    ir.IRBuilder(done).ret_void()


def _module(n: int, barriers: bool = True, profile: bool | None = None):
    """y = 2x (split by thread), then z[i] = y[n-1-i] + 1: z needs every thread's part of y."""
    module = ir.Module(name=f"runtime_test_{next(_names)}")
    fnty = ir.FunctionType(ir.VoidType(), [F32P, F32P, I32, I32])
    double = ir.Function(module, fnty, f"{module.name}_double")
    _split_loop(double, n, lambda b, i: b.store(
        b.fmul(b.load(b.gep(double.args[0], [i])), ir.Constant(ir.FloatType(), 2.0)),
        b.gep(double.args[1], [i])))
    mirror = ir.Function(module, fnty, f"{module.name}_mirror")
    _split_loop(mirror, n, lambda b, i: b.store(
        b.fadd(b.load(b.gep(mirror.args[0], [b.sub(I32(n - 1), i)])),
               ir.Constant(ir.FloatType(), 1.0)),
        b.gep(mirror.args[1], [i])))
    entry = build_entry(module, [KernelCall(double, (0, 1), barriers), KernelCall(mirror, (1, 2))],
                        name=f"{module.name}_entry", profile=profile)
    return host_target().compile(module).address(entry.name)


def _table(*arrays):
    return np.array([a.ctypes.data for a in arrays], dtype=np.uintp)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("n", [1, 7, 1000, 4099])
def test_entry_runs_kernels_in_order_across_threads(threads, n):
    if threads > available_cores():
        pytest.skip("needs more cores")
    runner = ThreadedRunner(_module(n), threads)
    rng = np.random.default_rng(n)
    for _ in range(50):  # repeated: a missing barrier would show as a race
        x = rng.standard_normal(n).astype(np.float32)
        y, z = np.empty_like(x), np.empty_like(x)
        runner.run(_table(x, y, z))
        np.testing.assert_array_equal(z, (2 * x)[::-1] + 1)
    runner.close()


def test_concurrent_python_callers_are_serialised():
    n = 513
    runner = ThreadedRunner(_module(n), min(2, available_cores()))
    errors = []

    def work(seed):
        rng = np.random.default_rng(seed)
        for _ in range(20):
            x = rng.standard_normal(n).astype(np.float32)
            y, z = np.empty_like(x), np.empty_like(x)
            runner.run(_table(x, y, z))
            if not np.array_equal(z, (2 * x)[::-1] + 1):
                errors.append(seed)

    callers = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in callers:
        t.start()
    for t in callers:
        t.join()
    runner.close()
    assert not errors


def test_thread_count_is_validated(monkeypatch):
    address = _module(3)
    with pytest.raises(RuntimeConfigError, match="threads=0"):
        ThreadedRunner(address, 0)
    with pytest.raises(RuntimeConfigError, match="cores"):
        ThreadedRunner(address, available_cores() + 1)
    monkeypatch.setenv("GRAPHC_NUM_THREADS", "1")
    assert default_threads() == 1
    monkeypatch.setenv("GRAPHC_NUM_THREADS", "two")
    with pytest.raises(RuntimeConfigError, match="GRAPHC_NUM_THREADS"):
        default_threads()


def test_entry_checks_kernel_arity():
    module = ir.Module(name=f"runtime_test_{next(_names)}")
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [F32P, I32, I32]), "k_arity")
    ir.IRBuilder(fn.append_basic_block()).ret_void()
    with pytest.raises(Exception, match="takes 1 pointers, step 0 passes 2"):
        build_entry(module, [KernelCall(fn, (0, 1))], name="e_arity")


def _check_runs(runner, n: int, runs: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(runs):
        x = rng.standard_normal(n).astype(np.float32)
        y, z = np.empty_like(x), np.empty_like(x)
        runner.run(_table(x, y, z))
        np.testing.assert_array_equal(z, (2 * x)[::-1] + 1)


def _graph_workers() -> int:
    return sum(t.name.startswith("graphc-graph") for t in threading.enumerate())


@two_cores
def test_workers_persist_between_runs_and_idle_without_cpu():
    """The pool's threads serve every run (none started per run) and, once their bounded
    spin after the last run is over, sleep: the process burns almost no CPU while idle."""
    before = _graph_workers()
    runner = ThreadedRunner(_module(257), 2)
    assert _graph_workers() == before + 1
    _check_runs(runner, 257, 200)
    assert _graph_workers() == before + 1
    time.sleep(0.05)                        # the spin (SPIN_S) is long over
    cpu, wall = time.process_time(), time.perf_counter()
    time.sleep(0.5)
    busy = (time.process_time() - cpu) / (time.perf_counter() - wall)
    assert busy < 0.1, f"idle runner used {busy:.0%} of a core"
    _check_runs(runner, 257, 5, seed=1)     # sleeping workers wake up for the next run
    runner.close()
    runner.close()                          # idempotent
    assert _graph_workers() == before
    with pytest.raises(RuntimeConfigError, match="closed"):
        runner.run(_table(*(np.zeros(257, np.float32),) * 3))


@two_cores
def test_a_dropped_runner_ends_its_workers():
    before = _graph_workers()
    runner = ThreadedRunner(_module(9), 2)
    _check_runs(runner, 9, 3)
    del runner
    gc.collect()
    deadline = time.monotonic() + 5
    while _graph_workers() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _graph_workers() == before


@pytest.mark.parametrize("threads", [1, 2])
def test_profiled_entry_counts_cycles_per_step_and_thread(threads):
    if threads > available_cores():
        pytest.skip("needs more cores")
    n = 4099
    runner = ThreadedRunner(_module(n, profile=True), threads)
    profile = runner.profile
    assert profile is not None and profile.runs == 0
    _check_runs(runner, n, 7)                # profiling must not change the results
    assert profile.runs == 7
    assert profile.cycles.shape == (threads, 2, 2)
    # threads claim the chunks of each step: every step was timed, by whoever ran it
    assert (profile.cycles[:, :, 0].sum(axis=0) > 0).all(), profile.cycles
    assert len(profile.labels) == 2 and profile.labels[0].endswith("_double")
    report = runner.profile_report()
    assert all(label in report for label in profile.labels) and "7 runs" in report
    profile.reset()
    assert profile.runs == 0 and not profile.cycles.any()
    runner.close()


def test_profiling_follows_the_environment(monkeypatch):
    monkeypatch.setenv("GRAPHC_PROFILE", "1")
    assert ThreadedRunner(_module(5), 1).profile is not None
    monkeypatch.setenv("GRAPHC_PROFILE", "0")
    plain = ThreadedRunner(_module(5), 1)
    assert plain.profile is None and "not profiled" in plain.profile_report()
    _check_runs(plain, 5, 2)


def test_table_must_be_a_pointer_array():
    runner = ThreadedRunner(_module(5), 1)
    with pytest.raises(RuntimeConfigError, match="pointer table"):
        runner.run(np.zeros(3, np.float32))


LOADED_CHILD = """
import subprocess, sys, time
import numpy as np
from backends.llvm.runtime import ThreadedRunner
from tests.test_llvm_runtime import _check_runs, _module

hogs = [subprocess.Popen([sys.executable, "-c", "while 1: pass"]) for _ in range(2)]
try:
    runner = ThreadedRunner(_module(1025), 2)
    start = time.perf_counter()
    _check_runs(runner, 1025, 300, seed=3)
    print(f"{(time.perf_counter() - start) / 300 * 1e6:.1f} us per run")
    runner.close()
finally:
    for hog in hogs:
        hog.kill()
        hog.wait()
"""


@two_cores
def test_runs_complete_while_other_processes_crowd_the_cores(tmp_path):
    """Two CPU hogs beside a 2-thread runner: every run is still right and none hangs (the
    child is killed after the timeout). Chunks are claimed, so a worker the kernel has not
    scheduled does not hold a run up, and waits sleep on futexes after a short spin."""
    script = tmp_path / "loaded.py"
    script.write_text(textwrap.dedent(LOADED_CHILD))
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(script)], cwd=root, capture_output=True,
                          text=True, timeout=120, env={"PYTHONPATH": str(root), "PATH": ""},
                          check=False)
    assert proc.returncode == 0, proc.stderr
    assert "us per run" in proc.stdout


def test_one_thread_alone_runs_every_chunk_of_a_two_thread_run():
    """The entry's threads claim chunks: thread 0 calling it for n_threads=2 with no worker
    at all (as when the kernel has not scheduled the worker yet) runs both halves itself and
    returns (in a thread joined with a timeout, so a regression fails instead of hanging)."""
    n = 1001
    runner = ThreadedRunner(_module(n), 1)
    for run in range(3):
        x = np.random.default_rng(run).standard_normal(n).astype(np.float32)
        y, z = np.empty_like(x), np.empty_like(x)
        table = _table(x, y, z)
        alone = threading.Thread(target=runner._entry,
                                 args=(table.ctypes.data, 0, 2, runner._barrier_address),
                                 daemon=True)
        alone.start()
        alone.join(timeout=30)
        assert not alone.is_alive(), "thread 0 waited for a worker that never came"
        runner._run_word += 1  # what ThreadedRunner.run does after each run
        np.testing.assert_array_equal(z, (2 * x)[::-1] + 1)
