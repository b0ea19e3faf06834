"""Groups of the tile_sdpa plan: the query *spans* of a tile grid (consecutive query tiles
with the same live key tiles) gathered into groups that each run as one fused SDPA call.

* A *band*: spans whose live key tiles are one contiguous run inside a window that moves
  with the queries (windows, block windows); its slabs are views of the inputs.
* A band with *other parts* (on the CPU): the longest runs of the typical spans in a band,
  the key tiles every typical span sees (global columns) as one part, and each span's
  tiles outside the window (random blocks) as another, merged by log-sum-exp
  (:mod:`~sparsedsl.plans.tile_sdpa_autograd`).
* The remaining spans grouped by their number of live tiles: views where they are
  arithmetic runs, gathers otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..passes.tiles import EMPTY, TileGrid, row_counts


@dataclass(frozen=True)
class TileGroup:
    """Query *spans* (``height`` consecutive query tiles with the same live key tiles) that
    all see ``width`` key tiles: span ``i`` starts at query tile ``rows[i]`` and sees key
    tiles ``tiles[b, h, i]`` (``tiles [Bg, Hg, n, width]``, per batch entry and head of the
    states; a head with fewer live tiles is padded with a masked-out tile).

    ``states``: the states of those tiles, ``[Bg, Hg, n, height, width]`` (``EMPTY`` where
    padded), from which :func:`group_mask` builds the group's mask. ``runs``: ``(q_first,
    q_stride, k_first, k_stride)`` in tokens when span ``i`` starts at ``q_first + i *
    q_stride`` and its keys are the contiguous ``width * kv_block`` from ``k_first + i *
    k_stride``, all inside the sequences and the same for every batch entry and head: then
    the slabs are views of the inputs; else None (gathered)."""

    rows: torch.Tensor
    height: int
    tiles: torch.Tensor
    states: torch.Tensor
    runs: tuple[int, int, int, int] | None
    #: Key tiles the spans also see besides their run (a band group's global columns, its
    #: spans' other tiles), each as a group of the same spans (``runs`` None, one tile
    #: set): merged with this one by log-sum-exp (:mod:`~sparsedsl.plans.tile_sdpa_autograd`).
    others: tuple["TileGroup", ...] = ()
    #: For an other part whose spans all see the same tiles: the keys (offsets into its tiles
    #: laid end to end) some row allows, the only ones its kernel computes (None: all).
    columns: torch.Tensor | None = None
    #: For a group of one span on views: the query rows ``(first, stop)`` of its ``height``
    #: tiles it computes, where the span's rows are split by the keys they see (None: all).
    q_rows: tuple[int, int] | None = None

    @property
    def tile_rows(self) -> torch.Tensor:
        """Every query tile of the group, span by span: ``[n * height]``."""
        return (self.rows[:, None] + torch.arange(self.height, device=self.rows.device)).flatten()


#: The most a band group (:func:`band_group`) may compute, relative to the live tiles of
#: the spans it holds: the tiles its key runs take past a sequence's ends, or over empty
#: tiles inside them.
BAND_SLACK = 1.25


def tile_groups(states: torch.Tensor, grid: TileGrid, merged: bool = False) -> list[TileGroup]:
    """The groups of ``states`` (``[Bg, Hg, nq, nk]``) on ``grid``: for each span height, a
    band group (:func:`band_group`) where one fits, with ``merged`` also one of the
    remaining spans' longest runs besides the key tiles they all see and their other tiles
    (:func:`column_band`), and the other spans grouped by their number of live tiles."""
    live = states != EMPTY
    # Spans: runs of consecutive query tiles with the same live key tiles in every (batch, head).
    same = (live[..., 1:, :] == live[..., :-1, :]).flatten(0, 1).all(0).all(-1)    # [nq - 1]
    first = torch.cat([torch.ones(1, dtype=torch.bool, device=states.device), ~same]).nonzero().flatten()
    heights = torch.diff(first, append=torch.tensor([states.shape[-2]], device=states.device))
    span_live = live if len(first) == live.shape[-2] else live[:, :, first]       # [Bg, Hg, S, nk]
    counts = row_counts(span_live)                                                 # [Bg, Hg, S]
    widths = counts.amax((0, 1))                                                   # a span's widest (b, h)
    groups = []
    if states.shape[:2] == (1, 1):
        extents = SpanExtents.of(span_live[0, 0])
        for height in heights.unique().tolist():
            chosen = (heights == height) & (widths > 0)
            bands = [band_group(states, grid, first, chosen, height, extents)]
            if merged:
                rest = chosen if bands[0] is None else chosen & ~torch.isin(first, bands[0].rows)
                bands.append(column_band(states, grid, first, rest, height, span_live[0, 0]))
            for band in bands:
                if band is not None:
                    groups += edges_apart(band, grid)
                    widths[torch.isin(first, band.rows)] = 0  # held by the band
    for width, height in torch.stack([widths, heights], 1).unique(dim=0).tolist():
        if width == 0:
            continue
        chosen = ((widths == width) & (heights == height)).nonzero().flatten()
        rows, tiles = first[chosen], _live_first(span_live[:, :, chosen], counts[:, :, chosen], width)
        flat = states.flatten(2)  # the tiles' states gathered, not their rows copied
        span_states = torch.stack([flat.gather(-1, ((rows + j)[:, None] * states.shape[-1] + tiles).flatten(2))
                                   .view(tiles.shape) for j in range(height)], 3)
        groups.append(TileGroup(rows, height, tiles, span_states, _runs(rows, height, tiles, grid)))
    return groups


@dataclass(frozen=True)
class SpanExtents:
    """Of each span's live key tiles (bool ``[S, nk]``): how many (``counts``), the first
    (``lo``) and one past the last (``hi``); a span whose count is ``hi - lo`` has one
    contiguous run."""

    counts: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor

    @classmethod
    def of(cls, live: torch.Tensor) -> "SpanExtents":
        as_bytes = live.view(torch.uint8)
        return cls(row_counts(live), as_bytes.argmax(-1),
                   live.shape[-1] - as_bytes.flip(-1).argmax(-1))


def band_group(states: torch.Tensor, grid: TileGrid, first: torch.Tensor, chosen: torch.Tensor,
               height: int, extents: SpanExtents, typical: bool = False) -> TileGroup | None:
    """One group for the spans ``first[chosen]`` (all ``height`` query tiles high; states
    of one batch entry and head; ``extents`` of every span's live tiles) whose live key tiles are one contiguous run, when those spans
    are evenly spaced and their runs fit in a window of ``W`` tiles that moves by the same
    number of tokens as the spans: span ``i`` sees tiles ``k0 + i * step ... + W - 1``,
    where tiles before the first or past the last are empty. The group's slabs are then
    views of the inputs (padded with masked-out keys at the ends), whatever the spans'
    widths, and it is made only when it computes at most :data:`BAND_SLACK` times their
    live tiles. With ``typical``, the window is the spans' median run instead, unchecked
    (runs past it are left to the caller). None where no such group fits (or it would
    hold one span)."""
    num_kv = states.shape[-1]
    counts, lo, hi = extents.counts, extents.lo, extents.hi
    chosen = chosen & (counts > 0) & (counts == hi - lo)
    rows, lo, hi, counts = first[chosen], lo[chosen], hi[chosen], counts[chosen]
    if rows.numel() < 2:
        return None
    q_step = int(rows[1] - rows[0])
    index = torch.arange(rows.numel(), device=rows.device)
    if q_step < 1 or not bool((rows == rows[0] + q_step * index).all()) or (q_step * grid.q_block) % grid.kv_block:
        return None
    k_step = q_step * grid.q_block // grid.kv_block
    if typical:
        k_first = int((lo - index * k_step).median())
        width = max(1, int((hi - lo).median()))
    else:
        k_first = int((lo - index * k_step).min())
        width = int((hi - index * k_step).max()) - k_first
        if rows.numel() * width > BAND_SLACK * int(counts.sum()):
            return None
    tiles = (k_first + index * k_step)[:, None] + torch.arange(width, device=rows.device)     # [n, W]
    outside = (tiles < 0) | (tiles >= num_kv)
    clamped = tiles.clamp(0, num_kv - 1)
    span_states = torch.stack([states[0, 0, rows + j].gather(-1, clamped) for j in range(height)], 1)
    span_states = span_states.masked_fill(outside[:, None], EMPTY)
    runs = (int(rows[0]) * grid.q_block, q_step * grid.q_block, k_first * grid.kv_block, k_step * grid.kv_block)
    return TileGroup(rows, height, tiles[None, None], span_states[None, None], runs)


def edges_apart(band: TileGroup, grid: TileGrid) -> list[TileGroup]:
    """A band group as up to three groups that need no padding: the spans whose window
    starts before the first key tile see the first ``W`` tiles, those whose window ends
    past the last see the last ``W`` (each one slab for all its spans), and the others keep
    their windows. The tiles a span's window gains are empty for it (its own live tiles
    stay inside its window; others hold the rest), and its other parts are its own. The
    band itself where its window is wider than the keys or the last key tile is cut short
    (padding then)."""
    tiles = band.tiles[0, 0]
    num_kv, width = grid.num_kv_tiles, tiles.shape[-1]
    if width > num_kv or grid.kv_len % grid.kv_block:
        return [band]
    start = tiles[:, 0]
    before, past = start < 0, start + width > num_kv
    if not bool((before | past).any()):
        return [band]
    q_first, q_stride, _, k_stride = band.runs
    parts = []
    for spans, first_tile in ((before, 0), (~before & ~past, None), (past, num_kv - width)):
        index = spans.nonzero().flatten()
        if not index.numel():
            continue
        rows, states = band.rows[index], band.states[:, :, index]
        if first_tile is None:
            part_tiles, k_first, stride = tiles[index], int(start[index[0]]) * grid.kv_block, k_stride
        else:
            part_tiles = (first_tile + torch.arange(width, device=tiles.device)).expand(index.numel(), -1)
            k_first, stride = first_tile * grid.kv_block, 0
            offset = part_tiles - start[index, None]  # a tile's place in the span's own window
            inside = (offset >= 0) & (offset < width)
            states = states.gather(-1, offset.clamp(0, width - 1)[None, None, :, None].expand_as(states))
            states = states.masked_fill(~inside[None, None, :, None], EMPTY)
        runs = (int(rows[0]) * grid.q_block, q_stride, k_first, stride)
        others = tuple(_spans(other, index) for other in band.others)
        parts.append(TileGroup(rows, band.height, part_tiles[None, None], states, runs, others))
    return parts


def _spans(group: TileGroup, index: torch.Tensor) -> TileGroup:
    """The spans ``index`` of a gathered group (``runs`` None)."""
    return TileGroup(group.rows[index], group.height, group.tiles[:, :, index], group.states[:, :, index], None)


def column_band(states: torch.Tensor, grid: TileGrid, first: torch.Tensor, chosen: torch.Tensor,
                height: int, span_live: torch.Tensor) -> TileGroup | None:
    """A band group (:func:`band_group`) in the window of the median longest run of live
    tiles of the typical spans of ``first[chosen]`` (``span_live``: the live tiles of every
    span; typical: at most twice the median width) besides the key tiles every typical span
    sees (*columns*), with as ``others`` the group of those columns (empty for a span where
    its band window holds them) and the group of each span's live tiles outside the band
    window (random blocks; padded with empty tiles to the most any span has); None where
    no band fits the runs or the group would compute more than :data:`BAND_SLACK` times the
    spans' live tiles."""
    spans = chosen.nonzero().flatten()
    if spans.numel() < 2:
        return None
    live = span_live[spans]                                                          # [spans, nk]
    counts = row_counts(live)
    typical = counts <= 2 * counts.median()
    common = live[typical].all(0)
    rest = live & ~common
    lo, hi = _longest_runs(rest)
    every = lambda t: torch.zeros(first.shape, dtype=t.dtype, device=t.device).index_copy_(0, spans, t)
    band = band_group(states, grid, first, _subset(chosen, spans[typical]), height,
                      SpanExtents(every(hi - lo), every(lo), every(hi)), typical=True)
    if band is None:
        return None
    others = []
    count = band.rows.numel()
    window = torch.zeros(count, live.shape[-1] + 2, dtype=torch.bool, device=live.device)  # tiles -1 .. nk
    window.scatter_(1, band.tiles[0, 0].clamp(-1, live.shape[-1]) + 1, True)
    window = window[:, 1:-1]
    if bool(common.any()):  # a span's window holds the columns inside it
        tiles = common.nonzero().flatten().expand(1, 1, count, -1)
        part_states = _states_at(states, band.rows, height, tiles)
        part_states = part_states.masked_fill(window.gather(-1, tiles[0, 0])[None, None, :, None], EMPTY)
        others.append(TileGroup(band.rows, height, tiles, part_states, None))
    held = rest[torch.searchsorted(first[spans], band.rows)] & ~window
    width = int(held.sum(-1).max())
    if width:
        order = torch.sort((~held).to(torch.int8), dim=-1, stable=True).indices[:, :width]  # held tiles first
        tiles = order.expand(1, 1, count, width)
        part_states = _states_at(states, band.rows, height, tiles)
        part_states = part_states.masked_fill(~held.gather(-1, order)[None, None, :, None], EMPTY)
        others.append(TileGroup(band.rows, height, tiles, part_states, None))
    group = TileGroup(band.rows, height, band.tiles, band.states, band.runs, tuple(others))
    held_live = int(live[torch.searchsorted(first[spans], band.rows)].sum())
    return group if computed_tiles([group]) <= BAND_SLACK * height * held_live else None


