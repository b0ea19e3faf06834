"""LongNet's dilated attention as modules.

Source: Ding et al. 2023, "LongNet: Scaling Transformers to 1,000,000,000 Tokens",
arXiv:2307.02486. Two modules with the same call convention (``[batch, seq_len,
num_heads, head_dim]`` inputs, ``is_causal``):

* :class:`LongNetAttention` computes LongNet as its reference code does: every head runs
  every branch, and the branches are merged by softmax over their log-sum-exps (the
  pattern ``longnet(segment_lengths, dilation_rates)``, see :func:`sparsedsl.longnet`).
* :class:`DilatedAttention` is the head-grouped form of ``dilated_attention_pytorch``:
  head group ``i`` runs only branch ``i`` (the pattern ``segments(segment_lengths,
  dilation_rates)``). Its rules:

* **Head groups.** The heads are split into ``G = len(segment_lengths)`` contiguous groups
  as evenly as possible: the first ``H % G`` groups get one extra head (``H`` need not be
  a multiple of ``G``, but ``H >= G``). Group ``i`` uses segment length
  ``segment_lengths[i]``, rate ``r = dilation_rates[i]`` and offset ``offsets[i]``
  (default ``i % r``, the paper's per-head offsets).
* **Inside a group**, the sequence is cut into segments of ``segment_lengths[i]`` tokens;
  a query at position ``p`` of a segment with ``p % r == offset`` attends, with one exact
  softmax, to the keys of the same segment with the same property. Other queries see no
  key in that group's heads and output zeros there (their rows are covered by the other
  groups' heads).
* **Any sequence length.** The last segment of a group is simply shorter when the length
  is not a multiple of its segment length (the reference implementation,
  ``dilated-attention-pytorch``, requires divisibility). A segment longer than the
  sequence is one segment.
* **No extra normalisation.** Each head's output is its exact softmax average; some
  implementations divide each group's output by its sum over the sequence and by ``G``,
  which changes the scale only.
* ``is_causal=True`` adds ``k <= q`` inside the segments.
* ``k``/``v`` may have fewer heads than ``q`` (grouped-query attention); groups are defined
  on the query heads.
"""

from __future__ import annotations

import torch
from torch import nn

from ..compiler.inputs import checked_scale
from ..lang import nodes as n
from ..lang.checks import check_bool
from ._common import check_bnhd, check_segments, compiled, with_causal

__all__ = ["DilatedAttention", "LongNetAttention"]


class DilatedAttention(nn.Module):
    """LongNet dilated attention on ``[batch, seq_len, num_heads, head_dim]`` inputs.

    Args:
        segment_lengths: segment length of each head group.
        dilation_rates: dilation rate of each head group (``rate <= segment length``).
        softmax_scale: score scale (default ``1 / sqrt(head_dim)``).
        offsets: per-group offsets (default ``i % dilation_rates[i]``).
        block_size: the kernel tile (one of ``sparsedsl.BLOCK_SIZES``; default 128).
        kernel: ``"auto"``, ``"flex"`` or ``"gather"`` (see :func:`sparsedsl.compile`).

    See the module docstring for the head-group and sequence-length rules. Raises
    ``ValueError`` when ``segment_lengths`` and ``dilation_rates`` differ in length or a
    rate exceeds its segment length.
    """

    def __init__(self, segment_lengths, dilation_rates, softmax_scale: float | None = None, *,
                 offsets=None, block_size: int = 128, kernel: str = "auto"):
        super().__init__()
        self.segment_lengths, self.dilation_rates = check_segments(
            "DilatedAttention", segment_lengths, dilation_rates)
        segments = n.segments(self.segment_lengths, self.dilation_rates, offsets)
        self.offsets = segments.offsets
        if softmax_scale is not None:
            softmax_scale = checked_scale("DilatedAttention()", softmax_scale, 1, "softmax_scale")
        self.softmax_scale = softmax_scale
        self.block_size = block_size
        self.kernel = kernel
        # Resolved here (without and with ``is_causal``) so that ``forward`` does no lookup
        # under ``torch.compile``.
        self._attention = (compiled(segments, block_size, kernel),
                           compiled(with_causal(segments), block_size, kernel))

    @property
    def pattern(self) -> n.Pattern:
        """The non-causal pattern, ``segments(segment_lengths, dilation_rates[, offsets])``."""
        return n.segments(self.segment_lengths, self.dilation_rates, self.offsets)

    def pattern_for(self, is_causal: bool = False) -> n.Pattern:
        """The pattern ``forward`` runs (``& causal()`` when ``is_causal``)."""
        return with_causal(self.pattern) if is_causal else self.pattern

    @property
    def num_groups(self) -> int:
        return len(self.segment_lengths)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                is_causal: bool = False) -> torch.Tensor:
        """``[batch, seq_len, num_heads, head_dim]`` output; ``num_heads >= num_groups``."""
        check_bnhd("DilatedAttention.forward()", query, key, value)
        heads = query.shape[2]
        if heads < self.num_groups:
            raise ValueError(
                f"DilatedAttention.forward(): {self.num_groups} head groups (one per segment "
                f"length) need at least {self.num_groups} heads, got num_heads={heads}")
        module = self._attention[1 if check_bool("DilatedAttention.forward()", "is_causal", is_causal) else 0]
        return module(query, key, value, scale=self.softmax_scale, layout="bnhd").contiguous()

    def extra_repr(self) -> str:
        return (f"segment_lengths={list(self.segment_lengths)}, "
                f"dilation_rates={list(self.dilation_rates)}, offsets={list(self.offsets)}")


