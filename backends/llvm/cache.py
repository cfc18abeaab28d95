"""The on-disk code cache of the CPU backend: compile a model once, load it in every process.

Where the time goes (VGG-16, batch 1, this 2-core machine, cold compile ~17 s): the pass
pipeline 0.3 s; lowering to kernels and LLVM IR, including packing the GEMM weights, ~7 s; LLVM
O3 ~6 s; machine code generation ~2 s; printing the graph (it hashes every constant) 1.4-2.8 s.
A cache that skips only LLVM would still take ~9 s, so an entry stores everything a
``Specialisation`` needs, and a second level skips the pass pipeline too.

Two kinds of entry, each a directory ``<root>/<kind>/<key>/`` (``root``: ``GRAPHC_CACHE_DIR``,
else ``$XDG_CACHE_HOME/graphc``, else ``~/.cache/graphc``; ``GRAPHC_CACHE=0`` or ``off``
disables the cache, as does ``graphc.compile(..., cache=False)``):

* ``code``: keyed by the optimised graph's fingerprint, the bound symbolic dims and the
  environment (below). Holds the relocatable object code after O3 (``emit_object``, loaded with
  MCJIT ``add_object_file``), the generated and optimised LLVM IR text (read lazily, for
  ``emit("llvm")``/``emit("llvm-opt")``; ``emit("asm")`` is regenerated from the optimised IR
  on request), the kernel descriptions, the pointer-table slots and the compile-time arrays
  (packed weights, GEMM parameters and workspace) as ``.npy`` files. The memory plan is NOT
  stored: ``plan_memory`` is deterministic and takes milliseconds, so it is recomputed.
* ``graph``: keyed by the INPUT graph's fingerprint, the pass options and pipeline. Holds the
  optimised graph (its nodes pickled, its arrays as ``.npy``) and its fingerprint, so a hit skips
  both the pipeline (0.3 s) and re-hashing the optimised constants (0.36 s for VGG-16's 730 MB);
  an optimised constant that is the very array of an input constant (passes share arrays) is
  stored as a reference to that input, not copied (saves VGG-16's 500 MB of FC weights).

Fingerprints (``fingerprint_graph``): SHA-256 over the graph's structure, printed like the IR
text but with each array replaced by its dtype/shape and position, plus a SHA-256 of every
array's bytes. The IR printer is not used because it hashes every constant with SHA-1 after a
copy (1.4 s for VGG-16). SHA-256 because it is as fast as SHA-1 here (both ~2 GB/s with the SHA
extensions; BLAKE2b 1.4 GB/s, MD5 0.9 GB/s; measured on 730 MB) and collision-resistant;
arrays are hashed in 32 MiB chunks on a thread pool (hashlib releases the GIL), which halves the
time on 2 cores.

The environment part of a code key: CACHE_FORMAT, the host triple, CPU name and feature string,
the core count (the GEMM workspace is sized by it at compile time), the O-level, the graphc,
llvmlite and LLVM versions, and a digest of graphc's own Python sources (``source_stamp``),
because the version number does not change while the code generators are edited.

Robustness: an entry is written into a temporary directory next to its final place, its
``manifest.json`` (sizes of every file, SHA-256 of every file except the arrays) last, then
renamed into place, so a reader never sees half an entry; when two processes race, the first
rename wins and the other discards its copy. On load every file's size is checked (truncation)
and every non-array file's checksum (object code is executed, so it must be exactly what was
written); the arrays are only size-checked, since hashing 1.4 GB would cost more than the whole
load. A corrupt entry is a ``CacheWarning`` and a miss: it is removed and rebuilt. An unwritable
cache directory is a ``CacheWarning`` and the model is compiled without storing anything.
Size limit: ``GRAPHC_CACHE_MAX`` (bytes, with an optional K, M or G suffix, powers of 1024;
default 4G; a VGG-16 code entry is ~1 GB). After each store the least recently USED entries
(a hit touches the entry's manifest mtime) are evicted until the cache fits, never the entry
just stored; eviction renames an entry away before deleting it, so a concurrent reader either
loads it whole or misses. ``graphc cache info`` and ``graphc cache clear`` show and empty it.
Arrays over 64 KiB are memory-mapped on load (code arrays copy-on-write, since the GEMM
workspace is written at run time; graph constants read-only). The graph is pickled: the cache
directory is the user's own, as for ``__pycache__``.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import pickle
import shutil
import tempfile
import threading
import warnings
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from graphc.errors import GraphcError
from graphc.ir import INPUT, Graph

CACHE_FORMAT = 3
ENV_DIR = "GRAPHC_CACHE_DIR"
ENV_SWITCH = "GRAPHC_CACHE"
OFF_VALUES = ("0", "off", "false", "no")
MAPPED_ARRAY_BYTES = 1 << 16   # arrays from this size on are memory-mapped when loaded
HASH_CHUNK_BYTES = 1 << 25     # unit of parallel hashing
MANIFEST = "manifest.json"
ENV_MAX = "GRAPHC_CACHE_MAX"
DEFAULT_MAX = "4G"
SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
KINDS = ("code", "graph")


class CacheWarning(UserWarning):
    """The code cache could not be used (unwritable directory, corrupt entry); compiling goes on."""


class CacheConfigError(GraphcError):
    """A cache setting (``GRAPHC_CACHE_MAX``) that cannot be understood."""


def cache_limit(text: str | None = None) -> int:
    """Bytes allowed by ``text`` (default: ``GRAPHC_CACHE_MAX``, else 4G): digits with an
    optional K/M/G suffix (powers of 1024, a trailing B allowed)."""
    raw = os.environ.get(ENV_MAX, DEFAULT_MAX) if text is None else text
    value = raw.strip().upper().removesuffix("B")
    unit = value[-1:] if value[-1:] in SIZE_UNITS else ""
    number = value[:len(value) - len(unit)].strip()
    if not number.isdigit():
        raise CacheConfigError(f"{ENV_MAX}={raw!r} is not a size (e.g. 4G, 512M, 1000000)")
    return int(number) * SIZE_UNITS[unit]


# -- switches and location ------------------------------------------------------------------------
def cache_enabled(flag: bool | None = None) -> bool:
    """``flag`` if given, else on unless ``GRAPHC_CACHE`` is 0/off/false/no."""
    if flag is not None:
        return bool(flag)
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in OFF_VALUES


def default_cache_dir() -> Path:
    """``GRAPHC_CACHE_DIR``, else ``$XDG_CACHE_HOME/graphc``, else ``~/.cache/graphc``."""
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "graphc"


# -- fingerprints ---------------------------------------------------------------------------------
_POOL_LOCK = threading.Lock()
_POOL: list[ThreadPoolExecutor] = []


def _hash_pool() -> ThreadPoolExecutor:
    with _POOL_LOCK:
        if not _POOL:
            workers = min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                          else os.cpu_count() or 1)
            _POOL.append(ThreadPoolExecutor(max(workers, 1), thread_name_prefix="graphc-hash"))
        return _POOL[0]


def hash_arrays(arrays: list[np.ndarray]) -> list[bytes]:
    """SHA-256 of each array's bytes (C order), computed in chunks on a thread pool."""
    views = [np.ascontiguousarray(a).reshape(-1).view(np.uint8) for a in arrays]
    chunks = [(i, v[start:start + HASH_CHUNK_BYTES]) for i, v in enumerate(views)
              for start in range(0, max(v.size, 1), HASH_CHUNK_BYTES)]
    if sum(v.size for v in views) > 2 * HASH_CHUNK_BYTES:
        digests = list(_hash_pool().map(lambda c: hashlib.sha256(c[1]).digest(), chunks))
    else:
        digests = [hashlib.sha256(c[1]).digest() for c in chunks]
    per_array = [hashlib.sha256() for _ in views]
    for (i, _), digest in zip(chunks, digests):
        per_array[i].update(digest)
    return [h.digest() for h in per_array]


