"""Kernel IR -> CUDA source directly: constructs the lowerings rarely emit (a top-level loop
that is not parallel, tables, selects, bool and 64-bit integer buffers, shadowed names in
sibling loops), checked against numpy computing the kernel's documented semantics."""

from __future__ import annotations

import numpy as np
import pytest

from backends import kernel_ir as k
from backends.cuda.codegen import (
    SIMULATOR_LAUNCH,
    compile_source,
    kernel_source,
    launch_shape,
)
from backends.kernel_ir import INDEX, Const, Load, Var

pytestmark = [pytest.mark.cuda,  # wrapping integer arithmetic warns in the simulator
              pytest.mark.filterwarnings("ignore:overflow encountered")]


def _kernel(n: int) -> k.Kernel:
    """out[i] = x[T[i]] * 3 (i64, wrapping) if flag[i] else -x[i]; total[0] = sum of x, by one
    thread; the two loops both name their variable and local ``i`` / ``t``."""
    i = Var("i")
    x = Load("x", (i,), "i64")
    gathered = Load("x", (k.Lookup("T", i),), "i64")
    body = (k.Let("t", k.Binary("*", gathered, Const(3, "i64"))),
            k.Store("out", (i,), k.Select(Load("flag", (i,), "bool"), k.Local("t", "i64"),
                                          k.Unary("neg", x))))
    total = (k.Let("t", Const(0, "i64"), mutable=True),
             k.For("j", n, (k.Accumulate("t", "add", Load("x", (Var("j"),), "i64")),)),
             k.Store("total", (Const(0, INDEX),), k.Local("t", "i64")))
    return k.verify(k.Kernel(
        "mixed", (k.Buffer("x", "i64", (n,)), k.Buffer("flag", "bool", (n,)),
                  k.Buffer("out", "i64", (n,), output=True),
                  k.Buffer("total", "i64", (1,), output=True)),
        (k.For("i", n, body, parallel=True), k.For("i", 1, total)),
        tables=(k.Table("T", tuple(range(n - 1, -1, -1))),)))


@pytest.mark.parametrize("n", [1, 5, 37])
def test_hand_written_kernel_matches_its_semantics(cuda_device, n):
    rng = np.random.default_rng(n)
    x = rng.integers(-2**62, 2**62, n, dtype=np.int64)
    x[0] = np.iinfo(np.int64).max  # * 3 wraps
    flag = rng.random(n) < 0.5
    cuda_k = kernel_source(_kernel(n))
    assert "if start == 0:" in cuda_k.source and "tbl_T" in cuda_k.source
    kernel = compile_source(cuda_device, cuda_k.source)
    args = [cuda_device.to_device(x), cuda_device.to_device(flag),
            cuda_device.device_array(n, np.int64), cuda_device.device_array(1, np.int64)]
    kernel[launch_shape(cuda_k.extent, SIMULATOR_LAUNCH)](*args)
    with np.errstate(over="ignore"):
        want = np.where(flag, x[::-1] * np.int64(3), -x)
        total = x.sum()
    np.testing.assert_array_equal(args[2].copy_to_host(), want)
    assert args[3].copy_to_host()[0] == total


def test_identical_kernels_compile_once(cuda_device):
    first = compile_source(cuda_device, kernel_source(_kernel(4)).source)
    assert compile_source(cuda_device, kernel_source(_kernel(4)).source) is first
