"""Which key/value positions each rank of a sequence-parallel group needs, and from whom,
worked out from the pattern's structure alone (no communication, the same on every rank).

Rank ``r`` needs key tile ``j`` (tiles of ``compiled.kv_block`` positions from 0) when
some row it holds may attend to a key of that tile in some head and batch entry, as
:func:`~.reach.reach` states it from the pattern's parameters. The plan holds, per rank,
those tiles as sorted intervals of positions (:class:`~.spans.Spans`): its size grows with
the ranks and the intervals they need, never with the sequence length. The positions of
the needed tiles that another rank holds are what ``r`` receives; together with the
needed positions it holds itself they make its compact key/value buffer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch

from ..compiler.cache import BuildCache
from ..compiler.module import CompiledPattern
from ..lang.checks import check_int
from ..lang.queries import head_group_count
from .reach import Reach, ReachContext, reach
from .sharding import check_divisible, check_zigzag, chunk_owners, owned_ranges, pieces_per_rank
from .spans import Spans

#: Exchange plans of patterns without call-time tensors, by (pattern, tiles, sizes, layout).
_PLANS = BuildCache(maxsize=32)


@dataclass(frozen=True)
class RankTransfers:
    """One rank's part of an exchange, as index tensors on one device.

    ``send_index``: local positions (indices into the rank's shard) to send, grouped by
    destination rank in rank order; ``send_counts[d]`` of them go to rank ``d``.
    ``recv_index``: where each received row goes in the rank's compact key/value buffer,
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
class ExchangePlan:
    """The key/value traffic of sequence-parallel attention for one pattern and layout.

    ``by_piece``: a :class:`~.spans.Spans` with one set per piece of the sequence (the
    ``world_size`` pieces, ``2 * world_size`` with zigzag, in sequence order): the
    positions of the key tiles that piece's rows need (whole ``kv_block`` tiles, cut at
    ``seq_len``), as sorted intervals. ``needed`` unites them per rank: a rank's compact
    key/value buffer holds exactly those positions.
    """

    seq_len: int
    world_size: int
    zigzag: bool
    kv_block: int
    by_piece: Spans
    #: Built :class:`RankTransfers` by (rank, device).
    _transfers: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def all_gather(cls, seq_len: int, world_size: int, zigzag: bool, kv_block: int) -> "ExchangePlan":
        """The plan in which every rank needs every key tile: the traffic of all-gathering
        the keys and values (a baseline to compare a pattern's plan with)."""
        pieces = world_size * pieces_per_rank(zigzag)
        return cls(seq_len, world_size, zigzag, kv_block, Spans.whole(pieces, seq_len))

    @cached_property
    def needed(self) -> Spans:
        """Set ``r``: the positions rank ``r`` needs (the union of its pieces' sets)."""
        owners = np.asarray(chunk_owners(self.world_size, self.zigzag))
        p = self.by_piece
        return Spans.of(self.world_size, owners[p.ids], p.starts, p.stops)

    def piece_needed(self, rank: int) -> tuple[Spans, ...]:
        """The positions each piece of rank ``rank``'s rows needs, in shard order."""
        owners = chunk_owners(self.world_size, self.zigzag)
        return tuple(self.by_piece.group(c) for c, owner in enumerate(owners) if owner == rank)

    def ranges(self, rank: int) -> tuple[range, ...]:
        """The absolute positions rank ``rank`` holds, in the order of its shard."""
        return owned_ranges(self.seq_len, rank, self.world_size, self.zigzag)

    def needed_spans(self, rank: int) -> Spans:
        """The positions rank ``rank`` needs, as a one-set :class:`~.spans.Spans`."""
        return self.needed.group(rank)

    def held_positions(self, rank: int) -> int:
        """Key/value positions of rank ``rank``'s compact buffer (its own needed ones and
        the received ones)."""
        return int(self.needed_spans(rank).sizes()[0])

    @cached_property
    def _owned(self) -> Spans:
        """Set ``r``: the positions rank ``r`` holds."""
        chunk = self.seq_len // (self.world_size * pieces_per_rank(self.zigzag))
        owners = np.asarray(chunk_owners(self.world_size, self.zigzag))
        starts = np.arange(len(owners)) * chunk
        return Spans.of(self.world_size, owners, starts, starts + chunk)

    def held_by_owner(self, rank: int) -> np.ndarray:
        """int64 ``[world_size]``: how many of rank ``rank``'s needed positions each rank
        holds (its own among them)."""
        return held_by_owner(self.needed_spans(rank), self.seq_len, self.world_size, self.zigzag)

    @cached_property
    def positions_moved(self) -> torch.Tensor:
        """int64 ``[world_size, world_size]``: positions rank ``s`` sends rank ``d`` at
        ``[s, d]`` (zero on the diagonal). For inspection: ``world_size ** 2`` entries."""
        moved = torch.stack([torch.from_numpy(self.held_by_owner(d)) for d in range(self.world_size)], dim=1)
        return moved.fill_diagonal_(0)

    @property
    def moves_anything(self) -> bool:
        """Whether any rank receives any position (when not, no collective runs)."""
        return bool(self.positions_moved.any())

    def received_positions(self, rank: int) -> int:
        """Key/value positions rank ``rank`` receives from the other ranks."""
        by_owner = self.held_by_owner(rank)
        return int(by_owner.sum() - by_owner[rank])

    def sent_positions(self, rank: int) -> int:
        """Key/value positions rank ``rank`` sends to the other ranks."""
        return int(self.positions_moved[rank, :].sum())

    def all_gather_positions(self) -> int:
        """Positions each rank would receive by all-gathering the keys and values."""
        return self.seq_len - self.seq_len // self.world_size

    def transfer(self, source: int, dest: int) -> torch.Tensor:
        """Absolute positions (ascending, int64) that rank ``source`` sends rank ``dest``:
        those ``source`` holds in tiles ``dest`` needs; empty when ``source == dest``."""
        if source == dest:
            return torch.empty(0, dtype=torch.int64)
        return torch.from_numpy(self.needed_spans(dest).intersect(self._owned.group(source)).positions())

    def local_index(self, rank: int, positions: np.ndarray) -> np.ndarray:
        """Indices into rank ``rank``'s shard of absolute ``positions`` it holds."""
        return self._owned.group(rank).covered_below(positions)

    def rank_transfers(self, rank: int, device) -> RankTransfers:
        """Rank ``rank``'s send, receive and placement indices, on ``device`` (built once
        per rank and device)."""
        key = (rank, str(torch.device(device)))
        if key not in self._transfers:
            self._transfers[key] = self._build_rank_transfers(rank, device)
        return self._transfers[key]

    def _build_rank_transfers(self, rank: int, device) -> RankTransfers:
        mine = self.needed_spans(rank)
        sends = [self.transfer(rank, dest).numpy() for dest in range(self.world_size)]
        recvs = [self.transfer(source, rank).numpy() for source in range(self.world_size)]
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


def needed_tiles(pattern, seq_len: int, world_size: int, zigzag: bool, kv_block: int,
                 ctx: ReachContext) -> tuple[Spans, Reach]:
    """``(by_piece, reach)``: the key tiles each piece of rows reaches, as positions of
    whole tiles (one set per piece, in sequence order), and the raw
    :class:`~.reach.Reach` of the pieces."""
    _, lo, hi = rank_rows(seq_len, world_size, zigzag)
    found = reach(pattern, lo, hi, ctx)
    return found.spans.coarsened(kv_block, seq_len), found


def exchange_plan(compiled: CompiledPattern, seq_len: int, world_size: int, *, zigzag: bool = False,
                  heads: int | None = None, device=None, **buffers) -> ExchangePlan:
    """The :class:`ExchangePlan` of ``compiled`` for a sequence of ``seq_len`` positions
    sharded over ``world_size`` ranks (see :mod:`sparsedsl.distributed.sharding`).

    ``heads``: the query heads (needed when the pattern has head groups); ``buffers``: the
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

    def build() -> ExchangePlan:
        ctx = ReachContext(seq_len, heads, unit=compiled.kv_block, buffers=buffers)
        by_piece, _ = needed_tiles(compiled.pattern, seq_len, world_size, zigzag, compiled.kv_block, ctx)
        return ExchangePlan(seq_len, world_size, zigzag, compiled.kv_block, by_piece)

    if buffers:
        return build()
    key = (compiled.pattern, compiled.kv_block, seq_len, world_size, zigzag, heads)
    return _PLANS.get(key, build)
