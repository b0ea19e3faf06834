"""The tile_sdpa plan's attention on the CPU where every group is views of the inputs: one
autograd function whose forward runs PyTorch's fused CPU attention with its log-sum-exp on
each group's slabs, and whose backward runs that kernel's backward on the same slabs,
adding the slabs' gradients straight into one gradient of each input
(:class:`~sparsedsl.plans.tile_slabs.SlabRuns`), where autograd through the views would
zero and add a whole gradient per group and sum overlapping key slabs through ``unfold``'s
backward.

A group may also hold *other parts*: keys its spans see besides their run, each part
further fused calls against those keys, gathered: once for all spans where every span sees
the same keys (global columns, only the keys some row allows; one call on the spans' query
run where the spans are consecutive), else per span, in chunks of spans (random blocks).
The parts are merged by their log-sum-exps into one softmax, one call at a time: ``L =
logsumexp_p(lse_p)``, ``out = sum_p exp(lse_p - L) out_p``, written straight into the
output buffer. Each part's backward, given the
merged ``out`` and ``L``, computes exactly its share of the softmax's gradient. A part
whose mask leaves a row without keys counts ``lse = -inf`` there; a row without keys in
any part outputs 0.

In a group of its run alone, rows that see no key (given one masked-in key by the plan)
have their output and its gradient multiplied by 0. The backward is not itself
differentiable (the planner wraps the plan for second-order gradients)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from .tile_slabs import SlabRuns, new_output, padded


@dataclass(frozen=True)
class KeyPart:
    """Keys a group's spans see besides their run: key ``positions`` int64 ``[1 or count,
    P]`` (one row: every span sees the same; positions up to ``past`` past the last key
    are padding, masked out), their additive ``mask`` (None: all allowed) and the rows it
    leaves without keys, ``dead`` (bool, broadcastable to ``[count, B * H, chunk]``; None:
    none). A ``run`` part (the same keys for consecutive spans) is one kernel call whose
    queries are the spans' run (:meth:`~sparsedsl.plans.tile_slabs.SlabRuns.query_run`),
    its mask ``[1, 1, count * chunk, P]``; else one call on the spans' slabs, its mask
    ``[count, 1, chunk, P]``."""

    positions: torch.Tensor
    mask: torch.Tensor | None
    dead: torch.Tensor | None
    past: int
    run: bool

    @classmethod
    def of(cls, tiles: torch.Tensor, columns: torch.Tensor | None, mask: torch.Tensor | None,
           dead: torch.Tensor | None, runs: SlabRuns, kv_block: int, kv_len: int) -> "KeyPart":
        """The part of key ``tiles`` ``[1 or count, T]`` (only the keys ``columns`` of them
        laid end to end, where not None) with its additive slab ``mask`` ``[count, 1,
        chunk, P]``: one run where every span sees the same keys and the spans are
        consecutive."""
        positions = (tiles[..., None] * kv_block + torch.arange(kv_block, device=tiles.device)).flatten(-2)
        if columns is not None:
            positions = positions[:, columns]
        run = tiles.shape[0] == 1 and runs.consecutive
        if run and mask is not None:
            mask = mask.transpose(0, 1).flatten(1, 2)[None]
        return cls(positions, mask, dead, max(0, int(positions.max()) + 1 - kv_len), run)


@dataclass(frozen=True)
class ViewGroup:
    """One group for :class:`ViewGroupsAttention`: its slabs ``runs``, the additive ``mask`` of its runs (None: every tile full) and ``keep``
    (0 on rows without keys, the plan's masked-in key there; None: every row has one).
    With other ``parts``, also the rows the run leaves without keys, ``dead`` (``keep`` is
    then None)."""

    runs: SlabRuns
    mask: torch.Tensor | None
    keep: torch.Tensor | None
    parts: tuple[KeyPart, ...] = ()
    dead: torch.Tensor | None = None


def _attend(q, k, v, mask, scale):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=mask,
                                                                     scale=scale)


def _attend_backward(grad, q, k, v, out, lse, mask, scale):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad, q, k, v, out, lse, 0.0, False, attn_mask=mask, scale=scale)


#: Bytes of keys per span-chunked kernel call: a part whose spans see different keys
#: (random blocks) gathers its keys a chunk of spans at a time, and the backward of a
#: group's own slabs runs a chunk at a time (its key gradients are the slabs' size: five
#: times the keys for a window on 64-token tiles). An allocation this small reuses the
#: allocator's pages, where one of every span's keys (a hundred MB at 16K tokens) is
#: mapped afresh, page by page, at every call.
GATHER_BYTES = 1 << 22


def _chunks(count: int, keys: int, t: torch.Tensor) -> list[slice]:
    """``count`` spans in chunks of about :data:`GATHER_BYTES` of ``keys`` keys each of
    ``t [B, H, K, D]``'s heads and size."""
    span_bytes = t.shape[0] * t.shape[1] * keys * t.shape[3] * t.element_size()
    step = max(1, GATHER_BYTES // span_bytes)
    return [slice(start, min(start + step, count)) for start in range(0, count, step)]


def _span_chunks(part: KeyPart, count: int, t: torch.Tensor) -> list[slice]:
    """The spans of a group (``count``) in the chunks a part runs them in: all at once
    where every span sees the same keys, else :func:`_chunks` of its keys."""
    return [slice(0, count)] if part.positions.shape[0] == 1 else _chunks(count, part.positions.shape[1], t)


def _part_keys(t: torch.Tensor, part: KeyPart, spans: slice, pads: dict) -> torch.Tensor:
    """The keys (or values) of ``part`` of ``t [B, H, K, D]`` for the group's ``spans``:
    for a run part ``[B, H, P, D]``, else ``[spans, B * H, P, D]`` (gathered once and
    repeated by a stride-0 view where every span sees the same keys)."""
    batch, heads, _, dim = t.shape
    positions = part.positions if part.positions.shape[0] == 1 else part.positions[spans]
    whole = padded(t, 0, part.past, pads).flatten(0, 1)
    taken = whole.index_select(1, positions.flatten()).view(batch * heads, *positions.shape, dim)
    if part.run:
        return taken.view(batch, heads, -1, dim)
    return taken.movedim(1, 0).expand(spans.stop - spans.start, -1, -1, -1)


def _add_part_keys(total: torch.Tensor, part: KeyPart, grads: torch.Tensor, before: int, spans: slice) -> None:
    """Add key-part gradients of the group's ``spans`` (``[B, H, P, D]`` for a run part,
    else ``[spans, B * H, P, D]``) into ``total [B, H, L, D]`` (key position ``p`` at
    ``before + p``) at the part's positions, in place."""
    positions = part.positions
    if part.run:
        grads = grads.flatten(0, 1)[None]
    elif positions.shape[0] == 1:
        grads = grads.sum(0, keepdim=True)
    else:
        positions = positions[spans]
    total.flatten(0, 1).index_add_(1, before + positions.flatten(), grads.movedim(0, 1).flatten(1, 2))


def _part_mask(part: KeyPart, spans: slice) -> torch.Tensor | None:
    """A part's mask for the group's ``spans`` (a run part's: whole)."""
    return part.mask if part.mask is None or part.run else part.mask[spans]


def _part_runs(q, k, v, runs: SlabRuns, part: KeyPart, queries: torch.Tensor, scale: float, pads: dict):
    """A part's kernel calls: ``(spans, out, lse)`` on the slabs of the group's ``spans``
    (:func:`_span_chunks`)."""
    if part.run:
        keys, values = (_part_keys(t, part, slice(0, runs.count), pads) for t in (k, v))
        out, lse = _attend(runs.query_run(q, pads), keys, values, part.mask, scale)[:2]
        yield slice(0, runs.count), runs.as_slabs(out), runs.as_slabs(lse)
        return
    for spans in _span_chunks(part, runs.count, k):
        keys, values = (_part_keys(t, part, spans, pads) for t in (k, v))
        yield spans, *_attend(queries[spans], keys, values, _part_mask(part, spans), scale)[:2]


def _fold_in(acc: torch.Tensor, total: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Merge a part's ``(out, lse)`` into the running merge ``(acc, total)`` of the parts
    before it, in place: ``L = logaddexp(total, lse)``, ``acc = acc exp(total - L) + out
    exp(lse - L)``; rows where both are ``-inf`` stay ``acc`` times 0."""
    merged = torch.logaddexp(total, lse)
    finite = merged.masked_fill(merged == float("-inf"), 0.0)
    acc.mul_(torch.exp(total - finite)[..., None]).addcmul_(torch.exp(lse - finite)[..., None], out)
    total.copy_(merged)


def view_group_forward(q, k, v, group: ViewGroup, kv_block: int, scale: float, pads: dict,
                       dest: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One group's attention written into ``dest`` (its slabs of the output: rows without
    keys zero); returns ``(out, lse)`` on its query slabs ``[count, B * H, chunk, ...]``,
    the statistics its backward takes: the kernel's output (the merged one, ``dest``, with
    other parts) and log-sum-exp. Other parts merge into ``dest`` one kernel call at a time
    (:func:`_fold_in`), in float32 (float64 for float64 inputs), a part's ``lse`` taken as
    ``-inf`` on the rows its mask leaves without keys."""
    queries = group.runs.queries(q, pads)
    out, lse = _attend(queries, group.runs.keys(k, pads), group.runs.keys(v, pads), group.mask, scale)[:2]
    if not group.parts:
        if group.keep is None:
            dest.copy_(out)
        else:
            torch.mul(out, group.keep, out=dest)
        return out, lse
    acc = dest if dest.dtype == lse.dtype else torch.empty(dest.shape, dtype=lse.dtype)
    acc.copy_(out)
    if group.dead is not None:
        lse.masked_fill_(group.dead, float("-inf"))
    for part in group.parts:
        for spans, part_out, part_lse in _part_runs(q, k, v, group.runs, part, queries, scale, pads):
            if part.dead is not None:
                part_lse = part_lse.masked_fill(part.dead[spans], float("-inf"))
            _fold_in(acc[spans], lse[spans], part_out, part_lse)
    if acc is not dest:
        dest.copy_(acc)
    return dest, lse


def _span_grad(group: ViewGroup, grad: torch.Tensor, none: torch.Tensor | None, spans: slice) -> torch.Tensor:
    """The output gradient of a group's ``spans`` (``grad``: its query slabs of the output's
    gradient), zero on rows without keys: where ``keep`` is 0, or, with other parts, rows
    ``none`` of them covers."""
    if not group.parts:
        return grad[spans].contiguous() if group.keep is None else grad[spans] * group.keep[spans]
    return grad[spans] if none is None else grad[spans].masked_fill(none[spans][..., None], 0.0)


class ViewGroupsAttention(torch.autograd.Function):
    """``apply(q, k, v, groups, layout, scale)``: the attention of :class:`ViewGroup`
    ``groups`` as :func:`~sparsedsl.plans.tile_slabs.new_output`'s buffer ``[B, H,
    num_q_tiles * q_block, Dv]`` (the caller takes its first ``Q`` rows); ``layout`` is
    ``(held_by_none, q_block, kv_block, num_q_tiles)``, ``held_by_none`` the runs of query
    tiles no group holds (zeroed). The backward reads a merged group's output from the
    buffer (saved as the function's output)."""

    @staticmethod
    def forward(ctx, q, k, v, groups: list[ViewGroup], layout, scale: float):
        held_by_none, q_block, kv_block, num_q_tiles = layout
        out = new_output(q, num_q_tiles, q_block, v.shape[-1], held_by_none)
        pads, stats = {}, []
        for group in groups:
            group_out, lse = view_group_forward(q, k, v, group, kv_block, scale, pads, group.runs.output(out))
            stats += [None if group.parts else group_out, lse]  # a merged group's: the buffer's slabs
        ctx.save_for_backward(q, k, v, out, *stats)
        ctx.groups, ctx.scale, ctx.kv_block = groups, scale, kv_block
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, merged_out, *stats = ctx.saved_tensors
        grad_out = grad_out[:, :, :q.shape[2]]
        groups, scale, block, kv_len = ctx.groups, ctx.scale, ctx.kv_block, k.shape[2]
        before = max(g.runs.k_before for g in groups)
        length = before + max(max(kv_len + g.runs.k_past for g in groups), -(-kv_len // block) * block)
        dq = q.new_zeros(q.shape)  # contiguous: its slabs (add_queries) are views only then
        dk, dv = (t.new_zeros(*t.shape[:2], length, t.shape[3]) for t in (k, v))
        pads = {}
        for i, group in enumerate(groups):
            out, lse = stats[2 * i], stats[2 * i + 1]
            out = group.runs.output(merged_out) if out is None else out
            runs = group.runs
            grad, queries = runs.queries(grad_out, pads), runs.queries(q, pads)
            keys, values = runs.keys(k, pads), runs.keys(v, pads)
            none = None  # rows no part covers: no gradient, and a finite lse for the kernel
            if group.parts and bool((lse == float("-inf")).any()):
                none = lse == float("-inf")
                lse = lse.masked_fill(none, 0.0)

            window = (before - runs.k_before, runs.k_before + kv_len + runs.k_past)
            for spans in _chunks(runs.count, runs.span, k):
                mask = None if group.mask is None else group.mask[spans]
                grads = _attend_backward(_span_grad(group, grad, none, spans), queries[spans], keys[spans],
                                         values[spans], out[spans], lse[spans], mask, scale)
                runs.add_queries(dq, grads[0], spans.start)
                runs.add_keys(dk.narrow(2, *window), grads[1], spans.start)
                runs.add_keys(dv.narrow(2, *window), grads[2], spans.start)
            for part in group.parts:
                if part.run:  # on the spans' query run
                    keys, values = (_part_keys(t, part, slice(0, runs.count), pads) for t in (k, v))
                    run_grad, shape = runs.query_run(grad_out, pads), runs.query_run(q, pads).shape[:3]
                    if none is not None:
                        run_grad = run_grad.masked_fill(none.transpose(0, 1).reshape(shape)[..., None], 0.0)
                    grads = _attend_backward(run_grad, runs.query_run(q, pads), keys, values,
                                             merged_out.narrow(2, runs.q_first, shape[2]),
                                             lse.transpose(0, 1).reshape(shape), part.mask, scale)
                    inside = min(shape[2], q.shape[2] - runs.q_first)
                    dq.narrow(2, runs.q_first, inside).add_(grads[0].narrow(2, 0, inside))
                    _add_part_keys(dk, part, grads[1], before, slice(0, runs.count))
                    _add_part_keys(dv, part, grads[2], before, slice(0, runs.count))
                    continue
                for spans in _span_chunks(part, runs.count, k):
                    keys, values = (_part_keys(t, part, spans, pads) for t in (k, v))
                    grads = _attend_backward(_span_grad(group, grad, none, spans), queries[spans], keys, values,
                                             out[spans], lse[spans], _part_mask(part, spans), scale)
                    runs.add_queries(dq, grads[0], spans.start)
                    _add_part_keys(dk, part, grads[1], before, spans)
                    _add_part_keys(dv, part, grads[2], before, spans)
        return dq, dk.narrow(2, before, kv_len), dv.narrow(2, before, kv_len), None, None, None
