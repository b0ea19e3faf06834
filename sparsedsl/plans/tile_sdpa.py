"""The *tile_sdpa* plan: block-sparse attention as fused SDPA calls on key-tile slabs.

The query tiles of the tile grid are gathered into groups (:mod:`~sparsedsl.plans.
tile_groups`): bands of spans whose keys are a run moving with the queries, those bands'
other tiles (global columns, random blocks) merged by log-sum-exp, and the other spans by
their number of live tiles. Each group runs as **one** call of PyTorch's fused attention,
its spans folded into the kernel's batch dimension, on views of the inputs where its spans
are arithmetic runs and on gathered tiles otherwise: the scores are never materialised,
and no row is padded to a wider one. A group's mask (:mod:`~sparsedsl.plans.tile_masks`)
is built once, when the runner is built, and only where the group has partial tiles: the
``mask_mod`` is evaluated on the partial tiles alone, full tiles are allowed whole, and a
group of full tiles runs unmasked. Tiles are as small as the blocks of a whole-block
pattern, else 32, 64 or 128 tokens, whichever costs least (:func:`finer_tile`).

Query rows that see no key output 0. With gradients on the CPU, where every group is
views, one autograd function runs the kernel's own backward on the slabs
(:mod:`~sparsedsl.plans.tile_sdpa_autograd`); otherwise gradients flow by autograd
through SDPA's fused backward and the gathers. The plan computes exactly the pairs of its
groups' tiles, whole.

It has no score modification (the fused kernel takes only a mask) and returns no
log-sum-exp.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..lang import nodes as n
from ..lang.queries import score_mods
from ..passes.tiles import TileGrid
from .base import Call, Plan, Runner
from .fused_attention import same_head_dim
from .kernels import per_query_head
from .tiled import Tiled, block_tile, check_batch, tiled
from .tile_groups import TileGroup, computed_pairs, part_tiles, tile_groups, tiles_held_by_none
from .tile_masks import GroupMasks, additive_masks, split_rows, with_columns
from .tile_sdpa_autograd import KeyPart, ViewGroup, ViewGroupsAttention
from .tile_slabs import SlabRuns, new_output, write_tiles

#: Throughput per computed pair relative to the gather plan on the CPU: 136k-196k pairs per
#: CPU-ms on windows and block windows against the gather plan's 22k
#: (``benchmarks/plan_efficiency.py``, 2 cores, torch 2.13, fp32, 8 heads, head dim 64,
#: 4,096 tokens): fused SDPA on slabs against the gather plan's matmul, mask and softmax.
CPU_EFFICIENCY = 7.0


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
        if tile < largest and any(group.runs is None or any(part_tiles(o).shape[0] > 1 for o in group.others)
                                  for group in groups):
            return math.inf
        return computed_pairs(groups, lowered.grid) / throughput.get(tile, 1.0)

    return min([largest, *sorted(sizes, reverse=True)], key=cost)


def _merges(call: Call, tiles: tuple[int, int]) -> bool:
    """Whether band groups take other parts for ``call`` on ``tiles``: on the CPU (their
    kernels are the fused CPU attention's, with log-sum-exps), on grids of at most
    :data:`MAX_CHOICE_TILES` tiles (finding them reads every span's tiles a few times)."""
    return call.device.type == "cpu" and -(-call.q_len // tiles[0]) * -(-call.kv_len // tiles[1]) <= MAX_CHOICE_TILES


def view_groups(groups: list[TileGroup], masks: list[GroupMasks], grid: TileGrid, q_len: int,
                kv_len: int) -> list[ViewGroup | None]:
    """Each group as :class:`~sparsedsl.plans.tile_sdpa_autograd.ViewGroup` for ``q_len``
    queries over ``kv_len`` keys (None for a gathered group), made once per runner."""
    bq, bk = grid.q_block, grid.kv_block
    views = []
    for g, m in zip(groups, masks):
        if g.runs is None:
            views.append(None)
            continue
        q_first, q_stride, k_first, k_stride = g.runs
        first_row, last_row = g.q_rows or (0, g.height * bq)
        runs = SlabRuns.of((q_first + first_row, q_stride, k_first, k_stride), g.rows.numel(), last_row - first_row,
                           g.tiles.shape[-1] * bk, q_len, kv_len)
        parts = tuple(KeyPart.of(part_tiles(o), o.columns, *pm, runs, bk, kv_len) for o, pm in zip(g.others, m.parts))
        views.append(ViewGroup(runs, m.mask, m.keep, parts, m.dead))
    return views


def tile_sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, groups: list[TileGroup],
                        masks: list[GroupMasks], views: list[ViewGroup | None],
                        unheld: tuple[tuple[tuple[int, int], ...], ...], grid: TileGrid,
                        scale: float) -> torch.Tensor:
    """Attention of ``q [B, H, Q, D]`` over ``k [B, Hkv, K, D]``, ``v [B, Hkv, K, Dv]`` by
    the tile ``groups``, with ``masks`` (:func:`additive_masks`), ``views``
    (:func:`view_groups`) and ``unheld``, the query tiles held by no group and by no view
    group (:func:`~sparsedsl.plans.tile_groups.tiles_held_by_none`); returns ``out [B, H,
    Q, Dv]``. The groups write into one output buffer: slabs of it, or their query tiles.
    On the CPU with gradients or other parts, the view groups run as
    :class:`~sparsedsl.plans.tile_sdpa_autograd.ViewGroupsAttention` (key/value heads
    repeated for grouped queries) and gathered groups by SDPA through autograd, written
    over its output; else every group by SDPA."""
    batch, heads, q_len, dim = q.shape
    kv_heads, dv = k.shape[1], v.shape[-1]
    nq, bq, bk = grid.num_q_tiles, grid.q_block, grid.kv_block
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if not groups:  # no pair at all: zeros that still reach the inputs
        out = q.new_zeros(batch, heads, q_len, dv)
        return out + 0.0 * (q.sum() + k.sum() + v.sum()) if grad else out
    held_by_none, held_by_no_view = unheld
    # The groups run by SDPA: gathered ones, or all.
    gathered = [(group, view, mask) for group, view, mask in zip(groups, views, masks) if view is None]
    if q.device.type == "cpu" and len(gathered) < len(groups) and (grad or any(g.others for g in groups)):
        keys, values = (per_query_head(t, heads // kv_heads) for t in (k, v))
        out = ViewGroupsAttention.apply(*same_head_dim(q, keys, values), [view for view in views if view is not None],
                                        (held_by_no_view, bq, bk, nq), scale)
        out = out if out.shape[-1] == dv else out[..., :dv]
    else:
        out, gathered = new_output(q, nq, bq, dv, held_by_none), list(zip(groups, views, masks))
    pads, padded = {}, []  # inputs padded: at the ends of view slabs; to whole tiles for gathers
    for group, view, (mask, keep, *_) in gathered:
        if view is not None:  # views of the inputs: [n, B*H, height*bq, D], [n, B*Hkv, W*bk, D]
            qg, keys, values = view.runs.queries(q, pads), view.runs.keys(k, pads), view.runs.keys(v, pads)
            gqa = kv_heads != heads
        else:
            padded = padded or [F.pad(t, (0, 0, 0, -t.shape[2] % block)) for t, block in ((q, bq), (k, bk), (v, bk))]
            qp, kp, vp = padded
            qg = qp.reshape(batch * heads, nq, bq * dim).index_select(1, group.tile_rows) \
                .view(batch * heads, group.rows.numel(), group.height * bq, dim).movedim(1, 0)
            (keys, shared), (values, _) = (_gathered(t, group.tiles, bk, heads) for t in (kp, vp))
            gqa = shared and kv_heads != heads
        result = F.scaled_dot_product_attention(qg, keys, values, attn_mask=mask, scale=scale, enable_gqa=gqa)
        result = result if keep is None else result * keep
        if view is not None:
            view.runs.output(out).copy_(result)
        else:
            out = write_tiles(out, group.tile_rows, result, group.height)
    return out if out.shape[2] == q_len else out[:, :, :q_len]


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
        groups = tile_groups(lowered.states, grid, merged=_merges(call, (grid.q_block, grid.kv_block)))
        return prepared, split_rows(with_columns(groups, grid, lowered.mask_mod), grid, lowered.mask_mod)

    def efficiency(self, call: Call) -> float | None:
        """:data:`CPU_EFFICIENCY` on the CPU; not measured on CUDA, where FlexAttention's
        block-sparse kernel runs."""
        return CPU_EFFICIENCY if call.device.type == "cpu" else None

    def computed_pairs(self, prepared, call: Call, planner) -> int:
        tiled_, groups = prepared
        grid = tiled_.lowering.grid
        batch = tiled_.lowering.states.shape[0]
        return computed_pairs(groups, grid) * call.heads * batch

    def build(self, prepared, call: Call, planner) -> Runner:
        tiled_, groups = prepared
        check_batch(call, tiled_.lowering.states)
        grid, scale = tiled_.lowering.grid, call.scale
        lowered = tiled_.lowering
        masks = additive_masks(groups, lowered.grid, lowered.mask_mod, call.batch, call.heads, call.dtype)
        views = view_groups(groups, masks, grid, call.q_len, call.kv_len)
        unheld = (tiles_held_by_none(groups, grid.num_q_tiles),
                  tiles_held_by_none([g for g, view in zip(groups, views) if view is not None], grid.num_q_tiles))
        return lambda q, k, v, _: (tile_sdpa_attention(q, k, v, groups=groups, masks=masks, views=views,
                                                       unheld=unheld, grid=grid, scale=scale), None)

    def describe(self, prepared, call: Call) -> str:
        groups = prepared[1]
        viewed = sum(g.runs is not None for g in groups)
        merged = sum(bool(g.others) for g in groups)
        return (f"fused SDPA on key tiles: {len(groups)} groups of query tiles by key run or live-tile count "
                f"({viewed} as views, {merged} with other tiles merged by log-sum-exp), masked on partial tiles only")
