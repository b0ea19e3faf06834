"""Tile classification: which tiles of the attention matrix are empty, partial or full.

The ``[Q, K]`` matrix is cut into tiles of ``q_block x kv_block`` positions (the last row
and column of tiles may be cut short by the sequence ends). Each node of a pattern states,
from its parameters alone, what it allows on every tile of a grid:

* ``EMPTY``: no pair of the tile is allowed;
* ``FULL``: every pair is allowed;
* ``PARTIAL``: known to be neither;
* ``UNKNOWN``: not decided from the structure (the tile is then refined by evaluating the
  ``mask_mod`` on that tile alone, see :mod:`sparsedsl.passes.refine`).

Primitives decide exactly with interval arithmetic on the tile bounds; combinators use
three-valued logic (``FULL | x = FULL``, ``PARTIAL | PARTIAL = UNKNOWN``, ``~PARTIAL =
PARTIAL``, ...). A tile's positions are ``[ql, qh] x [kl, kh]`` (inclusive, cut at the
sequence ends); ``Span`` holds these bounds as ``[R, 1]`` and ``[1, C]`` int64 tensors so a
whole grid (or a chunk of its rows) is classified at once in ``O(R * C)`` memory.

Every classifier returns an int8 tensor of shape ``[B or 1, H or 1, R, C]``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from functools import singledispatch

import torch
import torch.nn.functional as F

from ..lang import nodes as n
from ..lang.groups import head_groups
from ..lang.randomblocks import random_block_layout
from .context import Context

EMPTY, PARTIAL, UNKNOWN, FULL = 0, 1, 2, 3


@dataclass(frozen=True)
class Span:
    """Inclusive position bounds of a grid of tiles: rows ``[ql, qh]`` (``[R, 1]``) and
    columns ``[kl, kh]`` (``[1, C]``), int64 on the classification device."""

    ql: torch.Tensor
    qh: torch.Tensor
    kl: torch.Tensor
    kh: torch.Tensor

    def coarsen(self, size: int) -> "Span":
        """The same tiles in coordinates of ``size``-token blocks."""
        return Span(self.ql // size, self.qh // size, self.kl // size, self.kh // size)


@dataclass(frozen=True)
class TileGrid:
    """The tiling of query rows ``[q_start, q_len)`` and key columns ``[0, kv_len)`` of a
    ``q_len x kv_len`` matrix by ``q_block x kv_block`` tiles. Tile row ``i`` holds the
    query positions ``q_start + i * q_block ...``: with ``q_start > 0`` (queries that are
    the last rows of a longer sequence, as when decoding with a KV cache) the tiles are cut
    from ``q_start``, not from 0."""

    q_len: int
    kv_len: int
    q_block: int
    kv_block: int
    q_start: int = 0

    @property
    def rows(self) -> int:
        """Query rows tiled: ``q_len - q_start``."""
        return self.q_len - self.q_start

    @property
    def num_q_tiles(self) -> int:
        return -(-self.rows // self.q_block)

    @property
    def num_kv_tiles(self) -> int:
        return -(-self.kv_len // self.kv_block)

    def span(self, rows: range, device: torch.device) -> Span:
        """Bounds of the tiles in query-tile rows ``rows`` and every key-tile column."""
        i = torch.arange(rows.start, rows.stop, device=device, dtype=torch.int64)[:, None]
        j = torch.arange(self.num_kv_tiles, device=device, dtype=torch.int64)[None, :]
        return Span(
            self.q_start + i * self.q_block,
            torch.clamp(self.q_start + (i + 1) * self.q_block, max=self.q_len) - 1,
            j * self.kv_block,
            torch.clamp((j + 1) * self.kv_block, max=self.kv_len) - 1,
        )

    def ragged(self, span: Span) -> torch.Tensor:
        """``[R, C]`` bool: tiles cut short by a sequence end. FlexAttention's block masks
        count their missing positions as masked, so such a tile is never ``FULL``."""
        return ((span.qh - span.ql + 1) < self.q_block) | ((span.kh - span.kl + 1) < self.kv_block)


# ---------------------------------------------------------------------------------------
# Three-valued logic on state tensors
# ---------------------------------------------------------------------------------------


def _as4d(state: torch.Tensor) -> torch.Tensor:
    while state.dim() < 4:
        state = state[None]
    return state


def decide(full: torch.Tensor, empty: torch.Tensor, otherwise: int = PARTIAL) -> torch.Tensor:
    """``FULL`` where ``full``, else ``EMPTY`` where ``empty``, else ``otherwise``."""
    state = torch.where(empty, EMPTY, otherwise)
    return _as4d(torch.where(full, FULL, state).to(torch.int8))


def union(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """State of ``x | y`` from the states of ``x`` and ``y``."""
    either_full = (a == FULL) | (b == FULL)
    mixed = torch.where(a == EMPTY, b, torch.where(b == EMPTY, a, UNKNOWN))
    return torch.where(either_full, FULL, mixed).to(torch.int8)


def intersection(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """State of ``x & y`` from the states of ``x`` and ``y``."""
    either_empty = (a == EMPTY) | (b == EMPTY)
    mixed = torch.where(a == FULL, b, torch.where(b == FULL, a, UNKNOWN))
    return torch.where(either_empty, EMPTY, mixed).to(torch.int8)


def complement(a: torch.Tensor) -> torch.Tensor:
    """State of ``~x`` from the state of ``x``."""
    return torch.where(a == FULL, EMPTY, torch.where(a == EMPTY, FULL, a)).to(torch.int8)


# ---------------------------------------------------------------------------------------
# Interval helpers
# ---------------------------------------------------------------------------------------


def _has_multiple(lo: torch.Tensor, hi: torch.Tensor, rate: int) -> torch.Tensor:
    """Whether ``[lo, hi]`` (possibly empty) contains a multiple of ``rate``."""
    return (lo <= hi) & (torch.div(hi, rate, rounding_mode="floor") * rate >= lo)


def _difference_bounds(span: Span) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds of ``k - q`` over a tile; every value in between occurs."""
    return span.kl - span.qh, span.kh - span.ql


