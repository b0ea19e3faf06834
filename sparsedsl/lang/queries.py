"""Questions the passes ask about a pattern's structure."""

from __future__ import annotations

from . import nodes as n


def walk(pattern: n.Pattern):
    """Every node of ``pattern``, parents before children."""
    yield pattern
    for child in pattern.children():
        yield from walk(child)


def mask_part(pattern: n.Pattern) -> n.Pattern:
    """``pattern`` without its score modifications (they do not change ``allowed``)."""
    return pattern.pattern if isinstance(pattern, n.Scored) else pattern


def score_mods(pattern: n.Pattern) -> tuple[n.ScoreMod, ...]:
    """The score modifications applied to ``pattern``, in order."""
    return pattern.mods if isinstance(pattern, n.Scored) else ()


def head_group_count(pattern: n.Pattern) -> int:
    """The fewest heads the pattern can run with (the largest head-group count in it)."""
    counts = [len(node.parts) for node in walk(pattern) if isinstance(node, n.Heads)]
    counts += [len(node.lengths) for node in walk(pattern) if isinstance(node, n.Segments)]
    return max(counts, default=1)


def depends_on_heads(pattern: n.Pattern) -> bool:
    """Whether ``allowed`` can differ between heads without call-time tensors (head groups);
    a ``[H, nqb, nkb]`` layout tensor can make it so too, see the bound tensors."""
    return any(isinstance(node, (n.Heads, n.Segments)) for node in walk(mask_part(pattern)))
