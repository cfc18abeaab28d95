"""The fused Winograd conv (``WinogradConv``: passes/winograd.py builds it for target "cpu",
backends/lower_gemm.py lowers it) against graphc.interpret.

The fuse rule normally keeps it to layers whose staged V and M overflow the last level cache;
these tests lower the thresholds so that small, odd-sized convs take the fused path: partial
tiles at the bottom/right, pads that are not 1, channel counts that are not multiples of 16,
blocks that end mid-row, batch 1 and 3, F(2x2) and F(4x4), every epilogue part, weights known
only at run time (U read transposed by the SGEMM's packing), 1 and 2 threads.
"""

from __future__ import annotations

import numpy as np
import pytest

import graphc
import passes.winograd as winograd_pass
from backends import lower_gemm
from graphc import ops
from graphc.errors import GraphcError
from passes import PassManager, PassOptions


@pytest.fixture
def always_fuse(monkeypatch):
    monkeypatch.setattr(winograd_pass, "FUSE_MIN_FLOATS", 0)
    monkeypatch.setattr(winograd_pass, "FUSE_MAX_U_FLOATS", 1 << 60)


def _conv_graph(n, c, k, h, w, pads, bias, residual, activation, rng, runtime_w=False):
    g = graphc.Graph("conv")
    x = g.input("x", (n, c, h, w))
    wt = (rng.standard_normal((k, c, 3, 3)) / np.sqrt(9 * c)).astype(np.float32)
    weight = g.input("w", (k, c, 3, 3)) if runtime_w else wt
    b = rng.standard_normal(k).astype(np.float32) if bias else None
    y = ops.conv(x, weight, b, pads=pads)
    if residual:
        y = y + g.input("z", y.shape)
    if activation:
        y = getattr(ops, activation)(y)
    g.output(y)
    feeds = {"x": rng.standard_normal((n, c, h, w)).astype(np.float32)}
    if runtime_w:
        feeds["w"] = wt
    if residual:
        feeds["z"] = rng.standard_normal(y.shape).astype(np.float32)
    return g, feeds


CASES = [  # n, c, k, h, w, pads, bias, residual, activation, runtime W
    (1, 8, 16, 9, 11, [1, 1, 1, 1], True, False, "relu", False),
    (3, 13, 21, 10, 7, [1, 1, 1, 1], True, True, "relu", False),
    (1, 17, 5, 23, 29, [0, 2, 1, 0], False, False, "", False),
    (3, 16, 32, 12, 12, [1, 1, 1, 1], True, False, "sigmoid", True),
    (2, 33, 9, 6, 31, [2, 0, 0, 2], False, True, "", False),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("conv", ["winograd-f4", "winograd-f2"])
def test_fused_matches_the_interpreter(always_fuse, case, conv):
    *shape, runtime_w = case
    g, feeds = _conv_graph(*shape, np.random.default_rng(len(str(case))),
                           runtime_w=runtime_w)
    want = graphc.interpret(g, feeds)[0]
    for threads in (1, 2):
        model = graphc.compile(g, target="cpu", threads=threads, conv=conv)
        assert "WinogradConv" in {node.op for node in model.graph.nodes()}
        got = model.run(feeds)[0]
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-4 if conv.endswith("4")
                                   else 2e-5)


def test_blocks_cover_every_tile(always_fuse, monkeypatch):
    """Blocks of 16 tiles over 3 x 4 x 5 = 60 tiles: the last block is partial and blocks
    start in the middle of tile rows and images."""
    monkeypatch.setattr(lower_gemm, "WINOGRAD_BLOCK_FLOATS", 1)
    g, feeds = _conv_graph(3, 5, 7, 15, 19, [1, 1, 1, 1], True, False, "relu",
                           np.random.default_rng(1))
    got = graphc.compile(g, target="cpu", threads=2, conv="winograd-f4").run(feeds)[0]
    np.testing.assert_allclose(got, graphc.interpret(g, feeds)[0], rtol=1e-4, atol=2e-4)


WIDE_CASES = [  # n, c, k, h, w, pads, bias, residual, activation: tile rows of 19..65 tiles
    (2, 3, 5, 7, 75, [1, 2, 0, 1], True, True, "relu"),
    (1, 4, 6, 10, 130, [0, 0, 2, 2], False, False, ""),
]


@pytest.mark.parametrize("case", WIDE_CASES)
@pytest.mark.parametrize("conv", ["winograd-f4", "winograd-f2"])
@pytest.mark.parametrize("small_blocks", [False, True])
def test_wide_rows_take_several_segments(always_fuse, monkeypatch, case, conv, small_blocks):
    """Tile rows longer than 16 tiles: the transforms walk them in segments of 16 and a
    partial one, reading and writing contiguous image rows whose runs pass the right edge
    and start on the left padding; with blocks of 16 tiles, blocks (and so segments) also
    start and end in the middle of tile rows."""
    if small_blocks:
        monkeypatch.setattr(lower_gemm, "WINOGRAD_BLOCK_FLOATS", 1)
    # other weights per block size: code is cached by the graph's content, and the block
    # size is not part of it, so the same graph would reuse the other block size's code
    g, feeds = _conv_graph(*case, np.random.default_rng(sum(case[:5]) + 7 * small_blocks))
    want = graphc.interpret(g, feeds)[0]
    for threads in (1, 2):
        got = graphc.compile(g, target="cpu", threads=threads, conv=conv).run(feeds)[0]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-4 if conv.endswith("4")
                                   else 2e-5)