def _longest_runs(live: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lo, hi)`` of each row's longest run of live tiles (``live`` bool ``[S, nk]``; the
    first of equal runs; ``lo == hi == 0`` on a row without one)."""
    rows, width = live.shape
    starts = live & ~F.pad(live[:, :-1], (1, 0))
    run = starts.cumsum(-1, dtype=torch.int32).to(torch.int64) * live         # run number, 0 off runs
    lengths = torch.zeros(rows, width + 1, dtype=torch.int64, device=live.device)
    lengths.scatter_add_(1, run, live.to(torch.int64))
    lengths[:, 0] = 0
    best = lengths.argmax(-1)
    lo = (starts & (run == best[:, None])).to(torch.uint8).argmax(-1)
    return lo, lo + lengths.gather(1, best[:, None])[:, 0]


def _states_at(states: torch.Tensor, rows: torch.Tensor, height: int, tiles: torch.Tensor) -> torch.Tensor:
    """The states of key tiles ``tiles [1, 1, n, T]`` for spans ``rows`` (``height`` query
    tiles each): ``[1, 1, n, height, T]``."""
    return torch.stack([states[0, 0, rows + j].gather(-1, tiles[0, 0]) for j in range(height)], 1)[None, None]


def _subset(chosen: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``chosen`` (bool over spans) true only at the span indices ``keep``."""
    subset = torch.zeros_like(chosen)
    subset[keep] = True
    return subset


