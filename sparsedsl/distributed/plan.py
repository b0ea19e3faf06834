"""Which key/value positions each rank of a sequence-parallel group needs, and from whom,
worked out from the pattern's structure alone (no communication, the same on every rank).

Rank ``r`` needs key tile ``j`` (tiles of ``compiled.kv_block`` positions from 0) when
some row it holds may attend to a key of that tile in some head and batch entry, as
:func:`~.reach.reach` states it from the pattern's parameters. Patterns with
``dilated_heads`` branches (``longnet(...)``) are the exception: each key/value head needs
the exact positions of its own query heads' lattices (:mod:`.heads`), so the plan holds
one class of heads per distinct set of needs, at position granularity. The plan holds,
per class and rank, those positions as sorted intervals (:class:`~.spans.Spans`): its size
grows with the ranks and the intervals they need, never with the sequence length. The
needed positions that another rank holds are what ``r`` receives; together with the
needed positions it holds itself they make its compact key/value buffers.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property

import numpy as np
import torch

from ..compiler.cache import BuildCache
from ..compiler.module import CompiledPattern
from ..lang.checks import check_int
from ..lang.queries import head_group_count
from .heads import head_slices, splits_heads
from .reach import ReachContext, reach
from .sharding import check_divisible, check_zigzag, chunk_owners, owned_ranges, pieces_per_rank
from .spans import Spans

#: Exchange plans of patterns without call-time tensors, by (pattern, tiles, sizes, layout).
_PLANS = BuildCache(maxsize=32)


@dataclass(frozen=True)
class RankTransfers:
    """One rank's part of an exchange for one :class:`HeadClass`, as index tensors on one
    device.

    ``send_index``: local positions (indices into the rank's shard) to send, grouped by
    destination rank in rank order; ``send_counts[d]`` of them go to rank ``d``.
    ``recv_index``: where each received row goes in the class's compact key/value buffer,
    grouped by source rank; ``recv_counts[s]`` of them come from rank ``s``.
    ``own_index`` / ``own_place``: the local positions of the rank's own needed rows and
    their places in the compact buffer. ``held``: the compact buffer's length.
    """

    send_index: torch.Tensor
    send_counts: list[int]
    recv_index: torch.Tensor
    recv_counts: list[int]
    own_index: torch.Tensor
    own_place: torch.Tensor
    held: int


@dataclass(frozen=True, eq=False)
class HeadClass:
    """Key/value heads that need the same key positions: ``kv_heads`` (indices; None for
    every key/value head) and ``by_piece``, the positions each piece of the sequence's
    rows needs in those heads (a :class:`~.spans.Spans`, one set per piece in sequence
    order)."""

    kv_heads: tuple[int, ...] | None
    by_piece: Spans


@dataclass(frozen=True, eq=False)
class ExchangePlan:
    """The key/value traffic of sequence-parallel attention for one pattern and layout.

    ``classes``: :class:`HeadClass` es, each a set of key/value heads and the positions
    every piece of rows needs in them. A pattern whose heads all reach the same keys has
    one class of every head, holding whole ``kv_block`` tiles (cut at ``seq_len``); a
    pattern with ``dilated_heads`` branches (``longnet(...)``) has one class per distinct
    set of needs, holding exact positions (``unit`` 1): each head group reads its own
    lattice of keys, and a tile would hold every group's keys. ``kv_heads``: the
    key/value heads the plan is for. Positions (``held_positions`` and the like) are
    averaged over the key/value heads: whole numbers when one class serves every head.
    """

    seq_len: int
    world_size: int
    zigzag: bool
    kv_block: int
    classes: tuple[HeadClass, ...]
    kv_heads: int = 1
    unit: int | None = None
    #: Built :class:`RankTransfers` by (rank, device).
    _transfers: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def all_gather(cls, seq_len: int, world_size: int, zigzag: bool, kv_block: int) -> "ExchangePlan":
        """The plan in which every rank needs every key tile: the traffic of all-gathering
        the keys and values (a baseline to compare a pattern's plan with)."""
        pieces = world_size * pieces_per_rank(zigzag)
        return cls(seq_len, world_size, zigzag, kv_block, (HeadClass(None, Spans.whole(pieces, seq_len)),),
                   unit=kv_block)

    @property
    def splits_heads(self) -> bool:
        """Whether some class serves only some key/value heads."""
        return any(c.kv_heads is not None for c in self.classes)

    @cached_property
    def by_piece(self) -> Spans:
        """Set ``c``: the positions piece ``c`` needs in some head (union of the classes)."""
        return _union([c.by_piece for c in self.classes])

    @cached_property
    def needed(self) -> Spans:
        """Set ``r``: the positions rank ``r`` needs in some head."""
        return _per_rank(self.by_piece, self.world_size, self.zigzag)

    def piece_needed(self, rank: int) -> tuple[tuple[Spans, ...], ...]:
        """Per piece of rank ``rank``'s rows (in shard order), the positions it needs in
        each class."""
        owners = chunk_owners(self.world_size, self.zigzag)
        return tuple(tuple(c.by_piece.group(p) for c in self.classes)
                     for p, owner in enumerate(owners) if owner == rank)

    def ranges(self, rank: int) -> tuple[range, ...]:
        """The absolute positions rank ``rank`` holds, in the order of its shard."""
        return owned_ranges(self.seq_len, rank, self.world_size, self.zigzag)

    @cached_property
    def class_needed(self) -> tuple[Spans, ...]:
        """Per class, set ``r``: the positions rank ``r`` needs in the class's heads."""
        return tuple(_per_rank(c.by_piece, self.world_size, self.zigzag) for c in self.classes)

    def class_of(self, kv_head: int) -> int:
        """The index of the class serving key/value head ``kv_head``."""
        return next(i for i, c in enumerate(self.classes) if c.kv_heads is None or kv_head in c.kv_heads)

    def needed_spans(self, rank: int, kv_head: int | None = None) -> Spans:
        """The positions rank ``rank`` needs (in key/value head ``kv_head``; default: in
        some head), as a one-set :class:`~.spans.Spans`."""
        spans = self.needed if kv_head is None else self.class_needed[self.class_of(kv_head)]
        return spans.group(rank)

    def _heads_of(self, c: HeadClass) -> int:
        return self.kv_heads if c.kv_heads is None else len(c.kv_heads)

    def entries_by_owner(self, rank: int) -> np.ndarray:
        """int64 ``[world_size]``: ``(key/value head, position)`` rows of rank ``rank``'s
        compact buffers that each rank holds (its own among them)."""
        return sum(held_by_owner(needed.group(rank), self.seq_len, self.world_size, self.zigzag)
                   * self._heads_of(c) for c, needed in zip(self.classes, self.class_needed))

    def _positions(self, entries) -> float | int:
        value = entries / self.kv_heads
        return int(value) if float(value).is_integer() else float(value)

    def held_positions(self, rank: int) -> float | int:
        """Key/value positions of rank ``rank``'s compact buffers (its own needed ones and
        the received ones), averaged over the key/value heads."""
        return self._positions(int(self.entries_by_owner(rank).sum()))

    @cached_property
    def entries_moved(self) -> torch.Tensor:
        """int64 ``[world_size, world_size]``: ``(key/value head, position)`` rows rank
        ``s`` sends rank ``d`` at ``[s, d]`` (zero on the diagonal)."""
        moved = torch.stack([torch.from_numpy(self.entries_by_owner(d)) for d in range(self.world_size)], dim=1)
        return moved.fill_diagonal_(0)

    @property
    def positions_moved(self) -> torch.Tensor:
        """float64 ``[world_size, world_size]``: positions rank ``s`` sends rank ``d`` at
        ``[s, d]``, averaged over the key/value heads. For inspection: ``world_size ** 2``
        entries."""
        return self.entries_moved.double() / self.kv_heads

    @property
    def moves_anything(self) -> bool:
        """Whether any rank receives any position (when not, no collective runs)."""
        return bool(self.entries_moved.any())

    def received_positions(self, rank: int) -> float | int:
        """Key/value positions rank ``rank`` receives from the other ranks (averaged over
        the key/value heads)."""
        by_owner = self.entries_by_owner(rank)
        return self._positions(int(by_owner.sum() - by_owner[rank]))

    def sent_positions(self, rank: int) -> float | int:
        """Key/value positions rank ``rank`` sends to the other ranks (averaged over the
        key/value heads)."""
        return self._positions(int(self.entries_moved[rank, :].sum()))

    def all_gather_positions(self) -> int:
        """Positions each rank would receive by all-gathering the keys and values."""
        return self.seq_len - self.seq_len // self.world_size

    @cached_property
    def _owned(self) -> Spans:
        """Set ``r``: the positions rank ``r`` holds."""
        chunk = self.seq_len // (self.world_size * pieces_per_rank(self.zigzag))
        owners = np.asarray(chunk_owners(self.world_size, self.zigzag))
        starts = np.arange(len(owners)) * chunk
        return Spans.of(self.world_size, owners, starts, starts + chunk)

    def transfer(self, source: int, dest: int, kv_head: int = 0) -> torch.Tensor:
        """Absolute positions (ascending, int64) that rank ``source`` sends rank ``dest`` in
        key/value head ``kv_head``: those ``source`` holds that ``dest`` needs there; empty
        when ``source == dest``."""
        return torch.from_numpy(self._transfer(self.class_of(kv_head), source, dest))

    def _transfer(self, c: int, source: int, dest: int) -> np.ndarray:
        if source == dest:
            return np.zeros(0, dtype=np.int64)
        return self.class_needed[c].group(dest).intersect(self._owned.group(source)).positions()

    def local_index(self, rank: int, positions: np.ndarray) -> np.ndarray:
        """Indices into rank ``rank``'s shard of absolute ``positions`` it holds."""
        return self._owned.group(rank).covered_below(positions)

    def rank_transfers(self, rank: int, device) -> tuple[RankTransfers, ...]:
        """Rank ``rank``'s send, receive and placement indices of each class, on ``device``
        (built once per rank and device)."""
        key = (rank, str(torch.device(device)))
        if key not in self._transfers:
            self._transfers[key] = tuple(self._build_rank_transfers(c, rank, device)
                                         for c in range(len(self.classes)))
        return self._transfers[key]

    def _build_rank_transfers(self, c: int, rank: int, device) -> RankTransfers:
        mine = self.class_needed[c].group(rank)
        sends = [self._transfer(c, rank, dest) for dest in range(self.world_size)]
        recvs = [self._transfer(c, source, rank) for source in range(self.world_size)]
        own = mine.intersect(self._owned.group(rank)).positions()
        as_tensor = lambda a: torch.from_numpy(np.asarray(a, dtype=np.int64)).to(device)  # noqa: E731
        return RankTransfers(
            send_index=as_tensor(self.local_index(rank, np.concatenate(sends))),
            send_counts=[len(s) for s in sends],
            recv_index=as_tensor(mine.covered_below(np.concatenate(recvs))),
            recv_counts=[len(r) for r in recvs],
            own_index=as_tensor(self.local_index(rank, own)),
            own_place=as_tensor(mine.covered_below(own)),
            held=int(mine.sizes()[0]),
        )


def _per_rank(by_piece: Spans, world_size: int, zigzag: bool) -> Spans:
    owners = np.asarray(chunk_owners(world_size, zigzag))
    return Spans.of(world_size, owners[by_piece.ids], by_piece.starts, by_piece.stops)


def _union(parts: list[Spans]) -> Spans:
    return Spans.of(parts[0].groups, *(np.concatenate([getattr(p, a) for p in parts])
                                       for a in ("ids", "starts", "stops")))


def held_by_owner(needed: Spans, seq_len: int, world_size: int, zigzag: bool) -> np.ndarray:
    """int64 ``[world_size]``: positions of the one-set ``needed`` that each rank holds,
    from the positions below each chunk boundary (``O(intervals + ranks)``)."""
    pieces = world_size * pieces_per_rank(zigzag)
    chunk = seq_len // pieces
    below = needed.covered_below(np.arange(pieces + 1, dtype=np.int64) * chunk)
    per_chunk = np.diff(below)
    return np.bincount(np.asarray(chunk_owners(world_size, zigzag)), weights=per_chunk,
                       minlength=world_size).astype(np.int64)


def rank_rows(seq_len: int, world_size: int, zigzag: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(rank, lo, hi)`` of every piece of rows of every rank: rank ``rank[i]`` holds
    rows ``[lo[i], hi[i])``."""
    pieces = world_size * pieces_per_rank(zigzag)
    chunk = seq_len // pieces
    lo = np.arange(pieces, dtype=np.int64) * chunk
    return np.asarray(chunk_owners(world_size, zigzag), dtype=np.int64), lo, lo + chunk


def build_plan(pattern, seq_len: int, world_size: int, zigzag: bool, kv_block: int, heads: int,
               kv_heads: int, ctx: ReachContext) -> tuple[ExchangePlan, tuple]:
    """``(plan, draws)``: the :class:`ExchangePlan` of ``pattern`` and the random draws of
    its reach left uncounted (see :class:`~.reach.Draws`; only with ``ctx.expect_random``).

    A pattern whose heads share their keys gets one class: whole ``kv_block`` tiles of
    what the pieces' rows reach. A pattern with ``dilated_heads`` branches gets, per
    key/value head, the exact positions its query heads reach (:func:`~.heads.head_slices`),
    and heads with the same needs share a class."""
    _, lo, hi = rank_rows(seq_len, world_size, zigzag)
    if not splits_heads(pattern):
        found = reach(pattern, lo, hi, ctx)
        classes = (HeadClass(None, found.spans.coarsened(kv_block, seq_len)),)
        return ExchangePlan(seq_len, world_size, zigzag, kv_block, classes, kv_heads, kv_block), found.draws
    exact = replace(ctx, unit=1)
    slices = []
    for rows, part in head_slices(pattern, heads):
        found = reach(part, lo, hi, exact)
        if found.draws:
            raise ValueError(f"{ctx.where}: random blocks in {pattern} are only counted exactly; this size "
                             f"lists more than {ctx.pick_budget} picks")
        slices.append((rows, found.spans))
    group = heads // kv_heads
    by_needs: dict = {}
    for kv_head in range(kv_heads):
        mine = range(kv_head * group, (kv_head + 1) * group)
        needs = _union([spans for rows, spans in slices if rows.start < mine.stop and mine.start < rows.stop])
        key = tuple(a.tobytes() for a in (needs.ids, needs.starts, needs.stops))
        by_needs.setdefault(key, (needs, []))[1].append(kv_head)
    classes = tuple(HeadClass(None if len(members) == kv_heads else tuple(members), needs)
                    for needs, members in by_needs.values())
    return ExchangePlan(seq_len, world_size, zigzag, kv_block, classes, kv_heads, 1), ()


def exchange_plan(compiled: CompiledPattern, seq_len: int, world_size: int, *, zigzag: bool = False,
                  heads: int | None = None, kv_heads: int | None = None, device=None,
                  **buffers) -> ExchangePlan:
    """The :class:`ExchangePlan` of ``compiled`` for a sequence of ``seq_len`` positions
    sharded over ``world_size`` ranks (see :mod:`sparsedsl.distributed.sharding`).

    ``heads``: the query heads (needed when the pattern has head groups); ``kv_heads``: the
    key/value heads (default ``heads``; they must divide ``heads``); ``buffers``: the
    pattern's call-time tensors, over the whole sequence. ``device`` is accepted for
    compatibility and unused: the plan is host arithmetic on intervals. Plans of patterns
    without call-time tensors are cached. Needs no process group: any process can inspect
    the traffic of any layout.
    """
    if not isinstance(compiled, CompiledPattern):
        raise TypeError(
            f"exchange_plan(): argument 'compiled' must be a CompiledPattern (from "
            f"sparsedsl.compile), got {type(compiled).__name__}"
        )
    world_size = check_int("exchange_plan()", "world_size", world_size, minimum=1)
    check_zigzag("exchange_plan()", zigzag)
    seq_len = check_divisible("exchange_plan()", seq_len, world_size, zigzag)
    heads = head_group_count(compiled.pattern) if heads is None else heads
    kv_heads = heads if kv_heads is None else check_int("exchange_plan()", "kv_heads", kv_heads, minimum=1)
    if heads % kv_heads:
        raise ValueError(f"exchange_plan(): argument 'kv_heads' must divide heads={heads}, got {kv_heads}")

    def build() -> ExchangePlan:
        ctx = ReachContext(seq_len, heads, unit=compiled.kv_block, buffers=buffers)
        return build_plan(compiled.pattern, seq_len, world_size, zigzag, compiled.kv_block, heads, kv_heads,
                          ctx)[0]

    if buffers:
        return build()
    key = (compiled.pattern, compiled.kv_block, seq_len, world_size, zigzag, heads, kv_heads)
    return _PLANS.get(key, build)
