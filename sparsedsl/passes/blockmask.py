"""FlexAttention ``BlockMask``\\ s built from a pattern's structure.

Tiles are classified by :mod:`sparsedsl.passes.tiles` (interval arithmetic per node, three
valued logic through the combinators), a chunk of tile rows at a time; only the tiles left
``UNKNOWN`` are refined by evaluating the ``mask_mod`` on them. The result has the same full
and partial block sets as ``create_block_mask(mask_mod, ...)`` (whose padding makes a tile
cut short by a sequence end partial at most), without ever holding ``O(Q * K)`` values.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.nn.attention.flex_attention import BlockMask

from ..lang.nodes import Pattern
from .context import Context
from .refine import states_from_counts, tile_pair_counts
from .tiles import FULL, PARTIAL, UNKNOWN, TileGrid, classify

#: Tile states classified at once (bounds the int64 temporaries of the classifiers).
CLASSIFY_BUDGET = 1 << 24


def tile_states(pattern: Pattern, ctx: Context, grid: TileGrid, mask_mod: Callable) -> torch.Tensor:
    """Exact states (``EMPTY`` / ``PARTIAL`` / ``FULL``) of every tile, int8
    ``[B or 1, H or 1, num_q_tiles, num_kv_tiles]``, as ``create_block_mask`` would see them.
    ``mask_mod`` takes absolute positions (it refines the tiles the structure leaves
    undecided)."""
    rows_per_chunk = max(1, CLASSIFY_BUDGET // (grid.num_kv_tiles * ctx.heads))
    chunks = []
    for start in range(0, grid.num_q_tiles, rows_per_chunk):
        rows = range(start, min(start + rows_per_chunk, grid.num_q_tiles))
        state = classify(pattern, ctx, grid, rows).clone()
        ragged = grid.ragged(grid.span(rows, ctx.device))
        state[(state == FULL) & ragged] = PARTIAL
        unknown = (state == UNKNOWN).nonzero()
        if unknown.numel():
            tiles = unknown.clone()
            tiles[:, 2] += start
            state[tuple(unknown.T)] = states_from_counts(tile_pair_counts(mask_mod, grid, tiles), grid)
        chunks.append(state)
    return torch.cat(chunks, dim=2)


def ordered_indices(selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(num_blocks, indices)`` in FlexAttention's layout from a bool ``[B, H, R, C]``:
    ``num_blocks[b, h, r]`` selected columns of row ``r``, listed in ascending order at the
    start of ``indices[b, h, r]`` (int32; entries past ``num_blocks`` are 0)."""
    num_blocks = selected.sum(-1, dtype=torch.int32)
    indices = torch.zeros(selected.shape, dtype=torch.int32, device=selected.device)
    b, h, r, c = selected.nonzero(as_tuple=True)  # row-major, so each row's columns ascend
    if c.numel():
        row_starts = num_blocks.flatten().cumsum(0, dtype=torch.int64) - num_blocks.flatten()
        row = (b * selected.shape[1] + h) * selected.shape[2] + r
        rank = torch.arange(c.numel(), device=c.device) - row_starts[row]
        indices[b, h, r, rank] = c.to(torch.int32)
    return num_blocks, indices


def block_mask_from_states(states: torch.Tensor, grid: TileGrid, mask_mod: Callable) -> BlockMask:
    """A ``BlockMask`` with the partial and full tiles of ``states`` over the ``grid.rows``
    query rows of ``grid``; ``mask_mod`` takes row indices ``0 <= q < grid.rows`` (FlexAttention's
    query indices), so for ``grid.q_start > 0`` it is the pattern shifted by ``q_start``."""
    partial, full = states == PARTIAL, states == FULL
    kv_num, kv_idx = ordered_indices(partial)
    full_kv_num, full_kv_idx = ordered_indices(full)
    q_num, q_idx = ordered_indices(partial.transpose(-1, -2))
    full_q_num, full_q_idx = ordered_indices(full.transpose(-1, -2))
    return BlockMask(
        seq_lengths=(grid.rows, grid.kv_len),
        kv_num_blocks=kv_num,
        kv_indices=kv_idx,
        full_kv_num_blocks=full_kv_num,
        full_kv_indices=full_kv_idx,
        q_num_blocks=q_num,
        q_indices=q_idx,
        full_q_num_blocks=full_q_num,
        full_q_indices=full_q_idx,
        BLOCK_SIZE=(grid.q_block, grid.kv_block),
        mask_mod=mask_mod,
    )
