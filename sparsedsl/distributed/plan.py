"""Which key/value positions each rank of a sequence-parallel group needs from the others,
worked out from the pattern's structure alone (no communication, the same on every rank).

Rank ``r`` needs key tile ``j`` (tiles of ``compiled.kv_block`` positions from 0) when the
tile is not ``EMPTY`` for some batch, head and query tile of the rows ``r`` holds, as
classified by ``compiled.lowering(..., q_offset=row_start)``. The positions of the needed
tiles that another rank holds are what ``r`` receives; everything else stays where it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch

from ..compiler.cache import BuildCache
from ..compiler.module import CompiledPattern
from ..lang.checks import check_int
from ..passes.tiles import EMPTY
from .sharding import check_divisible, check_zigzag, owned_ranges

#: Exchange plans of patterns without call-time tensors, by (pattern, tiles, sizes, layout, device).
_PLANS = BuildCache(maxsize=32)


@dataclass(frozen=True)
class RankTransfers:
    """One rank's part of an exchange, as index tensors on one device.

    ``send_index``: local positions (indices into the rank's shard) to send, grouped by
    destination rank in rank order; ``send_counts[d]`` of them go to rank ``d``.
    ``recv_positions``: absolute positions of the received rows, grouped by source rank;
    ``recv_counts[s]`` of them come from rank ``s``. ``own_positions``: the absolute
    position of each row of the rank's own shard.
    """

    send_index: torch.Tensor
    send_counts: list[int]
    recv_positions: torch.Tensor
    recv_counts: list[int]
    own_positions: torch.Tensor


@dataclass(frozen=True, eq=False)
class ExchangePlan:
    """The key/value traffic of sequence-parallel attention for one pattern and layout.

    ``needed_tiles``: bool ``[world_size, num_kv_tiles]``, whether rank ``r`` needs key
    tile ``j`` (``kv_block`` positions from ``j * kv_block``). ``positions_moved``: int64
    ``[world_size, world_size]``, how many key/value positions rank ``s`` sends rank ``d``
    (``[s, d]``; zero on the diagonal: a rank's own positions do not move).
    """

    seq_len: int
    world_size: int
    zigzag: bool
    kv_block: int
    needed_tiles: torch.Tensor
    #: Built :class:`RankTransfers` by (rank, device).
    _transfers: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def all_gather(cls, seq_len: int, world_size: int, zigzag: bool, kv_block: int) -> "ExchangePlan":
        """The plan in which every rank needs every key tile: the traffic of all-gathering
        the keys and values (a baseline to compare a pattern's plan with)."""
        num_kv_tiles = -(-seq_len // kv_block)
        return cls(seq_len, world_size, zigzag, kv_block,
                   torch.ones(world_size, num_kv_tiles, dtype=torch.bool))

    def ranges(self, rank: int) -> tuple[range, ...]:
        """The absolute positions rank ``rank`` holds, in the order of its shard."""
        return owned_ranges(self.seq_len, rank, self.world_size, self.zigzag)

    @cached_property
    def _owner_and_local_index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """For every absolute position: the rank holding it and its index in that shard."""
        owner = torch.empty(self.seq_len, dtype=torch.int64)
        local = torch.empty(self.seq_len, dtype=torch.int64)
        for rank in range(self.world_size):
            offset = 0
            for r in self.ranges(rank):
                owner[r.start:r.stop] = rank
                local[r.start:r.stop] = torch.arange(offset, offset + len(r))
                offset += len(r)
        return owner, local

    @cached_property
    def _needed_positions(self) -> torch.Tensor:
        """bool ``[world_size, seq_len]``: the positions of each rank's needed tiles."""
        return self.needed_tiles.repeat_interleave(self.kv_block, dim=1)[:, :self.seq_len]

    def transfer(self, source: int, dest: int) -> torch.Tensor:
        """Absolute positions (ascending, int64) that rank ``source`` sends rank ``dest``:
        those ``source`` holds in tiles ``dest`` needs; empty when ``source == dest``."""
        owner, _ = self._owner_and_local_index
        if source == dest:
            return torch.empty(0, dtype=torch.int64)
        return torch.nonzero(self._needed_positions[dest] & (owner == source)).flatten()

    @cached_property
    def positions_moved(self) -> torch.Tensor:
        """int64 ``[world_size, world_size]``: positions rank ``s`` sends rank ``d`` at ``[s, d]``."""
        owner, _ = self._owner_and_local_index
        moved = torch.zeros(self.world_size, self.world_size, dtype=torch.int64)
        for dest in range(self.world_size):
            moved[:, dest] = torch.bincount(owner[self._needed_positions[dest]], minlength=self.world_size)
        moved.fill_diagonal_(0)
        return moved

    @property
    def moves_anything(self) -> bool:
        """Whether any rank receives any position (when not, no collective runs)."""
        return bool(self.positions_moved.any())

    def received_positions(self, rank: int) -> int:
        """Key/value positions rank ``rank`` receives from the other ranks."""
        return int(self.positions_moved[:, rank].sum())

    def sent_positions(self, rank: int) -> int:
        """Key/value positions rank ``rank`` sends to the other ranks."""
        return int(self.positions_moved[rank, :].sum())

    def all_gather_positions(self) -> int:
        """Positions each rank would receive by all-gathering the keys and values."""
        return self.seq_len - self.seq_len // self.world_size

    def rank_transfers(self, rank: int, device) -> RankTransfers:
        """Rank ``rank``'s send and receive indices, on ``device`` (built once per rank
        and device)."""
        key = (rank, str(torch.device(device)))
        if key not in self._transfers:
            self._transfers[key] = self._build_rank_transfers(rank, device)
        return self._transfers[key]

    def _build_rank_transfers(self, rank: int, device) -> RankTransfers:
        _, local = self._owner_and_local_index
        sends = [self.transfer(rank, dest) for dest in range(self.world_size)]
        recvs = [self.transfer(source, rank) for source in range(self.world_size)]
        own = torch.cat([torch.arange(r.start, r.stop) for r in self.ranges(rank)])
        return RankTransfers(
            send_index=local[torch.cat(sends)].to(device),
            send_counts=[len(s) for s in sends],
            recv_positions=torch.cat(recvs).to(device),
            recv_counts=[len(r) for r in recvs],
            own_positions=own.to(device),
        )


def exchange_plan(compiled: CompiledPattern, seq_len: int, world_size: int, *, zigzag: bool = False,
                  heads: int | None = None, device=None, **buffers) -> ExchangePlan:
    """The :class:`ExchangePlan` of ``compiled`` for a sequence of ``seq_len`` positions
    sharded over ``world_size`` ranks (see :mod:`sparsedsl.distributed.sharding`).

    ``heads``: the query heads (needed when the pattern has head groups); ``device``: where
    the tiles are classified; ``buffers``: the pattern's call-time tensors, over the whole
    sequence. Plans of patterns without call-time tensors are cached. Needs no process
    group: any process can inspect the traffic of any layout.
    """
    if not isinstance(compiled, CompiledPattern):
        raise TypeError(
            f"exchange_plan(): argument 'compiled' must be a CompiledPattern (from "
            f"sparsedsl.compile), got {type(compiled).__name__}"
        )
    world_size = check_int("exchange_plan()", "world_size", world_size, minimum=1)
    check_zigzag("exchange_plan()", zigzag)
    seq_len = check_divisible("exchange_plan()", seq_len, world_size, zigzag)
    device = torch.device("cpu" if device is None else device)

    def build() -> ExchangePlan:
        needed = torch.stack([
            _needed_tiles(compiled, seq_len, owned_ranges(seq_len, rank, world_size, zigzag),
                          heads, device, buffers)
            for rank in range(world_size)
        ])
        return ExchangePlan(seq_len, world_size, zigzag, compiled.kv_block, needed)

    if buffers:
        return build()
    key = (compiled.pattern, compiled.q_block, compiled.kv_block, seq_len, world_size,
           zigzag, heads, str(device))
    return _PLANS.get(key, build)


def _needed_tiles(compiled: CompiledPattern, seq_len: int, rows: tuple[range, ...], heads,
                  device, buffers) -> torch.Tensor:
    """bool ``[num_kv_tiles]`` on the CPU: the key tiles some row of ``rows`` may attend to."""
    needed = None
    for r in rows:
        lowering = compiled.lowering(len(r), seq_len, heads=heads, device=device, q_offset=r.start,
                                     where="sequence_parallel_attention()", **buffers)
        live = (lowering.states != EMPTY).flatten(0, 2).any(0).cpu()
        needed = live if needed is None else needed | live
    return needed