def _attr_text(value, arrays: list[np.ndarray]) -> str:
    if isinstance(value, np.ndarray):
        arrays.append(value)
        return f"array<{value.dtype.str}{list(value.shape)}>${len(arrays) - 1}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_attr_text(v, arrays) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k!r}: {_attr_text(v, arrays)}"
                               for k, v in sorted(value.items())) + "}"
    return f"{type(value).__name__}:{value!r}"


def graph_structure(graph: Graph) -> tuple[str, list[np.ndarray]]:
    """The graph as text with every array replaced by a numbered placeholder, and the arrays."""
    arrays: list[np.ndarray] = []
    lines = [f"graph {graph.name!r} inputs {graph.inputs!r} outputs {graph.outputs!r}"]
    for node in graph.nodes():
        attrs = _attr_text(dict(node.attrs), arrays)
        types = ", ".join(str(t) for t in node.types)
        lines.append(f"{node.outputs!r} = {node.op}{node.inputs!r} @{node.name!r} {attrs} : "
                     f"{types}")
    return "\n".join(lines), arrays


def fingerprint_graph(graph: Graph) -> str:
    """Hex SHA-256 of the graph's structure and the bytes of every array in it."""
    text, arrays = graph_structure(graph)
    h = hashlib.sha256(text.encode())
    for digest in hash_arrays(arrays):
        h.update(digest)
    return h.hexdigest()


