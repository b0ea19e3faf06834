"""FlexAttention's block indices from tile states in one Triton kernel (CUDA).

:func:`~sparsedsl.passes.blockmask.ordered_indices` orders a selection with about ten tensor
operations (a comparison, a cast, a cumulative sum, arithmetic, a scatter), each a kernel
launch whose host time, not its work, is most of a block-mask build on a GPU. Here one
launch orders every row of every selected state value: a program per (row, value) counts
the row's matches, then walks it again, a chunk of columns at a time, writing each column
index at its place (a match at its rank among the matches, any other column after them at
its rank among the others) with a running cumulative sum.
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch

#: Columns one program reads at a time (at most; fewer for short rows).
_CHUNK = 1024


def ordered_states(states: torch.Tensor, values: Sequence[int], transposed: bool = False,
                   layer_of: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(num_blocks, indices)`` of ``states == values[i]`` for each of one or two
    ``values``, in :func:`~sparsedsl.passes.blockmask.ordered_indices`' layout, stacked along
    a new first dimension, for CUDA states ``[B, layers, R, C]`` (any integer dtype):
    ``num_blocks [len(values), B, heads, R]`` and ``indices [len(values), B, heads, R, C]``
    (int32, contiguous), head ``h`` ordered from layer ``layer_of[h]`` (an int64 tensor on
    the states' device; without it, layer ``h``). With ``transposed``, the same for the
    states' transpose ``[..., C, R]``."""
    import triton

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
        _order_kernel()[(batch * heads * rows, len(values))](
            states, layer_of, num_blocks, indices, heads, rows, columns,
            stride_batch, stride_layer, stride_row, stride_col, int(values[0]), int(values[-1]),
            LAYERS=layer_of is not None, CHUNK=min(_CHUNK, triton.next_power_of_2(columns)))
    return num_blocks, indices


@functools.cache
def _order_kernel():
    """The Triton kernel of :func:`ordered_states`, defined on first use (Triton is there
    wherever CUDA tensors are ordered, not on CPU-only installs). Program ``(r, i)`` orders
    output row ``r`` (the rows of every batch entry and head, in order) for the value
    ``first`` (``i = 0``) or ``second`` (``i = 1``)."""
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(states, layer_of, num_blocks, indices, heads, rows, columns,
               stride_batch, stride_layer, stride_row, stride_col, first, second,
               LAYERS: tl.constexpr, CHUNK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # (batch, head, row) flattened
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

    return kernel
