"""The *band* plan: a window of whole blocks as dense attention on overlapping key windows.

``blocks(size).local(w)`` (see :func:`sparsedsl.lang.queries.block_band`) lets query block
``i`` see exactly the keys ``[(i - before) * size, (i + after + 1) * size)``. For every
*interior* block, whose key window lies inside the sequence, that is one dense attention
of ``size`` queries over ``(before + after + 1) * size`` keys. The windows of consecutive
blocks overlap, so they are taken as views (``Tensor.unfold`` along the sequence, one
window per block, nothing copied) and all interior blocks run in one call of PyTorch's
fused SDPA kernel, with the blocks folded into its batch or head dimension. No tile is
masked, so on a GPU the work runs at dense-kernel speed (cuDNN's attention on an H100)
instead of the block-sparse kernel's.

The *edge* rows (the first ``before`` and last ``after`` blocks, whose windows are cut by
the sequence ends, and a last block cut short by the length) run through the tile plan of
the device (FlexAttention or the gather plan) with the interior rows' tiles emptied; the
two outputs cover disjoint rows, so they are joined exactly.

Computed pairs equal allowed pairs. Gradients flow through the views (autograd sums the
overlapping windows' key gradients), but the backward materialises a key and value
gradient per window (``before + after + 1`` times the keys), so forward passes without
gradients are where the plan pays (:func:`band_pays`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..lang import nodes as n
from ..lang.queries import block_band
from ..passes.tiles import EMPTY
from .base import Call, Plan, Runner
from .flex import bucket_length, flex_plan_attention, flex_reasons, flex_tiles, padded_block_mask
from .gather import gather_attention
from .kernels import merges_batch_and_heads, sdpa_with_lse
from .tiled import Tiled, tiled

#: The band plan runs automatically only when its interior holds at least this share of
#: the query rows (the edge rows cost a tile-plan call of their own) ...
MIN_INTERIOR_SHARE = 0.5
#: ... and at least this many multiply-adds of ``QK^T`` per unit of head dim, summed over
#: batch and heads (``batch * heads * interior rows * window``). Measured on an H100 (bf16):
#: 6.4e9 (64K tokens, 16 heads, ``local(25)``) and 2.2e9 (32K, 32 heads, ``local(16)``) ran
#: 1.21x and 1.10x faster than flex; 4.4e8 and below (16K tokens, windows of 3-13 blocks)
#: ran 0.5-0.8x as fast, the fixed cost of the edge call and the output copy dominating.
MIN_INTERIOR_PAIRS = 1e9
#: Throughput per computed pair relative to FlexAttention, for CUDA forward passes in half
#: precision: where :func:`band_pays` (1.10-1.21x measured, above), and below it (0.5-0.8x).
EFFICIENCY_WHERE_IT_PAYS = 1.1
EFFICIENCY_BELOW = 0.65


@dataclass(frozen=True)
class Band:
    """Query block ``i`` (``size`` tokens) sees the keys of blocks ``i - before ..
    i + after``; for a sequence of ``length`` tokens and ``batch_heads`` (batch entries
    times query heads) sequences."""

    size: int
    before: int
    after: int
    length: int
    batch_heads: int

    @property
    def window(self) -> int:
        """Keys each query block sees: ``(before + after + 1) * size``."""
        return (self.before + self.after + 1) * self.size

    @property
    def interior(self) -> range:
        """Query blocks whose window lies inside the sequence (whole blocks only)."""
        return range(self.before, max(self.before, self.length // self.size - self.after))

    @property
    def rows(self) -> range:
        """Query rows of the interior blocks."""
        return range(self.interior.start * self.size, self.interior.stop * self.size)


def band_pays(band: Band) -> bool:
    """Whether the interior is large enough for the plan to beat the tile plan alone."""
    rows = len(band.rows)
    return rows >= MIN_INTERIOR_SHARE * band.length and band.batch_heads * rows * band.window >= MIN_INTERIOR_PAIRS


def edge_states(states: torch.Tensor, band: Band, q_block: int) -> torch.Tensor:
    """``states`` (tiles of ``q_block`` rows, ``band.size`` a multiple of ``q_block``) with
    the interior rows' tiles made empty: what the tile plan computes for the edge rows."""
    edges = states.clone()
    edges[..., band.rows.start // q_block:band.rows.stop // q_block, :] = EMPTY
    return edges


def band_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, band: Band, scale: float,
                   return_lse: bool, edges: Callable[..., tuple]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention by the band plan: ``(out, lse or None)`` for ``q [B, H, N, D]`` over ``k``,
    ``v [B, Hkv, N, D]``. ``edges(q, k, v) -> (out, lse or None)`` computes the edge rows
    through the tile plan (rows of the interior output zeros)."""
    rows = band.rows
    if not len(rows):
        return edges(q, k, v)
    batch, heads, _, _ = q.shape
    blocks = len(band.interior)
    # Folded for SDPA, without copies: [B * H, blocks, rows, D], (batch, head) pairs in its
    # batch dimension and the blocks in its head dimension, so its output is laid out as
    # the rows of the final output. With grouped-query attention the two swap places
    # ([blocks, B * H, rows, D]): SDPA's ``head // group`` mapping then holds on the
    # flattened (batch, head) index as on the head index.
    grouped = heads != k.shape[1]

    def fold(t5: torch.Tensor) -> torch.Tensor:  # [B, H, blocks, rows, D]
        return t5.movedim(2, 0).flatten(1, 2) if grouped else t5.flatten(0, 1)

    def unfold(folded: torch.Tensor) -> torch.Tensor:  # back to [B, H, blocks, rows, ...]
        return folded.unflatten(1, (batch, heads)).movedim(0, 2) if grouped else folded.unflatten(0, (batch, heads))

    def windows(t: torch.Tensor) -> torch.Tensor:
        """One overlapping key window per interior block, folded."""
        start = (band.interior.start - band.before) * band.size
        span = _heads_mergeable(t)[:, :, start:start + (blocks - 1) * band.size + band.window]
        return fold(span.unfold(2, band.window, band.size).transpose(-1, -2))

    blocked_q = fold(_heads_mergeable(q)[:, :, rows.start:rows.stop].unflatten(2, (blocks, band.size)))
    inner_out, inner_lse = sdpa_with_lse(blocked_q, windows(k), windows(v), scale, return_lse)
    inner_out = unfold(inner_out)  # [B, H, blocks, size, D]
    if return_lse:
        inner_lse = unfold(inner_lse)
    # The edges after the interior: their call's host time overlaps the interior's kernel.
    out, lse = edges(q, k, v)
    if torch.is_grad_enabled() and (out.requires_grad or inner_out.requires_grad):
        out = torch.cat([out[:, :, :rows.start], inner_out.flatten(2, 3).to(out.dtype), out[:, :, rows.stop:]], dim=2)
        if return_lse:
            lse = torch.cat([lse[:, :, :rows.start], inner_lse.flatten(2, 3), lse[:, :, rows.stop:]], dim=2)
        return out, lse
    out[:, :, rows.start:rows.stop].unflatten(2, (blocks, band.size)).copy_(inner_out)
    if return_lse:
        lse[:, :, rows.start:rows.stop].unflatten(2, (blocks, band.size)).copy_(inner_lse)
    return out, lse


def _heads_mergeable(t: torch.Tensor) -> torch.Tensor:
    """``t`` (copied only if needed) with its batch and head dimensions mergeable into one
    strided dimension and unit stride along the head dim, so the plan's views stay views."""
    if merges_batch_and_heads(t) and t.stride(-1) == 1:
        return t
    return t.contiguous()


class BandPlan(Plan):
    """A window of whole blocks as one dense SDPA call on overlapping key windows (see the
    module docstring); the edge rows through FlexAttention (CUDA) or the gather plan."""

    name = "band"

    def not_supported(self, pattern: n.Pattern, call: Call) -> list[str]:
        band = block_band(pattern)
        if band is None:
            return ["not a band of whole blocks (blocks(size) with only local rules, no score "
                    "modification)"]
        reasons = []
        if not call.self_attention:
            reasons.append("needs self-attention (q_len == kv_len, q_offset 0)")
        if call.bound:
            reasons.append("bound tensors")
        edge_tile = self.tiles(pattern, call)[0]
        if band[0] % edge_tile:
            reasons.append(f"the block size {band[0]} is not a multiple of the edge rows' tile {edge_tile}")
        return reasons

    def tiles(self, pattern: n.Pattern, call: Call) -> tuple[int, int]:
        """The edge rows' tiles: FlexAttention's where flex runs them, else the module's."""
        if _flex_edges(call):
            return flex_tiles(call.q_block, call.kv_block, call.device)
        return call.q_block, call.kv_block

    def prepare(self, pattern: n.Pattern, call: Call) -> tuple[Band, Tiled]:
        size, before, after = block_band(pattern)
        return Band(size, before, after, call.q_len, call.batch * call.heads), tiled(pattern, call, self.tiles(pattern, call))

    def efficiency(self, call: Call) -> float | None:
        """Measured for CUDA forward passes in half precision only: there
        :data:`EFFICIENCY_WHERE_IT_PAYS` for a band that :func:`band_pays`, else
        :data:`EFFICIENCY_BELOW` (see :meth:`cost`)."""
        if call.device.type != "cuda" or call.needs_grad or call.return_lse or not call.half_precision \
                or flex_reasons(call):
            return None
        return EFFICIENCY_WHERE_IT_PAYS

    def cost(self, prepared, call: Call, planner) -> float | None:
        if self.efficiency(call) is None:
            return None
        efficiency = EFFICIENCY_WHERE_IT_PAYS if band_pays(prepared[0]) else EFFICIENCY_BELOW
        return self.computed_pairs(prepared, call, planner) / efficiency

    def computed_pairs(self, prepared, call: Call, planner) -> int:
        """Whole blocks: the interior and the edges compute what they hold."""
        return prepared[1].pairs(call.heads)

    def build(self, prepared, call: Call, planner) -> Runner:
        band, edge = prepared
        lowered = edge.lowering
        states = edge_states(lowered.states, band, lowered.grid.q_block)
        scale, return_lse = call.scale, call.return_lse
        if _flex_edges(call):
            padded = bucket_length(call.q_len, lowered.grid.q_block)
            block_mask = padded_block_mask(states, lowered.grid, lowered.mask_mod, None, padded, padded)

            def edges(q, k, v):
                return flex_plan_attention(q, k, v, block_mask=block_mask, score_mod=None, scale=scale,
                                           return_lse=return_lse)
        else:
            def edges(q, k, v):
                return gather_attention(q, k, v, states=states, grid=lowered.grid, mask_mod=lowered.mask_mod,
                                        score_mod=None, scale=scale)
        return lambda q, k, v, _: band_attention(q, k, v, band=band, scale=scale, return_lse=return_lse,
                                                 edges=edges)

    def describe(self, prepared, call: Call) -> str:
        band = prepared[0]
        edges = "flex" if _flex_edges(call) else "the gather plan"
        return (f"a band of whole {band.size}-token blocks: one dense SDPA call on overlapping key "
                f"windows (views), the edge rows through {edges}")


def _flex_edges(call: Call) -> bool:
    """Whether the band plan's edge rows run through FlexAttention (else the gather plan)."""
    return call.device.type == "cuda" and not flex_reasons(call)