def _live_first(live: torch.Tensor, counts: torch.Tensor, width: int) -> torch.Tensor:
    """The first ``width`` key tiles of each span of ``live`` (bool ``[Bg, Hg, n, nk]``,
    ``counts [Bg, Hg, n]`` live tiles each, at most ``width``) in the order of a stable sort
    of "not live": its live tiles ascending, then, where a (batch, head) has fewer, its
    first tiles that are not live (all among its first ``2 * width``). From the list of
    live tiles, not a sort of every tile: ``[Bg, Hg, n, width]`` int64."""
    b, h, s, col = live.nonzero().unbind(1)  # row-major: each span's live tiles ascending
    per_span = counts.flatten()
    rank = torch.arange(len(col), device=col.device) - (per_span.cumsum(0) - per_span).repeat_interleave(per_span)
    tiles = torch.zeros(*live.shape[:3], width, dtype=torch.int64, device=live.device)
    tiles[b, h, s, rank] = col
    if bool((counts < width).any()):
        not_live = torch.sort(live[..., :2 * width].to(torch.int8), dim=-1, stable=True).indices
        slot = torch.arange(width, device=live.device)
        extra = not_live.gather(-1, (slot - counts[..., None]).clamp(min=0))
        tiles = torch.where(slot < counts[..., None], tiles, extra)
    return tiles


