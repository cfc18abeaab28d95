"""The op registry: every op is defined once, as one ``OpDef``.

An entry holds what every layer of graphc needs to know about an op:

* ``inputs``/``outputs``: ordered names; ``"B?"`` marks an optional slot, ``"inputs*"`` a variadic
  tail (at least one).
* ``attrs``: name -> ``Attr`` (kind, default, validation).
* ``infer``: the shape/type rule, ``OpCall -> list[TensorType]`` (one per output slot).
* ``reference``: the numpy reference, ``(OpCall, *arrays) -> array | tuple``; the interpreter and
  constant folding run it, so it is the definition of the op's semantics.
* ``kind``: fusion pattern (TVM's lattice): elementwise < broadcast < injective < reduce <
  out-fusable < opaque.
* ``flops``: FLOP count of one execution (``graphc inspect`` sums it).
* ``onnx_import``: optional rule that rewrites an ONNX node of an older opset into this entry's
  form (e.g. attributes that later opsets moved to inputs).
* ``grad`` (vjp rule) and ``lower`` (backend lowering) are filled in by later layers.
* ``epilogue_bias_axis``: set on ops that carry a fused epilogue (``ops/epilogue.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import GraphcError, InvalidAttributeError, ShapeError, UnsupportedOpError

REQUIRED = object()

ATTR_KINDS = ("int", "float", "string", "ints", "floats", "strings", "tensor")
FUSION_KINDS = ("elementwise", "broadcast", "injective", "reduce", "out-fusable", "opaque")


@dataclass(frozen=True)
class Attr:
    """One attribute: its kind, its default (``REQUIRED`` if none) and an optional check.

    ``check(value)`` returns an error text (or None) for values the op rejects.
    """

    kind: str
    default: Any = REQUIRED
    check: Callable[[Any], str | None] | None = None
    choices: tuple | None = None

    def normalize(self, value: Any) -> Any:
        """Coerce a Python/numpy value to this attribute's canonical Python type."""
        if self.kind == "int":
            return int(value)
        if self.kind == "float":
            return float(value)
        if self.kind == "string":
            return value.decode() if isinstance(value, bytes) else str(value)
        if self.kind == "ints":
            return tuple(int(v) for v in np.asarray(value).ravel())
        if self.kind == "floats":
            return tuple(float(v) for v in np.asarray(value).ravel())
        if self.kind == "strings":
            return tuple(v.decode() if isinstance(v, bytes) else str(v) for v in value)
        if self.kind == "tensor":
            return np.asarray(value)
        raise AssertionError(self.kind)


def ints(default=REQUIRED, check=None) -> Attr:
    return Attr("ints", default, check)


def int_(default=REQUIRED, check=None, choices=None) -> Attr:
    return Attr("int", default, check, choices)


def float_(default=REQUIRED, check=None) -> Attr:
    return Attr("float", default, check)


def string(default=REQUIRED, choices=None) -> Attr:
    return Attr("string", default, None, choices)


def tensor(default=REQUIRED) -> Attr:
    return Attr("tensor", default)


@dataclass
class OpCall:
    """What a rule sees of one node: attributes (defaults filled), input types and the values of
    inputs that are constants (``None`` where an input is computed at run time or absent)."""

    op: str
    node: str
    attrs: dict
    in_types: tuple
    in_values: tuple = ()
    n_outputs: int = 1

    def error(self, message: str) -> ShapeError:
        return ShapeError(f"{self.op} node '{self.node}': {message}")

    def __getitem__(self, name: str) -> Any:
        return self.attrs[name]

    def has_input(self, i: int) -> bool:
        return i < len(self.in_types) and self.in_types[i] is not None

    def const_input(self, i: int, what: str) -> np.ndarray:
        """The value of constant input ``i``; a ShapeError if it is only known at run time."""
        value = self.in_values[i] if i < len(self.in_values) else None
        if value is None:
            raise self.error(
                f"input {i} ({what}) must be a constant to infer shapes statically; it is computed"
                " at run time (import with static input_shapes= so it can fold)")
        return value

    def static_shape(self, i: int) -> tuple[int, ...]:
        t = self.in_types[i]
        if not t.is_static:
            raise self.error(f"input {i} has symbolic shape {t}; this op needs static dims here")
        return t.shape


@dataclass
class ImportContext:
    """Handed to an ``OpDef.onnx_import`` rule: the ONNX node as graphc is about to add it.

    A rule may edit ``attrs``/``inputs`` in place, add constants with ``constant()``, or expand
    the node itself with ``emit()`` (binding ``outputs``) and return True.
    """

    opset: int
    node: str
    attrs: dict
    inputs: list
    outputs: list
    constant: Callable[[np.ndarray], str]
    emit: Callable[..., list]
    type_of: Callable[[str], Any] = None  # value name -> TensorType of an input

    def error(self, message: str) -> GraphcError:
        return UnsupportedOpError(f"node '{self.node}' (opset {self.opset}): {message}")

    def attr_to_input(self, attr: str, position: int, dtype=np.int64) -> None:
        """Move attribute ``attr`` (older opsets) to input ``position`` (newer opsets)."""
        if attr in self.attrs:
            value = np.asarray(self.attrs.pop(attr), dtype=dtype)
            while len(self.inputs) < position:
                self.inputs.append(None)
            self.inputs.insert(position, self.constant(value))


