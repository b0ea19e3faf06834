"""Lattice positions of ``[B, H, N, D]`` tensors as views: the lattice plan's sub-problems
taken from the inputs, folded for SDPA (chunks in its batch dimension, (batch, head)
pairs in its head dimension), and written back into outputs and gradients.

A part's positions (:class:`~sparsedsl.passes.lattice.LatticePart`) that form one
arithmetic run, or a dilated segment of every period, are strided views; others are
gathered with ``index_select``.
"""

from __future__ import annotations

import torch

from ..lang import nodes as n
from ..passes.lattice import HeadGroupLattice, LatticePart, zeroed_heads
from .kernels import merges_batch_and_heads, sdpa_with_lse, zero_heads


def take(part: LatticePart, t: torch.Tensor) -> torch.Tensor:
    """The lattice's positions of ``t`` (dimension 2)."""
    positions_view = view(part, t)
    return t.index_select(2, part.positions) if positions_view is None else positions_view


def view(part: LatticePart, t: torch.Tensor) -> torch.Tensor | None:
    """The lattice's positions of ``t`` (dimension 2) as a view, or None when they are not
    one arithmetic run (then they are gathered, or folded by :func:`folded_view`)."""
    if part.positions is None:
        return t
    if part.one_run:
        start, step = part.runs[:2]
        return t[:, :, start:start + (part.length - 1) * step + 1:step]
    return None


