"""Refining tiles the structure leaves undecided, by evaluating the ``mask_mod`` on them.

Only the listed tiles are evaluated, a bounded number of positions at a time, so memory
stays ``O(budget)`` whatever the sequence lengths.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .tiles import PARTIAL, TileGrid, decide

#: Positions evaluated at once (one int64 index grid of this many elements per operand).
EVALUATION_BUDGET = 1 << 22
#: Query rows of an undecided tile evaluated before the whole tile (:func:`refined_states`).
PROBE_ROWS = 16


def tile_pair_counts(mask_mod: Callable, grid: TileGrid, tiles: torch.Tensor,
                     budget: int = EVALUATION_BUDGET, square: int = 1, rows: int | None = None) -> torch.Tensor:
    """Allowed pairs inside each tile of ``tiles`` (``[n, 4]`` int64 rows ``(b, h, i, j)``:
    batch, head, query-tile and key-tile index), counting only positions inside the
    sequences. ``mask_mod`` takes absolute positions (query tile ``i`` starts at
    ``grid.q_start + i * q_block``). Returns ``[n]`` int64.

    ``square`` is a side on which the pattern is constant over aligned squares
    (:func:`~sparsedsl.passes.squares.uniform_square`; 1 always is): the tiles are cut into
    squares of ``gcd(square, q_block, kv_block, q_start)`` positions, and ``mask_mod`` is
    evaluated once per square, weighted by the square's positions inside the sequences.
    At most about ``budget`` positions are evaluated at once (a tile larger than that a
    band of query rows at a time). With ``rows``, only each tile's first ``rows`` query
    positions are counted (:func:`probe_rows`)."""
    device = tiles.device
    side = math.gcd(square, grid.q_block, grid.kv_block, grid.q_start)
    counts = torch.zeros(tiles.shape[0], dtype=torch.int64, device=device)
    # Offsets inside a tile, up to the sequences' ends (a tile may be longer than them).
    q_off = torch.arange(0, min(probe_rows(grid, square, rows), grid.q_len - grid.q_start), side,
                         device=device)[None, :, None]
    k_off = torch.arange(0, min(grid.kv_block, grid.kv_len), side, device=device)[None, None, :]
    # Tiles larger than the budget are evaluated a band of query rows at a time.
    rows_at_once = max(1, min(q_off.shape[1], budget // k_off.shape[2]))
    step = max(1, budget // (rows_at_once * k_off.shape[2]))
    for start in range(0, tiles.shape[0], step):
        chunk = tiles[start:start + step]
        b = chunk[:, 0, None, None]
        h = chunk[:, 1, None, None]
        k = chunk[:, 3, None, None] * grid.kv_block + k_off
        for row in range(0, q_off.shape[1], rows_at_once):
            q = grid.q_start + chunk[:, 2, None, None] * grid.q_block + q_off[:, row:row + rows_at_once]
            # positions of each square inside the sequences: side, fewer at an end, or none
            weight = (grid.q_len - q).clamp(0, side) * (grid.kv_len - k).clamp(0, side)
            allowed = mask_mod(b, h, q.clamp(max=grid.q_len - 1), k.clamp(max=grid.kv_len - 1))
            counts[start:start + step] += (weight * allowed).sum((1, 2))
    return counts


def probe_rows(grid: TileGrid, square: int = 1, rows: int | None = None) -> int:
    """Query positions of a tile that :func:`tile_pair_counts` counts: the whole tile, or
    its first ``rows`` rounded up to whole squares of its evaluation."""
    if rows is None:
        return grid.q_block
    side = math.gcd(square, grid.q_block, grid.kv_block, grid.q_start)
    return min(grid.q_block, -(-rows // side) * side)


def refined_states(mask_mod: Callable, grid: TileGrid, tiles: torch.Tensor, square: int = 1) -> torch.Tensor:
    """Exact states (int8 ``[n]``) of ``tiles`` (as :func:`tile_pair_counts` takes them),
    the structure having left them undecided. Each tile's first :data:`PROBE_ROWS` query
    rows are evaluated first: a tile with both an allowed and a refused pair inside the
    sequences there is ``PARTIAL``; only the others are evaluated whole. (A union of
    partial tiles, LongNet's branches, is undecided where two parts are partial, but is
    rarely full: its first rows decide it at a fraction of the cost.)"""
    states = torch.empty(tiles.shape[0], dtype=torch.int8, device=tiles.device)
    probed = tile_pair_counts(mask_mod, grid, tiles, square=square, rows=PROBE_ROWS)
    rows = probe_rows(grid, square, PROBE_ROWS)
    q_first = grid.q_start + tiles[:, 2] * grid.q_block
    inside = (grid.q_len - q_first).clamp(0, rows) * (grid.kv_len - tiles[:, 3] * grid.kv_block).clamp(0, grid.kv_block)
    mixed = (probed > 0) & (probed < inside)
    states[mixed] = PARTIAL
    whole = (~mixed).nonzero()[:, 0]
    if whole.numel():
        states[whole] = states_from_counts(tile_pair_counts(mask_mod, grid, tiles[whole], square=square), grid)
    return states


def states_from_counts(counts: torch.Tensor, grid: TileGrid) -> torch.Tensor:
    """Tile states (int8) from allowed-pair counts: a tile is ``FULL`` only when all of its
    ``q_block * kv_block`` pairs are inside the sequences and allowed."""
    return decide(counts == grid.q_block * grid.kv_block, counts == 0).view(-1)
