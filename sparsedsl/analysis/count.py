"""``sparsedsl.count``: exact numbers of allowed pairs and tiles, from structure.

Patterns without call-time tensors or random blocks are counted once per distinct head
pattern by :mod:`sparsedsl.analysis.tilecount`: the periodic bulk of the tile grid is
enumerated by diagonal classes, and partial tiles are counted once per distinct tile
signature, so banded patterns count in well under a second at a million tokens. Other
patterns (``documents``, ``.layout``, ``.random``) take the general path: every tile is
classified structurally (:mod:`sparsedsl.passes.tiles`), a full tile contributes its area,
and only partial tiles are evaluated, a bounded chunk at a time. Both paths are exact and
never hold ``O(Q * K)`` values.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..budget import check_memory
from ..lang import nodes as n
from ..lang.checks import PatternArgumentError, check_int
from ..lang.multiset import is_multiset, multiset_terms
from ..lang.queries import head_group_count, mask_part
from ..passes.blockmask import tile_states
from ..passes.context import Context
from ..passes.maskmod import lower_mask
from ..passes.refine import tile_pair_counts
from ..passes.squares import uniform_square
from ..passes.tiles import FULL, PARTIAL, TileGrid, layer_counts
from .headsplit import distinct_head_patterns
from .tilecount import supported, tally


@dataclass(frozen=True)
class TileCounts:
    """Tiles of one tiling, by class."""

    full: int
    partial: int
    empty: int

    @property
    def total(self) -> int:
        return self.full + self.partial + self.empty

    def __str__(self) -> str:
        return f"{self.full} full, {self.partial} partial, {self.empty} empty of {self.total}"


@dataclass(frozen=True)
class Counts:
    """What a pattern allows at one size.

    ``per_head[h]`` is the number of allowed ``(q, k)`` pairs of head ``h`` (summed over
    the batch entries of bound tensors, such as ``[B, L]`` document ids); ``pairs`` their
    sum; ``tiles`` and ``tiles_per_head`` classify ``tile x tile`` tiles as a tile-based
    kernel sees them (a tile cut short by a sequence end is never full).
    ``useful_flops`` is ``4 * head_dim * pairs`` (forward ``QK^T`` and ``PV``);
    ``computed_flops`` is ``4 * head_dim * tile^2`` per non-empty tile.

    For a multiset pattern (``a + b``, ``longnet``), ``per_head`` counts each allowed pair
    once (its multiplicity is positive), and ``per_head_with_multiplicity`` counts it once
    per term that allows it (its multiplicity: LongNet's pairs summed over the branches);
    it is None for a set pattern, whose pairs count once.
    """

    q_len: int
    kv_len: int
    heads: int
    tile: int
    head_dim: int
    per_head: tuple[int, ...]
    tiles_per_head: tuple[TileCounts, ...]
    batch: int = 1
    per_head_with_multiplicity: tuple[int, ...] | None = None

    @property
    def pairs(self) -> int:
        return sum(self.per_head)

    @property
    def pairs_with_multiplicity(self) -> int:
        """Pairs counted with multiplicity (``pairs`` for a set pattern)."""
        if self.per_head_with_multiplicity is None:
            return self.pairs
        return sum(self.per_head_with_multiplicity)

    @property
    def density(self) -> float:
        """Allowed pairs over all ``batch * heads * q_len * kv_len`` pairs."""
        return self.pairs / (self.batch * self.heads * self.q_len * self.kv_len)

    @property
    def tiles(self) -> TileCounts:
        return TileCounts(*(sum(getattr(t, f) for t in self.tiles_per_head)
                            for f in ("full", "partial", "empty")))

    @property
    def useful_flops(self) -> int:
        return 4 * self.head_dim * self.pairs

    @property
    def computed_flops(self) -> int:
        tiles = self.tiles
        return 4 * self.head_dim * (tiles.full + tiles.partial) * self.tile * self.tile

    def __str__(self) -> str:
        lines = [
            f"q_len={self.q_len} kv_len={self.kv_len} heads={self.heads}"
            + (f" batch={self.batch}" if self.batch > 1 else ""),
            f"pairs: {self.pairs:,} allowed, density {self.density:.6f}",
        ]
        if len(set(self.per_head)) > 1:
            lines.append("per head: " + ", ".join(f"{p:,}" for p in self.per_head))
        if self.per_head_with_multiplicity is not None:
            total = self.pairs_with_multiplicity
            ratio = f" ({total / self.pairs:.3f} per allowed pair)" if self.pairs else ""
            lines.append(f"with multiplicity: {total:,} (each pair once per term that allows it){ratio}")
            if len(set(self.per_head_with_multiplicity)) > 1:
                lines.append("with multiplicity per head: "
                             + ", ".join(f"{p:,}" for p in self.per_head_with_multiplicity))
        lines.append(f"tiles ({self.tile}x{self.tile}): {self.tiles}")
        ratio = self.computed_flops / self.useful_flops if self.pairs else float("inf")
        lines.append(f"flops (head_dim={self.head_dim}): {self.useful_flops:,} useful, "
                     f"{self.computed_flops:,} computed by a tile kernel ({ratio:.2f}x)")
        return "\n".join(lines)


def tile_grid_states(pattern: n.Pattern, q_len: int, kv_len: int | None, heads: int | None,
                     tile: int, buffers: dict, where: str):
    """``(ctx, grid, mask_mod, states)`` for counting and drawing: exact tile states
    ``[B or 1, H or 1, nq, nk]`` of ``pattern`` on ``tile x tile`` tiles."""
    tile = check_int(where, "tile", tile, minimum=1)
    heads = head_group_count(pattern) if heads is None else heads
    ctx = Context.make(pattern, q_len, kv_len, heads, buffers=buffers, where=where)
    grid = TileGrid(ctx.q_len, ctx.kv_len, tile, tile)
    core = mask_part(pattern)
    mask_mod = lower_mask(core, ctx)
    return ctx, grid, mask_mod, tile_states(core, ctx, grid, mask_mod)


def count(pattern: n.Pattern, q_len: int, kv_len: int | None = None, *, heads: int | None = None,
          tile: int = 128, head_dim: int = 128, **buffers: torch.Tensor) -> Counts:
    """Exact counts of ``pattern`` on a ``q_len x kv_len`` matrix; see :class:`Counts`.

    ``heads`` defaults to the fewest the pattern runs with (its largest head-group count).
    Tensors the pattern names (``documents``, ``layout``) are passed by keyword.
    """
    if not isinstance(pattern, n.Pattern):
        raise PatternArgumentError(f"count(): argument 'pattern' must be a pattern, got {pattern!r}")
    head_dim = check_int("count()", "head_dim", head_dim, minimum=1)
    requested = check_int("count()", "tile", tile, minimum=1)
    longest = max(check_int("count()", "q_len", q_len, minimum=1),
                  q_len if kv_len is None else check_int("count()", "kv_len", kv_len, minimum=1))
    # A tile longer than both sequences is one tile cut short by their ends: counted on one
    # a position longer than them (the same single tile) with the work of their lengths.
    tile = min(requested, longest + 1)
    counts = dataclasses.replace(_count_set(pattern, q_len, kv_len, heads, tile, head_dim, buffers), tile=requested)
    if not is_multiset(pattern):
        return counts
    # A multiset: its terms' pairs add up to the pairs counted with multiplicity.
    per_head = [0] * counts.heads
    for term in multiset_terms(pattern):
        bound = {name: t for name, t in buffers.items() if name in term.buffer_names()}
        term_counts = _count_set(term, q_len, kv_len, counts.heads, tile, head_dim, bound)
        per_head = [a + b for a, b in zip(per_head, term_counts.per_head)]
    return dataclasses.replace(counts, per_head_with_multiplicity=tuple(per_head))


def _count_set(pattern: n.Pattern, q_len, kv_len, heads, tile, head_dim, buffers: dict) -> Counts:
    """:func:`count` of the pairs allowed (counted once each)."""
    fast = _count_by_head_pattern(pattern, q_len, kv_len, heads, tile, head_dim, buffers)
    if fast is not None:
        return fast
    ctx, grid, mask_mod, states = tile_grid_states(pattern, q_len, kv_len, heads, tile, buffers, "count()")
    batch, rows, cols = states.shape[0], states.shape[2], states.shape[3]
    # Tiles of each state per head, from each grid of states once (tiles neither full nor
    # partial are empty: no tile is left undecided).
    is_partial = states == PARTIAL
    partial_tiles = layer_counts(is_partial).expand(batch, ctx.heads).sum(0)
    full_tiles = layer_counts(states == FULL).expand(batch, ctx.heads).sum(0)
    num_partial = int(partial_tiles.sum())
    check_memory("count()", f"the list of {num_partial:,} partial tiles", num_partial * 4 * 8)
    partial = is_partial.expand(batch, ctx.heads, -1, -1).nonzero()
    partial_pairs = tile_pair_counts(mask_mod, grid, partial, square=uniform_square(mask_part(pattern)))
    per_head_partial = torch.zeros(ctx.heads, dtype=torch.int64, device=states.device)
    per_head_partial.index_add_(0, partial[:, 1], partial_pairs)
    per_head = full_tiles * grid.q_block * grid.kv_block + per_head_partial
    tiles = [
        TileCounts(full, part, batch * rows * cols - full - part)
        for full, part in zip(full_tiles.tolist(), partial_tiles.tolist())
    ]
    return Counts(ctx.q_len, ctx.kv_len, ctx.heads, tile, head_dim,
                  tuple(int(p) for p in per_head), tuple(tiles), batch)


def closed_form_pairs(pattern: n.Pattern, q_len: int, kv_len: int | None = None, *, heads: int | None = None,
                      tile: int = 128, **buffers: torch.Tensor) -> int | None:
    """``count(...).pairs`` when count's fast path applies (closed forms per distinct head
    pattern, no tile states), else None."""
    counts = _count_by_head_pattern(pattern, q_len, kv_len, heads, tile, 128, buffers)
    return None if counts is None else counts.pairs


def _count_by_head_pattern(pattern: n.Pattern, q_len, kv_len, heads, tile, head_dim,
                           buffers: dict) -> Counts | None:
    """The fast path (see the module docstring), or ``None`` when it does not apply."""
    core = mask_part(pattern)
    if core.buffer_names() or buffers:
        return None
    tile = check_int("count()", "tile", tile, minimum=1)
    heads = head_group_count(pattern) if heads is None else heads
    ctx = Context.make(pattern, q_len, kv_len, heads, buffers=buffers, where="count()")
    groups = distinct_head_patterns(core, ctx.heads)
    if not all(supported(p) for p, _ in groups):
        return None
    per_head: list[int] = [0] * ctx.heads
    tiles: list[TileCounts | None] = [None] * ctx.heads
    for resolved, members in groups:
        t = tally(resolved, ctx.q_len, ctx.kv_len, tile)
        for h in members:
            per_head[h] = t.pairs
            tiles[h] = TileCounts(t.full, t.partial, t.empty)
    return Counts(ctx.q_len, ctx.kv_len, ctx.heads, tile, head_dim, tuple(per_head), tuple(tiles), 1)
