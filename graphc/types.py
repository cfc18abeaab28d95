"""Tensor types: a shape (ints, or strings for symbolic dims such as a batch ``N``) and a dtype.

Text form: ``f32[N,3,224,224]``, ``i64[4]``, ``f32[]`` for a scalar. Types are frozen and
hashable so that passes can compare them with ``==``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .errors import GraphcError, ParseError

Dim = int | str

# Short text name <-> numpy dtype.  float32 is for compute, int64 for shape tensors; the others
# appear in ONNX models (masks, casts) and in float64 gradient checks.
_DTYPES = {
    "f16": np.dtype(np.float16),
    "f32": np.dtype(np.float32),
    "f64": np.dtype(np.float64),
    "i8": np.dtype(np.int8),
    "i16": np.dtype(np.int16),
    "i32": np.dtype(np.int32),
    "i64": np.dtype(np.int64),
    "u8": np.dtype(np.uint8),
    "u16": np.dtype(np.uint16),
    "u32": np.dtype(np.uint32),
    "u64": np.dtype(np.uint64),
    "bool": np.dtype(np.bool_),
}
_SHORT = {v: k for k, v in _DTYPES.items()}
FLOAT_DTYPES = ("f16", "f32", "f64")
INT_DTYPES = ("i8", "i16", "i32", "i64", "u8", "u16", "u32", "u64")


def dtype_name(dtype) -> str:
    """Short name (``'f32'``) of a numpy dtype or short name; GraphcError if unsupported."""
    if isinstance(dtype, str) and dtype in _DTYPES:
        return dtype
    try:
        return _SHORT[np.dtype(dtype)]
    except (KeyError, TypeError) as exc:
        raise GraphcError(f"unsupported dtype {dtype!r}; graphc supports "
                          f"{sorted(_DTYPES)}") from exc


def numpy_dtype(name: str) -> np.dtype:
    return _DTYPES[dtype_name(name)]


@dataclass(frozen=True)
class TensorType:
    shape: tuple[Dim, ...]
    dtype: str = "f32"

    def __post_init__(self):
        object.__setattr__(self, "dtype", dtype_name(self.dtype))
        shape = tuple(d if isinstance(d, str) else int(d) for d in self.shape)
        object.__setattr__(self, "shape", shape)

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def is_static(self) -> bool:
        return all(isinstance(d, int) for d in self.shape)

    @property
    def numel(self) -> int:
        """Element count; GraphcError if a dim is symbolic."""
        if not self.is_static:
            raise GraphcError(f"type {self} has symbolic dims; its size is not known statically")
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def np_dtype(self) -> np.dtype:
        return _DTYPES[self.dtype]

    def with_shape(self, shape) -> TensorType:
        return TensorType(tuple(shape), self.dtype)

    def with_dtype(self, dtype) -> TensorType:
        return TensorType(self.shape, dtype)

    def __str__(self) -> str:
        return f"{self.dtype}[{','.join(str(d) for d in self.shape)}]"

    @staticmethod
    def of(array: np.ndarray) -> TensorType:
        return TensorType(tuple(array.shape), dtype_name(array.dtype))

    @staticmethod
    def parse(text: str) -> TensorType:
        match = _TYPE_RE.fullmatch(text.strip())
        if not match or match.group(1) not in _DTYPES:
            raise ParseError(f"bad tensor type {text!r}; expected e.g. f32[N,3,32,32]")
        dims = [d.strip() for d in match.group(2).split(",") if d.strip()]
        shape = tuple(int(d) if _INT_RE.fullmatch(d) else d for d in dims)
        return TensorType(shape, match.group(1))

    def matches(self, array: np.ndarray, bindings: dict | None = None) -> bool:
        """True if ``array`` has this dtype and shape; binds symbolic dims in ``bindings``."""
        if _SHORT.get(array.dtype) != self.dtype:
            return False
        if array.ndim != self.rank:
            return False
        bindings = {} if bindings is None else bindings
        for want, got in zip(self.shape, array.shape):
            if isinstance(want, str):
                if bindings.setdefault(want, got) != got:
                    return False
            elif want != got:
                return False
        return True


_TYPE_RE = re.compile(r"([a-z0-9]+)\[([^\]]*)\]")
_INT_RE = re.compile(r"-?\d+")
