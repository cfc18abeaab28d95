"""Static memory planning: every intermediate value of a graph gets an offset in one arena.

Shared by the CPU (LLVM) and CUDA backends. Given an optimised graph, the concrete size of each
symbolic dim (``{"N": 8}``) and an execution order, ``plan_memory`` decides where each value
lives:

* ``input`` / ``constant``: the caller's feed or the weight itself (never written);
* ``output``: the caller's buffer for a graph output (values that only feed it through views or
  in-place updates are computed straight into it, so no final copy is needed);
* ``arena``: an offset in ONE buffer of ``arena_bytes``, allocated once per model run.

Lifetimes. Steps are positions in the execution order (Input/Constant/Param nodes take no step).
A value is live from the step of its producer to the step of its last reader, inclusive; graph
outputs stay live to the end, and an unread value still needs a buffer at its producer's step.
A node's operands and results are therefore live together, so no result ever overwrites an
operand unless the plan says so (in-place, below).

Storage sharing. Values that share bytes form a *storage class* (union-find); a class is placed
as one block whose lifetime is the union of its members'. Two ways to join a class:

* **views** (``VIEW_OPS``: Reshape, Flatten, Squeeze, Unsqueeze, Identity, inference-mode
  Dropout) reinterpret their input's contiguous row-major bytes, so the result joins the input's
  class and no copy is made; a chain of views extends the root's lifetime to the last reader of
  any of them.
* **in-place**: a node may write its single result over operand ``i`` when its in-place rule
  allows that slot, the operand has exactly the result's (resolved) type, and the operand's whole
  class dies at this node (no later reader of any member, and no other operand of this node in the
  class other than the same value, as in ``Mul(x, x)``). The default rule, ``inplace_operands``,
  is keyed by the registry's fusion kind: every operand of ``elementwise`` and ``broadcast`` ops
  (an output element reads only the same element of an operand of the output's shape, so a
  pointwise loop is correct when the two pointers are equal). ``inplace_with_residual`` adds the
  residual slot ``Z`` of epilogue ops (FusedConv, ConvGemm, FusedGemm, WinogradOutput: ``y =
  act(acc + bias + Z)``); it is opt-in because it is only correct for a kernel that reads
  ``Z[i]`` before anything is written to ``y[i]`` -- one that accumulates the product in ``y``
  first and adds ``Z`` afterwards would read its own partial sums.
  Contract for kernels: a node whose result has ``reuse == "inplace"`` is called with the result
  pointer equal to that operand's pointer (``MemoryPlan.inplace_nodes()`` lists them), so its
  kernel must not assume the two are disjoint (no ``noalias`` on that pair). Backends pass
  ``inplace=False`` to turn it off, or their own rule ``(graph, node) -> operand slots``.

Never written in place or computed into: ``input`` and ``constant`` storage. A class holds at
most one graph output; a view or in-place result that would break either rule gets its own
buffer instead (the backend then copies). A graph output that is itself an input or constant
keeps that storage (the backend copies it to the caller's buffer).

Placement. Arena classes are placed by two greedy offline heuristics of Pisarchyk & Lee (2020,
"Efficient memory management for deep neural net inference", as in TFLite's arena planner), and
the smaller arena is kept (``strategy="best"``): *greedy by size* places the largest block
first, *greedy by breadth* the blocks of the step with the most live bytes first; both put each
block into the smallest gap left by the already placed blocks that overlap it in time, else
above them all. Offsets are multiples of ``alignment`` (64 bytes: one AVX-512 vector, one cache
line); block sizes are rounded up to it. The overlap lists come from one sweep over the
intervals, so planning costs O(n log n + K) for n classes and K pairs of classes live at the same
time. ``peak_live_bytes`` (the most bytes live at one step) is a lower bound of the arena; the
report shows how close the placement came.

Usage (a backend)::

    plan = plan_memory(compiled.graph, {"N": 8})   # order defaults to graph.nodes()
    plan.check()                                   # optional; cheap
    arena = allocate(plan.arena_bytes, plan.alignment)
    for name in plan.order:                        # one kernel call per step
        node = graph.node(name)                    # each operand/result v of it lives at
        p = plan[node.output]                      # plan[v].storage/.buffer/.offset; a result
        if p.reuse == "view": continue             # that is a view needs no kernel at all

Invariants (``MemoryPlan.check`` verifies them against liveness recomputed from the graph): no two
values of different classes that are live at the same step share a byte; every view shares its
input's bytes exactly; an in-place write only happens when every other member of the class is
dead; arena offsets are aligned and within ``arena_bytes``; external storage belongs to exactly
one class; the summary numbers match the layout.
"""

