"""``sparsedsl.render``: a pattern drawn to PNG or SVG with matplotlib.

One row of panels per distinct head pattern: on the left the tile grid (full / partial /
empty tiles, as a tile-based kernel sees them), on the right a token-level zoom of a small
region (the ``mask_mod`` evaluated on that region only, never a dense ``Q x K`` matrix),
with the tile boundaries drawn over it. The title carries the pattern text and its exact
counts.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..analysis.count import count
from ..analysis.headstates import head_tile_states
from ..lang import nodes as n
from ..lang.checks import PatternArgumentError, check_int
from ..lang.queries import head_group_count, mask_part
from ..passes.context import Context
from ..passes.maskmod import lower_mask
from ..passes.tiles import EMPTY, FULL, PARTIAL

#: Colours: full tiles, partial tiles, empty tiles; allowed and masked positions.
COLORS = {FULL: "#1d3f8f", PARTIAL: "#f0a030", EMPTY: "#ececec"}
ALLOWED, MASKED = "#1d3f8f", "#ffffff"
#: Largest number of cells drawn per side of a tile grid (more tiles are merged).
MAX_CELLS = 512
SUFFIXES = (".png", ".svg")


class DrawError(RuntimeError):
    """A drawing tool (matplotlib, graphviz's ``dot``) is missing or failed."""


def check_suffix(where: str, path) -> Path:
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise ValueError(f"{where}: the output path must end in .png or .svg (the format is "
                         f"chosen by the suffix), got {str(path)!r}")
    return path


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise DrawError(
            "render() needs matplotlib, which is not installed: pip install matplotlib "
            "(or pip install 'sparsedsl[draw]')"
        ) from err
    return plt


# ---------------------------------------------------------------------------------------
# What to draw
# ---------------------------------------------------------------------------------------


def merge_cells(states: torch.Tensor, max_cells: int = MAX_CELLS) -> tuple[torch.Tensor, int]:
    """``[nq, nk]`` states shrunk so neither side exceeds ``max_cells``: a cell covering
    several tiles is full (empty) only if all of them are, else partial. Returns the
    cells and the number of tiles per cell side."""
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


def zoom_size(tile: int) -> int:
    """Side of the default zoom: a few tiles, few enough tokens to tell apart."""
    return max(min(4 * tile, 256), min(2 * tile, 256), 32)


def default_zoom(states: list[torch.Tensor], q_len: int, kv_len: int, tile: int) -> tuple[int, int, int, int]:
    """The first few tiles' worth of tokens, when something changes there (a partial tile,
    or full next to empty); otherwise the same size centred on the first partial tile (row
    by row) of any panel, or else on the first edge between a non-empty and an empty tile,
    so that the zoom shows a boundary rather than a uniform block."""
    size = zoom_size(tile)
    span = -(-size // tile)
    origin = (0, min(q_len, size), 0, min(kv_len, size))
    anchors = []
    for grid in states:
        corner = grid[:span, :span]
        if bool((corner == PARTIAL).any()) or (bool((corner == EMPTY).any()) and bool((corner != EMPTY).any())):
            return origin
        hits = (grid == PARTIAL).nonzero()
        if hits.numel():
            i, j = (int(v) for v in hits[0])
            anchors.append((0, i * tile + tile // 2, j * tile + tile // 2))
            continue
        edges = ((grid[:, :-1] != EMPTY) & (grid[:, 1:] == EMPTY)).nonzero()
        if edges.numel():
            i, j = (int(v) for v in edges[0])
            anchors.append((1, i * tile + tile // 2, (j + 1) * tile))
    if not anchors:
        return origin
    _, qc, kc = min(anchors)
    q0 = max(0, min(qc - size // 2, q_len - size))
    k0 = max(0, min(kc - size // 2, kv_len - size))
    return q0, min(q_len, q0 + size), k0, min(kv_len, k0 + size)


def _zoom_window(zoom, q_len: int, kv_len: int, tile: int) -> tuple[int, int, int, int] | None:
    """``(q0, q1, k0, k1)`` of the zoomed region (None: decided from the tile states)."""
    if zoom is None:
        return None
    if isinstance(zoom, int) and not isinstance(zoom, bool):
        check_int("render()", "zoom", zoom, minimum=1)
        return 0, min(q_len, zoom), 0, min(kv_len, zoom)
    try:
        q0, q1, k0, k1 = (int(v) for v in zoom)
    except (TypeError, ValueError):
        raise PatternArgumentError(
            f"render(): argument 'zoom' must be a size or (q_start, q_stop, k_start, k_stop), "
            f"got {zoom!r}") from None
    if not (0 <= q0 < q1 <= q_len and 0 <= k0 < k1 <= kv_len):
        raise PatternArgumentError(
            f"render(): zoom {zoom!r} must lie inside the {q_len} x {kv_len} matrix with "
            f"start < stop")
    if (q1 - q0) * (k1 - k0) > 1 << 22:
        raise PatternArgumentError(f"render(): zoom {zoom!r} is too large to draw token by token "
                                   f"(at most 4M positions)")
    return q0, q1, k0, k1


def zoom_mask(mask_mod, head: int, window: tuple[int, int, int, int]) -> torch.Tensor:
    """The ``mask_mod`` of head ``head`` (batch 0) on the zoomed region only."""
    q0, q1, k0, k1 = window
    q = torch.arange(q0, q1)[:, None]
    k = torch.arange(k0, k1)[None, :]
    zero = torch.zeros((), dtype=torch.int64)
    out = mask_mod(zero, torch.tensor(head), q, k)
    return out.expand(q1 - q0, k1 - k0).clone()


def panels(pattern: n.Pattern, q_len: int, kv_len: int | None = None, *, heads: int | None = None,
           tile: int = 128, zoom=None, **buffers) -> tuple[list[dict], Context]:
    """One dict per distinct head pattern: ``heads`` (list), ``text`` (the pattern that
    head group runs), ``states`` (``[nq, nk]`` int8) and ``zoom`` (bool token mask), plus
    ``window`` (the zoomed region). Heads are grouped by the pattern they run; groups that
    draw identically are merged."""
    tile = check_int("render()", "tile", tile, minimum=1)
    heads = head_group_count(pattern) if heads is None else heads
    core = mask_part(pattern)
    ctx = Context.make(pattern, q_len, kv_len, heads, buffers=buffers, where="render()")
    window = _zoom_window(zoom, ctx.q_len, ctx.kv_len, tile)
    mask_mod = lower_mask(core, ctx)
    candidates = head_tile_states(pattern, ctx, tile, buffers, "render()")
    if window is None:
        window = default_zoom([c[2] for c in candidates], ctx.q_len, ctx.kv_len, tile)
    out: list[dict] = []
    for members, text, states in candidates:
        mask = zoom_mask(mask_mod, members[0], window)
        for panel in out:
            if torch.equal(panel["states"], states) and torch.equal(panel["zoom"], mask):
                panel["heads"].extend(members)
                if text not in panel["texts"]:
                    panel["texts"].append(text)
                break
        else:
            out.append({"heads": list(members), "texts": [text], "states": states, "zoom": mask,
                        "window": window})
    for panel in out:
        panel["heads"].sort()
    return out, ctx


# ---------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------


def _ranges(values: list[int]) -> str:
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


def _short(text: str, limit: int = 90) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def render(pattern: n.Pattern, q_len: int, path, *, kv_len: int | None = None,
           heads: int | None = None, tile: int = 128, zoom=None, **buffers: torch.Tensor) -> Path:
    """Draw ``pattern`` on a ``q_len x kv_len`` matrix to ``path`` (``.png`` or ``.svg``).

    ``zoom`` picks the token-level region: ``None`` (the first few tiles' worth of tokens),
    a size ``z`` (the top-left ``z x z`` corner) or ``(q_start, q_stop, k_start, k_stop)``.
    ``heads`` defaults to the pattern's head-group count; tensors the pattern names are
    passed by keyword. Returns the path written."""
    path = check_suffix("render()", path)
    plt = _pyplot()
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch, Rectangle

    groups, ctx = panels(pattern, q_len, kv_len, heads=heads, tile=tile, zoom=zoom, **buffers)
    counts = count(pattern, q_len, kv_len, heads=ctx.heads, tile=tile, **buffers)
    rows = len(groups)
    fig, axes = plt.subplots(rows, 2, figsize=(13, 5.9 * rows + 1.3), squeeze=False,
                             layout="constrained")
    tile_cmap = ListedColormap([COLORS[EMPTY], COLORS[PARTIAL], COLORS[FULL]])
    zoom_cmap = ListedColormap([MASKED, ALLOWED])
    for row, panel in enumerate(groups):
        ax_grid, ax_zoom = axes[row]
        cells, factor = merge_cells(panel["states"])
        nq, nk = panel["states"].shape
        picture = cells.clone()
        picture[cells == EMPTY], picture[cells == PARTIAL], picture[cells == FULL] = 0, 1, 2
        cell = tile * factor
        ax_grid.imshow(picture.numpy(), cmap=tile_cmap, vmin=0, vmax=2, interpolation="nearest",
                       extent=(0, cells.shape[1] * cell, cells.shape[0] * cell, 0), aspect="auto")
        ax_grid.set_xlim(0, ctx.kv_len)
        ax_grid.set_ylim(ctx.q_len, 0)
        _positions(ax_grid)
        _positions(ax_zoom)
        _grid_lines(ax_grid, cells.shape, cell)
        if factor > 1:
            _corner_inset(ax_grid, panel["states"], tile, tile_cmap)
        head_counts = counts.tiles_per_head[panel["heads"][0]]
        label = ""
        if ctx.heads > 1:
            label = ("head " if len(panel["heads"]) == 1 else "heads ") + _ranges(panel["heads"]) + ": "
        ax_grid.set_title(
            f"{label}{_short(' = '.join(panel['texts']), 70)}\n"
            f"{counts.per_head[panel['heads'][0]]:,} pairs per head · tiles {head_counts.full:,} full, "
            f"{head_counts.partial:,} partial, {head_counts.empty:,} empty",
            fontsize=10, loc="left")
        scale = f"{tile}×{tile} tiles" + (f" (each cell {factor}×{factor} tiles)" if factor > 1 else "")
        ax_grid.set_xlabel(f"key position k  —  a {nq}×{nk} grid of {scale}", fontsize=9)
        ax_grid.set_ylabel("query position q", fontsize=9)
        q0, q1, k0, k1 = panel["window"]
        whole = (q0, q1, k0, k1) == (0, ctx.q_len, 0, ctx.kv_len)
        if not whole:
            ax_grid.add_patch(Rectangle((k0, q0), k1 - k0, q1 - q0, fill=False, edgecolor="#d62728",
                                        linewidth=2.4, linestyle="--"))
            ax_grid.annotate("zoom", xy=(k1, q1), xytext=(6, 6), textcoords="offset points",
                             color="#d62728", fontsize=9, fontweight="bold", va="top",
                             bbox={"boxstyle": "round,pad=0.15", "facecolor": "white",
                                   "edgecolor": "none", "alpha": 0.85})
        ax_zoom.imshow(panel["zoom"].to(torch.int8).numpy(), cmap=zoom_cmap, vmin=0, vmax=1,
                       interpolation="nearest", extent=(k0, k1, q1, q0), aspect="auto")
        for edge in range((k0 // tile + 1) * tile, k1, tile):
            ax_zoom.axvline(edge, color="#d62728", linewidth=0.8, alpha=0.7)
        for edge in range((q0 // tile + 1) * tile, q1, tile):
            ax_zoom.axhline(edge, color="#d62728", linewidth=0.8, alpha=0.7)
        for side in ax_zoom.spines.values():
            side.set_edgecolor("#d62728")
            side.set_linestyle("--")
            side.set_linewidth(1.8)
        allowed = int(panel["zoom"].sum())
        what = "the whole matrix" if whole else f"q {q0:,}–{q1 - 1:,}, k {k0:,}–{k1 - 1:,}"
        ax_zoom.set_title(f"zoom: {what} (token level)\n"
                          f"{allowed:,} of {(q1 - q0) * (k1 - k0):,} positions allowed; "
                          f"red lines: tile edges", fontsize=10, loc="left")
        ax_zoom.set_xlabel("key position k", fontsize=9)
        ax_zoom.set_ylabel("query position q", fontsize=9)
    kv = f"×{ctx.kv_len:,}" if ctx.kv_len != ctx.q_len else ""
    fig.suptitle(
        f"{_short(str(pattern), 110)}\n"
        f"N={ctx.q_len:,}{kv}, {ctx.heads} head{'s' if ctx.heads > 1 else ''}: {counts.pairs:,} allowed pairs, "
        f"density {percent(counts.density)} · tiles: {counts.tiles.full:,} full, "
        f"{counts.tiles.partial:,} partial, {counts.tiles.empty:,} empty",
        fontsize=12, x=0.01, ha="left")
    legend = [Patch(facecolor=COLORS[FULL], edgecolor="#444444", label="full tile (computed, no mask)"),
              Patch(facecolor=COLORS[PARTIAL], edgecolor="#444444", label="partial tile (computed, masked inside or cut short)"),
              Patch(facecolor=COLORS[EMPTY], edgecolor="#444444", label="empty tile (skipped)"),
              Patch(facecolor=ALLOWED, edgecolor="#444444", label="zoom: allowed pair"),
              Patch(facecolor=MASKED, edgecolor="#444444", label="zoom: masked pair")]
    fig.legend(handles=legend, loc="outside lower center", ncol=5, fontsize=9, frameon=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    with plt.rc_context({"svg.fonttype": "none"}):  # SVG text stays text (searchable)
        fig.savefig(path, dpi=140)
    plt.close(fig)
    return path


def _positions(ax) -> None:
    """Tick labels as 1,000,000 rather than an 1e6 offset."""
    from matplotlib.ticker import FuncFormatter

    def label(value, _):
        return f"{int(round(value)):,}"

    ax.xaxis.set_major_formatter(FuncFormatter(label))
    ax.yaxis.set_major_formatter(FuncFormatter(label))


def _corner_inset(ax, states: torch.Tensor, tile: int, cmap, side: int = 48) -> None:
    """When the grid is shrunk, the first ``side x side`` tiles at full resolution, in the
    lower left of the panel."""
    corner = states[:side, :side].clone()
    picture = corner.clone()
    picture[corner == EMPTY], picture[corner == PARTIAL], picture[corner == FULL] = 0, 1, 2
    inset = ax.inset_axes((0.05, 0.05, 0.42, 0.42))
    rows, cols = corner.shape
    inset.imshow(picture.numpy(), cmap=cmap, vmin=0, vmax=2, interpolation="nearest",
                 extent=(0, cols * tile, rows * tile, 0), aspect="auto")
    inset.set_title(f"detail: first {rows}×{cols} tiles\n(q, k < {max(rows, cols) * tile:,})",
                    fontsize=8, pad=3)
    inset.set_xticks([])
    inset.set_yticks([])
    for spine in inset.spines.values():
        spine.set_edgecolor("#333333")
        spine.set_linewidth(1.2)


def _grid_lines(ax, shape, cell: int) -> None:
    """Thin lines between cells when there are few enough to see."""
    rows, cols = shape
    if max(rows, cols) > 64:
        return
    for c in range(1, cols):
        ax.axvline(c * cell, color="white", linewidth=0.6)
    for r in range(1, rows):
        ax.axhline(r * cell, color="white", linewidth=0.6)
