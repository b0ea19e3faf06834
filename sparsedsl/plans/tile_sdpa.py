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

    @property
    def tile_rows(self) -> torch.Tensor:
        """Every query tile of the group, span by span: ``[n * height]``."""
        return (self.rows[:, None] + torch.arange(self.height, device=self.rows.device)).flatten()


def tile_groups(states: torch.Tensor, grid: TileGrid) -> list[TileGroup]:
    """The groups of ``states`` (``[Bg, Hg, nq, nk]``) on ``grid``."""
    live = states != EMPTY
    # Spans: runs of consecutive query tiles with the same live key tiles in every (batch, head).
    same = (live[..., 1:, :] == live[..., :-1, :]).flatten(0, 1).all(0).all(-1)    # [nq - 1]
    first = torch.cat([torch.ones(1, dtype=torch.bool, device=states.device), ~same]).nonzero().flatten()
    heights = torch.diff(first, append=torch.tensor([states.shape[-2]], device=states.device))
    span_live = live if len(first) == live.shape[-2] else live[:, :, first]       # [Bg, Hg, S, nk]
    counts = row_counts(span_live)                                                 # [Bg, Hg, S]
    widths = counts.amax((0, 1))                                                   # a span's widest (b, h)
    groups = []
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
    """``(mask, keep)`` of a group: its SDPA mask ``[n, Bg * Hg, height * q_block, width *
    kv_block]`` (None: every tile full), evaluated by ``mask_mod`` (on row indices) on the
    partial tiles only, and ``keep`` ``[n, Bg * Hg, height * q_block, 1]`` float, 0 on rows
    that see no key (None: every row sees one)."""
    rows, height, tiles, span_states = group.rows, group.height, group.tiles, group.states
    bg, hg, count, width = tiles.shape
    bq, bk = grid.q_block, grid.kv_block
    if bool((span_states == FULL).all()):
        return None, None
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
    empty = ~mask.any(-1, keepdim=True)                                            # rows that see no key
    keep = None
    if bool(empty.any()):
        mask[..., :1] |= empty  # one masked-in key; the row's output is then multiplied by 0
        keep = (~empty).to(torch.float32)
    return mask, keep


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
    if not arithmetic or q_step < 1 or k_step < 1 or (int(rows[-1]) + height) * grid.q_block > grid.rows \
            or (int(starts[-1]) + width) * grid.kv_block > grid.kv_len:
        return None
    return (int(rows[0]) * grid.q_block, q_step * grid.q_block, int(starts[0]) * grid.kv_block,
            k_step * grid.kv_block)


def _slabs(t: torch.Tensor, first: int, count: int, chunk: int, stride: int) -> torch.Tensor:
    """``count`` slabs of ``chunk`` positions of ``t [B, H, N, D]``, slab ``i`` from
    ``first + i * stride``, as ``[count, B * H, chunk, D]``: views (``unfold``, whose
    backward sums overlapping slabs' gradients) where batch and heads merge."""
    span = t[:, :, first:first + (count - 1) * stride + chunk]
    return span.unfold(2, chunk, stride).transpose(-1, -2).movedim(2, 0).flatten(1, 2)


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


