"""Catalog entries for DeepSpeed's sparsity configurations and attention-gym's mask
families, each checked against a reference written here from the published description of
the configuration (explicit loops over blocks or positions), at several lengths."""

from __future__ import annotations

import pytest
import torch

import sparsedsl as sd
import sparsedsl.patterns as catalog
from reference import random_row

# ---------------------------------------------------------------------------------------
# DeepSpeed: block layouts from the configurations' documented rules
# ---------------------------------------------------------------------------------------


def _windows_layout(nb: int, starts_sizes, uni: bool) -> torch.Tensor:
    layout = torch.zeros(nb, nb, dtype=torch.bool)
    for start, size in starts_sizes:
        stop = min(start + size, nb)
        for r in range(start, stop):
            for c in range(start, r + 1 if uni else stop):
                layout[r, c] = True
    return layout


def fixed_layout(nb, w, g, uni, horizontal, p):
    """FixedSparsityConfig: local windows of ``w`` blocks; in every complete window the
    ``g`` blocks from offset ``w - (1 + p) g`` are global (columns seen by every row, by the
    rows from the group's first block when unidirectional; rows seeing every column when
    horizontal); a short last window's group starts at that offset or, when it does not
    fit, ``g`` blocks before the end."""
    layout = _windows_layout(nb, [(s, w) for s in range(0, nb, w)], uni)
    first = w - (1 + p) * g
    complete = nb - nb % w
    groups = list(range(first, complete, w))
    if complete < nb:
        groups.append(min(complete + first, nb - g))
    for s in groups:
        for c in range(s, s + g):
            layout[s if uni else 0:, c] = True
            if horizontal:
                layout[c, :] = True
    return layout


def random_rows(nb: int, per_row: int, seed: int, causal: bool) -> torch.Tensor:
    """Seeded random blocks: each row takes ``per_row`` blocks among all, or among
    ``0..row`` when causal, by the stated rule (``reference.random_row``)."""
    layout = torch.zeros(nb, nb, dtype=torch.bool)
    for r in range(nb):
        for c in random_row(seed, r, r + 1 if causal else nb, per_row):
            layout[r, c] = True
    return layout


def variable_layout(nb, sizes, globals_, uni, horizontal, random_blocks, seed):
    """VariableSparsityConfig: windows of the listed sizes, then of the last size; global
    ranges as columns (rows from the start block when unidirectional) and rows when
    horizontal; random blocks among every block."""
    windows, start = [], 0
    for size in sizes:
        windows.append((start, size))
        start += size
    while start < nb:
        windows.append((start, sizes[-1]))
        start += sizes[-1]
    layout = _windows_layout(nb, windows, uni)
    for s, e in globals_:
        if s < nb:
            layout[s if uni else 0:, s:min(e, nb)] = True
            if horizontal:
                layout[s:min(e, nb), :] = True
    if random_blocks:
        layout |= random_rows(nb, random_blocks, seed, causal=False)
    return layout


def bslongformer_layout(nb, band, globals_, uni):
    layout = torch.zeros(nb, nb, dtype=torch.bool)
    w = band // 2
    for r in range(nb):
        layout[r, max(0, r - w):min(nb, r + w + 1)] = True
    for s, e in globals_:
        if s < nb:
            layout[s:min(e, nb), :] = True
            layout[:, s:min(e, nb)] = True
    return layout.tril() if uni else layout


def bigbird_layout(nb, random_blocks, band, g, uni, seed):
    layout = random_rows(nb, random_blocks, seed, causal=uni) if random_blocks else torch.zeros(nb, nb, dtype=torch.bool)
    w = band // 2
    for r in range(nb):
        layout[r, max(0, r - w):min(nb, r + w + 1)] = True
    layout[:g, :] = True
    layout[:, :g] = True
    return layout.tril() if uni else layout


def _block_layout(pattern, nb, block, heads=1) -> torch.Tensor:
    """The ``[H, nb, nb]`` block layout of a block-constant pattern (checked constant)."""
    allowed = sd.dense(pattern, nb * block, heads=heads)
    corners = allowed[:, ::block, ::block]
    assert torch.equal(allowed, corners.repeat_interleave(block, 1).repeat_interleave(block, 2))
    return corners


_ATTENTION = ("bidirectional", "unidirectional")


@pytest.mark.parametrize("w,g", [(4, 1), (4, 2), (6, 3), (3, 1), (5, 5), (8, 2)])
@pytest.mark.parametrize("attention,horizontal", [("bidirectional", False), ("unidirectional", False),
                                                  ("bidirectional", True)])
def test_deepspeed_fixed(w, g, attention, horizontal):
    patterns = w // g
    pattern = catalog.deepspeed_fixed(block=3, num_local_blocks=w, num_global_blocks=g, attention=attention,
                                      horizontal_global_attention=horizontal, num_different_global_patterns=patterns)
    for nb in range(g, 3 * w + 2):
        layout = _block_layout(pattern, nb, 3, heads=patterns + 1)
        for h in range(patterns + 1):  # head h runs pattern h % patterns
            expected = fixed_layout(nb, w, g, attention == "unidirectional", horizontal, h % patterns)
            assert torch.equal(layout[h], expected), (nb, h)


