"""``estimate``: what sequence-parallel attention of a pattern costs each rank, before
running it, from the pattern's structure alone.

For every rank: the key/value positions it holds (its compact buffer), receives and sends
(forward; the backward moves as many gradient bytes the other way), the pairs its rows are
allowed (useful) and the pairs a tile kernel computes for them (every query tile against
every key tile it does not leave empty, at full tile area), and the bytes of its attention
tensors. Nothing of sequence size is allocated: needed keys are intervals
(:mod:`.reach`), pair counts closed forms (:mod:`.pairs`). The numbers equal what
:func:`~.attention.sequence_parallel_attention` moves and allocates (tests check them
byte for byte on gloo), except where random blocks are too many to choose exactly at this
size: those count by their expected value and ``Estimate.exact`` is False.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from ..compiler.module import CompiledPattern
from ..lang.checks import check_int
from ..lang.queries import head_group_count
from .pairs import pairs
from ..lang import nodes as n
from .heads import head_slices
from .plan import build_plan, held_by_owner, rank_rows
from .reach import Draws, ReachContext, dilated_tile_counts, reach
from .sharding import check_divisible, check_zigzag
from .spans import Spans

WHERE = "estimate()"
#: Query tiles whose key tiles are found in one pass when counting computed pairs.
TILE_ROWS_PER_PASS = 1 << 16


@dataclass(frozen=True)
class RankEstimate:
    """One rank's share (see :func:`estimate`). Positions and bytes are of keys and values
    together; ``*_pairs`` are summed over heads and the batch; ``computed_flops`` is
    ``2 * (head_dim + v_head_dim)`` per computed pair (``QK^T`` and ``PV``, forward); ``memory_bytes``
    counts its query, output and own key/value shards and its compact key/value buffer."""

    rank: int
    rows: int
    held_kv_positions: float
    received_positions: float
    sent_positions: float
    received_bytes: float
    sent_bytes: float
    useful_pairs: float
    computed_pairs: float
    computed_flops: float
    memory_bytes: float

    def seconds(self, link_bytes_per_s: float, flops_per_s: float) -> float:
        """Forward time at a link bandwidth (bytes/s) and a kernel throughput (FLOP/s),
        the exchange not overlapped: receiving or sending, the slower, then computing."""
        return max(self.received_bytes, self.sent_bytes) / link_bytes_per_s + self.computed_flops / flops_per_s


@dataclass(frozen=True)
class Estimate:
    """Per-rank costs of one forward call (``ranks[r]``), and the sizes they are for.
    ``exact``: every number is exact (else random blocks count by expectation)."""

    pattern: str
    seq_len: int
    world_size: int
    zigzag: bool
    heads: int
    kv_heads: int
    head_dim: int
    batch: int
    dtype: torch.dtype
    kv_block: int
    q_block: int
    position_bytes: int
    exact: bool
    ranks: tuple[RankEstimate, ...]

    @property
    def all_gather_bytes(self) -> int:
        """What one rank receives by all-gathering the keys and values instead."""
        return (self.seq_len - self.seq_len // self.world_size) * self.position_bytes

    def most(self, name: str) -> float:
        """The largest value of a :class:`RankEstimate` field over the ranks."""
        return max(getattr(r, name) for r in self.ranks)

    def mean(self, name: str) -> float:
        return sum(getattr(r, name) for r in self.ranks) / len(self.ranks)


def estimate(compiled: CompiledPattern, seq_len: int, world_size: int, *, heads: int, head_dim: int,
             dtype: torch.dtype, zigzag: bool = False, kv_heads: int | None = None,
             batch: int = 1, v_head_dim: int | None = None) -> Estimate:
    """The per-rank cost of ``sequence_parallel_attention(compiled, ...)`` on a sequence of
    ``seq_len`` positions over ``world_size`` ranks, ``heads`` query heads (``kv_heads``
    key/value heads, default ``heads``) of ``head_dim`` (values of ``v_head_dim``, default
    ``head_dim``), in ``dtype``, laid out contiguously or with ``zigzag``. ``.ranks[r]`` is
    a :class:`RankEstimate`.

    Patterns that bind call-time tensors (``documents``, ``.layout``, ``bias``) depend on
    those tensors: they are refused (``ValueError``)."""
    if not isinstance(compiled, CompiledPattern):
        raise TypeError(f"{WHERE}: argument 'compiled' must be a CompiledPattern (from sparsedsl.compile), "
                        f"got {type(compiled).__name__}")
    if compiled.pattern.buffer_names():
        raise ValueError(f"{WHERE}: the pattern {compiled.pattern} binds call-time tensors "
                         f"({', '.join(sorted(compiled.pattern.buffer_names()))}); the traffic depends on "
                         f"their values, so run exchange_plan with them instead")
    world_size = check_int(WHERE, "world_size", world_size, minimum=1)
    check_zigzag(WHERE, zigzag)
    seq_len = check_divisible(WHERE, seq_len, world_size, zigzag)
    heads = check_int(WHERE, "heads", heads, minimum=max(1, head_group_count(compiled.pattern)))
    kv_heads = heads if kv_heads is None else check_int(WHERE, "kv_heads", kv_heads, minimum=1)
    if heads % kv_heads:
        raise ValueError(f"{WHERE}: argument 'kv_heads' must divide heads={heads}, got {kv_heads}")
    head_dim = check_int(WHERE, "head_dim", head_dim, minimum=1)
    v_head_dim = head_dim if v_head_dim is None else check_int(WHERE, "v_head_dim", v_head_dim, minimum=1)
    batch = check_int(WHERE, "batch", batch, minimum=1)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"{WHERE}: argument 'dtype' must be a floating torch.dtype, got {dtype!r}")
    item = torch.empty(0, dtype=dtype).element_size()
    position_bytes = batch * kv_heads * (head_dim + v_head_dim) * item

    ctx = ReachContext(seq_len, heads, unit=compiled.kv_block, expect_random=True, where=WHERE)
    plan, draws = build_plan(compiled.pattern, seq_len, world_size, zigzag, compiled.kv_block, heads, kv_heads, ctx)
    if draws:  # random picks too many to list for all rows: count every one by expectation
        ctx = replace(ctx, pick_budget=0)
    owners, lo, hi = rank_rows(seq_len, world_size, zigzag)
    # (key/value head, position) rows of each rank's compact buffers, by the rank holding them
    by_owner = np.stack([plan.entries_by_owner(r).astype(np.float64) for r in range(world_size)])  # [dest, owner]
    if draws:  # one class of every head: positions count for every key/value head
        by_owner += kv_heads * _expected_by_owner(draws, plan.needed, owners, seq_len, world_size, zigzag,
                                                  compiled.kv_block)
    held = by_owner.sum(1)
    own = np.diagonal(by_owner).copy()
    sent = by_owner.sum(0) - own
    entry_bytes = batch * (head_dim + v_head_dim) * item

    useful = np.zeros(world_size)
    for rank, a, b in zip(owners.tolist(), lo.tolist(), hi.tolist()):
        useful[rank] += pairs(compiled.pattern, a, b, seq_len, heads, ctx)
    computed = _computed_pairs(compiled, seq_len, world_size, zigzag, heads, ctx)

    rows = seq_len // world_size
    tensors = batch * rows * (heads + kv_heads) * (head_dim + v_head_dim) * item  # q, out; own k and v
    ranks = tuple(
        RankEstimate(
            rank=r, rows=rows, held_kv_positions=_number(held[r] / kv_heads),
            received_positions=_number((held[r] - own[r]) / kv_heads), sent_positions=_number(sent[r] / kv_heads),
            received_bytes=_number((held[r] - own[r]) * entry_bytes),
            sent_bytes=_number(sent[r] * entry_bytes),
            useful_pairs=_number(useful[r] * batch), computed_pairs=_number(computed[r] * batch),
            computed_flops=_number(2 * (head_dim + v_head_dim) * computed[r] * batch),
            memory_bytes=_number(tensors + held[r] * entry_bytes),
        )
        for r in range(world_size)
    )
    return Estimate(str(compiled.pattern), seq_len, world_size, zigzag, heads, kv_heads, head_dim, batch,
                    dtype, compiled.kv_block, compiled.q_block, position_bytes, not draws, ranks)


def _number(x) -> float | int:
    """An int when ``x`` is whole (exact counts), else a float (expected values)."""
    x = float(x)
    return int(x) if x.is_integer() else x


def _computed_pairs(compiled: CompiledPattern, seq_len: int, world_size: int, zigzag: bool,
                    heads: int, ctx: ReachContext) -> np.ndarray:
    """Per rank: sum over its query tiles and heads of the key tiles the tile reaches,
    times the tile area (what a block-sparse kernel computes)."""
    q_block, kv_block = compiled.q_block, compiled.kv_block
    owners, lo, hi = rank_rows(seq_len, world_size, zigzag)
    per_piece = -(-(hi[0] - lo[0]) // q_block)
    tile_lo = (lo[:, None] + np.arange(per_piece) * q_block).ravel()
    tile_hi = np.minimum(tile_lo + q_block, np.repeat(hi, per_piece))
    tile_rank = np.repeat(owners, per_piece)
    computed = np.zeros(world_size)
    for part_heads, part in head_slices(compiled.pattern, heads):
        part_heads = len(part_heads)
        for start in range(0, len(tile_lo), TILE_ROWS_PER_PASS):
            stop = start + TILE_ROWS_PER_PASS
            tiles = _live_tiles(part, tile_lo[start:stop], tile_hi[start:stop], seq_len, kv_block, ctx)
            np.add.at(computed, tile_rank[start:stop], tiles * q_block * kv_block * part_heads)
    return computed


def _live_tiles(part, lo: np.ndarray, hi: np.ndarray, seq_len: int, kv_block: int, ctx) -> np.ndarray:
    """Per query tile ``[lo, hi)``: the key tiles it reaches under ``part`` (expected
    ones added for random draws)."""
    if isinstance(part, n.Dilated) and part.segment % kv_block == 0:
        return dilated_tile_counts(part, lo, hi, seq_len, kv_block).astype(np.float64)
    found = reach(part, lo, hi, ctx)
    spans = found.spans.coarsened(kv_block, seq_len)
    tiles = np.zeros(spans.groups, dtype=np.float64)
    np.add.at(tiles, spans.ids, -(-spans.stops // kv_block) - spans.starts // kv_block)
    for d in found.draws:
        tiles += _expected_new_units(d, spans, seq_len, kv_block) * _unit(d, kv_block) / kv_block
    return tiles


def _unit(d: Draws, kv_block: int) -> int:
    """Positions of the smallest run of whole random blocks and whole key tiles."""
    return math.lcm(d.size, kv_block)


def _miss(d: Draws, rows: np.ndarray, unit: int) -> np.ndarray:
    """Probability that ``rows`` block rows, each picking ``per_row`` distinct blocks
    uniformly, all miss a given run of ``unit // size`` blocks."""
    g = unit // d.size
    one = 1.0
    for i in range(d.per_row):
        one *= max(0.0, (d.num_blocks - g - i) / (d.num_blocks - i))
    return one ** rows


