"""The IR's text form, and its parser.

One line per node, in deterministic topological order, so that two dumps diff cleanly::

    graph mlp(%x: f32[N,64]) {
      %w = Constant() {value=tensor<f32[64,10]> #3f2a9c1e} : f32[64,10]
      %h = Gemm(%x, %w, %b) {transB=1} : f32[N,10]
      %a, %b = Split(%h) {axis=1} : f32[N,5], f32[N,5]
      return %a, %b
    }

Absent optional operands/results print as ``_``. Tensors of up to ``INLINE_LIMIT`` elements print
inline (``tensor<i64[2]> [1, -1]``), tensors of one repeated value as
``tensor<f32[64]> splat(0.0)``;
larger ones print their type and a content digest, and the parser takes their data from
``weights`` (value name -> array), checking type and digest.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import numpy as np

from .errors import GraphcError, ParseError
from .types import TensorType

INLINE_LIMIT = 16
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_./\-]+")


def digest(array: np.ndarray) -> str:
    data = np.ascontiguousarray(array)
    return hashlib.sha1(str(data.dtype).encode() + str(data.shape).encode()
                        + data.tobytes()).hexdigest()[:8]


def format_name(name: str | None) -> str:
    if name is None:
        return "_"
    return "%" + (name if _PLAIN_NAME.fullmatch(name) else json.dumps(name))


def _scalar(x) -> str:
    if isinstance(x, (bool, np.bool_)):
        return "true" if x else "false"
    if isinstance(x, (np.floating, float)):
        text = str(x if isinstance(x, np.floating) else np.float64(x))
        return text if re.search(r"[.eEna]", text) else text + ".0"
    return str(int(x))


def format_tensor(array: np.ndarray) -> str:
    array = np.asarray(array)
    head = f"tensor<{TensorType.of(array)}>"
    if array.size > 1 and _is_splat(array):
        return f"{head} splat({_scalar(array.flat[0])})"
    if array.size > INLINE_LIMIT:
        return f"{head} #{digest(array)}"
    return f"{head} [{', '.join(_scalar(x) for x in array.ravel())}]"


def _is_splat(array: np.ndarray) -> bool:
    first = array.flat[0]
    if array.dtype.kind == "f" and np.isnan(first):
        return bool(np.isnan(array).all())
    return bool((array == first).all()) and not (array.dtype.kind == "f" and first == 0
                                                  and np.signbit(array).any() != np.signbit(first))


def format_attr(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return format_tensor(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(format_attr(v) for v in value) + "]"
    return _scalar(value)


def format_node(node) -> str:
    outs = ", ".join(format_name(o) for o in node.outputs)
    ins = ", ".join(format_name(i) for i in node.inputs)
    label = f" @{format_name(node.name)[1:]}" if node.name != node.outputs[0] else ""
    attrs = ""
    if node.attrs:
        items = sorted(node.attrs.items())
        attrs = " {" + ", ".join(f"{k}={format_attr(v)}" for k, v in items) + "}"
    types = ", ".join(str(t) if t is not None else "_" for t in node.types)
    return f"{outs} = {node.op}({ins}){label}{attrs} : {types}"


def print_graph(graph) -> str:
    from .ir import INPUT

    params = ", ".join(f"{format_name(v)}: {graph.type_of(v)}" for v in graph.inputs)
    lines = [f"graph {format_name(graph.name)[1:]}({params}) {{"]
    for node in graph.nodes():
        if node.op != INPUT:
            lines.append("  " + format_node(node))
    lines.append("  return " + ", ".join(format_name(v) for v in graph.outputs))
    lines.append("}")
    return "\n".join(lines) + "\n"


# -- parsing --------------------------------------------------------------------------------------
_TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<string>"(?:[^"\\]|\\.)*")
  | (?P<number>[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?(?![A-Za-z0-9_.]))
  | (?P<word>[-+]?[A-Za-z_][A-Za-z0-9_./\-]*|[A-Za-z0-9_./\-]+)
  | (?P<punct>[%@#()\[\]{}<>=,:])
""", re.VERBOSE)


