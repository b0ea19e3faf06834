"""The tile_sdpa plan's attention on the CPU where every group is views of the inputs: one
autograd function whose forward runs PyTorch's fused CPU attention with its log-sum-exp on
each group's slabs, and whose backward runs that kernel's backward on the same slabs,
adding the slabs' gradients straight into one gradient of each input
(:class:`~sparsedsl.plans.tile_slabs.SlabRuns`), where autograd through the views would
zero and add a whole gradient per group and sum overlapping key slabs through ``unfold``'s
backward.

A group may also hold *other parts*: key tiles its spans see besides their run, each part
a second fused call on the same query slabs against those tiles' keys, gathered (once for
all spans where every span sees the same tiles: global columns; per span otherwise: random
blocks). The parts are merged by their log-sum-exps into one softmax: ``L =
logsumexp_p(lse_p)``, ``out = sum_p exp(lse_p - L) out_p``. Each part's backward, given the
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

from .tile_slabs import SlabRuns, assemble, padded, tile_major


@dataclass(frozen=True)
class KeyPart:
    """Key tiles a group's spans see besides their run: ``tiles`` int64 ``[1 or count, T]``
    (one row: every span sees the same), their additive ``mask`` (None: all full) and the
    rows it leaves without keys, ``dead`` (bool, broadcastable to ``[count, B * H, chunk]``;
    None: none)."""

    tiles: torch.Tensor
    mask: torch.Tensor | None
    dead: torch.Tensor | None


@dataclass(frozen=True)
class ViewGroup:
    """One group for :class:`ViewGroupsAttention`: its slabs ``runs``, ``height`` query
    tiles a span, the additive ``mask`` of its runs (None: every tile full) and ``keep``
    (0 on rows without keys, the plan's masked-in key there; None: every row has one).
    With other ``parts``, also the rows the run leaves without keys, ``dead`` (``keep`` is
    then None)."""

    runs: SlabRuns
    height: int
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


def _part_keys(t: torch.Tensor, tiles: torch.Tensor, block: int, count: int, pads: dict) -> torch.Tensor:
    """The keys (or values) of ``tiles`` (``[1 or count, T]``) of ``t [B, H, K, D]`` as
    ``[count, B * H, T * block, D]``: gathered once and repeated by a stride-0 view where
    every span sees the same tiles."""
    batch, heads, length, dim = t.shape
    whole = padded(t, 0, -length % block, pads).view(batch * heads, -1, block, dim)
    taken = whole.index_select(1, tiles.flatten()).view(batch * heads, tiles.shape[0], -1, dim).movedim(1, 0)
    return taken.expand(count, -1, -1, -1)


def _add_part_keys(total: torch.Tensor, tiles: torch.Tensor, grads: torch.Tensor, before: int, block: int) -> None:
    """Add key-part gradients ``grads [count, B * H, T * block, D]`` into ``total [B, H, L,
    D]`` (key position ``p`` at ``before + p``) at the positions of ``tiles`` ``[1 or
    count, T]``, in place."""
    if tiles.shape[0] == 1:
        grads = grads.sum(0, keepdim=True)
    positions = (before + tiles.flatten()[:, None] * block + torch.arange(block, device=tiles.device)).flatten()
    batch, heads = total.shape[:2]
    total.index_add_(2, positions, grads.movedim(0, 1).reshape(batch, heads, -1, grads.shape[-1]))


def _merge(parts, dead):
    """``(out, lse)`` of parts ``[(out_p, lse_p), ...]`` merged by log-sum-exp, with
    ``lse_p = -inf`` on the rows ``dead[p]`` leaves without keys (None: none); rows no part covers
    output 0 with ``lse = -inf``."""
    lses = torch.stack([lse if rows is None else lse.masked_fill(rows, float("-inf"))
                        for (_, lse), rows in zip(parts, dead)])
    total = torch.logsumexp(lses, 0)
    weights = torch.exp(lses - total.masked_fill(total == float("-inf"), 0.0))[..., None]
    out = weights[0] * parts[0][0]
    for weight, (part_out, _) in zip(weights[1:], parts[1:]):
        out = out + weight * part_out
    return out.to(parts[0][0].dtype), total


def view_group_forward(q, k, v, group: ViewGroup, kv_block: int, scale: float, pads: dict):
    """``(out, lse, shown)`` of one group: the kernel's (or the merged) output and
    log-sum-exp on its query slabs ``[count, B * H, chunk, ...]``, and the output shown
    (rows without keys zeroed)."""
    queries = group.runs.queries(q, pads)
    run = _attend(queries, group.runs.keys(k, pads), group.runs.keys(v, pads), group.mask, scale)
    if not group.parts:
        out, lse = run
        return out, lse, (out if group.keep is None else out * group.keep)
    count = group.runs.count
    parts = [_attend(queries, _part_keys(k, part.tiles, kv_block, count, pads),
                     _part_keys(v, part.tiles, kv_block, count, pads), part.mask, scale) for part in group.parts]
    out, lse = _merge([run, *parts], [group.dead, *(part.dead for part in group.parts)])
    return out, lse, out


class ViewGroupsAttention(torch.autograd.Function):
    """``apply(q, k, v, groups, layout, scale)``: the attention of :class:`ViewGroup`
    ``groups``; ``layout`` is ``(order, q_block, kv_block, num_q_tiles)``, ``order`` as for
    :func:`~sparsedsl.plans.tile_slabs.assemble`."""

    @staticmethod
    def forward(ctx, q, k, v, groups: list[ViewGroup], layout, scale: float):
        order, q_block, kv_block, num_q_tiles = layout
        pads, outs, stats = {}, [], []
        for group in groups:
            out, lse, shown = view_group_forward(q, k, v, group, kv_block, scale, pads)
            stats += [out, lse]
            outs.append(tile_major(shown, group.height, q_block))
        ctx.save_for_backward(q, k, v, *stats)
        ctx.groups, ctx.scale, ctx.kv_block = groups, scale, kv_block
        return assemble(outs, order, q, q.shape[2], q_block, num_q_tiles, v.shape[-1])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, *stats = ctx.saved_tensors
        groups, scale, block, kv_len = ctx.groups, ctx.scale, ctx.kv_block, k.shape[2]
        before = max(g.runs.k_before for g in groups)
        length = before + max(max(kv_len + g.runs.k_past for g in groups), -(-kv_len // block) * block)
        dq = torch.zeros_like(q)
        dk, dv = (t.new_zeros(*t.shape[:2], length, t.shape[3]) for t in (k, v))
        pads = {}
        for i, group in enumerate(groups):
            out, lse = stats[2 * i], stats[2 * i + 1]
            runs = group.runs
            grad = runs.queries(grad_out, pads)
            queries = runs.queries(q, pads)
            if not group.parts:
                grad = grad.contiguous() if group.keep is None else grad * group.keep
            else:  # rows no part covers: no gradient, and a finite lse for the kernel
                none = lse == float("-inf")
                grad, lse = grad.masked_fill(none[..., None], 0.0), lse.masked_fill(none, 0.0)
            grads = _attend_backward(grad, queries, runs.keys(k, pads), runs.keys(v, pads), out, lse, group.mask,
                                     scale)
            runs.add_queries(dq, grads[0])
            window = (before - runs.k_before, runs.k_before + kv_len + runs.k_past)
            runs.add_keys(dk.narrow(2, *window), grads[1])
            runs.add_keys(dv.narrow(2, *window), grads[2])
            for part in group.parts:
                count = runs.count
                grads = _attend_backward(grad, queries, _part_keys(k, part.tiles, block, count, pads),
                                         _part_keys(v, part.tiles, block, count, pads), out, lse, part.mask, scale)
                runs.add_queries(dq, grads[0])
                _add_part_keys(dk, part.tiles, grads[1], before, block)
                _add_part_keys(dv, part.tiles, grads[2], before, block)
        return dq, dk.narrow(2, before, kv_len), dv.narrow(2, before, kv_len), None, None, None
