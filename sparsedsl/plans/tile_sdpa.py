"""The *tile_sdpa* plan: block-sparse attention as fused SDPA calls on gathered key tiles.

For each query tile, the key tiles its row of the tile grid does not leave empty are
gathered into one contiguous slab. Query tiles with the same number of live key tiles form
a *group*, and each group runs as **one** call of PyTorch's fused
``scaled_dot_product_attention``, its query tiles folded into SDPA's batch dimension: the
scores are never materialised, and no row is padded to a wider one (a group's rows are all
exactly as wide). The boolean mask of a group is built once, when the runner is built, and
only where the group has partial tiles: the ``mask_mod`` is evaluated on the partial tiles
alone, full tiles are allowed whole, and a group of full tiles runs unmasked.

Query rows that see no key output 0 (they are given one masked-in key and their output is
multiplied by 0, so no backend produces NaN). Gradients flow by autograd through SDPA's
fused backward and the gathers (key and value gradients are summed over the groups that
read them). The plan computes exactly the pairs of its live tiles, whole.

It has no score modification (the fused kernel takes only a mask) and no log-sum-exp.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..budget import check_memory
from ..lang import nodes as n
from ..lang.queries import mask_part, score_mods
from ..passes.refine import EVALUATION_BUDGET
from ..passes.tiles import EMPTY, FULL, PARTIAL, TileGrid, row_counts
from ..compiler.arguments import BLOCK_SIZES
from .base import Call, Plan, Runner
from .tiled import Tiled, check_batch, tiled
from .tile_sdpa_autograd import KeyPart, ViewGroup, ViewGroupsAttention, view_group_forward
from .tile_slabs import SlabRuns, assemble, tile_major

#: Throughput per computed pair relative to the gather plan on the CPU: 136k-196k pairs per
#: CPU-ms on windows and block windows against the gather plan's 22k
#: (``benchmarks/plan_efficiency.py``, 2 cores, torch 2.13, fp32, 8 heads, head dim 64,
#: 4,096 tokens): fused SDPA on slabs against the gather plan's matmul, mask and softmax.
CPU_EFFICIENCY = 7.0


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
                    groups.append(band)
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
               height: int, extents: SpanExtents, dropped: torch.Tensor | None = None,
               typical: bool = False) -> TileGroup | None:
    """One group for the spans ``first[chosen]`` (all ``height`` query tiles high; states
    of one batch entry and head; ``extents`` of every span's live tiles, ``dropped`` key
    tiles left out of them) whose live key tiles are one contiguous run, when those spans
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
    if dropped is not None:
        outside |= dropped[clamped]
    span_states = torch.stack([states[0, 0, rows + j].gather(-1, clamped) for j in range(height)], 1)
    span_states = span_states.masked_fill(outside[:, None], EMPTY)
    runs = (int(rows[0]) * grid.q_block, q_step * grid.q_block, k_first * grid.kv_block, k_step * grid.kv_block)
    return TileGroup(rows, height, tiles[None, None], span_states[None, None], runs)


def column_band(states: torch.Tensor, grid: TileGrid, first: torch.Tensor, chosen: torch.Tensor,
                height: int, span_live: torch.Tensor) -> TileGroup | None:
    """A band group (:func:`band_group`) in the window of the median longest run of live
    tiles of the typical spans of ``first[chosen]`` (``span_live``: the live tiles of every
    span; typical: at most twice the median width) besides the key tiles every typical span
    sees (*columns*), with as ``others`` the group of those columns and the group of each
    span's live tiles outside the band window (random blocks; padded with empty tiles to the
    most any span has); None where no band fits the runs or the group would compute more
    than :data:`BAND_SLACK` times the spans' live tiles."""
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
                      SpanExtents(every(hi - lo), every(lo), every(hi)), dropped=common, typical=True)
    if band is None:
        return None
    others = []
    count = band.rows.numel()
    if bool(common.any()):
        tiles = common.nonzero().flatten().expand(1, 1, count, -1)
        others.append(TileGroup(band.rows, height, tiles, _states_at(states, band.rows, height, tiles), None))
    window = torch.zeros(count, live.shape[-1] + 2, dtype=torch.bool, device=live.device)  # tiles -1 .. nk
    window.scatter_(1, band.tiles[0, 0].clamp(-1, live.shape[-1]) + 1, True)
    held = rest[torch.searchsorted(first[spans], band.rows)] & ~window[:, 1:-1]
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


