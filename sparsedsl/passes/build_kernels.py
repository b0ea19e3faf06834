"""The Triton kernels of block-mask builds on CUDA, where most of a build's time is the
host time of its kernel launches, not their work. The module imports Triton: callers
import it where :func:`~sparsedsl.triton_kernels.runs_triton` says its kernels run.

* :func:`ordered_states`: FlexAttention's block indices from tile states.
  :func:`~sparsedsl.passes.blockmask.ordered_indices` orders a selection with about ten
  tensor operations (a comparison, a cast, a cumulative sum, arithmetic, a scatter); here
  one launch orders every row of every selected state value: a program per (row, value)
  counts the row's matches, then walks it again, a chunk of columns at a time, writing
  each column index at its place (a match at its rank among the matches, any other column
  after them at its rank among the others) with a running cumulative sum.
* :func:`dilated_states`: the states of LongNet's ``dilated`` parts, a layer each, in one
  launch where :func:`~sparsedsl.passes.tiles._dilated_states` takes about twenty tensor
  operations; the same arithmetic, per tile.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from .tiles import EMPTY, FULL, PARTIAL

#: Columns one program of the ordering kernel reads at a time (at most; fewer for short rows).
ORDER_CHUNK = 1024


def ordered_states(states: torch.Tensor, values: Sequence[int], transposed: bool = False,
                   layer_of: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(num_blocks, indices)`` of ``states == values[i]`` for each of one or two
    ``values``, in :func:`~sparsedsl.passes.blockmask.ordered_indices`' layout, stacked along
    a new first dimension, for CUDA states ``[B, layers, R, C]`` (any integer dtype):
    ``num_blocks [len(values), B, heads, R]`` and ``indices [len(values), B, heads, R, C]``
    (int32, contiguous), head ``h`` ordered from layer ``layer_of[h]`` (an int64 tensor on
    the states' device; without it, layer ``h``). With ``transposed``, the same for the
    states' transpose ``[..., C, R]``."""
    batch, layers, rows, columns = states.shape
    stride_batch, stride_layer, stride_row, stride_col = states.stride()
    if transposed:
        rows, columns, stride_row, stride_col = columns, rows, stride_col, stride_row
    heads = layers if layer_of is None else layer_of.numel()
    shape = (len(values), batch, heads, rows)
    num_blocks = torch.empty(shape, dtype=torch.int32, device=states.device)
    indices = torch.empty((*shape, columns), dtype=torch.int32, device=states.device)
    if not num_blocks.numel():
        return num_blocks, indices
    with torch.cuda.device(states.device):  # Triton launches on the current device
        _order_kernel[(batch * heads * rows, len(values))](
            states, layer_of, num_blocks, indices, heads, rows, columns,
            stride_batch, stride_layer, stride_row, stride_col, int(values[0]), int(values[-1]),
            LAYERS=layer_of is not None, CHUNK=min(ORDER_CHUNK, triton.next_power_of_2(columns)))
    return num_blocks, indices


@triton.jit
def _order_kernel(states, layer_of, num_blocks, indices, heads, rows, columns,
                  stride_batch, stride_layer, stride_row, stride_col, first, second,
                  LAYERS: tl.constexpr, CHUNK: tl.constexpr):
    """Program ``(r, i)`` orders output row ``r`` (the rows of every batch entry and head,
    in order) for the value ``first`` (``i = 0``) or ``second`` (``i = 1``)."""
    row = tl.program_id(0).to(tl.int64)
    which = tl.program_id(1)
    value = tl.where(which == 0, first, second)
    head = row // rows % heads
    layer = head
    if LAYERS:
        layer = tl.load(layer_of + head)
    base = states + row // rows // heads * stride_batch + layer * stride_layer + row % rows * stride_row
    out = which.to(tl.int64) * tl.num_programs(0) + row
    count = tl.zeros((), dtype=tl.int32)
    for start in range(0, columns, CHUNK):
        column = start + tl.arange(0, CHUNK)
        inside = column < columns
        state = tl.load(base + column.to(tl.int64) * stride_col, mask=inside, other=0)
        count += tl.sum(((state == value) & inside).to(tl.int32), axis=0)
    tl.store(num_blocks + out, count)
    before = tl.zeros((), dtype=tl.int32)  # matches in the chunks already written
    for start in range(0, columns, CHUNK):
        column = start + tl.arange(0, CHUNK)
        inside = column < columns
        state = tl.load(base + column.to(tl.int64) * stride_col, mask=inside, other=0)
        match = ((state == value) & inside).to(tl.int32)
        ranked = before + tl.cumsum(match, axis=0)  # matches up to and including the column
        place = tl.where(match != 0, ranked - 1, count + column - ranked)
        tl.store(indices + out * columns + place, column, mask=inside)
        before += tl.sum(match, axis=0)


