"""The keys a range of query rows can reach, from a pattern's structure alone.

``reach(pattern, lo, hi, ctx)`` answers, for each query-row range ``[lo[g], hi[g])`` at
once, which key positions some row of the range may attend to (in some head and batch
entry): a :class:`~.spans.Spans` of intervals, never an array of sequence length. Each
node states its answer from its parameters (``window(b, a)`` reaches ``[lo - b, hi + a]``,
``dilated(s, r, o)`` the kept positions of the segments its kept rows lie in, ...).

The answer is always a superset of the exact reach, so a rank that holds it holds every
key its rows can see. ``Reach.exact`` says when it is also exact once widened to tiles of
``ctx.unit`` positions: for every primitive, union and head group; for intersections,
differences and complements only on single rows (``hi - lo == 1``, ``unit == 1``), where
the key set of one row is combined set by set.

Random key blocks (``blocks(s).random(k, seed)``) are chosen as
:mod:`sparsedsl.lang.randomblocks` chooses them and listed one by one: exact, at a cost of
(block rows) x ``min(k, key blocks)`` picks (one hash each). Past ``ctx.pick_budget``
picks, and when ``ctx.expect_random`` allows it, the picks are left as :class:`Draws` (so
many uniform picks per row), which :mod:`.costs` counts by their expected value.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import singledispatch

import numpy as np
import torch

from ..lang import nodes as n
from ..lang.groups import head_groups
from ..lang.randomblocks import block_picks_of_rows
from .spans import Spans

#: Random block picks listed exactly before they are left as draws (listing and merging
#: them takes about 1.3 us a pick on a 2-core CPU: 2**20 picks, about 1.4 s).
PICK_BUDGET = 1 << 20
#: Kept positions of dilated segments listed one by one before giving up.
POINT_BUDGET = 1 << 24


@dataclass(frozen=True)
class Draws:
    """Random key blocks not chosen exactly: set ``ids[i]`` holds ``rows[i]`` query-block
    rows, each with ``per_row`` distinct key blocks of ``size`` positions among
    ``num_blocks``, drawn uniformly (what the seeded hash approximates)."""

    ids: np.ndarray
    rows: np.ndarray
    per_row: int
    size: int
    num_blocks: int


@dataclass(frozen=True)
class Reach:
    """Key positions reachable per row range: ``spans`` (a superset), whether they are
    exact at ``unit`` granularity, and random ``draws`` not listed in ``spans``."""

    spans: Spans
    exact: bool = True
    draws: tuple[Draws, ...] = ()


@dataclass
class ReachContext:
    """What reach needs besides the pattern: the key length, the heads, the tile width
    exactness is judged at, call-time tensors, and the budgets."""

    seq_len: int
    heads: int
    unit: int = 1
    buffers: dict = field(default_factory=dict)
    expect_random: bool = False
    pick_budget: int = PICK_BUDGET
    where: str = "sequence_parallel_attention()"


def reach(pattern: n.Pattern, lo, hi, ctx: ReachContext) -> Reach:
    """The keys rows ``[lo[g], hi[g])`` reach, set ``g`` for each range (``lo < hi``)."""
    lo, hi = np.asarray(lo, dtype=np.int64), np.asarray(hi, dtype=np.int64)
    result = _reach(pattern, lo, hi, ctx)
    return Reach(result.spans.clipped(ctx.seq_len), result.exact, result.draws)


def _every(lo: np.ndarray, starts, stops) -> Spans:
    """One interval per range (broadcast), as a :class:`Spans` of ``len(lo)`` sets."""
    return Spans.of(len(lo), np.arange(len(lo)), starts, stops)


def _single_rows(lo: np.ndarray, hi: np.ndarray, ctx: ReachContext) -> bool:
    return ctx.unit == 1 and bool(np.all(hi - lo == 1))


@singledispatch
def _reach(node, lo, hi, ctx: ReachContext) -> Reach:
    raise TypeError(f"{ctx.where}: no reach rule for pattern node {type(node).__name__}")


@_reach.register
def _(node: n.Full, lo, hi, ctx):
    return Reach(_every(lo, 0, ctx.seq_len))


@_reach.register
def _(node: n.Causal, lo, hi, ctx):
    return Reach(_every(lo, 0, hi))


@_reach.register
def _(node: n.Window, lo, hi, ctx):
    return Reach(_every(lo, lo - node.before, hi + node.after))


@_reach.register
def _(node: n.DilatedWindow, lo, hi, ctx):
    first = -(node.before // node.rate) * node.rate  # nearest multiples inside the window
    last = node.after // node.rate * node.rate
    if node.rate > ctx.unit and _single_rows(lo, hi, ctx):
        start = np.maximum(lo + first, lo - (lo // node.rate) * node.rate)  # the first in the sequence
        stop = np.minimum(lo + last, ctx.seq_len - 1)
        return Reach(_progressions(len(lo), np.arange(len(lo)), start, stop, node.rate, ctx, str(node)))
    contiguous = (hi - lo >= node.rate) | (first == last)
    return Reach(_every(lo, lo + first, hi + last), exact=node.rate <= ctx.unit or bool(contiguous.all()))


@_reach.register
def _(node: n.Chunks, lo, hi, ctx):
    return Reach(_every(lo, lo // node.size * node.size, -(-hi // node.size) * node.size))


@_reach.register
def _(node: n.Strided, lo, hi, ctx):
    if node.stride > ctx.unit and _single_rows(lo, hi, ctx):
        return Reach(_progressions(len(lo), np.arange(len(lo)), lo % node.stride,
                                   np.full(len(lo), ctx.seq_len - 1), node.stride, ctx, str(node)))
    return Reach(_every(lo, 0, ctx.seq_len), exact=bool(np.all(hi - lo >= node.stride)) or node.stride <= ctx.unit)


def _progressions(groups: int, ids, first, last, step: int, ctx, what: str) -> Spans:
    """Set ``ids[i]`` holds ``first[i], first[i] + step, ...`` up to ``last[i]``."""
    counts = np.maximum((last - first) // step + 1, 0)
    total = int(counts.sum())
    if total > POINT_BUDGET:
        raise ValueError(
            f"{ctx.where}: {what} reaches {total} separate positions from these rows (more "
            f"than {POINT_BUDGET} to list); "
            + (f"use tiles of at least {step} positions, or a shorter seq_len" if ctx.unit > 1
               else "give a shorter seq_len or more ranks")
        )
    keys = np.repeat(first, counts) + (np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)) * step
    return Spans.of(groups, np.repeat(ids, counts), keys, keys + 1)


@_reach.register
def _(node: n.GlobalTokens, lo, hi, ctx):
    return Reach(_every(lo, 0, np.where(lo < node.n, ctx.seq_len, node.n)))


@_reach.register
def _(node: n.Prefix, lo, hi, ctx):
    return Reach(_every(lo, 0, node.n))


@_reach.register
def _(node: n.Queries, lo, hi, ctx):  # the rows of the range reach every key, others none
    first, stop = n.range_bounds(node.start, node.stop, ctx.seq_len)
    return Reach(_every(lo, 0, np.where((lo < stop) & (hi > first) & (first < stop), ctx.seq_len, 0)))


@_reach.register
def _(node: n.Keys, lo, hi, ctx):
    return Reach(_every(lo, *n.range_bounds(node.start, node.stop, ctx.seq_len)))


@_reach.register
def _(node: n.Dilated, lo, hi, ctx):
    return Reach(_dilated_spans(node.segment, node.rate, node.offset, lo, hi, ctx))


def dilated_kept(segment: int, rate: int, offset: int, lo, hi) -> np.ndarray:
    """Kept positions of ``dilated(segment, rate, offset)`` in ``[lo, hi)`` (arrays),
    counted per segment arithmetic: those ``p`` with ``(p % segment) % rate == offset``."""
    per = (segment - 1 - offset) // rate + 1

    def below(x):  # kept positions in [0, x)
        whole, rest = np.divmod(x, segment)
        return whole * per + np.clip((rest - offset + rate - 1) // rate, 0, per)

    return below(np.asarray(hi)) - below(np.asarray(lo))


def _segments_with_rows(segment: int, rate: int, offset: int, lo, hi, seq_len: int):
    """``(ids, first, last)``: for each range ``ids[i]`` and each segment holding a kept
    row of it, the first and last kept key of that segment (before ``seq_len``)."""
    per = (segment - 1 - offset) // rate + 1
    first_segment, last_segment = lo // segment, (hi - 1) // segment
    count = last_segment - first_segment + 1
    ids = np.repeat(np.arange(len(lo)), count)
    segments = np.arange(int(count.sum())) - np.repeat(np.cumsum(count) - count, count) + np.repeat(first_segment, count)
    seg_start = segments * segment
    has_row = dilated_kept(segment, rate, offset, np.maximum(seg_start, np.repeat(lo, count)),
                           np.minimum(seg_start + segment, np.repeat(hi, count))) > 0
    ids, seg_start = ids[has_row], seg_start[has_row]
    first = seg_start + offset
    last = np.minimum(seg_start + offset + (per - 1) * rate, seq_len - 1)
    return ids, first, last - (last - first) % rate  # the last kept key before the end


def _dilated_spans(segment: int, rate: int, offset: int, lo, hi, ctx) -> Spans:
    """Per range: the kept keys of each segment that holds a kept row of the range."""
    ids, first, last = _segments_with_rows(segment, rate, offset, lo, hi, ctx.seq_len)
    if rate == 1 or rate <= ctx.unit:
        return Spans.of(len(lo), ids, first, last + 1)
    return _progressions(len(lo), ids, first, last, rate, ctx, f"dilated({segment}, {rate}, {offset})")


def dilated_tile_counts(node: n.Dilated, lo, hi, seq_len: int, tile: int) -> np.ndarray:
    """Per range: the ``tile``-position key tiles holding a key the range's rows reach
    under ``node``, counted without listing them; for segments that are whole tiles
    (``node.segment % tile == 0``), so no tile holds keys of two segments."""
    ids, first, last = _segments_with_rows(node.segment, node.rate, node.offset, lo, hi, seq_len)
    if node.rate >= tile:  # kept keys at least a tile apart: one tile each
        tiles = (last - first) // node.rate + 1
    else:  # every tile between the first and the last kept key holds one
        tiles = last // tile - first // tile + 1
    counts = np.zeros(len(lo), dtype=np.int64)
    np.add.at(counts, ids, tiles)
    return counts


@_reach.register
def _(node: n.Documents, lo, hi, ctx):
    ids = ctx.buffers[node.name]
    sets = []
    for g, (a, b) in enumerate(zip(lo.tolist(), hi.tolist())):
        seen = torch.zeros(ids.shape[-1], dtype=torch.bool, device=ids.device)
        for row in ids.reshape(-1, ids.shape[-1]):
            seen |= torch.isin(row, row[a:b])
        sets.append(_runs(seen.cpu().numpy(), g))
    return Reach(_concat(len(lo), sets))


def _runs(mask: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(ids, starts, stops)`` of the runs of True in a bool vector."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    starts, stops = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    return np.full(len(starts), group), starts, stops


def _concat(groups: int, sets) -> Spans:
    if not sets:
        return Spans.empty(groups)
    ids, starts, stops = (np.concatenate(parts) for parts in zip(*sets))
    return Spans.of(groups, ids, starts, stops)


# -- blocks -------------------------------------------------------------------------------

@_reach.register
def _(node: n.Blocks, lo, hi, ctx):
    size = node.size
    num_blocks = -(-ctx.seq_len // size)
    qb_lo, qb_hi = lo // size, (hi - 1) // size + 1
    if node.rules:
        parts = [block_rule_reach(rule, qb_lo, qb_hi, num_blocks, ctx) for rule in node.rules]
        blocks = union_reach(parts)
        blocks = Reach(blocks.spans.clipped(num_blocks), blocks.exact, blocks.draws)
    else:
        blocks = Reach(_every(lo, 0, num_blocks))
    if node.causal_:
        if blocks.draws:
            raise ValueError(f"{ctx.where}: random blocks with .causal() are only counted exactly; "
                             f"this size lists more than {ctx.pick_budget} picks")
        blocks = Reach(blocks.spans.intersect(_every(lo, 0, qb_hi)), blocks.exact)
    if node.within_ is not None and _single_rows(lo, hi, ctx) and not blocks.draws:
        return Reach(_within_rows(node, blocks.spans, lo, ctx), blocks.exact)
    spans = Spans.of(len(lo), blocks.spans.ids, blocks.spans.starts * size, blocks.spans.stops * size)
    # .within() keeps fewer keys of each block: the blocks stay a superset, exact at tiles
    # of whole blocks.
    exact = blocks.exact and (node.within_ is None or ctx.unit >= size)
    return Reach(spans, exact, tuple(replace(d, size=size) for d in blocks.draws))


def _within_rows(node: n.Blocks, blocks: Spans, rows, ctx) -> Spans:
    """Single rows of a ``.within(rule)`` block pattern: in each allowed key block, the
    keys the rule allows from the row's block-relative position (listed block by block)."""
    size = node.size
    rel_ctx = ReachContext(size, ctx.heads, 1, {}, False, ctx.pick_budget, ctx.where)
    relative = _reach(node.within_, rows % size, rows % size + 1, rel_ctx).spans.clipped(size)
    counts = blocks.stops - blocks.starts
    if int(counts.sum()) * max(1, len(relative.ids)) > POINT_BUDGET:
        raise ValueError(f"{ctx.where}: {node} allows too many separate key runs per row to list")
    ids = np.repeat(blocks.ids, counts)
    block = np.repeat(blocks.starts, counts) + np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    # pair every allowed block of a row with every relative interval of the same row
    order = np.argsort(relative.ids, kind="stable")
    rel_ids, rel_lo, rel_hi = relative.ids[order], relative.starts[order], relative.stops[order]
    first = np.searchsorted(rel_ids, ids, side="left")
    many = np.searchsorted(rel_ids, ids, side="right") - first
    which = np.repeat(first, many) + np.arange(int(many.sum())) - np.repeat(np.cumsum(many) - many, many)
    base = np.repeat(block, many) * size
    return Spans.of(blocks.groups, np.repeat(ids, many), base + rel_lo[which], base + rel_hi[which])