@pytest.mark.parametrize("conv, alpha", [("winograd-f4", 6), ("winograd-f2", 4)])
def test_blocks_of_nr_tiles_read_v_in_place(always_fuse, monkeypatch, conv, alpha):
    """Blocks of exactly NR = 32 tiles (as VGG-16's 64->64@224 gets): the GEMMs read V^T as
    a pre-packed B; 2 x 5 x 12 = 120 tiles make the last block partial (24 tiles)."""
    c, k, nr = 5, 7, lower_gemm.BLOCKING.nr
    monkeypatch.setattr(lower_gemm, "WINOGRAD_BLOCK_FLOATS", nr * alpha ** 2 * (c + k))
    tiles = 2 * 5 * 12 if alpha == 6 else 2 * 10 * 23
    assert lower_gemm.winograd_block_tiles(alpha ** 2, c, k, tiles) == nr
    g, feeds = _conv_graph(2, c, k, 19, 45, [1, 1, 1, 1], True, True, "relu",
                           np.random.default_rng(alpha))
    want = graphc.interpret(g, feeds)[0]
    for threads in (1, 2):
        got = graphc.compile(g, target="cpu", threads=threads, conv=conv).run(feeds)[0]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-4 if alpha == 6 else 2e-5)


def test_nan_and_infinity_spread_as_in_the_staged_reference(always_fuse):
    """A NaN or infinite input poisons every output of the tiles that read it (not just its
    3x3 neighbourhood, as a direct conv would), exactly as the staged references do."""
    g, feeds = _conv_graph(1, 4, 4, 9, 9, [1, 1, 1, 1], False, False, "",
                           np.random.default_rng(2))
    feeds["x"][0, 1, 4, 4] = np.nan
    feeds["x"][0, 2, 0, 7] = np.inf
    got = graphc.compile(g, target="cpu", threads=1, conv="winograd-f4").run(feeds)[0]
    staged = PassManager("winograd", PassOptions(conv="winograd-f4")).run(g)
    want = graphc.interpret(staged, feeds)[0]
    assert np.isnan(want).any()
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=1e-4, atol=2e-4)


def test_reference_matches_the_staged_ops(always_fuse):
    g, feeds = _conv_graph(3, 6, 10, 11, 9, [1, 1, 1, 1], True, True, "relu",
                           np.random.default_rng(3))
    fused = PassManager("winograd", PassOptions(target="cpu", conv="winograd-f4")).run(g)
    staged = PassManager("winograd", PassOptions(conv="winograd-f4")).run(g)
    assert "WinogradConv" in {n.op for n in fused.nodes()}
    assert "WinogradConv" not in {n.op for n in staged.nodes()}
    np.testing.assert_allclose(graphc.interpret(fused, feeds)[0],
                               graphc.interpret(staged, feeds)[0], rtol=1e-5, atol=1e-5)


def test_fuse_rule_picks_only_layers_whose_staged_data_overflows_the_cache():
    # VGG-16 F4 at 224x224: only 64->64@224 (V + M of 58 MB) is fused
    assert winograd_pass.fuse_stages(64, 64, 56 * 56, 4)
    assert not winograd_pass.fuse_stages(128, 128, 28 * 28, 4)
    assert not winograd_pass.fuse_stages(512, 512, 7 * 7, 4)
    # staged for other targets, grouped convs and symbolic batches
    g, _ = _conv_graph(1, 64, 64, 224, 224, [1, 1, 1, 1], True, False, "relu",
                       np.random.default_rng(4))
    for target, fused in (("cpu", True), ("reference", False)):
        out = PassManager("winograd", PassOptions(target=target, conv="winograd-f4")).run(g)
        assert ("WinogradConv" in {n.op for n in out.nodes()}) == fused


def test_shape_rule_rejects_a_mismatched_u(always_fuse):
    g, _ = _conv_graph(1, 8, 16, 9, 11, [1, 1, 1, 1], True, False, "relu",
                       np.random.default_rng(5))
    fused = PassManager("winograd", PassOptions(target="cpu", conv="winograd-f4")).run(g)
    node = next(n for n in fused.nodes() if n.op == "WinogradConv")
    wrong_u = fused.add_constant(np.zeros((36, 7, 16), np.float32), "wrong_u")
    with pytest.raises(GraphcError, match="WinogradConv node .*U must be"):
        fused.infer("WinogradConv", node.name, [node.inputs[0], wrong_u], node.attrs)
