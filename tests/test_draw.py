"""Pictures: ``show`` (terminal), ``render`` and ``render_scores`` (matplotlib) and
``diagram`` (graphviz). The token view's shading is the dense reference's share of allowed
pairs per cell, on random patterns and sizes, without a dense matrix at a million tokens;
the tile view is the structural tile states; files are valid in every format; bad
arguments and missing tools give clear errors."""

from __future__ import annotations

import importlib.util
import io
import shutil
import sys
import time
import xml.etree.ElementTree as ET

import pytest
import torch
from hypothesis import given, settings, HealthCheck
from hypothesis import strategies as st

import sparsedsl as sd
from sparsedsl.draw.cells import cell_fractions
from sparsedsl.passes.context import Context
from sparsedsl.passes.maskmod import lower_mask
from sparsedsl.passes.refine import tile_pair_counts
from sparsedsl.passes.tiles import TileGrid
from sparsedsl.analysis.count import tile_grid_states
from sparsedsl.draw.cells import cell_fractions
from sparsedsl.draw.diagram import diagram, diagram_source
from sparsedsl.draw.output import DrawError
from sparsedsl.draw.render import merge_cells, panels, render
from sparsedsl.draw.scores import render_scores, score_maps
from sparsedsl.draw.terminal import show
from sparsedsl.passes.context import Context
from sparsedsl.passes.tiles import EMPTY, FULL, PARTIAL
from strategies import pattern_cases

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
needs_matplotlib = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                                      reason="matplotlib is not installed")
needs_dot = pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz's dot is not installed")


def svg_text(path) -> str:
    root = ET.parse(path).getroot()
    assert root.tag.endswith("svg")
    return " ".join(t for t in root.itertext())


def reference_shares(allowed: torch.Tensor, cells) -> torch.Tensor:
    """The dense reference's share of allowed pairs in each cell of ``cells``."""
    rows, cols = cells.fractions.shape
    out = torch.empty(rows, cols, dtype=torch.float64)
    for r in range(rows):
        for c in range(cols):
            q0, k0 = cells.q_first + r * cells.cell, cells.k_first + c * cells.cell
            out[r, c] = allowed[q0:q0 + cells.cell, k0:k0 + cells.cell].double().mean()
    return out


# -- the token view's shading -------------------------------------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=pattern_cases(max_len=200), max_cells=st.integers(1, 40), data=st.data())
def test_cell_shares_equal_the_dense_reference(case, max_cells, data):
    pattern, q_len, kv_len, heads, buffers = case
    ctx = Context.make(pattern, q_len, kv_len, heads, buffers=buffers)
    allowed = sd.dense(pattern, q_len, kv_len, heads=heads, **buffers)
    allowed = allowed if allowed.dim() == 3 else allowed[0]
    q0 = data.draw(st.integers(0, q_len - 1))
    q1 = data.draw(st.integers(q0 + 1, q_len))
    k0 = data.draw(st.integers(0, kv_len - 1))
    k1 = data.draw(st.integers(k0 + 1, kv_len))
    head = data.draw(st.integers(0, heads - 1))
    cells = cell_fractions(pattern, ctx, head, (q0, q1, k0, k1), max_cells)
    assert not cells.estimated
    assert cells.q_first <= q0 and cells.k_first <= k0
    assert cells.q_first + cells.fractions.shape[0] * cells.cell >= q1
    assert torch.allclose(cells.fractions, reference_shares(allowed[head], cells), atol=1e-12)


def test_sampled_cells_estimate_the_share_and_say_so():
    ids = torch.repeat_interleave(torch.arange(3), torch.tensor([70, 130, 100]))
    p = sd.documents("d") & sd.strided(3)
    ctx = Context.make(p, 300, None, 1, buffers={"d": ids})
    exact = cell_fractions(p, ctx, 0, (0, 300, 0, 300), 10)
    sampled = cell_fractions(p, ctx, 0, (0, 300, 0, 300), 10, budget=100, seed=3)
    assert not exact.estimated and sampled.estimated
    assert torch.equal(exact.fractions == 0, sampled.fractions == 0)  # empty cells stay exact
    assert (exact.fractions - sampled.fractions).abs().max() < 0.08


