"""Lattice decomposition: token-level dilation as dense problems on strided sub-sequences.

A mask cannot make token dilation cheap: a tile with half its pairs masked costs a tile
kernel as much as a full one. But a dilated pattern allows pairs only inside *lattices* of
positions, and on a lattice it is dense or block-structured:

* ``dilated(segment, rate, offset)`` keeps positions ``p`` with ``(p % segment) % rate ==
  offset``. Listed in order, the kept positions of one segment are ``m = ceil((segment -
  offset) / rate)`` consecutive entries, so on that compressed sequence the pattern is
  ``chunks(m)``: dense attention with the segments folded into the batch. The kept
  positions are ``offset + s * segment + i * rate`` (``i < m``): strided views, even when
  ``rate`` does not divide ``segment``, as long as every segment keeps ``m`` of them.
* ``blocks(S).<rules>.within(dilated(segment, rate, offset))`` with ``segment`` dividing
  ``S``: for each segment index ``j`` inside a block, the kept positions of segment ``j``
  of every block form one lattice, ``m`` positions per block; on it the pattern is
  ``blocks(m).<rules>`` (the block rules see the same block coordinates), a block pattern
  with no token masking.
* ``segments(...)``, ``heads(...)`` and ``dilated_heads(segment, rate)`` (one LongNet
  branch: head group ``j`` runs ``dilated(segment, rate, j)``) split the heads; each group
  is decomposed alone (a part that is not a lattice runs as it is, on all positions,
  through its own plan).

Lattices of one head group are disjoint, and pairs are allowed only inside a lattice, so
each query row belongs to at most one sub-problem and the outputs are scattered back
exactly; rows in no lattice see no key and output 0 (log-sum-exp ``-inf``). Query and key
sequences must have the same length (self-attention), and the pattern no score
modification (ALiBi and biases see absolute positions). The plan that runs the
decomposition is :mod:`sparsedsl.plans.lattice`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, singledispatch

import torch

from ..lang import nodes as n
from ..lang.groups import head_groups
from ..lang.multiset import NOTHING
from ..lang.queries import depends_on_heads, mask_part, score_mods

@dataclass(frozen=True)
class LatticePart:
    """One sub-problem: the query/key ``positions`` of a lattice (ascending; None for all
    positions) and the ``pattern`` that holds on the compressed sequence. ``runs`` is
    ``(start, step, per_period, period)`` when the positions are ``start + s * period + i *
    step`` for ``i < per_period`` and ``s < length / per_period`` (a dilated segment of every
    period; one period, or periods that continue one arithmetic run, to any length): then
    kernels take them as strided views instead of gathers
    (:mod:`sparsedsl.plans.lattice_views`)."""

    positions: torch.Tensor | None
    pattern: n.Pattern
    runs: tuple[int, int, int, int] | None = None

    @cached_property
    def length(self) -> int | None:
        return None if self.positions is None else self.positions.numel()

    @property
    def one_run(self) -> bool:
        """Whether the positions are one arithmetic run (one period, or periods that
        continue the run)."""
        if self.runs is None:
            return False
        _, step, per_period, period = self.runs
        return per_period == self.length or period == per_period * step


def _lattice_part(positions: torch.Tensor, pattern: n.Pattern, length: int, start: int, step: int,
                  per_period: int, period: int) -> LatticePart:
    """A part whose ``positions`` are, in each period of ``period`` positions up to
    ``length``, the first ``per_period`` of ``start, start + step, ...`` (fewer in a last,
    shorter period), with ``runs`` set (see :class:`LatticePart`) when they are one
    arithmetic run (one period, or periods that continue the run: ``period == per_period *
    step``) or when every period holds ``per_period`` of them."""
    count, periods = positions.numel(), -(-length // period)
    if periods == 1:
        per_period = count
    one_run = periods == 1 or period == per_period * step  # to any length
    runs = (start, step, per_period, period) if count and (one_run or count == periods * per_period) else None
    return LatticePart(positions, pattern, runs)


@dataclass(frozen=True)
class HeadGroupLattice:
    """The sub-problems of heads ``heads``."""

    heads: range
    parts: tuple[LatticePart, ...]


def _kept_positions(length: int, block: int, segment: int, index: int, rate: int, offset: int,
                    device) -> torch.Tensor:
    """Positions ``p < length`` with ``(p % block) // segment == index`` and
    ``((p % block) % segment) % rate == offset``, ascending."""
    p = torch.arange(length, device=device)
    rel = p % block
    keep = (rel // segment == index) & ((rel % segment) % rate == offset)
    return keep.nonzero().flatten()


def _per_segment(segment: int, rate: int, offset: int) -> int:
    return -(-(segment - offset) // rate)


@singledispatch
def _decompose_part(part: n.Pattern, length: int, device) -> tuple[LatticePart, ...] | None:
    """Lattice parts of a head-independent ``part``, or None when it is not a lattice
    pattern (then it runs whole)."""
    return None


@_decompose_part.register
def _(part: n.Dilated, length: int, device):
    positions = _kept_positions(length, part.segment, part.segment, 0, part.rate, part.offset, device)
    per_segment = _per_segment(part.segment, part.rate, part.offset)
    return (_lattice_part(positions, n.Chunks(per_segment), length, part.offset, part.rate, per_segment,
                          part.segment),)


@_decompose_part.register
def _(part: n.Chunks, length: int, device):
    return (LatticePart(None, part),)


@_decompose_part.register
def _(part: n.Blocks, length: int, device):
    rule, size = part.within_, part.size
    if not _blocks_lattice(part, length):
        return None
    per_block = _per_segment(rule.segment, rule.rate, rule.offset)
    coarse = n.Blocks(per_block, part.rules, part.causal_, None)
    return tuple(
        _lattice_part(_kept_positions(length, size, rule.segment, j, rule.rate, rule.offset, device), coarse,
                      length, j * rule.segment + rule.offset, rule.rate, per_block, size)
        for j in range(size // rule.segment)
    )


def _blocks_lattice(part: n.Blocks, length: int) -> bool:
    """Whether ``blocks(S).<rules>.within(dilated(...))`` decomposes at ``length``: the
    segment divides the block size, and the length is whole blocks."""
    rule = part.within_
    return isinstance(rule, n.Dilated) and part.size % rule.segment == 0 and length % part.size == 0


def _is_lattice(part: n.Pattern, length: int) -> bool:
    """Whether :func:`_decompose_part` decomposes ``part`` (decided from structure alone)."""
    if isinstance(part, n.Blocks):
        return _blocks_lattice(part, length)
    return _decompose_part.dispatch(type(part)) is not _decompose_part.dispatch(object)


@singledispatch
def _split_heads(pattern: n.Pattern, heads: int) -> list[tuple[range, n.Pattern]] | None:
    """``pattern`` as head groups of head-independent patterns, or None."""
    if depends_on_heads(pattern):
        return None
    return [(range(heads), pattern)]


@_split_heads.register
def _(pattern: n.Segments, heads: int):
    return _split_heads(pattern.expand(), heads)


@_split_heads.register
def _(pattern: n.Heads, heads: int):
    groups = []
    for rng, part in zip(head_groups(heads, len(pattern.parts)), pattern.parts):
        inner = _split_heads(part, heads)
        if inner is None:
            return None
        for sub_range, sub_part in inner:  # nested groups see absolute head indices
            overlap = range(max(rng.start, sub_range.start), min(rng.stop, sub_range.stop))
            if len(overlap):
                groups.append((overlap, sub_part))
    return groups


@_split_heads.register
def _(pattern: n.DilatedHeads, heads: int):
    return pattern.groups(heads)


@_split_heads.register
def _(pattern: n.Blocks, heads: int):
    if not isinstance(pattern.within_, (n.Segments, n.Heads)):
        return _split_heads.dispatch(object)(pattern, heads)
    inner = _split_heads(pattern.within_, heads)
    if inner is None:
        return None
    return [(rng, n.Blocks(pattern.size, pattern.rules, pattern.causal_, part)) for rng, part in inner]


def lattice_reasons(pattern: n.Pattern, length: int, heads: int) -> list[str]:
    """Why ``pattern`` (its mask) has no lattice decomposition for self-attention of
    ``length`` over ``heads`` heads (empty when it has one), from structure alone."""
    groups = _split_heads(mask_part(pattern), heads)
    if groups is None:
        return ["its head groups are not each head-independent"]
    if not any(_is_lattice(part, length) for _, part in groups):
        return ["no token dilation or chunks to fold (a block rule's dilated segment must divide "
                "the block, and the length be whole blocks)"]
    return []


def chunks_reasons(pattern: n.Pattern, heads: int) -> list[str]:
    """Why the lattice decomposition of ``pattern`` (its mask) over ``heads`` heads is not
    dense attention on folded chunks in every head group (empty when it is): each group's
    part must be ``dilated(...)`` or ``chunks(...)``, or allow nothing; from structure alone."""
    groups = _split_heads(mask_part(pattern), heads)
    if groups is None:
        return ["its head groups are not each head-independent"]
    others = [part for _, part in groups if part != NOTHING and not isinstance(part, (n.Dilated, n.Chunks))]
    if others:
        return [f"{others[0]} is not dilated(...) or chunks(...) (dense attention on folded chunks)"]
    return []


def lattice_decomposition(pattern: n.Pattern, q_len: int, kv_len: int, heads: int,
                          device) -> tuple[HeadGroupLattice, ...] | None:
    """The lattice plan of ``pattern`` for self-attention of length ``q_len`` over
    ``heads`` heads, or None when the plan does not apply (see the module docstring). It
    applies only when at least one head group has a genuine lattice (a strict subset of
    positions or folded chunks)."""
    if q_len != kv_len or score_mods(pattern) or pattern.buffer_names():
        return None
    groups = _split_heads(mask_part(pattern), heads)
    if groups is None:
        return None
    plans, useful = [], False
    for rng, part in groups:
        parts = _decompose_part(part, q_len, device)
        if parts is None:
            parts = (LatticePart(None, part),)
        else:
            useful = True
        plans.append(HeadGroupLattice(rng, parts))
    return tuple(plans) if useful else None


def writes_every_row(parts: tuple[LatticePart, ...], length: int) -> bool:
    """Whether the parts of one head group together hold all ``length`` positions (they
    are disjoint, so their sizes add up to ``length`` exactly then)."""
    return sum(length if part.length is None else part.length for part in parts) == length


def zeroed_heads(plan: tuple[HeadGroupLattice, ...], length: int) -> list[range]:
    """The query heads of the groups whose lattices leave some row unwritten (rows with no
    allowed key output 0; their gradients are 0), merged into runs of consecutive heads.

    Such heads are zeroed whole, then their lattice rows are overwritten: a fill of whole
    heads is one contiguous region per run, which an H100 fills at memory bandwidth; a
    fill of the off-lattice rows alone is strided (rows of ``D`` elements) and ran at about
    a third of that, besides costing a kernel and several views per region."""
    return merged(head_plan.heads for head_plan in plan if not writes_every_row(head_plan.parts, length))


def merged(ranges) -> list[range]:
    """Disjoint ``ranges`` sorted, with adjacent ones joined."""
    merged: list[range] = []
    for rng in sorted(ranges, key=lambda r: r.start):
        if merged and merged[-1].stop == rng.start:
            merged[-1] = range(merged[-1].start, rng.stop)
        else:
            merged.append(rng)
    return merged
