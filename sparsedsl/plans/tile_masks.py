"""Masks of the tile_sdpa plan's groups: the boolean mask of a group's tiles, evaluated
by the pattern's ``mask_mod`` on partial tiles only, and the additive float masks a call's
kernels take."""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..budget import check_memory
from ..passes.refine import EVALUATION_BUDGET
from ..passes.tiles import FULL, PARTIAL, TileGrid
from .tile_groups import TileGroup


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