class LongNetAttention(nn.Module):
    """LongNet's dilated attention as its reference code computes it, on ``[batch, seq_len,
    num_heads, head_dim]`` inputs: the pattern ``longnet(segment_lengths, dilation_rates)``
    (``& causal()`` when ``is_causal``) compiled by :func:`sparsedsl.compile`.

    Every head runs every branch ``(segment_lengths[i], dilation_rates[i])``; in a branch of
    rate ``r`` the heads are split into ``r`` groups of ``ceil(num_heads / r)`` heads, group
    ``j`` keeping the positions ``p`` with ``(p % w) % r == j`` of each ``w``-token segment;
    the branches' outputs are merged by softmax over their log-sum-exps (one softmax over
    the keys, each counted once per branch that allows it). Any number of heads and any
    sequence length (the last segment is shorter).

    Args:
        segment_lengths: segment length of each branch.
        dilation_rates: dilation rate of each branch (``rate <= segment length``).
        softmax_scale: score scale (default ``1 / sqrt(head_dim)``).
        block_size: the kernel tile (one of ``sparsedsl.BLOCK_SIZES``; default 128).
        kernel: ``"auto"`` or a plan name (see :func:`sparsedsl.compile`).

    Raises ``ValueError`` when ``segment_lengths`` and ``dilation_rates`` differ in length
    or a rate exceeds its segment length.
    """

    def __init__(self, segment_lengths, dilation_rates, softmax_scale: float | None = None, *,
                 block_size: int = 128, kernel: str = "auto"):
        super().__init__()
        self.segment_lengths, self.dilation_rates = check_segments(
            "LongNetAttention", segment_lengths, dilation_rates)
        if softmax_scale is not None:
            softmax_scale = checked_scale("LongNetAttention()", softmax_scale, 1, "softmax_scale")
        self.softmax_scale = softmax_scale
        self.block_size = block_size
        self.kernel = kernel
        pattern = self.pattern
        self._attention = (compiled(pattern, block_size, kernel),
                           compiled(with_causal(pattern), block_size, kernel))

    @property
    def pattern(self) -> n.Pattern:
        """The non-causal pattern, ``longnet(segment_lengths, dilation_rates)``."""
        return n.longnet(self.segment_lengths, self.dilation_rates)

    def pattern_for(self, is_causal: bool = False) -> n.Pattern:
        """The pattern ``forward`` runs (``& causal()`` when ``is_causal``)."""
        return with_causal(self.pattern) if is_causal else self.pattern

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                is_causal: bool = False) -> torch.Tensor:
        """``[batch, seq_len, num_heads, head_dim]`` output."""
        check_bnhd("LongNetAttention.forward()", query, key, value)
        module = self._attention[1 if check_bool("LongNetAttention.forward()", "is_causal", is_causal) else 0]
        return module(query, key, value, scale=self.softmax_scale, layout="bnhd").contiguous()

    def extra_repr(self) -> str:
        return f"segment_lengths={list(self.segment_lengths)}, dilation_rates={list(self.dilation_rates)}"
