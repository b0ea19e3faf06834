"""``dilated_attention_pytorch``'s block-sparse patterns, made exact.

The ``dilated_attention_pytorch`` guide configures its
``BlockSparseAttention`` with ``SparsePatternConfig(pattern_type, sparsity_ratio,
block_size, ...)``. Its three ``pattern_type`` values are block-level patterns on tiles of
``block_size`` tokens, written here in the language:

``local_window``
    ``blocks(b).local(w)``: each query block sees the ``w`` key blocks on either side.
``dilated_sparse``
    ``blocks(b).dilated([r1], window=r1*W1).dilated([r2], window=r2*W2)...``: for each
    dilation rate ``r`` (default ``[1, 2, 4, 8]``), the key blocks at a block distance that
    is a multiple of ``r``, up to ``W`` steps of ``r`` away. Near blocks are dense, far
    blocks sparse (multi-scale). Every rate gets the same number of steps ``W``, except that
    the first ``j`` rates (in increasing order) get one step more, which gives the ratio a
    fine granularity.
``global_local``
    ``blocks(b).local(w).global_(g)``: the local band plus the first ``g =
    ceil(global_tokens / b)`` block rows and columns (global tokens are rounded up to whole
    blocks: the pattern stays block-sparse, as that library's whole global blocks are).

**``sparsity_ratio`` is honoured for all three types.** It is the fraction of *active*
block pairs (``0.1`` = 90% sparse); the free parameter (``w`` or ``(W, j)``) is chosen per
sequence length so that the active fraction is as close as possible to it. At 16,384
tokens and 256-token blocks, ``sparsity_ratio=0.1`` gives 436 active blocks of 4,096 for
``local_window`` (``local(3)``), 434 for ``dilated_sparse`` and 436 for ``global_local``,
against the guide's "~410". (``dilated_attention_pytorch`` ignores the ratio for ``local_window`` and
computes 64 blocks, the diagonal.) Because the choice depends on the length, these
functions take ``seq_len`` (and ``kv_len``). A short sequence has few blocks and the ratio
can only be approximated (2,048 tokens of 256-token blocks: 8 of 64 blocks, 0.125, is the
closest to 0.1).

``window_size`` (tokens) replaces the ratio for the local band when given, with that library's
library's rule: ``window_size`` is rounded up to whole blocks and ``w = ceil(window_size /
block_size) // 2`` blocks on each side (for ``dilated_sparse``, ``W`` steps per rate).

Attention is one exact softmax over all allowed keys of a row; that library's
per-block-pair softmaxes summed together are not reproduced.
"""

from __future__ import annotations

import math
from functools import lru_cache

from sparsedsl.lang import nodes as n
from sparsedsl.lang.checks import PatternArgumentError, check_int, check_int_list

__all__ = [
    "PATTERN_TYPES", "DEFAULT_SEQ_LEN", "DEFAULT_DILATION_RATES", "active_blocks",
    "seed_block_pattern", "local_window", "dilated_sparse", "global_local",
    "block_sparse_dilated",
]

PATTERN_TYPES = ("local_window", "dilated_sparse", "global_local")

#: The sequence length of the guide's numbers, used when a length is needed and none given.
DEFAULT_SEQ_LEN = 16384

#: ``dilated_attention_pytorch``'s block dilation rates for ``dilated_sparse``.
DEFAULT_DILATION_RATES = (1, 2, 4, 8)


# -- counting active blocks in closed form (checked against sparsedsl.count in the tests) --

def _pairs_at_offset(nq: int, nk: int, d: int) -> int:
    """Block pairs ``(qb, kb)`` with ``qb - kb == d`` on an ``nq x nk`` block grid."""
    return max(0, min(nq, nk + d) - max(0, d))


def _band(nq: int, nk: int, w: int) -> int:
    return sum(_pairs_at_offset(nq, nk, d) for d in range(-w, w + 1))


