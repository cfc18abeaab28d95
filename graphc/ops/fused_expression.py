"""FusedElementwise: a tree of elementwise and broadcast ops as one node with a printable body.

``FusedElementwise(x0, x1, ...) {expr="relu(x0 * x1 + 0.5)"}`` evaluates ``expr`` over its
inputs with numpy broadcasting. The body is a small expression language::

    expr  := term (("+" | "-") term)*             Add, Sub (left-associative)
    term  := unary (("*" | "/") unary)*           Mul, Div (left-associative)
    unary := "-" unary | atom                     Neg; "-" right before a number negates it
    atom  := number | "inf" | "nan" | x<i> | name "(" expr ("," expr)* ")" | "(" expr ")"

``FUNCTIONS`` maps each name to its registry op: ``relu(e)`` is Relu, ``leaky_relu(e, 0.1)`` is
LeakyRelu with alpha=0.1 (float attributes follow the operands as number literals),
``clip(e, lo, hi)`` is Clip (bounds are expressions; ``-inf``/``inf`` for an absent bound),
``max(a, b, ...)`` is Max, ``pow(a, b)`` is Pow, and so on.

Invariants:

* every operation runs its op's registry shape rule and numpy reference, so a fused node
  computes exactly what the ops it replaces compute (the definitions cannot drift apart);
* a literal takes the dtype of the first operand of the same operation that is not a literal
  (``x0 * 2.0`` multiplies in x0's dtype); an operation whose operands are all literals is an
  error, as is a body that is a bare literal;
* the body uses each of x0..x{n-1} and nothing else;
* printing parenthesises exactly where the tree needs it (``x0 + (x1 + x2)`` keeps its
  parentheses: float addition does not associate), so text -> tree -> text is the identity.

Malformed bodies raise ``InvalidAttributeError`` naming the node.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import GraphcError, InvalidAttributeError
from ..types import TensorType
from . import registry
from .registry import REQUIRED, Attr, OpCall, OpDef, register


# -- the expression tree -------------------------------------------------------------------------
@dataclass(frozen=True)
class Input:
    """Operand ``x<index>`` of the fused node."""

    index: int


@dataclass(frozen=True)
class Literal:
    """A number; its dtype comes from its sibling operands (see the module docstring)."""

    value: float


@dataclass(frozen=True)
class Call:
    """Function ``func`` (a key of ``FUNCTIONS``) of tensor ``args``, with float ``params``."""

    func: str
    args: tuple
    params: tuple = ()


Expr = Input | Literal | Call


@dataclass(frozen=True)
class Function:
    op: str                                 # the registry op it runs
    arity: int | None                       # tensor operands; None: one or more
    params: tuple[str, ...] = ()            # float attributes, written after the operands
    fixed: tuple[tuple[str, Any], ...] = ()  # attributes the name implies
    symbol: str | None = None               # written as an operator instead of a call


FUNCTIONS: dict[str, Function] = {
    # operators
    "add": Function("Add", 2, symbol="+"),
    "sub": Function("Sub", 2, symbol="-"),
    "mul": Function("Mul", 2, symbol="*"),
    "div": Function("Div", 2, symbol="/"),
    "neg": Function("Neg", 1, symbol="-"),
    # unary math and activations
    "abs": Function("Abs", 1),
    "exp": Function("Exp", 1),
    "log": Function("Log", 1),
    "sqrt": Function("Sqrt", 1),
    "reciprocal": Function("Reciprocal", 1),
    "erf": Function("Erf", 1),
    "relu": Function("Relu", 1),
    "sigmoid": Function("Sigmoid", 1),
    "tanh": Function("Tanh", 1),
    "softplus": Function("Softplus", 1),
    "hard_swish": Function("HardSwish", 1),
    "gelu": Function("Gelu", 1, fixed=(("approximate", "none"),)),
    "gelu_tanh": Function("Gelu", 1, fixed=(("approximate", "tanh"),)),
    "leaky_relu": Function("LeakyRelu", 1, ("alpha",)),
    "elu": Function("Elu", 1, ("alpha",)),
    "selu": Function("Selu", 1, ("alpha", "gamma")),
    "hard_sigmoid": Function("HardSigmoid", 1, ("alpha", "beta")),
    # several operands
    "clip": Function("Clip", 3),
    "pow": Function("Pow", 2),
    "prelu": Function("PRelu", 2),
    "max": Function("Max", None),
    "min": Function("Min", None),
    "sum": Function("Sum", None),
    "mean": Function("Mean", None),
}

_BINARY_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}
_UNARY_PRECEDENCE = 3
_ATOM_PRECEDENCE = 4


class ExprError(ValueError):
    """A malformed expression (the op turns it into an InvalidAttributeError)."""


def function_for(op: str, attrs: dict) -> tuple[str, tuple[float, ...]] | None:
    """(function name, params) that writes registry op ``op`` with full ``attrs``; None if the
    expression language cannot write it."""
    for name, fn in FUNCTIONS.items():
        if fn.op == op and all(attrs.get(k) == v for k, v in fn.fixed):
            return name, tuple(float(attrs[p]) for p in fn.params)
    return None


# -- printing ------------------------------------------------------------------------------------
def format_number(value: float) -> str:
    """Python's shortest round-trip form (``0.1``, ``1e-07``, ``-inf``, ``nan``)."""
    return repr(float(value))


