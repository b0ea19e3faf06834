"""What the token-level view shades: the fraction of allowed pairs in each cell.

The drawn region of the ``Q x K`` matrix is cut into square cells of ``c x c`` tokens (``c``
the smallest size that keeps both sides within ``max_cells`` cells; ``c = 1`` draws every
pair). A cell's shade is ``allowed pairs in the cell / pairs in the cell``, so a rate-2
dilation stays visible as a half-tone at a million tokens, where a pixel covers millions
of pairs.

No ``Q x K`` matrix is built. Cells the structural tile classifier decides (full or empty)
cost nothing more. For a head-free pattern without tensors whose cells hold at most
``budget`` pairs, the others are counted exactly by tile signature (cells of equal
signature hold equal contents, so each distinct content is evaluated once; see
:mod:`sparsedsl.analysis.tilecount`). Otherwise (tensors: ``documents``, ``.layout``;
random blocks; larger cells), undecided cells are counted exactly while that evaluates at
most ``budget`` positions; beyond it, each undecided cell is estimated from ``SAMPLES``
positions drawn uniformly inside it (seeded), and the result says so.

A multiset pattern (``a + b``, ``longnet``) counts each pair with its multiplicity: a
cell's value is the sum of its terms' fractions (:func:`sparsedsl.lang.multiset.
multiset_terms`), which exceeds 1 where pairs count more than once; with ``c = 1`` it is
the multiplicity of the pair.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..analysis.headsplit import resolve_head
from ..analysis.tilecount import _Batch, _Counter, supported
from ..lang.multiset import multiset_terms
from ..lang.queries import mask_part
from ..passes.context import Context
from ..passes.maskmod import lower_mask
from ..passes.refine import tile_pair_counts
from ..passes.tiles import EMPTY, FULL, TileGrid, classify

#: Positions evaluated exactly at most, over all undecided cells of one panel.
BUDGET = 1 << 26
#: Positions drawn per undecided cell when the exact count would exceed the budget.
SAMPLES = 1024


@dataclass(frozen=True)
class Cells:
    """Fractions ``[rows, cols]`` (float64 in ``[0, 1]``; up to the largest multiplicity for a
    multiset pattern) of ``cell x cell``-token cells;
    row ``r`` holds query positions ``q_first + r * cell ...`` (the last row or column may
    be cut short by the sequence end), column ``c`` key positions ``k_first + c * cell ...``.
    ``estimated`` is true when some cell was sampled rather than counted."""

    fractions: torch.Tensor
    cell: int
    q_first: int
    k_first: int
    estimated: bool

    @property
    def extent(self) -> tuple[int, int, int, int]:
        """``(k_start, k_stop, q_stop, q_start)``: the matplotlib ``extent`` of the cells
        (cut cells drawn whole; the axes limits clip them)."""
        rows, cols = self.fractions.shape
        return (self.k_first, self.k_first + cols * self.cell,
                self.q_first + rows * self.cell, self.q_first)


def cell_size(window: tuple[int, int, int, int], max_cells: int) -> int:
    """The side of the square cells that keep both sides of ``window`` within ``max_cells``."""
    q0, q1, k0, k1 = window
    return max(1, -(-max(q1 - q0, k1 - k0) // max_cells))


def cell_fractions(pattern, ctx: Context, head: int, window: tuple[int, int, int, int],
                   max_cells: int, budget: int = BUDGET, seed: int = 0) -> Cells:
    """The fraction of allowed pairs per cell of head ``head`` (batch 0) over ``window`` =
    ``(q_start, q_stop, k_start, k_stop)``; see the module docstring."""
    cell = cell_size(window, max_cells)
    q0, q1, k0, k1 = window
    rows = range(q0 // cell, -(-q1 // cell))
    cols = range(k0 // cell, -(-k1 // cell))
    i = torch.arange(rows.start, rows.stop).repeat_interleave(len(cols))
    j = torch.arange(cols.start, cols.stop).repeat(len(rows))
    heights = (ctx.q_len - i * cell).clamp(max=cell)
    widths = (ctx.kv_len - j * cell).clamp(max=cell)
    area = (heights * widths).to(torch.float64)
    counts, estimated = torch.zeros_like(area), False
    for term in multiset_terms(mask_part(pattern)):  # a set pattern is its only term
        resolved = resolve_head(term, head, ctx.heads)
        if not ctx.buffers and supported(resolved) and cell * cell <= budget:
            counter = _Counter(resolved, ctx.q_len, ctx.kv_len, cell)
            _, term_counts = counter.evaluate(_Batch(i, j, torch.ones_like(i)))
            counts += term_counts.to(torch.float64)
        else:
            term_ctx = Context(ctx.q_len, ctx.kv_len, ctx.heads, ctx.device,
                               {name: t for name, t in ctx.buffers.items() if name in term.buffer_names()})
            term_counts, term_estimated = _counted_by_states(term, term_ctx, head, cell, rows, cols, i, j,
                                                             area, budget, seed)
            counts, estimated = counts + term_counts, estimated or term_estimated
    fractions = (counts / area).reshape(len(rows), len(cols))
    return Cells(fractions, cell, rows.start * cell, cols.start * cell, estimated)


def _counted_by_states(core, ctx: Context, head: int, cell: int, rows: range, cols: range,
                       i: torch.Tensor, j: torch.Tensor, area: torch.Tensor, budget: int,
                       seed: int) -> tuple[torch.Tensor, bool]:
    """Pairs per cell from the classifier's states, undecided cells counted (or sampled)."""
    grid = TileGrid(ctx.q_len, ctx.kv_len, cell, cell)
    states = classify(core, ctx, grid, rows)
    states = states[0, min(head, states.shape[1] - 1)][:, cols.start:cols.stop].reshape(-1)
    counts = torch.where(states == FULL, area, torch.zeros_like(area))
    undecided = ((states != FULL) & (states != EMPTY)).nonzero()[:, 0]
    if not undecided.numel():
        return counts, False
    mask_mod = lower_mask(core, ctx)
    if undecided.numel() * cell * cell <= budget:
        tiles = torch.stack([torch.zeros_like(undecided), torch.full_like(undecided, head),
                             i[undecided], j[undecided]], 1)
        counts[undecided] = tile_pair_counts(mask_mod, grid, tiles).to(torch.float64)
        return counts, False
    counts[undecided] = _sampled(mask_mod, head, cell, i[undecided], j[undecided], area[undecided],
                                 ctx, seed)
    return counts, True


def _sampled(mask_mod, head: int, cell: int, i: torch.Tensor, j: torch.Tensor,
             area: torch.Tensor, ctx: Context, seed: int) -> torch.Tensor:
    """Estimated pairs of each cell: its area times the allowed share of ``SAMPLES``
    uniform positions inside it."""
    gen = torch.Generator().manual_seed(seed)
    out = torch.empty(i.shape[0], dtype=torch.float64)
    step = max(1, (1 << 22) // SAMPLES)
    zero, h = torch.zeros((), dtype=torch.int64), torch.tensor(head)
    for start in range(0, i.shape[0], step):
        ii, jj = i[start:start + step, None], j[start:start + step, None]
        heights = (ctx.q_len - ii * cell).clamp(max=cell)
        widths = (ctx.kv_len - jj * cell).clamp(max=cell)
        u = torch.rand(ii.shape[0], SAMPLES, generator=gen, dtype=torch.float64)
        v = torch.rand(ii.shape[0], SAMPLES, generator=gen, dtype=torch.float64)
        q = ii * cell + (u * heights).long()
        k = jj * cell + (v * widths).long()
        share = mask_mod(zero, h, q, k).to(torch.float64).mean(1)
        out[start:start + step] = share * area[start:start + step]
    return out