def _window_states(span: Span, before: int, after: int, rate: int = 1) -> torch.Tensor:
    """``-before <= k - q <= after`` and ``(k - q) % rate == 0``."""
    dmin, dmax = _difference_bounds(span)
    in_full = (dmin >= -before) & (dmax <= after)
    lo, hi = torch.clamp(dmin, min=-before), torch.clamp(dmax, max=after)
    empty = ~_has_multiple(lo, hi, rate)
    if rate > 1:
        in_full = in_full & (dmin == dmax) & (dmin % rate == 0)
    return decide(in_full, empty)


def _strided_states(span: Span, stride: int) -> torch.Tensor:
    dmin, dmax = _difference_bounds(span)
    full = (dmin == dmax) & (dmin % stride == 0) if stride > 1 else torch.ones_like(dmin, dtype=torch.bool)
    return decide(full, ~_has_multiple(dmin, dmax, stride))


def _causal_states(span: Span) -> torch.Tensor:
    return decide(span.kh <= span.ql, span.kl > span.qh)


def _global_states(span: Span, count: int) -> torch.Tensor:
    return decide((span.qh < count) | (span.kh < count), (span.ql >= count) & (span.kl >= count))


def _kept_in(lo: torch.Tensor, hi: torch.Tensor, segment: int, rate: int, offset: int) -> torch.Tensor:
    """Whether ``[lo, hi]``, inside one segment, holds a position with
    ``(p % segment) % rate == offset``."""
    rel_lo = lo % segment
    first = rel_lo + (offset - rel_lo) % rate
    return (lo <= hi) & (first <= rel_lo + (hi - lo))


def _dilated_states(span: Span, segment: int, rate: int, offset: int) -> torch.Tensor:
    """LongNet's ``dilated(segment, rate, offset)``, decided exactly per tile."""
    qs_lo, qs_hi = span.ql // segment, span.qh // segment
    ks_lo, ks_hi = span.kl // segment, span.kh // segment
    first, last = torch.maximum(qs_lo, ks_lo), torch.minimum(qs_hi, ks_hi)

    def both_kept(seg: torch.Tensor) -> torch.Tensor:
        start, stop = seg * segment, seg * segment + segment - 1
        q_ok = _kept_in(torch.maximum(span.ql, start), torch.minimum(span.qh, stop), segment, rate, offset)
        k_ok = _kept_in(torch.maximum(span.kl, start), torch.minimum(span.kh, stop), segment, rate, offset)
        return q_ok & k_ok

    # Segments strictly between the first and last common one lie inside both ranges whole.
    nonempty = (first <= last) & (both_kept(first) | both_kept(last) | (last - first >= 2))
    one_segment = (qs_lo == qs_hi) & (ks_lo == ks_hi) & (qs_lo == ks_lo)
    if rate == 1:
        full = one_segment
    else:
        single = (span.ql == span.qh) & (span.kl == span.kh)
        full = one_segment & single & both_kept(qs_lo)
    return decide(full, ~nonempty)