def _precedence(expr: Expr) -> int:
    if isinstance(expr, Literal):
        return _UNARY_PRECEDENCE if format_number(expr.value).startswith("-") else _ATOM_PRECEDENCE
    if isinstance(expr, Call) and FUNCTIONS[expr.func].symbol:
        return _UNARY_PRECEDENCE if len(expr.args) == 1 else _BINARY_PRECEDENCE[
            FUNCTIONS[expr.func].symbol]
    return _ATOM_PRECEDENCE


def _wrapped(expr: Expr, parens: bool) -> str:
    return f"({to_text(expr)})" if parens else to_text(expr)


def to_text(expr: Expr) -> str:
    """The canonical text of ``expr`` (``parse_expr(to_text(e)) == e``)."""
    if isinstance(expr, Input):
        return f"x{expr.index}"
    if isinstance(expr, Literal):
        return format_number(expr.value)
    symbol = FUNCTIONS[expr.func].symbol
    if symbol and len(expr.args) == 1:
        # a literal under a prefix minus keeps parentheses: "-2.0" would read as one literal
        arg = expr.args[0]
        return "-" + _wrapped(arg, isinstance(arg, Literal) or _precedence(arg) < _UNARY_PRECEDENCE)
    if symbol:
        left, right = expr.args
        mine = _BINARY_PRECEDENCE[symbol]
        # the right operand of equal precedence keeps its parentheses: a - (b - c), a + (b + c)
        return (f"{_wrapped(left, _precedence(left) < mine)} {symbol} "
                f"{_wrapped(right, _precedence(right) <= mine)}")
    args = [to_text(a) for a in expr.args] + [format_number(p) for p in expr.params]
    return f"{expr.func}({', '.join(args)})"