from __future__ import annotations

import bisect
import heapq
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from graphc.errors import GraphcError
from graphc.ir import CONSTANT_OPS, INPUT, Graph, Node
from graphc.ops import registry
from graphc.types import TensorType

ALIGNMENT = 64  # bytes: an AVX-512 register and a cache line
VIEW_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Dropout"})
INPLACE_KINDS = frozenset({"elementwise", "broadcast"})  # every operand slot may be overwritten
RESIDUAL_SLOT = "Z?"  # the epilogue's residual operand (see graphc/ops/epilogue.py)
STORAGES = ("arena", "output", "input", "constant")
REUSES = ("own", "view", "inplace")
MB = 1e6

InplaceRule = Callable[[Graph, Node], Sequence[int]]


class MemoryPlanError(GraphcError):
    """A plan cannot be made (bad dims or order) or a plan breaks an invariant (``check``)."""


# -- op capabilities ------------------------------------------------------------------------------
def is_view(graph: Graph, node: Node) -> bool:
    """True if ``node``'s first result is its first operand's bytes reinterpreted (no copy)."""
    if node.op not in VIEW_OPS:
        return False
    if node.op == "Dropout":
        from passes.canonicalize import dropout_is_identity

        return dropout_is_identity(graph, node)
    return True


def inplace_operands(graph: Graph, node: Node) -> tuple[int, ...]:
    """Operand slots that ``node`` may overwrite with its result: the default rule (pointwise ops).

    The planner still requires the operand to have the result's exact type and to die here.
    """
    if node.op == "BatchNormalization" and node.attrs.get("training_mode", 0):
        return ()  # batch statistics read the whole input before any output is written
    if registry.get(node.op, node.name).kind in INPLACE_KINDS:
        return tuple(range(len(node.inputs)))
    return ()


def inplace_with_residual(graph: Graph, node: Node) -> tuple[int, ...]:
    """``inplace_operands`` plus the residual slot ``Z`` of epilogue ops, for backends whose
    epilogue kernels read ``Z[i]`` before writing ``y[i]`` (see the module docstring)."""
    opdef = registry.get(node.op, node.name)
    if opdef.epilogue_bias_axis is not None and RESIDUAL_SLOT in opdef.inputs:
        return (opdef.inputs.index(RESIDUAL_SLOT),)
    return inplace_operands(graph, node)


# -- the plan -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ValuePlan:
    """Where one value lives.

    ``offset`` is the byte offset in the arena (``storage == "arena"``), else 0 in the external
    buffer named by ``buffer`` (a graph input, constant or output value). ``alias_of`` is the
    operand whose bytes this value shares (``reuse`` "view" or "inplace"), None for "own".
    ``start``/``end`` are its live steps (-1 for inputs and constants, which precede step 0).
    """

    value: str
    node: str
    op: str
    type: TensorType
    nbytes: int
    storage: str
    buffer: str | None
    offset: int
    alias_of: str | None
    reuse: str
    start: int
    end: int

    @property
    def interval(self) -> tuple[int, int]:
        return self.start, self.end


@dataclass
class MemoryPlan:
    """A static memory plan; see the module docstring for its invariants.

    ``order`` holds the executed node names (step i runs ``order[i]``). ``no_reuse_bytes`` is
    what giving every intermediate value (views included) its own aligned buffer would take;
    ``peak_live_bytes`` the most aligned class bytes live at one step (at ``peak_step``), a lower
    bound of ``arena_bytes`` for this plan's sharing decisions.
    """

    graph: Graph
    dims: dict
    order: tuple[str, ...]
    alignment: int
    values: dict[str, ValuePlan]
    arena_bytes: int
    peak_live_bytes: int
    peak_step: int
    no_reuse_bytes: int
    stats: dict = field(default_factory=dict)

    def __getitem__(self, value: str) -> ValuePlan:
        try:
            return self.values[value]
        except KeyError:
            raise MemoryPlanError(f"the memory plan has no value '{value}'") from None

    def offset(self, value: str) -> int:
        return self[value].offset

    def arena_values(self) -> list[ValuePlan]:
        return [p for p in self.values.values() if p.storage == "arena"]

    def inplace_nodes(self) -> dict[str, str]:
        """Node name -> the operand it overwrites (kernels must not mark that pair noalias)."""
        return {p.node: p.alias_of for p in self.values.values() if p.reuse == "inplace"}

    @property
    def n_classes(self) -> int:
        """Storage classes placed in the arena (values that own their bytes)."""
        return sum(1 for p in self.arena_values() if p.reuse == "own")

    def report(self, limit: int | None = None) -> str:
        return format_report(self, limit)

    def check(self) -> None:
        """Raise MemoryPlanError if the plan breaks an invariant (see the module docstring)."""
        check_plan(self)