def _runs(rows: torch.Tensor, height: int, tiles: torch.Tensor, grid: TileGrid):
    """The group's slabs as arithmetic runs of tokens (see :class:`TileGroup`), or None."""
    if tiles.shape[:2] != (1, 1):
        return None
    starts, width, count = tiles[0, 0, :, 0], tiles.shape[-1], rows.numel()
    if not bool((tiles[0, 0] == starts[:, None] + torch.arange(width, device=tiles.device)).all()):
        return None  # some span's live tiles are not one contiguous run
    q_step = int(rows[1] - rows[0]) if count > 1 else 1
    k_step = int(starts[1] - starts[0]) if count > 1 else 1
    steps = torch.arange(count, device=rows.device)
    arithmetic = bool((rows == rows[0] + q_step * steps).all()) and bool((starts == starts[0] + k_step * steps).all())
    if not arithmetic or q_step < 1 or k_step < 1:
        return None
    return (int(rows[0]) * grid.q_block, q_step * grid.q_block, int(starts[0]) * grid.kv_block,
            k_step * grid.kv_block)


def computed_pairs(groups: list[TileGroup], grid: TileGrid) -> int:
    """The query-key pairs the groups' kernels compute, other parts included (per batch
    entry and head of the states): whole tiles, but only its ``columns`` of a part that has
    them."""
    bq, bk = grid.q_block, grid.kv_block
    rows = lambda g: g.height * bq if g.q_rows is None else g.q_rows[1] - g.q_rows[0]
    return sum(g.rows.numel() * rows(g) * (g.tiles.shape[-1] * bk + sum(
        o.tiles.shape[-1] * bk if o.columns is None else o.columns.numel() for o in g.others)) for g in groups)


