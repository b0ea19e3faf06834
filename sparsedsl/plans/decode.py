"""Decoding: a few query rows at a position that moves by one each step, against a long cache.

Rebuilding the block mask per generated token would classify a tile row per token and
rebuild FlexAttention's index tensors. Instead, for patterns whose ``allowed(q, k)`` does
not depend on the sequence lengths (no bound tensors, no random blocks), the tile states
are computed once per *aligned* tile row — rows ``[r * T, (r + 1) * T)`` for the query
tile ``T`` — over the key capacity (the cache length rounded up to its length bucket), and
cached. A step whose rows ``[q_offset, q_offset + Q)`` (``Q <= T``) lie in aligned rows
``r0 .. r1`` uses their merged states (a tile is full or empty only where it is in both;
otherwise partial, and the ``mask_mod`` decides): a sound superset of the exact states,
with at most one extra tile per side. Key tiles past the cache length are empty and the
last, cut-short one partial. The resulting ``BlockMask`` is cached by ``(r0, r1, live key
tiles)``, so a token step builds nothing new except every ``T`` tokens; only the
``mask_mod``'s row offset (a 0-d tensor) changes.

The flex plan then runs FlexAttention's decoding kernel (for fewer than 128 query rows it
splits the keys across thread blocks) on the unpadded queries.
"""

from __future__ import annotations

import threading
from typing import Callable

import torch
from torch.nn.attention.flex_attention import BlockMask

from ..compiler.cache import BuildCache
from ..lang import nodes as n
from ..lang.checks import INDEX_LIMIT
from ..lang.queries import counts_from_the_end, depends_on_heads, mask_part, walk
from ..passes.blockmask import ordered_indices, tile_states
from ..passes.lowering import context
from ..passes.maskmod import lower_mask, lower_score, rows_from, score_rows_from
from ..passes.tiles import EMPTY, FULL, PARTIAL, TileGrid
from .base import Call, Plan, Runner
from .flex import bucket_length, flex_plan_attention, flex_reasons, flex_tiles
from .gather import gather_attention
from .tiled import live_tile_pairs

#: Query rows a step may have for the decoding plan (FlexAttention's decoding kernel
#: handles fewer than 128).
MAX_DECODE_ROWS = 64


#: The largest tile an aligned decoding row may be cut to (``BLOCK_SIZES``' largest).
LARGEST_TILE = 1024
#: Cached aligned tile rows, per (pattern, heads, tiles, device, key capacity).
_DECODE_ROWS = BuildCache(maxsize=64)


def clear_caches() -> None:
    """Drop the cached aligned tile rows."""
    _DECODE_ROWS.clear()


def decodes_by_rows(pattern: n.Pattern) -> bool:
    """Whether ``allowed(q, k)`` of ``pattern`` is the same for every sequence length (so
    states computed over a larger key capacity stay exact for shorter caches)."""
    length_bound = (n.Documents, n.BlockRandom, n.BlockLayout)
    if counts_from_the_end(mask_part(pattern)):  # a range counted from the end moves with the length
        return False
    return not pattern.buffer_names() and not any(
        isinstance(node, length_bound) or (isinstance(node, n.Blocks) and any(
            isinstance(rule, length_bound) for rule in node.rules))
        for node in walk(mask_part(pattern)))