# -- entry point ----------------------------------------------------------------------------------
def plan_memory(graph: Graph, dims: Mapping[str, int] | None = None,
                order: Iterable[Node | str] | None = None, *, alignment: int = ALIGNMENT,
                views: bool = True, inplace: bool | InplaceRule = True,
                strategy: str = "best") -> MemoryPlan:
    """Plan the memory of ``graph`` executed in ``order`` (default ``graph.nodes()``).

    ``dims`` gives every symbolic dim a size. ``views=False`` copies views; ``inplace`` is True
    (rule ``inplace_operands``), False (no in-place) or a rule ``(graph, node) -> slots`` such
    as ``inplace_with_residual``. ``strategy`` is a key of ``STRATEGIES`` or "best" (run each,
    keep the smallest arena).
    """
    if strategy != "best" and strategy not in STRATEGIES:
        raise MemoryPlanError(f"unknown strategy '{strategy}'; choose one of "
                              f"{', '.join(['best', *STRATEGIES])}")
    if not isinstance(alignment, int) or alignment < 1 or alignment & (alignment - 1):
        raise MemoryPlanError(f"alignment must be a power of two, got {alignment!r}")
    dims = check_dims(dims)
    steps = executed_nodes(graph, order)
    types = resolved_types(graph, dims)
    start, end = liveness(graph, steps)
    if not (isinstance(inplace, bool) or callable(inplace)):
        raise MemoryPlanError(f"inplace must be True, False or a rule, got {inplace!r}")
    rule = inplace_operands if inplace is True else (inplace or None)
    classes = _StorageClasses.build(graph, steps, types, start, end, views, rule)
    blocks = classes.arena_blocks(alignment)
    strategy, offsets, arena = place_blocks(blocks, alignment, strategy)
    peak, peak_step = peak_live(blocks)
    values = _value_plans(graph, types, start, end, classes, offsets)
    no_reuse = sum(_align(p.nbytes, alignment) for p in values.values()
                   if p.start >= 0 and p.value not in graph.outputs)
    stats = {"views": classes.n_views, "inplace": classes.n_inplace, "blocks": len(blocks),
             "strategy": strategy}
    return MemoryPlan(graph, dict(dims), tuple(n.name for n in steps), alignment, values,
                      arena, peak, peak_step, no_reuse, stats)


# -- inputs of the planner ------------------------------------------------------------------------
def check_dims(dims: Mapping[str, int] | None) -> dict[str, int]:
    out = {}
    for name, size in (dims or {}).items():
        if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 0:
            raise MemoryPlanError(f"dim '{name}' must be a non-negative int, got {size!r}")
        out[str(name)] = int(size)
    return out


def executed_nodes(graph: Graph, order: Iterable[Node | str] | None = None) -> list[Node]:
    """The nodes that take a step, in ``order``; MemoryPlanError unless it is a topological
    order of all of them (Input/Constant/Param nodes may be listed or left out)."""
    if order is None:
        order = graph.nodes()
    steps, seen = [], set()
    for item in order:
        name = item.name if isinstance(item, Node) else item
        if not isinstance(name, str) or name not in graph.nx:
            raise MemoryPlanError(f"order names {name!r}, which is not a node of graph "
                                  f"'{graph.name}'")
        node = graph.node(name)
        if node.op == INPUT or node.op in CONSTANT_OPS:
            continue
        if name in seen:
            raise MemoryPlanError(f"order lists node '{name}' twice")
        _check_ready(graph, node, seen)
        seen.add(name)
        steps.append(node)
    missing = [n.name for n in _all_nodes(graph)
               if n.op != INPUT and n.op not in CONSTANT_OPS and n.name not in seen]
    if missing:
        raise MemoryPlanError(f"order leaves out node(s) {', '.join(map(repr, missing[:5]))}")
    return steps


def _check_ready(graph: Graph, node: Node, done: set) -> None:
    for v in node.inputs:
        if v is None:
            continue
        producer = graph.producer(v)
        if producer.op != INPUT and producer.op not in CONSTANT_OPS and producer.name not in done:
            raise MemoryPlanError(f"order runs node '{node.name}' before '{producer.name}', "
                                  f"which produces its input '{v}'")


def _all_nodes(graph: Graph) -> list[Node]:
    """Every node, in insertion order (cheaper than ``graph.nodes()``' topological sort)."""
    return [data["node"] for data in graph.nx.nodes.values()]


