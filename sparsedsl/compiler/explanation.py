"""``CompiledPattern.explain``: the plan a call runs, every candidate's cost or reasons, and
what the call computes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from ..analysis.count import closed_form_pairs
from ..lang import nodes as n
from ..plans.base import Call, Candidate
from ..plans.tiled import call_lowering
from .planner import Planner


@dataclass(frozen=True)
class Explanation:
    """What runs for one call shape, and what it costs.

    ``kind`` names the plan ``forward`` runs and ``reason`` says why it fits;
    ``candidates`` maps every plan name to its :class:`~sparsedsl.plans.base.Candidate`
    (``.cost``, or None with ``.reasons``). ``pairs`` counts allowed ``(q, k)`` pairs over
    all heads (and over the batch entries of bound tensors such as document ids);
    ``useful_flops = 4 * head_dim * pairs`` is the forward work of those pairs (``QK^T``
    and ``PV``); ``computed_flops`` is what the plan's kernels actually multiply (whole
    tiles for tile kernels). Tile counts are on the tiles of the chosen plan.
    """

    kind: str
    reason: str
    q_len: int
    kv_len: int
    heads: int
    head_dim: int
    q_block: int
    kv_block: int
    tiles_full: int
    tiles_partial: int
    tiles_empty: int
    pairs: int
    computed_pairs: int
    q_offset: int = 0
    candidates: Mapping[str, Candidate] = field(default_factory=dict)

    @property
    def useful_flops(self) -> int:
        return 4 * self.head_dim * self.pairs

    @property
    def computed_flops(self) -> int:
        return 4 * self.head_dim * self.computed_pairs

    @property
    def density(self) -> float:
        """Allowed pairs over all ``heads * q_len * kv_len`` pairs."""
        return self.pairs / (self.heads * self.q_len * self.kv_len)

    def __str__(self) -> str:
        tiles = self.tiles_full + self.tiles_partial + self.tiles_empty
        waste = self.computed_flops / self.useful_flops if self.pairs else float("inf")
        lines = [
            f"plan: {self.kind} — {self.reason}",
            f"shape: q_len={self.q_len} kv_len={self.kv_len} heads={self.heads} "
            + (f"q_offset={self.q_offset} " if self.q_offset else "") +
            f"head_dim={self.head_dim}, tiles {self.q_block}x{self.kv_block}",
            f"tiles: {self.tiles_full} full, {self.tiles_partial} partial, {self.tiles_empty} empty of {tiles}",
            f"pairs: {self.pairs:,} allowed (density {self.density:.4f})",
            f"flops: {self.useful_flops:,} useful, {self.computed_flops:,} computed ({waste:.2f}x useful)",
        ]
        if self.candidates:
            lines.append("candidates (cost: computed pairs / the plan's efficiency):")
            width = max(map(len, self.candidates))
            for name, candidate in self.candidates.items():
                mark = "*" if name == self.kind else " "
                lines.append(f" {mark} {name:<{width}}  {candidate}")
        return "\n".join(lines)


def explain_call(planner: Planner, pattern: n.Pattern, call: Call) -> Explanation:
    """The :class:`Explanation` of ``call``: the plan ``forward`` runs for it."""
    candidates = planner.candidates(pattern, call)
    plan = planner.choose(pattern, call, candidates)
    prepared = planner.prepared(plan, pattern, call)
    lowered = call_lowering(pattern, call, plan.tiles(pattern, call), where="explain()")
    states, grid = lowered.states, lowered.grid
    per_grid = call.heads // states.shape[1]
    full, partial = (tiles * per_grid for tiles in lowered.tile_counts)
    empty = states.numel() * per_grid - full - partial  # no tile is left undecided
    # count()'s closed form where it has one; else the lowering's states, already built
    pairs = None
    if call.q_offset == 0:
        pairs = closed_form_pairs(pattern, call.q_len, call.kv_len, heads=call.heads, tile=grid.q_block,
                                  **dict(call.buffers))
    if pairs is None:
        pairs = lowered.pairs(call.heads)
    return Explanation(plan.name, plan.describe(prepared, call), call.q_len, call.kv_len, call.heads,
                       call.head_dim, grid.q_block, grid.kv_block, full, partial, empty, pairs,
                       plan.computed_pairs(prepared, call, planner), call.q_offset, candidates)
