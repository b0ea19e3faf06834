"""Second-order gradients for plans whose kernels' backward has no derivative.

The fused kernels (SDPA's flash and memory-efficient kernels, FlexAttention, the lattice's
folded SDPA calls) compute first-order gradients fast, but their backward is not itself
differentiable: PyTorch either raises or, through a custom backward, silently drops the
second-order terms. A gradient penalty or a Hessian-vector product needs them.

:func:`twice_differentiable` wraps such a plan's runner in an autograd function whose first
backward runs the plan's own backward (the graph its forward recorded), and whose backward
*with* ``create_graph=True`` (the one that is differentiated again) recomputes the call
through the gather plan, written in differentiable PyTorch operations, and differentiates
that. Outputs and first-order gradients are the plan's own; second-order gradients are exact.
"""

from __future__ import annotations

from typing import Callable

import torch

from .base import Runner


class _TwiceDifferentiable(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, run: Runner, recompute: Callable[[], Runner], q_offset: int):
        ctx.run, ctx.recompute, ctx.q_offset = run, recompute, q_offset
        ctx.graph = record(run, q, k, v, q_offset)
        ctx.save_for_backward(q, k, v)
        out, lse = ctx.graph[1]
        return out.detach(), (lse.detach() if lse is not None else None)

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v = ctx.saved_tensors
        inputs = (q, k, v)
        if torch.is_grad_enabled():  # create_graph: these gradients are differentiated in turn
            wanted = [t for t in inputs if t.requires_grad]
            outputs = ctx.recompute()(q, k, v, ctx.q_offset)
            grads = gradients(outputs, (grad_out, grad_lse), wanted, create_graph=True)
        else:
            leaves, outputs = ctx.graph if ctx.graph is not None else record(ctx.run, q, k, v, ctx.q_offset)
            ctx.graph = None
            wanted = [leaf for leaf in leaves if leaf.requires_grad]
            grads = gradients(outputs, (grad_out, grad_lse), wanted, create_graph=False)
        grads = iter(grads)
        result = [next(grads) if t.requires_grad else None for t in inputs]
        return (*result, None, None, None)


def record(run: Runner, q, k, v, q_offset: int):
    """``run`` on leaves made of ``q``, ``k``, ``v`` (each requiring grad as its input does),
    with autograd recording: ``(leaves, (out, lse))``."""
    with torch.enable_grad():
        leaves = tuple(t.detach().requires_grad_(t.requires_grad) for t in (q, k, v))
        return leaves, run(*leaves, q_offset)


def gradients(outputs, output_grads, wanted, create_graph: bool):
    """Gradients of ``outputs`` (``(out, lse or None)``) weighted by ``output_grads``
    with respect to ``wanted``; zeros where an input does not reach an output."""
    pairs = [(o, g) for o, g in zip(outputs, output_grads) if o is not None and g is not None and o.requires_grad]
    if not pairs or not wanted:
        return [torch.zeros_like(t) for t in wanted]
    grads = torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], create_graph=create_graph,
                                allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(wanted, grads)]


def twice_differentiable(run: Runner, recompute: Callable[[], Runner]) -> Runner:
    """``run`` with exact second-order gradients: ``recompute()`` returns a runner of the
    same call whose operations are all differentiable (built on first need)."""

    def runner(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: int):
        return _TwiceDifferentiable.apply(q, k, v, run, recompute, q_offset)

    return runner
