"""Log-sum-exps that refuse a gradient they do not have.

Several plans compute the log-sum-exp they return outside autograd (from the scores of a
separate pass, or from a fused kernel's statistics). A loss that reads it would then miss
its share of the gradient without a word. :func:`refusing_gradient` returns the same values
in a tensor whose backward raises an error naming the plan: a call that only reads the
log-sum-exp (to log it, or to merge outputs) is unaffected, and a loss through it fails
loudly instead of silently.
"""

from __future__ import annotations

import torch


class LseGradientError(RuntimeError):
    """A loss reached a log-sum-exp that its plan computed without a gradient."""


class _RefusingGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, lse, anchor, plan: str):
        ctx.plan = plan
        return lse.detach().clone()

    @staticmethod
    def backward(ctx, grad):
        raise LseGradientError(
            f"the log-sum-exp returned by the {ctx.plan} plan has no gradient; compile with "
            f"kernel='gather' for a loss that reads it")


def refusing_gradient(lse: torch.Tensor, anchor: torch.Tensor, plan: str) -> torch.Tensor:
    """``lse``'s values, in the autograd graph of ``anchor`` (an input that requires grad),
    with a backward that raises :class:`LseGradientError`."""
    return _RefusingGradient.apply(lse, anchor, plan)
