"""Which heads of a pattern relate which pairs: the pattern cut into head slices.

``head_slices(pattern, heads)`` writes the mask of ``pattern`` over ``heads`` heads as
contiguous head ranges, each with a pattern every head of the range shares:
``dilated_heads(w, r)`` is ``dilated(w, r, j)`` on the heads of its group ``j``,
``heads(...)`` and ``segments(...)`` give each part its heads, and ``+``, ``|``, ``&``,
``-``, ``~`` and ``longnet(...)`` combine their parts slice by slice (the ranges are the
common refinement of the parts' ranges). Other nodes give every head the same relation,
or keep their head structure inside (a block rule's ``.within(segments(...))``): one
slice of all heads. Score modifications are dropped: slices describe the mask.

Sequence-parallel attention reads them to give each key/value head the keys its own
query heads need (LongNet's branches need a different lattice of keys per head group),
and counts pairs and tiles slice by slice.
"""

from __future__ import annotations

from functools import singledispatch

from ..lang import nodes as n
from ..lang.groups import head_groups
from ..lang.queries import walk

Slices = list[tuple[range, n.Pattern]]


def head_slices(pattern: n.Pattern, heads: int) -> Slices:
    """``[(heads, part)]``: contiguous head ranges covering ``range(heads)`` in order, and
    the pattern (a mask, score modifications dropped) the heads of each range share."""
    return _slices(pattern, heads)


def splits_heads(pattern: n.Pattern) -> bool:
    """Whether ``pattern`` holds ``dilated_heads`` branches (``longnet(...)`` included),
    whose head groups need different keys of the same positions."""
    return any(isinstance(node, (n.DilatedHeads, n.LongNet)) for node in walk(pattern))


@singledispatch
def _slices(node: n.Pattern, heads: int) -> Slices:
    return [(range(heads), node)]


@_slices.register
def _(node: n.DilatedHeads, heads):
    return [(group, part) for group, part in node.groups(heads)]


@_slices.register
def _(node: n.LongNet, heads):
    return _slices(node.expand(), heads)


@_slices.register
def _(node: n.Segments, heads):
    return _slices(node.expand(), heads)


@_slices.register
def _(node: n.Scored, heads):
    return _slices(node.pattern, heads)


@_slices.register
def _(node: n.Heads, heads):
    # A part's own head structure sees absolute head indices (as the mask does): slice the
    # part over every head, then keep the slices inside the part's group.
    found = []
    for part, group in zip(node.parts, head_groups(heads, len(node.parts))):
        for rows, sub in _slices(part, heads):
            inside = range(max(rows.start, group.start), min(rows.stop, group.stop))
            if len(inside):
                found.append((inside, sub))
    return found


def _refined(parts: list[Slices], heads: int, rebuild) -> Slices:
    """The common refinement of the parts' slices; ``rebuild(patterns)`` makes the node
    of one range from the parts' patterns there."""
    cuts = sorted({0, heads} | {rows.start for slices in parts for rows, _ in slices})
    found = []
    for start, stop in zip(cuts[:-1], cuts[1:]):
        here = [next(p for rows, p in slices if rows.start <= start < rows.stop) for slices in parts]
        found.append((range(start, stop), rebuild(here)))
    return found


@_slices.register
def _(node: n.Sum, heads):
    return _refined([_slices(p, heads) for p in node.parts], heads, lambda ps: n.Sum(tuple(ps)))


@_slices.register
def _(node: n.Union, heads):
    return _refined([_slices(p, heads) for p in node.parts], heads, lambda ps: n.Union(tuple(ps)))


@_slices.register
def _(node: n.Intersection, heads):
    return _refined([_slices(p, heads) for p in node.parts], heads, lambda ps: n.Intersection(tuple(ps)))


@_slices.register
def _(node: n.Difference, heads):
    return _refined([_slices(node.left, heads), _slices(node.right, heads)], heads,
                    lambda ps: n.Difference(*ps))


@_slices.register
def _(node: n.Complement, heads):
    return [(rows, n.Complement(p)) for rows, p in _slices(node.inner, heads)]
