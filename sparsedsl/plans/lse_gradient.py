"""Log-sum-exps that carry their gradient by recomputation.

Several plans compute the log-sum-exp they return outside autograd (from the scores of a
separate pass, or from a fused kernel's statistics). A loss that reads it (merging
partial attentions, a log-partition penalty) needs its gradient: ``d lse_i / d s_ij =
p_ij``. :func:`recomputed_lse_gradient` returns the same values in a tensor whose backward
recomputes the call through a plan written in differentiable operations (the gather
plan) and differentiates that plan's log-sum-exp. A call that only reads the log-sum-exp
(to log it) costs nothing more; a loss through it costs one more forward and backward of
the differentiable plan, and gets the exact gradient (second order included).
"""

from __future__ import annotations

from typing import Callable

import torch

from .base import Runner
from .double_backward import gradients, record


class _RecomputedLse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, lse, q, k, v, recompute: Callable[[], Runner], q_offset: int):
        ctx.recompute, ctx.q_offset = recompute, q_offset
        ctx.save_for_backward(q, k, v)
        return lse.detach().clone()

    @staticmethod
    def backward(ctx, grad_lse):
        q, k, v = ctx.saved_tensors
        create_graph = torch.is_grad_enabled()  # these gradients are differentiated in turn
        if create_graph:
            leaves, (_, lse) = (q, k, v), ctx.recompute()(q, k, v, ctx.q_offset)
        else:
            leaves, (_, lse) = record(ctx.recompute(), q, k, v, ctx.q_offset)
        wanted = [t for t in leaves if t.requires_grad]
        with torch.enable_grad():
            grads = iter(gradients((lse,), (grad_lse,), wanted, create_graph))
        return (None, *(next(grads) if t.requires_grad else None for t in leaves), None, None)


def recomputed_lse_gradient(run: Runner, recompute: Callable[[], Runner]) -> Runner:
    """``run`` whose log-sum-exp carries the gradient of ``recompute()``'s (a runner of the
    same call whose log-sum-exp is differentiable; built on first need)."""

    def runner(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: int):
        out, lse = run(q, k, v, q_offset)
        if lse is None or not (q.requires_grad or k.requires_grad or v.requires_grad):
            return out, lse
        return out, _RecomputedLse.apply(lse, q, k, v, recompute, q_offset)

    return runner