def computed_tiles(groups: list[TileGroup]) -> int:
    """The tiles the groups' kernels compute, other parts included (per batch entry and
    head of the states)."""
    return sum(g.rows.numel() * g.height * (g.tiles.shape[-1] + sum(o.tiles.shape[-1] for o in g.others))
               for g in groups)


def tiles_held_by_none(groups: list[TileGroup], num_q_tiles: int) -> tuple[tuple[int, int], ...]:
    """The runs ``(start, stop)`` of query tiles no group holds (their rows output 0)."""
    held = torch.zeros(num_q_tiles + 2, dtype=torch.int8)  # a sentinel held tile at each end
    held[[0, -1]] = 1
    for group in groups:
        held[group.tile_rows.cpu() + 1] = 1
    edges = torch.diff(held).nonzero().flatten().tolist()  # -1 where a run starts, +1 past its end
    return tuple(zip(edges[::2], edges[1::2]))


def part_tiles(part: TileGroup) -> torch.Tensor:
    """A part's key tiles as :class:`~sparsedsl.plans.tile_sdpa_autograd.KeyPart` takes
    them: ``[1, T]`` where every span sees the same, else ``[n, T]``."""
    tiles = part.tiles[0, 0]
    return tiles[:1] if bool((tiles == tiles[:1]).all()) else tiles
