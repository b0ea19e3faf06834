"""Allowed pairs of a range of query rows, from a pattern's parameters.

``pairs(pattern, lo, hi, seq_len, heads)`` is the number of allowed ``(head, q, k)`` with
``lo <= q < hi`` and ``0 <= k < seq_len``: a closed form for every primitive, head groups
and block patterns (block rows times the keys of their allowed blocks, with ``.within``
rules counted on the few distinct block-relative rectangles). Other combinators are
counted row by row from each row's exact key set (:func:`~.reach.reach` on single rows),
which costs ``O(rows)``; past ``ROW_BUDGET`` rows that is refused with a ``ValueError``.
Random blocks left as draws count by their expected number (a float).
"""

from __future__ import annotations

from functools import singledispatch

import numpy as np

from ..lang import nodes as n
from ..lang.groups import head_groups
from ..lang.multiset import multiset_terms
from ..lang.queries import walk
from .heads import head_slices
from .reach import Reach, ReachContext, block_rule_reach, dilated_kept, reach, union_reach
from .spans import Spans

#: Rows counted one by one, at most, for patterns without a closed form.
ROW_BUDGET = 1 << 22


def pairs(pattern: n.Pattern, lo: int, hi: int, seq_len: int, heads: int, ctx: ReachContext) -> float:
    """Allowed pairs of rows ``[lo, hi)`` over keys ``[0, seq_len)``, summed over ``heads``
    heads (an int, or a float when random draws count by expectation). A multiset's pairs
    count once per term that allows them (its multiplicity): its terms
    (:func:`~sparsedsl.lang.multiset.multiset_terms`) are counted one by one, each over its
    head slices (:func:`~.heads.head_slices`)."""
    return sum(_pairs(part, lo, hi, seq_len, len(rows), ctx)
               for term in multiset_terms(pattern) for rows, part in head_slices(term, heads))


def _sum_min(lo: int, hi: int, shift: int, cap: int) -> int:
    """``sum(min(q + shift, cap) for q in range(lo, hi))``."""
    split = min(max(cap - shift, lo), hi)  # rows below split are under the cap
    linear = (split - lo) * (lo + split - 1 + 2 * shift) // 2
    return linear + (hi - split) * cap


def _sum_floor(lo: int, hi: int, rate: int) -> int:
    """``sum(q // rate for q in range(lo, hi))`` (``0 <= lo <= hi``)."""
    def below(y):
        m = y // rate
        return rate * m * (m - 1) // 2 + m * (y - m * rate)
    return below(hi) - below(lo)


@singledispatch
def _pairs(node, lo, hi, seq_len, heads, ctx) -> float:
    return _by_rows(node, lo, hi, seq_len, heads, ctx)


@_pairs.register
def _(node: n.Full, lo, hi, seq_len, heads, ctx):
    return heads * (hi - lo) * seq_len


@_pairs.register
def _(node: n.Causal, lo, hi, seq_len, heads, ctx):
    return heads * _sum_min(lo, hi, 1, seq_len)


@_pairs.register
def _(node: n.Window, lo, hi, seq_len, heads, ctx):
    # min(q + after, N - 1) - max(q - before, 0) + 1, and max(x, 0) = x - min(x, 0)
    upper = _sum_min(lo, hi, node.after, seq_len - 1)
    lower = (hi - lo) * (lo + hi - 1) // 2 - (hi - lo) * node.before - _sum_min(lo, hi, -node.before, 0)
    return heads * (upper - lower + (hi - lo))


