"""The tile_sdpa plan's attention with gradients when every group is views of the inputs
(on the CPU, one key/value head per query head): one autograd function whose forward runs
PyTorch's fused CPU attention with its log-sum-exp on each group's slabs, and whose
backward runs that kernel's backward on the same slabs, adding the slabs' gradients
straight into one gradient of each input (:class:`~sparsedsl.plans.tile_slabs.SlabRuns`),
where autograd through the views would zero and add a whole gradient per group and sum
overlapping key slabs through ``unfold``'s backward. Rows that see no key (given one
masked-in key by the plan) have their output and its gradient multiplied by 0. The
backward is not itself differentiable (the planner wraps the plan for second-order
gradients)."""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .tile_slabs import SlabRuns, assemble, tile_major


def _attend(q, k, v, mask, scale):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=mask,
                                                                     scale=scale)


class ViewGroupsAttention(torch.autograd.Function):
    """``apply(q, k, v, runs, heights, masks, layout, scale)``: the attention of view groups
    ``runs`` (:class:`SlabRuns`, each ``heights[i]`` query tiles a span) with ``masks``
    (``(additive mask or None, keep or None)`` each); ``layout`` is ``(order, q_block,
    num_q_tiles)`` for :func:`~sparsedsl.plans.tile_slabs.assemble`."""

    @staticmethod
    def forward(ctx, q, k, v, runs: list[SlabRuns], heights: list[int], masks: list, layout, scale: float):
        order, q_block, num_q_tiles = layout
        pads, outs, stats = {}, [], []
        for group, (mask, keep) in zip(runs, masks):
            out, lse = _attend(group.queries(q, pads), group.keys(k, pads), group.keys(v, pads), mask, scale)
            stats += [out, lse]
            outs.append(out if keep is None else out * keep)
        ctx.save_for_backward(q, k, v, *stats)
        ctx.runs, ctx.masks, ctx.scale = runs, masks, scale
        tiles = [tile_major(out, height, q_block) for out, height in zip(outs, heights)]
        return assemble(tiles, order, q, q.shape[2], q_block, num_q_tiles, v.shape[-1])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, *stats = ctx.saved_tensors
        runs, kv_len = ctx.runs, k.shape[2]
        before, past = max(g.k_before for g in runs), max(g.k_past for g in runs)
        dq = torch.zeros_like(q)
        dk, dv = (t.new_zeros(*t.shape[:2], before + kv_len + past, t.shape[3]) for t in (k, v))
        pads = {}
        for i, (group, (mask, keep)) in enumerate(zip(runs, ctx.masks)):
            grad = group.queries(grad_out, pads)
            grad = grad.contiguous() if keep is None else grad * keep
            grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                grad, group.queries(q, pads), group.keys(k, pads), group.keys(v, pads), stats[2 * i],
                stats[2 * i + 1], 0.0, False, attn_mask=mask, scale=ctx.scale)
            group.add_queries(dq, grads[0])
            window = (before - group.k_before, group.k_before + kv_len + group.k_past)
            group.add_keys(dk.narrow(2, *window), grads[1])
            group.add_keys(dv.narrow(2, *window), grads[2])
        return dq, dk.narrow(2, before, kv_len), dv.narrow(2, before, kv_len), None, None, None, None, None