def folded_view(part: LatticePart, t: torch.Tensor, start: int, count: int, chunk: int) -> torch.Tensor | None:
    """Lattice positions ``start .. start + count * chunk`` of ``t [B, H, N, D]`` folded as
    :func:`fold_positions` folds them (``[count, B * H, chunk, D]``) in one view, or None
    when no view holds them: a gather, batch and head dimensions that do not merge, or
    chunks that are not whole periods of a lattice of several periods."""
    if part.positions is None:
        return folded_positions_view(t, start, count, chunk)
    if part.runs is None:
        return None
    first, step, per_period, period = part.runs
    if part.one_run:
        return folded_positions_view(t, first + start * step, count, chunk, step, chunk * step)
    if chunk == per_period and start % per_period == 0:  # whole periods
        return folded_positions_view(t, first + start // per_period * period, count, chunk, step, period)
    return None


def fold(part: LatticePart, t: torch.Tensor, start: int, count: int, chunk: int) -> torch.Tensor:
    """:func:`folded_view`, or the lattice taken (gathered) and folded by
    :func:`fold_positions` when no single view holds the positions or ``t`` carries
    gradients."""
    if not (t.requires_grad and torch.is_grad_enabled()):
        folded = folded_view(part, t, start, count, chunk)
        if folded is not None:
            return folded
    return fold_positions(take(part, t), start, count, chunk)


def put(part: LatticePart, target: torch.Tensor, values: torch.Tensor) -> None:
    """Write ``values`` into the lattice's positions of ``target`` (in place)."""
    positions_view = view(part, target)
    if positions_view is None:
        target.index_copy_(2, part.positions, values)
    else:
        positions_view.copy_(values)


def chunk_runs(length: int, size: int) -> list[tuple[int, int, int]]:
    """``(start, count, chunk)``: a lattice of ``length`` positions as ``count`` chunks of
    ``chunk`` positions from ``start`` — the whole chunks of ``size``, then the last,
    shorter one."""
    whole = length // size * size
    runs = [(0, whole // size, size)] if whole else []
    if whole < length:
        runs.append((whole, 1, length - whole))
    return runs


def fold_positions(t: torch.Tensor, start: int, count: int, chunk: int) -> torch.Tensor:
    """Positions ``start .. start + count * chunk`` of ``t [B, H, L, D]`` as ``[count, B * H,
    chunk, D]``: the chunks in SDPA's batch dimension, (batch, head) pairs in its head
    dimension. A view when the batch and head dimensions merge (batch 1, or every head of a
    contiguous tensor), strided lattices included; grouped-query attention's ``head //
    group`` holds on the flattened index as on the head index."""
    if not (t.requires_grad and torch.is_grad_enabled()):
        view = folded_positions_view(t, start, count, chunk)
        if view is not None:
            return view
    return t[:, :, start:start + count * chunk].unflatten(2, (count, chunk)).movedim(2, 0).flatten(1, 2)


def folded_positions_view(t: torch.Tensor, first: int, count: int, chunk: int, step: int = 1,
                 chunk_stride: int | None = None) -> torch.Tensor | None:
    """``count`` chunks of ``chunk`` positions of ``t [B, H, N, D]`` as one ``as_strided``
    view ``[count, B * H, chunk, D]`` (a call makes several such views, and each operation
    costs host time): chunk ``c`` holds positions ``first + c * chunk_stride + i * step``
    (``chunk_stride`` defaults to ``chunk * step``: consecutive chunks). None when the batch
    and head dimensions of ``t`` do not merge."""
    if not merges_batch_and_heads(t):
        return None
    batch, heads, _, dim = t.shape
    stride_b, stride_h, stride_n, stride_d = t.stride()
    stride_h = stride_b if heads == 1 else stride_h
    chunk_stride = chunk * step if chunk_stride is None else chunk_stride
    return t.as_strided((count, batch * heads, chunk, dim),
                        (chunk_stride * stride_n, stride_h, step * stride_n, stride_d),
                        t.storage_offset() + first * stride_n)


def write_folded(target: torch.Tensor, part: LatticePart, start: int, count: int, chunk: int,
                 folded: torch.Tensor) -> None:
    """Write ``folded`` (``[count, B * H, chunk, ...]``, as :func:`fold_positions` lays out the
    lattice positions ``start ..`` of ``part``) into those positions of ``target [B, H, N,
    ...]``, in place."""
    batch, heads = target.shape[:2]
    if target.dim() == 3:  # log-sum-exp rows
        target, folded = target[..., None], folded[..., None]
    dest = folded_view(part, target, start, count, chunk)
    positions_view = None if dest is not None else view(part, target)
    if positions_view is not None:
        dest = positions_view[:, :, start:start + count * chunk].unflatten(2, (count, chunk))
        folded = folded.unflatten(1, (batch, heads)).movedim(0, 2)  # [B, H, count, chunk, ...]
    if dest is not None:
        dest.copy_(folded)
        return
    values = folded.unflatten(1, (batch, heads)).movedim(0, 2).flatten(2, 3)
    target.index_copy_(2, part.positions[start:start + count * chunk], values)


def fold_chunks(q, k, v, size: int, scale: float, return_lse: bool):
    """``chunks(size)`` attention ``(out, lse or None)`` of lattices ``q``, ``k``, ``v``
    ``[B, H, L, D]`` with gradients: the folds are copied (their backward is then a plain
    reshape)."""
    batch, heads, _, _ = q.shape
    outs, lses = [], []
    for start, count, chunk in chunk_runs(q.shape[2], size):
        out, lse = sdpa_with_lse(*(fold_positions(t, start, count, chunk).contiguous() for t in (q, k, v)), scale, return_lse)
        outs.append(out.unflatten(1, (batch, heads)).movedim(0, 2).flatten(2, 3))
        if return_lse:
            lses.append(lse.unflatten(1, (batch, heads)).movedim(0, 2).flatten(2, 3))
    return torch.cat(outs, dim=2), (torch.cat(lses, dim=2) if return_lse else None)


def group_inputs(q, k, v, heads: range):
    """``(q, k, v, kv)`` of one head group: its query heads, the key/value heads they read,
    and those heads' indices (:func:`kv_heads_of`)."""
    kv = kv_heads_of(heads, q.shape[1] // k.shape[1], q.device)
    qg = q[:, heads.start:heads.stop]
    if isinstance(kv, slice):
        return qg, k[:, kv], v[:, kv], kv
    return qg, k.index_select(1, kv), v.index_select(1, kv), kv


def kv_heads_of(heads: range, group: int, device) -> slice | torch.Tensor:
    """The key/value heads that query heads ``heads`` read (``group`` query heads per
    key/value head): a slice, or an index tensor when ``heads`` does not cover whole groups
    of query heads sharing a key/value head."""
    if heads.start % group == 0 and heads.stop % group == 0:
        return slice(heads.start // group, heads.stop // group)
    return torch.arange(heads.start, heads.stop, device=device) // group


def chunk_folds(q, k, v, plan: tuple[HeadGroupLattice, ...]):
    """Every chunk run of the ``chunks`` parts of ``plan`` that occur at this length:
    ``(heads, kv, part, start, count, chunk, (q, k, v) folded by _fold)``, ``kv`` as
    :func:`group_inputs` gives it."""
    for head_plan in plan:
        qg, kg, vg, kv = group_inputs(q, k, v, head_plan.heads)
        for part in head_plan.parts:
            if part.length == 0 or not isinstance(part.pattern, n.Chunks):
                continue
            taken = None  # (q, k, v) gathered, for runs that no view holds
            length = qg.shape[2] if part.length is None else part.length
            for start, count, chunk in chunk_runs(length, part.pattern.size):
                folded = tuple(folded_view(part, t, start, count, chunk) for t in (qg, kg, vg))
                if any(t is None for t in folded):
                    taken = taken or tuple(take(part, t) for t in (qg, kg, vg))
                    folded = tuple(fold_positions(t, start, count, chunk) for t in taken)
                yield head_plan.heads, kv, part, start, count, chunk, folded


def zeroed_output(q: torch.Tensor, v: torch.Tensor, plan: tuple[HeadGroupLattice, ...]) -> torch.Tensor:
    """The output tensor of ``plan`` on ``q``, ``v``, zero on the heads of
    :func:`~sparsedsl.passes.lattice.zeroed_heads` (the lattices then write their rows)."""
    out = q.new_empty(*q.shape[:3], v.shape[-1])
    zero_heads(out, zeroed_heads(plan, q.shape[2]))
    return out
