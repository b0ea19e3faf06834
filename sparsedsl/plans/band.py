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

from ..passes.tiles import EMPTY
from .lattice import merges_batch_and_heads, sdpa_with_lse

#: The band plan runs automatically only when its interior holds at least this share of
#: the query rows (the edge rows cost a tile-plan call of their own) ...
MIN_INTERIOR_SHARE = 0.5
#: ... and at least this many multiply-adds of ``QK^T`` per unit of head dim, summed over
#: batch and heads (``batch * heads * interior rows * window``). Measured on an H100 (bf16):
#: 6.4e9 (64K tokens, 16 heads, ``local(25)``) and 2.2e9 (32K, 32 heads, ``local(16)``) ran
#: 1.21x and 1.10x faster than flex; 4.4e8 and below (16K tokens, windows of 3-13 blocks)
#: ran 0.5-0.8x as fast, the fixed cost of the edge call and the output copy dominating.
MIN_INTERIOR_PAIRS = 1e9


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
                   need_lse: bool, edges: Callable[..., tuple]) -> tuple[torch.Tensor, torch.Tensor | None]:
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
    inner_out, inner_lse = sdpa_with_lse(blocked_q, windows(k), windows(v), scale, need_lse)
    inner_out = unfold(inner_out)  # [B, H, blocks, size, D]
    if need_lse:
        inner_lse = unfold(inner_lse)
    # The edges after the interior: their call's host time overlaps the interior's kernel.
    out, lse = edges(q, k, v)
    if torch.is_grad_enabled() and (out.requires_grad or inner_out.requires_grad):
        out = torch.cat([out[:, :, :rows.start], inner_out.flatten(2, 3).to(out.dtype), out[:, :, rows.stop:]], dim=2)
        if need_lse:
            lse = torch.cat([lse[:, :, :rows.start], inner_lse.flatten(2, 3), lse[:, :, rows.stop:]], dim=2)
        return out, lse
    out[:, :, rows.start:rows.stop].unflatten(2, (blocks, band.size)).copy_(inner_out)
    if need_lse:
        lse[:, :, rows.start:rows.stop].unflatten(2, (blocks, band.size)).copy_(inner_lse)
    return out, lse


def _heads_mergeable(t: torch.Tensor) -> torch.Tensor:
    """``t`` (copied only if needed) with its batch and head dimensions mergeable into one
    strided dimension and unit stride along the head dim, so the plan's views stay views."""
    if merges_batch_and_heads(t) and t.stride(-1) == 1:
        return t
    return t.contiguous()