@dataclass
class OpDef:
    name: str
    inputs: tuple
    outputs: tuple
    infer: Callable[[OpCall], list]
    reference: Callable[..., Any]
    attrs: dict = field(default_factory=dict)
    kind: str = "opaque"
    flops: Callable[[OpCall, list], int] | None = None
    onnx_import: Callable[[ImportContext], bool | None] | None = None
    grad: Callable | None = None
    lower: Callable | None = None
    doc: str = ""
    # Epilogue-capable ops (see ops/epilogue.py) end with inputs (bias?, Z?) and carry the
    # epilogue attributes; a 1-D bias runs along this output axis. None for every other op.
    epilogue_bias_axis: int | None = None

    def __post_init__(self):
        assert self.kind in FUSION_KINDS, self.kind
        for a in self.attrs.values():
            assert a.kind in ATTR_KINDS, a.kind

    # -- arity --------------------------------------------------------------------------------
    @property
    def variadic(self) -> bool:
        return bool(self.inputs) and self.inputs[-1].endswith("*")

    @property
    def min_inputs(self) -> int:
        return sum(1 for s in self.inputs if not s.endswith("?"))

    @property
    def max_inputs(self) -> float:
        return float("inf") if self.variadic else len(self.inputs)

    @property
    def min_outputs(self) -> int:
        return sum(1 for s in self.outputs if not s.endswith("?"))

    @property
    def variadic_outputs(self) -> bool:
        return bool(self.outputs) and self.outputs[-1].endswith("*")

    def check_arity(self, node: str, inputs: Sequence) -> None:
        n = len(inputs)
        if not self.min_inputs <= n <= self.max_inputs:
            most = "any number of" if self.variadic else f"at most {len(self.inputs)}"
            raise ShapeError(
                f"{self.name} node '{node}': got {n} inputs, expects at least {self.min_inputs}"
                f" and {most} ({', '.join(self.inputs)})")
        for i, (slot, value) in enumerate(zip(self.inputs, inputs)):
            if value is None and not (slot.endswith("?")):
                raise ShapeError(
                    f"{self.name} node '{node}': required input {i} ({slot}) is missing")

    # -- attributes ---------------------------------------------------------------------------
    def normalize_attrs(self, node: str, attrs: dict) -> dict:
        """Validate and coerce attributes given by a user/importer (defaults are not filled in)."""
        out = {}
        for key, value in attrs.items():
            spec = self.attrs.get(key)
            if spec is None:
                raise InvalidAttributeError(
                    f"{self.name} node '{node}': unknown attribute '{key}'"
                    f" (known: {', '.join(sorted(self.attrs)) or 'none'})")
            try:
                value = spec.normalize(value)
            except (TypeError, ValueError) as exc:
                raise InvalidAttributeError(
                    f"{self.name} node '{node}': attribute '{key}' must be {spec.kind}: {exc}"
                ) from exc
            if spec.choices is not None and value not in spec.choices:
                raise InvalidAttributeError(
                    f"{self.name} node '{node}': attribute '{key}'={value!r} not one of"
                    f" {list(spec.choices)}")
            problem = spec.check(value) if spec.check else None
            if problem:
                raise InvalidAttributeError(
                    f"{self.name} node '{node}': attribute '{key}': {problem}")
            out[key] = value
        for key, spec in self.attrs.items():
            if spec.default is REQUIRED and key not in out:
                raise InvalidAttributeError(
                    f"{self.name} node '{node}': required attribute '{key}' is missing")
        return out

    def full_attrs(self, attrs: dict) -> dict:
        """Attributes with defaults filled in (None marks a default derived from the inputs)."""
        full = {k: a.default for k, a in self.attrs.items() if a.default is not REQUIRED}
        full.update(attrs)
        return full


_REGISTRY: dict[str, OpDef] = {}


def register(opdef: OpDef) -> OpDef:
    assert opdef.name not in _REGISTRY, f"op {opdef.name} registered twice"
    _REGISTRY[opdef.name] = opdef
    return opdef


def op(name: str, **kwargs) -> Callable:
    """Decorator form: ``@op("Relu", inputs=("X",), outputs=("Y",), infer=same_as_input(0))``
    applied to the numpy reference."""

    def wrap(reference):
        register(OpDef(name=name, reference=reference, doc=reference.__doc__ or "", **kwargs))
        return reference

    return wrap


def get(name: str, node: str = "?") -> OpDef:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnsupportedOpError(f"unknown op '{name}' (node '{node}')") from None


def has(name: str) -> bool:
    return name in _REGISTRY


def all_ops() -> dict[str, OpDef]:
    return dict(sorted(_REGISTRY.items()))


def make_call(opdef: OpDef, node: str, attrs: dict, in_types, in_values=(), n_outputs=1) -> OpCall:
    return OpCall(opdef.name, node, opdef.full_attrs(attrs), tuple(in_types), tuple(in_values),
                  n_outputs)


def infer_types(opdef: OpDef, call: OpCall) -> list:
    """Run the shape rule; errors in it become ShapeErrors naming the node."""
    try:
        types = opdef.infer(call)
    except GraphcError:
        raise
    except (ValueError, IndexError, TypeError, ZeroDivisionError, KeyError) as exc:
        raise call.error(f"cannot infer output type from inputs "
                         f"{', '.join(str(t) for t in call.in_types)}: {exc}") from exc
    return list(types)
