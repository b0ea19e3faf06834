"""Tile states per distinct head pattern, for the drawing functions."""

from __future__ import annotations

import torch

from ..lang import nodes as n
from ..lang.queries import mask_part
from ..passes.context import Context
from .count import tile_grid_states
from .headsplit import distinct_head_patterns
from .tilecount import state_grid, supported


def head_tile_states(pattern: n.Pattern, ctx: Context, tile: int, buffers: dict,
                     where: str) -> list[tuple[list[int], str, torch.Tensor]]:
    """``(heads, text, states)`` per group of heads that run the same pattern: the heads,
    the text of the pattern they run, and its ``[nq, nk]`` int8 tile states. Head-free
    patterns without tensors take the fast periodic path of :mod:`.tilecount`; others are
    classified per head."""
    groups = distinct_head_patterns(mask_part(pattern), ctx.heads)
    if not buffers and all(supported(p) for p, _ in groups):
        return [(list(members), str(p), state_grid(p, ctx.q_len, ctx.kv_len, tile)) for p, members in groups]
    _, _, _, states = tile_grid_states(pattern, ctx.q_len, ctx.kv_len, ctx.heads, tile, buffers, where)
    states = states[0].expand(ctx.heads, -1, -1)
    texts = {h: str(p) for p, members in groups for h in members}
    return [([h], texts[h], states[h]) for h in range(ctx.heads)]
