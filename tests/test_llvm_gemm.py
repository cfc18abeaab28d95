"""The LLVM JIT target and the generated SGEMM against numpy (float64 references).

Tolerances: a GEMM result is compared elementwise against the float64 product with
``|c - ref| <= 1e-5 * (|A| @ |B| + |bias| + |residual|)`` (the magnitude grows with K, so the
bound is K-scaled), tight enough that a lost or doubled K block, row or column fails. Runs that
differ only in packing or thread split must agree bit for bit: every element is summed in the
same order whoever computes it.
"""

from __future__ import annotations

import ctypes
import threading
import time

import numpy as np
import pytest
from llvmlite import ir

from backends.llvm import LLVMCodegenError, host_target
from backends.llvm.gemm import (
    EPILOGUE_PARAMS,
    EpilogueSpec,
    GemmBlocking,
    PackedB,
    Sgemm,
    compile_kernel,
)
from graphc.errors import GraphcError, InvalidAttributeError, ShapeError
from graphc.ops.epilogue import ACTIVATIONS, apply_activation

# a tiny blocking makes small shapes cross every block edge (several jc, pc and ic blocks,
# partial tiles in both directions, a k remainder after the unrolled loop)
TINY = GemmBlocking(mr=4, nr=16, kc=7, mc=8, nc=32, unroll=3)
DEFAULT = GemmBlocking()
PARAMS = {"leaky_relu": (0.1,), "clip": (-0.5, 0.7), "elu": (1.3,),
          "selu": (1.6732632, 1.050701), "hard_sigmoid": (0.2, 0.5)}


def threaded(threads, blocking=None):
    """An Sgemm that really runs ``threads`` threads, however small the GEMM."""
    return Sgemm(threads, blocking, min_parallel_flops=0)