@functools.lru_cache(maxsize=1)
def source_stamp() -> str:
    """Digest of the Python sources of graphc, passes and backends (they generate the code)."""
    import backends
    import graphc
    import passes

    h = hashlib.sha256()
    for package in (graphc, passes, backends):
        root = Path(package.__file__).parent
        for path in sorted(root.rglob("*.py")):
            h.update(str(path.relative_to(root.parent)).encode() + b"\0")
            h.update(path.read_bytes())
    return h.hexdigest()


def digest_of(*parts) -> str:
    """Hex SHA-256 of JSON-serialisable ``parts`` (a cache key)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def environment(target) -> dict:
    """What besides the graph decides the generated code (see the module docstring)."""
    import llvmlite
    import llvmlite.binding as llvm

    import graphc
    from backends.llvm.runtime import available_cores, profiling_requested

    return {"format": CACHE_FORMAT, "triple": target.triple, "cpu": target.cpu,
            "features": target.features, "opt": target.speed_level, "cores": available_cores(),
            "graphc": graphc.__version__, "llvmlite": llvmlite.__version__,
            "llvm": list(llvm.llvm_version_info), "sources": source_stamp(),
            "profile": profiling_requested()}


def code_key(graph_digest: str, dims: Mapping[str, int], target) -> str:
    return digest_of("code", graph_digest, sorted(dims.items()), environment(target))


def pipeline_key(graph_digest: str, pipeline: Iterable[str], options) -> str:
    """Key of the optimised graph of an input graph under ``pipeline`` and ``PassOptions``."""
    opts = {"target": options.target, "conv": options.conv,
            "conv_per_node": sorted(options.conv_per_node.items()),
            "training": options.training}
    return digest_of("graph", graph_digest, list(pipeline), opts, CACHE_FORMAT, source_stamp())


# -- entries --------------------------------------------------------------------------------------
class CorruptEntry(Exception):
    """Internal: an entry fails its checks (always turned into a warning and a miss)."""


@dataclass
class CacheEntry:
    """A published, verified entry: its metadata and lazy access to its files."""

    directory: Path
    meta: dict
    arrays: list[str]   # array names, in the order they were stored

    def read_bytes(self, name: str) -> bytes:
        return (self.directory / name).read_bytes()

    def read_text(self, name: str) -> str:
        return self.read_bytes(name).decode()

    def load_array(self, index: int, writable: bool) -> np.ndarray:
        path = self.directory / f"array-{index}.npy"
        if path.stat().st_size < MAPPED_ARRAY_BYTES:
            return np.load(path, allow_pickle=False)
        return np.load(path, mmap_mode="c" if writable else "r", allow_pickle=False)


class CodeCache:
    """One cache directory (see the module docstring). Counts its own hits and misses."""

    def __init__(self, directory: os.PathLike | str | None = None):
        self.directory = Path(directory) if directory is not None else default_cache_dir()
        self.hits = 0
        self.misses = 0
        self.stores = 0

    def __repr__(self) -> str:
        return (f"<CodeCache {self.directory} hits={self.hits} misses={self.misses} "
                f"stores={self.stores}>")

    def entry_dir(self, kind: str, key: str) -> Path:
        return self.directory / kind / key

    # -- reading ---------------------------------------------------------------------------------
    def load(self, kind: str, key: str) -> CacheEntry | None:
        """The verified entry, or None (a miss; a corrupt entry is also removed)."""
        directory = self.entry_dir(kind, key)
        try:
            manifest = json.loads((directory / MANIFEST).read_bytes())
        except (FileNotFoundError, NotADirectoryError):
            self.misses += 1
            return None
        except (OSError, ValueError) as exc:
            self._corrupt(directory, f"unreadable manifest: {exc}")
            return None
        try:
            entry = self._verify(directory, manifest, kind, key)
        except (CorruptEntry, OSError, KeyError, TypeError, ValueError) as exc:
            self._corrupt(directory, str(exc))
            return None
        self.hits += 1
        _touch(directory / MANIFEST)  # "used": eviction goes by last use, not by age
        return entry

    @staticmethod
    def _verify(directory: Path, manifest: dict, kind: str, key: str) -> CacheEntry:
        if (manifest.get("format"), manifest.get("kind"), manifest.get("key")) != (
                CACHE_FORMAT, kind, key):
            raise CorruptEntry("manifest names another format, kind or key")
        for name, info in manifest["files"].items():
            path = directory / name
            if path.stat().st_size != info["size"]:
                raise CorruptEntry(f"'{name}' has {path.stat().st_size} bytes, the manifest "
                                   f"says {info['size']}")
            if info.get("sha256") and hashlib.sha256(path.read_bytes()).hexdigest() != \
                    info["sha256"]:
                raise CorruptEntry(f"'{name}' does not match its checksum")
        return CacheEntry(directory, manifest["meta"], manifest["arrays"])

    def _corrupt(self, directory: Path, reason: str) -> None:
        warnings.warn(f"graphc code cache: entry {directory} is corrupt ({reason}); it is "
                      f"removed and rebuilt", CacheWarning, stacklevel=4)
        self.misses += 1
        self.discard(directory)

    @staticmethod
    def discard(directory: Path) -> None:
        """Remove an entry: renamed away first (atomic for readers), then deleted."""
        trash = directory.with_name(f".trash-{directory.name}-{os.getpid()}-{id(directory)}")
        try:
            os.rename(directory, trash)
        except OSError:
            return
        shutil.rmtree(trash, ignore_errors=True)

    # -- writing ---------------------------------------------------------------------------------
    def store(self, kind: str, key: str, meta: dict, blobs: Mapping[str, bytes],
              arrays: Mapping[str, np.ndarray]) -> bool:
        """Publish an entry atomically; False (with a ``CacheWarning``) if it cannot be written."""
        final = self.entry_dir(kind, key)
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".tmp-{key[:16]}-", dir=final.parent))
        except OSError as exc:
            warnings.warn(f"graphc code cache: cannot write to {self.directory} ({exc}); "
                          f"compiled code is not cached", CacheWarning, stacklevel=3)
            return False
        try:
            files = self._write_files(staging, blobs, arrays)
            manifest = {"format": CACHE_FORMAT, "kind": kind, "key": key, "files": files,
                        "arrays": list(arrays), "meta": meta}
            (staging / MANIFEST).write_text(json.dumps(manifest))
            self._publish(staging, final)
            self.evict(keep=final)
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            warnings.warn(f"graphc code cache: cannot write entry {final} ({exc}); compiled "
                          f"code is not cached", CacheWarning, stacklevel=3)
            return False
        self.stores += 1
        return True

    @staticmethod
    def _write_files(staging: Path, blobs: Mapping[str, bytes],
                     arrays: Mapping[str, np.ndarray]) -> dict:
        files = {}
        for name, data in blobs.items():
            (staging / name).write_bytes(data)
            files[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        for index, array in enumerate(arrays.values()):
            name = f"array-{index}.npy"
            np.save(staging / name, np.ascontiguousarray(array), allow_pickle=False)
            files[name] = {"size": (staging / name).stat().st_size}
        return files

    @staticmethod
    def _publish(staging: Path, final: Path) -> None:
        try:
            os.rename(staging, final)
        except OSError:
            if not (final / MANIFEST).exists():
                raise
            shutil.rmtree(staging, ignore_errors=True)  # another process published it first

    # -- size ------------------------------------------------------------------------------------
    def entries(self) -> list[tuple[Path, int, float]]:
        """Every published entry: (directory, bytes, last use), least recently used first."""
        found = []
        for kind in KINDS:
            try:
                directories = list((self.directory / kind).iterdir())
            except OSError:
                continue
            for directory in directories:
                if directory.name.startswith("."):  # staging or trash of some process
                    continue
                try:
                    used = (directory / MANIFEST).stat().st_mtime
                    size = sum(f.stat().st_size for f in directory.iterdir())
                except OSError:  # half-written, or removed meanwhile
                    continue
                found.append((directory, size, used))
        return sorted(found, key=lambda e: e[2])

    def evict(self, keep: Path | None = None, limit: int | None = None) -> int:
        """Remove least recently used entries (never ``keep``) until the cache holds at most
        ``limit`` bytes (default ``cache_limit()``); returns how many were removed."""
        limit = cache_limit() if limit is None else limit
        entries = self.entries()
        total = sum(size for _, size, _ in entries)
        removed = 0
        for directory, size, _ in entries:
            if total <= limit:
                break
            if keep is not None and directory == keep:
                continue
            self.discard(directory)
            total -= size
            removed += 1
        return removed

    def clear(self) -> int:
        """Remove every entry; returns how many."""
        entries = self.entries()
        for directory, _, _ in entries:
            self.discard(directory)
        return len(entries)

    def info(self) -> str:
        entries = self.entries()
        counts = {kind: sum(d.parent.name == kind for d, _, _ in entries) for kind in KINDS}
        total = sum(size for _, size, _ in entries)
        return (f"location: {self.directory}\n"
                f"entries: {len(entries)} ({', '.join(f'{n} {k}' for k, n in counts.items())})\n"
                f"size: {_format_bytes(total)} of {_format_bytes(cache_limit())} "
                f"({ENV_MAX})")

    # -- the optimised graph ---------------------------------------------------------------------
    def store_graph(self, key: str, graph: Graph, digest: str, inputs_of: Graph) -> bool:
        """Store optimised ``graph`` (fingerprint ``digest``) compiled from ``inputs_of``."""
        shared = {id(a): name for name, a in inputs_of.constant_arrays().items()}
        arrays: dict[str, np.ndarray] = {}
        try:
            pickled = _ArrayPickler.to_bytes(_graph_payload(graph), shared, arrays)
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            warnings.warn(f"graphc code cache: graph '{graph.name}' cannot be stored ({exc})",
                          CacheWarning, stacklevel=3)
            return False
        structure, _ = graph_structure(graph)
        meta = {"digest": digest,
                "structure": hashlib.sha256(structure.encode()).hexdigest()}
        return self.store("graph", key, meta, {"graph.pkl": pickled}, arrays)

    def load_graph(self, key: str, inputs_of: Graph) -> tuple[Graph, str] | None:
        """The optimised graph and its fingerprint, or None (miss)."""
        entry = self.load("graph", key)
        if entry is None:
            return None
        try:
            payload = _ArrayUnpickler.from_entry(entry, inputs_of.constant_arrays())
            graph = _graph_from_payload(payload)
            structure, _ = graph_structure(graph)
        except (OSError, ValueError, KeyError, pickle.UnpicklingError, EOFError,
                AttributeError, ImportError) as exc:
            self.hits -= 1
            self._corrupt(entry.directory, f"cannot rebuild the graph: {exc}")
            return None
        if hashlib.sha256(structure.encode()).hexdigest() != entry.meta["structure"]:
            self.hits -= 1
            self._corrupt(entry.directory, "the rebuilt graph differs from the stored one")
            return None
        return graph, entry.meta["digest"]


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:  # a read-only cache still serves hits
        pass


def _format_bytes(n: int) -> str:
    for unit in ("G", "M", "K"):
        if n >= SIZE_UNITS[unit]:
            return f"{n / SIZE_UNITS[unit]:.1f} {unit}iB"
    return f"{n} B"


def _graph_payload(graph: Graph) -> dict:
    nodes = [(n.op, n.inputs, dict(n.attrs), n.outputs, n.name, n.types) for n in graph.nodes()]
    return {"name": graph.name, "inputs": list(graph.inputs), "nodes": nodes,
            "outputs": list(graph.outputs)}


def _graph_from_payload(payload: dict) -> Graph:
    """Rebuild in ``nodes()`` order -- Input nodes included, where they were: ``nodes()`` keeps
    insertion order, so adding every input first would print (and fingerprint) differently --
    then restore the order of the graph's input list."""
    graph = Graph(payload["name"])
    for op, inputs, attrs, outputs, name, types in payload["nodes"]:
        if op == INPUT:
            graph.add_input(name, types[0])
        else:
            graph.add_node(op, inputs, attrs, outputs=outputs, name=name, types=types)
    if sorted(graph.inputs) != sorted(payload["inputs"]):
        raise ValueError("the stored inputs do not match the stored Input nodes")
    graph.inputs[:] = payload["inputs"]
    graph.set_outputs(payload["outputs"])
    return graph


