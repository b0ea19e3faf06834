"""Exact tile and pair counts of a head-free pattern without visiting every tile.

The ``Q x K`` matrix is cut into ``t x t`` tiles. By :func:`~.structure.periodicity`, every
tile of the *bulk* (rows from ``ceil(q_bound / t)``, columns from ``ceil(k_bound / t)``, not
cut short by a sequence end) has the same content as the tile ``p = lcm(P, t) / t`` tiles
further down its diagonal. The bulk is therefore enumerated as *classes* ``(i mod p, j - i)``,
one representative tile and a multiplicity each: ``O(p * (nq + nk))`` tiles instead of
``O(nq * nk)``. The rest (the rows and columns before the bounds, and the ragged last row and
column) is enumerated tile by tile; where classes would not save much, so is the bulk.

Each enumerated tile is classified by the structural tile classifier
(:mod:`sparsedsl.passes.tiles`); a full tile contributes its area. The others are counted by
evaluating the ``mask_mod`` on one tile per distinct :func:`~.structure.tile_signature`
(equal signatures, equal contents), so a band of partial tiles costs a handful of tile
evaluations. Everything is exact; memory is bounded by ``CHUNK`` tiles at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch

from ..budget import check_memory
from ..lang import nodes as n
from ..passes.context import Context
from ..passes.maskmod import lower_mask
from ..passes.refine import tile_pair_counts
from ..passes.squares import uniform_square
from ..passes.tiles import EMPTY, FULL, PARTIAL, UNKNOWN, Span, TileGrid, _classify
from .structure import diagonal_support, periodicity, tile_signature

#: Tiles handled at once.
CHUNK = 1 << 20


@dataclass
class TileTally:
    """Allowed pairs and tile classes of one head-free pattern (create_block_mask's view:
    a tile cut short by a sequence end is never full)."""

    pairs: int = 0
    full: int = 0
    partial: int = 0
    empty: int = 0


@dataclass
class _Batch:
    """Tiles ``(i, j)`` standing for ``weight`` tiles each (a class and its multiplicity);
    ``members`` re-expands a class to its tiles (for drawing)."""

    i: torch.Tensor
    j: torch.Tensor
    weight: torch.Tensor
    step: int = 0  # class members are (i + m * step, j + m * step), m < weight


def supported(pattern: n.Pattern) -> bool:
    """Whether :func:`tally` covers ``pattern`` (head-free, no tensors, no random blocks)."""
    return not pattern.buffer_names() and periodicity(pattern) is not None


class _Counter:
    def __init__(self, pattern: n.Pattern, q_len: int, kv_len: int, tile: int):
        self.pattern = pattern
        self.ctx = Context(q_len, kv_len, 1)
        self.grid = TileGrid(q_len, kv_len, tile, tile)
        self.t = tile
        self.mask_mod = lower_mask(pattern, self.ctx)
        self.cache: dict[tuple, int] = {}

    # -- enumeration -------------------------------------------------------------------
    def batches(self) -> Iterator[_Batch]:
        g, t = self.grid, self.t
        period = periodicity(self.pattern)
        nq, nk = g.num_q_tiles, g.num_kv_tiles
        nqf, nkf = g.q_len // t, g.kv_len // t  # tiles not cut short
        i0 = min(-(-period.q_bound // t), nqf)
        j0 = min(-(-period.k_bound // t), nkf)
        p = math.lcm(period.period, t) // t
        yield from _rect(range(0, i0), range(0, nk))
        yield from _rect(range(nqf, nq), range(0, nk))
        yield from _rect(range(i0, nqf), range(0, j0))
        yield from _rect(range(i0, nqf), range(nkf, nk))
        rows, cols = nqf - i0, nkf - j0
        if rows <= 0 or cols <= 0:
            return
        # Bulk tiles off the pattern's diagonal band are empty: skip their diagonals.
        lo, hi = diagonal_support(self.pattern)
        d_lo, d_hi = j0 - (nqf - 1), nkf - 1 - i0
        if lo > hi:
            return
        if lo != -math.inf:
            d_lo = max(d_lo, -((t - 1 - int(lo)) // t))  # ceil((lo - t + 1) / t)
        if hi != math.inf:
            d_hi = min(d_hi, (int(hi) + t - 1) // t)
        if d_lo > d_hi:
            return
        if p * (d_hi - d_lo + 1) * 2 >= rows * cols:
            yield from _rect(range(i0, nqf), range(j0, nkf))
        else:
            yield from _classes(i0, nqf, j0, nkf, p, d_lo, d_hi)

    # -- counting ----------------------------------------------------------------------
    def evaluate(self, batch: _Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(state, count)`` of each tile of the batch (int8, int64)."""
        g, t = self.grid, self.t
        q0, k0 = batch.i * t, batch.j * t
        h = (g.q_len - q0).clamp(max=t)
        w = (g.kv_len - k0).clamp(max=t)
        span = Span(q0[:, None], (q0 + h - 1)[:, None], k0[:, None], (k0 + w - 1)[:, None])
        state = _classify(self.pattern, self.ctx, span, g).reshape(-1).expand(q0.shape[0])
        area = h * w
        count = torch.where(state == FULL, area, 0)
        open_ = ((state == PARTIAL) | (state == UNKNOWN)).nonzero()[:, 0]
        if open_.numel():
            count[open_] = self._signature_counts(q0[open_], k0[open_], h[open_], w[open_],
                                                  batch.i[open_], batch.j[open_])
        state = torch.where(count == 0, EMPTY, PARTIAL)
        state = torch.where(count == t * t, FULL, state).to(torch.int8)
        return state, count

    def _signature_counts(self, q0, k0, h, w, i, j) -> torch.Tensor:
        cols = tile_signature(self.pattern, q0, k0, self.t)
        keys = torch.stack([h, w] + cols, dim=1)
        uniq, inverse = torch.unique(keys, dim=0, return_inverse=True)
        first = torch.full((uniq.shape[0],), i.shape[0], dtype=torch.int64)
        first.scatter_reduce_(0, inverse, torch.arange(i.shape[0]), reduce="amin")
        values = torch.empty(uniq.shape[0], dtype=torch.int64)
        missing = []
        for u, key in enumerate(map(tuple, uniq.tolist())):
            cached = self.cache.get(key)
            if cached is None:
                missing.append(u)
            else:
                values[u] = cached
        if missing:
            m = torch.tensor(missing, dtype=torch.int64)
            reps = first[m]
            tiles = torch.stack([torch.zeros_like(reps), torch.zeros_like(reps), i[reps], j[reps]], 1)
            counted = tile_pair_counts(self.mask_mod, self.grid, tiles, square=uniform_square(self.pattern))
            values[m] = counted
            for u, c in zip(missing, counted.tolist()):
                self.cache[tuple(uniq[u].tolist())] = c
        return values[inverse]