def _layout_states(layout: torch.Tensor, span: Span) -> torch.Tensor:
    """States of a ``[H or 1, nqb, nkb]`` bool block layout over tiles given in block
    coordinates: the allowed blocks of each tile's block rectangle are counted with prefix
    sums, so the decision is exact."""
    qbl, qbh = span.ql[:, 0], span.qh[:, 0]
    kbl, kbh = span.kl[0], span.kh[0]
    lo, hi = int(qbl.min()), int(qbh.max())
    rows = layout[:, lo:hi + 1].to(torch.int32)
    by_row = F.pad(rows.cumsum(1, dtype=torch.int32), (0, 0, 1, 0))
    per_tile_row = by_row[:, qbh - lo + 1] - by_row[:, qbl - lo]  # [H, R, nkb]
    by_col = F.pad(per_tile_row.cumsum(2, dtype=torch.int32), (1, 0))
    counts = by_col[:, :, kbh + 1] - by_col[:, :, kbl]  # [H, R, C]
    cells = (qbh - qbl + 1)[:, None] * (kbh - kbl + 1)[None, :]
    return decide(counts == cells, counts == 0)


# ---------------------------------------------------------------------------------------
# Per-node classification
# ---------------------------------------------------------------------------------------


def classify(pattern: n.Pattern, ctx: Context, grid: TileGrid, rows: range) -> torch.Tensor:
    """States ``[B or 1, H or 1, len(rows), num_kv_tiles]`` of the tiles in query-tile rows
    ``rows``. ``UNKNOWN`` may remain; ragged tiles may still say ``FULL`` (see
    :meth:`TileGrid.ragged`)."""
    span = grid.span(rows, ctx.device)
    state = _classify(pattern, ctx, span, grid)
    return state.expand(*state.shape[:2], len(rows), grid.num_kv_tiles)


@singledispatch
def _classify(node, ctx: Context, span: Span, grid: TileGrid) -> torch.Tensor:
    raise TypeError(f"tile classification: no rule for node type {type(node).__name__}")


@_classify.register
def _(node: n.Full, ctx, span, grid):
    return decide(torch.ones((), dtype=torch.bool, device=span.ql.device),
                  torch.zeros((), dtype=torch.bool, device=span.ql.device))


@_classify.register
def _(node: n.Causal, ctx, span, grid):
    return _causal_states(span)


@_classify.register
def _(node: n.Window, ctx, span, grid):
    return _window_states(span, node.before, node.after)


@_classify.register
def _(node: n.DilatedWindow, ctx, span, grid):
    return _window_states(span, node.before, node.after, node.rate)


@_classify.register
def _(node: n.Chunks, ctx, span, grid):
    qc_lo, qc_hi = span.ql // node.size, span.qh // node.size
    kc_lo, kc_hi = span.kl // node.size, span.kh // node.size
    full = (qc_lo == qc_hi) & (kc_lo == kc_hi) & (qc_lo == kc_lo)
    return decide(full, (qc_hi < kc_lo) | (kc_hi < qc_lo))


@_classify.register
def _(node: n.Strided, ctx, span, grid):
    return _strided_states(span, node.stride)


@_classify.register
def _(node: n.Dilated, ctx, span, grid):
    return _dilated_states(span, node.segment, node.rate, node.offset)


@_classify.register
def _(node: n.GlobalTokens, ctx, span, grid):
    return _global_states(span, node.n)


@_classify.register
def _(node: n.Prefix, ctx, span, grid):
    return decide(span.kh < node.n, span.kl >= node.n)


