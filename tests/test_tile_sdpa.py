"""The tile_sdpa plan (fused SDPA on key-tile slabs) against the dense reference: outputs and
gradients on hypothesis-generated patterns at lengths that are not multiples of the tiles,
query offsets, grouped-query attention and batches; its band groups and tile choice."""

from __future__ import annotations

import random
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsedsl as sd
from reference import reference_attention
from sparsedsl.passes.lowering import lowering
from sparsedsl.passes.tiles import EMPTY
from sparsedsl.plans import tile_sdpa_autograd
from sparsedsl.plans.tile_groups import SpanExtents, band_group, computed_pairs, tile_groups
from sparsedsl.plans.tile_masks import split_rows, with_columns
from sparsedsl.plans.tile_sdpa import TILE_THROUGHPUT
from sparsedsl.plans.tiled import block_tile
from strategies import pattern_cases


def _inputs(batch, heads, kv_heads, q_len, kv_len, dim, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return tuple((torch.randn(batch, h, n, dim, generator=gen, dtype=dtype) * 1.5).requires_grad_()
                 for h, n in ((heads, q_len), (kv_heads, kv_len), (kv_heads, kv_len)))


def _batch(buffers, rng):
    for t in buffers.values():
        if t.dim() == 2 and t.dtype == torch.int64:  # batched document ids
            return t.shape[0]
    return rng.choice((1, 2))


def _assert_gradients_equal(out, expected, inputs, seed: int) -> None:
    """Gradients of ``out`` and of the reference ``expected`` with respect to ``inputs``,
    under one random output weighting, equal to 1e-9 (float64) and finite."""
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    got = torch.autograd.grad((out * weights).sum(), inputs)
    want = torch.autograd.grad((expected * weights).sum(), inputs)
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        assert (g - w).abs().max().item() < 1e-9


def _assert_exact(module, pattern, inputs, offset: int, grad: bool) -> None:
    """``module`` on ``inputs`` (queries from ``offset``) equal to the reference to 1e-9,
    and with ``grad`` its gradients too."""
    q, k, v = inputs
    with torch.set_grad_enabled(grad):
        out = module(q, k, v, q_offset=offset)
    expected, _ = reference_attention(pattern, q, k, v, q_offset=offset)
    assert (out - expected).abs().max().item() < 1e-9
    if grad:
        _assert_gradients_equal(out, expected, (q, k, v), 1)


@settings(max_examples=60, deadline=None)
@given(case=pattern_cases(max_len=200), block=st.sampled_from((16, 32, 64, 128)),
       offset=st.sampled_from((0, 0, 5, 37)), gqa=st.booleans(), seed=st.integers(0, 2**16))
def test_outputs_and_gradients_equal_dense_reference(case, block, offset, gqa, seed):
    pattern, q_len, kv_len, heads, buffers = case
    kv_len = max(kv_len, q_len + offset)  # queries at positions offset ... offset + q_len - 1
    rng = random.Random(seed)
    batch = _batch(buffers, rng)
    if buffers:
        # Bound tensors are sized for the drawn lengths: keep those.
        offset, kv_len = 0, case[2]
    q, k, v = _inputs(batch, heads, 1 if gqa else heads, q_len, kv_len, 8, seed)
    module = sd.compile(pattern, block_size=block, kernel="tile_sdpa")
    out = module(q, k, v, q_offset=offset, **buffers)
    expected, _ = reference_attention(pattern, q, k, v, q_offset=offset, **buffers)
    assert (out - expected).abs().max().item() < 1e-9
    _assert_gradients_equal(out, expected, (q, k, v), seed)


def _groups(pattern, length, tile, q_offset=0):
    lowered = lowering(pattern, length, length + q_offset, q_offset, (tile, tile), heads=1,
                       device=torch.device("cpu"), buffers={}, where="test")
    return tile_groups(lowered.states, lowered.grid), lowered


@pytest.mark.parametrize("pattern, length, width", [
    (sd.window(128), 4096, 9),                 # 4 tiles each side of the diagonal tile
    (sd.causal() & sd.window(256, 0), 4096, 9),
    (sd.window(100), 1000, 9),                 # not a multiple of the tile
    (sd.blocks(64).local(1), 999, 6),
])
def test_a_band_is_views_with_its_edges_apart_or_padded(pattern, length, width):
    groups, lowered = _groups(pattern, length, 32)
    grid = lowered.grid
    assert all(g.runs is not None and g.tiles.shape[-1] == width for g in groups)
    assert torch.equal(torch.cat([g.tile_rows for g in groups]), torch.arange(grid.num_q_tiles))
    # Every live tile is held once; tiles outside the keys only where the last one is cut short.
    held = sum(int((g.states != EMPTY).sum()) for g in groups)
    assert held == int((lowered.states != EMPTY).sum())
    outside = [bool(((g.tiles < 0) | (g.tiles >= grid.num_kv_tiles)).any()) for g in groups]
    if length % 32:
        assert len(groups) == 1 and outside == [True]
    else:  # the spans whose windows pass an end see the first (or last) tiles: one slab each
        assert not any(outside)
        strides = [g.runs[3] for g in groups]
        assert strides in ([0, 32, 0], [0, 32]), strides  # a causal window passes the start only


def test_no_band_where_it_would_compute_more_than_its_slack():
    # Causal rows are contiguous runs from key 0, but a window holding all of them is the
    # whole row: about twice the live tiles.
    groups, lowered = _groups(sd.causal(), 640, 32)
    first = torch.arange(lowered.grid.num_q_tiles)
    extents = SpanExtents.of(lowered.states[0, 0] != EMPTY)
    assert band_group(lowered.states, lowered.grid, first, torch.ones_like(first, dtype=torch.bool), 1, extents) is None
    live = int((lowered.states != EMPTY).sum())
    assert sum(g.rows.numel() * g.height * g.tiles.shape[-1] for g in groups) == live
    # Random blocks are no band either: every group computes exactly its live tiles.
    groups, lowered = _groups(sd.blocks(32).random(3, seed=1) | sd.window(8), 1000, 32)
    live = int((lowered.states != EMPTY).sum())
    assert sum(g.rows.numel() * g.height * g.tiles.shape[-1] for g in groups) == live


@pytest.mark.parametrize("requires_grad", [False, True])
def test_windows_take_the_cheapest_tiles_and_block_patterns_their_blocks(requires_grad):
    window = sd.compile(sd.window(128)).explain(4096, heads=8, device="cpu", requires_grad=requires_grad)
    assert window.kind == "tile_sdpa"
    # 32-token tiles compute 1.14x the useful pairs, 128-token ones 1.52x: the forward takes
    # the former; with gradients, their throughputs (TILE_THROUGHPUT) make the latter cheaper.
    throughput = TILE_THROUGHPUT[requires_grad]
    wanted = min((128, 64, 32), key=lambda t: (256 + t) / throughput[t])  # keys computed a row
    assert window.q_block == window.kv_block == wanted
    if not requires_grad:
        assert window.computed_flops <= 1.15 * window.useful_flops
    # Global columns: a band with columns, all views, so finer tiles where cheaper.
    mixed = sd.compile(sd.window(128) | sd.global_tokens(16)).explain(4096, heads=8, device="cpu",
                                                                       requires_grad=requires_grad)
    assert "3 with other tiles" in mixed.reason  # the band and its two edges, each with the columns
    if not requires_grad:
        assert mixed.computed_flops <= 1.3 * mixed.useful_flops
    # Random blocks are gathered for every query tile: no finer tiles there.
    gathered = sd.compile(sd.window(128) | sd.blocks(128).random(2, seed=3)).explain(
        4096, heads=8, device="cpu", requires_grad=requires_grad)
    assert gathered.q_block == 128
    blocks = sd.compile(sd.blocks(128).local(1)).explain(4096, heads=8, device="cpu", requires_grad=requires_grad)
    # One band of views, three tiles a row, its edges apart and cut to the two tiles they see.
    assert blocks.kind == "tile_sdpa" and blocks.computed_pairs == blocks.pairs == (3 * 32 - 2) * 128 * 128 * 8


@pytest.mark.parametrize("pattern,tile", [
    (sd.blocks(64).local(1), 64),
    (sd.blocks(64).local(1).random(3) | sd.queries(-64) | sd.keys(-64), 64),  # BigBird's last block
    (sd.blocks(64).local(1) | sd.global_tokens(32), 32),
    (sd.blocks(64).local(1) | sd.prefix(128) | sd.queries(0, 192), 64),
    (sd.blocks(64).local(1) | sd.global_tokens(100), None),  # a bound no tile size divides
    (sd.blocks(64).local(1) | sd.window(8), None),
    (sd.global_tokens(64) | sd.queries(-64), None),  # no blocks
])
def test_block_patterns_with_aligned_ranges_take_block_tiles(pattern, tile):
    """Ranges of whole rows or columns whose bounds the blocks' tile divides keep a block
    pattern's tiles: at lengths that are multiples of it no tile is partial, so the plan
    computes no pair outside the live blocks."""
    assert block_tile(pattern) == tile
    if tile is None:
        return
    plan = sd.compile(pattern).explain(4096, heads=4, device="cpu")
    assert plan.kind == "tile_sdpa" and plan.q_block == plan.kv_block == tile
    assert plan.computed_flops <= 1.05 * plan.useful_flops


@pytest.mark.parametrize("pattern", [sd.window(37), sd.causal() & sd.window(50, 0), sd.blocks(32).local(1),
                                     sd.blocks(64).local(1) & ~sd.window(2)])
@pytest.mark.parametrize("q_len, kv_len, offset", [(300, 300, 0), (277, 290, 13), (64, 64, 0), (320, 320, 0), (288, 320, 32)])
def test_view_groups_gradients_by_the_fused_backward(pattern, q_len, kv_len, offset, monkeypatch):
    """Windows and block windows: every group is views, so gradients come from the fused
    backward on the slabs (ViewGroupsAttention), summed into one gradient per input."""
    calls = []
    apply = tile_sdpa_autograd.ViewGroupsAttention.apply
    monkeypatch.setattr(tile_sdpa_autograd.ViewGroupsAttention, "apply",
                        lambda *args: calls.append(1) or apply(*args))
    q, k, v = _inputs(2, 3, 3, q_len, kv_len, 8, seed=q_len + offset)
    module = sd.compile(pattern, block_size=32, kernel="tile_sdpa")
    out = module(q, k, v, q_offset=offset)
    assert calls
    expected, _ = reference_attention(pattern, q, k, v, q_offset=offset)
    assert (out - expected).abs().max().item() < 1e-9
    _assert_gradients_equal(out, expected, (q, k, v), 1)


@pytest.mark.parametrize("pattern", [sd.window(20) | sd.global_tokens(5), (sd.causal() & sd.window(40, 0)) | sd.global_tokens(40),
                                     (sd.window(9) | sd.global_tokens(3)) & ~sd.prefix(1)])
@pytest.mark.parametrize("q_len, kv_len, offset, kv_heads", [(300, 300, 0, 3), (277, 290, 13, 1), (450, 450, 0, 1)])
@pytest.mark.parametrize("grad", [False, True])
def test_global_columns_merged_by_log_sum_exp(pattern, q_len, kv_len, offset, kv_heads, grad):
    """Bands with global columns: the run and the columns as two fused calls merged by
    their log-sum-exps, forward and (through the fused backward) gradients exact."""
    module = sd.compile(pattern, block_size=32, kernel="tile_sdpa")
    reason = module.explain(q_len, kv_len, q_offset=offset, heads=3, kv_heads=kv_heads, device="cpu",
                            requires_grad=grad).reason
    if offset == 0:  # (queries from an offset may have their runs meet the columns: then no band)
        assert "1 with other tiles" in reason
    _assert_exact(module, pattern, _inputs(2, 3, kv_heads, q_len, kv_len, 8, seed=q_len + offset), offset, grad)


@pytest.mark.parametrize("pattern", [sd.blocks(32).local(1).global_(1).random(2, seed=1),
                                     sd.window(40) | sd.blocks(32).random(1, seed=4),
                                     (sd.blocks(32).local(1).random(2, seed=2) | sd.global_tokens(7)) & ~sd.window(1)])
@pytest.mark.parametrize("q_len, kv_len, offset", [(640, 640, 0), (613, 640, 0)])
@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("gather_bytes", [tile_sdpa_autograd.GATHER_BYTES, 1])
def test_random_blocks_as_a_gathered_part_of_a_band(pattern, q_len, kv_len, offset, grad, gather_bytes, monkeypatch):
    """BigBird-like rows: the band on views, global columns once, and each span's random
    tiles gathered (all spans at once, or one span a call), merged by log-sum-exp; outputs
    and float64 gradients exact."""
    monkeypatch.setattr(tile_sdpa_autograd, "GATHER_BYTES", gather_bytes)
    module = sd.compile(pattern, block_size=32, kernel="tile_sdpa")
    reason = module.explain(q_len, kv_len, heads=2, device="cpu", requires_grad=grad).reason
    assert re.search(r"\b[123] with other tiles", reason)  # the band, its edges apart
    _assert_exact(module, pattern, _inputs(1, 2, 2, q_len, kv_len, 8, seed=q_len), offset, grad)


@pytest.mark.parametrize("pattern, split", [
    (sd.window(40) | sd.global_tokens(5), True),       # 5 global rows in a tile of window rows
    (sd.window(20) | (sd.global_tokens(40) - sd.global_tokens(37)), True),  # wide rows 37-39 of tile 1
    (sd.window(24) & ~sd.window(3), False),             # no row wider than the others
])
@pytest.mark.parametrize("q_len, grad", [(613, False), (613, True), (640, True)])
def test_rows_of_a_span_split_by_the_keys_they_see(pattern, split, q_len, grad):
    """A span whose rows see keys of very different extents runs as two row ranges, each
    on the key tiles its rows see: exact (outputs and float64 gradients), and explain's
    computed pairs are what the split groups compute."""
    module = sd.compile(pattern, block_size=32, kernel="tile_sdpa")
    explained = module.explain(q_len, 640, heads=2, device="cpu", requires_grad=grad)
    assert explained.q_block == 32
    lowered = lowering(pattern, q_len, 640, 0, (32, 32), heads=1, device=torch.device("cpu"), buffers={},
                       where="test")
    groups = tile_groups(lowered.states, lowered.grid, merged=True)
    groups = split_rows(with_columns(groups, lowered.grid, lowered.mask_mod), lowered.grid, lowered.mask_mod)
    assert any(g.q_rows is not None for g in groups) == split
    assert explained.computed_pairs == 2 * computed_pairs(groups, lowered.grid)
    _assert_exact(module, pattern, _inputs(1, 2, 2, q_len, 640, 8, seed=q_len), 0, grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pattern", [sd.window(8) | sd.global_tokens(4), sd.blocks(16).local(1).random(1, 0)], ids=str)
def test_float32_inputs_under_autocast(pattern, dtype):
    """Under autocast SDPA returns half precision while the output buffer has the inputs'
    float32: gathered groups are written in the buffer's dtype, forward and backward."""
    module = sd.compile(pattern, block_size=16, kernel="tile_sdpa")
    q, k, v = (torch.randn(1, 2, 64, 16, requires_grad=True) for _ in range(3))
    with torch.autocast("cpu", dtype=dtype):
        out = module(q, k, v)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    expected, _ = reference_attention(pattern, *(t.detach().double() for t in (q, k, v)))
    assert (out.double() - expected).abs().max().item() < 2e-2
    assert all(torch.isfinite(g).all() and g.abs().max() > 0 for g in grads)


@pytest.mark.parametrize("pattern", [sd.window(40), sd.causal() & sd.window(70, 0), sd.blocks(32).local(1),
                                     sd.window(24) | sd.global_tokens(5)])
@pytest.mark.parametrize("q_len", [613, 640])
def test_backward_in_chunks_of_spans(pattern, q_len, monkeypatch):
    """The backward of a group's slabs a few spans a call (here one): float64 gradients
    exact, edges, padded query rows and merged parts included."""
    monkeypatch.setattr(tile_sdpa_autograd, "GATHER_BYTES", 1)
    module = sd.compile(pattern, block_size=32, kernel="tile_sdpa")
    _assert_exact(module, pattern, _inputs(1, 2, 2, q_len, 640, 8, seed=q_len + 1), 0, True)


@pytest.mark.gpu
@pytest.mark.parametrize("pattern", [sd.blocks(64).local(1).global_(2).random(3, 0), sd.blocks(128).local(2),
                                     sd.window(70) | sd.global_tokens(9), sd.causal() & sd.window(100, 0)])
def test_gpu_outputs_and_gradients_bf16(pattern):
    """On CUDA in bf16 (the fused SDPA kernels there), at a length that is not a multiple
    of the tiles: outputs and gradients against the float64 reference, to bf16's rounding."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    q, k, v = (t.detach().to(device="cuda", dtype=torch.bfloat16).requires_grad_()
               for t in _inputs(2, 4, 2, 1000, 1000, 64, seed=7))
    out = sd.compile(pattern, kernel="tile_sdpa")(q, k, v)
    reference = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    expected, _ = reference_attention(pattern, *reference)
    assert (out.double().cpu() - expected).abs().max().item() < 6e-2  # bf16 rounding; inputs up to ~7
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got = torch.autograd.grad(out, (q, k, v), weights.to(device="cuda", dtype=torch.bfloat16))
    want = torch.autograd.grad(expected, reference, weights)
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        assert (g.double().cpu() - w).abs().max().item() < 5e-2 * max(1.0, w.abs().max().item())
