"""How a sequence is laid out over the ranks of a sequence-parallel group.

Contiguous layout (``zigzag=False``): a sequence of ``N`` positions is cut into ``P`` equal
pieces and rank ``r`` holds positions ``[r * N/P, (r + 1) * N/P)``.

Zigzag layout (``zigzag=True``): the sequence is cut into ``2P`` equal chunks and rank
``r`` holds chunk ``r`` followed by chunk ``2P - 1 - r``. Under a causal pattern, the rows
of chunk ``c`` see ``c + 1`` chunks of keys, so every rank's two chunks together see
``2P + 1`` chunks: the work is the same on every rank.
"""

from __future__ import annotations

import torch

from ..lang.checks import check_int


def _check_rank(where: str, rank, world_size) -> tuple[int, int]:
    world_size = check_int(where, "world_size", world_size, minimum=1)
    rank = check_int(where, "rank", rank, minimum=0)
    if rank >= world_size:
        raise ValueError(f"{where}: argument 'rank' must be < world_size={world_size}, got {rank}")
    return rank, world_size


def check_zigzag(where: str, zigzag) -> bool:
    """``zigzag`` if it is a bool, else a ``TypeError`` naming the argument."""
    if not isinstance(zigzag, bool):
        raise TypeError(f"{where}: argument 'zigzag' must be True or False, got {zigzag!r}")
    return zigzag


def pieces_per_rank(zigzag: bool) -> int:
    """How many equal pieces of the sequence each rank holds: 2 with zigzag, else 1."""
    return 2 if zigzag else 1


def owned_ranges(seq_len: int, rank: int, world_size: int, zigzag: bool = False) -> tuple[range, ...]:
    """The absolute positions rank ``rank`` holds, as ranges in the order its shard stores
    them: one range, or with ``zigzag`` the ranges of chunks ``rank`` and ``2P - 1 - rank``.
    ``seq_len`` must divide by ``world_size`` (by ``2 * world_size`` with zigzag)."""
    rank, world_size = _check_rank("owned_ranges()", rank, world_size)
    check_zigzag("owned_ranges()", zigzag)
    seq_len = check_divisible("owned_ranges()", seq_len, world_size, zigzag)
    pieces = world_size * pieces_per_rank(zigzag)
    size = seq_len // pieces
    chunks = (rank, pieces - 1 - rank) if zigzag else (rank,)
    return tuple(range(c * size, (c + 1) * size) for c in chunks)


def chunk_owners(world_size: int, zigzag: bool) -> list[int]:
    """The rank holding each of the ``world_size * pieces_per_rank(zigzag)`` equal chunks
    of the sequence, in sequence order."""
    if not zigzag:
        return list(range(world_size))
    return list(range(world_size)) + list(reversed(range(world_size)))


def check_divisible(where: str, seq_len, world_size: int, zigzag: bool) -> int:
    """``seq_len`` if it is a positive integer divisible by ``world_size`` (by
    ``2 * world_size`` with ``zigzag``), else a ``ValueError`` naming ``seq_len``."""
    seq_len = check_int(where, "seq_len", seq_len, minimum=1)
    pieces = world_size * pieces_per_rank(zigzag)
    if seq_len % pieces:
        raise ValueError(
            f"{where}: argument 'seq_len' must be divisible by {_pieces_text(world_size, zigzag)}"
            f"={pieces} (zigzag={zigzag}), got {seq_len}"
        )
    return seq_len


def _pieces_text(world_size: int, zigzag: bool) -> str:
    return "2 * world_size" if zigzag else "world_size"


def shard(x: torch.Tensor, rank: int, world_size: int, zigzag: bool = False, dim: int = 2) -> torch.Tensor:
    """Rank ``rank``'s shard of the full-sequence tensor ``x`` (sequence along ``dim``;
    2 for ``[batch, heads, length, head_dim]``): a view of positions
    ``[rank * N/P, (rank + 1) * N/P)``, or with ``zigzag`` a new tensor holding chunk
    ``rank`` then chunk ``2P - 1 - rank`` of ``2P`` equal chunks. Raises ``ValueError`` when
    the length does not divide by ``world_size`` (by ``2 * world_size`` with zigzag)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"shard(): argument 'x' must be a torch.Tensor, got {type(x).__name__}")
    rank, world_size = _check_rank("shard()", rank, world_size)
    check_zigzag("shard()", zigzag)
    dim = _check_dim("shard()", x, dim)
    seq_len, pieces = x.shape[dim], world_size * pieces_per_rank(zigzag)
    if seq_len % pieces:
        raise ValueError(
            f"shard(): argument 'x' has length {seq_len} along dim {dim}, which must be "
            f"divisible by {_pieces_text(world_size, zigzag)}={pieces} (zigzag={zigzag})"
        )
    ranges = owned_ranges(seq_len, rank, world_size, zigzag)
    parts = [x.narrow(dim, r.start, len(r)) for r in ranges]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def unshard(shards, zigzag: bool = False, dim: int = 2) -> torch.Tensor:
    """The full-sequence tensor from the shards of every rank, listed in rank order (the
    inverse of :func:`shard`). Raises ``ValueError`` when the shards differ in shape or,
    with ``zigzag``, have an odd length."""
    if not isinstance(shards, (list, tuple)) or not shards:
        shown = repr(shards) if isinstance(shards, (list, tuple)) else type(shards).__name__
        raise ValueError(f"unshard(): argument 'shards' must be a non-empty list of tensors, got {shown}")
    for i, s in enumerate(shards):
        if not isinstance(s, torch.Tensor):
            raise TypeError(f"unshard(): shards[{i}] must be a torch.Tensor, got {type(s).__name__}")
        if s.shape != shards[0].shape:
            raise ValueError(
                f"unshard(): every shard must have the same shape, got shards[0] "
                f"{list(shards[0].shape)} and shards[{i}] {list(s.shape)}"
            )
    check_zigzag("unshard()", zigzag)
    dim = _check_dim("unshard()", shards[0], dim)
    if not zigzag:
        return torch.cat(list(shards), dim)
    local_len = shards[0].shape[dim]
    if local_len % 2:
        raise ValueError(
            f"unshard(): with zigzag=True each shard holds two chunks, so its length along "
            f"dim {dim} must be even, got {local_len}"
        )
    half = local_len // 2
    first = [s.narrow(dim, 0, half) for s in shards]
    second = [s.narrow(dim, half, half) for s in reversed(shards)]
    return torch.cat(first + second, dim)


def _check_dim(where: str, x: torch.Tensor, dim) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"{where}: argument 'dim' must be a dimension of a {x.dim()}-D tensor, got {dim!r}")
    return dim % x.dim()