@_pairs.register
def _(node: n.DilatedWindow, lo, hi, seq_len, heads, ctx):
    # Multiples of rate in [-min(before, q), min(after, N - 1 - q)]:
    # min(before, q) // rate + min(after, N - 1 - q) // rate + 1.
    r = node.rate
    split = min(max(node.before, lo), hi)
    behind = _sum_floor(lo, split, r) + (hi - split) * (node.before // r)
    t_lo, t_hi = seq_len - hi, seq_len - lo  # t = N - 1 - q runs over [N - hi, N - lo)
    split = min(max(node.after, t_lo), t_hi)
    ahead = _sum_floor(t_lo, split, r) + (t_hi - split) * (node.after // r)
    return heads * (behind + ahead + (hi - lo))


@_pairs.register
def _(node: n.Chunks, lo, hi, seq_len, heads, ctx):
    s = node.size
    chunks = np.arange(lo // s, (hi - 1) // s + 1, dtype=np.int64)
    rows = np.minimum((chunks + 1) * s, hi) - np.maximum(chunks * s, lo)
    keys = np.minimum((chunks + 1) * s, seq_len) - chunks * s
    return heads * int((rows * keys).sum())


@_pairs.register
def _(node: n.Strided, lo, hi, seq_len, heads, ctx):
    s = node.stride
    whole = (hi - lo) // s  # each whole cycle of rows sees every key once per residue: N
    rest = np.arange(lo + whole * s, hi, dtype=np.int64)
    return heads * (whole * seq_len + int(((seq_len - 1 - rest % s) // s + 1).sum()))


@_pairs.register
def _(node: n.Dilated, lo, hi, seq_len, heads, ctx):
    s = node.segment
    segments = np.arange(lo // s, (hi - 1) // s + 1, dtype=np.int64) * s
    rows = dilated_kept(s, node.rate, node.offset, np.maximum(segments, lo), np.minimum(segments + s, hi))
    keys = dilated_kept(s, node.rate, node.offset, segments, np.minimum(segments + s, seq_len))
    return heads * int((rows * keys).sum())


@_pairs.register
def _(node: n.GlobalTokens, lo, hi, seq_len, heads, ctx):
    inside = max(0, min(hi, node.n) - lo)
    return heads * (inside * seq_len + (hi - lo - inside) * min(node.n, seq_len))


@_pairs.register
def _(node: n.Prefix, lo, hi, seq_len, heads, ctx):
    return heads * (hi - lo) * min(node.n, seq_len)


@_pairs.register
def _(node: n.Heads, lo, hi, seq_len, heads, ctx):
    _no_head_groups_inside(node.parts, node, ctx)
    groups = head_groups(heads, len(node.parts))
    return sum(_pairs(p, lo, hi, seq_len, len(g), ctx) for p, g in zip(node.parts, groups))


@_pairs.register
def _(node: n.Segments, lo, hi, seq_len, heads, ctx):
    return _pairs(node.expand(), lo, hi, seq_len, heads, ctx)


@_pairs.register
def _(node: n.Scored, lo, hi, seq_len, heads, ctx):
    return _pairs(node.pattern, lo, hi, seq_len, heads, ctx)


@_pairs.register
def _(node: n.Blocks, lo, hi, seq_len, heads, ctx):
    return _block_pairs(node, (), lo, hi, seq_len, heads, ctx)


@_pairs.register
def _(node: n.Union, lo, hi, seq_len, heads, ctx):
    """A block pattern with ranges of whole block rows or columns (``queries``, ``keys``
    whose bounds fall on its blocks: BigBird's last block) counts as the block pattern;
    other unions row by row."""
    blocks = [p for p in node.parts if isinstance(p, n.Blocks)]
    ranges = [p for p in node.parts if isinstance(p, (n.Queries, n.Keys))]
    if len(blocks) == 1 and len(blocks) + len(ranges) == len(node.parts) \
            and blocks[0].within_ is None and not blocks[0].causal_:
        size = blocks[0].size
        bounds = [n.range_bounds(r.start, r.stop, seq_len) for r in ranges]
        if all(b % size == 0 or b == seq_len for bound in bounds for b in bound):
            extra = tuple((isinstance(r, n.Queries), a // size, -(-b // size)) for r, (a, b) in zip(ranges, bounds))
            return _block_pairs(blocks[0], extra, lo, hi, seq_len, heads, ctx)
    return _by_rows(node, lo, hi, seq_len, heads, ctx)


def _block_pairs(node: n.Blocks, extra: tuple, lo, hi, seq_len, heads, ctx):
    """Pairs of the block pattern ``node`` with ``extra`` ranges of whole blocks, ``(rows,
    first, stop)``: block rows ``first .. stop - 1`` (``rows``) seeing every block, or block
    columns seen by every row."""
    if any(isinstance(rule, (n.BlockDilated, n.BlockLayout)) for rule in node.rules):
        return _by_rows(node, lo, hi, seq_len, heads, ctx)
    size = node.size
    num_blocks = -(-seq_len // size)
    qb = np.arange(lo // size, (hi - 1) // size + 1, dtype=np.int64)  # one set per block row
    every = np.arange(len(qb))
    parts = [block_rule_reach(rule, qb, qb + 1, num_blocks, ctx) for rule in node.rules]
    if not node.rules:
        parts.append(Reach(Spans.of(len(qb), every, 0, num_blocks)))
    for rows, first, stop in extra:
        inside = (qb >= first) & (qb < stop)
        parts.append(Reach(Spans.of(len(qb), every, 0, np.where(inside, num_blocks, 0)) if rows
                           else Spans.of(len(qb), every, first, stop)))
    blocks = union_reach(parts)
    spans = blocks.spans.clipped(num_blocks)
    if node.causal_:
        spans = spans.intersect(Spans.of(len(qb), np.arange(len(qb)), 0, qb + 1))
    last = num_blocks - 1
    last_len = seq_len - last * size
    full_blocks = spans.sizes() - _holds(spans, last) * (last_len < size)
    short = _holds(spans, last) * (last_len < size)
    r0 = np.maximum(qb * size, lo) - qb * size  # rows of each block row, block-relative
    r1 = np.minimum((qb + 1) * size, hi) - qb * size
    expected = _expected_blocks(blocks.draws, spans, len(qb))
    within = node.within_
    total = 0.0
    for (a, b), members in _groups(r0, r1):
        per_full = _rect(within, a, b, size, heads, ctx)
        total += per_full * float((full_blocks[members] + expected[members]).sum())
        if last_len < size:
            total += _rect(within, a, b, last_len, heads, ctx) * float(short[members].sum())
    return int(total) if not blocks.draws else total


def _holds(spans: Spans, block: int) -> np.ndarray:
    """Per set: 1 if it holds ``block``."""
    inside = (spans.starts <= block) & (block < spans.stops)
    held = np.zeros(spans.groups, dtype=np.int64)
    np.add.at(held, spans.ids[inside], 1)
    return held


def _groups(r0: np.ndarray, r1: np.ndarray):
    """``((a, b), indices)`` for each distinct block-relative row range (at most three:
    the first and last block rows may be cut, the others are whole)."""
    keys = r0 * (int(r1.max()) + 1) + r1
    distinct, inverse = np.unique(keys, return_inverse=True)
    for i, key in enumerate(distinct.tolist()):
        yield divmod(key, int(r1.max()) + 1), np.flatnonzero(inverse == i)


def _rect(within, a: int, b: int, keys: int, heads: int, ctx) -> float:
    """Allowed pairs of block-relative rows ``[a, b)`` over ``keys`` block-relative keys."""
    if within is None:
        return heads * (b - a) * keys
    return _pairs(within, a, b, keys, heads, ctx)


def _expected_blocks(draws, exact: Spans, rows: int) -> np.ndarray:
    """Per block row: the expected number of random picks outside ``exact`` (each of the
    row's ``per_row`` picks lands on a block outside with that set's share of blocks)."""
    expected = np.zeros(rows, dtype=np.float64)
    for d in draws:
        outside = d.num_blocks - exact.sizes()
        expected += d.per_row * outside / d.num_blocks
    return expected


def _no_head_groups_inside(parts, node, ctx) -> None:
    """Head groups count closed-form at the top of a pattern only (nested ones see
    absolute head indices)."""
    if any(isinstance(m, (n.Heads, n.Segments, n.DilatedHeads, n.LongNet)) for p in parts for m in walk(p)):
        raise ValueError(f"{ctx.where}: no pair count for head groups inside {node}; "
                         f"put heads(...) or segments(...) at the top of the pattern")


def _by_rows(node, lo: int, hi: int, seq_len: int, heads: int, ctx) -> int:
    """Row by row, from each row's exact key set."""
    _no_head_groups_inside([node], node, ctx)
    if hi - lo > ROW_BUDGET:
        raise ValueError(f"{ctx.where}: {node} has no closed form for its pairs, and counting "
                         f"{hi - lo} rows one by one is more than {ROW_BUDGET}; give a shorter seq_len")
    row_ctx = ReachContext(seq_len, heads, 1, ctx.buffers, False, ctx.pick_budget, ctx.where)
    total = 0
    for start in range(lo, hi, 1 << 16):
        rows = np.arange(start, min(start + (1 << 16), hi), dtype=np.int64)
        found = reach(node, rows, rows + 1, row_ctx)
        if not found.exact:
            raise ValueError(f"{ctx.where}: no exact pair count for {node}")
        total += int(found.spans.sizes().sum())
    return heads * total