def _band_row(qb: int, nk: int, w: int) -> int:
    return max(0, min(nk - 1, qb + w) - max(0, qb - w) + 1)


def _global_local(nq: int, nk: int, w: int, g: int) -> int:
    gq, gk = min(g, nq), min(g, nk)
    band = _band(nq, nk, w)
    glob = gq * nk + gk * nq - gq * gk
    both = sum(_band_row(qb, nk, w) for qb in range(gq))
    for kb in range(gk):  # columns kb < g, rows qb >= g inside the band
        lo, hi = max(gq, kb - w), min(nq - 1, kb + w)
        both += max(0, hi - lo + 1)
    return band + glob - both


def _dilated_windows(rates: tuple[int, ...], t: int) -> tuple[int, ...]:
    """Steps per rate for knob ``t``: ``W = t // m`` each, one more for the first ``t % m``."""
    steps, extra = divmod(t, len(rates))
    return tuple(steps + (1 if i < extra else 0) for i in range(len(rates)))


def _dilated(nq: int, nk: int, rates: tuple[int, ...], steps: tuple[int, ...]) -> int:
    limit = max(nq, nk)
    hit = bytearray(limit + 1)
    hit[0] = 1
    for r, s in zip(rates, steps):
        for d in range(r, min(r * s, limit) + 1, r):
            hit[d] = 1
    return _pairs_at_offset(nq, nk, 0) + sum(
        _pairs_at_offset(nq, nk, d) + _pairs_at_offset(nq, nk, -d)
        for d in range(1, limit + 1) if hit[d])


def active_blocks(pattern_type: str, nq: int, nk: int, knob: int, *, global_blocks: int = 0,
                  rates: tuple[int, ...] = DEFAULT_DILATION_RATES) -> int:
    """Active block pairs of ``pattern_type`` on an ``nq x nk`` block grid for ``knob``
    (``w`` for ``local_window``/``global_local``, ``t`` for ``dilated_sparse``)."""
    if pattern_type == "local_window":
        return _band(nq, nk, knob)
    if pattern_type == "global_local":
        return _global_local(nq, nk, knob, global_blocks)
    return _dilated(nq, nk, rates, _dilated_windows(rates, knob))


@lru_cache(maxsize=512)
def _choose_knob(pattern_type: str, nq: int, nk: int, ratio: float, global_blocks: int,
                 rates: tuple[int, ...]) -> int:
    """The knob whose active fraction is closest to ``ratio`` (ties: the sparser one)."""
    total = nq * nk
    target = ratio * total
    hi = max(nq, nk) * (len(rates) if pattern_type == "dilated_sparse" else 1)

    def pairs(knob):
        return active_blocks(pattern_type, nq, nk, knob, global_blocks=global_blocks, rates=rates)

    lo, top = 0, hi  # smallest knob with pairs >= target (count is non-decreasing)
    while lo < top:
        mid = (lo + top) // 2
        if pairs(mid) >= target:
            top = mid
        else:
            lo = mid + 1
    if lo > 0 and abs(pairs(lo - 1) - target) <= abs(pairs(lo) - target):
        return lo - 1
    return lo


# -- building the patterns ---------------------------------------------------------------------

def _check_common(where: str, seq_len, kv_len, sparsity_ratio, block_size, window_size):
    seq_len = check_int(where, "seq_len", seq_len, minimum=1)
    kv_len = seq_len if kv_len is None else check_int(where, "kv_len", kv_len, minimum=1)
    if isinstance(sparsity_ratio, bool) or not isinstance(sparsity_ratio, (int, float)) \
            or not 0 < sparsity_ratio <= 1:
        raise PatternArgumentError(
            f"{where}: argument 'sparsity_ratio' must be a number in (0, 1] (the fraction "
            f"of active blocks; 0.1 = 90% sparse), got {sparsity_ratio!r}")
    block_size = check_int(where, "block_size", block_size, minimum=1)
    if window_size is not None:
        window_size = check_int(where, "window_size", window_size, minimum=1)
    return seq_len, kv_len, float(sparsity_ratio), block_size, window_size