def _rect(rows: range, cols: range) -> Iterator[_Batch]:
    if not rows or not cols:
        return
    per = max(1, CHUNK // len(cols))
    j = torch.arange(cols.start, cols.stop, dtype=torch.int64)
    for start in range(rows.start, rows.stop, per):
        i = torch.arange(start, min(start + per, rows.stop), dtype=torch.int64)
        ii, jj = torch.broadcast_tensors(i[:, None], j[None, :])
        yield _Batch(ii.reshape(-1), jj.reshape(-1), torch.ones(ii.numel(), dtype=torch.int64))


def _classes(i0: int, i1: int, j0: int, j1: int, p: int, d_lo: int, d_hi: int) -> Iterator[_Batch]:
    """Classes ``(i mod p, d = j - i)`` of the tiles ``[i0, i1) x [j0, j1)`` on diagonals
    ``d_lo <= d <= d_hi``: the first tile of each class and the number of its tiles (every
    ``p``-th one down the diagonal)."""
    d_all = torch.arange(d_lo, d_hi + 1, dtype=torch.int64)
    r = torch.arange(p, dtype=torch.int64)
    per = max(1, CHUNK // p)
    for start in range(0, d_all.numel(), per):
        d = d_all[start:start + per][:, None]
        lo = torch.clamp(j0 - d, min=i0)
        hi = torch.clamp(j1 - d, max=i1)
        first = lo + (r[None, :] - lo) % p
        count = torch.clamp(-((first - hi) // p), min=0)  # ceil((hi - first) / p)
        keep = count > 0
        first, count = first[keep], count[keep]
        dd = d.expand(-1, p)[keep]
        yield _Batch(first, first + dd, count, p)


def tally(pattern: n.Pattern, q_len: int, kv_len: int, tile: int) -> TileTally:
    """Exact pairs and tile classes of a head-free, tensor-free pattern (see
    :func:`supported`) on ``tile x tile`` tiles."""
    counter = _Counter(pattern, q_len, kv_len, tile)
    out = TileTally()
    for batch in counter.batches():
        state, count = counter.evaluate(batch)
        out.pairs += int((count * batch.weight).sum())
        out.full += int(batch.weight[state == FULL].sum())
        out.partial += int(batch.weight[state == PARTIAL].sum())
    g = counter.grid
    out.empty = g.num_q_tiles * g.num_kv_tiles - out.full - out.partial
    return out


def state_grid(pattern: n.Pattern, q_len: int, kv_len: int, tile: int) -> torch.Tensor:
    """The ``[num_q_tiles, num_kv_tiles]`` int8 tile states (EMPTY / PARTIAL / FULL) of a
    pattern :func:`tally` covers, filled class by class."""
    counter = _Counter(pattern, q_len, kv_len, tile)
    g = counter.grid
    check_memory("tile states", f"a grid of {g.num_q_tiles:,} x {g.num_kv_tiles:,} tiles of {tile} x {tile} "
                 f"positions", g.num_q_tiles * g.num_kv_tiles)
    out = torch.zeros(g.num_q_tiles, g.num_kv_tiles, dtype=torch.int8)
    for batch in counter.batches():
        state, _ = counter.evaluate(batch)
        keep = state != EMPTY
        i, j, weight, state = batch.i[keep], batch.j[keep], batch.weight[keep], state[keep]
        if batch.step == 0:
            out[i, j] = state
            continue
        # Expand each class to its members, a bounded number at a time.
        total = int(weight.sum())
        order = torch.repeat_interleave(torch.arange(weight.numel()), weight) if total else None
        if order is None:
            continue
        starts = torch.cumsum(weight, 0) - weight
        for s in range(0, total, CHUNK * 4):
            idx = order[s:s + CHUNK * 4]
            m = torch.arange(s, s + idx.numel()) - starts[idx]
            out[i[idx] + m * batch.step, j[idx] + m * batch.step] = state[idx]
    return out
