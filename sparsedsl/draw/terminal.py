"""``sparsedsl.show``: a pattern's tile map as Unicode text, with a legend and its counts."""

from __future__ import annotations

import sys

import torch

from ..analysis.count import count
from ..analysis.headstates import head_tile_states
from ..lang import nodes as n
from ..lang.checks import check_int
from ..lang.queries import head_group_count
from ..passes.context import Context
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
         tile: int = 128, width: int = 64, counts: bool = True, file=None,
         **buffers: torch.Tensor) -> str:
    """Print (to ``file``, default stdout) and return the tile map of ``pattern``: one panel
    per distinct head pattern, a legend, and (``counts``) the exact counts. Maps wider than
    ``width`` cells are shrunk (a cell then covers several tiles and is full or empty only
    if they all are)."""
    width = check_int("show()", "width", width, minimum=1)
    tile = check_int("show()", "tile", tile, minimum=1)
    heads = head_group_count(pattern) if heads is None else heads
    ctx = Context.make(pattern, q_len, kv_len, heads, buffers=buffers, where="show()")
    panels: list[tuple[list[int], torch.Tensor]] = []
    for members, _, states in head_tile_states(pattern, ctx, tile, buffers, "show()"):
        for heads_of_panel, panel in panels:
            if torch.equal(panel, states):
                heads_of_panel.extend(members)
                break
        else:
            panels.append((list(members), states))
    panels = [(sorted(members), states) for members, states in panels]
    num_q_tiles, num_kv_tiles = -(-ctx.q_len // tile), -(-ctx.kv_len // tile)
    factor = max(1, -(-max(num_q_tiles, num_kv_tiles) // width))
    scale = f"{tile}x{tile} tiles" + (f", each cell {factor}x{factor} tiles" if factor > 1 else "")
    parts = [f"{pattern}", f"q_len={ctx.q_len} kv_len={ctx.kv_len}, {scale}"]
    for heads_of_panel, panel in panels:
        if ctx.heads > 1:
            parts.append(f"heads {_ranges(heads_of_panel)}:")
        parts.append(tile_map(panel, width))
    parts.append(LEGEND)
    if counts:
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