class DecodeRows:
    """Tile states and block masks of ``q_len <= q_block`` query rows at any position,
    from cached aligned tile rows (see the module docstring).

    ``row_states(r)`` computes the int8 states ``[B or 1, H or 1, 1, num_kv_tiles]`` of
    aligned tile row ``r`` over ``kv_capacity`` keys (cached here); ``position_mask`` is
    the pattern's ``mask_mod`` on absolute positions; ``device`` the states' device."""

    def __init__(self, row_states: Callable[[int], torch.Tensor], q_block: int, kv_block: int,
                 kv_capacity: int, position_mask: Callable, device: torch.device):
        self.row_states = row_states
        self.q_block, self.kv_block, self.kv_capacity = q_block, kv_block, kv_capacity
        self.position_mask = position_mask
        self.device = torch.device(device)
        self._rows: dict[int, torch.Tensor] = {}
        self._block_masks: dict[tuple, BlockMask] = {}
        self._positions: torch.Tensor | None = None
        self._lock = threading.Lock()

    def position(self, value: int) -> torch.Tensor:
        """``value`` as a 0-d int64 tensor on the states' device: for ``0 <= value <=
        kv_capacity`` a view into one cached ``arange``, so a step copies nothing to the
        device."""
        if self._positions is None:
            self._positions = torch.arange(self.kv_capacity + 1, device=self.device)
        if value <= self.kv_capacity:
            return self._positions[value]
        return torch.tensor(value, device=self.device)

    def aligned_states(self, row: int) -> torch.Tensor:
        """The cached states of aligned tile row ``row``."""
        with self._lock:
            if row not in self._rows:
                self._rows[row] = self.row_states(row)
            return self._rows[row]

    def states(self, q_offset: int, q_len: int, kv_len: int) -> torch.Tensor:
        """States ``[B or 1, H or 1, 1, num_kv_tiles of kv_capacity]`` covering rows
        ``[q_offset, q_offset + q_len)`` over the first ``kv_len`` keys."""
        first, last = q_offset // self.q_block, (q_offset + q_len - 1) // self.q_block
        states = self.aligned_states(first)
        if last != first:
            other = self.aligned_states(last)
            states = torch.where(states == other, states, PARTIAL).to(torch.int8)
        live = -(-kv_len // self.kv_block)
        states = states.clone()
        states[..., live:] = EMPTY
        if kv_len % self.kv_block:
            last_tile = states[..., live - 1]
            states[..., live - 1] = torch.where(last_tile == FULL, PARTIAL, last_tile).to(torch.int8)
        return states

    def grid(self, q_offset: int, q_len: int) -> TileGrid:
        """The one-tile-row grid of these rows (rows tiled from ``q_offset``)."""
        return TileGrid(q_offset + q_len, self.kv_capacity, self.q_block, self.kv_block, q_offset)

    def block_mask(self, q_offset: int, q_len: int, kv_len: int) -> BlockMask:
        """The forward-only ``BlockMask`` of these rows over ``kv_capacity`` keys (padded
        keys past ``kv_len`` refused), with the ``mask_mod`` on row indices."""
        first, last = q_offset // self.q_block, (q_offset + q_len - 1) // self.q_block
        live = -(-kv_len // self.kv_block)
        key = (first, last, q_len, live, kv_len % self.kv_block == 0)
        cached = self._block_masks.get(key)
        if cached is None:
            states = self.states(q_offset, q_len, kv_len)
            kv_num, kv_idx = ordered_indices(states == PARTIAL)
            full_num, full_idx = ordered_indices(states == FULL)
            with self._lock:
                cached = self._block_masks.setdefault(key, _forward_block_mask(
                    (q_len, self.kv_capacity), kv_num, kv_idx, full_num, full_idx,
                    (self.q_block, self.kv_block), self.position_mask))
        offset, kv_limit = self.position(q_offset), self.position(kv_len)
        position_mask = self.position_mask

        def mask_mod(b, h, q, k):
            return position_mask(b, h, q + offset, k) & (k < kv_limit)

        return _forward_block_mask((q_len, self.kv_capacity), cached.kv_num_blocks, cached.kv_indices,
                                   cached.full_kv_num_blocks, cached.full_kv_indices,
                                   (self.q_block, self.kv_block), mask_mod)


def _forward_block_mask(seq_lengths, kv_num, kv_idx, full_num, full_idx, block_size, mask_mod) -> BlockMask:
    """A ``BlockMask`` without the transposed (query-side) indices, which only the
    backward pass reads."""
    return BlockMask(seq_lengths=seq_lengths, kv_num_blocks=kv_num, kv_indices=kv_idx,
                     full_kv_num_blocks=full_num, full_kv_indices=full_idx, q_num_blocks=None,
                     q_indices=None, full_q_num_blocks=None, full_q_indices=None,
                     BLOCK_SIZE=block_size, mask_mod=mask_mod)


def is_decoding_step(decodes: bool, q_len: int, kv_len: int, q_offset: int, q_block: int, needs_grad: bool) -> bool:
    """Whether a call runs as a decoding step: no gradients, a few query rows
    (``q_len <= min(MAX_DECODE_ROWS, q_block)``) past position 0 and none past the last key
    (the cached rows cover the keys' positions), of a pattern whose states do not depend on
    the lengths (``decodes``: :func:`decodes_by_rows`), whose aligned tile rows (at most the
    largest tile past the last query) stay inside 32-bit indices."""
    return decodes and not needs_grad and q_offset > 0 and q_len <= min(MAX_DECODE_ROWS, q_block) \
        and q_offset + q_len <= kv_len and q_offset + q_len + LARGEST_TILE <= INDEX_LIMIT


class DecodePlan(Plan):
    """Decoding steps from cached aligned tile rows (see the module docstring), run by
    FlexAttention's decoding kernel on CUDA and by the gather plan elsewhere."""

    name = "decode"

    def not_supported(self, pattern: n.Pattern, call: Call) -> list[str]:
        if not call.decoding:
            return ["not a decoding step (a few rows past position 0, no gradients, a pattern whose "
                    "tile states do not depend on the lengths)"]
        return []

    def tiles(self, pattern: n.Pattern, call: Call) -> tuple[int, int]:
        if _flex_runs(call):
            return flex_tiles(call.q_block, call.kv_block, call.device)
        return call.q_block, call.kv_block

    def prepare(self, pattern: n.Pattern, call: Call) -> tuple[n.Pattern, DecodeRows]:
        q_block, kv_block = self.tiles(pattern, call)
        device = call.work_device
        capacity = bucket_length(call.kv_len, kv_block)
        core = mask_part(pattern)
        state_heads = call.heads if depends_on_heads(core) else 1

        def row_states(row: int) -> torch.Tensor:
            ctx = context(core, q_block, capacity, row * q_block, state_heads, device, {}, "forward()")
            grid = TileGrid(ctx.q_len, capacity, q_block, kv_block, row * q_block)
            return tile_states(core, ctx, grid, lower_mask(core, ctx))

        def build() -> DecodeRows:
            # Every query position up to the capacity: ranges of rows (queries(...)) are
            # bounded by the matrix's query count, so a smaller one would cut them.
            ctx = context(core, capacity, capacity, 0, state_heads, device, {}, "forward()")
            return DecodeRows(row_states, q_block, kv_block, capacity, lower_mask(core, ctx), device)

        key = (core, state_heads, q_block, kv_block, str(device), capacity)
        return pattern, _DECODE_ROWS.get(key, build)

    def efficiency(self, call: Call) -> float:
        """1: the device's tile kernel, on the tiles of cached rows (at most one tile more
        per side than the exact states)."""
        return 1.0

    def computed_pairs(self, prepared, call: Call, planner) -> int:
        rows = prepared[1]
        states = rows.states(call.q_offset, call.q_len, call.kv_len)
        return live_tile_pairs(states, rows.q_block, rows.kv_block, call.heads)

    def build(self, prepared, call: Call, planner) -> Runner:
        pattern, rows = prepared
        device, q_len, kv_len, scale, return_lse = call.device, call.q_len, call.kv_len, call.scale, call.return_lse
        # Over every query position up to the capacity, as the rows' mask (a multiset's
        # log m reads ranges of rows and random blocks at absolute positions).
        capacity = rows.kv_capacity
        score_mod = lower_score(pattern, context(pattern, capacity, capacity, 0, call.heads, device, {}, "forward()"))
        if _flex_runs(call):
            return lambda q, k, v, q_offset: flex_plan_attention(
                q, k, v, block_mask=rows.block_mask(q_offset, q_len, kv_len),
                score_mod=score_rows_from(score_mod, rows.position(q_offset), device), scale=scale,
                return_lse=return_lse)
        return lambda q, k, v, q_offset: gather_attention(
            q, k, v, states=rows.states(q_offset, q_len, kv_len), grid=rows.grid(q_offset, q_len),
            mask_mod=rows_from(rows.position_mask, rows.position(q_offset), device),
            score_mod=score_rows_from(score_mod, rows.position(q_offset), device), scale=scale)

    def describe(self, prepared, call: Call) -> str:
        kernel = "FlexAttention's decoding kernel" if _flex_runs(call) else "the gather kernel"
        return f"a decoding step: {kernel} on cached aligned tile rows (no block mask built per token)"


def _flex_runs(call: Call) -> bool:
    """Whether decoding steps run through FlexAttention (CUDA, where its kernels apply)."""
    return call.device.type == "cuda" and not flex_reasons(call)
