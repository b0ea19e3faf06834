"""The *lattice* plan: token-level dilation as dense attention on strided sub-sequences.

A mask cannot make token dilation cheap: a tile with half its pairs masked costs a tile
kernel as much as a full one. But a dilated pattern allows pairs only inside *lattices* of
positions, and on a lattice it is dense or block-structured:

* ``dilated(segment, rate, offset)`` keeps positions ``p`` with ``(p % segment) % rate ==
  offset``. Listed in order, the kept positions of one segment are ``m = ceil((segment -
  offset) / rate)`` consecutive entries, so on that compressed sequence the pattern is
  ``chunks(m)``: dense attention with the segments folded into the batch. The kept
  positions are ``offset + s * segment + i * rate`` (``i < m``): strided views, even when
  ``rate`` does not divide ``segment``, as long as every segment keeps ``m`` of them.
* ``blocks(S).<rules>.within(dilated(segment, rate, offset))`` with ``segment`` dividing
  ``S``: for each segment index ``j`` inside a block, the kept positions of segment ``j``
  of every block form one lattice, ``m`` positions per block; on it the pattern is
  ``blocks(m).<rules>`` (the block rules see the same block coordinates), a block pattern
  with no token masking.
* ``segments(...)`` and ``heads(...)`` split the heads; each group is decomposed alone (a
  part that is not a lattice runs as it is, on all positions, through its own plan).

Lattices of one head group are disjoint, and pairs are allowed only inside a lattice, so
each query row belongs to at most one sub-problem and the outputs are scattered back
exactly; rows in no lattice see no key and output 0 (log-sum-exp ``-inf``). Query and key
sequences must have the same length (self-attention), and the pattern no score
modification (ALiBi and biases see absolute positions).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import torch
import torch.nn.functional as F

from ..lang import nodes as n
from ..lang.groups import head_groups
from ..lang.queries import depends_on_heads, mask_part, score_mods

#: Score elements held at once while computing a log-sum-exp.
LSE_BUDGET = 1 << 26


@dataclass(frozen=True)
class LatticePart:
    """One sub-problem: the query/key ``positions`` of a lattice (ascending; None for all
    positions) and the ``pattern`` that holds on the compressed sequence. ``runs`` is
    ``(start, step, per_period, period)`` when the positions are ``start + s * period + i *
    step`` for ``i < per_period`` and ``s < length / per_period`` (a dilated segment of every
    period; one period, or periods that continue one arithmetic run, to any length): then
    they are taken as strided views instead of gathers."""

    positions: torch.Tensor | None
    pattern: n.Pattern
    runs: tuple[int, int, int, int] | None = None

    @cached_property
    def length(self) -> int | None:
        return None if self.positions is None else self.positions.numel()

    def take(self, t: torch.Tensor) -> torch.Tensor:
        """The lattice's positions of ``t`` (dimension 2)."""
        view = self.view(t)
        return t.index_select(2, self.positions) if view is None else view

    def view(self, t: torch.Tensor) -> torch.Tensor | None:
        """The lattice's positions of ``t`` (dimension 2) as a view, or None when they are
        not one arithmetic run (then they are gathered, or folded by :meth:`folded_view`)."""
        if self.positions is None:
            return t
        if self.one_run:
            start, step = self.runs[:2]
            return t[:, :, start:start + (self.length - 1) * step + 1:step]
        return None

    @property
    def one_run(self) -> bool:
        """Whether the positions are one arithmetic run (one period, or periods that
        continue the run)."""
        if self.runs is None:
            return False
        _, step, per_period, period = self.runs
        return per_period == self.length or period == per_period * step

    def folded_view(self, t: torch.Tensor, start: int, count: int, chunk: int) -> torch.Tensor | None:
        """Lattice positions ``start .. start + count * chunk`` of ``t [B, H, N, D]``
        folded as :func:`_fold` folds them (``[count, B * H, chunk, D]``) in one view, or
        None when no view holds them: a gather, batch and head dimensions that do not merge,
        or chunks that are not whole periods of a lattice of several periods."""
        if self.positions is None:
            return _folded_view(t, start, count, chunk)
        if self.runs is None:
            return None
        first, step, per_period, period = self.runs
        if self.one_run:
            return _folded_view(t, first + start * step, count, chunk, step, chunk * step)
        if chunk == per_period and start % per_period == 0:  # whole periods
            return _folded_view(t, first + start // per_period * period, count, chunk, step, period)
        return None

    def fold(self, t: torch.Tensor, start: int, count: int, chunk: int) -> torch.Tensor:
        """:meth:`folded_view`, or the lattice taken (gathered) and folded by :func:`_fold`
        when no single view holds the positions or ``t`` carries gradients."""
        if not (t.requires_grad and torch.is_grad_enabled()):
            view = self.folded_view(t, start, count, chunk)
            if view is not None:
                return view
        return _fold(self.take(t), start, count, chunk)

    def put(self, target: torch.Tensor, values: torch.Tensor) -> None:
        """Write ``values`` into the lattice's positions of ``target`` (in place)."""
        view = self.view(target)
        if view is None:
            target.index_copy_(2, self.positions, values)
        else:
            view.copy_(values)


def _lattice_part(positions: torch.Tensor, pattern: n.Pattern, length: int, start: int, step: int,
                  per_period: int, period: int) -> LatticePart:
    """A part whose ``positions`` are, in each period of ``period`` positions up to
    ``length``, the first ``per_period`` of ``start, start + step, ...`` (fewer in a last,
    shorter period), with ``runs`` set (see :class:`LatticePart`) when they are one
    arithmetic run (one period, or periods that continue the run: ``period == per_period *
    step``) or when every period holds ``per_period`` of them."""
    count, periods = positions.numel(), -(-length // period)
    if periods == 1:
        per_period = count
    one_run = periods == 1 or period == per_period * step  # to any length
    runs = (start, step, per_period, period) if count and (one_run or count == periods * per_period) else None
    return LatticePart(positions, pattern, runs)


@dataclass(frozen=True)
class HeadGroupPlan:
    """The sub-problems of heads ``heads``."""

    heads: range
    parts: tuple[LatticePart, ...]


def _kept_positions(length: int, block: int, segment: int, index: int, rate: int, offset: int,
                    device) -> torch.Tensor:
    """Positions ``p < length`` with ``(p % block) // segment == index`` and
    ``((p % block) % segment) % rate == offset``, ascending."""
    p = torch.arange(length, device=device)
    rel = p % block
    keep = (rel // segment == index) & ((rel % segment) % rate == offset)
    return keep.nonzero().flatten()


def _per_segment(segment: int, rate: int, offset: int) -> int:
    return -(-(segment - offset) // rate)


def _decompose_part(part: n.Pattern, length: int, device) -> tuple[LatticePart, ...] | None:
    """Lattice parts of a head-independent ``part``, or None when it is not a lattice
    pattern (then it runs whole)."""
    if isinstance(part, n.Dilated):
        positions = _kept_positions(length, part.segment, part.segment, 0, part.rate, part.offset, device)
        per_segment = _per_segment(part.segment, part.rate, part.offset)
        return (_lattice_part(positions, n.Chunks(per_segment), length, part.offset, part.rate, per_segment,
                              part.segment),)
    if isinstance(part, n.Chunks):
        return (LatticePart(None, part),)
    if isinstance(part, n.Blocks) and isinstance(part.within_, n.Dilated):
        rule, size = part.within_, part.size
        if size % rule.segment or length % size:
            return None
        per_block = _per_segment(rule.segment, rule.rate, rule.offset)
        coarse = n.Blocks(per_block, part.rules, part.causal_, None)
        return tuple(
            _lattice_part(_kept_positions(length, size, rule.segment, j, rule.rate, rule.offset, device), coarse,
                          length, j * rule.segment + rule.offset, rule.rate, per_block, size)
            for j in range(size // rule.segment)
        )
    return None


def _split_heads(pattern: n.Pattern, heads: int) -> list[tuple[range, n.Pattern]] | None:
    """``pattern`` as head groups of head-independent patterns, or None."""
    if isinstance(pattern, n.Segments):
        pattern = pattern.expand()
    if isinstance(pattern, n.Heads):
        groups = []
        for rng, part in zip(head_groups(heads, len(pattern.parts)), pattern.parts):
            inner = _split_heads(part, heads)
            if inner is None:
                return None
            for sub_range, sub_part in inner:  # nested groups see absolute head indices
                overlap = range(max(rng.start, sub_range.start), min(rng.stop, sub_range.stop))
                if len(overlap):
                    groups.append((overlap, sub_part))
        return groups
    if isinstance(pattern, n.Blocks) and isinstance(pattern.within_, (n.Segments, n.Heads)):
        inner = _split_heads(pattern.within_, heads)
        if inner is None:
            return None
        return [(rng, n.Blocks(pattern.size, pattern.rules, pattern.causal_, part)) for rng, part in inner]
    if depends_on_heads(pattern):
        return None
    return [(range(heads), pattern)]


def lattice_decomposition(pattern: n.Pattern, q_len: int, kv_len: int, heads: int,
                          device) -> tuple[HeadGroupPlan, ...] | None:
    """The lattice plan of ``pattern`` for self-attention of length ``q_len`` over
    ``heads`` heads, or None when the plan does not apply (see the module docstring). It
    applies only when at least one head group has a genuine lattice (a strict subset of
    positions or folded chunks)."""
    if q_len != kv_len or score_mods(pattern) or pattern.buffer_names():
        return None
    groups = _split_heads(mask_part(pattern), heads)
    if groups is None:
        return None
    plans, useful = [], False
    for rng, part in groups:
        parts = _decompose_part(part, q_len, device)
        if parts is None:
            parts = (LatticePart(None, part),)
        else:
            useful = True
        plans.append(HeadGroupPlan(rng, parts))
    return tuple(plans) if useful else None


def _chunk_runs(length: int, size: int) -> list[tuple[int, int, int]]:
    """``(start, count, chunk)``: a lattice of ``length`` positions as ``count`` chunks of
    ``chunk`` positions from ``start`` — the whole chunks of ``size``, then the last,
    shorter one."""
    whole = length // size * size
    runs = [(0, whole // size, size)] if whole else []
    if whole < length:
        runs.append((whole, 1, length - whole))
    return runs


def _fold(t: torch.Tensor, start: int, count: int, chunk: int) -> torch.Tensor:
    """Positions ``start .. start + count * chunk`` of ``t [B, H, L, D]`` as ``[count, B * H,
    chunk, D]``: the chunks in SDPA's batch dimension, (batch, head) pairs in its head
    dimension. A view when the batch and head dimensions merge (batch 1, or every head of a
    contiguous tensor), strided lattices included; grouped-query attention's ``head //
    group`` holds on the flattened index as on the head index."""
    if not (t.requires_grad and torch.is_grad_enabled()):
        view = _folded_view(t, start, count, chunk)
        if view is not None:
            return view
    return t[:, :, start:start + count * chunk].unflatten(2, (count, chunk)).movedim(2, 0).flatten(1, 2)


def _folded_view(t: torch.Tensor, first: int, count: int, chunk: int, step: int = 1,
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


def merges_batch_and_heads(t: torch.Tensor) -> bool:
    """Whether dimensions 0 and 1 of ``t`` (batch, heads) merge into one strided dimension
    without a copy."""
    return t.shape[0] == 1 or t.shape[1] == 1 or t.stride(0) == t.shape[1] * t.stride(1)


def _write_folded(target: torch.Tensor, part: LatticePart, start: int, count: int, chunk: int,
                  folded: torch.Tensor) -> None:
    """Write ``folded`` (``[count, B * H, chunk, ...]``, as :func:`_fold` lays out the
    lattice positions ``start ..`` of ``part``) into those positions of ``target [B, H, N,
    ...]``, in place."""
    batch, heads = target.shape[:2]
    if target.dim() == 3:  # log-sum-exp rows
        target, folded = target[..., None], folded[..., None]
    dest = part.folded_view(target, start, count, chunk)
    view = None if dest is not None else part.view(target)
    if view is not None:
        dest = view[:, :, start:start + count * chunk].unflatten(2, (count, chunk))
        folded = folded.unflatten(1, (batch, heads)).movedim(0, 2)  # [B, H, count, chunk, ...]
    if dest is not None:
        dest.copy_(folded)
        return
    values = folded.unflatten(1, (batch, heads)).movedim(0, 2).flatten(2, 3)
    target.index_copy_(2, part.positions[start:start + count * chunk], values)


def _fold_chunks(q, k, v, size: int, scale: float, need_lse: bool):
    """``chunks(size)`` attention ``(out, lse or None)`` of lattices ``q``, ``k``, ``v``
    ``[B, H, L, D]`` with gradients: the folds are copied (their backward is then a plain
    reshape)."""
    batch, heads, _, _ = q.shape
    outs, lses = [], []
    for start, count, chunk in _chunk_runs(q.shape[2], size):
        out, lse = sdpa_with_lse(*(_fold(t, start, count, chunk).contiguous() for t in (q, k, v)), scale, need_lse)
        outs.append(out.unflatten(1, (batch, heads)).movedim(0, 2).flatten(2, 3))
        if need_lse:
            lses.append(lse.unflatten(1, (batch, heads)).movedim(0, 2).flatten(2, 3))
    return torch.cat(outs, dim=2), (torch.cat(lses, dim=2) if need_lse else None)


def _group_inputs(q, k, v, heads: range):
    """``(q, k, v, kv)`` of one head group: its query heads, the key/value heads they read,
    and those heads' indices (:func:`_kv_heads`)."""
    kv = _kv_heads(heads, q.shape[1] // k.shape[1], q.device)
    qg = q[:, heads.start:heads.stop]
    if isinstance(kv, slice):
        return qg, k[:, kv], v[:, kv], kv
    return qg, k.index_select(1, kv), v.index_select(1, kv), kv


def _kv_heads(heads: range, group: int, device) -> slice | torch.Tensor:
    """The key/value heads that query heads ``heads`` read (``group`` query heads per
    key/value head): a slice, or an index tensor when ``heads`` does not cover whole groups
    of query heads sharing a key/value head."""
    if heads.start % group == 0 and heads.stop % group == 0:
        return slice(heads.start // group, heads.stop // group)
    return torch.arange(heads.start, heads.stop, device=device) // group


def _output(q: torch.Tensor, v: torch.Tensor, plan: tuple[HeadGroupPlan, ...]) -> torch.Tensor:
    """The output tensor, zero on the heads of :func:`_zeroed_heads` (the lattices then
    write their rows)."""
    out = q.new_empty(*q.shape[:3], v.shape[-1])
    _zero_heads(out, _zeroed_heads(plan, q.shape[2]))
    return out


def _zero_heads(t: torch.Tensor, heads) -> None:
    """Zero each range of ``heads`` (dimension 1) of ``t``, in place: one contiguous fill
    per range when ``t`` is contiguous."""
    for rng in heads:
        t[:, rng.start:rng.stop].zero_()


def sdpa_with_lse(q, k, v, scale: float, need_lse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Dense attention by the fused SDPA kernel (GQA when ``k``/``v`` have fewer heads);
    with ``need_lse`` also the log-sum-exp (float32, float64 for float64 inputs), computed
    without gradient from ``QK^T`` a bounded slab of query rows at a time."""
    group = q.shape[1] // k.shape[1]
    out = F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=group > 1)
    if not need_lse:
        return out, None
    with torch.no_grad():
        compute = torch.promote_types(q.dtype, torch.float32)  # float32, or float64 for float64
        keys = (k.repeat_interleave(group, 1) if group > 1 else k).to(compute)
        rows = max(1, LSE_BUDGET // max(1, q.shape[0] * q.shape[1] * k.shape[2]))
        lse = torch.cat([
            torch.logsumexp((q[:, :, i:i + rows].to(compute) @ keys.transpose(-1, -2)) * scale, dim=-1)
            for i in range(0, q.shape[2], rows)
        ], dim=2)
    return out, lse


def lattice_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                      plan: tuple[HeadGroupPlan, ...], scale: float, need_lse: bool,
                      run_part: Callable[..., tuple]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention by the lattice ``plan``: ``(out, lse or None)``. ``run_part(pattern, q, k,
    v) -> (out, lse)`` computes a sub-problem whose pattern is not ``chunks`` through that
    pattern's own plan.

    Without gradients, chunk parts are folded as views and written into the output once.
    With gradients and only chunk parts (LongNet's ``segments``), :class:`_ChunkLattice`
    writes each part's gradients straight into the positions it read; otherwise autograd
    runs through copies."""
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    chunks_only = all(isinstance(part.pattern, n.Chunks) for head_plan in plan for part in head_plan.parts)
    if grad and chunks_only and not need_lse:
        return _ChunkLattice.apply(q, k, v, plan, scale), None
    out = _output(q, v, plan)
    lse_dtype = torch.promote_types(q.dtype, torch.float32)
    lse = torch.full(q.shape[:3], float("-inf"), device=q.device, dtype=lse_dtype) if need_lse else None
    if not grad:  # chunk parts written in place, once
        for rng, _, part, start, count, chunk, folded in _chunk_folds(q, k, v, plan):
            part_out, part_lse = sdpa_with_lse(*folded, scale, need_lse)
            _write_folded(out[:, rng.start:rng.stop], part, start, count, chunk, part_out)
            if need_lse:
                _write_folded(lse[:, rng.start:rng.stop], part, start, count, chunk, part_lse)
    for head_plan in plan:
        # Parts left: those whose positions occur at this length, and not written above.
        parts = [part for part in head_plan.parts
                 if part.length != 0 and (grad or not isinstance(part.pattern, n.Chunks))]
        if not parts:
            continue
        rng = head_plan.heads
        qg, kg, vg, _ = _group_inputs(q, k, v, rng)
        for part in parts:
            sq, sk, sv = part.take(qg), part.take(kg), part.take(vg)
            if isinstance(part.pattern, n.Chunks):
                part_out, part_lse = _fold_chunks(sq, sk, sv, part.pattern.size, scale, need_lse)
            else:
                part_out, part_lse = run_part(part.pattern, sq, sk, sv)
            part.put(out[:, rng.start:rng.stop], part_out.to(out.dtype))
            if need_lse:
                part.put(lse[:, rng.start:rng.stop, :, None], part_lse.to(lse_dtype)[..., None])
    if not out.requires_grad and grad:
        # No lattice position occurs at this length: the output is all zeros, kept in the
        # autograd graph so that gradients (zeros) reach the inputs.
        out = out + 0.0 * (q.sum() + k.sum() + v.sum())
    return out, lse


Geometry = tuple[tuple[int, ...], tuple[int, ...], int]  # size, stride, offset from the tensor's own


def _geometry(view: torch.Tensor, base: torch.Tensor) -> Geometry:
    """``view`` of ``base`` as ``as_strided`` arguments, its offset relative to ``base``'s."""
    return tuple(view.shape), view.stride(), view.storage_offset() - base.storage_offset()


def _strided(t: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """The view of ``t`` that ``geometry`` (from :func:`_geometry`) describes."""
    size, stride, offset = geometry
    return t.as_strided(size, stride, t.storage_offset() + offset)


@dataclass(frozen=True)
class LatticeProgram:
    """A lattice plan without gradients or log-sum-exp, resolved for inputs of one layout
    (shapes and strides): each chunk run's folded ``q``, ``k``, ``v`` and output positions
    as ``as_strided`` geometry, and the heads zeroed (:func:`_zeroed_heads`). A call then
    makes one view per tensor per run, one SDPA call and one copy per run, and one fill per
    run of zeroed heads: the same operations as :func:`lattice_attention`, without
    re-deriving every view on the host at each call.

    On CUDA the runs but the first go to side streams (:func:`side_streams`), forked from
    the caller's stream and joined back before the call returns, so their kernels overlap:
    a run of long chunks on few heads (LongNet's widest segments) is too few thread blocks
    to fill the GPU alone. Runs are ordered longest chunks first; the first runs on the
    caller's stream, after the zero fills, which thus overlap the side streams' attention
    (memory-bound fills beside compute-bound attention); a side run waits for the fills
    only before its copy into the output."""

    out_shape: tuple[int, ...]
    zeroed_heads: tuple[range, ...]  # the runs of zeroed heads
    runs: tuple[tuple[Geometry, Geometry, Geometry, Geometry], ...]  # q, k, v, out

    @staticmethod
    def build(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              plan: tuple[HeadGroupPlan, ...]) -> LatticeProgram | None:
        """The program of ``plan`` for inputs laid out as ``q``, ``k``, ``v``, or None when
        some part is not ``chunks`` or some run is not a view (then
        :func:`lattice_attention` runs it)."""
        if any(part.length != 0 and not isinstance(part.pattern, n.Chunks) for head_plan in plan
               for part in head_plan.parts):
            return None
        meta = tuple(torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta") for t in (q, k, v))
        out = torch.empty(*q.shape[:3], v.shape[-1], dtype=q.dtype, device="meta")
        zeroed = tuple(_zeroed_heads(plan, q.shape[2]))
        runs = []
        for rng, kv, part, start, count, chunk, folded in _chunk_folds(*meta, plan):
            dest = part.folded_view(out[:, rng.start:rng.stop], start, count, chunk)
            # Views of the inputs themselves (not of gathered copies) and of the output.
            if dest is None or not isinstance(kv, slice) or any(f._base is not m for f, m in zip(folded, meta)):
                return None
            runs.append(tuple(_geometry(view, base) for view, base in zip((*folded, dest), (*meta, out))))
        runs.sort(key=lambda run: -run[0][0][2])  # longest chunks (q's size [count, B*H, chunk, D]) first
        return LatticeProgram(tuple(out.shape), zeroed, tuple(runs))

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        out = q.new_empty(self.out_shape)
        gqa = q.shape[1] != k.shape[1]
        if not q.is_cuda or len(self.runs) <= 1:
            _zero_heads(out, self.zeroed_heads)
            for run in self.runs:
                _attend_run(run, q, k, v, out, scale, gqa)
            return out
        caller = torch.cuda.current_stream(q.device)
        side = side_streams(q.device, len(self.runs) - 1)
        side.fork.record(caller)
        # The fills run on the caller's stream while the side streams' attention runs; a
        # side run's copy into the output waits for them (``filled``).
        _zero_heads(out, self.zeroed_heads)
        filled = side.filled if self.zeroed_heads else None
        if filled is not None:
            filled.record(caller)
        current_device = torch.cuda.current_device()
        try:
            for i, run in enumerate(self.runs[1:]):
                stream = side.streams[i % len(side.streams)]
                stream.wait_event(side.fork)
                torch.cuda.set_stream(stream)  # also makes the stream's device current
                _attend_run(run, q, k, v, out, scale, gqa, filled)
        finally:
            torch.cuda.set_stream(caller)
            if current_device != caller.device_index:
                torch.cuda.set_device(current_device)
        _attend_run(self.runs[0], q, k, v, out, scale, gqa)  # the longest, on the caller's stream
        # Everything after the call (frees of q, k, v or out included) is ordered after the runs.
        for stream, joined in zip(side.streams, side.joins):
            joined.record(stream)
            caller.wait_event(joined)
        return out


def _attend_run(run: tuple[Geometry, Geometry, Geometry, Geometry], q: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor, out: torch.Tensor, scale: float, gqa: bool,
                written_after: torch.cuda.Event | None = None) -> None:
    """One run of a :class:`LatticeProgram`: SDPA on its folded views, written into ``out``
    (on the current stream, after ``written_after`` when given)."""
    q_run, k_run, v_run, out_run = run
    result = F.scaled_dot_product_attention(_strided(q, q_run), _strided(k, k_run), _strided(v, v_run),
                                            scale=scale, enable_gqa=gqa)
    if written_after is not None:
        torch.cuda.current_stream().wait_event(written_after)
    _strided(out, out_run).copy_(result)


#: Side streams per CUDA device and thread, at most this many (runs beyond share them in turn).
MAX_SIDE_STREAMS = 8


@dataclass
class SideStreams:
    """CUDA streams of one device and thread with the events that fork work onto them
    (``fork``, recorded on the caller's stream), order it after the caller's zero fills
    (``filled``) and join it back (``joins``, one per stream). Events are re-recorded by
    every call: a wait enqueued before the next record keeps the point it waited for."""

    streams: list
    fork: torch.cuda.Event
    filled: torch.cuda.Event
    joins: list


_side = threading.local()


def side_streams(device: torch.device, count: int) -> SideStreams:
    """The first ``min(count, MAX_SIDE_STREAMS)`` side streams of ``device`` for this
    thread, created on first use. They are the thread's own (as are their events), so
    calls from several threads never re-record an event another thread is waiting on."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    count = min(count, MAX_SIDE_STREAMS)
    per_device = getattr(_side, "per_device", None)
    if per_device is None:
        per_device = _side.per_device = {}
    side = per_device.get(index)
    if side is None:
        side = per_device[index] = SideStreams([], torch.cuda.Event(), torch.cuda.Event(), [])
    while len(side.streams) < count:
        side.streams.append(torch.cuda.Stream(index))
        side.joins.append(torch.cuda.Event())
    if len(side.streams) == count:
        return side
    return SideStreams(side.streams[:count], side.fork, side.filled, side.joins[:count])


_NOT_BUILT = object()


class LatticeAttention:
    """:func:`lattice_attention` of one ``plan``, with calls without gradients or
    log-sum-exp run by a :class:`LatticeProgram` per input layout (built on the first call
    of that layout; at most ``MAX_PROGRAMS`` layouts are kept)."""

    MAX_PROGRAMS = 8

    def __init__(self, plan: tuple[HeadGroupPlan, ...], scale: float, need_lse: bool,
                 run_part: Callable[..., tuple]):
        self.plan, self.scale, self.need_lse, self.run_part = plan, scale, need_lse, run_part
        self._programs: dict = {}

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.need_lse and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad
                                                                    or v.requires_grad)):
            layout = (q.shape, q.stride(), k.shape, k.stride(), v.shape, v.stride(), q.dtype, q.device)
            program = self._programs.get(layout, _NOT_BUILT)  # None: this layout has no program
            if program is _NOT_BUILT:  # concurrent calls may build it twice, with the same result
                if len(self._programs) >= self.MAX_PROGRAMS:
                    self._programs.clear()
                program = self._programs[layout] = LatticeProgram.build(q, k, v, self.plan)
            if program is not None:
                return program(q, k, v, self.scale), None
        return lattice_attention(q, k, v, plan=self.plan, scale=self.scale, need_lse=self.need_lse,
                                 run_part=self.run_part)


class _ChunkLattice(torch.autograd.Function):
    """Lattice attention with gradients when every part is ``chunks`` (no log-sum-exp).

    Autograd through the lattice views would give every slice of every part a gradient of
    the whole input's size (zeros plus a copy) and sum them. Here the forward builds each
    chunk run's SDPA graph on its folded views made leaves, and the backward writes each
    run's gradients straight into the positions it read: three gradients zeroed only on the
    heads whose lattices leave rows unwritten, one strided write per run. The first
    backward consumes those graphs; a second one (with ``retain_graph``) rebuilds them from
    the saved inputs."""

    @staticmethod
    def forward(ctx, q, k, v, plan, scale):
        out = _output(q, v, plan)
        ctx.runs = _chunk_graphs(q, k, v, plan, scale, out)
        ctx.plan, ctx.scale = plan, scale
        ctx.save_for_backward(q, k, v)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v = ctx.saved_tensors
        runs = ctx.runs if ctx.runs is not None else _chunk_graphs(q, k, v, ctx.plan, ctx.scale)
        ctx.runs = None
        dq, dk, dv = _lattice_gradients(q, k, v, ctx.plan, grad_out.dtype)
        # One pass of the autograd engine over every run's graph: a pass per run costs host
        # time in proportion. The runs' folded gradients are then held at once: the size of
        # the positions they read.
        results = [result for *_, result in runs]
        leaves = [leaf for *_, run_leaves, _ in runs for leaf in run_leaves]
        grads = [part.fold(grad_out[:, rng.start:rng.stop], start, count, chunk)
                 for rng, _, part, start, count, chunk, _, _ in runs]
        folded_grads = torch.autograd.grad(results, leaves, grads) if runs else ()
        for i, (rng, kv, part, start, count, chunk, _, _) in enumerate(runs):
            dqf, dkf, dvf = folded_grads[3 * i:3 * i + 3]
            _write_folded(dq[:, rng.start:rng.stop], part, start, count, chunk, dqf)
            for total, folded in ((dk, dkf), (dv, dvf)):
                if isinstance(kv, slice):
                    _write_folded(total[:, kv], part, start, count, chunk, folded)
                else:  # query heads of the group read repeated key/value heads: sum them
                    per_head = total.new_zeros(total.shape[0], kv.numel(), *total.shape[2:])
                    _write_folded(per_head, part, start, count, chunk, folded)
                    total.index_add_(1, kv, per_head)
        return dq, dk, dv, None, None


def _lattice_gradients(q, k, v, plan: tuple[HeadGroupPlan, ...], dtype: torch.dtype):
    """``(dq, dk, dv)`` for :class:`_ChunkLattice`'s backward to write into. The lattices
    of a head group are disjoint, so its runs write each of its positions once: only the
    heads of groups whose lattices leave rows unwritten are zeroed (:func:`_zeroed_heads`),
    query heads and the key/value heads such a group owns (a slice). Key/value heads that
    several groups read through an index are zeroed whole, for those groups to add into."""
    dq, dk, dv = (torch.empty_like(t, dtype=dtype) for t in (q, k, v))
    length, group = q.shape[2], q.shape[1] // k.shape[1]
    _zero_heads(dq, _zeroed_heads(plan, length))
    owned, shared = [], []
    for head_plan in plan:
        kv = _kv_heads(head_plan.heads, group, q.device)
        if not isinstance(kv, slice):
            shared.append(kv)
        elif not _writes_every_row(head_plan.parts, length):
            owned.append(range(kv.start, kv.stop))
    owned = _merged(owned)
    _zero_heads(dk, owned)
    _zero_heads(dv, owned)
    if shared:
        heads = torch.cat(shared)
        dk.index_fill_(1, heads, 0)
        dv.index_fill_(1, heads, 0)
    return dq, dk, dv


def _chunk_graphs(q, k, v, plan: tuple[HeadGroupPlan, ...], scale: float, out: torch.Tensor | None = None):
    """Each chunk run of ``plan`` as ``(heads, kv, part, start, count, chunk, leaves,
    result)``: SDPA computed with autograd on the run's folded ``q``, ``k``, ``v`` views
    made leaves (``leaves``); ``result`` also written into ``out`` when given."""
    runs = []
    with torch.enable_grad():
        # Folded from detached inputs: views, made leaves of their own graphs below.
        for rng, kv, part, start, count, chunk, folded in _chunk_folds(q.detach(), k.detach(), v.detach(), plan):
            leaves = tuple(t.detach().requires_grad_() for t in folded)
            result, _ = sdpa_with_lse(*leaves, scale, False)
            if out is not None:
                _write_folded(out[:, rng.start:rng.stop], part, start, count, chunk, result.detach())
            runs.append((rng, kv, part, start, count, chunk, leaves, result))
    return runs


def _chunk_folds(q, k, v, plan: tuple[HeadGroupPlan, ...]):
    """Every chunk run of the ``chunks`` parts of ``plan`` that occur at this length:
    ``(heads, kv, part, start, count, chunk, (q, k, v) folded by _fold)``, ``kv`` as
    :func:`_group_inputs` gives it."""
    for head_plan in plan:
        qg, kg, vg, kv = _group_inputs(q, k, v, head_plan.heads)
        for part in head_plan.parts:
            if part.length == 0 or not isinstance(part.pattern, n.Chunks):
                continue
            taken = None  # (q, k, v) gathered, for runs that no view holds
            length = qg.shape[2] if part.length is None else part.length
            for start, count, chunk in _chunk_runs(length, part.pattern.size):
                folded = tuple(part.folded_view(t, start, count, chunk) for t in (qg, kg, vg))
                if any(t is None for t in folded):
                    taken = taken or tuple(part.take(t) for t in (qg, kg, vg))
                    folded = tuple(_fold(t, start, count, chunk) for t in taken)
                yield head_plan.heads, kv, part, start, count, chunk, folded


def _writes_every_row(parts: tuple[LatticePart, ...], length: int) -> bool:
    """Whether the parts of one head group together hold all ``length`` positions (they
    are disjoint, so their sizes add up to ``length`` exactly then)."""
    return sum(length if part.length is None else part.length for part in parts) == length


def _zeroed_heads(plan: tuple[HeadGroupPlan, ...], length: int) -> list[range]:
    """The query heads of the groups whose lattices leave some row unwritten (rows with no
    allowed key output 0; their gradients are 0), merged into runs of consecutive heads.

    Such heads are zeroed whole, then their lattice rows are overwritten: a fill of whole
    heads is one contiguous region per run, which an H100 fills at memory bandwidth; a
    fill of the off-lattice rows alone is strided (rows of ``D`` elements) and ran at about
    a third of that, besides costing a kernel and several views per region."""
    return _merged(head_plan.heads for head_plan in plan if not _writes_every_row(head_plan.parts, length))


def _merged(ranges) -> list[range]:
    """Disjoint ``ranges`` sorted, with adjacent ones joined."""
    merged: list[range] = []
    for rng in sorted(ranges, key=lambda r: r.start):
        if merged and merged[-1].stop == rng.start:
            merged[-1] = range(merged[-1].start, rng.stop)
        else:
            merged.append(rng)
    return merged