def test_dilation_stays_visible_at_a_million_tokens():
    n = 1 << 20
    p = sd.segments([2048, 4096, 8192, 16384], [1, 2, 4, 8])
    ctx = Context.make(p, n, None, 4)
    start = time.perf_counter()
    cells = cell_fractions(p, ctx, 3, (0, n, 0, n), 256)
    assert time.perf_counter() - start < 30
    assert cells.cell == 4096 and not cells.estimated
    # head 3 runs dilated(16384, 8, 3): a 4096-token cell inside a segment keeps 1/8 x 1/8
    assert cells.fractions[0, 0].item() == pytest.approx(1 / 64)
    assert cells.fractions[0, 4].item() == 0.0
    strided = sd.strided(7) & sd.causal()
    shares = cell_fractions(strided, Context.make(strided, n, None, 1), 0, (0, n, 0, n), 128).fractions
    assert shares[5, 2].item() == pytest.approx(1 / 7, abs=1e-3)


# -- panels -------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern, heads, expected", [
    (sd.segments([64, 64], [1, 2]), 4, [[0, 1], [2, 3]]),
    (sd.heads(sd.causal(), sd.window(8), sd.causal()), 3, [[0, 2], [1]]),
    (sd.heads(sd.causal(), sd.causal()), 2, [[0, 1]]),
    (sd.window(8), 5, [[0, 1, 2, 3, 4]]),
    (sd.heads(sd.window(3), sd.window(3) | sd.window(2)), 2, [[0, 1]]),  # same picture, merged
])
def test_one_panel_per_distinct_head_pattern(pattern, heads, expected):
    found, _ = panels(pattern, 300, heads=heads, max_cells=300)
    assert [g["heads"] for g in found] == expected
    allowed = sd.dense(pattern, 300, heads=heads)
    for g in found:
        assert g["cells"].cell == 1
        for h in g["heads"]:
            assert torch.equal(g["cells"].fractions, allowed[h].double())


def test_chosen_heads_and_layout_tensors_per_head():
    lay = torch.tensor([[[1, 0], [0, 1]], [[1, 1], [1, 1]], [[1, 0], [0, 1]]], dtype=torch.bool)
    p = sd.blocks(4).layout("lay")
    found, _ = panels(p, 8, heads=3, tile=4, lay=lay)
    assert [g["heads"] for g in found] == [[0, 2], [1]]
    chosen, _ = panels(p, 8, heads=3, show_heads=[2, 1], lay=lay, max_cells=8)
    assert [g["heads"] for g in chosen] == [[2], [1]]
    assert torch.equal(chosen[0]["cells"].fractions, sd.dense(p, 8, heads=3, lay=lay)[2].double())
    with pytest.raises(ValueError, match="show_heads.*head 3"):
        panels(p, 8, heads=3, show_heads=[3], lay=lay)