class _Tokens:
    def __init__(self, text: str, line_no: int):
        self.line_no, self.text = line_no, text
        self.items: list[tuple[str, str]] = []
        pos = 0
        while pos < len(text):
            m = _TOKEN.match(text, pos)
            if not m:
                raise self.error(f"unexpected character {text[pos]!r}")
            if m.lastgroup != "ws":
                self.items.append((m.lastgroup, m.group()))
            pos = m.end()
        self.i = 0

    def error(self, message: str) -> ParseError:
        return ParseError(f"line {self.line_no}: {message}: {self.text.strip()!r}")

    def peek(self, value: str | None = None) -> bool:
        if self.i >= len(self.items):
            return False
        return value is None or self.items[self.i][1] == value

    def next(self) -> tuple[str, str]:
        if self.i >= len(self.items):
            raise self.error("unexpected end of line")
        self.i += 1
        return self.items[self.i - 1]

    def expect(self, value: str) -> None:
        _, text = self.next()
        if text != value:
            raise self.error(f"expected {value!r}, found {text!r}")

    def accept(self, value: str) -> bool:
        if self.peek(value):
            self.i += 1
            return True
        return False

    def done(self) -> None:
        if self.i != len(self.items):
            raise self.error(f"unexpected {self.items[self.i][1]!r}")

    # grammar pieces
    def name(self) -> str | None:
        kind, text = self.next()
        if text == "_":
            return None
        if text != "%":
            raise self.error(f"expected a %name, found {text!r}")
        kind, text = self.next()
        return json.loads(text) if kind == "string" else text

    def ident(self) -> str:
        kind, text = self.next()
        if kind == "string":
            return json.loads(text)
        if kind not in ("word", "number"):
            raise self.error(f"expected a name, found {text!r}")
        return text

    def type_(self) -> TensorType | None:
        if self.accept("_"):
            return None
        start = self.i
        _, dtype = self.next()
        self.expect("[")
        dims = []
        while not self.accept("]"):
            _, text = self.next()
            dims.append(text)
            self.accept(",")
        try:
            return TensorType.parse(f"{dtype}[{','.join(dims)}]")
        except ParseError as exc:
            self.i = start
            raise self.error(str(exc)) from None

    def value(self, weights: dict, owner: str) -> Any:
        kind, text = self.next()
        if kind == "string":
            return json.loads(text)
        if kind == "number":
            return float(text) if re.search(r"[.eE]", text) else int(text)
        if text in ("inf", "-inf", "nan", "+inf"):
            return float(text)
        if text in ("true", "false"):
            return text == "true"
        if text == "[":
            items = []
            while not self.accept("]"):
                items.append(self.value(weights, owner))
                self.accept(",")
            return items
        if text == "tensor":
            return self.tensor(weights, owner)
        raise self.error(f"bad attribute value {text!r}")

    def tensor(self, weights: dict, owner: str) -> np.ndarray:
        self.expect("<")
        ttype = self.type_()
        self.expect(">")
        if self.accept("#"):
            _, code = self.next()
            if owner not in weights:
                raise self.error(f"the data of constant '{owner}' ({ttype}) is not inline; "
                                 f"pass it in weights={{'{owner}': array}}")
            array = np.asarray(weights[owner])
            if TensorType.of(array) != ttype or digest(array) != code:
                raise self.error(f"weights['{owner}'] is {TensorType.of(array)} #{digest(array)},"
                                 f" the text says {ttype} #{code}")
            return array
        splat = self.accept("splat")
        if splat:
            self.expect("(")
        flat = self.value(weights, owner)
        if splat:
            self.expect(")")
        try:
            if splat:
                return np.full(ttype.shape, flat, dtype=ttype.np_dtype)
            return np.array(flat, dtype=ttype.np_dtype).reshape(ttype.shape)
        except (ValueError, TypeError) as exc:
            raise self.error(f"tensor data does not fit {ttype}: {exc}") from None


def parse_graph(text: str, weights: dict | None = None):
    """Parse the text form back into a ``Graph``; types are re-inferred and must match."""
    from .ir import Graph

    weights = weights or {}
    lines = [(i + 1, ln) for i, ln in enumerate(text.splitlines())
             if ln.strip() and not ln.strip().startswith(";")]
    if not lines:
        raise ParseError("empty IR text")
    graph = _parse_header(*lines[0], Graph)
    ended = False
    for line_no, line in lines[1:]:
        toks = _Tokens(line, line_no)
        if ended:
            raise toks.error("text after the closing '}'")
        if toks.accept("}"):
            ended = True
        elif toks.peek("return"):
            toks.next()
            outs = []
            while toks.peek():
                outs.append(toks.name())
                toks.accept(",")
            graph.set_outputs([o for o in outs if o])
        else:
            _parse_node(toks, graph, weights)
        toks.done()
    if not ended:
        raise ParseError("missing closing '}'")
    return graph


def _parse_header(line_no: int, line: str, Graph):
    toks = _Tokens(line, line_no)
    if toks.next()[1] != "graph":
        raise toks.error("expected 'graph NAME(...) {'")
    graph = Graph(toks.ident())
    toks.expect("(")
    while not toks.accept(")"):
        name = toks.name()
        toks.expect(":")
        graph.add_input(name, toks.type_())
        toks.accept(",")
    toks.expect("{")
    toks.done()
    return graph


def _parse_node(toks: _Tokens, graph, weights: dict) -> None:
    outputs = [toks.name()]
    while toks.accept(","):
        outputs.append(toks.name())
    toks.expect("=")
    op = toks.ident()
    toks.expect("(")
    inputs = []
    while not toks.accept(")"):
        inputs.append(toks.name())
        toks.accept(",")
    name = toks.ident() if toks.accept("@") else None
    owner = name or outputs[0]
    attrs = {}
    if toks.accept("{"):
        while not toks.accept("}"):
            key = toks.ident()
            toks.expect("=")
            attrs[key] = toks.value(weights, owner)
            toks.accept(",")
    toks.expect(":")
    types = [toks.type_()]
    while toks.accept(","):
        types.append(toks.type_())
    try:
        graph.add_node(op, inputs, attrs, outputs=outputs, name=name)
    except GraphcError as exc:
        raise toks.error(str(exc)) from None
    node = graph.node(name or outputs[0])
    for o, want in zip(node.outputs, types):
        if o is not None and node.type_of(o) != want:
            raise toks.error(f"type of '{o}' is written {want} but infers as {node.type_of(o)}")