def block_rule_reach(rule: n.BlockRule, qb_lo, qb_hi, num_blocks: int, ctx) -> Reach:
    """Key blocks the block rows ``[qb_lo, qb_hi)`` reach under one rule."""
    if isinstance(rule, n.BlockLocal):
        return Reach(_every(qb_lo, qb_lo - rule.window, qb_hi + rule.window))
    if isinstance(rule, n.BlockDilated):
        # Rate r reaches the rows' own residues mod r, as far as the window allows (the
        # furthest multiple of r inside it); rows at least r long hold every residue.
        rows = qb_hi - qb_lo
        if np.all(rows == 1):  # single block rows: each rate's progression, listed
            parts = []
            for r in rule.rates:
                extent = num_blocks if rule.window is None else rule.window // r * r
                first = np.maximum(qb_lo - extent, qb_lo % r)
                last = np.minimum(qb_lo + extent, num_blocks - 1)
                parts.append(Reach(_progressions(len(qb_lo), np.arange(len(qb_lo)), first, last, r, ctx, str(rule))))
            return union_reach(parts)
        if rule.window is None:
            return Reach(_every(qb_lo, 0, num_blocks), exact=all(bool(np.all(rows >= r)) for r in rule.rates))
        extent = max(rule.window // r * r for r in rule.rates)
        exact = all(bool(np.all(rows >= r)) for r in rule.rates if r <= rule.window)
        return Reach(_every(qb_lo, qb_lo - extent, qb_hi + extent), exact)
    if isinstance(rule, n.BlockGlobal):
        return Reach(_every(qb_lo, 0, np.where(qb_lo < rule.n, num_blocks, rule.n)))
    if isinstance(rule, n.BlockRandom):
        return _random_blocks(rule, qb_lo, qb_hi, num_blocks, ctx)
    if isinstance(rule, n.BlockLayout):
        layout = ctx.buffers[rule.name]
        layout = layout if layout.dim() == 3 else layout[None]
        sets = [_runs(layout[:, a:b].any(0).any(0).cpu().numpy(), g)
                for g, (a, b) in enumerate(zip(qb_lo.tolist(), qb_hi.tolist()))]
        return Reach(_concat(len(qb_lo), sets))
    raise TypeError(f"{ctx.where}: no reach rule for block rule {type(rule).__name__}")


def _random_blocks(rule: n.BlockRandom, qb_lo, qb_hi, num_blocks: int, ctx) -> Reach:
    """The seeded picks of the block rows (as :mod:`sparsedsl.lang.randomblocks` chooses
    them: one hash a pick)."""
    rows = qb_hi - qb_lo
    keep = min(rule.per_row, num_blocks)
    if int(rows.sum()) * keep > ctx.pick_budget:
        if not ctx.expect_random:
            raise ValueError(
                f"{ctx.where}: choosing {rule} exactly for these rows lists "
                f"{int(rows.sum()) * keep} picks (more than {ctx.pick_budget})"
            )
        empty = Spans.empty(len(qb_lo))
        return Reach(empty, draws=(Draws(np.arange(len(qb_lo)), rows, keep, 1, num_blocks),))
    if not int(rows.sum()):
        return Reach(Spans.empty(len(qb_lo)))
    # every row of every range, then its range's id once per pick
    ids = np.repeat(np.arange(len(qb_lo)), rows)
    qb = np.repeat(qb_lo, rows) + np.arange(int(rows.sum())) - np.repeat(np.cumsum(rows) - rows, rows)
    picks = block_picks_of_rows(torch.from_numpy(qb), num_blocks, rule.per_row, rule.seed).numpy().ravel()
    ids = np.repeat(ids, keep)
    return Reach(Spans.of(len(qb_lo), ids, picks, picks + 1))


# -- combinators ----------------------------------------------------------------------------

def union_reach(parts: list[Reach]) -> Reach:
    """The union of ``parts`` (merged once)."""
    spans = Spans.of(parts[0].spans.groups, *(np.concatenate([getattr(p.spans, a) for p in parts])
                                               for a in ("ids", "starts", "stops")))
    return Reach(spans, all(p.exact for p in parts), tuple(d for p in parts for d in p.draws))


def _no_draws(parts: list[Reach], what: str, ctx) -> None:
    if any(p.draws for p in parts):
        raise ValueError(f"{ctx.where}: random blocks inside {what} are only counted exactly; "
                         f"this size lists more than {ctx.pick_budget} picks")


@_reach.register
def _(node: n.Union, lo, hi, ctx):
    return union_reach([_reach(p, lo, hi, ctx) for p in node.parts])


@_reach.register
def _(node: n.Heads, lo, hi, ctx):
    groups = head_groups(ctx.heads, len(node.parts))  # checks there are enough heads
    return union_reach([_reach(p, lo, hi, ctx) for p, _ in zip(node.parts, groups)])


@_reach.register
def _(node: n.Segments, lo, hi, ctx):
    return _reach(node.expand(), lo, hi, ctx)


@_reach.register
def _(node: n.Sum, lo, hi, ctx):  # a multiset reaches what some part reaches
    return union_reach([_reach(p, lo, hi, ctx) for p in node.parts])


@_reach.register
def _(node: n.LongNet, lo, hi, ctx):
    return _reach(node.expand(), lo, hi, ctx)


@_reach.register
def _(node: n.DilatedHeads, lo, hi, ctx):
    # Group j's heads reach the lattice (p % w) % r == j of the segments holding their
    # rows; the node, over every head, reaches the union of its groups' lattices.
    return union_reach([_reach(part, lo, hi, ctx) for _, part in node.groups(ctx.heads)])


@_reach.register
def _(node: n.Intersection, lo, hi, ctx):
    parts = [_reach(p, lo, hi, ctx) for p in node.parts]
    _no_draws(parts, "an intersection", ctx)
    spans = parts[0].spans.clipped(ctx.seq_len)
    for part in parts[1:]:
        spans = spans.intersect(part.spans.clipped(ctx.seq_len))
    return Reach(spans, all(p.exact for p in parts) and _single_rows(lo, hi, ctx))


@_reach.register
def _(node: n.Difference, lo, hi, ctx):
    left, right = _reach(node.left, lo, hi, ctx), _reach(node.right, lo, hi, ctx)
    _no_draws([left, right], "a difference", ctx)
    if left.exact and right.exact and _single_rows(lo, hi, ctx):
        return Reach(left.spans.clipped(ctx.seq_len).difference(right.spans.clipped(ctx.seq_len)))
    return Reach(left.spans, exact=False)


@_reach.register
def _(node: n.Complement, lo, hi, ctx):
    inner = _reach(node.inner, lo, hi, ctx)
    _no_draws([inner], "a complement", ctx)
    if inner.exact and _single_rows(lo, hi, ctx):
        return Reach(inner.spans.clipped(ctx.seq_len).complement(ctx.seq_len))
    return Reach(_every(lo, 0, ctx.seq_len), exact=False)


@_reach.register
def _(node: n.Scored, lo, hi, ctx):
    return _reach(node.pattern, lo, hi, ctx)