def test_tile_view_is_the_structural_tile_states():
    p = sd.dilated_window(20, 5, 3) | sd.prefix(7)
    found, _ = panels(p, 400, 300, view="tiles", tile=16, zoom=(100, 180, 40, 90))
    _, _, _, states = tile_grid_states(p, 400, 300, 1, 16, {}, "test")
    assert torch.equal(found[0]["states"], states[0, 0][100 // 16:-(-180 // 16), 40 // 16:-(-90 // 16)])


def test_zoom_window_errors():
    with pytest.raises(ValueError, match="zoom"):
        panels(sd.causal(), 400, zoom=(0, 500, 0, 10))
    for zoom in ((0, 1.5, 0, 2), (0, 10, 0), "abcd", 2.5):
        with pytest.raises(ValueError, match="'zoom'"):
            panels(sd.causal(), 10, zoom=zoom)
    with pytest.raises(ValueError, match="view"):
        panels(sd.causal(), 40, view="bars")


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="needs matplotlib")
def test_tile_view_merges_tiles_to_max_cells(tmp_path, monkeypatch):
    import sparsedsl.draw.render as drawing
    merged, original = [], drawing.merge_cells

    def recording(states, max_cells=drawing.MAX_CELLS):
        merged.append(original(states, max_cells)[0].shape)
        return original(states, max_cells)

    monkeypatch.setattr(drawing, "merge_cells", recording)
    render(sd.causal(), 40, tmp_path / "t.png", view="tiles", tile=1, max_cells=4)
    assert merged and max(merged[0]) <= 4


def test_merge_cells_keeps_full_and_empty_only_when_uniform():
    states = torch.full((10, 10), EMPTY, dtype=torch.int8)
    states[:4, :4] = FULL
    states[9, 9] = PARTIAL
    cells, factor = merge_cells(states, max_cells=5)
    assert factor == 2 and cells.shape == (5, 5)
    assert cells[0, 0] == FULL and cells[1, 1] == FULL and cells[2, 2] == EMPTY
    assert cells[4, 4] == PARTIAL
    cells, _ = merge_cells(states, max_cells=4)  # 3x3 tiles per cell, padding does not count
    assert cells[0, 0] == FULL and cells[1, 1] == PARTIAL and cells[2, 2] == EMPTY
    assert cells[3, 3] == PARTIAL and cells[3, 0] == EMPTY


# -- files --------------------------------------------------------------------------------


@needs_matplotlib
def test_render_formats_and_options(tmp_path):
    png = render(sd.window(64) | sd.global_tokens(8), 1000, tmp_path / "a.png", size=(4, 3), dpi=50)
    from PIL import Image  # matplotlib depends on pillow
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert Image.open(png).size == (200, 150)
    svg = render(sd.segments([64, 64], [1, 2]), 512, tmp_path / "b.svg", heads=4, view="tiles", tile=32)
    text = svg_text(svg)
    assert "segments([64, 64], [1, 2])" in text and "heads 0-1" in text and "heads 2-3" in text
    assert "full tile" in text and "partial tile" in text and "empty tile" in text
    counts = sd.count(sd.segments([64, 64], [1, 2]), 512, heads=4, tile=32)
    assert f"{counts.pairs:,} allowed pairs" in text
    pdf = render(sd.causal(), 300, tmp_path / "c.pdf", kv_len=600, compact=True, cmap="viridis")
    assert pdf.read_bytes()[:5] == b"%PDF-"
    compact = svg_text(render(sd.segments([64, 64], [1, 2]), 512, tmp_path / "d.svg", heads=4,
                              compact=True))
    assert "segments" not in compact and "heads 0-1" not in compact  # one panel, no titles


@needs_matplotlib
def test_render_a_million_tokens_without_a_dense_matrix(tmp_path):
    path = render(sd.window(4096) | sd.global_tokens(128), 1 << 20, tmp_path / "big.png", dpi=60)
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_render_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"\.png, \.svg or \.pdf"):
        render(sd.causal(), 64, tmp_path / "a.jpg")
    with pytest.raises(ValueError, match="is a directory"):
        render(sd.causal(), 64, tmp_path)  # a directory named like a file is refused too
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(ValueError, match="is a directory"):
        render(sd.causal(), 64, tmp_path / "dir.png")
    with pytest.raises(ValueError, match="size"):
        render(sd.causal(), 64, tmp_path / "a.png", size=(0, 3))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(DrawError, match="pip install matplotlib"):
        render(sd.causal(), 64, tmp_path / "a.png")


# -- scores and weights -------------------------------------------------------------------


def test_score_maps_are_the_masked_softmax_with_the_modification():
    p = (sd.window(6) | sd.global_tokens(2)).score(sd.alibi(), sd.softcap(4.0))
    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 4, 37, 8, generator=gen), torch.randn(2, 2, 29, 8, generator=gen)
    maps = score_maps(p, 37, 29, heads=4, head=3, q=q, k=k)
    allowed = sd.dense(p, 37, 29, heads=4)[3]
    mod = sd.compile(p).score_mod(37, 29, heads=4)
    qi, ki = torch.arange(37)[:, None], torch.arange(29)[None, :]
    raw = (q[0, 3].double() @ k[0, 1].double().T) * 8 ** -0.5
    scores = mod(raw, torch.tensor(0), torch.tensor(3), qi, ki)
    weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1)
    assert torch.equal(maps["allowed"], allowed)
    assert torch.isnan(maps["weights"][~allowed]).all()
    assert torch.allclose(maps["scores"][allowed], scores[allowed])
    assert torch.allclose(maps["weights"][allowed], weights[allowed])
    assert torch.allclose(torch.nansum(maps["weights"], -1), torch.ones(37, dtype=torch.float64))


def test_score_maps_random_inputs_and_limits():
    a = score_maps(sd.causal().score(sd.alibi()), 20, heads=2, head=1, seed=5)
    b = score_maps(sd.causal().score(sd.alibi()), 20, heads=2, head=1, seed=5)
    assert torch.equal(a["scores"].nan_to_num(), b["scores"].nan_to_num())
    assert a["mod"][5, 2].item() < 0 and a["mod"][5, 5].item() == 0  # ALiBi: a distance penalty
    with pytest.raises(ValueError, match="at most 4,096"):
        score_maps(sd.causal(), 5000)
    with pytest.raises(ValueError, match="head"):
        score_maps(sd.causal(), 20, heads=2, head=2)


