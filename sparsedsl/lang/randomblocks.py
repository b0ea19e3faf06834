"""The seeded choice of random key blocks (``blocks(size).random(per_row, seed)``).

Query-block row ``qb`` takes ``m = min(per_row, n)`` distinct key blocks among its ``n``
candidates (every key block; for ``.random_causal``, the blocks ``0 .. qb``) by Robert
Floyd's sampling without replacement: for ``j = n - m, ..., n - 1`` in turn, with ``t =
hash(seed, qb, j) mod (j + 1)``, the row takes ``t`` unless it has taken ``t`` already, and
then takes ``j``. ``hash`` is a 31-bit hash of ``(seed, qb, j)`` (:func:`block_hash`). For
a uniform hash every ``m``-subset is equally likely, and a row costs ``m`` hashes and at
most ``m (m - 1) / 2`` comparisons whatever ``n`` (or, for ``m ** 2 > 4 n``, a bitmap of
its ``n`` blocks instead of the comparisons). The hash and the remainder use only
int64 arithmetic that cannot overflow, so the choice is exact and the same on every
machine and device it is computed on (the mask builds compute it on the device of the
mask); a row's choice depends only on ``(seed, qb, n)``.
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


#: Picks made at once (rows x picks per row, or rows x blocks per row where the taken
#: blocks are kept as a bitmap): bounds the temporaries of the choice.
PICK_CHUNK = 1 << 22


def _floyd(seed: int, qb: torch.Tensor, n, width: int, bound: int) -> torch.Tensor:
    """``[len(qb), width]`` int64: column ``i`` holds the block row ``qb`` takes at Floyd's
    step ``j = n - width + i`` among its ``n`` blocks (``n`` an int, or an int64 tensor
    like ``qb``; at most ``bound``), or -1 where ``j < 0`` (a row with fewer blocks).

    Whether a row has taken ``t`` is read from the earlier columns (``i`` comparisons at
    step ``i``) or, when ``width ** 2`` exceeds ``4 * bound``, from a bitmap of the row's
    blocks: the same answer at a lower cost."""
    rows = len(qb)
    picks = torch.full((rows, width), -1, dtype=torch.int64, device=qb.device)
    seen = None
    if width * width > 4 * bound:
        seen = torch.zeros(rows, bound + 1, dtype=torch.bool, device=qb.device)  # column bound: no block
        row = torch.arange(rows, device=qb.device)
    for i in range(width):
        j = n - width + i
        if isinstance(j, int):
            j = torch.tensor(j, dtype=torch.int64, device=qb.device)
        t = block_hash(seed, qb, j)
        t %= (j + 1).clamp(min=1)
        taken = (picks[:, :i] == t[:, None]).any(1) if seen is None else seen[row, t]
        pick = torch.where(taken, j, t).masked_fill_(j < 0, -1)
        picks[:, i] = pick
        if seen is not None:
            seen[row, torch.where(pick < 0, bound, pick)] = True
    return picks


def _choose(seed: int, rows, n, width: int, bound: int, row_chunk: int | None = None, device=None) -> torch.Tensor:
    """:func:`_floyd` of the block rows ``rows`` (an int64 tensor, or an int: the rows ``0
    .. rows - 1`` on ``device``), ``row_chunk`` rows at a time (default: within
    :data:`PICK_CHUNK`); ``n`` an int, or a function of a tensor of rows."""
    per_row = max(1, width, bound + 1 if width * width > 4 * bound else 0)
    row_chunk = row_chunk or max(1, PICK_CHUNK // per_row)
    total = rows if isinstance(rows, int) else len(rows)
    parts = []
    for start in range(0, total, row_chunk):
        stop = min(start + row_chunk, total)
        qb = torch.arange(start, stop, dtype=torch.int64, device=device) if isinstance(rows, int) else rows[start:stop]
        parts.append(_floyd(seed, qb, n if isinstance(n, int) else n(qb), width, bound))
    return torch.cat(parts) if parts else torch.empty(0, width, dtype=torch.int64, device=device)


def block_picks_of_rows(rows: torch.Tensor, num_k_blocks: int, per_row: int, seed: int) -> torch.Tensor:
    """``[len(rows), min(per_row, num_k_blocks)]`` int64 key blocks chosen by the block
    rows ``rows`` (an int64 tensor, on the device to compute on), unordered within a row:
    row ``i`` is row ``rows[i]`` of :func:`random_block_picks`."""
    keep = min(per_row, num_k_blocks)
    return _choose(seed, rows.to(torch.int64), num_k_blocks, keep, num_k_blocks, device=rows.device)


def random_block_picks(num_q_blocks: int, num_k_blocks: int, per_row: int, seed: int,
                       row_chunk: int | None = None, device=None) -> torch.Tensor:
    """``[num_q_blocks, min(per_row, num_k_blocks)]`` int64 key-block indices chosen per
    row (unordered within a row), computed on ``device`` (default: the CPU) ``row_chunk``
    rows at a time (default: :data:`PICK_CHUNK` picks at a time)."""
    keep = min(per_row, num_k_blocks)
    return _choose(seed, num_q_blocks, num_k_blocks, keep, num_k_blocks, row_chunk, device)


@functools.lru_cache(maxsize=32)
def _cached_picks(num_q_blocks: int, num_k_blocks: int, per_row: int, seed: int,
                  device: torch.device) -> torch.Tensor:
    """:func:`random_block_picks`, kept for the latest choices: a pattern's mask, tile
    classes, counts and plans each need the same picks (``num_q_blocks * per_row``
    indices)."""
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
    """``[num_q_blocks, min(per_row, num_q_blocks)]`` int64 key-block indices chosen per row
    among the blocks at or before the diagonal (``kb <= qb``): Floyd's steps over the ``n =
    qb + 1`` blocks ``0 .. qb``, so a row's choice depends only on ``(seed, qb)``. A row
    with fewer than ``per_row`` such blocks takes them all and repeats its own block ``qb``
    in the unused slots."""
    width = min(per_row, num_q_blocks)
    picks = _choose(seed, num_q_blocks, lambda qb: qb + 1, width, num_q_blocks, device=device)
    rows = torch.arange(num_q_blocks, dtype=torch.int64, device=device)[:, None]
    return torch.where(picks < 0, rows, picks)


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
