"""Pictures: ``show`` (terminal), ``render`` (PNG/SVG with matplotlib) and ``diagram``
(graphviz). Files are produced and valid, one panel per distinct head pattern, the zoom is
the dense reference of its region, and missing tools or bad suffixes give clear errors."""

from __future__ import annotations

import importlib.util
import io
import shutil
import sys
import xml.etree.ElementTree as ET

import pytest
import torch

import sparsedsl as sd
from sparsedsl.analysis.count import tile_grid_states
from sparsedsl.draw.diagram import diagram, diagram_source
from sparsedsl.draw.render import DrawError, merge_cells, panels, render
from sparsedsl.draw.terminal import show
from sparsedsl.passes.tiles import EMPTY, FULL, PARTIAL

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
needs_matplotlib = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                                      reason="matplotlib is not installed")
needs_dot = pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz's dot is not installed")


def svg_root(path):
    root = ET.parse(path).getroot()
    assert root.tag.endswith("svg")
    return root


def svg_text(path) -> str:
    return " ".join(t for t in svg_root(path).itertext())


# -- render -------------------------------------------------------------------------------


@needs_matplotlib
def test_render_png_and_svg(tmp_path):
    png = render(sd.window(64) | sd.global_tokens(8), 1000, tmp_path / "a.png", tile=64)
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 10_000
    svg = render(sd.segments([64, 64], [1, 2]), 512, tmp_path / "b.svg", heads=4, tile=32)
    text = svg_text(svg)
    assert "segments([64, 64], [1, 2])" in text
    assert "heads 0-1" in text and "heads 2-3" in text
    assert "full tile" in text and "partial tile" in text and "empty tile" in text
    counts = sd.analysis.count.count(sd.segments([64, 64], [1, 2]), 512, heads=4, tile=32)
    assert f"{counts.pairs:,} allowed pairs" in text


@pytest.mark.parametrize("pattern, heads, expected", [
    (sd.segments([64, 64], [1, 2]), 4, [[0, 1], [2, 3]]),
    (sd.heads(sd.causal(), sd.window(8), sd.causal()), 3, [[0, 2], [1]]),
    (sd.heads(sd.causal(), sd.causal()), 2, [[0, 1]]),
    (sd.window(8), 5, [[0, 1, 2, 3, 4]]),
    (sd.heads(sd.window(3), sd.window(3) | sd.window(2)), 2, [[0, 1]]),  # same picture, merged
])
def test_one_panel_per_distinct_head_pattern(pattern, heads, expected):
    groups, _ = panels(pattern, 300, heads=heads, tile=32)
    assert [g["heads"] for g in groups] == expected
    allowed = sd.dense(pattern, 300, heads=heads)
    for g in groups:
        q0, q1, k0, k1 = g["window"]
        for h in g["heads"]:
            assert torch.equal(g["zoom"], allowed[h, q0:q1, k0:k1])


def test_panels_with_tensors_group_by_picture():
    lay = torch.tensor([[[1, 0], [0, 1]], [[1, 1], [1, 1]], [[1, 0], [0, 1]]], dtype=torch.bool)
    p = sd.blocks(4).layout("lay")
    groups, _ = panels(p, 8, heads=3, tile=4, lay=lay)
    assert [g["heads"] for g in groups] == [[0, 2], [1]]
    _, _, _, states = tile_grid_states(p, 8, None, 3, 4, {"lay": lay}, "test")
    assert torch.equal(groups[0]["states"], states[0, 0])


def test_zoom_is_the_dense_reference_of_its_region():
    p = sd.dilated_window(20, 5, 3) | sd.prefix(7)
    groups, _ = panels(p, 400, 300, tile=16, zoom=(100, 180, 40, 90))
    assert groups[0]["window"] == (100, 180, 40, 90)
    assert torch.equal(groups[0]["zoom"], sd.dense(p, 400, 300)[0, 100:180, 40:90])
    with pytest.raises(ValueError, match="zoom"):
        panels(p, 400, zoom=(0, 500, 0, 10))


def test_default_zoom_moves_to_a_boundary():
    # At the corner everything is allowed; the zoom goes where tiles are partial.
    groups, _ = panels(sd.window(4096) | sd.global_tokens(128), 1 << 16, tile=128)
    q0, q1, k0, k1 = groups[0]["window"]
    zoom = groups[0]["zoom"]
    assert (q1 - q0, k1 - k0) == (256, 256)
    assert zoom.any() and not zoom.all()


@needs_matplotlib
def test_render_a_million_tokens_without_a_dense_matrix(tmp_path):
    path = render(sd.window(4096) | sd.global_tokens(128), 1 << 20, tmp_path / "big.png")
    assert path.read_bytes()[:8] == PNG_MAGIC


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


def test_render_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"\.png or \.svg"):
        render(sd.causal(), 64, tmp_path / "a.jpg")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(DrawError, match="pip install matplotlib"):
        render(sd.causal(), 64, tmp_path / "a.png")


# -- diagram ------------------------------------------------------------------------------


def test_diagram_source_annotates_every_node():
    p = sd.blocks(256).local(1).within(sd.segments([128, 128], [1, 2]))
    source = diagram_source(p, seq_len=1024, heads=4)
    assert source.startswith("digraph")
    for text in ("block pattern", "LongNet head groups", "dilated(128, 1)", "dilated(128, 2, 1)",
                 "32,768 pairs per head", "8,192 pairs per head", "on one 256×256 block",
                 "heads 0-1", "heads 2-3", "density 50.00%", "density 12.50%"):
        assert text in source, text
    c = sd.analysis.count.count(p, 1024, heads=4)
    assert f"{c.pairs:,} pairs in all 4 heads" in source


@needs_dot
def test_diagram_svg_and_png(tmp_path):
    p = (sd.window(32) | sd.global_tokens(4)) - sd.heads(sd.strided(7), sd.causal())
    svg = diagram(p, tmp_path / "d.svg", seq_len=512)
    text = svg_text(svg)
    assert "union" in text and "global_tokens(4)" in text and "head 1" in text
    png = diagram(p, tmp_path / "d.png", seq_len=512)
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_diagram_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"\.png or \.svg"):
        diagram(sd.causal(), tmp_path / "d.pdf")
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
