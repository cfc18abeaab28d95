"""The on-disk code cache of the CPU backend (backends/llvm/cache.py) and ``run(into=...)``.

Cross-process behaviour is checked in subprocesses (a hit must come from disk, not from the
process's own JIT): a second process loads the code without running LLVM and gives bit-identical
outputs; corrupt entries are warnings, misses and rebuilt. In-process tests cover the keys
(weights, dims, CPU features), the switches and location, and the caller's output arrays."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest

import graphc
from backends.llvm import cache as code_cache
from backends.llvm.cache import CacheWarning, CodeCache, fingerprint_graph
from backends.llvm.compiler import CpuModel
from backends.llvm.target import host_target
from graphc import ops
from graphc.errors import FeedError

ROOT = Path(__file__).resolve().parents[1]

def small_cnn(seed=0, name="cnn"):
    """Conv + ReLU + MaxPool + Flatten + Gemm + Sigmoid with seeded weights, symbolic batch."""
    rng = np.random.default_rng(seed)
    g = graphc.Graph(name)
    x = g.input("x", (None, 3, 9, 11))
    w = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    h = ops.relu(ops.conv(x, w, rng.standard_normal(8).astype(np.float32), pads=[1, 1, 1, 1]))
    h = ops.flatten(ops.max_pool(h, kernel_shape=[2, 2], strides=[2, 2]), axis=1)
    fc = rng.standard_normal((8 * 4 * 5, 7)).astype(np.float32)
    g.output(ops.sigmoid(ops.gemm(h, fc, rng.standard_normal(7).astype(np.float32))), h)
    return g


CHILD = """
import json, sys
import numpy as np
import graphc
from backends.llvm.cache import source_stamp
from backends.llvm.target import host_target
from tests.test_llvm_cache import small_cnn

model = graphc.compile(small_cnn(), target="cpu", threads=1)
x = np.random.default_rng(1).standard_normal((3, 3, 9, 11)).astype(np.float32)
outputs = model.run({"x": x})
np.savez(sys.argv[1], *outputs)
print(json.dumps({"llvm_runs": host_target().llvm_runs, "hits": model.backend.cache_hits,
                  "report": model.timing_report(), "stamp": source_stamp(),
                  "llvm": "define void @" in model.emit("llvm", dims={"N": 3}),
                  "asm": "ret" in model.emit("asm", dims={"N": 3}),
                  "kernel": len(model.emit("kernel", dims={"N": 3}))}))
"""


def _child(tmp_path: Path, cache_dir: Path, tag: str) -> tuple[dict, list, str]:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    out = tmp_path / f"{tag}.npz"
    env = {**os.environ, "GRAPHC_CACHE_DIR": str(cache_dir), "GRAPHC_CACHE": "1",
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(script), str(out)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    with np.load(out) as data:
        arrays = [data[k] for k in sorted(data.files, key=lambda k: int(k.split("_")[1]))]
    return json.loads(proc.stdout.strip().splitlines()[-1]), arrays, proc.stderr


def _same_sources(first: dict, second: dict) -> None:
    if first["stamp"] != second["stamp"]:
        pytest.skip("graphc sources changed between the two processes (the key includes them)")


@pytest.fixture(scope="module")
def cold_cache(tmp_path_factory):
    """A cache directory filled by one cold compile in a subprocess, and that run's results."""
    tmp = tmp_path_factory.mktemp("cold")
    report, outputs, _ = _child(tmp, tmp / "cache", "cold")
    return tmp / "cache", report, outputs


def _check_against_interpreter(outputs):
    x = np.random.default_rng(1).standard_normal((3, 3, 9, 11)).astype(np.float32)
    want = graphc.interpret(small_cnn(), {"x": x})
    for got, w in zip(outputs, want):
        np.testing.assert_allclose(got, w, rtol=1e-4, atol=1e-4)


# -- across processes -----------------------------------------------------------------------------
def test_hit_in_new_process_runs_no_llvm_and_is_bit_identical(cold_cache, tmp_path):
    cache_dir, cold, cold_outputs = cold_cache
    assert cold["llvm_runs"] >= 1 and cold["hits"] == 0
    assert "graph cache: miss" in cold["report"] and "code cache: miss" in cold["report"]
    _check_against_interpreter(cold_outputs)
    shutil.copytree(cache_dir, tmp_path / "cache")
    warm, warm_outputs, _ = _child(tmp_path, tmp_path / "cache", "warm")
    _same_sources(cold, warm)
    assert warm["llvm_runs"] == 0 and warm["hits"] == 1
    assert "graph cache: hit" in warm["report"] and "code cache: hit" in warm["report"]
    assert warm["llvm"] and warm["asm"] and warm["kernel"] == cold["kernel"]
    for a, b in zip(cold_outputs, warm_outputs):
        assert a.dtype == b.dtype and np.array_equal(a, b)