def resolved_types(graph: Graph, dims: Mapping[str, int]) -> dict[str, TensorType]:
    """Every value's type with symbolic dims replaced by their sizes."""
    types = {}
    for node in _all_nodes(graph):
        for value, t in zip(node.outputs, node.types):
            if value is not None:
                types[value] = _resolve(t, dims, value)
    return types


def _resolve(t: TensorType, dims: Mapping[str, int], value: str) -> TensorType:
    if t.is_static:
        return t
    shape = []
    for d in t.shape:
        if isinstance(d, str) and d not in dims:
            raise MemoryPlanError(f"value '{value}' has type {t}: give symbolic dim '{d}' a "
                                  f"size (dims={{'{d}': ...}})")
        shape.append(dims[d] if isinstance(d, str) else d)
    return t.with_shape(shape)


def nbytes(t: TensorType) -> int:
    return t.numel * t.np_dtype.itemsize


def liveness(graph: Graph, steps: Sequence[Node]) -> tuple[dict[str, int], dict[str, int]]:
    """First and last live step of every value (inputs and constants start at -1)."""
    start: dict[str, int] = {}
    end: dict[str, int] = {}
    for node in _all_nodes(graph):
        if node.op == INPUT or node.op in CONSTANT_OPS:
            start[node.output] = end[node.output] = -1
    for step, node in enumerate(steps):
        for v in node.inputs:
            if v is not None:
                end[v] = step
        for v in node.outputs:
            if v is not None:
                start[v] = end[v] = step
    for v in graph.outputs:
        end[v] = len(steps)
    return start, end