def dilated_states(ql: torch.Tensor, qh: torch.Tensor, kl: torch.Tensor, kh: torch.Tensor,
                   params: torch.Tensor) -> torch.Tensor:
    """States ``[1, layers, R, C]`` (int8) of the tiles with query bounds ``[ql, qh]``
    (``R`` values) and key bounds ``[kl, kh]`` (``C`` values), int64 on one CUDA device,
    where layer ``i`` runs ``dilated`` with ``params[i] = (segment, per, rate, first shift,
    last shift)`` (int64 ``[layers, 5]``, as :func:`~sparsedsl.passes.tiles._dilated_states`
    lays them out), decided as it decides them."""
    ql, qh, kl, kh = (t.reshape(-1).contiguous() for t in (ql, qh, kl, kh))
    layers, rows, columns = params.shape[0], ql.numel(), kl.numel()
    states = torch.empty((1, layers, rows, columns), dtype=torch.int8, device=ql.device)
    if not states.numel():
        return states
    block_rows, block_columns = min(32, triton.next_power_of_2(rows)), min(128, triton.next_power_of_2(columns))
    grid = (layers, triton.cdiv(rows, block_rows), triton.cdiv(columns, block_columns))
    with torch.cuda.device(states.device):  # Triton launches on the current device
        # (a kernel argument may not be called ``params``: Triton's argument binder uses the name)
        _dilated_kernel[grid](ql, qh, kl, kh, params.contiguous(), states, rows, columns,
                              EMPTY=EMPTY, PARTIAL=PARTIAL, FULL=FULL,
                              BLOCK_ROWS=block_rows, BLOCK_COLUMNS=block_columns)
    return states


@triton.jit
def _kept_segments(lo, hi, segment, per, rate, first_shift, last_shift):
    """Along one axis of ``dilated`` tiles ``[lo, hi]``: the segment of the first kept
    position ``>= lo``, that of the last ``<= hi`` (-1 when the tile keeps none), and
    whether the tile is one position or lies in one segment of a rate-1 part. Positions
    are non-negative; the dividends that may be negative are offset by a divisor, so that
    truncating division floors."""
    first = (lo // segment) * per + (lo % segment + first_shift + rate) // rate - 1
    last = (hi // segment) * per + (hi % segment + last_shift + rate) // rate - 1
    first_segment = first // per
    last_segment = tl.where(first > last, -1, (last + per) // per - 1)
    whole = ((first_segment == last_segment) & (rate == 1)) | (lo == hi)
    return first_segment, last_segment, whole


@triton.jit
def _dilated_kernel(ql, qh, kl, kh, parts, states, rows, columns, EMPTY: tl.constexpr, PARTIAL: tl.constexpr,
                    FULL: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLUMNS: tl.constexpr):
    """Program ``(i, r, c)`` decides layer ``i``'s tiles of rows ``r * BLOCK_ROWS ..`` and
    columns ``c * BLOCK_COLUMNS ..``: empty where the two axes' ranges of segments do not
    meet, full where both axes are whole, else partial."""
    layer = tl.program_id(0)
    row = tl.program_id(1) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    column = tl.program_id(2) * BLOCK_COLUMNS + tl.arange(0, BLOCK_COLUMNS)
    segment = tl.load(parts + layer * 5)
    per = tl.load(parts + layer * 5 + 1)
    rate = tl.load(parts + layer * 5 + 2)
    first_shift = tl.load(parts + layer * 5 + 3)
    last_shift = tl.load(parts + layer * 5 + 4)
    in_rows, in_columns = row < rows, column < columns
    q_first, q_last, q_whole = _kept_segments(tl.load(ql + row, mask=in_rows, other=0),
                                              tl.load(qh + row, mask=in_rows, other=0),
                                              segment, per, rate, first_shift, last_shift)
    k_first, k_last, k_whole = _kept_segments(tl.load(kl + column, mask=in_columns, other=0),
                                              tl.load(kh + column, mask=in_columns, other=0),
                                              segment, per, rate, first_shift, last_shift)
    empty = (q_last[:, None] < k_first[None, :]) | (k_last[None, :] < q_first[:, None])
    full = q_whole[:, None] & k_whole[None, :]
    state = tl.where(empty, EMPTY, tl.where(full, FULL, PARTIAL)).to(tl.int8)
    offsets = (layer.to(tl.int64) * rows + row[:, None]) * columns + column[None, :]
    tl.store(states + offsets, state, mask=in_rows[:, None] & in_columns[None, :])