def _rates(where: str, rates) -> tuple[int, ...]:
    if rates is None:
        return DEFAULT_DILATION_RATES
    return tuple(sorted(set(check_int_list(where, "dilation_rates", rates, minimum=1))))


def _window_from_size(window_size: int, block_size: int) -> int:
    return math.ceil(window_size / block_size) // 2


def seed_block_pattern(pattern_type: str, seq_len: int, kv_len: int | None = None, *,
                       sparsity_ratio: float = 0.1, block_size: int = 256,
                       window_size: int | None = None, global_tokens: int = 1,
                       dilation_rates=None) -> n.Blocks:
    """The block pattern of a seed ``pattern_type`` at ``seq_len x kv_len`` tokens (see the
    module docstring); ``.within(...)`` may still be applied to the result."""
    where = f"{pattern_type}()"
    if pattern_type not in PATTERN_TYPES:
        raise PatternArgumentError(
            f"pattern_type must be one of {PATTERN_TYPES}, got {pattern_type!r}")
    seq_len, kv_len, ratio, block_size, window_size = _check_common(
        where, seq_len, kv_len, sparsity_ratio, block_size, window_size)
    nq, nk = -(-seq_len // block_size), -(-kv_len // block_size)
    base = n.blocks(block_size)
    if pattern_type == "dilated_sparse":
        rates = _rates(where, dilation_rates)
        if window_size is not None:
            steps = (_window_from_size(window_size, block_size),) * len(rates)
        else:
            steps = _dilated_windows(rates, _choose_knob(pattern_type, nq, nk, ratio, 0, rates))
        pattern = base
        for r, s in zip(rates, steps):
            if s > 0:
                pattern = pattern.dilated([r], window=r * s)
        return pattern if pattern.rules else base.local(0)
    global_blocks = 0
    if pattern_type == "global_local":
        global_tokens = check_int(where, "global_tokens", global_tokens)
        global_blocks = -(-global_tokens // block_size)
    if window_size is not None:
        w = _window_from_size(window_size, block_size)
    else:
        w = _choose_knob(pattern_type, nq, nk, ratio, global_blocks, ())
    pattern = base.local(w)
    return pattern.global_(global_blocks) if global_blocks else pattern


# -- catalog entries ------------------------------------------------------------------------

def local_window(seq_len: int = DEFAULT_SEQ_LEN, sparsity_ratio: float = 0.1,
                 block_size: int = 256, window_size: int | None = None) -> n.Pattern:
    """``dilated_attention_pytorch``'s ``local_window``: a band of blocks, ``blocks(block_size).local(w)``.

    ``w`` makes the active-block fraction closest to ``sparsity_ratio`` at ``seq_len``
    tokens, unless ``window_size`` (tokens, that library's rule) is given. Defaults: the
    guide's 16,384 tokens, 256-token blocks, ratio 0.1 → ``blocks(256).local(3)``, 436 of
    4,096 blocks.

    Source: ``dilated_attention_pytorch`` ``SparsePatternConfig(pattern_type="local_window")``
    (its guide); block-local attention as in Qiu et al. 2020, "Blockwise
    Self-Attention for Long Document Understanding", arXiv:1911.02972.
    """
    return seed_block_pattern("local_window", seq_len, sparsity_ratio=sparsity_ratio,
                              block_size=block_size, window_size=window_size)


def dilated_sparse(seq_len: int = DEFAULT_SEQ_LEN, sparsity_ratio: float = 0.1,
                   block_size: int = 256, dilation_rates=DEFAULT_DILATION_RATES,
                   window_size: int | None = None) -> n.Pattern:
    """``dilated_attention_pytorch``'s ``dilated_sparse``, made well-defined: multi-scale dilated blocks.

    For each rate ``r`` in ``dilation_rates`` (default ``[1, 2, 4, 8]``, that library's), the
    key blocks at a block distance that is a multiple of ``r``, up to ``W`` steps of ``r``
    (one more step for the first rates when that is closer to ``sparsity_ratio``; see the
    module docstring). Defaults → ``blocks(256).dilated([1], window=1).dilated([2],
    window=2).dilated([4], window=4)``, 434 of 4,096 blocks.

    Source: ``dilated_attention_pytorch`` ``SparsePatternConfig(pattern_type=
    "dilated_sparse")`` (its guide), whose own version attends to absolute block
    indices ``j % r == 0`` within half the sequence and ignores ``sparsity_ratio``.
    """
    return seed_block_pattern("dilated_sparse", seq_len, sparsity_ratio=sparsity_ratio,
                              block_size=block_size, window_size=window_size,
                              dilation_rates=dilation_rates)


def global_local(seq_len: int = DEFAULT_SEQ_LEN, sparsity_ratio: float = 0.1,
                 block_size: int = 256, global_tokens: int = 1,
                 window_size: int | None = None) -> n.Pattern:
    """``dilated_attention_pytorch``'s ``global_local``: a band of blocks plus global blocks,
    ``blocks(block_size).local(w).global_(ceil(global_tokens / block_size))``.

    ``global_tokens`` (default 1) is rounded up to whole blocks; ``w`` then makes the
    active fraction closest to ``sparsity_ratio``. Defaults → ``blocks(256).local(2)
    .global_(1)``, 436 of 4,096 blocks.

    Source: ``dilated_attention_pytorch`` ``SparsePatternConfig(pattern_type=
    "global_local")`` (its guide); the ETC/BigBird global-plus-local idea (Ainslie et
    al. 2020, arXiv:2004.08483; Zaheer et al. 2020, arXiv:2007.14062).
    """
    return seed_block_pattern("global_local", seq_len, sparsity_ratio=sparsity_ratio,
                              block_size=block_size, window_size=window_size,
                              global_tokens=global_tokens)


def block_sparse_dilated(seq_len: int = DEFAULT_SEQ_LEN, segment_lengths=(128, 128),
                         dilation_rates=(1, 2), pattern_type: str = "local_window",
                         sparsity_ratio: float = 0.1, block_size: int = 256,
                         window_size: int | None = None, global_tokens: int = 1,
                         block_dilation_rates=DEFAULT_DILATION_RATES) -> n.Pattern:
    """``dilated_attention_pytorch``'s ``BlockSparseDilatedAttention``: a block pattern of that library whose active block
    pairs attend with LongNet's head-grouped dilation on block-relative positions,
    ``blocks(b).<rule>.within(segments(segment_lengths, dilation_rates))``.

    Defaults are the guide's: segments ``[128, 128]`` with rates ``[1, 2]``, a
    ``local_window`` block rule at ratio 0.1, 256-token blocks, 16,384 tokens →
    ``blocks(256).local(3).within(segments([128, 128], [1, 2]))``. Heads split into
    ``len(segment_lengths)`` groups (at least that many heads are needed).
    ``block_dilation_rates`` are the block-level rates of ``pattern_type="dilated_sparse"``.

    Source: ``dilated_attention_pytorch.BlockSparseDilatedAttention`` (its guide);
    dilated attention from Ding et al. 2023, "LongNet", arXiv:2307.02486.
    """
    lengths = check_int_list("block_sparse_dilated()", "segment_lengths", segment_lengths, minimum=1)
    rates = check_int_list("block_sparse_dilated()", "dilation_rates", dilation_rates, minimum=1)
    if len(lengths) != len(rates):
        raise PatternArgumentError(
            f"block_sparse_dilated(): segment_lengths and dilation_rates must have the same "
            f"length, got {list(lengths)} and {list(rates)}")
    base = seed_block_pattern(pattern_type, seq_len, sparsity_ratio=sparsity_ratio,
                              block_size=block_size, window_size=window_size,
                              global_tokens=global_tokens, dilation_rates=block_dilation_rates)
    return base.within(n.segments(lengths, rates))