class _ArrayPickler(pickle.Pickler):
    """Pickles arrays by reference: an input graph's array by name, a big one as a .npy file."""

    def __init__(self, file, shared: dict, arrays: dict):
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.shared, self.arrays = shared, arrays

    def persistent_id(self, obj):
        if not isinstance(obj, np.ndarray):
            return None
        if id(obj) in self.shared:
            return ("input", self.shared[id(obj)])
        if obj.nbytes >= MAPPED_ARRAY_BYTES:
            index = len(self.arrays)
            self.arrays[f"{index}"] = obj
            return ("file", index)
        return None

    @classmethod
    def to_bytes(cls, payload, shared: dict, arrays: dict) -> bytes:
        buffer = io.BytesIO()
        cls(buffer, shared, arrays).dump(payload)
        return buffer.getvalue()


class _ArrayUnpickler(pickle.Unpickler):
    def __init__(self, file, entry: CacheEntry, inputs: dict):
        super().__init__(file)
        self.entry, self.inputs = entry, inputs

    def persistent_load(self, pid):
        kind, ref = pid
        if kind == "input":
            return self.inputs[ref]
        return self.entry.load_array(int(ref), writable=False)

    @classmethod
    def from_entry(cls, entry: CacheEntry, inputs: dict):
        return cls(io.BytesIO(entry.read_bytes("graph.pkl")), entry, inputs).load()