# -- parsing -------------------------------------------------------------------------------------
_TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<punct>[-+*/(),])
""", re.VERBOSE)
_INPUT_NAME = re.compile(r"x(0|[1-9][0-9]*)")
_SPECIAL_NUMBERS = ("inf", "nan")


class _Parser:
    """Recursive descent over the grammar in the module docstring."""

    def __init__(self, text: str):
        self.text = text
        self.tokens: list[tuple[str, str, int]] = []
        pos = 0
        while pos < len(text):
            m = _TOKEN.match(text, pos)
            if not m:
                raise self.error(f"unexpected character {text[pos]!r}", pos)
            if m.lastgroup != "ws":
                self.tokens.append((m.lastgroup, m.group(), pos))
            pos = m.end()
        self.i = 0

    def error(self, message: str, pos: int | None = None) -> ExprError:
        if pos is None:
            pos = self.tokens[self.i][2] if self.i < len(self.tokens) else len(self.text)
        return ExprError(f"{message} at column {pos + 1} of {self.text!r}")

    def peek(self) -> tuple[str, str, int] | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def accept(self, text: str) -> bool:
        token = self.peek()
        if token is not None and token[0] == "punct" and token[1] == text:
            self.i += 1
            return True
        return False

    def expect(self, text: str) -> None:
        if not self.accept(text):
            token = self.peek()
            found = repr(token[1]) if token else "the end"
            raise self.error(f"expected {text!r}, found {found}")

    def parse(self) -> Expr:
        if not self.tokens:
            raise self.error("empty expression")
        expr = self.sum()
        if self.peek() is not None:
            raise self.error(f"unexpected {self.peek()[1]!r}")
        return expr

    def sum(self) -> Expr:
        expr = self.product()
        while True:
            for symbol, func in (("+", "add"), ("-", "sub")):
                if self.accept(symbol):
                    expr = Call(func, (expr, self.product()))
                    break
            else:
                return expr

    def product(self) -> Expr:
        expr = self.unary()
        while True:
            for symbol, func in (("*", "mul"), ("/", "div")):
                if self.accept(symbol):
                    expr = Call(func, (expr, self.unary()))
                    break
            else:
                return expr

    def unary(self) -> Expr:
        if self.accept("-"):
            token = self.peek()
            if token and (token[0] == "number" or token[1] in _SPECIAL_NUMBERS):
                self.i += 1
                return Literal(-float(token[1]))
            return Call("neg", (self.unary(),))
        return self.atom()

    def atom(self) -> Expr:
        token = self.peek()
        if token is None:
            raise self.error("expected an operand, found the end")
        kind, text, pos = token
        self.i += 1
        if kind == "number" or text in _SPECIAL_NUMBERS:
            return Literal(float(text))
        if text == "(":
            expr = self.sum()
            self.expect(")")
            return expr
        if kind != "name":
            raise self.error(f"expected an operand, found {text!r}", pos)
        m = _INPUT_NAME.fullmatch(text)
        if m:
            return Input(int(m.group(1)))
        if not self.accept("("):
            raise self.error(f"unknown name {text!r} (inputs are x0, x1, ...)", pos)
        return self.call(text, pos)

    def call(self, name: str, pos: int) -> Expr:
        fn = FUNCTIONS.get(name)
        if fn is None or fn.symbol:
            known = ", ".join(n for n, f in FUNCTIONS.items() if not f.symbol)
            raise self.error(f"unknown function {name!r} (known: {known})", pos)
        args = [self.sum()]
        while self.accept(","):
            args.append(self.sum())
        self.expect(")")
        return _make_call(name, fn, args, lambda msg: self.error(msg, pos))


def _make_call(name: str, fn: Function, args: list, error: Callable[[str], ExprError]) -> Call:
    n_operands = len(args) - len(fn.params)
    if (n_operands < 1) if fn.arity is None else (n_operands != fn.arity):
        want = "one or more operands" if fn.arity is None else f"{fn.arity} operand(s)"
        params = f" and {len(fn.params)} number(s) ({', '.join(fn.params)})" if fn.params else ""
        raise error(f"{name} takes {want}{params}, got {len(args)} arguments")
    params = args[n_operands:]
    for pname, p in zip(fn.params, params, strict=True):
        if not isinstance(p, Literal):
            raise error(f"{name}'s parameter {pname} must be a number, got {to_text(p)!r}")
    return Call(name, tuple(args[:n_operands]), tuple(p.value for p in params))


def _check_structure(expr: Expr, text: str) -> None:
    """Every operation needs an operand that is not a literal (literals take its dtype)."""
    if isinstance(expr, Literal):
        raise ExprError(f"{text!r} is a bare literal; a fused body needs an input")
    if isinstance(expr, Call):
        if all(isinstance(a, Literal) for a in expr.args):
            raise ExprError(f"every operand of {to_text(expr)!r} is a literal (in {text!r})")
        for a in expr.args:
            if not isinstance(a, Literal):
                _check_structure(a, text)


@functools.lru_cache(maxsize=4096)
def parse_expr(text: str) -> Expr:
    """The tree of an expression; ExprError if it is malformed."""
    try:
        expr = _Parser(text).parse()
        _check_structure(expr, text)
    except RecursionError:
        raise ExprError(f"expression nested too deeply ({len(text)} characters)") from None
    return expr


def expr_problem(text: str) -> str | None:
    """The attribute check of ``expr``: why it does not parse, or None."""
    try:
        parse_expr(text)
    except ExprError as exc:
        return str(exc)
    return None


# -- tree utilities (for the fuse-elementwise pass) -----------------------------------------------
def inputs_used(expr: Expr) -> list[int]:
    """Input indices in order of first appearance, left to right."""
    return list(input_reads(expr))


def input_reads(expr: Expr) -> dict[int, int]:
    """How many times the body reads each input (``x0 * x0`` reads x0 twice)."""
    reads: dict[int, int] = {}

    def visit(e: Expr) -> None:
        if isinstance(e, Input):
            reads[e.index] = reads.get(e.index, 0) + 1
        elif isinstance(e, Call):
            for a in e.args:
                visit(a)

    visit(expr)
    return reads


def depth(expr: Expr) -> int:
    """Operations on the longest path from the result to a leaf."""
    if isinstance(expr, Call):
        return 1 + max(depth(a) for a in expr.args)
    return 0


def substitute(expr: Expr, operands: Sequence[Expr]) -> Expr:
    """``expr`` with every ``x<i>`` replaced by ``operands[i]``."""
    if isinstance(expr, Input):
        return operands[expr.index]
    if isinstance(expr, Call):
        return Call(expr.func, tuple(substitute(a, operands) for a in expr.args), expr.params)
    return expr


def renumber(expr: Expr) -> tuple[Expr, list[int]]:
    """``expr`` with inputs numbered by first appearance, and the old index of each new one."""
    order = inputs_used(expr)
    new = {old: Input(i) for i, old in enumerate(order)}
    operands = [new.get(i, Input(i)) for i in range(max(order, default=-1) + 1)]
    return substitute(expr, operands), order


# -- shape rule and reference ---------------------------------------------------------------------
def _fold(expr: Expr, leaf: Callable, literal: Callable, apply: Callable):
    """Evaluate bottom-up: ``leaf(index)`` for inputs, ``literal(value, sibling)`` for literals
    (``sibling`` is the first non-literal operand's result), ``apply(call, operands)``."""
    if isinstance(expr, Input):
        return leaf(expr.index)
    done = [None if isinstance(a, Literal) else _fold(a, leaf, literal, apply) for a in expr.args]
    sibling = next(d for d in done if d is not None)  # _check_structure guarantees one
    operands = [literal(a.value, sibling) if d is None else d
                for a, d in zip(expr.args, done, strict=True)]
    return apply(expr, operands)


def _op_call(node: str, expr: Call, in_types) -> tuple[OpDef, OpCall]:
    fn = FUNCTIONS[expr.func]
    opdef = registry.get(fn.op, node)
    attrs = {**dict(fn.fixed), **dict(zip(fn.params, expr.params, strict=True))}
    return opdef, registry.make_call(opdef, node, attrs, in_types)


def _parsed(call: OpCall) -> Expr:
    try:
        expr = parse_expr(call["expr"])
    except ExprError as exc:
        raise InvalidAttributeError(f"FusedElementwise node '{call.node}': attribute 'expr': "
                                    f"{exc}") from None
    used = inputs_used(expr)
    n = len(call.in_types)
    if sorted(used) != list(range(n)):
        bad = sorted(set(used) - set(range(n)))
        problem = (f"uses x{bad[0]} but the node has {n} input(s)" if bad else
                   f"does not use x{min(set(range(n)) - set(used))}")
        raise InvalidAttributeError(f"FusedElementwise node '{call.node}': attribute 'expr' "
                                    f"{call['expr']!r} {problem}")
    return expr


def _infer_with_flops(call: OpCall) -> tuple[TensorType, int]:
    """The result type, and the FLOPs of every operation in the body."""
    flops = [0]

    def apply(sub: Call, types):
        opdef, inner = _op_call(call.node, sub, types)
        try:
            out = registry.infer_types(opdef, inner)
        except GraphcError as exc:
            raise call.error(f"in {to_text(sub)!r}: {exc}") from None
        if opdef.flops and out[0].is_static:
            flops[0] += opdef.flops(inner, out)
        return out[0]

    out = _fold(_parsed(call), call.in_types.__getitem__,
                lambda value, sibling: TensorType((), sibling.dtype), apply)
    return out, flops[0]


def infer_fused_elementwise(call: OpCall) -> list[TensorType]:
    return [_infer_with_flops(call)[0]]


def fused_elementwise_reference(call: OpCall, *xs: np.ndarray) -> np.ndarray:
    def apply(sub: Call, arrays):
        opdef, inner = _op_call(call.node, sub, [TensorType.of(a) for a in arrays])
        return np.asarray(opdef.reference(inner, *arrays))

    return _fold(_parsed(call), xs.__getitem__,
                 lambda value, sibling: np.asarray(value, dtype=sibling.dtype), apply)


def fused_elementwise_flops(call: OpCall, out_types) -> int:
    return _infer_with_flops(call)[1] if out_types[0].is_static else 0


register(OpDef(
    name="FusedElementwise", inputs=("inputs*",), outputs=("Y",),
    attrs={"expr": Attr("string", REQUIRED, expr_problem)},
    infer=infer_fused_elementwise, reference=fused_elementwise_reference, kind="broadcast",
    flops=fused_elementwise_flops,
    doc="expr over the inputs x0, x1, ... (numpy broadcasting): a tree of elementwise ops "
        "fused into one node; each operation runs its registry op"))
