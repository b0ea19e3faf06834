"""Masked softmax-weighted sums that stay finite on rows with no allowed key."""

from __future__ import annotations

import torch


def masked_attention(scores: torch.Tensor, allowed: torch.Tensor, values: torch.Tensor,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``softmax(scores masked to allowed) @ values`` over the last axis of ``scores``.

    ``scores`` ``[..., M, N]``, ``allowed`` bool broadcastable to it, ``values`` ``[..., N, D]``.
    Returns ``(out [..., M, D], lse [..., M])``: a row with no allowed entry gives exact
    zeros and ``lse = -inf``, and its gradients are zeros, never NaN.
    """
    scores = scores.masked_fill(~allowed, float("-inf"))
    # The softmax does not depend on the shift, so it is detached; rows that are all -inf
    # are shifted by 0 and give exp(-inf) = 0 everywhere.
    shift = scores.detach().amax(-1, keepdim=True)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    weights = torch.exp(scores - shift)
    total = weights.sum(-1, keepdim=True)
    nonempty = total > 0
    safe_total = torch.where(nonempty, total, torch.ones_like(total))
    out = (weights / safe_total) @ values
    lse = torch.where(nonempty, torch.log(safe_total) + shift, torch.full_like(total, float("-inf")))
    return out, lse.squeeze(-1)
