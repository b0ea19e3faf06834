"""The lattice plan with gradients when every part is ``chunks`` (LongNet's ``segments``):
an autograd function that writes each run's gradients straight into the positions it read."""

from __future__ import annotations

import torch

from ..passes.lattice import HeadGroupLattice, merged, writes_every_row, zeroed_heads
from .kernels import sdpa_with_lse, zero_heads
from .lattice_views import chunk_folds, fold, kv_heads_of, write_folded, zeroed_output


class ChunkLattice(torch.autograd.Function):
    """Lattice attention with gradients when every part is ``chunks`` (no log-sum-exp).

    Autograd through the lattice views would give every slice of every part a gradient of
    the whole input's size (zeros plus a copy) and sum them. Here the forward builds each
    chunk run's SDPA graph on its folded views made leaves, and the backward writes each
    run's gradients straight into the positions it read: three gradients zeroed only on the
    heads whose lattices leave rows unwritten, one strided write per run. The first
    backward consumes those graphs; a second one (with ``retain_graph``) rebuilds them from
    the saved inputs. Its backward is not itself differentiable: the planner wraps the plan
    for second-order gradients (:mod:`sparsedsl.plans.double_backward`)."""

    @staticmethod
    def forward(ctx, q, k, v, plan, scale):
        out = zeroed_output(q, v, plan)
        ctx.runs = chunk_graphs(q, k, v, plan, scale, out)
        ctx.plan, ctx.scale = plan, scale
        ctx.save_for_backward(q, k, v)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v = ctx.saved_tensors
        runs = ctx.runs if ctx.runs is not None else chunk_graphs(q, k, v, ctx.plan, ctx.scale)
        ctx.runs = None
        dq, dk, dv = lattice_gradients(q, k, v, ctx.plan, grad_out.dtype)
        # One pass of the autograd engine over every run's graph: a pass per run costs host
        # time in proportion. The runs' folded gradients are then held at once: the size of
        # the positions they read.
        results = [result for *_, result in runs]
        leaves = [leaf for *_, run_leaves, _ in runs for leaf in run_leaves]
        grads = [fold(part, grad_out[:, rng.start:rng.stop], start, count, chunk)
                 for rng, _, part, start, count, chunk, _, _ in runs]
        folded_grads = torch.autograd.grad(results, leaves, grads) if runs else ()
        for i, (rng, kv, part, start, count, chunk, _, _) in enumerate(runs):
            dqf, dkf, dvf = folded_grads[3 * i:3 * i + 3]
            write_folded(dq[:, rng.start:rng.stop], part, start, count, chunk, dqf)
            for total, folded in ((dk, dkf), (dv, dvf)):
                if isinstance(kv, slice):
                    write_folded(total[:, kv], part, start, count, chunk, folded)
                else:  # query heads of the group read repeated key/value heads: sum them
                    per_head = total.new_zeros(total.shape[0], kv.numel(), *total.shape[2:])
                    write_folded(per_head, part, start, count, chunk, folded)
                    total.index_add_(1, kv, per_head)
        return dq, dk, dv, None, None


def lattice_gradients(q, k, v, plan: tuple[HeadGroupLattice, ...], dtype: torch.dtype):
    """``(dq, dk, dv)`` for :class:`ChunkLattice`'s backward to write into. The lattices
    of a head group are disjoint, so its runs write each of its positions once: only the
    heads of groups whose lattices leave rows unwritten are zeroed (:func:`zeroed_heads`),
    query heads and the key/value heads such a group owns (a slice). Key/value heads that
    several groups read through an index are zeroed whole, for those groups to add into."""
    dq, dk, dv = (torch.empty_like(t, dtype=dtype) for t in (q, k, v))
    length, group = q.shape[2], q.shape[1] // k.shape[1]
    zero_heads(dq, zeroed_heads(plan, length))
    owned, shared = [], []
    for head_plan in plan:
        kv = kv_heads_of(head_plan.heads, group, q.device)
        if not isinstance(kv, slice):
            shared.append(kv)
        elif not writes_every_row(head_plan.parts, length):
            owned.append(range(kv.start, kv.stop))
    owned = merged(owned)
    zero_heads(dk, owned)
    zero_heads(dv, owned)
    if shared:
        heads = torch.cat(shared)
        dk.index_fill_(1, heads, 0)
        dv.index_fill_(1, heads, 0)
    return dq, dk, dv


def chunk_graphs(q, k, v, plan: tuple[HeadGroupLattice, ...], scale: float, out: torch.Tensor | None = None):
    """Each chunk run of ``plan`` as ``(heads, kv, part, start, count, chunk, leaves,
    result)``: SDPA computed with autograd on the run's folded ``q``, ``k``, ``v`` views
    made leaves (``leaves``); ``result`` also written into ``out`` when given."""
    runs = []
    with torch.enable_grad():
        # Folded from detached inputs: views, made leaves of their own graphs below.
        for rng, kv, part, start, count, chunk, folded in chunk_folds(q.detach(), k.detach(), v.detach(), plan):
            leaves = tuple(t.detach().requires_grad_() for t in folded)
            result, _ = sdpa_with_lse(*leaves, scale, False)
            if out is not None:
                write_folded(out[:, rng.start:rng.stop], part, start, count, chunk, result.detach())
            runs.append((rng, kv, part, start, count, chunk, leaves, result))
    return runs