def group_mask(group: TileGroup, grid: TileGrid, mask_mod):
    """``(mask, keep)`` of a group: its boolean mask (:func:`tile_mask`) with one masked-in
    key on rows that see none, and ``keep`` ``[n, Bg * Hg, height * q_block, 1]`` float, 0
    on those rows (None: every row sees a key)."""
    mask = tile_mask(group, grid, mask_mod)
    if mask is None:
        return None, None
    empty = ~mask.any(-1, keepdim=True)                                            # rows that see no key
    keep = None
    if bool(empty.any()):
        mask[..., :1] |= empty  # one masked-in key; the row's output is then multiplied by 0
        keep = (~empty).to(torch.float32)
    return mask, keep


def tile_mask(group: TileGroup, grid: TileGrid, mask_mod) -> torch.Tensor | None:
    """A group's SDPA mask ``[n, Bg * Hg, height * q_block, width * kv_block]`` (None:
    every tile full), evaluated by ``mask_mod`` (on row indices) on the partial tiles only."""
    rows, height, tiles, span_states = group.rows, group.height, group.tiles, group.states
    bg, hg, count, width = tiles.shape
    bq, bk = grid.q_block, grid.kv_block
    if bool((span_states == FULL).all()):
        return None
    check_memory("the tile_sdpa plan", "a group's mask", bg * hg * count * height * width * bq * bk)
    mask = (span_states == FULL)[..., None, None].expand(-1, -1, -1, -1, -1, bq, bk).clone()
    partial = (span_states == PARTIAL).nonzero()                                  # [P, 5]: b, h, i, j, w
    q_off = torch.arange(bq, device=rows.device)[None, :, None]
    k_off = torch.arange(bk, device=rows.device)[None, None, :]
    step = max(1, EVALUATION_BUDGET // (bq * bk))
    for start in range(0, partial.shape[0], step):
        b, h, i, j, w = partial[start:start + step].unbind(1)
        q = (rows[i] + j)[:, None, None] * bq + q_off
        k = tiles[b, h, i, w][:, None, None] * bk + k_off
        inside = (q < grid.rows) & (k < grid.kv_len)
        allowed = mask_mod(b[:, None, None], h[:, None, None], q.clamp(max=grid.rows - 1), k.clamp(max=grid.kv_len - 1))
        mask[b, h, i, j, w] = allowed & inside
    # [Bg, Hg, n, height, W, bq, bk] -> [n, Bg * Hg, height * bq, W * bk]
    return mask.permute(2, 0, 1, 3, 5, 4, 6).reshape(count, bg * hg, height * bq, width * bk)


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


def _gathered(t: torch.Tensor, tiles: torch.Tensor, block: int, heads: int) -> tuple[torch.Tensor, bool]:
    """Tiles ``tiles [Bg, Hg, n, W]`` of ``block`` positions of ``t [B, Hk, N, D]`` (``N`` a
    multiple of ``block``) as ``[n, B * Hk', W * block, D]`` and whether ``Hk'`` is still the
    key/value heads (one tile set for all: grouped-query attention stays in SDPA) or the
    query heads (tile sets per batch entry or head)."""
    batch, kv_heads, length, dim = t.shape
    count, width = tiles.shape[2:]
    rows = t.reshape(batch, kv_heads, length // block, block * dim)  # whole tiles: one copy per tile
    if tiles.shape[:2] == (1, 1):
        taken = rows.flatten(0, 1).index_select(1, tiles.flatten()).view(batch * kv_heads, count, width * block, dim)
        return taken.movedim(1, 0), True
    head_map = torch.arange(heads, device=t.device) // (heads // kv_heads)
    b = torch.arange(batch, device=t.device).view(batch, 1, 1, 1)
    taken = rows[b, head_map.view(1, heads, 1, 1), tiles.expand(batch, heads, -1, -1)]  # [B, H, n, W, bk*D]
    return taken.view(batch, heads, count, width * block, dim).movedim(2, 0).flatten(1, 2), False


def block_tile(pattern: n.Pattern) -> int | None:
    """The largest tile size of ``BLOCK_SIZES`` dividing the block size of every
    ``blocks(size)`` of a pattern made of whole-block patterns (``blocks`` combined by
    ``| & - ~`` and head groups), or None for any other pattern."""
    sizes = _block_sizes(mask_part(pattern))
    if not sizes:
        return None
    size = math.gcd(*sizes)
    fitting = [tile for tile in BLOCK_SIZES if size % tile == 0]
    return max(fitting) if fitting else None


def _block_sizes(node: n.Pattern) -> set[int] | None:
    """The sizes of the ``blocks`` a whole-block pattern is made of, or None."""
    if isinstance(node, n.Blocks):
        return {node.size}
    if not isinstance(node, (n.Union, n.Intersection, n.Difference, n.Complement, n.Heads)):
        return None
    sizes = [_block_sizes(child) for child in node.children()]
    return None if None in sizes else set().union(*sizes)


#: Tile sizes tried on patterns not made of whole blocks, with the plan's throughput per
#: computed pair on them relative to 128-token tiles, forward only and with gradients
#: (``TILE_THROUGHPUT[needs_grad][tile]``). Smaller tiles fit a diagonal band closer (a
#: window of ``w`` keys computes ``w + tile`` per row) at the same forward cost per pair;
#: with gradients each key slab's gradient is summed over the ``(w + tile) / tile`` query
#: tiles that read it, which small tiles pay for. Measured on ``window(128)``, 4,096
#: tokens, 8 heads, head dim 64, fp32, one thread (CPU time, 2026-12-05): forward 39.7 /
#: 42.9 / 54.0 ms for 1.18 / 1.31 / 1.57 M computed pairs a head on 32 / 64 / 128-token
#: tiles; forward+backward 267 / 221 / 203 ms.
TILE_THROUGHPUT = {False: {32: 1.0, 64: 1.0, 128: 1.0}, True: {32: 0.57, 64: 0.77, 128: 1.0}}

#: The largest tile grid :func:`finer_tile` classifies to compare a size (2,048 tiles a
#: side: 32-token tiles up to 65,536 tokens).
MAX_CHOICE_TILES = 1 << 22


def finer_tile(pattern: n.Pattern, call: Call, largest: int) -> int:
    """The tile size of :data:`TILE_THROUGHPUT` up to ``largest`` (or ``largest`` itself)
    whose groups cost least for ``call``: their computed pairs over the size's throughput,
    the larger size on ties. A size smaller than ``largest`` is tried only where its grid
    has at most :data:`MAX_CHOICE_TILES` tiles, and taken only where every group runs on
    views of the inputs and gathers no keys per span (a gathered group, or a band's tiles
    besides its run and columns, copies the keys of every query tile: copies that grow as
    the tiles shrink)."""
    throughput = TILE_THROUGHPUT[call.needs_grad]
    sizes = [t for t in throughput if t < largest and -(-call.q_len // t) * -(-call.kv_len // t) <= MAX_CHOICE_TILES]
    if not sizes:
        return largest

    def cost(tile: int) -> float:
        lowered = tiled(pattern, call, (tile, tile)).lowering
        groups = tile_groups(lowered.states, lowered.grid, merged=_merges(call, (tile, tile)))
        if tile < largest and any(group.runs is None or any(_part_tiles(o).shape[0] > 1 for o in group.others)
                                  for group in groups):
            return math.inf
        return computed_tiles(groups) * tile * tile / throughput.get(tile, 1.0)

    return min([largest, *sorted(sizes, reverse=True)], key=cost)


def computed_tiles(groups: list[TileGroup]) -> int:
    """The tiles the groups' kernels compute, other parts included (per batch entry and
    head of the states)."""
    return sum(g.rows.numel() * g.height * (g.tiles.shape[-1] + sum(o.tiles.shape[-1] for o in g.others))
               for g in groups)


def _merges(call: Call, tiles: tuple[int, int]) -> bool:
    """Whether band groups take other parts for ``call`` on ``tiles``: on the CPU (their
    kernels are the fused CPU attention's, with log-sum-exps), on grids of at most
    :data:`MAX_CHOICE_TILES` tiles (finding them reads every span's tiles a few times)."""
    return call.device.type == "cpu" and -(-call.q_len // tiles[0]) * -(-call.kv_len // tiles[1]) <= MAX_CHOICE_TILES


def output_order(groups: list[TileGroup], num_q_tiles: int) -> torch.Tensor | None:
    """For each query tile, its place among the groups' output tiles laid end to end and
    followed by one zero tile (the place of query tiles no group holds): int64
    ``[num_q_tiles]``, or None where that is every tile in order."""
    rows = torch.cat([g.tile_rows.cpu() for g in groups]) if groups else torch.empty(0, dtype=torch.int64)
    order = torch.full((num_q_tiles,), rows.numel(), dtype=torch.int64)
    order[rows] = torch.arange(rows.numel())
    if rows.numel() == num_q_tiles and torch.equal(order, torch.arange(num_q_tiles)):
        return None
    return order.to(groups[0].rows.device) if groups else order


def tile_sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, groups: list[TileGroup],
                        masks: list[GroupMasks], order: torch.Tensor | None, grid: TileGrid,
                        scale: float) -> torch.Tensor:
    """Attention of ``q [B, H, Q, D]`` over ``k [B, Hkv, K, D]``, ``v [B, Hkv, K, Dv]`` by
    the tile ``groups``, with ``masks`` (:func:`additive_masks`) and ``order``
    (:func:`output_order`); returns ``out [B, H, Q, Dv]``. On the CPU, where every group is
    views, with gradients or with other parts, it runs as
    :class:`~sparsedsl.plans.tile_sdpa_autograd.ViewGroupsAttention` (key/value heads
    repeated for grouped queries); else by SDPA (through autograd), a group with other
    parts by :func:`~sparsedsl.plans.tile_sdpa_autograd.view_group_forward`."""
    batch, heads, q_len, dim = q.shape
    kv_heads, kv_len, dv = k.shape[1], k.shape[2], v.shape[-1]
    nq, nk, bq, bk = grid.num_q_tiles, grid.num_kv_tiles, grid.q_block, grid.kv_block
    views = [None if g.runs is None else ViewGroup(
        SlabRuns.of(g.runs, g.rows.numel(), g.height * bq, g.tiles.shape[-1] * bk, q_len, kv_len), g.height,
        m.mask, m.keep, tuple(KeyPart(_part_tiles(o), *pm) for o, pm in zip(g.others, m.parts)), m.dead)
        for g, m in zip(groups, masks)]
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    merged = any(g.others for g in groups)
    if groups and q.device.type == "cpu" and None not in views and (grad or merged):
        keys, values = (k, v) if kv_heads == heads else (_per_query_head(t, heads) for t in (k, v))
        return ViewGroupsAttention.apply(q, keys, values, views, (order, bq, bk, nq), scale)
    padded = None  # (q, k, v) padded to whole tiles: made for the first gathered group
    pads = {}  # (input, before, past) -> the input padded so: made once per call
    outs = []  # each group's output, tile-major: [n * height, B*H, bq, Dv]
    for group, view, (mask, keep, *_) in zip(groups, views, masks):
        count, chunk = group.rows.numel(), group.height * bq
        if view is not None and view.parts:  # fused kernels with log-sum-exps, merged
            keys, values = (k, v) if kv_heads == heads else (_per_query_head(t, heads) for t in (k, v))
            outs.append(tile_major(view_group_forward(q, keys, values, view, bk, scale, pads)[2], group.height, bq))
            continue
        if view is not None:  # views of the inputs: [n, B*H, height*bq, D], [n, B*Hkv, W*bk, D]
            qg, keys, values = view.runs.queries(q, pads), view.runs.keys(k, pads), view.runs.keys(v, pads)
            gqa = kv_heads != heads
        else:
            padded = padded or (F.pad(q, (0, 0, 0, nq * bq - q_len)), F.pad(k, (0, 0, 0, nk * bk - kv_len)),
                                F.pad(v, (0, 0, 0, nk * bk - kv_len)))
            qp, kp, vp = padded
            qg = qp.reshape(batch * heads, nq, bq * dim).index_select(1, group.tile_rows) \
                .view(batch * heads, count, chunk, dim).movedim(1, 0)
            (keys, shared), (values, _) = (_gathered(t, group.tiles, bk, heads) for t in (kp, vp))
            gqa = shared and kv_heads != heads
        out = F.scaled_dot_product_attention(qg, keys, values, attn_mask=mask, scale=scale, enable_gqa=gqa)
        if keep is not None:
            out = out * keep
        outs.append(tile_major(out, group.height, bq))
    if not groups:
        out = assemble([], order, q, q_len, bq, nq, dv)
        # No pair at all: zeros that still reach the inputs.
        return out + 0.0 * (q.sum() + k.sum() + v.sum()) if torch.is_grad_enabled() else out
    return assemble(outs, order, q, q_len, bq, nq, dv)


def _part_tiles(part: TileGroup) -> torch.Tensor:
    """A part's key tiles as :class:`~sparsedsl.plans.tile_sdpa_autograd.KeyPart` takes
    them: ``[1, T]`` where every span sees the same, else ``[n, T]``."""
    tiles = part.tiles[0, 0]
    return tiles[:1] if bool((tiles == tiles[:1]).all()) else tiles


def _per_query_head(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Key/value heads ``t [B, Hkv, K, D]`` repeated for the ``heads`` query heads that
    read them."""
    return t.repeat_interleave(heads // t.shape[1], 1)


class GroupMasks(NamedTuple):
    """A group's masks for a call: the additive ``mask`` of its tiles (0 allowed, -inf
    masked; None: every tile full) and ``keep`` (:func:`group_mask`); for a group with
    other parts, ``keep`` is None, and ``parts`` gives each part's additive mask and the
    rows it leaves without keys, and ``dead`` the rows the group's own tiles leave
    (:class:`~sparsedsl.plans.tile_sdpa_autograd.ViewGroup`)."""

    mask: torch.Tensor | None
    keep: torch.Tensor | None
    parts: tuple[tuple[torch.Tensor | None, torch.Tensor | None], ...] = ()
    dead: torch.Tensor | None = None


def additive_masks(groups: list[TileGroup], grid: TileGrid, mask_mod, batch: int, heads: int,
                   dtype: torch.dtype) -> list[GroupMasks]:
    """Per group, its :class:`GroupMasks` for a call of ``batch`` x ``heads`` in
    ``dtype``: boolean masks as SDPA's additive float masks (SDPA then adds them without
    converting a boolean one each call)."""
    masks = []
    for group in groups:
        dims = group.tiles.shape[:2]
        if not group.others:
            mask, keep = group_mask(group, grid, mask_mod)
            keep = _per_call(keep, dims, batch, heads)
            masks.append(GroupMasks(_additive(_per_call(mask, dims, batch, heads), dtype),
                                    None if keep is None else keep.to(dtype)))
            continue
        own, *parts = [tile_mask(part, grid, mask_mod) for part in (group, *group.others)]
        masks.append(GroupMasks(_additive(own, dtype), None, tuple((_additive(m, dtype), _dead(m)) for m in parts),
                                _dead(own)))
    return masks


def _dead(mask: torch.Tensor | None) -> torch.Tensor | None:
    """The rows a boolean mask leaves without keys (None: a mask of full tiles)."""
    return None if mask is None else ~mask.any(-1)


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean mask as an additive one in ``dtype`` (0 allowed, -inf masked)."""
    if mask is None:
        return None
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def _per_call(t: torch.Tensor | None, state_dims, batch: int, heads: int) -> torch.Tensor | None:
    """A group tensor ``[n, Bg * Hg, ...]`` (``state_dims = (Bg, Hg)``, each 1 or the
    call's) broadcastable to ``[n, B * H, ...]``."""
    bg, hg = state_dims
    if t is None or bg * hg == 1 or (bg, hg) == (batch, heads):
        return t
    return t.unflatten(1, (bg, hg)).expand(-1, batch, heads, *t.shape[2:]).flatten(1, 2)


class TileSdpaPlan(Plan):
    """Block-sparse attention as fused SDPA calls on gathered key tiles (see the module
    docstring)."""

    name = "tile_sdpa"

    def not_supported(self, pattern: n.Pattern, call: Call) -> list[str]:
        reasons = []
        if score_mods(pattern):
            reasons.append("score modifications (the fused kernel takes only a mask)")
        if call.return_lse:
            reasons.append("SDPA returns no log-sum-exp (return_lse)")
        if call.decoding:
            reasons.append("a decoding step: the decode plan runs the kernel from cached tile rows")
        return reasons

    def tiles(self, pattern: n.Pattern, call: Call) -> tuple[int, int]:
        """Square tiles of the call's size or smaller: as small as the pattern's blocks when
        it is made of whole blocks smaller than them (tiles that cross no block boundary
        compute no pair outside the live blocks; see :func:`block_tile`), else the size of
        :data:`FINER_TILES` at most the call's whose live tiles cost least (see
        :func:`finer_tile`)."""
        call_tile = min(call.q_block, call.kv_block)
        tile = block_tile(pattern)
        if tile is None:
            tile = finer_tile(pattern, call, call_tile)
        return (tile, tile) if tile < call_tile else (call.q_block, call.kv_block)

    def prepare(self, pattern: n.Pattern, call: Call) -> tuple[Tiled, list[TileGroup]]:
        prepared = tiled(pattern, call, self.tiles(pattern, call))
        lowered = prepared.lowering
        grid = lowered.grid
        return prepared, tile_groups(lowered.states, grid, merged=_merges(call, (grid.q_block, grid.kv_block)))

    def efficiency(self, call: Call) -> float | None:
        """:data:`CPU_EFFICIENCY` on the CPU; not measured on CUDA, where FlexAttention's
        block-sparse kernel runs."""
        return CPU_EFFICIENCY if call.device.type == "cpu" else None

    def computed_pairs(self, prepared, call: Call, planner) -> int:
        tiled_, groups = prepared
        grid = tiled_.lowering.grid
        batch = tiled_.lowering.states.shape[0]
        return computed_tiles(groups) * grid.q_block * grid.kv_block * call.heads * batch

    def build(self, prepared, call: Call, planner) -> Runner:
        tiled_, groups = prepared
        check_batch(call, tiled_.lowering.states)
        grid, scale = tiled_.lowering.grid, call.scale
        lowered = tiled_.lowering
        masks = additive_masks(groups, lowered.grid, lowered.mask_mod, call.batch, call.heads, call.dtype)
        order = output_order(groups, grid.num_q_tiles)
        return lambda q, k, v, _: (tile_sdpa_attention(q, k, v, groups=groups, masks=masks, order=order,
                                                       grid=grid, scale=scale), None)

    def describe(self, prepared, call: Call) -> str:
        groups = prepared[1]
        viewed = sum(g.runs is not None for g in groups)
        merged = sum(bool(g.others) for g in groups)
        return (f"fused SDPA on key tiles: {len(groups)} groups of query tiles by key run or live-tile count "
                f"({viewed} as views, {merged} with other tiles merged by log-sum-exp), masked on partial tiles only")
