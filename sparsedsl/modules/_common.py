"""Helpers shared by the attention modules: pattern resolution, compiled-module cache,
block-pair listing and the dense attention weights of small problems."""

from __future__ import annotations

from functools import lru_cache

import torch

from ..analysis.count import tile_grid_states
from ..compiler.inputs import check_4d
from ..compiler.module import CompiledPattern
from ..lang import nodes as n
from ..lang.checks import PatternArgumentError
from ..lang.queries import restrict, score_mods
from ..passes.dense import dense_attention_weights
from ..passes.tiles import EMPTY

#: Dense attention weights are materialised only up to this many elements (``B*H*Q*K``).
MAX_DENSE_WEIGHTS = 1 << 24


def resolve_pattern(pattern, where: str) -> n.Pattern:
    """A :class:`Pattern` from a pattern, pattern text or a catalog name / call."""
    if isinstance(pattern, n.Pattern):
        return pattern
    if isinstance(pattern, str):
        from ..catalog import pattern_from_text
        return pattern_from_text(pattern)
    raise TypeError(
        f"{where}: argument 'pattern' must be a sparsedsl Pattern, pattern text or a catalog "
        f"name, got {type(pattern).__name__}")


def with_causal(pattern: n.Pattern) -> n.Pattern:
    """``pattern & causal()``, keeping score modifications last."""
    return restrict(pattern, n.causal())


def kernel_tile(block_size: int) -> int:
    """The kernel tile for a pattern built on ``block_size``-token blocks: the largest power
    of two dividing ``block_size``, between 16 and 128 (tiles then never straddle blocks
    when ``block_size`` is a multiple of 16)."""
    tile = block_size & -block_size
    return max(16, min(128, tile))


@lru_cache(maxsize=256)
def compiled(pattern: n.Pattern, tile: int = 128, kernel: str = "auto") -> CompiledPattern:
    """The shared compiled module of ``pattern`` (compiled modules hold no state of their
    own; lowerings are cached by the compiler)."""
    return CompiledPattern(pattern, block_size=tile, kernel=kernel)


def block_pairs(pattern: n.Pattern, q_len: int, kv_len: int, heads: int, block_size: int,
                **buffers) -> torch.Tensor:
    """``[P, 2]`` int64 ``(query block, key block)`` pairs of ``block_size``-token blocks in
    which some head allows some pair, in row-major order."""
    _, _, _, states = tile_grid_states(pattern, q_len, kv_len, heads, block_size, buffers,
                                       "block_pairs()")
    active = (states != EMPTY).flatten(0, 1).any(0)
    return active.nonzero().to(torch.int64).cpu()


def dense_weights(pattern: n.Pattern, q: torch.Tensor, k: torch.Tensor, scale: float,
                  limit: int = MAX_DENSE_WEIGHTS, **buffers) -> torch.Tensor | None:
    """Attention probabilities ``[B, H, Q, K]`` (detached, float32 or float64) of ``bhnd``
    inputs, or None when ``B*H*Q*K > limit``. Score modifications other than plain
    masking are not applied here (None is returned for scored patterns)."""
    batch, heads, q_len, _ = q.shape
    if batch * heads * q_len * k.shape[2] > limit or score_mods(pattern):
        return None
    return dense_attention_weights(pattern, q, k, scale, **buffers)


def check_bnhd(where: str, q, k, v) -> None:
    """``q``, ``k``, ``v`` must be 4-D ``[batch, seq, heads, head_dim]`` tensors."""
    check_4d(where, q, k, v, "[batch, seq_len, num_heads, head_dim]")


def check_segments(where: str, segment_lengths, dilation_rates) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Validated ``(segment_lengths, dilation_rates)``; ``ValueError`` on a mismatch."""
    if not isinstance(segment_lengths, (list, tuple)) or not isinstance(dilation_rates, (list, tuple)):
        raise ValueError(
            f"{where}: segment_lengths and dilation_rates must be lists of integers, got "
            f"{segment_lengths!r} and {dilation_rates!r}")
    if len(segment_lengths) != len(dilation_rates):
        raise ValueError(
            f"{where}: segment_lengths and dilation_rates must have the same length, got "
            f"{len(segment_lengths)} segment lengths {list(segment_lengths)} and "
            f"{len(dilation_rates)} dilation rates {list(dilation_rates)}")
    try:
        pattern = n.segments(segment_lengths, dilation_rates)
    except PatternArgumentError as err:
        raise PatternArgumentError(f"{where}: {err}") from None
    return pattern.lengths, pattern.dilations