def tile_sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, groups: list[TileGroup],
                        masks: list, grid: TileGrid, scale: float) -> torch.Tensor:
    """Attention of ``q [B, H, Q, D]`` over ``k [B, Hkv, K, D]``, ``v [B, Hkv, K, Dv]`` by
    the tile ``groups``, with ``masks`` (:func:`additive_masks`: each group's mask as an
    additive float mask for SDPA, per call's batch and heads); returns ``out [B, H, Q, Dv]``."""
    batch, heads, q_len, dim = q.shape
    kv_heads, kv_len, dv = k.shape[1], k.shape[2], v.shape[-1]
    nq, nk, bq, bk = grid.num_q_tiles, grid.num_kv_tiles, grid.q_block, grid.kv_block
    padded = None  # (q, k, v) padded to whole tiles: made for the first gathered group
    spans = {}  # first query tile of a span -> its output [B*H, height*bq, Dv]
    for group, (mask, keep) in zip(groups, masks):
        count, chunk = group.rows.numel(), group.height * bq
        if group.runs is not None:  # views of the inputs: [n, B*H, height*bq, D], [n, B*Hkv, W*bk, D]
            q_first, q_stride, k_first, k_stride = group.runs
            qg = _slabs(q, q_first, count, chunk, q_stride)
            keys, values = (_slabs(t, k_first, count, group.tiles.shape[-1] * bk, k_stride) for t in (k, v))
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
        spans.update(zip(group.rows.tolist(), out.unbind(0)))
    # The output in query order: each span's rows, and zeros for query tiles that see no key tile.
    pieces, row = [], 0
    for first in sorted(spans):
        if first > row:
            pieces.append(q.new_zeros(batch * heads, (first - row) * bq, dv))
        pieces.append(spans[first])
        row = first + spans[first].shape[1] // bq
    if row < nq or not pieces:
        pieces.append(q.new_zeros(batch * heads, (nq - row) * bq, dv))
    out = torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0]
    if not spans and torch.is_grad_enabled():  # no pair at all: zeros that still reach the inputs
        out = out + 0.0 * (q.sum() + k.sum() + v.sum())
    return out.view(batch, heads, nq * bq, dv)[:, :, :q_len]


def additive_masks(groups: list[TileGroup], grid: TileGrid, mask_mod, batch: int, heads: int,
                   dtype: torch.dtype):
    """Per group, ``(mask, keep)`` (:func:`group_mask`) for a call of ``batch`` x ``heads``
    in ``dtype``: the boolean mask as SDPA's additive float mask (0 allowed, -inf masked:
    SDPA then adds it without converting a boolean one each call), and ``keep`` in
    ``dtype``; None where the group has none."""
    masks = []
    for group in groups:
        dims = group.tiles.shape[:2]
        mask, keep = group_mask(group, grid, mask_mod)
        mask = _per_call(mask, dims, batch, heads)
        if mask is not None:
            mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
        keep = _per_call(keep, dims, batch, heads)
        masks.append((mask, None if keep is None else keep.to(dtype)))
    return masks


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
        """The module's tiles, made as small as the pattern's blocks when it is made of
        whole blocks smaller than them (tiles that cross no block boundary compute no pair
        outside the live blocks); see :func:`block_tile`."""
        tile = block_tile(pattern)
        if tile is None or tile >= min(call.q_block, call.kv_block):
            return call.q_block, call.kv_block
        return tile, tile

    def prepare(self, pattern: n.Pattern, call: Call) -> tuple[Tiled, list[TileGroup]]:
        prepared = tiled(pattern, call, self.tiles(pattern, call))
        lowered = prepared.lowering
        return prepared, tile_groups(lowered.states, lowered.grid)

    def efficiency(self, call: Call) -> float | None:
        """:data:`CPU_EFFICIENCY` on the CPU; not measured on CUDA, where FlexAttention's
        block-sparse kernel runs."""
        return CPU_EFFICIENCY if call.device.type == "cpu" else None

    def computed_pairs(self, prepared, call: Call, planner) -> int:
        tiled_, groups = prepared
        grid = tiled_.lowering.grid
        batch = tiled_.lowering.states.shape[0]
        return sum(g.rows.numel() * g.height * g.tiles.shape[-1] for g in groups) * grid.q_block \
            * grid.kv_block * call.heads * batch

    def build(self, prepared, call: Call, planner) -> Runner:
        tiled_, groups = prepared
        check_batch(call, tiled_.lowering.states)
        grid, scale = tiled_.lowering.grid, call.scale
        lowered = tiled_.lowering
        masks = additive_masks(groups, lowered.grid, lowered.mask_mod, call.batch, call.heads, call.dtype)
        return lambda q, k, v, _: (tile_sdpa_attention(q, k, v, groups=groups, masks=masks, grid=grid,
                                                       scale=scale), None)

    def describe(self, prepared, call: Call) -> str:
        groups = prepared[1]
        viewed = sum(g.runs is not None for g in groups)
        return (f"fused SDPA on key tiles: {len(groups)} groups of query tiles by live-tile count ({viewed} "
                f"as views), masked on partial tiles only")