@pytest.mark.parametrize("attention", _ATTENTION)
@pytest.mark.parametrize("sizes,globals_,ends,horizontal,random_blocks", [
    ((4,), (0,), None, False, 0),
    ((2, 3, 1), (1, 6), None, True, 2),
    ((3, 5), (0, 4), (2, 9), False, 1),
    ((1,), (7,), (30,), True, 3),
])
def test_deepspeed_variable(attention, sizes, globals_, ends, horizontal, random_blocks):
    uni = attention == "unidirectional"
    if uni and horizontal:
        pytest.skip("horizontal global attention is bidirectional only")
    pattern = catalog.deepspeed_variable(block=2, num_random_blocks=random_blocks, local_window_blocks=sizes,
                                         global_block_indices=globals_, global_block_end_indices=ends,
                                         attention=attention, horizontal_global_attention=horizontal, seed=5)
    ranges = [(s, s + 1) for s in globals_] if ends is None else list(zip(globals_, ends))
    for nb in (1, 5, 12, 23):
        expected = variable_layout(nb, sizes, ranges, uni, horizontal, random_blocks, 5)
        assert torch.equal(_block_layout(pattern, nb, 2)[0], expected), nb


@pytest.mark.parametrize("attention", _ATTENTION)
@pytest.mark.parametrize("band,globals_,ends", [(3, (0,), None), (5, (2, 9), (4, 11)), (1, (3, 30), None)])
def test_deepspeed_bslongformer(attention, band, globals_, ends):
    pattern = catalog.deepspeed_bslongformer(block=4, num_sliding_window_blocks=band, global_block_indices=globals_,
                                             global_block_end_indices=ends, attention=attention)
    ranges = [(s, s + 1) for s in globals_] if ends is None else list(zip(globals_, ends))
    for nb in (1, 6, 13):
        expected = bslongformer_layout(nb, band, ranges, attention == "unidirectional")
        assert torch.equal(_block_layout(pattern, nb, 4)[0], expected), nb


@pytest.mark.parametrize("attention", _ATTENTION)
@pytest.mark.parametrize("random_blocks,band,g", [(1, 3, 1), (2, 5, 2), (0, 3, 1), (3, 1, 1)])
def test_deepspeed_bigbird(attention, random_blocks, band, g):
    pattern = catalog.deepspeed_bigbird(block=4, num_random_blocks=random_blocks, num_sliding_window_blocks=band,
                                        num_global_blocks=g, attention=attention, seed=9)
    for nb in (2, 7, 16):
        expected = bigbird_layout(nb, random_blocks, band, g, attention == "unidirectional", 9)
        assert torch.equal(_block_layout(pattern, nb, 4)[0], expected), nb


# ---------------------------------------------------------------------------------------
# attention-gym's families, from their described semantics
# ---------------------------------------------------------------------------------------


def _pairs(q_len, kv_len, allowed) -> torch.Tensor:
    return torch.tensor([[bool(allowed(q, k)) for k in range(kv_len)] for q in range(q_len)])


def _clamped(position: int, before: int, after: int, count: int) -> range:
    """The window ``[c - before, c + after]``, ``c`` clamped to ``[before, count - 1 - after]``."""
    centre = min(max(position, before), count - 1 - after)
    return range(centre - before, centre + after + 1)


@pytest.mark.parametrize("kernel,n", [(7, 7), (7, 8), (7, 40), (3, 5), (1, 9), (15, 31), (5, 100)])
def test_neighbourhood_1d_at_every_length(kernel, n):
    w = kernel // 2
    expected = _pairs(n, n, lambda q, k: k in _clamped(q, w, w, n))
    assert torch.equal(sd.dense(catalog.neighbourhood_1d(kernel), n)[0], expected)


