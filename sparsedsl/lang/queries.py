"""Questions the passes ask about a pattern's structure."""

from __future__ import annotations

import math

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


def restrict(pattern: n.Pattern, mask: n.Pattern) -> n.Pattern:
    """``pattern & mask``, with ``pattern``'s score modifications kept last."""
    mods = score_mods(pattern)
    core = mask_part(pattern) & mask
    return core.score(*mods) if mods else core


def head_group_count(pattern: n.Pattern) -> int:
    """The fewest heads the pattern can run with (the largest head-group count in it)."""
    counts = [len(node.parts) for node in walk(pattern) if isinstance(node, n.Heads)]
    counts += [len(node.lengths) for node in walk(pattern) if isinstance(node, n.Segments)]
    return max(counts, default=1)


def depends_on_heads(pattern: n.Pattern) -> bool:
    """Whether ``allowed`` can differ between heads without call-time tensors (head groups);
    a ``[H, nqb, nkb]`` layout tensor can make it so too, see the bound tensors."""
    return any(isinstance(node, (n.Heads, n.Segments)) for node in walk(mask_part(pattern)))


def diagonal_period(pattern: n.Pattern) -> int | None:
    """``T`` such that the pattern allows pairs only inside diagonal blocks of ``T``
    positions (``allowed(q, k)`` implies ``q // T == k // T``) and allows the same pairs in
    every block (``allowed(q + T, k + T) == allowed(q, k)``): ``dilated`` and ``chunks``
    (their segment), ``segments``, and head groups, unions and intersections of such parts
    (the least common multiple); None for every other pattern, and for any with score
    modifications (they may read absolute positions)."""
    if isinstance(pattern, n.Dilated):
        return pattern.segment
    if isinstance(pattern, n.Chunks):
        return pattern.size
    if isinstance(pattern, n.Segments):
        return math.lcm(*pattern.lengths)
    if isinstance(pattern, (n.Heads, n.Union, n.Intersection)):
        periods = [diagonal_period(part) for part in pattern.parts]
        return None if None in periods else math.lcm(*periods)
    return None


def block_band(pattern: n.Pattern) -> tuple[int, int, int] | None:
    """``(size, before, after)`` when the pattern allows exactly the pairs whose key block
    lies ``before`` blocks or fewer before the query block, or ``after`` or fewer after it
    (``qb - before <= kb <= qb + after``, blocks of ``size`` tokens): ``blocks(size)`` with
    only ``local`` rules (or ``dilated`` rules with rate 1 and a window), optionally
    ``.causal()`` (then ``after = 0``); None for every other pattern, and for any with
    score modifications."""
    if score_mods(pattern) or not isinstance(pattern, n.Blocks) or pattern.within_ is not None:
        return None
    windows = []
    for rule in pattern.rules:
        if isinstance(rule, n.BlockLocal):
            windows.append(rule.window)
        elif isinstance(rule, n.BlockDilated) and 1 in rule.rates and rule.window is not None:
            windows.append(rule.window)
        else:
            return None
    if not windows:
        return None
    window = max(windows)
    return pattern.size, window, 0 if pattern.causal_ else window


def is_diagonal_band(pattern: n.Pattern) -> bool:
    """Whether the pattern allows exactly a diagonal band of pairs, with no score
    modification: ``window(...)``, an intersection of windows with ``causal()`` (at least
    one window), or a window of whole blocks (:func:`block_band`)."""
    if score_mods(pattern):
        return False
    if isinstance(pattern, n.Window):
        return True
    if isinstance(pattern, n.Intersection):
        return all(isinstance(p, (n.Window, n.Causal)) for p in pattern.parts) and \
            any(isinstance(p, n.Window) for p in pattern.parts)
    return block_band(pattern) is not None
