"""``sparsedsl.count`` is exact: equal to summing the dense reference, tile classes as
``create_block_mask`` sees them (padding masked, so a tile cut short is never full)."""

from __future__ import annotations

import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsedsl as sd
from sparsedsl.analysis.count import Counts, count
from sparsedsl.analysis.headsplit import distinct_head_patterns, resolve_head
from sparsedsl.analysis.structure import diagonal_support, periodicity, tile_signature
from sparsedsl.analysis.tilecount import state_grid, supported
from sparsedsl.passes.tiles import EMPTY, FULL, PARTIAL

from strategies import min_heads, pattern_cases, patterns


def dense_tile_counts(allowed: torch.Tensor, tile: int) -> torch.Tensor:
    """``[..., nq, nk]`` allowed pairs per ``tile x tile`` tile of a ``[..., Q, K]`` mask,
    the padding past the sequence ends counted as masked."""
    q_len, kv_len = allowed.shape[-2:]
    pad_q, pad_k = -q_len % tile, -kv_len % tile
    padded = torch.nn.functional.pad(allowed.to(torch.int64), (0, pad_k, 0, pad_q))
    nq, nk = padded.shape[-2] // tile, padded.shape[-1] // tile
    tiles = padded.reshape(*padded.shape[:-2], nq, tile, nk, tile)
    return tiles.sum((-3, -1))


def dense_states(allowed: torch.Tensor, tile: int) -> torch.Tensor:
    counts = dense_tile_counts(allowed, tile)
    state = torch.where(counts == 0, EMPTY, PARTIAL)
    return torch.where(counts == tile * tile, FULL, state)


def check_against_dense(pattern, q_len, kv_len, heads, buffers, tile):
    got = count(pattern, q_len, kv_len, heads=heads, tile=tile, **buffers)
    allowed = sd.dense(pattern, q_len, kv_len, heads=heads, **buffers)
    if allowed.dim() == 3:
        allowed = allowed[None]
    per_head = allowed.sum((0, 2, 3)).tolist()
    assert list(got.per_head) == per_head
    assert got.pairs == int(allowed.sum())
    states = dense_states(allowed, tile)  # [B, H, nq, nk]
    for h in range(heads):
        expected = tuple(int((states[:, h] == s).sum()) for s in (FULL, PARTIAL, EMPTY))
        t = got.tiles_per_head[h]
        assert (t.full, t.partial, t.empty) == expected, (h, t, expected)
    total = tuple(int((states == s).sum()) for s in (FULL, PARTIAL, EMPTY))
    assert (got.tiles.full, got.tiles.partial, got.tiles.empty) == total


@settings(max_examples=120)
@given(pattern_cases(max_depth=2, max_len=160), st.sampled_from((1, 2, 3, 5, 8, 16, 128)))
def test_count_equals_dense_reference(case, tile):
    pattern, q_len, kv_len, heads, buffers = case
    check_against_dense(pattern, q_len, kv_len, heads, buffers, tile)


@settings(max_examples=120)
@given(pattern_cases(max_depth=2, allow_buffers=False, max_len=200),
       st.sampled_from((1, 2, 3, 4, 7, 8, 16)))
def test_fast_path_equals_dense_reference_on_many_tiles(case, tile):
    """Buffer-free patterns take the class-enumeration path; small tiles make many classes
    and many repeated tiles per class."""
    pattern, q_len, kv_len, heads, buffers = case
    check_against_dense(pattern, q_len, kv_len, heads, buffers, tile)


@settings(max_examples=60)
@given(pattern_cases(max_depth=2, allow_buffers=False, max_len=120, max_heads=3),
       st.sampled_from((2, 3, 4, 8)))
def test_state_grid_equals_dense_states(case, tile):
    pattern, q_len, kv_len, heads, _ = case
    allowed = sd.dense(pattern, q_len, kv_len, heads=heads)
    for resolved, members in distinct_head_patterns(pattern, heads):
        if not supported(resolved):
            continue
        grid = state_grid(resolved, q_len, kv_len, tile)
        for h in members:
            assert torch.equal(grid.to(torch.int64), dense_states(allowed[h], tile))


# -- the structural facts the fast path rests on ------------------------------------------


