"""``dilated_attention_pytorch``'s block-sparse API, done right: exact attention through the compiler.

``dilated_attention_pytorch`` (its guide, "BlockSparseAttention vs BlockSparseDilatedAttention")
configures ``BlockSparseAttention`` and ``BlockSparseDilatedAttention`` with a
``SparsePatternConfig``. The same names and signatures are here, with ``[batch, seq_len,
num_heads, head_dim]`` inputs and ``forward(q, k, v, is_causal=False,
return_attention_weights=False)``, so the guide's code runs with ``from sparsedsl import
...``. What changes:

* **Exact softmax.** Each query row takes one softmax over all the keys its pattern allows
  ``dilated_attention_pytorch`` sums one softmax per active block pair, so a row that
  sees three blocks gets weights summing to three.
* **``sparsity_ratio`` is honoured** for every ``pattern_type`` (that library ignores it for
  ``local_window``): the band width is chosen *per sequence length* so that the fraction
  of active ``block_size x block_size`` block pairs is as close as possible to the ratio
  (within 7% relative at 16K tokens and 256-token blocks for ratio 0.1); see
  :mod:`sparsedsl.patterns.seed` for the three block patterns.
* **Any length.** Sequence lengths need not be multiples of ``block_size`` (the last block
  is shorter); ``k``/``v`` may have fewer heads than ``q`` (grouped-query attention) and
  another length than ``q`` (positions are start-aligned).
* **``is_causal=True``** intersects the pattern with ``causal()`` (``k <= q``): the same
  block pairs as without it, less the pairs above the diagonal.

Because the pattern depends on the sequence length, each module has
``pattern_for(seq_len, kv_len=None, is_causal=False)``, and its ``pattern`` property is
the pattern of the **most recent** ``forward`` call (before any call: the non-causal
pattern at 16,384 tokens, the guide's length).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..compiler.opaque import handle_for, traced_attention
from ..lang import nodes as n
from ..lang.checks import PatternArgumentError, check_bool, check_int, check_int_list
from ..patterns.seed import DEFAULT_SEQ_LEN, PATTERN_TYPES, seed_block_pattern
from ._common import (
    MAX_DENSE_WEIGHTS, block_pairs, check_bnhd, check_segments, compiled, dense_weights,
    kernel_tile, with_causal,
)

__all__ = ["SparsePatternConfig", "BlockSparseAttention", "BlockSparseDilatedAttention"]


@dataclass(frozen=True)
class SparsePatternConfig:
    """Which blocks attend to which: ``dilated_attention_pytorch``'s configuration, validated on construction.

    Args:
        pattern_type: ``"local_window"`` (a band of blocks), ``"dilated_sparse"``
            (multi-scale dilated blocks) or ``"global_local"`` (band plus global blocks).
        sparsity_ratio: the fraction of active block pairs, in ``(0, 1]`` (``0.1`` = 90%
            sparse). The band is sized per sequence length to match it.
        block_size: tokens per block (any positive integer; default 128).
        window_size: if given, the band's width in tokens, replacing ``sparsity_ratio``
            for the band: ``ceil(window_size / block_size) // 2`` blocks on each side (the
            seed library's rule).
        global_tokens: for ``global_local``, the number of leading global tokens, rounded
            up to whole blocks (default 1: one global block; 0: none).
        dilation_rates: for ``dilated_sparse``, the block-level dilation rates (default
            ``(1, 2, 4, 8)``, that library's). Stored as a sorted tuple.

    Raises ``ValueError`` for an unknown ``pattern_type`` or an argument out of range.
    """

    pattern_type: str = "local_window"
    sparsity_ratio: float = 0.1
    block_size: int = 128
    window_size: int | None = None
    global_tokens: int = 1
    dilation_rates: tuple[int, ...] | None = None

    def __post_init__(self):
        where = "SparsePatternConfig"
        if self.pattern_type not in PATTERN_TYPES:
            raise ValueError(
                f"{where}: pattern_type must be one of {PATTERN_TYPES}, got {self.pattern_type!r}")
        ratio = self.sparsity_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
            raise ValueError(
                f"{where}: sparsity_ratio must be a number in (0, 1] (the fraction of active "
                f"blocks; 0.1 = 90% sparse), got {ratio!r}")
        object.__setattr__(self, "sparsity_ratio", float(ratio))
        object.__setattr__(self, "block_size", check_int(where, "block_size", self.block_size, minimum=1))
        if self.window_size is not None:
            object.__setattr__(self, "window_size",
                               check_int(where, "window_size", self.window_size, minimum=1))
        object.__setattr__(self, "global_tokens", check_int(where, "global_tokens", self.global_tokens))
        if self.dilation_rates is not None:
            rates = check_int_list(where, "dilation_rates", self.dilation_rates, minimum=1)
            object.__setattr__(self, "dilation_rates", tuple(sorted(set(rates))))

    def block_pattern(self, seq_len: int, kv_len: int | None = None) -> n.Blocks:
        """The block pattern for ``seq_len`` queries and ``kv_len`` keys (default
        ``seq_len``), e.g. ``blocks(256).local(3)`` at 16,384 tokens."""
        return seed_block_pattern(
            self.pattern_type, seq_len, kv_len, sparsity_ratio=self.sparsity_ratio,
            block_size=self.block_size, window_size=self.window_size,
            global_tokens=self.global_tokens, dilation_rates=self.dilation_rates)


def _config(sparse_config, where: str) -> SparsePatternConfig:
    if sparse_config is None:
        return SparsePatternConfig()
    if isinstance(sparse_config, SparsePatternConfig):
        return sparse_config
    if isinstance(sparse_config, dict):
        return SparsePatternConfig(**sparse_config)
    raise TypeError(f"{where}: sparse_config must be a SparsePatternConfig, a dict or None, "
                    f"got {type(sparse_config).__name__}")


@dataclass(frozen=True)
class _PatternsByLength:
    """A block-sparse module's pattern at each length, and its attention at that length:
    the callable that the compiled operator runs (:mod:`sparsedsl.compiler.opaque`), where
    the length is known only when the graph runs."""

    config: SparsePatternConfig
    within: n.Pattern | None

    def pattern_for(self, seq_len: int, kv_len: int | None = None, is_causal: bool = False) -> n.Pattern:
        pattern = self.config.block_pattern(seq_len, kv_len)
        if self.within is not None:
            pattern = pattern.within(self.within)
        return with_causal(pattern) if is_causal else pattern

    def __call__(self, q, k, v, *, scale: float, q_offset: int, return_lse: bool, context: str = ""):
        """Attention of ``[B, H, N, D]`` inputs; ``context`` is ``_CAUSAL`` for ``is_causal``."""
        pattern = self.pattern_for(q.shape[2], k.shape[2], is_causal=context == _CAUSAL)
        return compiled(pattern, kernel_tile(self.config.block_size))(
            q, k, v, scale=scale, q_offset=q_offset, return_lse=return_lse)


#: The operator's context string of a causal call.
_CAUSAL = "causal"


class _BlockSparseBase(nn.Module):
    """Shared machinery: pattern per length, compile, run, describe."""

    def __init__(self, sparse_config=None, within: n.Pattern | None = None):
        super().__init__()
        self.sparse_config = _config(sparse_config, type(self).__name__)
        self.block_size = self.sparse_config.block_size
        self._patterns = _PatternsByLength(self.sparse_config, within)
        self._register()
        self._last_call = (DEFAULT_SEQ_LEN, DEFAULT_SEQ_LEN, False)

    def _register(self) -> None:
        # Registered here, not under tracing (the registry takes a lock); per process.
        self._handle = handle_for(self._patterns, ("block-sparse", self._patterns))

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        self._register()

    def pattern_for(self, seq_len: int, kv_len: int | None = None, *,
                    is_causal: bool = False) -> n.Pattern:
        """The DSL pattern this module runs for ``seq_len`` queries and ``kv_len`` keys
        (default ``seq_len``), with ``& causal()`` when ``is_causal``."""
        return self._patterns.pattern_for(seq_len, kv_len, is_causal)

    @property
    def pattern(self) -> n.Pattern:
        """The pattern of the most recent eager ``forward`` call (before any: the
        non-causal pattern at 16,384 tokens). Use :meth:`pattern_for` for a given length."""
        q_len, kv_len, is_causal = self._last_call
        return self.pattern_for(q_len, kv_len, is_causal=is_causal)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool = False,
                return_attention_weights: bool = False):
        """Attention of ``q`` over ``k``/``v``, all ``[batch, seq_len, num_heads, head_dim]``
        (``k``/``v`` may have fewer heads, dividing ``q``'s, and another length).

        Returns the output ``[batch, seq_len, num_heads, head_dim]``; with
        ``return_attention_weights=True``, ``(output, info)`` where ``info`` holds
        ``block_pairs`` (``[P, 2]`` int64 active ``(query block, key block)`` pairs),
        ``indices`` (the same as ``[2, P]``, COO order), ``sparsity_ratio`` (``P`` over
        all block pairs), ``active_blocks``, ``total_blocks``, ``shape`` (``(batch,
        num_heads, seq_len, kv_len)``), ``block_size``, ``pattern`` (the DSL pattern that
        ran) and ``weights``: the dense attention probabilities ``[batch, num_heads,
        seq_len, kv_len]`` (detached) when that has at most 2**24 elements, else None.

        Under ``torch.compile`` (``fullgraph=True`` included) the call is one opaque
        operator that picks the pattern for the length when the graph runs; ``info`` is
        not available there.
        """
        where = f"{type(self).__name__}.forward()"
        is_causal = check_bool(where, "is_causal", is_causal)
        return_attention_weights = check_bool(where, "return_attention_weights", return_attention_weights)
        check_bnhd(where, q, k, v)
        if torch.compiler.is_compiling():
            if return_attention_weights:
                raise ValueError(f"{where}: return_attention_weights=True is not available under "
                                 f"torch.compile (its block pairs are read on the host)")
            out = traced_attention(self._handle, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                   q.shape[-1] ** -0.5, 0, False, {}, _CAUSAL if is_causal else "")
            return out.transpose(1, 2).contiguous()
        q_len, kv_len = q.shape[1], k.shape[1]
        pattern = self.pattern_for(q_len, kv_len, is_causal=is_causal)
        self._last_call = (q_len, kv_len, is_causal)
        module = compiled(pattern, kernel_tile(self.block_size))
        out = module(q, k, v, layout="bnhd").contiguous()
        if not return_attention_weights:
            return out
        return out, self._info(pattern, q, k)

    def _info(self, pattern: n.Pattern, q: torch.Tensor, k: torch.Tensor) -> dict:
        batch, q_len, heads, dim = q.shape
        kv_len = k.shape[1]
        pairs = block_pairs(pattern, q_len, kv_len, heads, self.block_size)
        total = -(-q_len // self.block_size) * -(-kv_len // self.block_size)
        weights = dense_weights(pattern, q.transpose(1, 2), k.transpose(1, 2), 1 / math.sqrt(dim),
                                MAX_DENSE_WEIGHTS)
        return {
            "block_pairs": pairs,
            "indices": pairs.t().contiguous(),
            "sparsity_ratio": pairs.shape[0] / total,
            "active_blocks": pairs.shape[0],
            "total_blocks": total,
            "shape": (batch, heads, q_len, kv_len),
            "block_size": self.block_size,
            "pattern": pattern,
            "weights": weights,
        }

    def extra_repr(self) -> str:
        return f"sparse_config={self.sparse_config}"


class BlockSparseAttention(_BlockSparseBase):
    """Block-sparse attention: every allowed block pair is attended densely, and each query
    row takes one softmax over all its allowed keys.

    ``BlockSparseAttention(sparse_config=SparsePatternConfig(...))`` runs
    ``sparse_config.block_pattern(seq_len)`` (e.g. ``blocks(256).local(3)`` at 16K tokens)
    through :func:`sparsedsl.compile`. See the module docstring for the differences from
    ``dilated_attention_pytorch``, and :meth:`forward` for inputs and outputs.
    """

    def __init__(self, sparse_config: SparsePatternConfig | dict | None = None):
        super().__init__(sparse_config)


class BlockSparseDilatedAttention(_BlockSparseBase):
    """Block-sparse attention with LongNet dilation inside each active block pair:
    ``blocks(b).<block rule>.within(segments(segment_lengths, dilation_rates))``
   .

    The heads are split into ``len(segment_lengths)`` groups as evenly as possible (the
    first ``H % G`` groups get one extra head; at least ``G`` heads are needed). Group
    ``i`` keeps, within a block pair, the block-relative positions ``p`` (``q % b``,
    ``k % b``) in the same ``segment_lengths[i]``-token segment with ``p % r == i % r``,
    ``r = dilation_rates[i]``. Query rows that their group's offset skips see no key and
    output zeros in that head. The block rule comes from ``sparse_config`` (default:
    ``SparsePatternConfig()``).

    Raises ``ValueError`` when ``segment_lengths`` and ``dilation_rates`` differ in length,
    a rate exceeds its segment length, or a segment is longer than ``block_size`` (the rule
    sees block-relative positions, so a longer segment would act as ``block_size``).
    """

    def __init__(self, segment_lengths, dilation_rates,
                 sparse_config: SparsePatternConfig | dict | None = None):
        where = "BlockSparseDilatedAttention"
        lengths, rates = check_segments(where, segment_lengths, dilation_rates)
        config = _config(sparse_config, where)
        too_long = [s for s in lengths if s > config.block_size]
        if too_long:
            raise PatternArgumentError(
                f"{where}: segment_lengths must be <= block_size ({config.block_size}): the "
                f"segments cut block-relative positions; got {list(lengths)}")
        super().__init__(config, within=n.segments(lengths, rates))
        self.segment_lengths, self.dilation_rates = lengths, rates

    def extra_repr(self) -> str:
        return (f"segment_lengths={list(self.segment_lengths)}, "
                f"dilation_rates={list(self.dilation_rates)}, {super().extra_repr()}")