def _align(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


# -- storage classes ------------------------------------------------------------------------------
@dataclass
class Block:
    """One arena storage class to place: its class id, aligned size and live steps."""

    id: str
    size: int
    start: int
    end: int


class _StorageClasses:
    """Union-find over values that share bytes; each root knows its class's storage."""

    def __init__(self, start: dict[str, int], end: dict[str, int]):
        self.parent: dict[str, str] = {}
        self.storage: dict[str, str] = {}    # root -> one of STORAGES
        self.buffer: dict[str, str | None] = {}  # root -> external buffer's value name
        self.last: dict[str, int] = {}       # root -> last live step of any member
        self.nbytes: dict[str, int] = {}     # root -> bytes
        self.alias_of: dict[str, str] = {}   # value -> operand it shares, for views/in-place
        self.reuse: dict[str, str] = {}
        self.start, self.end = start, end
        self.n_views = self.n_inplace = 0

    @classmethod
    def build(cls, graph, steps, types, start, end, views, rule) -> _StorageClasses:
        classes = cls(start, end)
        for node in _all_nodes(graph):
            if node.op == INPUT or node.op in CONSTANT_OPS:
                storage = "input" if node.op == INPUT else "constant"
                classes.new(node.output, storage, node.output, nbytes(types[node.output]))
        outputs = set(graph.outputs)
        for step, node in enumerate(steps):
            classes.add_results(graph, node, step, types, outputs, views, rule)
        return classes

    def find(self, v: str) -> str:
        root = v
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[v] != root:  # path compression
            self.parent[v], v = root, self.parent[v]
        return root

    def new(self, v: str, storage: str, buffer: str | None, size: int) -> None:
        self.parent[v] = v
        self.storage[v], self.buffer[v] = storage, buffer
        self.last[v], self.nbytes[v] = self.end[v], size
        self.reuse[v] = "own"

    def join(self, v: str, operand: str, reuse: str, is_output: bool) -> None:
        root = self.find(operand)
        self.parent[v] = root
        self.last[root] = max(self.last[root], self.end[v])
        if is_output:
            self.storage[root], self.buffer[root] = "output", v
        self.alias_of[v], self.reuse[v] = operand, reuse
        if reuse == "view":
            self.n_views += 1
        else:
            self.n_inplace += 1

    def add_results(self, graph, node, step, types, outputs, views, rule) -> None:
        for index, v in enumerate(node.outputs):
            if v is None:
                continue
            is_output = v in outputs
            if index == 0 and views and is_view(graph, node):
                if self._may_join(node.inputs[0], nbytes(types[v]), is_output):
                    self.join(v, node.inputs[0], "view", is_output)
                    continue
            elif index == 0 and rule is not None and _single_result(node):
                operand = self._inplace_operand(graph, node, step, types, rule)
                if operand is not None:
                    self.join(v, operand, "inplace", is_output)
                    continue
            self.new(v, "output" if is_output else "arena", v if is_output else None,
                     nbytes(types[v]))

    def _may_join(self, operand: str, size: int, is_output: bool) -> bool:
        """A view may share ``operand``'s class unless it is a graph output that would land in
        the caller's input, a constant, or a class that already holds another output."""
        root = self.find(operand)
        return self.nbytes[root] == size and (not is_output or self.storage[root] == "arena")

    def _inplace_operand(self, graph, node, step, types, rule) -> str | None:
        v = node.output
        for i in rule(graph, node):
            x = node.inputs[i] if 0 <= i < len(node.inputs) else None
            if x is None or types[x] != types[v]:
                continue
            root = self.find(x)
            # feeds and weights are never written; an output's class lives to the end, so it
            # never dies here either
            if self.storage[root] != "arena" or self.last[root] != step:
                continue
            others = [u for j, u in enumerate(node.inputs) if j != i and u is not None and u != x]
            if any(self.find(u) == root for u in others):
                continue
            return x
        return None

    def arena_blocks(self, alignment: int) -> list[Block]:
        roots = [v for v in self.parent if self.parent[v] == v and self.storage[v] == "arena"]
        return [Block(r, _align(self.nbytes[r], alignment), self.start[r], self.last[r])
                for r in roots]


def _single_result(node: Node) -> bool:
    return sum(1 for o in node.outputs if o is not None) == 1


# -- placement ------------------------------------------------------------------------------------
def overlapping_pairs(blocks: Sequence[Block]) -> dict[str, list[Block]]:
    """For each block, the blocks live at some common step (one sweep: O(n log n + K))."""
    neighbours: dict[str, list[Block]] = {b.id: [] for b in blocks}
    active: list[tuple[int, int, Block]] = []  # (end, tie-break, block) heap
    for i, b in enumerate(sorted(blocks, key=lambda b: (b.start, b.end, b.id))):
        while active and active[0][0] < b.start:
            heapq.heappop(active)
        for _, _, other in active:
            neighbours[b.id].append(other)
            neighbours[other.id].append(b)
        heapq.heappush(active, (b.end, i, b))
    return neighbours


def place_greedy_by_size(blocks: Sequence[Block], alignment: int) -> dict[str, int]:
    """Offsets by greedy-by-size with best fit: largest block first, into the smallest gap left
    by the already placed blocks that overlap it in time (else above them)."""
    neighbours = overlapping_pairs(blocks)
    offsets: dict[str, int] = {}
    for b in sorted(blocks, key=lambda b: (-b.size, b.start, b.id)):
        placed = sorted((offsets[o.id], o.size) for o in neighbours[b.id] if o.id in offsets)
        offsets[b.id] = _best_fit(placed, b.size, alignment)
    return offsets


def place_greedy_by_breadth(blocks: Sequence[Block], alignment: int) -> dict[str, int]:
    """Offsets by greedy-by-breadth with best fit: the blocks of the step with the most live
    bytes first (largest first within a step), then those of the next fullest step, ..."""
    neighbours = overlapping_pairs(blocks)
    breadth = live_bytes_per_step(blocks)
    fullest = RangeMax(breadth)
    priority = {b.id: fullest.query(b.start, b.end) for b in blocks}
    offsets: dict[str, int] = {}
    for b in sorted(blocks, key=lambda b: (-priority[b.id][0], priority[b.id][1], -b.size,
                                           b.start, b.id)):
        placed = sorted((offsets[o.id], o.size) for o in neighbours[b.id] if o.id in offsets)
        offsets[b.id] = _best_fit(placed, b.size, alignment)
    return offsets


STRATEGIES = {"size": place_greedy_by_size, "breadth": place_greedy_by_breadth}


def place_blocks(blocks: Sequence[Block], alignment: int,
                 strategy: str) -> tuple[str, dict[str, int], int]:
    """(strategy used, offsets, arena bytes); "best" keeps the smallest arena (ties: first)."""
    best = None
    for name in STRATEGIES if strategy == "best" else (strategy,):
        offsets = STRATEGIES[name](blocks, alignment)
        arena = _align(max((offsets[b.id] + b.size for b in blocks), default=0), alignment)
        if best is None or arena < best[2]:
            best = (name, offsets, arena)
    return best


def _best_fit(placed: Sequence[tuple[int, int]], size: int, alignment: int) -> int:
    """Lowest-waste aligned offset for ``size`` bytes among (offset, size) blocks sorted by
    offset (they may overlap each other: they need not be live together)."""
    best_offset, best_gap, top = None, None, 0
    for offset, length in placed:
        candidate = _align(top, alignment)
        gap = offset - candidate
        if gap >= size and (best_gap is None or gap < best_gap):
            best_offset, best_gap = candidate, gap
        top = max(top, offset + length)
    return best_offset if best_offset is not None else _align(top, alignment)


def live_bytes_per_step(blocks: Sequence[Block]) -> list[int]:
    """Block bytes live at each step 0..last step (a prefix sum of +size/-size events)."""
    steps = max((b.end for b in blocks), default=-1) + 2
    delta = [0] * steps
    for b in blocks:
        delta[b.start] += b.size
        delta[b.end + 1] -= b.size
    live, total = [], 0
    for d in delta[:-1]:
        total += d
        live.append(total)
    return live


class RangeMax:
    """Sparse table: the largest value (and its first index) of any range in O(1) after an
    O(n log n) build, so that ranking blocks by their fullest step stays O(n log n)."""

    def __init__(self, values: Sequence[int]):
        self.levels = [[(v, -i) for i, v in enumerate(values)]]
        width = 1
        while 2 * width <= len(values):
            prev = self.levels[-1]
            self.levels.append([max(prev[i], prev[i + width])
                                for i in range(len(values) - 2 * width + 1)])
            width *= 2

    def query(self, lo: int, hi: int) -> tuple[int, int]:
        """(max of values[lo..hi], the first index holding it); lo <= hi."""
        level = (hi - lo + 1).bit_length() - 1
        row = self.levels[level]
        value, neg_index = max(row[lo], row[hi - (1 << level) + 1])
        return value, -neg_index


def peak_live(blocks: Sequence[Block]) -> tuple[int, int]:
    """Most block bytes live at one step, and the first step where that happens."""
    delta: dict[int, int] = {}
    for b in blocks:
        delta[b.start] = delta.get(b.start, 0) + b.size
        delta[b.end + 1] = delta.get(b.end + 1, 0) - b.size
    live = peak = 0
    peak_step = -1
    for step in sorted(delta):
        live += delta[step]
        if live > peak:
            peak, peak_step = live, step
    return peak, peak_step


def _value_plans(graph, types, start, end, classes, offsets) -> dict[str, ValuePlan]:
    producers = {v: n for n in _all_nodes(graph) for v in n.outputs if v is not None}
    plans = {}
    for v in classes.parent:
        root = classes.find(v)
        storage = classes.storage[root]
        node = producers[v]
        plans[v] = ValuePlan(
            v, node.name, node.op, types[v], nbytes(types[v]), storage,
            classes.buffer[root], offsets[root] if storage == "arena" else 0,
            classes.alias_of.get(v), classes.reuse[v], start[v], end[v])
    return plans


# -- checking -------------------------------------------------------------------------------------
def check_plan(plan: MemoryPlan) -> None:
    """Verify ``plan`` against liveness and types recomputed from its graph and order."""
    graph = plan.graph
    steps = executed_nodes(graph, plan.order)
    types = resolved_types(graph, plan.dims)
    start, end = liveness(graph, steps)
    problems: list[str] = []
    _check_values(plan, types, start, end, problems)
    if not problems:
        roots = _alias_roots(plan, problems)
        _check_sharing(plan, roots, problems)
        _check_storage(plan, roots, problems)
        _check_arena(plan, roots, problems)
    if problems:
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        raise MemoryPlanError(f"memory plan of graph '{graph.name}' is invalid: "
                              + "; ".join(problems[:10]) + more)


def _check_values(plan, types, start, end, problems) -> None:
    missing = sorted(set(types) - set(plan.values))
    extra = sorted(set(plan.values) - set(types))
    if missing or extra:
        problems.append(f"values missing {missing[:5]}, unknown {extra[:5]}")
        return
    for v, p in plan.values.items():
        producer = plan.graph.producer(v)
        if (p.value, p.node, p.op) != (v, producer.name, producer.op):
            problems.append(f"'{v}' is said made by {p.op} '{p.node}'")
        if p.nbytes != nbytes(types[v]) or p.type != types[v]:
            problems.append(f"'{v}' has {p.nbytes} bytes of {p.type}, expected {types[v]}")
        if (p.start, p.end) != (start[v], end[v]):
            problems.append(f"'{v}' is said live {p.start}..{p.end}, but is {start[v]}..{end[v]}")
        if p.storage not in STORAGES or p.reuse not in REUSES:
            problems.append(f"'{v}' has storage '{p.storage}' and reuse '{p.reuse}'")
        if (p.reuse == "own") != (p.alias_of is None) or (p.alias_of and p.alias_of not in types):
            problems.append(f"'{v}' has reuse '{p.reuse}' but alias_of {p.alias_of!r}")


def _alias_roots(plan, problems) -> dict[str, str]:
    """Value -> root of its chain of ``alias_of`` links (a cycle is reported)."""
    roots: dict[str, str] = {}
    for v in plan.values:
        path, on_path, u = [], set(), v
        while u not in roots:
            if u in on_path:
                problems.append(f"alias_of links through '{u}' form a cycle")
                roots[u] = u
                break
            path.append(u)
            on_path.add(u)
            if plan.values[u].alias_of is None:
                roots[u] = u
                break
            u = plan.values[u].alias_of
        for c in path:
            roots[c] = roots[u]
    return roots


def _check_sharing(plan, roots, problems) -> None:
    graph, values = plan.graph, plan.values
    members: dict[str, list[ValuePlan]] = {}
    for v, r in roots.items():
        members.setdefault(r, []).append(values[v])
    lifetimes = {r: _ClassLifetimes(ms) for r, ms in members.items()}
    for v, p in values.items():
        if p.alias_of is None:
            continue
        x = values[p.alias_of]
        node = graph.node(p.node)
        if (x.storage, x.buffer, x.offset, x.nbytes) != (p.storage, p.buffer, p.offset, p.nbytes):
            problems.append(f"'{v}' shares '{x.value}' but not its bytes")
        if p.reuse == "view" and (not is_view(graph, node) or node.inputs[0] != x.value
                                  or node.output != v):
            problems.append(f"'{v}' is not a view of '{x.value}'")
        if p.reuse == "inplace":
            _check_inplace(p, x, node, lifetimes[roots[v]], problems)


class _ClassLifetimes:
    """The members of one storage class by first step, with the two latest last steps of each
    prefix, so that "who made before step s is still live at s" is one bisect."""

    def __init__(self, members: Sequence[ValuePlan]):
        ordered = sorted(members, key=lambda p: p.start)
        self.starts = [p.start for p in ordered]
        self.top2: list[tuple[tuple[int, str], ...]] = []
        best: tuple[tuple[int, str], ...] = ()
        for p in ordered:
            best = tuple(sorted((*best, (p.end, p.value)), reverse=True)[:2])
            self.top2.append(best)

    def live_at(self, step: int, besides: str) -> str | None:
        """A member made before ``step``, other than ``besides``, still live at ``step``."""
        k = bisect.bisect_left(self.starts, step)
        for end, value in self.top2[k - 1] if k else ():
            if value != besides:
                return value if end >= step else None
        return None


def _check_inplace(p, x, node, lifetimes: _ClassLifetimes, problems) -> None:
    """Writing ``p`` over operand ``x`` at step s is safe when every other member of the class
    made before s is dead by then (members made later descend from ``p`` in a valid plan, and
    the view checks tie each of them to a reader of an earlier member)."""
    if x.value not in node.inputs or node.output != p.value or x.type != p.type:
        problems.append(f"'{p.value}' cannot overwrite '{x.value}' (not an operand of its type)")
    if x.storage in ("input", "constant") or x.end != p.start:
        problems.append(f"'{p.value}' overwrites '{x.value}' ({x.storage}, live to step "
                        f"{x.end}) at step {p.start}")
    other = lifetimes.live_at(p.start, besides=x.value)
    if other is not None:
        problems.append(f"'{p.value}' overwrites '{other}' in place while '{other}' is still "
                        f"live at step {p.start}")


def _check_storage(plan, roots, problems) -> None:
    graph, values = plan.graph, plan.values
    owner: dict[tuple[str, str], str] = {}
    kinds = {"input": set(graph.inputs), "output": set(graph.outputs),
             "constant": set(graph.constant_arrays())}
    for v, p in values.items():
        producer = graph.producer(v)
        if producer.op == INPUT or producer.op in CONSTANT_OPS:
            want = ("input" if producer.op == INPUT else "constant", v)
            if (p.storage, p.buffer) != want:
                problems.append(f"'{v}' must live in its own {want[0]} storage")
        elif v in graph.outputs and (p.storage, p.buffer) != ("output", v):
            problems.append(f"graph output '{v}' must live in its own output buffer")
        if p.storage in kinds and p.buffer not in kinds[p.storage]:
            problems.append(f"'{v}' lives in {p.storage} '{p.buffer}', which is not a graph "
                            f"{p.storage}")
        if p.storage == "arena" and p.buffer is not None:
            problems.append(f"arena value '{v}' names buffer '{p.buffer}'")
        if p.storage != "arena":
            key = (p.storage, p.buffer)
            if owner.setdefault(key, roots[v]) != roots[v]:
                problems.append(f"{p.storage} buffer '{p.buffer}' holds two storage classes")
            if p.offset != 0:
                problems.append(f"'{v}' has offset {p.offset} in {p.storage} '{p.buffer}'")


def _check_arena(plan, roots, problems) -> None:
    arena = [p for p in plan.values.values() if p.storage == "arena"]
    for p in arena:
        if p.offset % plan.alignment or p.offset < 0 or p.offset + p.nbytes > plan.arena_bytes:
            problems.append(f"'{p.value}' at offset {p.offset} (+{p.nbytes} bytes) is misaligned "
                            f"or outside the arena of {plan.arena_bytes} bytes")
    active: list[tuple[int, int, ValuePlan]] = []
    for i, p in enumerate(sorted(arena, key=lambda p: (p.start, p.end, p.value))):
        while active and active[0][0] < p.start:
            heapq.heappop(active)
        for _, _, q in active:
            if roots[q.value] != roots[p.value] and _bytes_overlap(p, q):
                problems.append(f"'{p.value}' (steps {p.start}..{p.end}, bytes {p.offset}+"
                                f"{p.nbytes}) overlaps '{q.value}' (steps {q.start}..{q.end}, "
                                f"bytes {q.offset}+{q.nbytes})")
        heapq.heappush(active, (p.end, i, p))
    _check_summary(plan, roots, arena, problems)


def _bytes_overlap(p: ValuePlan, q: ValuePlan) -> bool:
    return (p.nbytes > 0 and q.nbytes > 0 and p.offset < q.offset + q.nbytes
            and q.offset < p.offset + p.nbytes)


def _check_summary(plan, roots, arena, problems) -> None:
    if plan.arena_bytes % plan.alignment:
        problems.append(f"arena_bytes {plan.arena_bytes} is not a multiple of {plan.alignment}")
    classes: dict[str, Block] = {}
    for p in arena:
        b = classes.setdefault(roots[p.value], Block(roots[p.value], 0, p.start, p.end))
        b.size = max(b.size, _align(p.nbytes, plan.alignment))
        b.start, b.end = min(b.start, p.start), max(b.end, p.end)
    peak, _ = peak_live(list(classes.values()))
    if peak != plan.peak_live_bytes or peak > plan.arena_bytes:
        problems.append(f"peak live bytes are {peak}, the plan says {plan.peak_live_bytes} "
                        f"(arena {plan.arena_bytes})")


# -- report ---------------------------------------------------------------------------------------
def format_report(plan: MemoryPlan, limit: int | None = None) -> str:
    """The plan as text: a summary, then one line per planned value in execution order."""
    lines = _summary_lines(plan)
    lines.append(f"{'step':>5}  {'value':<28} {'op':<22} {'type':<22} {'bytes':>10}  "
                 f"{'where':<24} {'live':<10} shares")
    planned = sorted((p for p in plan.values.values() if p.start >= 0),
                     key=lambda p: (p.start, p.value))
    for p in planned[:limit]:
        where = f"arena@{p.offset}" if p.storage == "arena" else f"{p.storage}:{p.buffer}"
        shares = f"{p.reuse} of {p.alias_of}" if p.alias_of else ""
        live = f"{p.start}..{p.end}"
        lines.append(f"{p.start:>5}  {p.value:<28} {p.op:<22} {p.type!s:<22} "
                     f"{p.nbytes:>10}  {where:<24} {live:<10} {shares}".rstrip())
    if limit is not None and len(planned) > limit:
        lines.append(f"  ... {len(planned) - limit} more values")
    return "\n".join(lines)


def _summary_lines(plan: MemoryPlan) -> list[str]:
    dims = ", ".join(f"{k}={v}" for k, v in sorted(plan.dims.items())) or "static"
    peak_node = plan.order[plan.peak_step] if 0 <= plan.peak_step < len(plan.order) else "-"
    ratio = plan.no_reuse_bytes / plan.arena_bytes if plan.arena_bytes else float("inf")
    views, inplace = plan.stats.get("views", 0), plan.stats.get("inplace", 0)
    title = (f"memory plan of graph '{plan.graph.name}' ({dims}): {len(plan.order)} steps, "
             f"{plan.alignment}-byte alignment")
    lines = [title]
    strategy = plan.stats.get("strategy", "?")
    lines.append(f"  arena      {plan.arena_bytes / MB:10.3f} MB  {plan.arena_bytes} bytes "
                 f"for {plan.n_classes} storage classes (greedy by {strategy})")
    lines.append(f"  peak live  {plan.peak_live_bytes / MB:10.3f} MB  at step {plan.peak_step} "
                 f"('{peak_node}')")
    lines.append(f"  no reuse   {plan.no_reuse_bytes / MB:10.3f} MB  ({ratio:.1f}x the arena)")
    lines.append(f"  sharing    {views} views, {inplace} in-place; "
                 f"{len(plan.arena_values())} values in the arena")
    return lines