@pytest.mark.parametrize("damage", ["flip object code", "truncate array", "garbage manifest",
                                    "garbage graph"])
def test_corrupt_entry_is_a_miss_and_rebuilt(cold_cache, tmp_path, damage):
    cache_dir, cold, cold_outputs = cold_cache
    shutil.copytree(cache_dir, tmp_path / "cache")
    code_entry = next((tmp_path / "cache" / "code").iterdir())
    graph_entry = next((tmp_path / "cache" / "graph").iterdir())
    if damage == "flip object code":
        data = bytearray((code_entry / "object.o").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (code_entry / "object.o").write_bytes(bytes(data))
    elif damage == "truncate array":
        array = max(code_entry.glob("array-*.npy"), key=lambda p: p.stat().st_size)
        array.write_bytes(array.read_bytes()[:-8])
    elif damage == "garbage manifest":
        (code_entry / "manifest.json").write_text("{not json")
    else:
        (graph_entry / "graph.pkl").write_bytes(b"\x80\x05garbage")
    report, outputs, stderr = _child(tmp_path, tmp_path / "cache", "rebuilt")
    _same_sources(cold, report)
    assert "CacheWarning" in stderr and "corrupt" in stderr
    if damage == "garbage graph":
        assert "graph cache: miss" in report["report"]
    else:
        assert "code cache: miss" in report["report"] and report["llvm_runs"] >= 1
    for a, b in zip(cold_outputs, outputs):
        assert np.array_equal(a, b)
    again, outputs, stderr = _child(tmp_path, tmp_path / "cache", "again")  # rebuilt entry hits
    _same_sources(report, again)
    assert again["llvm_runs"] == 0 and "CacheWarning" not in stderr
    for a, b in zip(cold_outputs, outputs):
        assert np.array_equal(a, b)


# -- keys -----------------------------------------------------------------------------------------
def _compile(graph, **kw):
    return graphc.compile(graph, target="cpu", threads=1, **kw)


def _feeds(batch, seed=2):
    x = np.random.default_rng(seed).standard_normal((batch, 3, 9, 11)).astype(np.float32)
    return {"x": x}


def test_fingerprint_sees_one_changed_weight_and_ignores_copies():
    g = small_cnn()
    assert fingerprint_graph(g) == fingerprint_graph(g.copy()) == fingerprint_graph(small_cnn())
    changed = small_cnn()
    conv = next(n for n in changed.nodes() if n.op == "Constant" and n.attrs["value"].ndim == 4)
    value = conv.attrs["value"].copy()
    value[1, 2, 0, 1] = np.nextafter(value[1, 2, 0, 1], np.float32(np.inf))
    changed.replace_node(conv.name, attrs={"value": value})
    assert fingerprint_graph(changed) != fingerprint_graph(g)


def test_changed_weights_dims_and_cpu_features_miss(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHC_CACHE_DIR", str(tmp_path))
    target = host_target()
    first = _compile(small_cnn(seed=10, name="keys"))
    first.run(_feeds(2))
    runs = target.llvm_runs
    assert "code cache: miss" in first.timing_report()

    again = _compile(small_cnn(seed=10, name="keys"))          # same graph: nothing regenerated
    np.testing.assert_array_equal(again.run(_feeds(2))[0], first.run(_feeds(2))[0])
    assert target.llvm_runs == runs and "graph cache: hit" in again.timing_report()

    other = _compile(small_cnn(seed=11, name="keys"))          # other weights
    other.run(_feeds(2))
    assert target.llvm_runs > runs and "graph cache: miss" in other.timing_report()

    runs = target.llvm_runs
    first.run(_feeds(5))                                       # other dims
    assert target.llvm_runs > runs
    assert [s.cache_status for s in first.backend._specs.values()] == ["miss", "miss"]

    runs = target.llvm_runs
    monkeypatch.setattr(target, "features", target.features + ",+graphc-test-feature")
    featured = _compile(small_cnn(seed=10, name="keys"))       # other CPU feature string
    got = featured.run(_feeds(2))[0]
    assert target.llvm_runs > runs
    spec = next(iter(featured.backend._specs.values()))
    assert spec.cache_status == "miss" and spec.key != next(iter(first.backend._specs.values())).key
    np.testing.assert_allclose(got, first.run(_feeds(2))[0], rtol=1e-6, atol=1e-6)


def test_same_graph_twice_in_one_process_shares_code():
    g = small_cnn(seed=20, name="shared")
    a = CpuModel(graphc.compile(g, target="cpu", cache=False).graph, threads=1)
    ya = a.run(_feeds(3))
    runs = host_target().llvm_runs
    b = CpuModel(graphc.compile(g, target="cpu", cache=False).graph, threads=1)
    yb = b.run(_feeds(3))
    assert host_target().llvm_runs == runs
    spec_a, spec_b = a.specialise({"N": 3}), b.specialise({"N": 3})
    assert spec_a.module is spec_b.module and spec_b.cache_status == "in process"
    assert spec_b.kernels and spec_a.table is not spec_b.table  # own buffers, shared code
    for x, y in zip(ya, yb):
        np.testing.assert_array_equal(x, y)


# -- switches and location ------------------------------------------------------------------------
def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHC_CACHE_DIR", str(tmp_path / "here"))
    model = _compile(small_cnn(seed=30, name="located"))
    model.run(_feeds(1))
    assert list((tmp_path / "here" / "graph").iterdir())
    assert list((tmp_path / "here" / "code").iterdir())
    monkeypatch.delenv("GRAPHC_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert code_cache.default_cache_dir() == tmp_path / "xdg" / "graphc"


@pytest.mark.parametrize("how", ["env 0", "env off", "argument"])
def test_disabled_cache_writes_nothing(tmp_path, monkeypatch, how):
    monkeypatch.setenv("GRAPHC_CACHE_DIR", str(tmp_path / "cache"))
    if how != "argument":
        monkeypatch.setenv("GRAPHC_CACHE", how.split()[1])
    switch = {"cache": False} if how == "argument" else {}
    model = _compile(small_cnn(seed=40 + len(how), name="off"), **switch)
    got = model.run(_feeds(2))
    assert not (tmp_path / "cache").exists()
    assert "code cache: off" in model.timing_report() and "graph cache" not in \
        model.timing_report()
    _check_shapes_and_values(model, got, 2)


def _check_shapes_and_values(model, got, batch):
    want = graphc.interpret(model.graph, _feeds(batch))
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


def test_unwritable_cache_dir_warns_and_compiles(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("GRAPHC_CACHE_DIR", str(blocker / "cache"))
    with pytest.warns(CacheWarning, match="cannot write"):
        model = _compile(small_cnn(seed=50, name="unwritable"))
    with pytest.warns(CacheWarning, match="cannot write"):
        got = model.run(_feeds(3))
    _check_shapes_and_values(model, got, 3)


def test_store_is_atomic_and_a_second_writer_loses_quietly(tmp_path):
    cache = CodeCache(tmp_path)
    arrays = {"w/packed": np.arange(70000, dtype=np.float32), "small": np.ones(3, np.float32)}
    assert cache.store("code", "k" * 64, {"n": 1}, {"object.o": b"abc"}, arrays)
    assert cache.store("code", "k" * 64, {"n": 2}, {"object.o": b"xyz"}, arrays)
    entry = cache.load("code", "k" * 64)
    assert entry.meta == {"n": 1} and entry.read_bytes("object.o") == b"abc"
    assert entry.arrays == ["w/packed", "small"]
    big = entry.load_array(0, writable=True)
    assert isinstance(big, np.memmap) and np.array_equal(big, arrays["w/packed"])
    big[0] = 5  # copy-on-write: the file keeps its data
    assert cache.load("code", "k" * 64).load_array(0, writable=False)[0] == 0
    assert not [p for p in (tmp_path / "code").iterdir() if p.name.startswith(".")]
    assert cache.load("code", "0" * 64) is None and cache.misses == 1


# -- run(into=...) --------------------------------------------------------------------------------
@pytest.mark.parametrize("target", ["cpu", "reference"])
@pytest.mark.parametrize("batch", [1, 4])
def test_run_into_writes_the_callers_arrays(target, batch):
    model = graphc.compile(small_cnn(seed=60, name="into"), target=target, threads=1,
                           cache=False)
    feeds = _feeds(batch, seed=batch)
    want = model.run(feeds)
    name = model.graph.outputs[0]
    out = np.full(want[0].shape, np.nan, np.float32)
    for _ in range(2):  # ping-pong: the same array again
        got = model.run(feeds, into={name: out})
        assert got[0] is out
        np.testing.assert_array_equal(out, want[0])
        np.testing.assert_array_equal(got[1], want[1])
        assert got[1] is not out


@pytest.mark.parametrize("target", ["cpu", "reference"])
def test_run_into_passes_through_an_input_output(target):
    g = graphc.Graph("passthrough")
    x = g.input("x", (None, 5))
    g.output(ops.relu(x), x)
    model = graphc.compile(g, target=target, threads=1, cache=False)
    x = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
    copy = np.empty_like(x)
    got = model.run({"x": x}, into={"x": copy})
    assert got[1] is copy and np.array_equal(copy, x)


@pytest.mark.parametrize("target", ["cpu", "reference"])
def test_run_into_rejects_bad_arrays(target):
    model = graphc.compile(small_cnn(seed=70, name="bad_into"), target=target, threads=1,
                           cache=False)
    feeds = _feeds(2)
    name = model.graph.outputs[0]
    good = np.empty((2, 7), np.float32)
    cases = [
        ({"nope": good}, "'nope', which is not an output"),
        ({name: np.empty((3, 7), np.float32)}, rf"into\['{name}'\] is float32\[3, 7\]"),
        ({name: np.empty((2, 7), np.float64)}, rf"into\['{name}'\] is float64"),
        ({name: np.empty((7, 2), np.float32).T}, "C-contiguous"),
        ({name: feeds["x"].reshape(-1)[:14].reshape(2, 7)}, "shares memory with feed 'x'"),
    ]
    second = model.graph.outputs[1]
    both = np.empty(2 * 160 + 14, np.float32)
    cases.append(({second: both[:320].reshape(2, 160), name: both[310:324].reshape(2, 7)},
                  "shares memory with into array"))
    for into, message in cases:
        with pytest.raises(FeedError, match=message):
            model.run(feeds, into=into)


# -- command line ---------------------------------------------------------------------------------
def test_cli_timing_reports_the_cache(tmp_path, monkeypatch, capsys):
    from graphc.cli import main

    monkeypatch.setenv("GRAPHC_CACHE_DIR", str(tmp_path))
    model = str(ROOT / "examples" / "models" / "lenet5.onnx")
    args = ["compile", model, "--target", "cpu", "--threads", "1", "--timing",
            "--input-shape", "x=1,1,28,28"]
    assert main(args) == 0
    assert "graph cache: " in capsys.readouterr().out
    assert main([*args, "--emit", "kernel"]) == 0
    assert "graph cache: hit" in capsys.readouterr().out
    assert main([*args, "--no-cache", "--emit", "kernel"]) == 0
    out = capsys.readouterr().out
    assert "code cache: " in out and "graph cache" not in out and "hit" not in out


def test_module_docstring_documents_the_knobs():
    doc = textwrap.dedent(code_cache.__doc__)
    assert "GRAPHC_CACHE_DIR" in doc and "GRAPHC_CACHE=0" in doc


GATHER_CHILD = """
import json
import numpy as np
import graphc
from graphc import ops
from graphc.errors import FeedError

g = graphc.Graph("lookup")
data = g.input("data", (6, 4))
idx = g.input("idx", (3,), dtype="i64")
g.output(ops.gather(data, idx, axis=0, name="lookup"))
model = graphc.compile(g, target="cpu", threads=1)
feeds = {"data": np.arange(24, dtype=np.float32).reshape(6, 4),
         "idx": np.array([1, 7, -1], np.int64)}
try:
    model.run(feeds)
    error = None
except FeedError as exc:
    error = str(exc)
print(json.dumps({"hits": model.backend.cache_hits, "error": error}))
"""


def test_run_time_errors_are_still_checked_after_a_cache_hit(tmp_path):
    """A Gather index out of range is recorded by the kernel and raised after the run: the
    check is data in the cache entry, so a hit from disk raises it too."""
    script = tmp_path / "gather.py"
    script.write_text(GATHER_CHILD)
    env = {**os.environ, "GRAPHC_CACHE_DIR": str(tmp_path / "cache"), "GRAPHC_CACHE": "1",
           "PYTHONPATH": str(ROOT)}
    reports = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, str(script)], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=300, check=False)
        assert proc.returncode == 0, proc.stderr
        reports.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    cold, warm = reports
    if warm["hits"] != 1:
        pytest.skip("graphc sources changed between the two processes (the key includes them)")
    for report in (cold, warm):
        assert report["error"] is not None and "Gather node 'lookup'" in report["error"]
        assert "first is 7" in report["error"]


# -- size limit -----------------------------------------------------------------------------------
def test_cache_limit_reads_sizes_with_suffixes(monkeypatch):
    assert code_cache.cache_limit("4G") == 4 << 30 and code_cache.cache_limit("512m") == 512 << 20
    assert code_cache.cache_limit("2KB") == 2048 and code_cache.cache_limit(" 1000 ") == 1000
    monkeypatch.delenv("GRAPHC_CACHE_MAX", raising=False)
    assert code_cache.cache_limit() == 4 << 30
    monkeypatch.setenv("GRAPHC_CACHE_MAX", "3 parsecs")
    with pytest.raises(code_cache.CacheConfigError, match="GRAPHC_CACHE_MAX='3 parsecs'"):
        code_cache.cache_limit()


def _store_sized(cache: CodeCache, key: str, floats: int, used: float) -> Path:
    assert cache.store("code", key, {}, {"object.o": b"x"},
                       {"w": np.zeros(floats, np.float32)})
    directory = cache.entry_dir("code", key)
    os.utime(directory / "manifest.json", (used, used))  # a deterministic last use
    return directory


def test_eviction_removes_the_least_recently_used_but_never_the_new_entry(tmp_path,
                                                                          monkeypatch):
    monkeypatch.setenv("GRAPHC_CACHE_MAX", "1G")
    cache = CodeCache(tmp_path)
    old = {k: _store_sized(cache, k * 64, 20000, used) for k, used in
           (("a", 1000.0), ("b", 2000.0), ("c", 3000.0))}
    per_entry = cache.entries()[0][1]
    assert [d for d, _, _ in cache.entries()] == [old["a"], old["b"], old["c"]]
    assert cache.load("code", "a" * 64) is not None  # a hit makes "a" the most recent
    monkeypatch.setenv("GRAPHC_CACHE_MAX", str(3 * per_entry + per_entry // 2))
    _store_sized(cache, "d" * 64, 20000, 4000.0)
    left = {d.name[0] for d, _, _ in cache.entries()}
    assert left == {"a", "c", "d"}, left  # "b" was the least recently used
    monkeypatch.setenv("GRAPHC_CACHE_MAX", "1")  # smaller than any entry
    _store_sized(cache, "e" * 64, 100, 5000.0)
    assert [d.name[0] for d, _, _ in cache.entries()] == ["e"]
    assert cache.load("code", "e" * 64) is not None
    assert not [p for p in (tmp_path / "code").iterdir() if p.name.startswith(".")]


def test_cli_cache_info_and_clear(tmp_path, monkeypatch, capsys):
    from graphc.cli import main

    monkeypatch.setenv("GRAPHC_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("GRAPHC_CACHE_MAX", "2G")
    cache = CodeCache(tmp_path)
    for k in "ab":
        _store_sized(cache, k * 64, 1000, 1.0)
    assert main(["cache", "info"]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path) in out and "entries: 2 (2 code, 0 graph)" in out and "of 2.0 GiB" in out
    assert main(["cache", "clear"]) == 0
    assert "removed 2 entries" in capsys.readouterr().out
    assert cache.entries() == [] and cache.load("code", "a" * 64) is None
    monkeypatch.setenv("GRAPHC_CACHE_MAX", "lots")
    assert main(["cache", "info"]) == 2
    assert "GRAPHC_CACHE_MAX" in capsys.readouterr().err


def test_graph_with_inputs_added_between_ops_hits_the_graph_cache(tmp_path, monkeypatch):
    """nodes() keeps insertion order, Input nodes included: a graph whose second input comes
    after its first op (as training programs add the target) must rebuild to the same text."""
    monkeypatch.setenv("GRAPHC_CACHE_DIR", str(tmp_path))
    rng = np.random.default_rng(0)

    def build():
        g = graphc.Graph("late_input")
        x = g.input("x", (None, 6))
        h = ops.relu(ops.gemm(x, rng.standard_normal((6, 4)).astype(np.float32)))
        t = g.input("t", (None, 4))                       # added after an op
        g.output(ops.reduce_mean(h * t, keepdims=0))
        return g

    graph = build()
    feeds = {"x": rng.standard_normal((3, 6), np.float32),
             "t": rng.standard_normal((3, 4), np.float32)}
    first = _compile(graph)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheWarning)
        again = _compile(graph)
    assert "graph cache: hit" in again.timing_report()
    assert list(again.graph.inputs) == ["x", "t"]
    np.testing.assert_array_equal(again.run(feeds)[0], first.run(feeds)[0])
