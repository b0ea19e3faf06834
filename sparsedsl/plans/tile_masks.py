"""Masks of the tile_sdpa plan's groups: the boolean mask of a group's tiles, evaluated
by the pattern's ``mask_mod`` on partial tiles only, and the additive float masks a call's
kernels take."""

from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

import torch

from ..budget import check_memory
from ..passes.refine import EVALUATION_BUDGET
from ..passes.tiles import FULL, PARTIAL, TileGrid
from .tile_groups import TileGroup, part_tiles


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


def with_columns(groups: list[TileGroup], grid: TileGrid, mask_mod) -> list[TileGroup]:
    """The groups, each other part whose spans all see the same tiles (global columns)
    given the ``columns`` some row allows where that is not all of them: its kernel then
    computes those keys alone."""
    trimmed = []
    for group in groups:
        others = []
        for part in group.others:
            mask = tile_mask(part, grid, mask_mod) if part_tiles(part).shape[0] == 1 else None
            allowed = None if mask is None else mask.flatten(0, 2).any(0)
            if allowed is not None and bool(allowed.any()) and not bool(allowed.all()):
                part = replace(part, columns=allowed.nonzero().flatten())
            others.append(part)
        trimmed.append(replace(group, others=tuple(others)) if others else group)
    return trimmed


#: A group of one span is split by rows (:func:`split_rows`) only where that computes at
#: most this fraction of its pairs (a second kernel call has its own cost).
ROW_SPLIT_GAIN = 0.75


def split_rows(groups: list[TileGroup], grid: TileGrid, mask_mod) -> list[TileGroup]:
    """The groups, each group of one span on views (no other parts) on the key tiles its
    rows see: cut to the run of tiles some row sees, or, where its rows see keys of very
    different extents (global rows in a tile of window rows), split in two at the row that
    computes fewest pairs, rows ``[0, r)`` on the run of tiles they see and rows ``[r,
    height * q_block)`` on theirs (:attr:`TileGroup.q_rows`). Split only where both halves
    see keys and that computes at most :data:`ROW_SPLIT_GAIN` of the pairs of the cut
    group."""
    split = []
    for group in groups:
        pieces = _row_pieces(group, grid, mask_mod)
        split += [group] if pieces is None else pieces
    return split


def _row_pieces(group: TileGroup, grid: TileGrid, mask_mod) -> list[TileGroup] | None:
    """:func:`split_rows` of one group: its pieces, or None to keep it as it is."""
    if group.rows.numel() != 1 or group.runs is None or group.others or group.q_rows is not None:
        return None
    width = group.tiles.shape[-1]
    mask = tile_mask(group, grid, mask_mod) if width > 1 else None
    if mask is None:
        return None
    sees = mask.flatten(0, 1).any(0).unflatten(-1, (width, grid.kv_block)).any(-1)  # [rows, W] tiles a row sees
    rows = sees.shape[0]
    index = torch.arange(width, device=sees.device)
    lo = torch.where(sees, index, width).amin(-1)                                    # width where no key
    hi = torch.where(sees, index + 1, 0).amax(-1)
    if int(hi.max()) == 0:
        return None
    run = lambda lo_, hi_: (hi_ - lo_).clamp(min=0)
    first_lo, first_hi = lo.cummin(0).values, hi.cummax(0).values                    # rows [0, r]
    last_lo, last_hi = lo.flip(0).cummin(0).values.flip(0), hi.flip(0).cummax(0).values.flip(0)  # rows [r, R)
    whole = rows * int(run(first_lo[-1], first_hi[-1]))
    cut = torch.arange(1, rows, device=sees.device)
    cost = cut * run(first_lo[:-1], first_hi[:-1]) + (rows - cut) * run(last_lo[1:], last_hi[1:])
    cost = torch.where((first_hi[:-1] > 0) & (last_hi[1:] > 0), cost, whole)         # each half sees a key
    best = int(cost.argmin()) if rows > 1 else 0
    if rows > 1 and int(cost[best]) <= ROW_SPLIT_GAIN * whole:
        r = best + 1
        pieces = (((0, r), first_lo[r - 1], first_hi[r - 1]), ((r, rows), last_lo[r], last_hi[r]))
    elif whole < rows * width:
        pieces = (((0, rows), first_lo[-1], first_hi[-1]),)
    else:
        return None
    q_first, q_stride, k_first, k_stride = group.runs
    return [replace(group, tiles=group.tiles[..., int(t_lo):int(t_hi)], states=group.states[..., int(t_lo):int(t_hi)],
                    runs=(q_first, q_stride, k_first + int(t_lo) * grid.kv_block, k_stride),
                    q_rows=None if q_rows == (0, rows) else q_rows)
            for q_rows, t_lo, t_hi in pieces]


def tile_mask(group: TileGroup, grid: TileGrid, mask_mod) -> torch.Tensor | None:
    """A group's SDPA mask ``[n, Bg * Hg, height * q_block, width * kv_block]`` (None:
    every tile full), evaluated by ``mask_mod`` (on row indices) on the partial tiles only;
    only its ``q_rows`` where it has them."""
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
    mask = mask.permute(2, 0, 1, 3, 5, 4, 6).reshape(count, bg * hg, height * bq, width * bk)
    return mask if group.q_rows is None else mask[:, :, group.q_rows[0]:group.q_rows[1]]


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
        parts = [m if m is None or o.columns is None else m[..., o.columns] for m, o in zip(parts, group.others)]
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