def _expected_new_units(d: Draws, exact: Spans, seq_len: int, kv_block: int) -> np.ndarray:
    """Per set: the expected number of ``unit``-position runs outside ``exact`` that the
    set's draws hit."""
    unit = _unit(d, kv_block)
    covered = exact.coarsened(unit, seq_len).sizes()
    outside = (-(-seq_len // unit)) - covered / unit
    rows = np.zeros(exact.groups)
    np.add.at(rows, d.ids, d.rows)
    return outside * (1 - _miss(d, rows, unit))


def _expected_by_owner(draws, needed: Spans, owners, seq_len: int, world_size: int, zigzag: bool,
                       kv_block: int) -> np.ndarray:
    """``[dest, owner]``: expected positions of random draws of rank ``dest``'s rows
    outside its exact needs that rank ``owner`` holds (draws land uniformly)."""
    extra = np.zeros((world_size, world_size))
    shard = seq_len // world_size
    for d in draws:
        unit = _unit(d, kv_block)
        rows = np.zeros(world_size)
        np.add.at(rows, owners[d.ids], d.rows)
        hit = 1 - _miss(d, rows, unit)
        for dest in range(world_size):
            covered = held_by_owner(needed.group(dest).coarsened(unit, seq_len), seq_len, world_size, zigzag)
            extra[dest] += (shard - covered) * hit[dest]
    return extra


def table(result: Estimate, link_bytes_per_s: float, flops_per_s: float, max_rows: int = 16) -> str:
    """The estimate as text: one line per rank (the first and last ``max_rows // 2`` when
    there are more), then the largest and mean over ranks, with forward times."""
    def line(name, r_held, r_recv, r_sent, useful, computed, memory, seconds):
        return (f"{name:>8} {r_held:>14,.0f} {r_recv / 2**20:>12,.1f} {r_sent / 2**20:>12,.1f} "
                f"{useful:>12.3e} {computed:>12.3e} {memory / 2**30:>10,.2f} {seconds * 1e3:>10,.2f}")

    ranks = list(result.ranks)
    shown = ranks if len(ranks) <= max_rows else ranks[:max_rows // 2] + [None] + ranks[-(max_rows // 2):]
    head = (f"{result.pattern}: N={result.seq_len:,} over {result.world_size:,} ranks"
            f"{' (zigzag)' if result.zigzag else ''}, {result.heads} heads ({result.kv_heads} k/v) of "
            f"{result.head_dim}, batch {result.batch}, {str(result.dtype).removeprefix('torch.')}, "
            f"tiles {result.q_block}x{result.kv_block}"
            + ("" if result.exact else "; random blocks by expected value"))
    lines = [head, f"{'rank':>8} {'held k/v pos':>14} {'recv MiB':>12} {'sent MiB':>12} "
                   f"{'useful':>12} {'computed':>12} {'mem GiB':>10} {'fwd ms':>10}"]
    for r in shown:
        if r is None:
            lines.append(f"{'...':>8}")
            continue
        lines.append(line(str(r.rank), r.held_kv_positions, r.received_bytes, r.sent_bytes, r.useful_pairs,
                          r.computed_pairs, r.memory_bytes, r.seconds(link_bytes_per_s, flops_per_s)))
    times = [r.seconds(link_bytes_per_s, flops_per_s) for r in ranks]
    for name, pick, seconds in (("max", result.most, max(times)), ("mean", result.mean, sum(times) / len(times))):
        lines.append(line(name, pick("held_kv_positions"), pick("received_bytes"), pick("sent_bytes"),
                          pick("useful_pairs"), pick("computed_pairs"), pick("memory_bytes"), seconds))
    lines.append(f"all-gather of K and V: {result.all_gather_bytes / 2**20:,.1f} MiB received per rank; "
                 f"times: link {link_bytes_per_s / 1e9:g} GB/s, kernel {flops_per_s / 1e12:g} TFLOP/s, "
                 f"forward, exchange then compute (the step waits for the max)")
    return "\n".join(lines)