def rand(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def reference(a, b, bias=None, bias_axis=-1, residual=None, activation=""):
    """float64 result and the magnitude the rounding error scales with."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    y, scale = a64 @ b64, np.abs(a64) @ np.abs(b64)
    if bias is not None:
        b1 = bias.astype(np.float64)
        b1 = b1 if bias_axis == -1 else b1[:, None]
        y, scale = y + b1, scale + np.abs(b1)
    if residual is not None:
        y, scale = y + residual, scale + np.abs(residual)
    with np.errstate(over="ignore", invalid="ignore"):
        y = apply_activation(activation, PARAMS.get(activation, ()), y)
    return y, scale


def assert_gemm_close(c, ref, scale, lipschitz=1.0):
    assert c.shape == ref.shape
    bound = 1e-5 * lipschitz * scale + 2e-6 * np.abs(ref) + 1e-30
    err = np.abs(c.astype(np.float64) - ref)
    worst = np.unravel_index(np.argmax(err - bound), err.shape) if err.size else None
    assert np.all(err <= bound), f"error {err[worst]} > {bound[worst]} at {worst}"


# -- the target ------------------------------------------------------------------------------------
def _add_module(name, body):
    module = ir.Module(name=name)
    fn = ir.Function(module, ir.FunctionType(ir.FloatType(), [ir.FloatType()] * 2), name)
    body(ir.IRBuilder(fn.append_basic_block("entry")), fn)
    return module


def test_target_is_the_host_cpu_at_o3():
    target = host_target()
    assert target is host_target()
    assert target.cpu and target.features and target.speed_level == 3
    assert target.triple.startswith("x86_64") or target.triple


def test_compile_runs_and_exposes_ir_and_assembly():
    def body(b, fn):
        b.ret(b.fadd(b.fmul(fn.args[0], fn.args[1]), fn.args[1]))

    compiled = host_target().compile(_add_module("t_muladd", body))
    f = compiled.ctypes_function("t_muladd", ctypes.c_float, ctypes.c_float, ctypes.c_float)
    assert f(3.0, 2.0) == 8.0
    assert "define float @t_muladd" in compiled.optimised_ir
    assert "t_muladd:" in compiled.assembly
    with pytest.raises(LLVMCodegenError, match="defines no function 'nope'"):
        compiled.address("nope")


def test_invalid_ir_raises_with_llvms_message():
    def body(b, fn):
        x = b.fadd(fn.args[0], fn.args[1], name="x")
        y = b.fmul(x, x, name="y")
        b.ret(y)
        order = b.block.instructions  # swap them: %y now uses %x before %x is defined
        order[0], order[1] = order[1], order[0]

    with pytest.raises(LLVMCodegenError, match="t_bad.*verification.*dominate") as info:
        host_target().compile(_add_module("t_bad", body))
    assert isinstance(info.value, GraphcError)


def test_a_symbol_cannot_be_jitted_twice():
    def body(b, fn):
        b.ret(fn.args[0])

    host_target().compile(_add_module("t_twice", body))
    with pytest.raises(LLVMCodegenError, match="redefines 't_twice'"):
        host_target().compile(_add_module("t_twice", body))


def test_kernel_code_is_inspectable_and_vectorised():
    kernel = compile_kernel(DEFAULT, EpilogueSpec())
    assert "<16 x float>" in kernel.llvm_ir and "llvm.fma.v16f32" in kernel.llvm_ir
    if host_target().has_feature("avx512f"):
        assert "vfmadd231ps" in kernel.assembly and "zmm" in kernel.assembly
    assert kernel.symbol in kernel.module.addresses


# -- shapes ----------------------------------------------------------------------------------------
SHAPES = [(1, 1, 1), (2, 3, 5), (7, 13, 17), (31, 37, 41), (257, 129, 65), (300, 5, 11),
          (3, 300, 19), (64, 48, 1), (1, 70, 600), (33, 2100, 3), (5, 7, 0), (0, 4, 3),
          (4, 0, 3)]


@pytest.mark.parametrize("blocking", [DEFAULT, TINY], ids=["default", "tiny"])
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_shapes_match_numpy(rng, blocking, m, n, k):
    a, b = rand(rng, m, k), rand(rng, k, n)
    c = Sgemm(1, blocking)(a, b)
    assert_gemm_close(c, *reference(a, b))


@pytest.mark.parametrize("m,n,k", [(257, 129, 65), (96, 300, 700), (9, 2000, 40)])
def test_two_threads_and_prepacked_b_agree_bit_for_bit(rng, m, n, k):
    a, b = rand(rng, m, k), rand(rng, k, n)
    one = Sgemm(1)(a, b)
    assert_gemm_close(one, *reference(a, b))
    two = threaded(2)
    np.testing.assert_array_equal(two(a, b), one)
    packed = two.pack_b(b)
    assert isinstance(packed, PackedB) and packed.data.ctypes.data % 64 == 0
    np.testing.assert_array_equal(two(a, packed), one)


@pytest.mark.parametrize("n_threads", [2, 3, 5])
@pytest.mark.parametrize("prepacked", [False, True])
@pytest.mark.parametrize("m,n", [(45, 83), (83, 45), (3, 200), (200, 3)])
def test_thread_shares_tile_c_exactly(rng, n_threads, prepacked, m, n):
    """Each tid writes into its own NaN-filled C: the written parts must be disjoint, cover
    C, and together equal the product (both split directions, and bands fewer than threads)."""
    k = 20
    a, b = rand(rng, m, k), rand(rng, k, n)
    s = Sgemm(1, TINY)
    kernel = s.kernel(EpilogueSpec(prepacked_b=prepacked))
    bmat = s.pack_b(b).data if prepacked else b
    params, ws = np.zeros(1, np.float32), np.empty(TINY.workspace_floats, np.float32)
    total = np.zeros((m, n), np.float32)
    owners = np.zeros((m, n), int)
    for tid in range(n_threads):
        out = np.full((m, n), np.nan, np.float32)
        kernel.function(1, m, n, k, a.ctypes.data, k, 0, bmat.ctypes.data, n, 0,
                        out.ctypes.data, n, 0, None, None, 0, 0, params.ctypes.data,
                        ws.ctypes.data, tid, n_threads)
        written = ~np.isnan(out)
        owners += written
        total[written] = out[written]
    assert np.all(owners == 1)
    assert_gemm_close(total, *reference(a, b))


def test_python_threads_calling_the_kernel_concurrently(rng):
    """The contract the graph runtime relies on: N threads, each calling the ctypes function
    with its tid, compute C together with no lock."""
    m, n, k = 301, 157, 530
    a, b = rand(rng, m, k), rand(rng, k, n)
    kernel = compile_kernel(DEFAULT, EpilogueSpec(bias="col", activation="relu"))
    bias, params = rand(rng, n), np.zeros(1, np.float32)
    out = np.full((m, n), np.nan, np.float32)
    workspaces = [np.empty(DEFAULT.workspace_floats, np.float32) for _ in range(3)]

    def share(tid):
        kernel.function(1, m, n, k, a.ctypes.data, k, 0, b.ctypes.data, n, 0,
                        out.ctypes.data, n, 0, bias.ctypes.data, None, 0, 0, params.ctypes.data,
                        workspaces[tid].ctypes.data, tid, 3)

    threads = [threading.Thread(target=share, args=(tid,)) for tid in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert_gemm_close(out, *reference(a, b, bias, activation="relu"))


def test_pool_survives_idle_gaps(rng):
    """Workers spin for a while after a job, then sleep: calls both soon after each other and
    after a pause must work (the pause exercises the wake-up path)."""
    s = threaded(2, TINY)
    for i in range(6):
        a, b = rand(rng, 19 + i, 23), rand(rng, 23, 17)
        assert_gemm_close(s(a, b), *reference(a, b))
        if i % 2:
            time.sleep(0.01)


# -- epilogues -------------------------------------------------------------------------------------
@pytest.mark.parametrize("blocking, bias_axis, with_residual", [
    (TINY, None, True), (TINY, -1, False), (TINY, -2, False), (TINY, -1, True),
    (TINY, -2, True), (DEFAULT, -2, True)])
def test_bias_and_residual(rng, blocking, bias_axis, with_residual):
    m, n, k = 37, 53, 29
    a, b = rand(rng, m, k), rand(rng, k, n)
    bias = None if bias_axis is None else rand(rng, n if bias_axis == -1 else m)
    residual = rand(rng, m, n) if with_residual else None
    c = threaded(2, blocking)(a, b, bias=bias, bias_axis=-1 if bias_axis is None else bias_axis,
                           residual=residual)
    assert_gemm_close(c, *reference(a, b, bias, bias_axis or -1, residual))


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_every_activation_with_bias_and_residual(rng, activation):
    m, n, k = 19, 45, 23
    a, b, bias, residual = rand(rng, m, k), rand(rng, k, n), rand(rng, n), rand(rng, m, n)
    params = PARAMS.get(activation, ())
    assert len(params) == len(EPILOGUE_PARAMS[activation])
    c = Sgemm(1, TINY)(a, b, bias=bias, residual=residual, activation=activation,
                       activation_params=params)
    assert_gemm_close(c, *reference(a, b, bias, -1, residual, activation), lipschitz=2.0)


# inputs from -inf to inf through the ranges each approximation switches at
SPECIAL = np.array([-np.inf, -1e30, -104.5, -103.0, -90.0, -87.9, -50.0, -20.0, -9.0, -3.0,
                    -1.0, -0.6, -0.4142, -0.3, -1e-3, -1e-8, -1e-30, -0.0, 0.0, 1e-30, 1e-8,
                    1e-3, 0.3, 0.4142, 0.6, 1.0, 2.5, 3.0, 6.0, 9.0, 20.0, 50.0, 88.0, 89.0,
                    1e30, np.inf, np.nan], np.float32)


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_activation_math_is_accurate_everywhere(rng, activation):
    """C = 1 x X (K = 1), so C == X exactly and only the activation's own error remains."""
    x = np.concatenate([SPECIAL, rng.uniform(-30, 30, 400).astype(np.float32),
                        rng.uniform(-1, 1, 100).astype(np.float32)])[None, :]
    params = PARAMS.get(activation, ())
    c = Sgemm(1, TINY)(np.ones((1, 1), np.float32), x, activation=activation,
                       activation_params=params)
    with np.errstate(over="ignore", invalid="ignore"):  # inf * 0 in hard_swish's reference
        want = apply_activation(activation, params, x.astype(np.float64))
    np.testing.assert_allclose(c, want, rtol=3e-6, atol=1e-38, equal_nan=True)
    assert np.array_equal(np.isnan(c), np.isnan(want))


def test_nan_in_an_input_propagates(rng):
    a, b = rand(rng, 20, 30), rand(rng, 30, 40)
    a[3, 7] = np.nan
    c = Sgemm(1)(a, b, activation="relu")
    assert np.isnan(c[3]).all() and not np.isnan(np.delete(c, 3, axis=0)).any()


# -- batches, strides, outputs ---------------------------------------------------------------------
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("b_kind", ["batched", "shared", "prepacked"])
def test_batched(rng, threads, b_kind):
    batch, m, n, k = 5, 23, 70, 33
    a = rand(rng, batch, m, k)
    b3 = rand(rng, batch, k, n)
    b = b3[0] if b_kind == "shared" else b3
    s = threaded(threads, TINY)
    operand = s.pack_b(b) if b_kind == "prepacked" else b
    residual = rand(rng, batch, m, n)
    c = s(a, operand, residual=residual, activation="relu")
    for i in range(batch):
        bi = b if b.ndim == 2 else b[i]
        assert_gemm_close(c[i], *reference(a[i], bi, residual=residual[i], activation="relu"))


def test_batch_smaller_than_thread_count(rng):
    a, b = rand(rng, 2, 130, 40), rand(rng, 2, 40, 150)
    c = threaded(3)(a, b)
    for i in range(2):
        assert_gemm_close(c[i], *reference(a[i], b[i]))


def test_strided_operands_and_output_leave_padding_untouched(rng):
    m, n, k = 29, 35, 41
    big_a, big_b = rand(rng, m, k + 9), rand(rng, k + 3, n + 20)
    a, b = big_a[:, 4:4 + k], big_b[2:2 + k, 5:5 + n]
    canvas = np.full((m + 4, n + 17), 7.0, np.float32)
    out = canvas[2:2 + m, 3:3 + n]
    bias = rand(rng, n)
    result = threaded(2, TINY)(a, b, out=out, bias=bias)
    assert result is out
    assert_gemm_close(out, *reference(a, b, bias))
    inner = np.zeros(canvas.shape, bool)
    inner[2:2 + m, 3:3 + n] = True
    assert np.all(canvas[~inner] == 7.0)


def test_strided_output_matches_reference(rng):
    m, n, k = 29, 35, 41
    a, b, bias = rand(rng, m, k), rand(rng, k, n), rand(rng, m)
    canvas = np.zeros((m, n + 13), np.float32)
    out = Sgemm(1, TINY)(a[:, :], b, out=canvas[:, 6:6 + n], bias=bias, bias_axis=-2)
    assert_gemm_close(out, *reference(a, b, bias, -2))


def test_residual_may_be_the_output(rng):
    m, n, k = 30, 40, 50   # K spans several TINY K blocks: C holds partial sums meanwhile
    a, b, z = rand(rng, m, k), rand(rng, k, n), rand(rng, m, n)
    want = reference(a, b, residual=z)
    out = z.copy()
    Sgemm(1, TINY)(a, b, out=out, residual=out)
    assert_gemm_close(out, *want)


def test_broadcast_rows_are_read_in_place(rng):
    a = np.broadcast_to(rand(rng, 1, 30), (20, 30))   # row stride 0
    b = np.broadcast_to(rand(rng, 1, 30, 40), (3, 30, 40))  # batch stride 0
    c = Sgemm(1, TINY)(np.broadcast_to(a, (3, 20, 30)), b)
    for i in range(3):
        assert_gemm_close(c[i], *reference(np.asarray(a), np.asarray(b[i])))


def test_non_contiguous_columns_are_copied(rng):
    a, b = rand(rng, 20, 30), rand(rng, 40, 30).T  # b's columns are strided
    assert_gemm_close(Sgemm(1)(a, b), *reference(a, b))


# -- small M (a GEMV) and transposed operands ----------------------------------------------------
@pytest.mark.parametrize("m", [1, 2, 3])
@pytest.mark.parametrize("k", [1, 5, 517])
@pytest.mark.parametrize("n", [1, 17, 70])
def test_small_m_rotating_accumulators(rng, m, k, n):
    """Tiles of 1..3 rows sum k over several accumulator chains: still exact to the bound,
    and the same bits whatever the thread split or packing."""
    a, b, bias = rand(rng, m, k), rand(rng, k, n), rand(rng, n)
    one = Sgemm(1)(a, b, bias=bias, activation="relu")
    assert_gemm_close(one, *reference(a, b, bias, activation="relu"))
    two = threaded(2)
    np.testing.assert_array_equal(two(a, two.pack_b(b), bias=bias, activation="relu"), one)


@pytest.mark.parametrize("blocking", [DEFAULT, TINY], ids=["default", "tiny"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("m,n,k", [(1, 3, 5), (2, 33, 17), (3, 70, 600), (37, 20, 3),
                                   (45, 83, 29)])
def test_transposed_views_are_packed_in_place(rng, blocking, threads, m, n, k):
    """``x.T`` operands (dW = X^T dY, dX = dY W^T) are read transposed by the packing."""
    at, bt = rand(rng, k, m), rand(rng, n, k)
    a, b = np.ascontiguousarray(at.T), np.ascontiguousarray(bt.T)
    bias, residual = rand(rng, n), rand(rng, m, n)
    sgemm = threaded(threads, blocking)
    want = reference(a, b, bias, residual=residual, activation="tanh")
    for x, y in ((at.T, b), (a, bt.T), (at.T, bt.T)):
        got = sgemm(x, y, bias=bias, residual=residual, activation="tanh")
        assert_gemm_close(got, *want)
    wide = rand(rng, k, m + 5)[:, :m]        # a row stride larger than the row
    assert_gemm_close(sgemm(wide.T, b), *reference(np.ascontiguousarray(wide.T), b))


def test_transposed_kernels_are_distinct_specs():
    assert EpilogueSpec(trans_a=True).tag == "ta"
    assert EpilogueSpec(trans_b=True, bias="col").tag == "bcol_tb"
    with pytest.raises(InvalidAttributeError, match="pre-packed B"):
        EpilogueSpec(prepacked_b=True, trans_b=True)


# -- errors ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("call, error, match", [
    (lambda s, a, b: s(a.astype(np.float64), b), ShapeError, "float32"),
    (lambda s, a, b: s(a, b[:-1]), ShapeError, "rows"),
    (lambda s, a, b: s(a[None, None], b), ShapeError, "2-D or 3-D"),
    (lambda s, a, b: s(a, b, activation="swish"), InvalidAttributeError, "swish"),
    (lambda s, a, b: s(a, b, activation="clip", activation_params=(0.0,)),
     InvalidAttributeError, "2 parameters"),
    (lambda s, a, b: s(a, b, bias=np.zeros(3, np.float32)), ShapeError, "bias"),
    (lambda s, a, b: s(a, b, bias=np.zeros(6, np.float32), bias_axis=0),
     InvalidAttributeError, "bias_axis"),
    (lambda s, a, b: s(a, b, residual=np.zeros((4, 5), np.float32)), ShapeError, "residual"),
    (lambda s, a, b: s(a, b, out=np.zeros((4, 5), np.float32)), ShapeError, "out"),
    (lambda s, a, b: s(a[:, :6], a.T[:6, :4].copy(), out=a[:, :4]), ShapeError, "overlaps"),
    (lambda s, a, b: s(a, b, bias=np.zeros(6, np.float32), out=np.zeros((6, 4), np.float32).T),
     ShapeError, "unit column stride"),
    (lambda s, a, b: s(a, b, out=np.lib.stride_tricks.as_strided(
        np.zeros(30, np.float32), (4, 6), (8, 4))), ShapeError, "do not overlap"),
    (lambda s, a, b: s(a[None], s.pack_b(np.stack([b, b]))), ShapeError, "batch"),
    (lambda s, a, b: s(a, Sgemm(1, TINY).pack_b(b)), ShapeError, "blocking"),
])
def test_bad_arguments_raise_graphc_errors(rng, call, error, match):
    s = Sgemm(1)
    a, b = rand(rng, 4, 7), rand(rng, 7, 6)
    with pytest.raises(error, match=match):
        call(s, a, b)


@pytest.mark.parametrize("kwargs", [{"nr": 20}, {"mr": 16, "nr": 32}, {"mc": 12, "mr": 8},
                                    {"nc": 40, "nr": 32}, {"kc": 0}])
def test_bad_blocking_is_rejected(kwargs):
    with pytest.raises(InvalidAttributeError):
        GemmBlocking(**kwargs)


def test_bad_specs_and_thread_counts_are_rejected():
    with pytest.raises(InvalidAttributeError):
        EpilogueSpec(bias="diagonal")
    with pytest.raises(InvalidAttributeError):
        EpilogueSpec(activation="gelu")
    with pytest.raises(InvalidAttributeError):
        Sgemm(threads=0)
