"""Slabs of the tile_sdpa plan's view groups: where each span's queries and keys lie in the
inputs, as strided views, the adding of slab gradients back into the inputs', and the
output buffer the groups write into (slabs of it, or query tiles of gathered groups)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SlabRuns:
    """A view group's slabs in tokens: span ``i`` holds the ``chunk`` queries from
    ``q_first + i * q_stride`` and the ``span`` keys from ``k_first + i * k_stride``
    (``count`` spans). Runs may pass the sequences' ends: the inputs are then padded with
    ``q_past`` query rows after the last, ``k_before`` keys before the first and ``k_past``
    after the last."""

    q_first: int
    q_stride: int
    k_first: int
    k_stride: int
    count: int
    chunk: int
    span: int
    q_past: int
    k_before: int
    k_past: int

    @classmethod
    def of(cls, runs: tuple[int, int, int, int], count: int, chunk: int, span: int, q_len: int,
           kv_len: int) -> "SlabRuns":
        q_first, q_stride, k_first, k_stride = runs
        return cls(q_first, q_stride, k_first, k_stride, count, chunk, span,
                   q_past=max(0, q_first + (count - 1) * q_stride + chunk - q_len),
                   k_before=max(0, -k_first),
                   k_past=max(0, k_first + (count - 1) * k_stride + span - kv_len))

    def queries(self, t: torch.Tensor, pads: dict) -> torch.Tensor:
        """The query slabs of ``t [B, H, Q, D]`` (queries or their gradients): ``[count, B *
        H, chunk, D]``."""
        return slabs(padded(t, 0, self.q_past, pads), self.q_first, self.count, self.chunk, self.q_stride)

    @property
    def consecutive(self) -> bool:
        """Whether the spans' queries follow one another: one run of ``count * chunk``."""
        return self.q_stride == self.chunk or self.count == 1

    def query_run(self, t: torch.Tensor, pads: dict) -> torch.Tensor:
        """The queries of consecutive spans of ``t [B, H, Q, D]`` as one run ``[B, H, count *
        chunk, D]``."""
        return padded(t, 0, self.q_past, pads).narrow(2, self.q_first, self.count * self.chunk)

    def as_slabs(self, t: torch.Tensor) -> torch.Tensor:
        """A query run ``t [B, H, count * chunk, ...]`` (:meth:`query_run`'s layout) as slabs
        ``[count, B * H, chunk, ...]``: a view where batch and heads merge."""
        return t.flatten(0, 1).unflatten(1, (self.count, self.chunk)).transpose(0, 1)

    def output(self, out: torch.Tensor) -> torch.Tensor:
        """The query slabs of the output buffer ``out`` (:func:`new_output`, whole query
        tiles: no padding), where the group writes: ``[count, B * H, chunk, dv]``."""
        return slabs(out, self.q_first, self.count, self.chunk, self.q_stride)

    def keys(self, t: torch.Tensor, pads: dict) -> torch.Tensor:
        """The key slabs of ``t [B, H, K, D]`` (keys or values): ``[count, B * H, span, D]``
        (with ``k_stride`` 0, one slab repeated by a stride-0 view)."""
        source = padded(t, self.k_before, self.k_past, pads)
        if self.k_stride == 0:
            return slabs(source, self.k_first + self.k_before, 1, self.span, 1).expand(self.count, -1, -1, -1)
        return slabs(source, self.k_first + self.k_before, self.count, self.span, self.k_stride)

    def add_queries(self, total: torch.Tensor, grads: torch.Tensor, start: int = 0) -> None:
        """Add query-slab gradients ``grads [n, B * H, chunk, D]`` of spans ``start ..
        start + n`` into ``total [B, H, Q, D]`` (spans never overlap; batch and heads must
        merge, as in a contiguous tensor, for the slabs to be views), in place."""
        rows, count = total.shape[2], grads.shape[0]
        if self.q_past and start + count == self.count:
            tail = grads[-1].narrow(1, 0, self.chunk - self.q_past)  # the last span's rows inside
            grads, count = grads[:-1], count - 1
            last = self.q_first + (self.count - 1) * self.q_stride
            total[:, :, last:rows].add_(tail.view(total.shape[0], total.shape[1], -1, total.shape[3]))
        if count:
            slabs(total, self.q_first + start * self.q_stride, count, self.chunk, self.q_stride).add_(grads)

    def add_keys(self, total: torch.Tensor, grads: torch.Tensor, start: int = 0) -> None:
        """Add key-slab gradients ``grads [n, B * H, span, D]`` of spans ``start .. start +
        n`` into ``total [B, H, K + k_before + k_past, D]`` (the padded keys' positions), in
        place. Overlapping slabs are summed by ``span / k_stride`` adds of non-overlapping
        views where the stride divides the span (one slab's sum with stride 0), else by
        ``index_add_``."""
        batch, heads, length, dim = total.shape
        count, first = grads.shape[0], self.k_first + self.k_before + start * self.k_stride
        if self.k_stride == 0:  # one slab for every span
            total.narrow(2, first, self.span).add_(grads.sum(0).view(batch, heads, self.span, dim))
            return
        if self.span % self.k_stride == 0:
            pieces = self.span // self.k_stride
            blocks = total.narrow(2, first, (count - 1 + pieces) * self.k_stride) \
                .view(batch * heads, count - 1 + pieces, self.k_stride, dim)
            parts = grads.view(count, batch * heads, pieces, self.k_stride, dim)
            for piece in range(pieces):
                blocks[:, piece:piece + count].add_(parts[:, :, piece].transpose(0, 1))
            return
        positions = (first + self.k_stride * torch.arange(count, device=total.device)[:, None]
                     + torch.arange(self.span, device=total.device)).flatten()
        total.view(batch * heads, length, dim).index_add_(1, positions, grads.transpose(0, 1).flatten(1, 2))


