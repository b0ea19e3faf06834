"""``sparsedsl.render``: a pattern drawn to PNG, SVG or PDF with matplotlib.

Two views of the ``Q x K`` matrix (query positions down, key positions across, equal
aspect, so a square cell is ``c`` queries by ``c`` keys):

* ``view="tokens"`` (default): the pattern itself. Each square cell of ``c x c`` tokens is
  shaded by the fraction of its pairs that are allowed (:mod:`.cells`), so strides and
  dilation stay visible at any length; ``c = 1`` (small matrices or zooms) draws every pair.
* ``view="tiles"``: what a tile-based kernel computes: each ``tile x tile`` tile full,
  partial (computed and masked) or empty (skipped).

One panel per chosen head, side by side: by default the first head of each group of heads
that run the same pattern, labelled with the whole group. ``compact=True`` draws one panel
with small type and no title, for a paper column.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Sequence

import torch

from ..analysis.count import count
from ..analysis.headsplit import distinct_head_patterns, resolve_head
from ..analysis.headstates import head_tile_states
from ..lang import nodes as n
from ..lang.checks import PatternArgumentError, check_int
from ..lang.queries import head_group_count, mask_part
from ..passes.context import Context
from ..passes.tiles import EMPTY, FULL, PARTIAL
from .cells import Cells, cell_fractions
from .output import DrawError, check_canvas, output_path, pyplot, save

__all__ = ["DrawError", "render", "panels", "merge_cells", "parse_window", "percent"]

#: Colours of the tile view: full, partial and empty tiles.
TILE_COLORS = {FULL: "#1d3f8f", PARTIAL: "#f0a030", EMPTY: "#ececec"}
#: Most cells per side of a panel (more tokens or tiles are merged into one cell).
MAX_CELLS = 512
VIEWS = ("tokens", "tiles")
#: Width of one panel, in inches (the compact panel is a paper column wide).
PANEL_WIDTH, COMPACT_WIDTH = 3.6, 3.3


# ---------------------------------------------------------------------------------------
# What to draw
# ---------------------------------------------------------------------------------------


def parse_window(where: str, zoom, q_len: int, kv_len: int) -> tuple[int, int, int, int]:
    """``(q_start, q_stop, k_start, k_stop)`` of the drawn region: the whole matrix for
    ``None``, the top-left ``z x z`` corner for a size ``z``, or the 4-tuple itself."""
    if zoom is None:
        return 0, q_len, 0, kv_len
    if isinstance(zoom, int) and not isinstance(zoom, bool):
        check_int(where, "zoom", zoom, minimum=1)
        return 0, min(q_len, zoom), 0, min(kv_len, zoom)
    try:
        values = tuple(zoom)
    except TypeError:
        values = ()
    if len(values) != 4:
        raise PatternArgumentError(
            f"{where}: argument 'zoom' must be a size or (q_start, q_stop, k_start, k_stop), "
            f"got {zoom!r}")
    q0, q1, k0, k1 = (check_int(where, "zoom", value) for value in values)
    if not (0 <= q0 < q1 <= q_len and 0 <= k0 < k1 <= kv_len):
        raise PatternArgumentError(
            f"{where}: zoom {zoom!r} must lie inside the {q_len} x {kv_len} matrix with "
            f"start < stop")
    return q0, q1, k0, k1


def _chosen_heads(pattern: n.Pattern, ctx: Context, show_heads) -> list[tuple[list[int], int, str]]:
    """``(heads labelled, head drawn, its pattern text)`` per panel."""
    core = mask_part(pattern)
    if show_heads is not None:
        if isinstance(show_heads, int) and not isinstance(show_heads, bool):
            show_heads = [show_heads]
        if not isinstance(show_heads, Sequence) or not show_heads:
            raise PatternArgumentError(
                f"render(): argument 'show_heads' must be a non-empty list of head indices, "
                f"got {show_heads!r}")
        heads = [check_int("render()", "show_heads", h) for h in show_heads]
        for h in heads:
            if h >= ctx.heads:
                raise PatternArgumentError(
                    f"render(): argument 'show_heads' holds head {h}, but the pattern runs "
                    f"{ctx.heads} head{'s' if ctx.heads > 1 else ''} (0 to {ctx.heads - 1}); "
                    f"pass heads= for more")
        return [([h], h, str(resolve_head(core, h, ctx.heads))) for h in heads]
    if ctx.buffers:  # tensors may differ by head: every head, merged below when equal
        return [([h], h, str(resolve_head(core, h, ctx.heads))) for h in range(ctx.heads)]
    return [(list(members), members[0], str(p)) for p, members in distinct_head_patterns(core, ctx.heads)]


def panels(pattern: n.Pattern, q_len: int, kv_len: int | None = None, *, heads: int | None = None,
           view: str = "tokens", show_heads=None, zoom=None, tile: int = 128,
           max_cells: int = MAX_CELLS, **buffers) -> tuple[list[dict], Context]:
    """What :func:`render` draws, one dict per panel: ``heads`` (the heads it stands for),
    ``text`` (the pattern they run), ``window`` (the drawn region) and either ``cells``
    (:class:`~.cells.Cells`, token view) or ``states`` (``[nq, nk]`` int8 tile states of the
    region, tile view). Heads whose panels are equal share one."""
    if view not in VIEWS:
        raise PatternArgumentError(f"render(): argument 'view' must be one of {VIEWS}, got {view!r}")
    tile = check_int("render()", "tile", tile, minimum=1)
    max_cells = check_int("render()", "max_cells", max_cells, minimum=1)
    heads = head_group_count(pattern) if heads is None else heads
    ctx = Context.make(pattern, q_len, kv_len, heads, buffers=buffers, where="render()")
    window = parse_window("render()", zoom, ctx.q_len, ctx.kv_len)
    chosen = _chosen_heads(pattern, ctx, show_heads)
    out: list[dict] = []
    if view == "tiles":
        q0, q1, k0, k1 = window
        region = (slice(q0 // tile, -(-q1 // tile)), slice(k0 // tile, -(-k1 // tile)))
        per_head = {}
        for members, _, states in head_tile_states(pattern, ctx, tile, buffers, "render()"):
            for h in members:
                per_head[h] = states
        for members, h, text in chosen:
            out.append({"heads": members, "text": text, "window": window,
                        "states": per_head[h][region]})
        key = "states"
    else:
        for members, h, text in chosen:
            out.append({"heads": members, "text": text, "window": window,
                        "cells": cell_fractions(pattern, ctx, h, window, max_cells)})
        key = "cells"
    if show_heads is None:
        out = _merged(out, key)
    return out, ctx


def _merged(found: list[dict], key: str) -> list[dict]:
    merged: list[dict] = []
    for panel in found:
        value = panel[key].fractions if key == "cells" else panel[key]
        for other in merged:
            seen = other[key].fractions if key == "cells" else other[key]
            if torch.equal(seen, value):
                other["heads"] = sorted(other["heads"] + panel["heads"])
                break
        else:
            merged.append(dict(panel))
    return merged


def merge_cells(states: torch.Tensor, max_cells: int = MAX_CELLS) -> tuple[torch.Tensor, int]:
    """``[nq, nk]`` tile states shrunk so neither side exceeds ``max_cells``: a cell covering
    several tiles is full (empty) only if all of them are, else partial. Returns the cells
    and the number of tiles per cell side."""
    nq, nk = states.shape
    factor = max(1, -(-max(nq, nk) // max_cells))
    if factor == 1:
        return states, 1
    pad_q, pad_k = -nq % factor, -nk % factor
    full = torch.nn.functional.pad(states == FULL, (0, pad_k, 0, pad_q), value=True)
    empty = torch.nn.functional.pad(states == EMPTY, (0, pad_k, 0, pad_q), value=True)
    shape = ((nq + pad_q) // factor, factor, (nk + pad_k) // factor, factor)
    all_full = full.reshape(shape).all(3).all(1)
    all_empty = empty.reshape(shape).all(3).all(1)
    cells = torch.full(all_full.shape, PARTIAL, dtype=torch.int8)
    cells[all_full] = FULL
    cells[all_empty] = EMPTY
    return cells, factor


# ---------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------


def ranges(values: list[int]) -> str:
    """``[0, 1, 2, 5]`` as ``"0-2, 5"``."""
    spans, start = [], values[0]
    for prev, cur in zip(values, values[1:] + [None]):
        if cur is None or cur != prev + 1:
            spans.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = cur
    return ", ".join(spans)


def percent(value: float) -> str:
    """A density as a percentage with about three significant digits."""
    if value == 0 or value >= 0.01:
        return f"{value:.2%}"
    if value >= 1e-4:
        return f"{value:.4%}"
    return f"{value * 100:.3g}%"


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _tokens(value: int) -> str:
    """A length as 4,096 or 1M (powers of two above a million as M)."""
    if value >= 1 << 20 and value % (1 << 20) == 0:
        return f"{value >> 20}M"
    return f"{value:,}"


# ---------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------


def render(pattern: n.Pattern, q_len: int, path, *, kv_len: int | None = None,
           heads: int | None = None, view: str = "tokens", show_heads=None, zoom=None,
           tile: int = 128, max_cells: int = MAX_CELLS, size: tuple[float, float] | None = None,
           dpi: int = 200, cmap: str | None = None, gamma: float = 0.5, compact: bool = False,
           **buffers: torch.Tensor) -> Path:
    """Draw ``pattern`` on a ``q_len x kv_len`` matrix to ``path`` (``.png``, ``.svg`` or
    ``.pdf``, chosen by the suffix). Returns the path written.

    * ``view``: ``"tokens"`` (each cell shaded by its fraction of allowed pairs) or
      ``"tiles"`` (full / partial / empty ``tile x tile`` tiles, as a kernel computes them).
    * ``show_heads``: the heads to draw side by side (a list of indices); by default one
      panel per group of heads that run the same pattern. ``heads`` is the number of heads
      (default: the pattern's head-group count).
    * ``zoom``: the region drawn: ``None`` (the whole matrix), a size ``z`` (the top-left
      ``z x z`` corner) or ``(q_start, q_stop, k_start, k_stop)``.
    * ``max_cells``: most cells per panel side (the token view's cells are ``c x c`` tokens
      with ``c`` as small as that allows; the tile view merges tiles).
    * ``size`` (inches, ``(width, height)``), ``dpi`` (PNG), ``cmap`` (a matplotlib colormap
      name for the token view, default ``"Blues"``), ``gamma`` (the token view's shading is
      ``fraction ** gamma``, so sparse cells stay visible; the colour bar reads fractions).
      A multiset pattern's cells count pairs with their multiplicity (the scale then runs to
      the largest multiplicity; at one token per cell a cell shows its pair's multiplicity).
    * ``compact``: one panel (the first chosen head), small type, no title.

    Tensors the pattern names are passed by keyword (``doc_ids=...``)."""
    path = output_path("render()", path)
    size = _check_size(size)
    dpi = check_int("render()", "dpi", dpi, minimum=1)
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 < gamma <= 4:
        raise PatternArgumentError(f"render(): argument 'gamma' must be a number in (0, 4], got {gamma!r}")
    plt = pyplot("render()")
    colormap = _colormap(plt, cmap)
    found, ctx = panels(pattern, q_len, kv_len, heads=heads, view=view, show_heads=show_heads,
                        zoom=zoom, tile=tile, max_cells=max_cells, **buffers)
    if compact:
        found = found[:1]
    q0, q1, k0, k1 = found[0]["window"]
    ratio = min(4.0, max(0.25, (q1 - q0) / (k1 - k0)))
    cols = len(found) if len(found) <= 5 else 4
    rows = -(-len(found) // cols)
    width = COMPACT_WIDTH if compact else PANEL_WIDTH
    if size is None:  # the axes take the panel width less the query labels; titles on top
        axes_width = width - (0.75 if compact else 0.95)
        header = 0.45 if compact else 1.0
        size = (cols * width + (0.7 if view == "tokens" else 2.4),
                rows * (axes_width * ratio + header) + (0 if compact else 0.45))
    check_canvas("render()", size, dpi)
    fontsize = 7 if compact else 9
    with plt.rc_context({"font.size": fontsize, "axes.titlesize": fontsize + 0.5,
                         "axes.labelsize": fontsize, "xtick.labelsize": fontsize - 1,
                         "ytick.labelsize": fontsize - 1}):
        fig, axes = plt.subplots(rows, cols, figsize=size, squeeze=False, layout="constrained")
        image = None
        top = _largest_share(found) if view == "tokens" else 1.0
        for ax, panel in zip(axes.flat, found):
            if view == "tokens":
                image = _draw_cells(ax, panel["cells"], colormap, gamma, top)
            else:
                _draw_tiles(ax, panel["states"], panel["window"], tile, max_cells)
            _axes(ax, panel["window"], compact)
            if not compact and ctx.heads > 1:
                label = ("head " if len(panel["heads"]) == 1 else "heads ") + ranges(panel["heads"])
                ax.set_title(label + "\n" + _short(panel["text"], 48), loc="left")
        for ax in list(axes.flat)[len(found):]:
            ax.set_axis_off()
        if view == "tokens":
            _colorbar(fig, axes, image, found, compact, top)
        else:
            _tile_legend(axes, found, tile)
        if not compact:
            fig.suptitle(_headline(pattern, ctx, tile, buffers, _characters(size[0], fontsize + 1)),
                         x=0.01, ha="left", fontsize=fontsize + 1)
    return save(fig, path, dpi)


def _check_size(size):
    if size is None:
        return None
    try:
        w, h = (float(v) for v in size)
    except (TypeError, ValueError):
        raise PatternArgumentError(
            f"render(): argument 'size' must be (width, height) in inches, got {size!r}") from None
    if not (0.5 <= w <= 100 and 0.5 <= h <= 100):
        raise PatternArgumentError(
            f"render(): argument 'size' must be between 0.5 and 100 inches a side, got {size!r}")
    return w, h


def _colormap(plt, name):
    import matplotlib

    if name is None:
        return matplotlib.colormaps["Blues"]
    try:
        return matplotlib.colormaps[name]
    except (KeyError, ValueError, TypeError):
        known = ", ".join(sorted(n for n in matplotlib.colormaps if not n.endswith("_r"))[:12])
        raise PatternArgumentError(
            f"render(): argument 'cmap' must be a matplotlib colormap name (e.g. {known}, …), "
            f"got {name!r}") from None


def _largest_share(found: list[dict]) -> float:
    """The top of the token view's scale: 1, or a multiset's largest cell value (pairs
    counted with multiplicity per pair of the cell)."""
    return max(1.0, *(float(panel["cells"].fractions.max()) for panel in found))


def _draw_cells(ax, cells: Cells, colormap, gamma: float, top: float = 1.0):
    from matplotlib.colors import PowerNorm

    return ax.imshow(cells.fractions.numpy(), cmap=colormap, norm=PowerNorm(gamma, 0.0, top),
                     interpolation="nearest", extent=cells.extent, aspect="equal")


def _draw_tiles(ax, states: torch.Tensor, window, tile: int, max_cells: int) -> None:
    from matplotlib.colors import ListedColormap

    cells, factor = merge_cells(states, max_cells)
    picture = torch.zeros_like(cells)
    picture[cells == PARTIAL], picture[cells == FULL] = 1, 2
    q0, _, k0, _ = window
    cell = tile * factor
    first_q, first_k = (q0 // tile) * tile, (k0 // tile) * tile
    extent = (first_k, first_k + cells.shape[1] * cell, first_q + cells.shape[0] * cell, first_q)
    cmap = ListedColormap([TILE_COLORS[EMPTY], TILE_COLORS[PARTIAL], TILE_COLORS[FULL]])
    ax.imshow(picture.numpy(), cmap=cmap, vmin=0, vmax=2, interpolation="nearest", extent=extent,
              aspect="equal")
    if max(cells.shape) <= 48:  # thin lines between tiles when there are few enough to see
        for c in range(1, cells.shape[1]):
            ax.axvline(first_k + c * cell, color="white", linewidth=0.5)
        for r in range(1, cells.shape[0]):
            ax.axhline(first_q + r * cell, color="white", linewidth=0.5)


def _axes(ax, window, compact: bool) -> None:
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    q0, q1, k0, k1 = window
    ax.set_xlim(k0, k1)
    ax.set_ylim(q1, q0)
    label = FuncFormatter(lambda value, _: _tokens(int(round(value))))
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(label)
        axis.set_major_locator(MaxNLocator(4 if compact else 5, integer=True))
    ax.xaxis.tick_top()
    ax.xaxis.set_label_position("top")
    ax.set_xlabel("key position")
    ax.set_ylabel("query position")


def _colorbar(fig, axes, image, found: list[dict], compact: bool, top: float = 1.0) -> None:
    cells = [p["cells"] for p in found]
    largest = max(c.cell for c in cells)
    if top > 1:  # a multiset: pairs count with their multiplicity
        what = ("multiplicity of each pair" if largest == 1 else
                f"multiplicity per pair, {largest:,}×{largest:,}-token cells")
    elif largest == 1:
        what = "allowed (1) or not (0)"
    else:
        what = (f"allowed share of each {largest:,}×{largest:,}-token cell" if not compact
                else f"allowed share per {largest:,}×{largest:,} cell")
    if any(c.estimated for c in cells):
        what += " (sampled)"
    bar = fig.colorbar(image, ax=axes, shrink=0.8 if compact else 0.6, aspect=30,
                       pad=0.02, location="right")
    bar.set_label(what)
    ticks = [0, 0.05, 0.25, 0.5, 1] if largest > 1 else [0, 1]
    bar.set_ticks(ticks + list(range(2, int(top) + 1)))


def _tile_legend(axes, found: list[dict], tile: int) -> None:
    """The three tile colours, beside the last panel of the first row."""
    from matplotlib.patches import Patch

    labels = [(FULL, "full tile"), (PARTIAL, "partial tile (masked)"), (EMPTY, "empty tile (skipped)")]
    handles = [Patch(facecolor=TILE_COLORS[s], edgecolor="#555555", label=text) for s, text in labels]
    last = axes[0][min(len(found), axes.shape[1]) - 1]
    last.legend(handles=handles, loc="center left", bbox_to_anchor=(1.03, 0.5), frameon=False,
                title=f"{tile}×{tile}-token tiles", alignment="left")


def _characters(width: float, fontsize: float) -> int:
    """About how many characters of ``fontsize`` points fit a line ``width`` inches wide
    (an average character is taken as 0.6 of the size)."""
    return max(20, int(width * 72 / (0.6 * fontsize)))


def _headline(pattern: n.Pattern, ctx: Context, tile: int, buffers: dict, line: int) -> str:
    """The figure's title: the pattern's text in lines of at most ``line`` characters
    (broken between words, three lines at most), then the counts."""
    counts = count(pattern, ctx.q_len, ctx.kv_len, heads=ctx.heads, tile=tile, **buffers)
    shape = _tokens(ctx.q_len) if ctx.kv_len == ctx.q_len else f"{_tokens(ctx.q_len)} × {_tokens(ctx.kv_len)}"
    heads = f", {ctx.heads} heads" if ctx.heads > 1 else ""
    multiplicity = (f" ({counts.pairs_with_multiplicity:,} with multiplicity)"
                    if counts.per_head_with_multiplicity is not None else "")
    text = textwrap.wrap(str(pattern), line, break_long_words=False, break_on_hyphens=False)
    text = text[:2] + [_short(" ".join(text[2:]), line)] if len(text) > 3 else text
    return ("\n".join(text) + f"\nN = {shape}{heads}: {counts.pairs:,} allowed pairs{multiplicity}, "
            f"density {percent(counts.density)}" + ("\n" if ctx.heads > 1 else ""))
