"""Training API: ``fit``, ``evaluate``, ``predict`` and ``kfold`` for ``graphc.nn`` models.

One training step -- forward, loss, backward, optimiser update -- is ONE graph, compiled ONCE:

    inputs:  x, target, every parameter, every optimiser state array, every BatchNorm buffer,
             Dropout masks, batch_size (BatchNorm), lr (+ Adam's bias corrections)
    outputs: loss, the model's output, then the new value of every carried array (parameters,
             optimiser state, buffers), in that order

The gradient part comes from ``graphc.grad``; the update from ``graphc.optim``. Everything
carried from step to step is a graph input and, in its new value, an output, so the compiled
program does not depend on the values: it is built once per architecture, loss, optimiser kind
and target (and shared across models, e.g. the folds of ``kfold``). Per step the host fills a
feed dict -- or, on target "cpu", patches the batch's addresses into a pointer table prebuilt
for the backend's entry function (``BoundStep``), skipping per-call validation. The carried
arrays live in two preallocated sets used in turn (ping-pong): a step
reads set A and writes the new values straight into set B (``CompiledModel.run(feeds, into=)``),
the next one reads B and writes A, so no step allocates and no Python loop touches parameters.

Targets: "cpu" (with the ``BoundStep`` fast path), "cuda" (the CUDA backend's
``run(feeds, into=)``: the carried arrays round-trip through the host each step, which keeps
``fit``'s ping-pong sets authoritative; device-resident state is later work) and "reference"
(the interpreter).

Batches: ``X`` and the targets are permuted once per epoch (one copy), so every batch is a
contiguous view. A smaller last batch is run as it is (target "cpu" specialises the program for
that batch size once); ``drop_last=True`` skips it instead. Dropout masks are drawn on the host
per step from the fit's seeded Generator (see ``graphc.nn``).

Evaluation and prediction use a second program: the inference forward pass with the arrays as
inputs (so it also serves validation between epochs without recompiling) plus the per-sample
loss. It runs in fixed chunks of ``EVAL_CHUNK`` samples; the last chunk is zero-padded and the
padding dropped, so one specialisation serves every data set size.

Convolutions in these programs use im2col + GEMM (``PROGRAM_CONV``): the Winograd choice of
the inference cost rule assumes constant weights.

Threads: ``threads`` is the most a program may use (None: the backend's default,
``GRAPHC_NUM_THREADS`` or every core). A step of a small model is microseconds of work, where
a barrier between two threads after every kernel costs more than the second thread saves, so a
program of less than ``SMALL_STEP_FLOPS`` per run uses one thread whatever the cap (measured on
the digits MLP, batch 32: 1.05M samples/s on one thread, 0.58M on two) -- as PyTorch and ONNX
Runtime run small ops on one thread below a grain size.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from . import ops
from .compile import compile as compile_graph
from .errors import FeedError, GraphcError
from .flops import flops_by_node
from .ir import Graph
from .losses import Loss, accuracy, get_loss
from .nn import INPUT_NAME, Scope, Sequential, draw_dropout_mask
from .optim import Optimizer, get_optimizer

TARGET_NAME = "target"
EVAL_CHUNK = 256
SMALL_STEP_FLOPS = 50e6
PROGRAM_CACHE_SIZE = 16
# Convolutions of programs whose weights are inputs: im2col + GEMM. The inference cost rule's
# Winograd choice assumes constant weights; here the filter transform runs every step, and on
# small images the batched per-tile MatMuls are slow (digits CNN step, batch 64: 2.7 -> 1.1 ms).
PROGRAM_CONV = "im2col"
BIND_STEPS = True  # re-run CPU steps through prebuilt pointer tables (see BoundStep)


# -- compiled programs ----------------------------------------------------------------------------
class Program:
    """A compiled graph run with outputs written into caller arrays where possible."""

    def __init__(self, graph: Graph, target: str, threads: int | None):
        kwargs = {"threads": threads} if target == "cpu" else {}
        if target == "cpu":
            # gradient-only ops (Step, BroadcastLike, MaxPoolGrad, ...) lower in their own
            # module; importing it registers them (a no-op once backends.lower imports it)
            import backends.lower_grad  # noqa: F401
        self.source = graph
        self.compiled = compile_graph(graph, target=target, conv=PROGRAM_CONV, **kwargs)
        self.outputs = list(self.compiled.graph.outputs)
        self._into = None  # does CompiledModel.run take into=? (learnt on the first run)
        self.runs = 0

    def run(self, feeds: dict, into: list) -> list[np.ndarray]:
        """Run; ``into[i]`` (an array or None) receives output i. Returns every output."""
        self.runs += 1
        if self._into is not False:
            targets = {}
            for name, array in zip(self.outputs, into):
                if array is not None and name not in targets:
                    targets[name] = array
            try:
                results = self.compiled.run(feeds, into=targets)
                self._into = True
            except TypeError as exc:
                if "into" not in str(exc):
                    raise
                self._into = False  # a backend without into=: copy below
            else:
                return self._settle(results, into)
        return self._settle(self.compiled.run(feeds), into)

    @staticmethod
    def _settle(results, into) -> list[np.ndarray]:
        out = []
        for result, array in zip(results, into):
            if array is None:
                out.append(result)
            else:
                if result is not array:
                    np.copyto(array, result)
                out.append(array)
        return out


class BoundStep:
    """Re-runs one CPU specialisation of a step program with prebuilt pointer tables.

    ``CompiledModel.run`` validates every feed and ``into`` array on every call (about a
    millisecond for a step graph's ~30 arrays), which is 10-20x the compute of a small model's
    step. A fit feeds the same arrays every step except the batch, so per batch size and
    ping-pong direction the table of buffer addresses that the backend's entry function reads
    is built once, after checking each array against the specialisation's types; a step then
    patches the batch's slots (x, target, the model-output rows) and makes the one ctypes call.
    This relies on the CPU backend's ``Specialisation`` (``table``, ``external_slots``,
    ``plan``, ``runner``); where those are absent, an array does not fit, or an output is not
    written into its own caller buffer, ``bind`` returns None and the checked path is used.
    """

    def __init__(self, spec, table: np.ndarray, patched: dict[str, list[int]]):
        self.runner, self.table, self.patched = spec.runner, table, patched

    @staticmethod
    def bind(program: Program, dims: dict, arrays: dict[str, np.ndarray],
             per_step: tuple[str, ...]) -> BoundStep | None:
        """``arrays``: buffer name (input or output value) -> the array used for every step
        (checked against the specialisation's types once, here); names in ``per_step`` get
        their address per call (the caller guarantees their shapes: batch slices of arrays it
        prepared)."""
        backend = program.compiled.backend
        spec = backend.specialise(dims) if backend is not None else None
        if spec is None or not all(hasattr(spec, a) for a in ("table", "external_slots",
                                                               "plan", "runner")):
            return None
        graph = program.compiled.graph
        for v in graph.outputs:
            if spec.plan[v].storage != "output" or spec.plan[v].buffer != v:
                return None  # an output aliasing another, an input or a constant: copy path
        table = spec.table.copy()
        patched: dict[str, list[int]] = {}
        for buffer, slots in spec.external_slots.items():
            if buffer in per_step:
                patched[buffer] = list(slots)
                continue
            array = arrays.get(buffer)
            want = spec.plan[buffer].type
            if array is None or not array.flags.c_contiguous or array.dtype != want.np_dtype \
                    or array.shape != tuple(want.shape):
                return None  # not ours to bind: the checked path will say what is wrong
            table[list(slots)] = array.ctypes.data
        return BoundStep(spec, table, patched)

    def run(self, per_step: dict[str, np.ndarray]) -> None:
        table = self.table
        for name, slots in self.patched.items():
            address = per_step[name].ctypes.data
            for i in slots:
                table[i] = address
        self.runner.run(table)


def _pick_threads(model: Sequential, batch: int, target: str, threads: int | None,
                  backward: bool) -> int | None:
    """On target "cpu": 1 below SMALL_STEP_FLOPS of work per run (a backward pass counted as
    twice the forward), else ``threads`` (the cap; None: the backend's default)."""
    if target != "cpu":
        return threads
    per_sample = sum(flops_by_node(model.build()).values())  # symbolic batch: one sample
    return 1 if per_sample * (3 if backward else 1) * batch < SMALL_STEP_FLOPS else threads


@dataclass
class StepLayout:
    """Names in a step graph: what is carried (input name == array name), fed per step, and
    where the outputs go (0: loss, 1: the model's output, 2...: carried, in ``carried`` order)."""

    params: list[str]
    opt_state: list[str]
    buffers: list[str]
    masks: dict[str, float]          # mask input -> dropout probability
    scalars: tuple[str, ...]
    batch_size_input: bool

    @property
    def carried(self) -> list[str]:
        return self.params + self.opt_state + self.buffers


def build_step_graph(model: Sequential, loss: Loss, optimizer: Optimizer
                     ) -> tuple[Graph, StepLayout]:
    """The training-step graph of ``model`` (see the module docstring)."""
    from .autodiff import grad

    forward = Graph(f"{model.name}_step")
    x = forward.input(INPUT_NAME, (None,) + model.input_shape)
    scope = Scope(forward, training=True, as_inputs=True)
    head = model.forward(x, scope)
    target = forward.input(TARGET_NAME, (None,) + loss.target_shape(model.output_shape))
    batch_loss = ops.reduce_mean(loss.per_sample(head, target), np.array([0], np.int64),
                                 keepdims=0, name="loss")
    forward.output(batch_loss, head.output, *scope.buffer_updates.values())
    params = list(scope.param_inputs)
    graph = grad(forward, of=batch_loss.name, wrt=params)
    grads = graph.outputs[len(forward.outputs):]
    scalars = {name: graph.input(name, ()) for name in optimizer.scalar_inputs}
    new_params, new_state, state_names = [], [], []
    for name, grad_name in zip(params, grads):
        shape = graph.type_of(name).shape
        state = {slot: graph.input(f"{name}.{slot}", shape) for slot in optimizer.slots}
        new_param, updated = optimizer.update(graph.value(name), graph.value(grad_name), state,
                                              scalars)
        new_params.append(new_param.name)
        for slot in optimizer.slots:
            state_names.append(f"{name}.{slot}")
            new_state.append(updated[slot].name)
    buffers = list(scope.buffer_updates)
    graph.set_outputs([batch_loss.name, head.output.name, *new_params, *new_state,
                       *(v.name for v in scope.buffer_updates.values())])
    layout = StepLayout(params, state_names, buffers,
                        {name: layer.p for name, layer in scope.mask_inputs.items()},
                        tuple(optimizer.scalar_inputs), scope.uses_batch_size)
    return graph, layout


def build_eval_graph(model: Sequential, loss: Loss | None) -> Graph:
    """Inference forward pass with the arrays as inputs; outputs: the model's output and, with
    a loss, the per-sample loss (input ``target``)."""
    graph = Graph(f"{model.name}_eval")
    x = graph.input(INPUT_NAME, (None,) + model.input_shape)
    head = model.forward(x, Scope(graph, as_inputs=True))
    graph.output(head.output)
    if loss is not None:
        target = graph.input(TARGET_NAME, (None,) + loss.target_shape(model.output_shape))
        graph.output(loss.per_sample(head, target))
    return graph


_PROGRAMS: OrderedDict = OrderedDict()


def _cached(key: tuple, make):
    """Compiled programs by structure (architecture, loss, optimiser kind, target, threads):
    arrays are inputs, so models of one architecture share them. Least recently used go."""
    if key in _PROGRAMS:
        _PROGRAMS.move_to_end(key)
        return _PROGRAMS[key]
    value = make()
    _PROGRAMS[key] = value
    while len(_PROGRAMS) > PROGRAM_CACHE_SIZE:
        _PROGRAMS.popitem(last=False)
    return value


def _architecture_key(model: Sequential) -> str:
    import json

    arch = model.architecture()
    arch.pop("seed"), arch.pop("name")
    return json.dumps(arch, sort_keys=True)


def step_program(model, loss, optimizer, target, threads, batch_size):
    threads = _pick_threads(model, batch_size, target, threads, backward=True)

    def make():
        graph, layout = build_step_graph(model, loss, optimizer)
        return Program(graph, target, threads), layout

    key = ("step", _architecture_key(model), loss.name, optimizer.graph_key(), target, threads,
           PROGRAM_CONV)
    return _cached(key, make)


def eval_program(model, loss, target, threads) -> Program:
    threads = _pick_threads(model, EVAL_CHUNK, target, threads, backward=False)

    def make():
        return Program(build_eval_graph(model, loss), target, threads)

    key = ("eval", _architecture_key(model), loss.name if loss else None, target, threads,
           PROGRAM_CONV)
    return _cached(key, make)


# -- data ---------------------------------------------------------------------------------------
def _samples(model: Sequential, X, what: str = "X") -> np.ndarray:
    try:
        array = np.ascontiguousarray(X, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise FeedError(f"{what} is not a numeric array: {exc}") from None
    if array.ndim < 2:
        raise FeedError(f"{what} has shape {array.shape}; it needs a batch dim first, "
                        "e.g. (n, features)")
    model.ensure_initialised(array.shape[1:])
    return array


def _check_pair(X: np.ndarray, y, what: str) -> None:
    if len(y) != len(X):
        raise FeedError(f"{what}: X has {len(X)} samples but y has {len(y)}")


# -- history ------------------------------------------------------------------------------------
@dataclass
class History:
    """Per-epoch metrics: ``history['loss']``, ``'accuracy'``, and with validation
    ``'val_loss'``, ``'val_accuracy'``; ``stopped_early``/``best_epoch`` for early stopping."""

    history: dict = field(default_factory=dict)
    epochs_run: int = 0
    stopped_early: bool = False
    best_epoch: int | None = None

    def __getitem__(self, key: str) -> list[float]:
        return self.history[key]

    def record(self, **metrics: float) -> None:
        for key, value in metrics.items():
            self.history.setdefault(key, []).append(float(value))


@dataclass
class Evaluation:
    loss: float
    accuracy: float

    def __iter__(self):
        return iter((self.loss, self.accuracy))


# -- the training loop ----------------------------------------------------------------------------
class _Trainer:
    """One fit: the step program, the two carried-array sets and the per-step feeds."""

    def __init__(self, model, loss, optimizer, target, threads, batch_size, rng):
        self.model, self.loss, self.optimizer, self.rng = model, loss, optimizer, rng
        self.program, self.layout = step_program(model, loss, optimizer, target, threads,
                                                 batch_size)
        optimizer.init_state(model.parameters())
        current = {**model.parameters(), **optimizer.state, **model.buffers()}
        # set A: copies of the model's arrays (the model keeps its own until the fit ends)
        self.sets = [{n: np.array(current[n], np.float32, copy=True) for n in
                      self.layout.carried}]
        self.sets.append({n: np.empty_like(a) for n, a in self.sets[0].items()})
        self.parity = 0
        self.mask_shapes = {n: tuple(self.program.source.type_of(n).shape[1:])
                            for n in self.layout.masks}
        self._per_size: dict[int, dict] = {}
        self._bound: dict[tuple, BoundStep | None] = {}  # (batch size, parity) -> bound step
        self.scalars = {n: np.zeros((), np.float32) for n in self.layout.scalars}
        self.loss_out = np.zeros((), np.float32)

    def _buffers_for(self, batch: int) -> dict:
        """Mask arrays and the batch_size scalar for one batch size (made once)."""
        if batch not in self._per_size:
            extra = {n: np.empty((batch,) + s, np.float32) for n, s in self.mask_shapes.items()}
            if self.layout.batch_size_input:
                extra["batch_size"] = np.array(batch, np.float32)
            self._per_size[batch] = extra
        return self._per_size[batch]

    def step(self, x: np.ndarray, t: np.ndarray, prediction_out: np.ndarray) -> float:
        """One training step on batch ``x``, ``t``; the model's outputs go to
        ``prediction_out``. Returns the batch loss."""
        self.optimizer.steps += 1
        batch = len(x)
        extra = self._buffers_for(batch)
        for name, p in self.layout.masks.items():
            draw_dropout_mask(self.rng, p, extra[name])
        for name, value in self.optimizer.scalar_values(self.optimizer.steps).items():
            self.scalars[name][...] = value
        key = (batch, self.parity)
        if key not in self._bound:
            self._bound[key] = self._bind(batch, extra) if BIND_STEPS else None
        if self._bound[key] is None:
            self._checked_step(x, t, prediction_out, extra)
        else:
            self._bound[key].run({INPUT_NAME: x, TARGET_NAME: t,
                                  self.program.outputs[1]: prediction_out})
        self.parity = 1 - self.parity
        return float(self.loss_out)

    def _checked_step(self, x, t, prediction_out, extra) -> None:
        feeds = {**self.sets[self.parity], **extra, **self.scalars, INPUT_NAME: x,
                 TARGET_NAME: t}
        out_set = self.sets[1 - self.parity]
        into = [self.loss_out, prediction_out] + [out_set[n] for n in self.layout.carried]
        self.program.run(feeds, into)

    def _bind(self, batch: int, extra: dict) -> BoundStep | None:
        outputs = self.program.outputs
        out_set = self.sets[1 - self.parity]
        arrays = {**self.sets[self.parity], **extra, **self.scalars, outputs[0]: self.loss_out}
        arrays.update({o: out_set[n] for o, n in zip(outputs[2:], self.layout.carried)})
        return BoundStep.bind(self.program, {"N": batch}, arrays,
                              (INPUT_NAME, TARGET_NAME, outputs[1]))

    def current(self) -> dict[str, np.ndarray]:
        return self.sets[self.parity]

    def restore(self, arrays: dict[str, np.ndarray]) -> None:
        for name, array in arrays.items():
            np.copyto(self.sets[self.parity][name], array)

    def finish(self) -> None:
        """Hand the current arrays back to the model and the optimiser."""
        current = self.current()
        for layer in self.model.layers:
            for store in (layer.params, layer.buffers):
                for key in store:
                    store[key] = current[f"{layer.name}.{key}"]
        for name in self.layout.opt_state:
            self.optimizer.state[name] = current[name]


def fit(model: Sequential, X, y, *, loss=None, optimizer=None, epochs: int = 10,
        batch_size: int = 32, validation_split: float | None = None, validation_data=None,
        early_stopping: int | None = None, shuffle: bool = True, seed: int = 0,
        target: str = "cpu", threads: int | None = None, progress: bool = True,
        verbose: bool | None = None, drop_last: bool = False, lr_schedule=None) -> History:
    """Train ``model`` on ``X`` (n, *input_shape) and ``y`` (labels or targets).

    ``loss``: "mse", "cross_entropy" or "bce" (default: the previous fit's); ``optimizer``: a
    ``graphc.optim`` optimiser or "sgd"/"adam" (default SGD(lr=0.01)).
    ``validation_split`` holds out the LAST fraction of the samples (before shuffling);
    ``validation_data=(X_val, y_val)`` gives them explicitly. ``early_stopping=PATIENCE`` stops
    after PATIENCE epochs without a lower validation loss (training loss without validation) and
    restores the best epoch's weights. ``lr_schedule(epoch) -> lr`` sets the learning rate per
    epoch (a graph input: nothing recompiles). A progress bar (tqdm, if installed) shows unless
    ``progress=False``/``verbose=False`` or ``TQDM_DISABLE`` is set.
    """
    loss = _fit_loss(model, loss)
    optimizer = get_optimizer(optimizer if optimizer is not None else "sgd")
    _check_fit_options(epochs, batch_size, early_stopping)
    X = _samples(model, X)
    _check_pair(X, y, "fit")
    T = loss.prepare_targets(y, model.output_shape)
    X, T, val = _split_validation(model, loss, X, T, validation_split, validation_data)
    model.training_config = {"loss": loss.name, "classes": loss.class_values(T)}
    rng = np.random.default_rng(seed)
    trainer = _Trainer(model, loss, optimizer, target, threads, batch_size, rng)
    history = History()
    bar = _progress_bar(progress if verbose is None else verbose, epochs, model.name)
    monitor = "val_loss" if val is not None else "loss"
    best, best_arrays, waited = math.inf, None, 0
    try:
        for epoch in range(epochs):
            if lr_schedule is not None:
                optimizer.lr = float(lr_schedule(epoch))
            metrics = _train_epoch(trainer, X, T, batch_size, shuffle, drop_last, rng)
            if val is not None:
                trainer.finish()  # the model's arrays are the current ones for evaluation
                val_loss, val_acc = evaluate(model, *val, loss=loss, target=target,
                                             threads=threads, prepared=True)
                metrics.update(val_loss=val_loss, val_accuracy=val_acc)
            history.record(**metrics)
            history.epochs_run = epoch + 1
            if bar is not None:
                bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()}, refresh=False)
                bar.update(1)
            if early_stopping is None:
                continue
            if metrics[monitor] < best:
                best, waited, history.best_epoch = metrics[monitor], 0, epoch
                best_arrays = {n: a.copy() for n, a in trainer.current().items()}
            else:
                waited += 1
                if waited >= early_stopping:
                    history.stopped_early = True
                    break
    finally:
        if bar is not None:
            bar.close()
    if best_arrays is not None:
        trainer.restore(best_arrays)
    trainer.finish()
    return history


def _fit_loss(model: Sequential, loss) -> Loss:
    if loss is None:
        loss = model.training_config.get("loss")
        if loss is None:
            raise GraphcError("fit needs loss= ('mse', 'cross_entropy' or 'bce')")
    return get_loss(loss)


def _check_fit_options(epochs, batch_size, early_stopping) -> None:
    if int(epochs) != epochs or epochs < 0:
        raise GraphcError(f"epochs must be an int >= 0, got {epochs!r}")
    if int(batch_size) != batch_size or batch_size < 1:
        raise GraphcError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if early_stopping is not None and (int(early_stopping) != early_stopping
                                       or early_stopping < 1):
        raise GraphcError(f"early_stopping (patience) must be an int >= 1, got "
                          f"{early_stopping!r}")


def _split_validation(model, loss, X, T, split, data):
    if split is not None and data is not None:
        raise GraphcError("give validation_split or validation_data, not both")
    if data is not None:
        if not isinstance(data, (tuple, list)) or len(data) != 2:
            raise GraphcError("validation_data must be a pair (X_val, y_val)")
        Xv = _samples(model, data[0], "validation_data X")
        _check_pair(Xv, data[1], "validation_data")
        return X, T, (Xv, loss.prepare_targets(data[1], model.output_shape,
                                               "validation_data y"))
    if split is None:
        return X, T, None
    if not 0.0 < split < 1.0:
        raise GraphcError(f"validation_split must be in (0, 1), got {split!r}")
    n_val = round(len(X) * split)
    if n_val == 0 or n_val == len(X):
        raise GraphcError(f"validation_split={split} of {len(X)} samples leaves "
                          f"{n_val} for validation and {len(X) - n_val} for training")
    cut = len(X) - n_val
    return X[:cut], T[:cut], (X[cut:], T[cut:])


def _train_epoch(trainer: _Trainer, X, T, batch_size, shuffle, drop_last, rng) -> dict:
    if shuffle:
        order = rng.permutation(len(X))
        X, T = X[order], T[order]
    n = len(X) - len(X) % batch_size if drop_last else len(X)
    outputs = np.empty((n,) + trainer.model.output_shape, np.float32)
    total = 0.0
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        total += trainer.step(X[start:stop], T[start:stop], outputs[start:stop]) * (stop - start)
    classes = trainer.model.training_config.get("classes")
    return {"loss": total / max(n, 1), "accuracy": accuracy(trainer.loss, outputs, T[:n],
                                                            classes)}


def _progress_bar(enabled: bool, epochs: int, name: str):
    """A tqdm bar over epochs, or None (turned off, TQDM_DISABLE set, or tqdm not installed)."""
    if not enabled or os.environ.get("TQDM_DISABLE", "").lower() not in ("", "0", "false"):
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    # disable=False explicitly: tqdm reads TQDM_* variables once, when it is imported
    return tqdm(total=epochs, desc=f"fit {name}", unit="epoch", disable=False)


# -- evaluation and prediction ------------------------------------------------------------------
def _run_chunks(model, program: Program, X, T=None) -> tuple[np.ndarray, np.ndarray | None]:
    """Outputs (and per-sample losses) for every sample, in padded chunks of EVAL_CHUNK."""
    arrays = model.state_dict()
    n = len(X)
    outputs = np.empty((n,) + model.output_shape, np.float32)
    losses = np.empty(n, np.float32) if T is not None else None
    x_pad = np.zeros((EVAL_CHUNK,) + X.shape[1:], np.float32)
    t_pad = None if T is None else np.zeros((EVAL_CHUNK,) + T.shape[1:], np.float32)
    with_loss = len(program.outputs) > 1
    for start in range(0, n, EVAL_CHUNK):
        stop = min(start + EVAL_CHUNK, n)
        size = stop - start
        x, t = X[start:stop], None if T is None else T[start:stop]
        if size < EVAL_CHUNK:  # pad the last chunk: one specialisation for every size
            x_pad[:size] = x
            x = x_pad
            if t is not None:
                t_pad[:size] = t
                t = t_pad
        feeds = {INPUT_NAME: x, **arrays}
        if with_loss:
            feeds[TARGET_NAME] = t if t is not None else _zeros_target(program)
        results = program.run(feeds, [None] * len(program.outputs))
        outputs[start:stop] = results[0][:size]
        if losses is not None:
            losses[start:stop] = results[1][:size]
    return outputs, losses


def _zeros_target(program: Program) -> np.ndarray:
    t = program.source.type_of(TARGET_NAME)
    return np.zeros((EVAL_CHUNK,) + tuple(t.shape[1:]), np.float32)


def evaluate(model: Sequential, X, y, *, loss=None, target: str = "cpu",
             threads: int | None = None, prepared: bool = False) -> Evaluation:
    """Mean loss and accuracy on ``X``, ``y`` (inference mode: Dropout off, BatchNorm's running
    statistics). ``loss`` defaults to the last fit's."""
    loss = _fit_loss(model, loss)
    if not prepared:
        X = _samples(model, X)
        _check_pair(X, y, "evaluate")
        y = loss.prepare_targets(y, model.output_shape)
    program = eval_program(model, loss, target, threads)
    outputs, losses = _run_chunks(model, program, X, y)
    classes = model.training_config.get("classes")
    if classes is None and loss.name == model.training_config.get("loss", loss.name):
        classes = loss.class_values(y)
    return Evaluation(float(np.mean(losses)) if len(losses) else float("nan"),
                      accuracy(loss, outputs, y, classes))


def predict(model: Sequential, X, *, target: str = "cpu", threads: int | None = None
            ) -> np.ndarray:
    """The model's outputs for ``X`` (inference mode) as a float32 array."""
    X = _samples(model, X)
    name = model.training_config.get("loss")
    program = eval_program(model, get_loss(name) if name else None, target, threads)
    return _run_chunks(model, program, X)[0]


# -- cross-validation ---------------------------------------------------------------------------
@dataclass
class KFoldResult:
    """Per-fold held-out accuracy (``scores``) and loss, and each fold's History."""

    scores: list[float]
    losses: list[float]
    histories: list[History]

    @property
    def mean(self) -> float:
        return float(np.mean(self.scores))

    @property
    def std(self) -> float:
        return float(np.std(self.scores))

    def __len__(self) -> int:
        return len(self.scores)

    def __iter__(self):
        return iter(self.scores)


def kfold(make_model, X, y, k: int = 5, *, shuffle: bool = True, seed: int = 0,
          **fit_options) -> KFoldResult:
    """k-fold cross-validation: ``make_model()`` gives a fresh model per fold, trained with
    ``fit(**fit_options)`` on k-1 folds and scored (``evaluate``) on the held-out one."""
    X = np.asarray(X)
    y = np.asarray(y)
    if int(k) != k or not 2 <= k <= len(X):
        raise GraphcError(f"kfold needs 2 <= k <= {len(X)} (the number of samples), got {k!r}")
    if len(y) != len(X):
        raise FeedError(f"kfold: X has {len(X)} samples but y has {len(y)}")
    order = np.random.default_rng(seed).permutation(len(X)) if shuffle else np.arange(len(X))
    folds = np.array_split(order, int(k))
    scores, losses, histories = [], [], []
    for i, held_out in enumerate(folds):
        model = make_model()
        if not isinstance(model, Sequential):
            raise GraphcError(f"kfold: make_model() returned {type(model).__name__}, not a "
                              "graphc.nn.Sequential")
        train = np.concatenate([f for j, f in enumerate(folds) if j != i])
        histories.append(model.fit(X[train], y[train], seed=seed + i, **fit_options))
        result = model.evaluate(X[held_out], y[held_out],
                                target=fit_options.get("target", "cpu"),
                                threads=fit_options.get("threads"))
        scores.append(result.accuracy)
        losses.append(result.loss)
    return KFoldResult(scores, losses, histories)


__all__ = ["EVAL_CHUNK", "Evaluation", "History", "KFoldResult", "build_eval_graph",
           "build_step_graph", "evaluate", "fit", "kfold", "predict"]