def slabs(t: torch.Tensor, first: int, count: int, chunk: int, stride: int) -> torch.Tensor:
    """``count`` slabs of ``chunk`` positions of ``t [B, H, N, D]``, slab ``i`` from
    ``first + i * stride``, as ``[count, B * H, chunk, D]``: views (``unfold``, whose
    backward sums overlapping slabs' gradients) where batch and heads merge."""
    span = t[:, :, first:first + (count - 1) * stride + chunk]
    return span.unfold(2, chunk, stride).transpose(-1, -2).movedim(2, 0).flatten(1, 2)


def padded(t: torch.Tensor, before: int, past: int, pads: dict) -> torch.Tensor:
    """``t [B, H, N, D]`` with ``before`` and ``past`` zero positions added at the ends,
    made once per ``(t, before, past)`` in ``pads``."""
    if not before and not past:
        return t
    key = (id(t), before, past)
    if key not in pads:
        pads[key] = F.pad(t, (0, 0, before, past))
    return pads[key]


def new_output(like: torch.Tensor, num_q_tiles: int, q_block: int, dv: int,
               held_by_none: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """The output buffer ``[B, H, num_q_tiles * q_block, dv]`` the groups write into (like
    the queries ``like [B, H, Q, D]``; the caller returns its first ``Q`` rows), zero on
    the query tiles of the runs ``held_by_none``
    (:func:`~sparsedsl.plans.tile_groups.tiles_held_by_none`)."""
    out = like.new_empty(*like.shape[:2], num_q_tiles * q_block, dv)
    for start, stop in held_by_none:
        out[:, :, start * q_block:stop * q_block].zero_()
    return out


def write_tiles(out: torch.Tensor, tile_rows: torch.Tensor, values: torch.Tensor, height: int) -> torch.Tensor:
    """``out [B, H, num_q_tiles * q_block, dv]`` (from :func:`new_output`) with a gathered
    group's output ``values [count, B * H, height * q_block, dv]`` written into its query
    tiles ``tile_rows`` (span by span), in ``out``'s dtype (under autocast SDPA returns its
    own): in place, or as a new tensor where autograd records ``out`` (the output of a
    function that saved views of it)."""
    batch, heads, length, dv = out.shape
    q_block = values.shape[2] // height
    tiles = out.view(batch * heads, length // q_block, q_block, dv)
    written = tile_major(values.to(out.dtype), height, q_block)
    if out.requires_grad:
        return tiles.index_copy(1, tile_rows, written.transpose(0, 1)).view(out.shape)
    tiles.index_copy_(1, tile_rows, written.transpose(0, 1))
    return out


def tile_major(out: torch.Tensor, height: int, q_block: int) -> torch.Tensor:
    """A group's output ``[count, B * H, height * q_block, dv]`` as ``[count * height, B *
    H, q_block, dv]``."""
    return out.unflatten(2, (height, q_block)).transpose(1, 2).flatten(0, 1)
