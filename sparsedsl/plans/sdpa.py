"""The *sdpa* plan: PyTorch's dense ``scaled_dot_product_attention`` for ``full()`` and
``causal()``, where the dense kernel is exact and fastest: ``is_causal`` for queries at the
start of the keys, a lower-right causal bias for queries aligned to their end."""

from __future__ import annotations

import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from ..lang import nodes as n
from ..lang.queries import mask_part, score_mods
from .base import Call, Plan, Runner

#: Throughput per computed pair relative to the device's tile kernel. CUDA: FlexAttention
#: reaches about 0.8 of dense SDPA's throughput (H100, bf16). CPU: dense SDPA computed 303k
#: pairs per CPU-ms against the gather plan's 22k (``benchmarks/plan_efficiency.py``, 2
#: cores, torch 2.13, fp32, 8 heads, head dim 64, 4,096 tokens).
EFFICIENCY = {"cuda": 1.25, "cpu": 14.0}


def dense_sdpa_case(pattern: n.Pattern) -> str | None:
    """``"full"`` or ``"causal"`` when dense SDPA computes ``pattern`` exactly, else None."""
    if score_mods(pattern):
        return None
    core = mask_part(pattern)
    if isinstance(core, n.Full):
        return "full"
    if isinstance(core, n.Causal):
        return "causal"
    return None


def causal_pairs(q_len: int, kv_len: int, q_offset: int) -> int:
    """Pairs ``k <= q`` of query rows ``[q_offset, q_offset + q_len)`` over ``kv_len`` keys."""
    first, last = q_offset, q_offset + q_len - 1
    cut = min(last, kv_len - 1)  # rows p <= cut see p + 1 keys, later rows every key
    growing = (cut - first + 1) * (first + cut + 2) // 2 if cut >= first else 0
    return growing + max(0, last - max(first, kv_len) + 1) * kv_len


class SdpaPlan(Plan):
    """Dense SDPA for ``full()`` and ``causal()`` (see the module docstring)."""

    name = "sdpa"

    def not_supported(self, pattern: n.Pattern, call: Call) -> list[str]:
        case = dense_sdpa_case(pattern)
        if case is None:
            return ["the pattern is not full() or causal() without score modifications"]
        reasons = []
        if call.return_lse:
            reasons.append("dense SDPA returns no log-sum-exp (return_lse)")
        if case == "causal" and call.q_offset not in (0, call.kv_len - call.q_len):
            reasons.append(f"causal rows from q_offset={call.q_offset} are neither at the start nor "
                           f"aligned to the end of the {call.kv_len} keys")
        return reasons

    def prepare(self, pattern: n.Pattern, call: Call) -> str:
        return dense_sdpa_case(pattern)

    def efficiency(self, call: Call) -> float | None:
        return EFFICIENCY.get(call.device.type)

    def computed_pairs(self, prepared: str, call: Call, planner) -> int:
        if prepared == "full":
            return call.heads * call.q_len * call.kv_len
        return call.heads * causal_pairs(call.q_len, call.kv_len, call.q_offset)

    def build(self, prepared: str, call: Call, planner) -> Runner:
        lower_right = prepared == "causal" and call.q_offset > 0
        mask = causal_lower_right(call.q_len, call.kv_len) if lower_right else None
        causal = prepared == "causal" and not lower_right
        scale, gqa = call.scale, call.kv_heads != call.heads
        return lambda q, k, v, _: (F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=gqa), None)

    def describe(self, prepared: str, call: Call) -> str:
        where = " (lower-right causal bias: queries aligned to the end)" if prepared == "causal" and call.q_offset else ""
        return f"the pattern is {prepared}(): dense SDPA is exact and fastest{where}"