@pytest.mark.parametrize("height,width,kh,kw", [(6, 5, 3, 3), (7, 9, 5, 3), (4, 4, 1, 3), (5, 8, 5, 7)])
def test_neighbourhood_2d(height, width, kh, kw):
    def allowed(q, k):
        (qy, qx), (ky, kx) = divmod(q, width), divmod(k, width)
        return ky in _clamped(qy, kh // 2, kh // 2, height) and kx in _clamped(qx, kw // 2, kw // 2, width)
    n = height * width
    pattern = catalog.neighbourhood_2d(height, width, kh, kw)
    assert torch.equal(sd.dense(pattern, n)[0], _pairs(n, n, allowed))
    assert sd.count(pattern, n).pairs == n * kh * kw


def _sta_reference(canvas, kernel, tile, text):
    """Tokens tile-major: tile id ``idx // prod(tile)``, tile coordinates in row-major order
    over the tile grid; a vision query sees the vision keys in the clamped window of
    ``kernel // tile`` tiles on every axis (an even count reaches one tile further back),
    and the text; a text query sees every key up to the end of the text."""
    counts = [c // t for c, t in zip(canvas, tile)]
    kernel_tiles = [k // t for k, t in zip(kernel, tile)]
    tile_tokens = 1
    for t in tile:
        tile_tokens *= t
    vision = tile_tokens
    for c in counts:
        vision *= c

    def coords(idx):
        tile_id, out = idx // tile_tokens, []
        for c in reversed(counts):
            tile_id, rest = divmod(tile_id, c)
            out.append(rest)
        return out[::-1]

    def allowed(q, k):
        if q < vision and k < vision:
            return all(kc in _clamped(qc, kt // 2, kt // 2 + kt % 2 - 1, c)
                       for qc, kc, kt, c in zip(coords(q), coords(k), kernel_tiles, counts))
        if q < vision:
            return k < vision + text
        return k < vision + text
    return vision + text, allowed


@pytest.mark.parametrize("canvas,kernel,tile,text", [
    ((8, 8), (4, 4), (2, 2), 0), ((8, 8), (4, 4), (2, 2), 5), ((12, 8), (6, 8), (3, 4), 3),
    ((4, 6, 6), (2, 4, 6), (2, 2, 2), 0), ((6, 4, 4), (6, 2, 4), (2, 2, 2), 4),
])
def test_sliding_tile(canvas, kernel, tile, text):
    n, allowed = _sta_reference(canvas, kernel, tile, text)
    pattern = catalog.sliding_tile(canvas, kernel, tile, text)
    assert torch.equal(sd.dense(pattern, n)[0], _pairs(n, n, allowed))
    assert sd.parse(str(pattern)) == pattern


@pytest.mark.parametrize("prompt,frames,per_frame,width,sink,round_width", [
    (2, 10, 14, 2, True, 4), (2, 10, 14, 2, False, 4), (5, 4, 9, 1, False, 3), (0, 6, 7, 3, True, 2),
])
def test_sparse_videogen(prompt, frames, per_frame, width, sink, round_width):
    n = prompt + frames * per_frame
    band = (width * per_frame // round_width) * round_width
    seen = prompt + (per_frame if sink else 0)
    spatial = _pairs(n, n, lambda q, k: q < prompt or k < seen or abs(q - k) < band)
    assert torch.equal(sd.dense(catalog.svg_spatial(prompt, per_frame, width, sink, round_width), n)[0], spatial)
    temporal_band = width * per_frame // frames
    temporal = _pairs(n, n, lambda q, k: q < prompt or k < prompt
                      or abs((q - prompt) % per_frame - (k - prompt) % per_frame) < temporal_band)
    assert torch.equal(sd.dense(catalog.svg_temporal(prompt, frames, per_frame, width), n)[0], temporal)


def test_sink_and_dilated_sliding_window():
    n = 70
    sink = _pairs(n, n, lambda q, k: k <= q and (q - k < 9 or k < 3))
    assert torch.equal(sd.dense(catalog.attention_sink(9, 3), n)[0], sink)
    dilated = _pairs(n, n, lambda q, k: abs(q - k) <= 12 and (q - k) % 3 == 0)
    assert torch.equal(sd.dense(catalog.dilated_sliding_window(12, 3), n)[0], dilated)
    causal = _pairs(n, n, lambda q, k: 0 <= q - k <= 12 and (q - k) % 3 == 0)
    assert torch.equal(sd.dense(catalog.dilated_sliding_window(12, 3, causal=True), n)[0], causal)


def test_document_prefix_lm():
    ids = torch.repeat_interleave(torch.tensor([4, 1, 7]), torch.tensor([9, 20, 13]))
    n = int(ids.numel())
    starts = {int(d): int((ids == d).nonzero()[0]) for d in ids.unique()}

    def allowed(q, k):
        if ids[q] != ids[k]:
            return False
        start = starts[int(ids[q])]
        return k <= q or k - start < 5
    expected = _pairs(n, n, allowed)
    assert torch.equal(sd.dense(catalog.document_prefix_lm("doc_ids", 5), n, doc_ids=ids)[0], expected)
    assert sd.count(catalog.document_prefix_lm("doc_ids", 5), n, tile=16, doc_ids=ids).pairs == int(expected.sum())


def test_video_sparse_attention_per_batch_entry():
    gen = torch.Generator().manual_seed(1)
    top = torch.topk(torch.rand(2, 3, 4, 4, generator=gen), 2, dim=-1).indices
    tiles = torch.zeros(2, 3, 4, 4, dtype=torch.bool).scatter_(-1, top, True)
    pattern = catalog.video_sparse_attention(tile_size=8)
    allowed = sd.dense(pattern, 30, heads=3, tiles=tiles)
    for b in range(2):
        for h in range(3):
            expected = _pairs(30, 30, lambda q, k: bool(tiles[b, h, q // 8, k // 8]))
            assert torch.equal(allowed[b, h], expected)