@_classify.register
def _(node: n.Documents, ctx, span, grid):
    # FULL when one document covers the whole tile; EMPTY when the id ranges of the
    # query and key positions are disjoint; otherwise left to refinement.
    ids = ctx.document_ids(node.name)  # [B, L]
    q_min, q_max = _tile_extrema(ids[:, grid.q_start:grid.q_len], grid.q_block)
    k_min, k_max = _tile_extrema(ids[:, :grid.kv_len], grid.kv_block)
    first, last = (int(span.ql[0, 0]) - grid.q_start, int(span.ql[-1, 0]) - grid.q_start)
    rows = slice(first // grid.q_block, last // grid.q_block + 1)
    q_min, q_max = q_min[:, rows, None], q_max[:, rows, None]
    k_min, k_max = k_min[:, None, :], k_max[:, None, :]
    full = (q_min == q_max) & (k_min == k_max) & (q_min == k_min)
    empty = (q_max < k_min) | (k_max < q_min)
    return decide(full, empty, UNKNOWN)[0][:, None]


def _tile_extrema(ids: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tile min and max of ``[B, L]`` ids, ``[B, ceil(L / block)]`` each."""
    pad = -ids.shape[1] % block
    padded = F.pad(ids[:, None].float(), (0, pad), mode="replicate")[:, 0].to(ids.dtype) if pad else ids
    tiles = padded.reshape(ids.shape[0], -1, block)
    return tiles.amin(-1), tiles.amax(-1)


@_classify.register
def _(node: n.Blocks, ctx, span, grid):
    size = node.size
    coarse = span.coarsen(size)
    if node.rules:
        states = [_block_rule_states(rule, ctx, coarse, grid, size) for rule in node.rules]
        state = states[0]
        for other in states[1:]:
            state = union(state, other)
    else:
        state = _classify(n.Full(), ctx, span, grid)
    if node.causal_:
        state = intersection(state, _causal_states(coarse))
    if node.within_ is not None:
        state = intersection(state, _within_states(node.within_, ctx, span, grid, size))
    return state


def _block_rule_states(rule: n.BlockRule, ctx: Context, coarse: Span, grid: TileGrid,
                       size: int) -> torch.Tensor:
    """States of one block rule over tiles given in block coordinates (exact: every block
    of a tile's block rectangle meets the tile)."""
    if isinstance(rule, n.BlockLocal):
        return _window_states(coarse, rule.window, rule.window)
    if isinstance(rule, n.BlockDilated):
        states = [
            _strided_states(coarse, r) if rule.window is None
            else _window_states(coarse, rule.window, rule.window, r)
            for r in rule.rates
        ]
        state = states[0]
        for other in states[1:]:
            state = union(state, other)
        return state
    if isinstance(rule, n.BlockGlobal):
        return _global_states(coarse, rule.n)
    num_qb, num_kb = -(-grid.q_len // size), -(-grid.kv_len // size)
    if isinstance(rule, n.BlockRandom):
        layout = ctx.memoized(
            ("random", rule, num_qb, num_kb),
            lambda: random_block_layout(num_qb, num_kb, rule.per_row, rule.seed).to(ctx.device),
        )[None]
    elif isinstance(rule, n.BlockLayout):
        layout = ctx.memoized(("layout", rule.name, num_qb, num_kb),
                              lambda: ctx.block_layout(rule.name, num_qb, num_kb))
    else:
        raise TypeError(f"tile classification: no rule for block rule {type(rule).__name__}")
    return _layout_states(layout, coarse)


def _within_states(rule: n.Pattern, ctx: Context, span: Span, grid: TileGrid, size: int) -> torch.Tensor:
    """States of a ``.within(rule)`` rule on block-relative positions.

    A tile inside one block per axis sees the relative range ``[lo % size, hi % size]``
    exactly. A tile crossing a block boundary is classified on the whole relative range
    ``[0, size - 1]`` (a superset), where only ``FULL`` and ``EMPTY`` stay sound; a
    ``PARTIAL`` there becomes ``UNKNOWN``."""
    q_inside = (span.ql // size) == (span.qh // size)
    k_inside = (span.kl // size) == (span.kh // size)
    relative = Span(
        torch.where(q_inside, span.ql % size, 0), torch.where(q_inside, span.qh % size, size - 1),
        torch.where(k_inside, span.kl % size, 0), torch.where(k_inside, span.kh % size, size - 1),
    )
    rel_grid = TileGrid(size, size, grid.q_block, grid.kv_block)
    state = _classify(rule, ctx.relative(size), relative, rel_grid)
    exact = q_inside & k_inside
    return torch.where((state == PARTIAL) & ~exact, UNKNOWN, state).to(torch.int8)


@_classify.register
def _(node: n.Heads, ctx, span, grid):
    groups = head_groups(ctx.heads, len(node.parts))
    parts = [_classify(p, ctx, span, grid) for p in node.parts]
    batch = max(p.shape[0] for p in parts)
    rows, cols = span.ql.shape[0], span.kl.shape[1]
    return torch.cat(
        [p.expand(batch, ctx.heads, rows, cols)[:, g.start:g.stop] for p, g in zip(parts, groups)],
        dim=1,
    )


@_classify.register
def _(node: n.Segments, ctx, span, grid):
    return _classify(node.expand(), ctx, span, grid)


@_classify.register
def _(node: n.Union, ctx, span, grid):
    return functools.reduce(union, (_classify(p, ctx, span, grid) for p in node.parts))


@_classify.register
def _(node: n.Intersection, ctx, span, grid):
    return functools.reduce(intersection, (_classify(p, ctx, span, grid) for p in node.parts))


@_classify.register
def _(node: n.Difference, ctx, span, grid):
    left = _classify(node.left, ctx, span, grid)
    return intersection(left, complement(_classify(node.right, ctx, span, grid)))


@_classify.register
def _(node: n.Complement, ctx, span, grid):
    return complement(_classify(node.inner, ctx, span, grid))


@_classify.register
def _(node: n.Scored, ctx, span, grid):
    return _classify(node.pattern, ctx, span, grid)
