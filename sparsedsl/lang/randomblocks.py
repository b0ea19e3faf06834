"""The seeded choice of random key blocks (``blocks(size).random(per_row, seed)``).

Each key block ``kb`` of query-block row ``qb`` gets a 31-bit hash of ``(seed, qb, kb)``;
the row keeps the ``per_row`` key blocks with the smallest hashes (ties broken by ``kb``).
The hash uses only int64 arithmetic that cannot overflow, and the sort keys are unique, so
the choice is exact and the same on every machine and device it is computed on (the mask
builds compute it on the device of the mask); a row's choice depends only on ``(seed, qb,
number of key blocks)``.
"""

from __future__ import annotations

import functools

import torch

from ..budget import check_memory

_MASK31 = 0x7FFFFFFF


def _mix(x):
    """Three rounds of a 31-bit multiply-xorshift of ``x``, a Python int or an int64 tensor
    (updated in place: pass a fresh one); every product stays below 2**62."""
    for mult in (1103515245, 1664525, 22695477):
        x *= mult
        x += 12345
        x &= _MASK31
        x ^= x >> 13
    return x


def block_hash(seed: int, qb: torch.Tensor, kb: torch.Tensor) -> torch.Tensor:
    """31-bit hash of ``(seed, qb, kb)`` as int64 (broadcasting ``qb`` against ``kb``)."""
    x = _mix((seed & _MASK31) ^ 0x2545F491)
    x = _mix(x ^ (qb.to(torch.int64) & _MASK31))
    return _mix(x ^ (kb.to(torch.int64) & _MASK31))


#: Hashes computed at once (bounds the int64 temporaries of :func:`random_block_picks`; on a
#: 2-core CPU, chunks of 2**16 hashes took about 9 times the CPU time of chunks of 2**22 in the
#: per-operation overhead of their two dozen operations).
HASH_CHUNK = 1 << 22


def random_block_picks(num_q_blocks: int, num_k_blocks: int, per_row: int, seed: int,
                       row_chunk: int | None = None, device=None) -> torch.Tensor:
    """``[num_q_blocks, min(per_row, num_k_blocks)]`` int64 key-block indices chosen per
    row (unordered within a row), computed on ``device`` (default: the CPU) ``row_chunk``
    rows at a time (default: :data:`HASH_CHUNK` hashes at a time)."""
    keep = min(per_row, num_k_blocks)
    row_chunk = row_chunk or max(1, HASH_CHUNK // max(1, num_k_blocks))
    kb = torch.arange(num_k_blocks, dtype=torch.int64, device=device)
    rows = []
    for start in range(0, num_q_blocks, row_chunk):
        qb = torch.arange(start, min(start + row_chunk, num_q_blocks), dtype=torch.int64, device=device)
        # Sort key: hash first, block index second (unique, so the order is total).
        key = block_hash(seed, qb[:, None], kb[None, :])
        key *= num_k_blocks
        key += kb
        rows.append(torch.topk(key, keep, dim=1, largest=False).indices)
    if not rows:
        return torch.empty(0, keep, dtype=torch.int64, device=device)
    return torch.cat(rows)


@functools.lru_cache(maxsize=32)
def _cached_picks(num_q_blocks: int, num_k_blocks: int, per_row: int, seed: int,
                  device: torch.device) -> torch.Tensor:
    """:func:`random_block_picks`, kept for the latest choices: a pattern's mask, tile
    classes, counts and plans each need the same picks (``num_q_blocks * per_row`` indices,
    small beside the hashing of every block pair that makes them)."""
    return random_block_picks(num_q_blocks, num_k_blocks, per_row, seed, device=device)


def random_block_layout(num_q_blocks: int, num_k_blocks: int, per_row: int, seed: int,
                        device=None) -> torch.Tensor:
    """The chosen blocks as a bool ``[num_q_blocks, num_k_blocks]`` layout on ``device``
    (default: the CPU), checked against the memory budget first. The picks are computed
    once for the latest sizes and seeds (the layout is made afresh)."""
    check_memory("blocks().random()", f"a random-block layout of {num_q_blocks:,} x {num_k_blocks:,} blocks",
                 num_q_blocks * num_k_blocks)
    layout = torch.zeros(num_q_blocks, num_k_blocks, dtype=torch.bool, device=device)
    picks = _cached_picks(num_q_blocks, num_k_blocks, per_row, seed, torch.device(device or "cpu"))
    layout.scatter_(1, picks, True)
    return layout


def random_causal_block_picks(num_q_blocks: int, per_row: int, seed: int, device=None) -> torch.Tensor:
    """``[num_q_blocks, per_row]`` int64 key-block indices chosen per row among the blocks
    at or before the diagonal (``kb <= qb``): the ``per_row`` smallest hashes of ``(seed,
    qb, kb)``, ties broken by ``kb``, so a row's choice depends only on ``(seed, qb)``. A
    row with fewer than ``per_row`` such blocks repeats its own block ``qb`` (always
    chosen there) in the unused slots."""
    width = min(per_row, num_q_blocks)
    row_chunk = max(1, HASH_CHUNK // max(1, num_q_blocks))
    kb = torch.arange(num_q_blocks, dtype=torch.int64, device=device)
    rows = []
    for start in range(0, num_q_blocks, row_chunk):
        qb = torch.arange(start, min(start + row_chunk, num_q_blocks), dtype=torch.int64, device=device)
        last = int(qb[-1]) + 1  # the blocks any of these rows may choose
        key = block_hash(seed, qb[:, None], kb[None, :last])
        key *= last
        key += kb[:last]
        key.masked_fill_(kb[None, :last] > qb[:, None], torch.iinfo(torch.int64).max)  # after the diagonal
        picks = torch.topk(key, min(width, last), dim=1, largest=False).indices
        picks = torch.where(picks > qb[:, None], qb[:, None], picks)  # rows with fewer blocks
        rows.append(_repeat_last_column(picks, width))
    if not rows:
        return torch.empty(0, width, dtype=torch.int64, device=device)
    return torch.cat(rows)


def _repeat_last_column(picks: torch.Tensor, width: int) -> torch.Tensor:
    """``picks`` with its last column repeated up to ``width`` columns."""
    missing = width - picks.shape[1]
    return picks if missing == 0 else torch.cat([picks, picks[:, -1:].expand(-1, missing)], 1)


def random_causal_block_layout(num_q_blocks: int, num_k_blocks: int, per_row: int, seed: int,
                               device=None) -> torch.Tensor:
    """The blocks of :func:`random_causal_block_picks` as a bool ``[num_q_blocks,
    num_k_blocks]`` layout on ``device`` (picks past the last key block dropped), checked
    against the memory budget first."""
    check_memory("blocks().random_causal()", f"a random-block layout of {num_q_blocks:,} x "
                 f"{max(num_q_blocks, num_k_blocks):,} blocks", num_q_blocks * max(num_q_blocks, num_k_blocks))
    layout = torch.zeros(num_q_blocks, max(num_q_blocks, num_k_blocks), dtype=torch.bool, device=device)
    if num_q_blocks:
        layout.scatter_(1, random_causal_block_picks(num_q_blocks, per_row, seed, device=device), True)
    return layout[:, :num_k_blocks].contiguous()
