"""FlexAttention ``BlockMask``\\ s built from a pattern's structure.

Tiles are classified by :mod:`sparsedsl.passes.tiles` (interval arithmetic per node, three
valued logic through the combinators), a chunk of tile rows at a time; only the tiles left
``UNKNOWN`` are refined by evaluating the ``mask_mod`` on them. The result has the same full
and partial block sets as ``create_block_mask(mask_mod, ...)`` (whose padding makes a tile
cut short by a sequence end partial at most), without ever holding ``O(Q * K)`` values.

A build is a short, fixed sequence of tensor operations (on a GPU, kernel launches) that
reads nothing back to the host unless some tile needs refining. Heads that the pattern's
head groups give the same pairs share one layer of states (:func:`layer_states`): each
layer is classified and ordered once, and one copy per ``BlockMask`` tensor gives every
head its layer's indices.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Sequence

import torch
from torch.nn.attention.flex_attention import BlockMask

from ..budget import check_memory
from ..lang.nodes import Pattern
from ..lang.queries import head_layers
from ..triton_kernels import runs_triton
from .context import Context
from .host_values import on_device
from .refine import refined_states
from .squares import uniform_square
from .tiles import FULL, PARTIAL, UNKNOWN, TileGrid, classify, leaves_unknown

#: Tile states classified at once (bounds the int64 temporaries of the classifiers).
CLASSIFY_BUDGET = 1 << 24
#: Tiles ordered at once by :func:`ordered_indices` (bounds its temporaries: a bool copy, an
#: int32 grid, and the int64 copy of it that ``scatter_`` makes of its index).
ORDER_BUDGET = 1 << 24


def tile_states(pattern: Pattern, ctx: Context, grid: TileGrid, mask_mod: Callable) -> torch.Tensor:
    """Exact states (``EMPTY`` / ``PARTIAL`` / ``FULL``) of every tile, int8 contiguous
    ``[B or 1, H or 1, num_q_tiles, num_kv_tiles]``, as ``create_block_mask`` would see them
    (``layers or 1`` for ``H`` when ``ctx.layers`` names the head of each layer).
    ``mask_mod`` takes absolute positions (it refines the tiles the structure leaves
    undecided; when :func:`~sparsedsl.passes.tiles.leaves_unknown` rules those out, nothing
    is read back from the device)."""
    rows_per_chunk = max(1, CLASSIFY_BUDGET // (grid.num_kv_tiles * len(ctx.layer_heads())))
    refine = leaves_unknown(pattern, ctx, grid)
    _check_states_memory(1, grid, 1)  # at least one grid of states
    chunks = []
    for start in range(0, grid.num_q_tiles, rows_per_chunk):
        state = classify(pattern, ctx, grid, range(start, min(start + rows_per_chunk, grid.num_q_tiles)))
        if start == 0:  # the first chunk tells whether states vary over batch and heads
            _check_states_memory(state.shape[0] * state.shape[1], grid, 1)
        if refine:
            state = _refined(state, start, grid, mask_mod, uniform_square(pattern), ctx.layers)
        chunks.append(state)
    # A single chunk is taken as it is where contiguous: classifiers give fresh tensors
    # (or expanded views, which this copies), so the fix-up below may write to it.
    states = torch.cat(chunks, dim=2) if len(chunks) > 1 else chunks[0].contiguous()
    return _cut_tiles_partial(states, grid)


def layer_states(pattern: Pattern, ctx: Context, grid: TileGrid,
                 mask_mod: Callable) -> tuple[torch.Tensor, tuple[int, ...] | None]:
    """``(states, head_layers)``: the exact tile states of each group of heads that are
    allowed the same pairs (:func:`~sparsedsl.lang.queries.head_layers`, or a group per
    head when a bound tensor of the pattern has a head axis longer than 1), classified
    once per group: int8 contiguous ``[B or 1, layers, R, C]``, and ``head_layers[h]``
    the layer of head ``h``. ``head_layers`` is ``None`` where the states need no such
    map, as :func:`tile_states` gives them: a layer per head, or one layer of
    ``[B or 1, 1, R, C]`` for every head."""
    bound = (ctx.buffers[name] for name in pattern.buffer_names())
    if any(tensor.dim() >= 3 and tensor.shape[-3] > 1 for tensor in bound):
        return tile_states(pattern, ctx, grid, mask_mod), None
    layers = head_layers(pattern, ctx.heads)
    count = max(layers) + 1
    if count == ctx.heads:
        return tile_states(pattern, ctx, grid, mask_mod), None
    states = tile_states(pattern, replace(ctx, layers=first_heads(layers)), grid, mask_mod)
    return states, (layers if states.shape[1] > 1 else None)


def first_heads(head_layers: Sequence[int]) -> tuple[int, ...]:
    """The first head of each layer, for ``head_layers[h]`` the layer of head ``h``
    (layers numbered from 0 in order of their first head)."""
    return tuple(head_layers.index(layer) for layer in range(max(head_layers) + 1))


def tiles_of_heads(tiles: torch.Tensor, layers: Sequence[int] | None) -> torch.Tensor:
    """``[n, 4]`` tiles ``(b, layer, i, j)`` of states classified with ``ctx.layers =
    layers`` as tiles ``(b, h, i, j)`` of the head each layer stands for, in a new tensor
    (a copy when ``layers`` is ``None``: the layers are the heads)."""
    tiles = tiles.clone()
    if layers is not None:
        tiles[:, 1] = on_device(layers, tiles.device, tiles.dtype)[tiles[:, 1]]
    return tiles


def _check_states_memory(layers: int, grid: TileGrid, bytes_per_tile: int, what: str = "tile states") -> None:
    """Check ``bytes_per_tile`` bytes for each of ``layers`` grids of tiles against the
    memory budget."""
    check_memory(
        "tile classification",
        f"{what} of {layers} x {grid.num_q_tiles:,} x {grid.num_kv_tiles:,} tiles of "
        f"{grid.q_block} x {grid.kv_block} positions",
        layers * grid.num_q_tiles * grid.num_kv_tiles * bytes_per_tile,
    )


#: Bytes per tile a ``BlockMask`` build holds: the partial and full selections (bool), and
#: int32 indices of both kinds in both orders, with the copies ordering makes (the
#: selections in both orders, bool).
BLOCK_MASK_BYTES_PER_TILE = 2 + 4 * 4 + 4
#: Bytes per tile of a ``BlockMask``'s indices: int32, of both kinds, in both orders.
BLOCK_MASK_INDEX_BYTES_PER_TILE = 4 * 4


def _refined(state: torch.Tensor, start: int, grid: TileGrid, mask_mod: Callable, square: int,
             layers: Sequence[int] | None) -> torch.Tensor:
    """``state`` (tile rows from ``start``, a layer per head of ``layers``, see
    :func:`tiles_of_heads`) with its ``UNKNOWN`` tiles evaluated
    (:func:`~sparsedsl.passes.refine.refined_states`: their first rows, then whole where
    those do not decide), once per ``square`` x ``square`` square of positions where the
    pattern is that coarse (host syncs: their number decides the work)."""
    unknown = (state == UNKNOWN).nonzero()
    if not unknown.numel():
        return state
    tiles = tiles_of_heads(unknown, layers)
    tiles[:, 2] += start
    state = state.clone()
    state[tuple(unknown.T)] = refined_states(mask_mod, grid, tiles, square=square)
    return state


def _cut_tiles_partial(states: torch.Tensor, grid: TileGrid) -> torch.Tensor:
    """``states`` with ``FULL`` made ``PARTIAL``, in place, in the tiles cut short by a
    sequence end (FlexAttention counts their missing positions as masked): the last tile
    row when ``grid.rows`` is not a multiple of ``q_block``, the last tile column when
    ``kv_len`` is not a multiple of ``kv_block``. No operation when no tile is cut."""
    edges = ([states[..., -1, :]] if grid.rows % grid.q_block else []) \
        + ([states[..., -1]] if grid.kv_len % grid.kv_block else [])
    for edge in edges:
        edge.masked_fill_(edge == FULL, PARTIAL)
    return states


def ordered_indices(selected: torch.Tensor, transposed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(num_blocks, indices)`` in FlexAttention's layout from a bool ``[..., R, C]``:
    ``num_blocks[..., r]`` selected columns of row ``r``, listed in ascending order at the
    start of ``indices[..., r, :]`` and followed by the other columns in ascending order
    (so each row of ``indices`` is a permutation of ``0 .. C - 1``, as in
    ``create_block_mask``). Both int32 and contiguous. With ``transposed``, the same for
    ``selected.transpose(-1, -2)``.

    Nothing is read back from the device: an entry's place in its row comes from a
    cumulative sum, and one scatter writes the column indices there. Rows are ordered
    ``ORDER_BUDGET`` tiles at a time, each pass on a contiguous copy of its rows when they
    are not contiguous already (a transposed copy of a bool is cheaper than scanning and
    scattering across rows)."""
    if transposed:
        selected = selected.transpose(-1, -2)
    rows, length = selected.shape[-2:]
    indices = torch.empty(selected.shape, dtype=torch.int32, device=selected.device)
    num_blocks = torch.empty(selected.shape[:-1], dtype=torch.int32, device=selected.device)
    line = torch.arange(length, dtype=torch.int32, device=selected.device)
    step = max(1, ORDER_BUDGET * rows // max(1, selected.numel()))  # rows per pass
    for start in range(0, rows, step):
        count = min(step, rows - start)
        _order(selected.narrow(-2, start, count).contiguous(), line,
               indices.narrow(-2, start, count), num_blocks.narrow(-1, start, count))
    return num_blocks, indices


def _order(selected: torch.Tensor, line: torch.Tensor, indices: torch.Tensor, num_blocks: torch.Tensor) -> None:
    """Fill ``indices`` and ``num_blocks`` (views of the results) for the contiguous rows
    ``selected``; ``line`` is ``arange(C)``."""
    place = selected.to(torch.int32)
    place.cumsum_(-1).sub_(1)  # a selected entry: its rank among the selected, from 0
    last = place[..., -1:]  # num_blocks - 1
    torch.add(last, 1, out=num_blocks[..., None])
    # another entry, at c: num_blocks + (c - its rank among the selected) = last - place + c
    torch.sub(last, place, out=indices).add_(line)
    torch.where(selected, place, indices, out=place)
    indices.scatter_(-1, place, line.expand_as(place))


def tile_orders(states: torch.Tensor, head_layers: Sequence[int] | None = None
                ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The ``(num_blocks, indices)`` of a ``BlockMask`` from ``states [B, layers, R, C]``:
    by rows (the key tiles of each query-tile row), then by columns (the query tiles of each
    key-tile column), each stacked ``[2, B, heads, ...]`` for the ``PARTIAL`` and the
    ``FULL`` tiles (:func:`ordered_indices`' layout), head ``h`` ordered from layer
    ``head_layers[h]`` (without ``head_layers``, layer ``h``). Where Triton kernels run
    (:func:`~sparsedsl.triton_kernels.runs_triton`), a kernel launch per order
    (:mod:`~sparsedsl.passes.build_kernels`); elsewhere tensor operations on each layer once,
    a square grid's two orders in one pass, then one copy per tensor for the heads."""
    layer_of = None if head_layers is None else on_device(head_layers, states.device)
    if runs_triton(states):
        from .build_kernels import ordered_states
        return [ordered_states(states, (PARTIAL, FULL), transposed, layer_of) for transposed in (False, True)]
    # [PARTIAL, FULL] made on the device (no host-to-device copy)
    kinds = torch.arange(PARTIAL, FULL + 1, FULL - PARTIAL, dtype=states.dtype, device=states.device)
    selected = states == kinds.view(-1, 1, 1, 1, 1)  # [2, B, layers, R, C]: partial, full
    if selected.shape[-2] == selected.shape[-1]:  # [orders, 2, B, layers, ...]
        orders = [ordered_indices(torch.stack([selected, selected.transpose(-1, -2)]))]
    else:
        orders = [tuple(t[None] for t in ordered_indices(selected, transposed)) for transposed in (False, True)]
    if layer_of is not None:
        orders = [(num.index_select(-2, layer_of), indices.index_select(-3, layer_of)) for num, indices in orders]
    return [(num[order], indices[order]) for num, indices in orders for order in range(num.shape[0])]


def block_mask_from_states(states: torch.Tensor, grid: TileGrid, mask_mod: Callable,
                           head_layers: Sequence[int] | None = None) -> BlockMask:
    """A ``BlockMask`` with the partial and full tiles of ``states`` over the ``grid.rows``
    query rows of ``grid``; ``mask_mod`` takes row indices ``0 <= q < grid.rows`` (FlexAttention's
    query indices), so for ``grid.q_start > 0`` it is the pattern shifted by ``q_start``.
    Partial and full tiles are ordered together, so the partial and the full tensors of one
    kind are views of one tensor (each contiguous).

    ``states`` is ``[B or 1, layers, R, C]``. Without ``head_layers`` the layers are the
    heads (or one layer for every head); with it, head ``h`` has the tiles of layer
    ``head_layers[h]``: each layer is ordered once, and one copy per tensor gives every
    head its layer's indices (``[B or 1, len(head_layers), ...]``)."""
    _check_states_memory(states.shape[0] * states.shape[1], grid, BLOCK_MASK_BYTES_PER_TILE,
                         "a BlockMask (indices)")
    if head_layers is not None:
        _check_states_memory(states.shape[0] * len(head_layers), grid, BLOCK_MASK_INDEX_BYTES_PER_TILE,
                             "a BlockMask's indices per head")
    orders = tile_orders(states, head_layers)
    (kv_num, full_kv_num), (q_num, full_q_num) = (num.unbind() for num, _ in orders)
    (kv_idx, full_kv_idx), (q_idx, full_q_idx) = (indices.unbind() for _, indices in orders)
    return BlockMask(
        seq_lengths=(grid.rows, grid.kv_len),
        kv_num_blocks=kv_num,
        kv_indices=kv_idx,
        full_kv_num_blocks=full_kv_num,
        full_kv_indices=full_kv_idx,
        q_num_blocks=q_num,
        q_indices=q_idx,
        full_q_num_blocks=full_q_num,
        full_q_indices=full_q_idx,
        BLOCK_SIZE=(grid.q_block, grid.kv_block),
        mask_mod=mask_mod,
    )