def check_periodicity_and_support(resolved):
    period = periodicity(resolved)
    if period is None or period.period > 120:
        return
    size = 60
    lo_q, lo_k = period.q_bound, period.k_bound
    total_q = lo_q + size + period.period
    total_k = lo_k + size + period.period
    allowed = sd.dense(resolved, total_q, total_k)[0]
    base = allowed[lo_q:lo_q + size, lo_k:lo_k + size]
    shifted = allowed[lo_q + period.period:lo_q + period.period + size,
                      lo_k + period.period:lo_k + period.period + size]
    assert torch.equal(base, shifted)
    lo, hi = diagonal_support(resolved)
    q = torch.arange(lo_q, total_q)[:, None]
    k = torch.arange(lo_k, total_k)[None, :]
    outside = ((k - q) < lo) | ((k - q) > hi)
    assert not allowed[lo_q:, lo_k:][outside].any()


def check_signatures(resolved, tile, q_len, kv_len):
    allowed = sd.dense(resolved, q_len, kv_len)[0]
    nq, nk = -(-q_len // tile), -(-kv_len // tile)
    i, j = torch.meshgrid(torch.arange(nq), torch.arange(nk), indexing="ij")
    i, j = i.reshape(-1), j.reshape(-1)
    cols = tile_signature(resolved, i * tile, j * tile, tile)
    if cols is None:
        assert not supported(resolved)
        return
    padded = torch.nn.functional.pad(allowed, (0, -kv_len % tile, 0, -q_len % tile))
    contents = padded.reshape(nq, tile, nk, tile).permute(0, 2, 1, 3).reshape(nq * nk, -1)
    h = (q_len - i * tile).clamp(max=tile)
    w = (kv_len - j * tile).clamp(max=tile)
    keys = torch.stack([h, w] + [c.expand(i.shape) for c in cols], 1)
    _, inverse = torch.unique(keys, dim=0, return_inverse=True)
    first = {}
    for idx, key in enumerate(inverse.tolist()):
        if key in first:
            assert torch.equal(contents[idx], contents[first[key]]), (resolved, idx, first[key])
        else:
            first[key] = idx


#: Every primitive and block rule, alone and combined, with sizes around the tile sizes.
STRUCTURE_CASES = [
    sd.full(), sd.causal(), sd.window(5), sd.window(0, 9), sd.window(13, 2),
    sd.dilated_window(7, 11, 3), sd.chunks(1), sd.chunks(6), sd.chunks(13), sd.strided(1),
    sd.strided(5), sd.dilated(12, 3, 1), sd.dilated(7, 2), sd.dilated(16, 4, 3),
    sd.global_tokens(5), sd.prefix(9), sd.blocks(4), sd.blocks(3).local(1), sd.blocks(5).causal(),
    sd.blocks(4).dilated([2, 3]), sd.blocks(3).dilated([2], window=4), sd.blocks(6).global_(2),
    sd.blocks(4).local(1).causal().within(sd.dilated(4, 2, 1)),
    sd.blocks(8).local(0).within(sd.causal() | sd.window(1)),
    sd.window(6) | sd.global_tokens(3), sd.causal() | sd.prefix(7), sd.chunks(6) - sd.causal(),
    ~sd.window(3) & sd.chunks(10), sd.window(9) & sd.strided(2), sd.dilated(12, 2) | sd.window(1),
]


@pytest.mark.parametrize("pattern", STRUCTURE_CASES, ids=str)
def test_structure_of_each_primitive(pattern):
    check_periodicity_and_support(pattern)
    for tile, q_len, kv_len in ((3, 40, 40), (4, 37, 50), (8, 64, 29), (5, 23, 23)):
        check_signatures(pattern, tile, q_len, kv_len)
        check_against_dense(pattern, q_len, kv_len, 1, {}, tile)


@settings(max_examples=80)
@given(patterns(max_depth=2, allow_buffers=False), st.integers(0, 3))
def test_periodicity_and_diagonal_support_are_sound(pattern, head):
    heads = min_heads(pattern)
    check_periodicity_and_support(resolve_head(pattern, min(head, heads - 1), heads))


@settings(max_examples=80)
@given(patterns(max_depth=2, allow_buffers=False), st.sampled_from((2, 3, 4, 8)),
       st.integers(1, 120), st.integers(1, 120))
def test_equal_tile_signatures_mean_equal_tile_contents(pattern, tile, q_len, kv_len):
    heads = min_heads(pattern)
    check_signatures(resolve_head(pattern, heads - 1, heads), tile, q_len, kv_len)


# -- examples, readable text, speed -------------------------------------------------------


@pytest.mark.parametrize("pattern,q_len,kv_len,tile", [
    (sd.causal() | sd.queries(-2, 1), 3, 3, 2),
    (sd.causal() | sd.queries(-3, 4), 10, 30, 8),
    (sd.window(0) | sd.queries(-3, 4), 10, 30, 16),
    (sd.causal() | sd.queries(-3, 15), 57, 185, 64),
    (sd.causal() | sd.keys(-3, 4), 30, 10, 8),
    (sd.heads(sd.causal(), sd.full()) | sd.queries(-3, 15), 57, 185, 16),
    (sd.window(2) | sd.keys(-5, 2), 20, 20, 4),
])
def test_empty_ranges_classify_no_tile(pattern, q_len, kv_len, tile):
    """A range that resolves empty (``queries(-3, 4)`` over 10 rows: rows 7..3) allows no
    pair, so no tile is partial because of it."""
    check_against_dense(pattern, q_len, kv_len, 2, {}, tile)


def test_known_counts():
    assert count(sd.causal(), 1000).pairs == 500500
    assert count(sd.full(), 300, 200).pairs == 60000
    c = count(sd.blocks(256).local(0).within(sd.segments([128, 128], [1, 2])), 256, heads=2)
    assert c.per_head == (32768, 8192)
    # The seed's local window of one block at 16K / 256: the 64 diagonal blocks.
    assert count(sd.blocks(256).local(0), 16384, tile=256).tiles.full == 64


def test_heads_default_and_per_head():
    p = sd.heads(sd.causal(), sd.window(1), sd.causal())
    c = count(p, 10)
    assert c.heads == 3 and c.per_head == (55, 28, 55)
    c5 = count(p, 10, heads=5)  # groups of 2, 2, 1 heads
    assert c5.per_head == (55, 55, 28, 28, 55)


def test_documents_take_the_general_path():
    ids = torch.tensor([0] * 5 + [1] * 7)
    c = count(sd.documents("doc"), 12, tile=4, doc=ids)
    assert c.pairs == 25 + 49


def test_str_is_readable():
    c = count(sd.heads(sd.causal(), sd.window(2)), 256, tile=128, head_dim=64)
    text = str(c)
    assert isinstance(c, Counts)
    assert "q_len=256 kv_len=256 heads=2" in text
    assert f"{c.pairs:,} allowed" in text
    assert "per head: 32,896, 1,274" in text
    assert "tiles (128x128)" in text and "full" in text and "partial" in text and "empty" in text
    assert "useful" in text and "computed" in text
    assert c.useful_flops == 4 * 64 * c.pairs
    assert c.computed_flops == 4 * 64 * (c.tiles.full + c.tiles.partial) * 128 * 128


@pytest.mark.parametrize("pattern", [
    sd.window(4096) | sd.global_tokens(128),
    sd.causal() | sd.prefix(1000),
    sd.dilated_window(256, 256, 4) | sd.strided(3),
    sd.chunks(2048) | sd.global_tokens(100),
    sd.blocks(256).local(1).within(sd.segments([128, 128], [1, 2])),
    sd.segments([2048, 4096, 8192], [1, 2, 4]),
    sd.blocks(128).local(2).causal() | sd.blocks(128).global_(2) | sd.blocks(128).dilated([4, 8], window=64),
])
def test_counts_a_million_tokens_in_seconds(pattern):
    start = time.perf_counter()
    c = count(pattern, 1 << 20)
    assert time.perf_counter() - start < 8.0
    assert c.tiles.total == c.heads * (1 << 13) ** 2


def test_window_and_global_at_a_million_tokens_exact():
    w, g, n_ = 4096, 128, 1 << 20
    c = count(sd.window(w) | sd.global_tokens(g), n_)
    band = n_ * (2 * w + 1) - w * (w + 1)
    # the band inside the first g rows and columns, counted again by the global part
    band_in_rows = sum(min(n_ - 1, q + w) - max(0, q - w) + 1 for q in range(g))
    band_in_cols = band_in_rows
    band_in_both = sum(min(g - 1, q + w) - max(0, q - w) + 1 for q in range(g))
    glob = 2 * g * n_ - g * g
    assert c.pairs == band + glob - (band_in_rows + band_in_cols - band_in_both)
