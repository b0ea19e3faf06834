"""``sparsedsl.show``: a pattern's tile map as Unicode text, with a legend and its counts."""

from __future__ import annotations

import sys

import torch

from ..analysis.count import count, tile_grid_states
from ..lang import nodes as n
from ..lang.checks import check_int
from ..passes.tiles import EMPTY, FULL, PARTIAL

GLYPHS = {FULL: "█", PARTIAL: "▒", EMPTY: "·"}
LEGEND = "█ full tile   ▒ partial tile (masked inside)   · empty tile (skipped)"


def _downsample(states: torch.Tensor, width: int) -> torch.Tensor:
    """``[nq, nk]`` states shrunk so neither side exceeds ``width`` cells: a cell is full
    (empty) only if every tile it covers is, else partial."""
    nq, nk = states.shape
    factor = max(1, -(-max(nq, nk) // width))
    if factor == 1:
        return states
    pad_q, pad_k = -nq % factor, -nk % factor
    padded_full = torch.nn.functional.pad((states == FULL).float(), (0, pad_k, 0, pad_q), value=1.0)
    padded_empty = torch.nn.functional.pad((states == EMPTY).float(), (0, pad_k, 0, pad_q), value=1.0)
    pool = torch.nn.functional.max_pool2d
    not_full = pool(1 - padded_full[None], factor)[0] > 0
    not_empty = pool(1 - padded_empty[None], factor)[0] > 0
    cells = torch.full(not_full.shape, PARTIAL, dtype=torch.int8)
    cells[~not_full] = FULL
    cells[~not_empty] = EMPTY
    return cells


def tile_map(states: torch.Tensor, width: int = 64) -> str:
    """Rows of glyphs for one ``[nq, nk]`` state grid (query tiles down, key tiles across)."""
    cells = _downsample(states.cpu(), width)
    return "\n".join("".join(GLYPHS[int(s)] for s in row) for row in cells)


def show(pattern: n.Pattern, q_len: int, kv_len: int | None = None, *, heads: int | None = None,
         tile: int = 128, width: int = 64, file=None, **buffers: torch.Tensor) -> str:
    """Print (to ``file``, default stdout) and return the tile map of ``pattern``: one panel
    per distinct head pattern, a legend, and the exact counts. Maps wider than ``width``
    cells are shrunk (a cell then covers several tiles and is full or empty only if they
    all are)."""
    width = check_int("show()", "width", width, minimum=1)
    ctx, grid, _, states = tile_grid_states(pattern, q_len, kv_len, heads, tile, buffers, "show()")
    states = states[0].expand(ctx.heads, -1, -1)
    panels: list[tuple[list[int], torch.Tensor]] = []
    for h in range(ctx.heads):
        for heads_of_panel, panel in panels:
            if torch.equal(panel, states[h]):
                heads_of_panel.append(h)
                break
        else:
            panels.append(([h], states[h]))
    factor = max(1, -(-max(grid.num_q_tiles, grid.num_kv_tiles) // width))
    scale = f"{tile}x{tile} tiles" + (f", each cell {factor}x{factor} tiles" if factor > 1 else "")
    parts = [f"{pattern}", f"q_len={ctx.q_len} kv_len={ctx.kv_len}, {scale}"]
    for heads_of_panel, panel in panels:
        if ctx.heads > 1:
            parts.append(f"heads {_ranges(heads_of_panel)}:")
        parts.append(tile_map(panel, width))
    parts.append(LEGEND)
    parts.append(str(count(pattern, q_len, kv_len, heads=ctx.heads, tile=tile, **buffers)))
    text = "\n".join(parts)
    print(text, file=file or sys.stdout)
    return text


def _ranges(values: list[int]) -> str:
    """``[0, 1, 2, 5]`` as ``"0-2, 5"``."""
    spans, start = [], values[0]
    for prev, cur in zip(values, values[1:] + [None]):
        if cur != prev + 1 if cur is not None else True:
            spans.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = cur
    return ", ".join(spans)
