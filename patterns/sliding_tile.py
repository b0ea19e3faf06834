"""Sliding tile attention (STA) for video and images: a window of whole tiles around each
query's tile, clamped at the canvas edges, on tokens ordered tile by tile.

Source: Zhang et al. 2025, "Fast Video Generation with Sliding Tile Attention",
arXiv:2502.04507. Tokens are in tile-major order: the ``tile`` cube of each tile is
contiguous, tiles in row-major order over the canvas; text tokens follow the
``prod(canvas)`` vision tokens. A vision query attends to the vision keys whose tile lies
in the ``kernel / tile`` tiles around its own on every axis (the window's centre clamped
so that it stays inside the canvas; an even tile count reaches one tile further back
than forward), and to the text keys; a text query attends to every key up to the end of
the text.

Every axis is one clamped window of blocks (the tile-rows of a frame, the tiles of a
tile-row, ...), nested with ``blocks(size).within(...)`` from the slowest axis in.
"""

from __future__ import annotations

from sparsedsl.lang import nodes as n
from sparsedsl.lang.checks import PatternArgumentError, check_int

from .neighbourhood import clamped_window


def _axes(where: str, canvas, kernel, tile) -> list[tuple[int, int, int]]:
    """``[(canvas, kernel, tile), ...]`` per axis, checked as STA requires."""
    axes = list(zip(canvas, kernel, tile))
    if not (len(canvas) == len(kernel) == len(tile)) or not axes:
        raise PatternArgumentError(f"{where}: canvas, kernel and tile must have one size per axis, "
                                   f"got {canvas!r}, {kernel!r}, {tile!r}")
    for i, (c, k, t) in enumerate(axes):
        for name, value in (("canvas", c), ("kernel", k), ("tile", t)):
            check_int(where, f"{name}[{i}]", value, minimum=1)
        if c % t or k % t or k > c:
            raise PatternArgumentError(
                f"{where}: on axis {i} the canvas ({c}) and the kernel ({k}) must be multiples of the "
                f"tile ({t}), and the kernel at most the canvas")
    return axes


def sliding_tile(canvas=(24, 24), kernel=(12, 12), tile=(4, 4), text_length: int = 0) -> n.Pattern:
    """Sliding tile attention on a ``canvas`` (2-D ``(height, width)`` or 3-D ``(time,
    height, width)``) with a ``kernel`` window of whole ``tile``s, then ``text_length``
    text tokens; see the module docstring.

    Source: Zhang et al. 2025, "Fast Video Generation with Sliding Tile Attention",
    arXiv:2502.04507.
    """
    where = "sliding_tile()"
    axes = _axes(where, tuple(canvas), tuple(kernel), tuple(tile))
    text = check_int(where, "text_length", text_length)
    tile_tokens = 1
    for _, _, t in axes:
        tile_tokens *= t
    counts = [c // t for c, _, t in axes]
    # block size of each axis: the tokens of one step along it (the faster axes inside)
    sizes = [tile_tokens] * len(axes)
    for i in range(len(axes) - 2, -1, -1):
        sizes[i] = sizes[i + 1] * counts[i + 1]
    vision = None
    for i in reversed(range(len(axes))):
        tiles = axes[i][1] // axes[i][2]
        window = clamped_window(sizes[i], tiles // 2, tiles // 2 + tiles % 2 - 1, counts[i])
        vision = window if vision is None else window & n.blocks(sizes[i]).within(vision)
    length = sizes[0] * counts[0]
    vision = vision & n.queries(0, length) & n.keys(0, length)
    parts = [vision, n.queries(length) & n.keys(0, length + text)]
    if text:
        parts.append(n.queries(0, length) & n.keys(length, length + text))
    return parts[0] | parts[1] if len(parts) == 2 else parts[0] | parts[1] | parts[2]