@needs_matplotlib
def test_render_scores_file(tmp_path):
    path = render_scores(sd.causal().score(sd.alibi()), 64, tmp_path / "s.svg", heads=8, head=7,
                         show=("mod", "scores", "weights"))
    text = svg_text(path)
    assert "attention weights" in text and "head 7" in text


# -- diagram ------------------------------------------------------------------------------


def test_diagram_source_annotates_every_node():
    p = sd.blocks(256).local(1).within(sd.segments([128, 128], [1, 2]))
    source = diagram_source(p, seq_len=1024, heads=4)
    assert source.startswith("digraph")
    for text in ("block pattern", "LongNet head groups", "dilated(128, 1)", "dilated(128, 2, 1)",
                 "32,768 pairs per head", "8,192 pairs per head", "on one 256×256 block",
                 "heads 0-1", "heads 2-3", "density 50.00%", "density 12.50%"):
        assert text in source, text
    c = sd.count(p, 1024, heads=4)
    assert f"{c.pairs:,} pairs in all 4 heads" in source


def test_diagram_source_counts_rectangles():
    p = sd.causal() | sd.prefix(8)
    source = diagram_source(p, seq_len=100, kv_len=150)
    assert "Q = 100, K = 150" in source
    assert f"{int(sd.dense(p, 100, 150).sum()):,} pairs" in source
    assert f"{int(sd.dense(sd.prefix(8), 100, 150).sum()):,} pairs" in source


@needs_dot
def test_diagram_svg_png_pdf(tmp_path):
    p = (sd.window(32) | sd.global_tokens(4)) - sd.heads(sd.strided(7), sd.causal())
    text = svg_text(diagram(p, tmp_path / "d.svg", seq_len=512))
    assert "union" in text and "global_tokens(4)" in text and "head 1" in text
    assert diagram(p, tmp_path / "d.png", seq_len=512).read_bytes()[:8] == PNG_MAGIC
    assert diagram(p, tmp_path / "d.pdf", seq_len=512).read_bytes()[:5] == b"%PDF-"


def test_diagram_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"\.png, \.svg or \.pdf"):
        diagram(sd.causal(), tmp_path / "d.gif")
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(DrawError, match="apt-get install graphviz") as info:
        diagram(sd.causal(), tmp_path / "d.svg", seq_len=64)
    assert "dot" in str(info.value)


# -- show (terminal) ----------------------------------------------------------------------


def test_show_has_legend_panels_and_counts():
    out = io.StringIO()
    text = show(sd.segments([64, 64], [1, 2]), 256, heads=4, tile=64, file=out)
    assert out.getvalue().strip() == text.strip()
    assert "heads 0-1:" in text and "heads 2-3:" in text
    assert "full tile" in text and "partial tile" in text and "empty tile" in text
    assert "pairs:" in text
    assert "pairs:" not in show(sd.causal(), 256, counts=False, file=io.StringIO())


def test_tiles_larger_than_the_budget_are_counted_a_band_of_rows_at_a_time():
    pattern = sd.window(37) | sd.dilated(5, 3, 1)
    ctx = Context(3000, 3000, 1, torch.device("cpu"))
    grid = TileGrid(3000, 3000, 1024, 1024)
    tiles = torch.tensor([[0, 0, i, j] for i in range(3) for j in range(3)])
    mask_mod = lower_mask(pattern, ctx)
    # 1,024 x 1,024 positions a tile against a budget of 5,000: bands of 4 rows.
    assert torch.equal(tile_pair_counts(mask_mod, grid, tiles, budget=5_000), tile_pair_counts(mask_mod, grid, tiles))
    dense = sd.dense(pattern, 3000)[0]
    assert int(tile_pair_counts(mask_mod, grid, tiles).sum()) == int(dense.sum())


def test_token_view_at_ten_million_tokens_samples_large_cells(tmp_path):
    """Cells of 19,532 tokens hold more pairs than the budget: undecided cells are sampled
    (the figure says so) instead of evaluated whole (which asked for gigabytes)."""
    path = sd.render(sd.window(3), 10**7, tmp_path / "x.png")
    assert path.exists() and path.stat().st_size > 0
    cells = cell_fractions(sd.window(3), Context(10**7, 10**7, 1, torch.device("cpu")), 0,
                           (0, 10**7, 0, 10**7), 512)
    assert cells.estimated and cells.fractions.shape == (512, 512)
    # 7 keys a row of 19,532 in a diagonal cell: 3.6e-4 on average, sampled; none off it.
    assert 1e-4 < cells.fractions.diagonal().mean() < 1e-3
    assert cells.fractions.triu(2).sum() == 0 and cells.fractions.tril(-2).sum() == 0
