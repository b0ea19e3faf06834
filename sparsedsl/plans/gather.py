"""The *gather* plan: block-sparse attention written in plain PyTorch operations.

For each query tile, the key/value tiles its row of the tile grid does not leave empty are
gathered into one contiguous block, scored with one batched matmul, masked with the
pattern's ``mask_mod`` and normalised with one softmax per query row. It runs on every
device and dtype (float64 included) and is differentiable by autograd, so it is the plan
for training on the CPU, where FlexAttention has no backward.

Query-tile rows are processed in chunks of rows with similar numbers of live tiles (rows
sorted by that number), each chunk as wide as its widest row, so a few dense rows (global
tokens) do not widen every row; memory is bounded by the chunk size.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..lang import nodes as n
from ..passes.blockmask import ordered_indices
from ..passes.tiles import EMPTY, TileGrid, row_counts
from .base import Call, Plan, Runner
from .kernels import masked_attention
from .tiled import Tiled, call_score_mod, check_batch, tiled

#: Score elements held at once per chunk of query-tile rows.
SCORE_BUDGET = 1 << 24


def gather_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, states: torch.Tensor,
                     grid: TileGrid, mask_mod: Callable, score_mod: Callable | None,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q [B, H, Q, D]`` over ``k [B, Hkv, K, D]``, ``v [B, Hkv, K, Dv]``
    (``H`` a multiple of ``Hkv``) restricted to the non-empty tiles of ``states``
    (``[B or 1, H or 1, nq, nk]``). Returns ``(out [B, H, Q, Dv], lse [B, H, Q])``."""
    batch, heads, q_len, _ = q.shape
    kv_heads, dv = k.shape[1], v.shape[-1]
    nq, nk, bq, bk = grid.num_q_tiles, grid.num_kv_tiles, grid.q_block, grid.kv_block
    device, dtype = q.device, q.dtype

    live = states != EMPTY
    counts, kv_tiles = ordered_indices(live)
    kv_tiles = kv_tiles.long()
    tile_rank = torch.arange(nk, device=device)

    # Half-precision inputs are computed in float32; float32 and float64 as they are.
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k, v = q.to(compute), k.to(compute), v.to(compute)
    head_map = torch.arange(heads, device=device) // (heads // kv_heads)
    q_tiles = F.pad(q, (0, 0, 0, nq * bq - q_len)).view(batch, heads, nq, bq, -1)
    k_tiles = F.pad(k, (0, 0, 0, nk * bk - k.shape[2])).view(batch, kv_heads, nk, bk, -1)[:, head_map]
    v_tiles = F.pad(v, (0, 0, 0, nk * bk - v.shape[2])).view(batch, kv_heads, nk, bk, -1)[:, head_map]

    b_idx = torch.arange(batch, device=device).view(batch, 1, 1, 1)
    h_idx = torch.arange(heads, device=device).view(1, heads, 1, 1)
    q_offsets = torch.arange(bq, device=device)
    k_offsets = torch.arange(bk, device=device)

    outs, lses, order = [], [], []
    for rows, width in row_chunks(counts, batch * heads * bq * bk):
        tiles = kv_tiles[:, :, rows, :width].expand(batch, heads, -1, -1)  # [B, H, R, W]
        used = tile_rank[:width] < counts[:, :, rows, None].long()         # [Bg, Hg, R, W]
        keys = k_tiles[b_idx, h_idx, tiles].flatten(3, 4)    # [B, H, R, W*bk, D]
        values = v_tiles[b_idx, h_idx, tiles].flatten(3, 4)  # [B, H, R, W*bk, Dv]
        scores = (q_tiles[:, :, rows] @ keys.transpose(-1, -2)) * scale  # [B, H, R, bq, W*bk]

        q_pos = (rows[:, None] * bq + q_offsets)[None, None, :, :, None]
        k_pos = (tiles[..., None] * bk + k_offsets).flatten(3)[:, :, :, None, :]
        b5, h5 = b_idx[..., None], h_idx[..., None]
        q_safe, k_safe = q_pos.clamp(max=q_len - 1), k_pos.clamp(max=k.shape[2] - 1)
        allowed = mask_mod(b5, h5, q_safe, k_safe) & (q_pos < q_len) & (k_pos < k.shape[2])
        allowed = allowed & used.repeat_interleave(bk, dim=-1)[:, :, :, None, :]
        if score_mod is not None:
            scores = score_mod(scores, b5, h5, q_safe, k_safe)
        out, lse = masked_attention(scores, allowed, values)
        outs.append(out)
        lses.append(lse)
        order.append(rows)
    inverse = torch.argsort(torch.cat(order))
    out = torch.cat(outs, dim=2)[:, :, inverse].reshape(batch, heads, nq * bq, dv)[:, :, :q_len]
    lse = torch.cat(lses, dim=2)[:, :, inverse].reshape(batch, heads, nq * bq)[:, :, :q_len]
    return out.to(dtype), lse


def row_chunks(counts: torch.Tensor, row_cost: int, budget: int = SCORE_BUDGET):
    """``(rows, width)`` chunks of query-tile rows: rows sorted by their live-tile count
    (the largest over batch and heads of ``counts [Bg, Hg, nq]``), each chunk holding at
    most ``budget`` score elements at ``row_cost * width`` per row, ``width`` the widest
    row of the chunk (at least 1)."""
    widest = counts.amax((0, 1)).long().clamp(min=1)
    order = torch.argsort(widest, stable=True)
    widths = widest[order].tolist()
    start = 0
    while start < len(widths):
        stop = start + 1
        while stop < len(widths) and (stop + 1 - start) * widths[stop] * row_cost <= budget:
            stop += 1
        yield order[start:stop], widths[stop - 1]
        start = stop


class GatherPlan(Plan):
    """Block-sparse attention in plain PyTorch operations (see the module docstring)."""

    name = "gather"
    double_backward = True
    lse_gradient = True

    def not_supported(self, pattern: n.Pattern, call: Call) -> list[str]:
        if call.decoding:
            return ["a decoding step: the decode plan runs the kernel from cached tile rows"]
        return []

    def prepare(self, pattern: n.Pattern, call: Call) -> Tiled:
        return tiled(pattern, call, self.tiles(pattern, call))

    def efficiency(self, call: Call) -> float | None:
        """1 on the CPU: the reference tile kernel there. On CUDA not measured against
        FlexAttention; it runs where no FlexAttention kernel can (float64, small head dims)."""
        return 1.0 if call.device.type == "cpu" else None

    def computed_pairs(self, prepared: Tiled, call: Call, planner) -> int:
        """Each chunk of query-tile rows at the width of its widest row."""
        states, grid = prepared.lowering.states, prepared.lowering.grid
        tile_area = grid.q_block * grid.kv_block
        live = row_counts(states != EMPTY)
        tiles = sum(len(rows) * width for rows, width in row_chunks(live, tile_area * call.heads))
        return tiles * tile_area * call.heads * states.shape[0]

    def build(self, prepared: Tiled, call: Call, planner) -> Runner:
        lowered = prepared.lowering
        check_batch(call, lowered.states)
        score_mod = call_score_mod(prepared.pattern, call)
        states, grid, mask_mod, scale = lowered.states, lowered.grid, lowered.mask_mod, call.scale
        return lambda q, k, v, _: gather_attention(q, k, v, states=states, grid=grid, mask_mod=mask_mod,
                                                   score_mod=score_mod, scale=scale)

    def describe(self, prepared: Tiled, call: Call) -> str:
        return "block-sparse gather in PyTorch operations: the non-empty key tiles of each query tile"
