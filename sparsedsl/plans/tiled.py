"""What the tile plans (flex, gather, band, decode, tile_sdpa) share: the lowering of a call
on their tiles, its score function, the pairs whole tiles compute, and the tile that fits a
pattern of whole blocks."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..compiler.arguments import BLOCK_SIZES
from ..lang import nodes as n
from ..lang.queries import mask_part, walk
from ..passes.lowering import Lowering, context, lowering
from ..passes.maskmod import ScoreFn, lower_score, score_rows_from
from .base import Call


@dataclass(frozen=True)
class Tiled:
    """A tile plan's preparation: the pattern (score modifications included) and the
    lowering of its mask for the call, on the plan's tiles."""

    pattern: n.Pattern
    lowering: Lowering

    def pairs(self, heads: int) -> int:
        """Pairs a kernel computes that computes every non-empty tile whole."""
        grid = self.lowering.grid
        return live_tile_pairs(self.lowering.states, grid.q_block, grid.kv_block, heads)


def tiled(pattern: n.Pattern, call: Call, tiles: tuple[int, int]) -> Tiled:
    """:class:`Tiled` for ``call`` on ``tiles``."""
    return Tiled(pattern, call_lowering(pattern, call, tiles))


def call_lowering(pattern: n.Pattern, call: Call, tiles: tuple[int, int], where: str = "forward()") -> Lowering:
    """The cached lowering of ``call``'s rows and keys on ``tiles``."""
    return lowering(pattern, call.q_len, call.kv_len, call.q_offset, tiles, heads=call.heads,
                    device=call.work_device, buffers=dict(call.buffers), where=where)


def call_score_mod(pattern: n.Pattern, call: Call, first_row=None) -> ScoreFn | None:
    """``pattern``'s ``score_mod`` on the call's row indices (query ``i`` is position
    ``first_row + i``, ``call.q_offset`` by default), or None without score mods."""
    ctx = context(pattern, call.q_len, call.kv_len, call.q_offset, call.heads, call.device,
                  dict(call.buffers), "forward()")
    first_row = call.q_offset if first_row is None else first_row
    return score_rows_from(lower_score(pattern, ctx), first_row, call.device)


def live_tile_pairs(states: torch.Tensor, q_block: int, kv_block: int, heads: int) -> int:
    """Pairs computed by a kernel that computes every non-empty tile of ``states`` whole,
    over ``heads`` heads (states of one head stand for every head)."""
    per_grid = heads // states.shape[1]
    # EMPTY is 0: the live tiles are the nonzero states (counted without a comparison pass)
    return int(torch.count_nonzero(states)) * q_block * kv_block * per_grid


def check_batch(call: Call, states: torch.Tensor) -> None:
    """Bound tensors with a batch axis must match the inputs' batch."""
    if states.shape[0] not in (1, call.batch):
        raise ValueError(
            f"the pattern's bound tensors have batch size {states.shape[0]} but the inputs have "
            f"batch={call.batch}"
        )


def block_tile(pattern: n.Pattern) -> int | None:
    """The largest tile size of ``BLOCK_SIZES`` dividing the block size of every
    ``blocks(size)`` of a pattern made of whole-block patterns (``blocks`` combined by
    ``| & - ~`` and head groups, with ranges of whole rows or columns whose bounds such
    tiles also divide: ``queries``, ``keys``, ``global_tokens``, ``prefix``), or None for
    any other pattern. A bound counted from the end falls on a tile boundary when the
    length is a multiple of the tile, as the last block of a ``blocks(size)`` does."""
    mask = mask_part(pattern)
    sizes = _tile_bounds(mask)
    if not sizes or not any(isinstance(node, n.Blocks) for node in walk(mask)):
        return None
    size = math.gcd(*sizes)
    fitting = [tile for tile in BLOCK_SIZES if size % tile == 0]
    return max(fitting) if fitting else None


def _tile_bounds(node: n.Pattern) -> set[int] | None:
    """The block sizes and range bounds (in tokens, from either end) a whole-block pattern
    is made of, or None for a pattern with any other part."""
    if isinstance(node, n.Blocks):
        return {node.size}
    if isinstance(node, (n.Queries, n.Keys)):
        return {abs(bound) for bound in (node.start, node.stop) if bound}
    if isinstance(node, (n.GlobalTokens, n.Prefix)):
        return {node.n}
    if not isinstance(node, (n.Union, n.Intersection, n.Difference, n.Complement, n.Heads)):
        return None
    sizes = [_tile_bounds(child) for child in node.children()]
    return None if None in sizes else set().union(*sizes)

