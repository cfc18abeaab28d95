"""Every error a user can cause is a ``GraphcError``; each subclass names what is at fault.

Internal invariants still use ``assert``/``RuntimeError``; anything reachable from user input
(a model file, a feed, an attribute, IR text) raises one of these instead.
"""

from __future__ import annotations


class GraphcError(Exception):
    """Base class of every user-facing graphc error."""


class ModelFileError(GraphcError):
    """A model file is missing, empty, truncated, not ONNX, or lacks its external data."""


class UnsupportedOpError(GraphcError):
    """An op (type, domain or opset) graphc does not implement."""


class InvalidAttributeError(GraphcError):
    """An attribute is missing, unknown or out of range."""


class ShapeError(GraphcError):
    """Shapes or dtypes of a node's inputs do not fit the op."""


class VerificationError(GraphcError):
    """The graph breaks an IR invariant (cycle, arity, dangling input, stale type)."""


class FeedError(GraphcError):
    """A feed passed to ``interpret``/``run`` is missing, unknown or of the wrong type."""


class ParseError(GraphcError):
    """IR text that does not parse; the message gives the line."""


class GraphBuildError(GraphcError):
    """Misuse of the builder API (mixing graphs, duplicate names, bad operands)."""
