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
Classifiers compute what they can on those small bounds and broadcast to ``[R, C]`` late:
on a GPU each tensor operation is one kernel launch, so a build costs about its count of
operations. :func:`leaves_unknown` tells on the host, from the structure alone, whether
any tile can be left ``UNKNOWN`` (so whether refining needs to read anything back).

Every classifier returns an int8 tensor of shape ``[B or 1, H or 1, R, C]``, or, when the
context names head layers (:attr:`Context.layers`: one head standing for each group of
heads allowed the same pairs), ``[B or 1, layers or 1, R, C]``: the head-group nodes give
each layer the states of its head, so shared parts are classified once per layer, not once
per head.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from functools import singledispatch
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

from ..lang import nodes as n
from ..lang.groups import group_of_each_head, head_groups
from ..triton_kernels import runs_triton
from .context import Context
from .host_values import on_device
from .maskmod import document_context, lower_block_rule, random_rule_layout, shifted_context

EMPTY, PARTIAL, UNKNOWN, FULL = 0, 1, 2, 3


@dataclass(frozen=True)
class Span:
    """Inclusive position bounds of a grid of tiles: rows ``[ql, qh]`` (``[R, 1]``) and
    columns ``[kl, kh]`` (``[1, C]``), int64 on the classification device. ``q_range``,
    when known, is ``(lo, hi)`` on the host with ``lo <= ql`` and ``qh <= hi`` everywhere."""

    ql: torch.Tensor
    qh: torch.Tensor
    kl: torch.Tensor
    kh: torch.Tensor
    q_range: tuple[int, int] | None = None

    def coarsen(self, size: int) -> "Span":
        """The same tiles in coordinates of ``size``-token blocks."""
        q_range = None if self.q_range is None else (self.q_range[0] // size, self.q_range[1] // size)
        return Span(self.ql // size, self.qh // size, self.kl // size, self.kh // size, q_range)


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
    #: Whether the spans classified against this grid are its tiles. ``False`` for the
    #: block-relative ranges a ``.within(...)`` rule sees of tiles that are not aligned to
    #: its blocks: any position intervals inside ``[0, q_len) x [0, kv_len)``.
    aligned: bool = True

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
        first = self.q_start + rows.start * self.q_block
        ql, qh = _tile_bounds(first, len(rows), self.q_block, self.q_len, device)
        kl, kh = _tile_bounds(0, self.num_kv_tiles, self.kv_block, self.kv_len, device)
        last = min(self.q_start + rows.stop * self.q_block, self.q_len) - 1
        return Span(ql[:, None], qh[:, None], kl[None], kh[None], (first, last))

    def splits(self, position: int) -> tuple[bool, bool]:
        """Whether some query tile, and whether some key tile, holds positions on both
        sides of ``position`` (some below it, some at or above it)."""
        return (_splits(position, self.q_start, self.q_len, self.q_block),
                _splits(position, 0, self.kv_len, self.kv_block))

    def within_blocks(self, size: int) -> bool:
        """Whether every tile lies inside one ``size``-token block (positions
        ``[b * size, (b + 1) * size)``) on both axes: tiles start at multiples of their
        size and ``size`` is a multiple of both tile sizes, on a grid whose spans are its
        tiles. (Sufficient, not necessary.)"""
        return (self.aligned and self.q_start % self.q_block == 0
                and size % self.q_block == 0 and size % self.kv_block == 0)


def _tile_bounds(start: int, count: int, block: int, length: int,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last positions of ``count`` consecutive ``block``-position tiles from
    ``start``, the last cut at ``length``: two int64 vectors."""
    lo = torch.arange(start, start + count * block, block, dtype=torch.int64, device=device)
    hi = lo + (block - 1)
    if start + count * block > length:
        hi.clamp_(max=length - 1)
    return lo, hi


def _splits(position: int, start: int, stop: int, block: int) -> bool:
    """Whether a tile of the tiling of ``[start, stop)`` by ``block`` holds positions on
    both sides of ``position``."""
    return start < position < stop and (position - start) % block != 0


# ---------------------------------------------------------------------------------------
# Three-valued logic on state tensors
# ---------------------------------------------------------------------------------------
# With EMPTY < PARTIAL < UNKNOWN < FULL (0 to 3), the rules below are integer arithmetic on
# int8 states: a few elementwise operations each, no comparisons against every state.


def decide(full: torch.Tensor, empty: torch.Tensor, otherwise: int = PARTIAL) -> torch.Tensor:
    """``EMPTY`` where ``empty``, else ``FULL`` where ``full``, else ``otherwise``: int8 of
    the two masks' broadcast shape, with leading 1s up to 4 dimensions."""
    a, b = (1,) * (4 - full.dim()) + full.shape, (1,) * (4 - empty.dim()) + empty.shape
    shape = tuple(y if x == 1 else x for x, y in zip(a, b))  # broadcast (cheaper on the host)
    state = torch.full(shape, otherwise, dtype=torch.int8, device=full.device)
    return state.masked_fill_(full, FULL).masked_fill_(empty, EMPTY)


def union(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """State of ``x | y`` from the states of ``x`` and ``y``: ``FULL`` if either is, the
    other where one is ``EMPTY``, else ``UNKNOWN``. That is ``max(a, b)``, raised to
    ``UNKNOWN`` where both are ``PARTIAL`` (the only case with ``max < UNKNOWN <= a + b``)."""
    return torch.maximum(torch.maximum(a, b), (a + b).clamp_(max=UNKNOWN))


def intersection(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """State of ``x & y`` from the states of ``x`` and ``y``: ``EMPTY`` if either is, the
    other where one is ``FULL``, else ``UNKNOWN``. That is ``min(a, b)``, raised to
    ``UNKNOWN`` where neither is decided (``(s + 1) & 2`` is 2 for ``PARTIAL`` and
    ``UNKNOWN``, 0 for ``EMPTY`` and ``FULL``)."""
    return torch.maximum(torch.minimum(a, b), (a + 1) & (b + 1) & UNKNOWN)


def complement(a: torch.Tensor) -> torch.Tensor:
    """State of ``~x`` from the state of ``x``: ``EMPTY`` and ``FULL`` swap, the others
    stay. As a table lookup: ``15 - 5 * a`` is 15, 10, 5, 0 for ``a`` = 0 to 3; halved,
    7, 5, 2, 0; its low two bits, 3, 1, 2, 0."""
    return (torch.rsub(a, 15, alpha=5) >> 1) & 3


def layer_counts(mask: torch.Tensor) -> torch.Tensor:
    """Nonzero entries of each ``[R, C]`` layer of a ``[B, H, R, C]`` bool tensor, int64
    ``[B, H]`` (a count over a whole layer is many times faster than a sum over two axes
    of it; on a 2-core CPU, about 20x on 16,384 x 16,384 bools)."""
    return torch.stack([torch.count_nonzero(layer) for layer in mask.flatten(0, 1)]).view(mask.shape[:2])


def row_counts(mask: torch.Tensor) -> torch.Tensor:
    """Nonzero entries of each row of a bool ``[..., R, C]`` tensor, int64 ``[..., R]``,
    from the list of nonzero entries (fast where they are few, as live tiles are)."""
    index = mask.flatten(0, -2).nonzero()[:, 0]
    return torch.bincount(index, minlength=mask[..., 0].numel()).view(mask.shape[:-1])


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
    """``-before <= k - q <= after`` and ``(k - q) % rate == 0`` (``before, after >= 0``)."""
    if rate == 1:
        # k - q takes every value in [kl - qh, kh - ql]: compare shifted small bounds.
        full = (span.kl + before >= span.qh) & (span.kh - after <= span.ql)
        empty = (span.kh + before < span.ql) | (span.kl - after > span.qh)
        return decide(full, empty)
    dmin, dmax = _difference_bounds(span)
    lo, hi = torch.clamp(dmin, min=-before), torch.clamp(dmax, max=after)
    full = (dmin >= -before) & (dmax <= after) & (dmin == dmax) & (dmin % rate == 0)
    return decide(full, ~_has_multiple(lo, hi, rate))


def _strided_states(span: Span, stride: int) -> torch.Tensor:
    dmin, dmax = _difference_bounds(span)
    full = (dmin == dmax) & (dmin % stride == 0) if stride > 1 else torch.ones_like(dmin, dtype=torch.bool)
    return decide(full, ~_has_multiple(dmin, dmax, stride))


def _causal_states(span: Span) -> torch.Tensor:
    return decide(span.kh <= span.ql, span.kl > span.qh)


def _global_states(span: Span, count: int) -> torch.Tensor:
    return decide((span.qh < count) | (span.kh < count), (span.ql >= count) & (span.kl >= count))


def _chunk_states(span: Span, size: int) -> torch.Tensor:
    """``q // size == k // size``: full when both ranges lie in one chunk (the same one,
    else the tile is empty, which wins)."""
    c = span.coarsen(size)
    return decide((c.ql == c.qh) & (c.kl == c.kh), (c.qh < c.kl) | (c.kh < c.ql))


def _dilated_states(span: Span, parts: Sequence[n.Dilated]) -> torch.Tensor:
    """States ``[1, layers, ...]`` of LongNet's ``dilated(segment, rate, offset)`` (``0 <=
    offset < rate <= segment``) where layer ``i`` runs ``parts[i]``, decided exactly per
    tile, every layer at once (the parameters as ``[layers, 1]`` tensors).

    Number the kept positions in order from 0: segment ``s`` holds the numbers ``[s * per,
    (s + 1) * per)`` (with ``rate == 1`` every position is kept, ``per = segment``: it is
    ``chunks(segment)``). A tile axis ``[lo, hi]`` holds the numbers from that of the first
    kept position ``>= lo`` to that of the last ``<= hi`` (none if the first exceeds the
    last), so the tile is empty unless both axes hold some and their ranges of segments
    meet. It is full when each axis is one position or, with ``rate == 1``, lies in one
    segment (with ``rate > 1`` two adjacent positions are never both kept in a segment).
    One part of rate 1 is classified as :func:`_chunk_states`. Where Triton kernels run
    (:func:`~sparsedsl.triton_kernels.runs_triton`), one kernel launch does the same
    (:func:`~sparsedsl.passes.build_kernels.dilated_states`)."""
    if len(parts) == 1 and parts[0].rate == 1:
        return _chunk_states(span, parts[0].segment)
    params = on_device([[p.segment, (p.segment - 1 - p.offset) // p.rate + 1, p.rate,
                         p.rate - 1 - p.offset, -p.offset] for p in parts], span.ql.device)
    if runs_triton(span.ql) and span.ql.shape[-1] == span.kl.shape[0] == 1:  # a grid: one kernel launch
        from .build_kernels import dilated_states
        return dilated_states(span.ql, span.qh, span.kl, span.kh, params)
    # [layers, 1] each; shift [2, layers, 1]: to the first kept position >= p, to the last <= p
    segment, per, rate, shift = params.T[..., None].split([1, 1, 1, 2])
    segment, per, rate = segment[0], per[0], rate[0]
    q_shape, k_shape, q_count = span.ql.shape, span.kl.shape, span.ql.numel()
    # [2, 1, n]: the low (row 0) and high (row 1) bounds of the query axes, then of the key axes
    bounds = torch.cat([span.ql.reshape(-1), span.kl.reshape(-1),
                        span.qh.reshape(-1), span.kh.reshape(-1)]).view(2, 1, -1)
    # number of the first kept position >= lo (row 0), of the last <= hi (row 1): per for
    # each segment before p's, then p's own
    number = (bounds // segment) * per + (bounds % segment + shift) // rate  # [2, layers, n]
    first, last = number // per  # segments, [layers, n] each
    last = last.masked_fill(number[0] > number[1], -1)  # an axis holding none: no segment
    whole = ((first == last) & (rate == 1)) | (bounds[0] == bounds[1])  # [layers, n]

    def axes(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # [layers, n] -> query, key parts
        return (values[:, :q_count].view(-1, *q_shape), values[:, q_count:].view(-1, *k_shape))

    (q_first, k_first), (q_last, k_last), (q_whole, k_whole) = axes(first), axes(last), axes(whole)
    return decide(q_whole & k_whole, (q_last < k_first) | (k_last < q_first))


def _layout_states(layout: torch.Tensor, span: Span, first_row: int = 0,
                   pool: tuple[int, int] | None = None) -> torch.Tensor:
    """States of a ``[H or 1, rows, nkb]`` bool block layout of the block rows from
    ``first_row`` over a grid of tiles given in block coordinates: the allowed blocks of
    each tile's block rectangle are counted with prefix sums, so the decision is exact.
    Only the block rows of ``span.q_range`` (every row when it is unknown) are summed, and
    nothing is read back from the device.

    The bounds may be any broadcastable shapes: a grid's ``[R, 1]`` rows and ``[1, C]``
    columns (summed by rows, then by columns of each tile row), or one ``[n, 1]`` list of
    tiles on both axes (a two-dimensional prefix sum, read at each tile's four corners).
    When the span is a grid's rows of tiles (``q_range`` known) that are ``pool = (mq,
    mk)`` whole blocks from a block boundary (the last cut short), each tile's blocks are
    summed directly instead. A ``[B, H or 1, rows, nkb]`` layout (a batch axis) gives
    ``[B, H or 1, R, C]`` states."""
    if layout.dim() == 4:
        states = _layout_states(layout.flatten(0, 1), span, first_row, pool)
        return states.view(layout.shape[0], layout.shape[1], *states.shape[-2:])
    lo, hi = span.q_range or (first_row, first_row + layout.shape[1] - 1)
    rows = layout[:, lo - first_row:hi + 1 - first_row]
    if pool is not None and span.q_range is not None:  # a grid's rows, every column
        (mq, mk), tiles_q, tiles_k = pool, span.ql.shape[0], span.kl.shape[1]
        if mq == mk == 1 and rows.shape[1:] == (tiles_q, tiles_k):  # a tile is a block: allowed or not
            return rows.to(torch.int8).mul_(FULL)[None]
        pad = (0, tiles_k * mk - rows.shape[2], 0, tiles_q * mq - rows.shape[1])
        counts = _pooled(F.pad(rows, pad) if any(pad) else rows, mq, mk)
        # Every tile holds mq x mk blocks but those of the last row and column, which the
        # sequence ends may cut short: decided on their own block counts.
        full = counts == mq * mk
        q_cells, k_cells = (span.qh - span.ql + 1)[-1:], span.kh - span.kl + 1  # [1, 1], [1, C]
        full[:, -1:] = counts[:, -1:] == q_cells * k_cells
        q_cells, k_cells = span.qh - span.ql + 1, (span.kh - span.kl + 1)[:, -1:]  # [R, 1], [1, 1]
        full[:, :, -1:] = counts[:, :, -1:] == q_cells * k_cells
        return decide(full, counts == 0)
    cells = (span.qh - span.ql + 1) * (span.kh - span.kl + 1)
    index = torch.int64 if rows[0].numel() >= 2**31 else torch.int32
    by_row = F.pad(rows.cumsum(1, dtype=index), (0, 0, 1, 0))
    qbl, qbh, kbl, kbh = span.ql - lo, span.qh + (1 - lo), span.kl, span.kh + 1
    if qbl.shape[1] == 1 and kbl.shape[0] == 1:  # a grid: rows first, then columns
        per_tile_row = by_row[:, qbh[:, 0]] - by_row[:, qbl[:, 0]]  # [H, R, nkb]
        by_col = F.pad(per_tile_row.cumsum(2, dtype=index), (1, 0))
        counts = by_col[:, :, kbh[0]] - by_col[:, :, kbl[0]]  # [H, R, C]
    else:
        table = F.pad(by_row.cumsum(2, dtype=index), (1, 0))
        counts = table[:, qbh, kbh] - table[:, qbl, kbh] - table[:, qbh, kbl] + table[:, qbl, kbl]
    return decide(counts == cells, counts == 0)


#: Blocks per tile side up to which :func:`_pooled` adds strided slices (beyond, it sums).
POOL_SLICES = 8


def _pooled(layout: torch.Tensor, mq: int, mk: int) -> torch.Tensor:
    """Allowed blocks in each ``mq x mk`` rectangle of a bool ``[H, tq * mq, tk * mk]``
    layout: ``[H, tq, tk]``, uint8 when ``mq * mk < 256`` (else int32). A few blocks per
    side are added as strided slices, more are summed (a sum over a short innermost axis
    costs about ten times the additions)."""
    small = mq * mk < 256
    x = layout.view(torch.uint8)
    if mk > POOL_SLICES or not small:
        x = x.unflatten(-1, (-1, mk)).sum(-1, dtype=torch.uint8 if mk < 256 else torch.int32)
    elif mk > 1:
        x = functools.reduce(torch.add, (x[..., j::mk] for j in range(mk)))
    if not small:
        x = x.to(torch.int32)
    if mq > POOL_SLICES:
        return x.unflatten(-2, (-1, mq)).sum(-2, dtype=x.dtype)
    return functools.reduce(torch.add, (x[..., i::mq, :] for i in range(mq))) if mq > 1 else x


# ---------------------------------------------------------------------------------------
# Per-node classification
# ---------------------------------------------------------------------------------------


def classify(pattern: n.Pattern, ctx: Context, grid: TileGrid, rows: range) -> torch.Tensor:
    """States ``[B or 1, H or 1, len(rows), num_kv_tiles]`` of the tiles in query-tile rows
    ``rows`` (possibly an expanded view; ``layers or 1`` for ``H`` when ``ctx.layers`` is
    set). ``UNKNOWN`` may remain (see :func:`leaves_unknown`); tiles cut short by a
    sequence end may still say ``FULL`` (:func:`sparsedsl.passes.blockmask.tile_states`
    makes them ``PARTIAL``)."""
    span = grid.span(rows, ctx.device)
    state = _classify(pattern, ctx, span, grid)
    return state.expand(*state.shape[:2], len(rows), grid.num_kv_tiles)


@singledispatch
def _classify(node, ctx: Context, span: Span, grid: TileGrid) -> torch.Tensor:
    """States of the tiles of ``grid`` bounded by ``span``."""
    raise TypeError(f"tile classification: no rule for node type {type(node).__name__}")


@_classify.register
def _(node: n.Full, ctx, span, grid):
    return torch.full((1, 1, 1, 1), FULL, dtype=torch.int8, device=span.ql.device)


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
    return _chunk_states(span, node.size)


@_classify.register
def _(node: n.Strided, ctx, span, grid):
    return _strided_states(span, node.stride)


@_classify.register
def _(node: n.Dilated, ctx, span, grid):
    return _dilated_states(span, [node])


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
    by_layout = _by_block_layout(node, grid) and coarse.q_range is not None  # a grid's rows
    if by_layout:
        layout, first_row = _rules_layout(node, ctx, coarse, grid)
        state = _layout_states(layout, coarse, first_row, _whole_blocks(grid, size))
    elif node.rules:
        states = [_block_rule_states(rule, ctx, coarse, grid, size) for rule in node.rules]
        state = states[0]
        for other in states[1:]:
            state = union(state, other)
    else:
        state = _classify(n.Full(), ctx, span, grid)
    if node.causal_ and not by_layout:
        state = intersection(state, _causal_states(coarse))
    if node.within_ is not None:
        state = intersection(state, _within_states(node.within_, ctx, span, grid, size))
    return state


def _whole_blocks(grid: TileGrid, size: int) -> tuple[int, int] | None:
    """``(mq, mk)`` when every tile of ``grid`` is ``mq x mk`` whole ``size``-token blocks
    from a block boundary (the last row and column of tiles cut short by the sequence
    ends); else ``None``."""
    if grid.aligned and grid.q_start % size == 0 and grid.q_block % size == 0 and grid.kv_block % size == 0:
        return grid.q_block // size, grid.kv_block // size
    return None


#: Blocks per tile up to which several block rules are decided on a block layout.
LAYOUT_BLOCKS_PER_TILE = 4


def _by_block_layout(node: n.Blocks, grid: TileGrid) -> bool:
    """Whether the rules (and block causality) of ``node`` are classified together from
    their block layout (:func:`_rules_layout`): when two or more terms would otherwise be
    combined tile by tile, and a tile holds at most ``LAYOUT_BLOCKS_PER_TILE`` blocks
    (which bounds the layout by the tile grid), and either tiles cross block boundaries
    (each term would leave a tile undecided, their union or intersection would then be
    ``UNKNOWN``, refined by evaluating the ``mask_mod``) or each tile is one whole block
    (one pass over the layout instead of a pass per term and per combination)."""
    one_block = _whole_blocks(grid, node.size) == (1, 1)
    return (_rule_terms(node) > 1 and (one_block or not grid.within_blocks(node.size))
            and grid.q_block * grid.kv_block <= LAYOUT_BLOCKS_PER_TILE * node.size * node.size)


def _rule_terms(node: n.Blocks) -> int:
    """The number of block-rule states :func:`_classify` combines for ``node`` (a dilated
    rule has one per rate; block causality is one)."""
    return sum(len(r.rates) if isinstance(r, n.BlockDilated) else 1 for r in node.rules) + node.causal_


def _rules_layout(node: n.Blocks, ctx: Context, coarse: Span, grid: TileGrid) -> tuple[torch.Tensor, int]:
    """``(layout, first_row)``: whether each block pair is allowed by ``node``'s rules
    (at least one) and block causality, bool ``[H or 1, rows, num_kv_blocks]`` for the
    block rows ``coarse.q_range`` (a grid's rows) from ``first_row``. A narrow
    ``.local(w)``, a ``.global_(n)`` and block causality write their blocks in place
    (diagonals, slices, a triangle: work in the rows, not in the rows' blocks); the rows of
    a ``.random``/``.layout`` rule are read from its layout; other rules come from their
    ``mask_mod`` lowering on block coordinates."""
    size = node.size
    num_qb, num_kb = -(-grid.q_len // size), -(-grid.kv_len // size)
    first, last = coarse.q_range
    allowed = torch.zeros(1, last + 1 - first, num_kb, dtype=torch.bool, device=ctx.device)
    for rule in node.rules:
        if _paint(rule, allowed, first):
            continue
        if isinstance(rule, (n.BlockRandom, n.BlockRandomCausal, n.BlockLayout)):
            rows = _bound_layout(rule, ctx, grid, size)[..., first:last + 1, :]
        else:
            index = torch.int32 if num_qb + num_kb < 2**31 else torch.int64  # halves the traffic
            qb = torch.arange(first, last + 1, dtype=index, device=ctx.device)[:, None]
            kb = torch.arange(num_kb, dtype=index, device=ctx.device)[None, :]
            h = (torch.arange(ctx.heads, device=ctx.device) if ctx.layers is None
                 else on_device(ctx.layers, ctx.device))[:, None, None]
            rows = lower_block_rule(rule, ctx, num_qb, num_kb)(None, h, qb, kb)
        if rows.dim() <= allowed.dim() and all(r in (1, a) for r, a in zip(rows.shape[::-1], allowed.shape[::-1])):
            allowed |= rows
        else:  # rows that vary over heads or batch entries
            allowed = allowed | rows
    if node.causal_:
        allowed.tril_(first)  # row i is block row first + i: kb <= qb
    return allowed, first


#: Widest ``.local(w)`` (``2 w + 1`` diagonals) written diagonal by diagonal.
PAINTED_DIAGONALS = 16


def _paint(rule: n.BlockRule, allowed: torch.Tensor, first: int) -> bool:
    """Write the blocks ``rule`` allows into ``allowed`` (bool ``[..., rows, num_kv_blocks]``
    of the block rows from ``first``) when it is a ``.local(w)`` of at most
    :data:`PAINTED_DIAGONALS` diagonals (``|qb - kb| <= w``: the diagonals of offset
    ``first - w .. first + w``, as row ``i`` is block row ``first + i``) or a
    ``.global_(n)`` (columns ``kb < n``, rows ``qb < n``); otherwise leave it and return
    False."""
    if isinstance(rule, n.BlockLocal) and 2 * rule.window + 1 <= PAINTED_DIAGONALS:
        for offset in range(first - rule.window, first + rule.window + 1):
            allowed.diagonal(offset, -2, -1).fill_(True)
        return True
    if isinstance(rule, n.BlockGlobal):
        allowed[..., :rule.n] = True
        allowed[..., :max(0, rule.n - first), :] = True
        return True
    return False


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
    if isinstance(rule, (n.BlockRandom, n.BlockRandomCausal, n.BlockLayout)):
        return _layout_states(_bound_layout(rule, ctx, grid, size), coarse, pool=_whole_blocks(grid, size))
    raise TypeError(f"tile classification: no rule for block rule {type(rule).__name__}")


def _bound_layout(rule: n.BlockRule, ctx: Context, grid: TileGrid, size: int) -> torch.Tensor:
    """The ``[1 or H, nqb, nkb]`` bool layout of a ``.random(...)``, ``.random_causal(...)``
    or ``.layout(...)`` rule on ``grid``'s blocks (``[B, 1 or H, nqb, nkb]`` for a layout
    with a batch axis), shared through ``ctx`` with the ``mask_mod`` lowering."""
    num_qb, num_kb = -(-grid.q_len // size), -(-grid.kv_len // size)
    if isinstance(rule, (n.BlockRandom, n.BlockRandomCausal)):
        return random_rule_layout(rule, ctx, num_qb, num_kb)[None]
    return ctx.memoized(("layout", rule.name, num_qb, num_kb),
                        lambda: ctx.block_layout(rule.name, num_qb, num_kb))


def _within_states(rule: n.Pattern, ctx: Context, span: Span, grid: TileGrid, size: int) -> torch.Tensor:
    """States of a ``.within(rule)`` rule on block-relative positions.

    A tile inside one block per axis sees the relative range ``[lo % size, hi % size]``
    exactly (every tile does when :meth:`TileGrid.within_blocks`). A tile crossing a block
    boundary is classified on the whole relative range ``[0, size - 1]`` (a superset),
    where only ``FULL`` and ``EMPTY`` stay sound; a ``PARTIAL`` there becomes ``UNKNOWN``.

    When every tile lies in one block, the relative ranges are the tiles of the relative
    grid (tiles start at multiples of their size, and ``size`` is one). Otherwise they are
    intervals at any offset, classified on a grid that says so: a nested ``.within`` must
    not take them for tiles inside its own blocks."""
    rel_ctx = ctx.relative(size)
    if grid.within_blocks(size):
        relative = Span(span.ql % size, span.qh % size, span.kl % size, span.kh % size)
        return _classify(rule, rel_ctx, relative, TileGrid(size, size, grid.q_block, grid.kv_block))
    rel_grid = TileGrid(size, size, grid.q_block, grid.kv_block, aligned=False)
    q_inside = (span.ql // size) == (span.qh // size)
    k_inside = (span.kl // size) == (span.kh // size)
    relative = Span(
        torch.where(q_inside, span.ql % size, 0), torch.where(q_inside, span.qh % size, size - 1),
        torch.where(k_inside, span.kl % size, 0), torch.where(k_inside, span.kh % size, size - 1),
    )
    state = _classify(rule, rel_ctx, relative, rel_grid)
    exact = q_inside & k_inside
    return torch.where((state == PARTIAL) & ~exact, UNKNOWN, state).to(torch.int8)


def _by_head(parts, part_of: Sequence[int], ctx: Context, span: Span, grid: TileGrid) -> torch.Tensor:
    """States ``[B or 1, layers, R, C]`` of a node that gives head ``h`` what
    ``parts[part_of[h]]`` allows: each layer (:meth:`Context.layer_heads`) takes the layer
    of its head's part, a run of consecutive layers from one part as one slice. Only the
    parts some layer takes are classified; ``dilated(...)`` parts all at once."""
    heads = ctx.layer_heads()
    if all(isinstance(parts[part_of[h]], n.Dilated) for h in heads):  # LongNet's segments: at once
        return _dilated_states(span, [parts[part_of[h]] for h in heads])
    runs = [(part, len(list(run))) for part, run in itertools.groupby(part_of[h] for h in heads)]
    states = {part: _classify(parts[part], ctx, span, grid) for part, _ in runs}
    batch = max(state.shape[0] for state in states.values())
    shape, start, pieces = (batch, len(heads), span.ql.shape[0], span.kl.shape[1]), 0, []
    for part, count in runs:
        pieces.append(states[part].expand(shape)[:, start:start + count])
        start += count
    return torch.cat(pieces, dim=1)


@_classify.register
def _(node: n.Heads, ctx, span, grid):
    groups = head_groups(ctx.heads, len(node.parts))
    return _by_head(node.parts, group_of_each_head(groups), ctx, span, grid)


@_classify.register
def _(node: n.Segments, ctx, span, grid):
    return _classify(node.expand(), ctx, span, grid)


@_classify.register
def _(node: n.Union, ctx, span, grid):
    return functools.reduce(union, (_classify(p, ctx, span, grid) for p in node.parts))


@_classify.register
def _(node: n.Intersection, ctx, span, grid):
    bands, others = _split_bands(node.parts)
    states = [_classify(p, ctx, span, grid) for p in others]
    if bands:  # one band, decided exactly (two would make UNKNOWN tiles on their edges)
        states.append(_window_states(span, *_band_bounds(bands, grid)))
    return functools.reduce(intersection, states)


def _split_bands(parts) -> tuple[list[n.Pattern], list[n.Pattern]]:
    """``(bands, others)``: the parts of an intersection that are diagonal bands
    (``causal()``, ``window(...)``: ``-before <= k - q <= after``) and the rest, when there
    are two or more bands; otherwise no band."""
    bands = [p for p in parts if isinstance(p, (n.Causal, n.Window))]
    if len(bands) < 2:
        return [], list(parts)
    return bands, [p for p in parts if not isinstance(p, (n.Causal, n.Window))]


def _band_bounds(bands: list[n.Pattern], grid: TileGrid) -> tuple[int, int]:
    """``(before, after)``, both ``>= 0``, of the intersection of diagonal ``bands``
    (``causal()`` bounds ``k - q`` above by 0 only; below, no distance on ``grid`` reaches
    its bound)."""
    unbounded = grid.q_len + grid.kv_len
    before = min(unbounded if isinstance(b, n.Causal) else b.before for b in bands)
    after = min(0 if isinstance(b, n.Causal) else b.after for b in bands)
    return before, after


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


# ---------------------------------------------------------------------------------------
# Which tiles a classifier can leave undecided, known on the host
# ---------------------------------------------------------------------------------------


class _Undecided(NamedTuple):
    """What the classifier of a node can give on a grid, as a guarantee when false:
    ``partial``, some tile ``PARTIAL`` or ``UNKNOWN``; ``unknown``, some tile ``UNKNOWN``."""

    partial: bool
    unknown: bool


_DECIDED = _Undecided(False, False)
_EXACT = _Undecided(True, False)
_OPEN = _Undecided(True, True)


def leaves_unknown(pattern: n.Pattern, ctx: Context, grid: TileGrid) -> bool:
    """Whether :func:`classify` may leave ``UNKNOWN`` tiles of ``pattern`` on ``grid``,
    from the structure alone. ``False`` is a guarantee (no tile needs refining); ``True``
    only a possibility. Primitives decide exactly; ``UNKNOWN`` comes from combining two
    undecided states, from ``documents(...)`` and from a ``.within(...)`` rule on tiles
    that cross blocks."""
    return _undecided(pattern, ctx, grid).unknown


def _combined(parts) -> _Undecided:
    """Of a union or intersection of ``parts`` (in any nesting): ``UNKNOWN`` only where
    a part is, or where two parts are both undecided."""
    parts = list(parts)
    undecided = sum(p.partial for p in parts)
    return _Undecided(undecided > 0, undecided > 1 or any(p.unknown for p in parts))


@singledispatch
def _undecided(node, ctx: Context, grid: TileGrid) -> _Undecided:
    return _OPEN  # no rule (documents(...)): anything


_undecided.register(n.Full, lambda node, ctx, grid: _DECIDED)
for _primitive in (n.Causal, n.Window, n.DilatedWindow, n.Chunks, n.Strided, n.Dilated):
    _undecided.register(_primitive, lambda node, ctx, grid: _EXACT)


@_undecided.register
def _(node: n.GlobalTokens, ctx, grid):
    return _Undecided(any(grid.splits(node.n)), False)


@_undecided.register
def _(node: n.Prefix, ctx, grid):
    return _Undecided(grid.splits(node.n)[1], False)


@_undecided.register
def _(node: n.Blocks, ctx, grid):
    # Every rule and block causality decide block rectangles exactly, and a tile inside
    # one block is one block: allowed or not.
    one_block = grid.within_blocks(node.size)
    rule = _Undecided(not one_block, False)
    if _by_block_layout(node, grid):  # the rules and causality decided as one layout
        terms = [rule]
    else:
        terms = [rule] * _rule_terms(node)
    if node.within_ is not None:
        rel_grid = TileGrid(node.size, node.size, grid.q_block, grid.kv_block)
        terms.append(_undecided(node.within_, ctx.relative(node.size), rel_grid) if one_block else _OPEN)
    return _combined(terms)


@_undecided.register
def _(node: n.Heads, ctx, grid):
    parts = [_undecided(p, ctx, grid) for p in node.parts]
    return _Undecided(any(p.partial for p in parts), any(p.unknown for p in parts))


@_undecided.register
def _(node: n.Segments, ctx, grid):
    return _undecided(node.expand(), ctx, grid)


@_undecided.register
def _(node: n.Union, ctx, grid):
    return _combined(_undecided(p, ctx, grid) for p in node.parts)


@_undecided.register
def _(node: n.Intersection, ctx, grid):
    bands, others = _split_bands(node.parts)  # two or more bands classify as one
    return _combined([_undecided(p, ctx, grid) for p in others] + ([_EXACT] if bands else []))


@_undecided.register
def _(node: n.Difference, ctx, grid):
    return _combined([_undecided(node.left, ctx, grid), _undecided(node.right, ctx, grid)])


@_undecided.register
def _(node: n.Complement, ctx, grid):
    return _undecided(node.inner, ctx, grid)


@_undecided.register
def _(node: n.Scored, ctx, grid):
    return _undecided(node.pattern, ctx, grid)


# ---------------------------------------------------------------------------------------
# Ranges, offsets, positions inside documents, cyclic head groups
# ---------------------------------------------------------------------------------------


@_classify.register
def _(node: n.Queries, ctx, span, grid):
    lo, hi = n.range_bounds(node.start, node.stop, ctx.q_len)  # hi <= lo: an empty range
    return decide((span.ql >= lo) & (span.qh < hi), (span.qh < lo) | (span.ql >= hi) | (hi <= lo))


@_classify.register
def _(node: n.Keys, ctx, span, grid):
    lo, hi = n.range_bounds(node.start, node.stop, ctx.kv_len)  # hi <= lo: an empty range
    return decide((span.kl >= lo) & (span.kh < hi), (span.kh < lo) | (span.kl >= hi) | (hi <= lo))


@_classify.register
def _(node: n.Shifted, ctx, span, grid):
    # The inner pattern classifies the part of each tile from the offset on, in its own
    # coordinates (intervals at any offset: an unaligned grid); a tile with positions
    # before the offset is empty there, so it is at most partial.
    offset, inner_ctx = node.offset, shifted_context(node, ctx)
    inner_grid = TileGrid(inner_ctx.q_len, inner_ctx.kv_len, grid.q_block, grid.kv_block, aligned=False)
    shifted = Span((span.ql - offset).clamp(min=0), (span.qh - offset).clamp(min=0),
                   (span.kl - offset).clamp(min=0), (span.kh - offset).clamp(min=0))
    state = _classify(node.inner, inner_ctx, shifted, inner_grid)
    before = (span.qh < offset) | (span.kh < offset)
    crossing = (span.ql < offset) | (span.kl < offset)
    state = torch.where(crossing & (state == FULL), PARTIAL, state)
    return torch.where(before, EMPTY, state).to(torch.int8)


@_classify.register
def _(node: n.DocumentWithin, ctx, span, grid):
    # Where one document holds the whole tile (documents(...) says FULL), the tile's
    # positions counted from that document's first position are the tile shifted by it,
    # and the rule classifies them exactly; elsewhere the tile is empty (no pair shares a
    # document) or left to refinement.
    documents = _classify(n.Documents(node.name), ctx, span, grid)  # [B, 1, R, C]
    relative = ctx.document_positions(node.name)  # [B, L]
    rule_ctx = document_context(ctx)
    rule_grid = TileGrid(rule_ctx.q_len, rule_ctx.kv_len, grid.q_block, grid.kv_block, aligned=False)
    last = rule_ctx.q_len - 1
    rows, cols = span.ql.shape[0], span.kl.shape[1]
    states = []
    for b in range(relative.shape[0]):
        q_first = span.ql - relative[b][span.ql]  # the document start of each tile's first row
        k_first = span.kl - relative[b][span.kl]
        shifted = Span((span.ql - q_first).clamp(0, last), (span.qh - q_first).clamp(0, last),
                       (span.kl - k_first).clamp(0, last), (span.kh - k_first).clamp(0, last))
        state = _classify(node.rule, rule_ctx, shifted, rule_grid)
        states.append(state.expand(1, state.shape[1], rows, cols))
    rule = torch.cat(states)
    state = torch.where(documents == FULL, rule, torch.where(documents == EMPTY, EMPTY, UNKNOWN))
    return state.to(torch.int8)


@_classify.register
def _(node: n.CycleHeads, ctx, span, grid):
    return _by_head(node.parts, [h % len(node.parts) for h in range(ctx.heads)], ctx, span, grid)


_undecided.register(n.Queries, lambda node, ctx, grid: _EXACT)
_undecided.register(n.Keys, lambda node, ctx, grid: _EXACT)
_undecided.register(n.Shifted, lambda node, ctx, grid: _OPEN)  # inner on an unaligned grid
_undecided.register(n.DocumentWithin, lambda node, ctx, grid: _OPEN)


@_undecided.register
def _(node: n.CycleHeads, ctx, grid):
    parts = [_undecided(p, ctx, grid) for p in node.parts]
    return _Undecided(any(p.partial for p in parts), any(p.unknown for p in parts))


# ---------------------------------------------------------------------------------------
# LongNet branches and multisets: tiles are classified by where a pair is allowed
# (multiplicity > 0)
# ---------------------------------------------------------------------------------------


@_classify.register
def _(node: n.DilatedHeads, ctx, span, grid):
    groups = node.groups(ctx.heads)
    return _by_head([part for _, part in groups], group_of_each_head([heads for heads, _ in groups]),
                    ctx, span, grid)


@_classify.register
def _(node: n.LongNet, ctx, span, grid):
    return _classify(node.expand(), ctx, span, grid)


@_classify.register
def _(node: n.Sum, ctx, span, grid):
    return functools.reduce(union, (_classify(p, ctx, span, grid) for p in node.parts))


_undecided.register(n.DilatedHeads, lambda node, ctx, grid: _EXACT)
_undecided.register(n.LongNet, lambda node, ctx, grid: _undecided(node.expand(), ctx, grid))
_undecided.register(n.Sum, lambda node, ctx, grid: _combined(_undecided(p, ctx, grid) for p in node.parts))
