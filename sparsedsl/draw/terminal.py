"""``sparsedsl.show``: a pattern's tile map as Unicode text, with a legend and its counts."""

from __future__ import annotations

import sys

import torch

from ..analysis.count import count
from ..analysis.headstates import head_tile_states
from ..lang import nodes as n
from ..lang.checks import check_int
from ..lang.multiset import is_multiset, multiset_terms
from ..lang.queries import head_group_count, mask_part
from ..passes.context import Context
from ..passes.tiles import EMPTY, FULL, PARTIAL

GLYPHS = {FULL: "█", PARTIAL: "▒", EMPTY: "·"}
LEGEND = "█ full tile   ▒ partial tile (masked inside)   · empty tile (skipped)"
MULTISET_LEGEND = ("2-9 tile reached by that many terms of the multiset (its pairs count up to that many "
                   "times; + for more than 9)")


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


def tile_map(states: torch.Tensor, width: int = 64, reach: torch.Tensor | None = None) -> str:
    """Rows of glyphs for one ``[nq, nk]`` state grid (query tiles down, key tiles across).
    ``reach`` (a multiset's ``[nq, nk]`` count of terms that reach each tile) replaces the
    glyph of a cell reached by two or more terms with that count (the most over the tiles
    the cell covers)."""
    cells = _downsample(states.cpu(), width)
    glyphs = [[GLYPHS[int(s)] for s in row] for row in cells]
    if reach is not None:
        factor = max(1, -(-max(reach.shape) // width))
        most = torch.nn.functional.max_pool2d(reach.cpu().float()[None], factor, ceil_mode=True)[0]
        for i, j in (most >= 2).nonzero().tolist():
            glyphs[i][j] = str(int(most[i, j])) if most[i, j] <= 9 else "+"
    return "\n".join("".join(row) for row in glyphs)


def _term_reach(pattern: n.Pattern, ctx: Context, tile: int, buffers: dict) -> torch.Tensor:
    """``[H, nq, nk]``: how many terms of a multiset reach (do not leave empty) each tile."""
    reach = None
    for term in multiset_terms(mask_part(pattern)):
        bound = {name: t for name, t in buffers.items() if name in term.buffer_names()}
        per_head = [None] * ctx.heads
        for members, _, states in head_tile_states(term, ctx, tile, bound, "show()"):
            for h in members:
                per_head[h] = (states != EMPTY).to(torch.int32)
        live = torch.stack(per_head)
        reach = live if reach is None else reach + live
    return reach


def show(pattern: n.Pattern, q_len: int, kv_len: int | None = None, *, heads: int | None = None,
         tile: int = 128, width: int = 64, counts: bool = True, file=None,
         **buffers: torch.Tensor) -> str:
    """Print (to ``file``, default stdout) and return the tile map of ``pattern``: one panel
    per distinct head pattern, a legend, and (``counts``) the exact counts. Maps wider than
    ``width`` cells are shrunk (a cell then covers several tiles and is full or empty only
    if they all are). For a multiset pattern (``a + b``, ``longnet``), a cell that two or
    more of its terms reach shows how many (its pairs count up to that many times), and the
    counts include the pairs counted with multiplicity."""
    width = check_int("show()", "width", width, minimum=1)
    tile = check_int("show()", "tile", tile, minimum=1)
    heads = head_group_count(pattern) if heads is None else heads
    ctx = Context.make(pattern, q_len, kv_len, heads, buffers=buffers, where="show()")
    reach = _term_reach(pattern, ctx, tile, buffers) if is_multiset(pattern) else None
    panels: list[tuple[list[int], torch.Tensor, torch.Tensor | None]] = []
    for members, _, states in head_tile_states(pattern, ctx, tile, buffers, "show()"):
        head_reach = None if reach is None else reach[members[0]]
        for heads_of_panel, panel, panel_reach in panels:
            if torch.equal(panel, states) and (reach is None or torch.equal(panel_reach, head_reach)):
                heads_of_panel.extend(members)
                break
        else:
            panels.append((list(members), states, head_reach))
    panels = [(sorted(members), states, panel_reach) for members, states, panel_reach in panels]
    num_q_tiles, num_kv_tiles = -(-ctx.q_len // tile), -(-ctx.kv_len // tile)
    factor = max(1, -(-max(num_q_tiles, num_kv_tiles) // width))
    scale = f"{tile}x{tile} tiles" + (f", each cell {factor}x{factor} tiles" if factor > 1 else "")
    parts = [f"{pattern}", f"q_len={ctx.q_len} kv_len={ctx.kv_len}, {scale}"]
    for heads_of_panel, panel, panel_reach in panels:
        if ctx.heads > 1:
            parts.append(f"heads {_ranges(heads_of_panel)}:")
        parts.append(tile_map(panel, width, panel_reach))
    parts.append(LEGEND)
    if reach is not None:
        parts.append(MULTISET_LEGEND)
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
