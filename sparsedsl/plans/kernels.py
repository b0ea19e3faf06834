"""Kernels the plans share: dense SDPA with its log-sum-exp, masked softmax-weighted sums
that stay finite on rows with no allowed key, and the layout questions views depend on."""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: Score elements held at once while computing a log-sum-exp.
LSE_BUDGET = 1 << 26


def per_query_head(t: torch.Tensor, group: int) -> torch.Tensor:
    """Key/value heads ``t [B, Hkv, K, D]`` repeated for the ``group`` query heads that
    read each (grouped-query attention), for kernels that take one key head per query head."""
    return t if group == 1 else t.repeat_interleave(group, 1)


def sdpa_with_lse(q, k, v, scale: float, return_lse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Dense attention by the fused SDPA kernel (GQA when ``k``/``v`` have fewer heads);
    with ``return_lse`` also the log-sum-exp (float32, float64 for float64 inputs), computed
    without gradient from ``QK^T`` a bounded slab of query rows at a time."""
    group = q.shape[1] // k.shape[1]
    out = F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=group > 1)
    if not return_lse:
        return out, None
    with torch.no_grad():
        compute = torch.promote_types(q.dtype, torch.float32)  # float32, or float64 for float64
        keys = per_query_head(k, group).to(compute)
        rows = max(1, LSE_BUDGET // max(1, q.shape[0] * q.shape[1] * k.shape[2]))
        lse = torch.cat([
            torch.logsumexp((q[:, :, i:i + rows].to(compute) @ keys.transpose(-1, -2)) * scale, dim=-1)
            for i in range(0, q.shape[2], rows)
        ], dim=2)
    return out, lse


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


def merges_batch_and_heads(t: torch.Tensor) -> bool:
    """Whether dimensions 0 and 1 of ``t`` (batch, heads) merge into one strided dimension
    without a copy."""
    return t.shape[0] == 1 or t.shape[1] == 1 or t.stride(0) == t.shape[1] * t.stride(1)


def zero_heads(t: torch.Tensor, heads) -> None:
    """Zero each range of ``heads`` (dimension 1) of ``t``, in place: one contiguous fill
    per range when ``t`` is contiguous."""
    for rng in heads:
        t[:, rng.start:rng.stop].zero_()
