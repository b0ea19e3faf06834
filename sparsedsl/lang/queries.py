"""Questions the passes ask about a pattern's structure.

What a node answers is stated once per node class with :func:`functools.singledispatch`.
:func:`head_group_count` and :func:`depends_on_heads` read one table that every node class
is registered in; the shape recognisers (:func:`diagonal_period`, :func:`block_band`,
:func:`is_diagonal_band`) name the classes that can have their shape and answer "not this
shape" for every other one.
"""

from __future__ import annotations

import dataclasses
import math
from functools import singledispatch

from . import nodes as n
from .groups import group_of_each_head, head_groups
from .multiset import is_multiset


def walk(pattern: n.Pattern):
    """Every node of ``pattern``, parents before children."""
    yield pattern
    for child in pattern.children():
        yield from walk(child)


def mask_part(pattern: n.Pattern) -> n.Pattern:
    """``pattern`` without its score modifications (they do not change ``allowed``)."""
    return pattern.pattern if isinstance(pattern, n.Scored) else pattern


def score_mods(pattern: n.Pattern) -> tuple[n.ScoreMod, ...]:
    """The score modifications applied to ``pattern``, in order: those written with
    ``.score(...)``, then, for a multiset, :class:`~sparsedsl.lang.nodes.LogMultiplicity`
    (``log m`` added last). A kernel that takes only a mask computes a pattern exactly only
    where this is empty."""
    written = pattern.mods if isinstance(pattern, n.Scored) else ()
    return written + (n.LogMultiplicity(),) if is_multiset(pattern) else written


def restrict(pattern: n.Pattern, mask: n.Pattern) -> n.Pattern:
    """``pattern & mask``, with ``pattern``'s score modifications kept last."""
    mods = pattern.mods if isinstance(pattern, n.Scored) else ()
    core = mask_part(pattern) & mask
    return core.score(*mods) if mods else core


# ---------------------------------------------------------------------------------------
# Head groups
# ---------------------------------------------------------------------------------------


@singledispatch
def _own_head_groups(node: n.Pattern) -> int | None:
    """The number of head groups ``node`` itself splits the heads into (``heads``: its
    parts, ``segments``: its lengths), or ``None`` when the node gives every head the same
    relation apart from what its children do. Every node class is registered; an
    unregistered one is refused (``TypeError`` naming its type)."""
    raise TypeError(f"head groups: no rule for node type {type(node).__name__}")


@_own_head_groups.register
def _(node: n.Heads) -> int:
    return len(node.parts)


@_own_head_groups.register
def _(node: n.Segments) -> int:
    return len(node.lengths)


@_own_head_groups.register(n.DilatedHeads)
@_own_head_groups.register(n.LongNet)
def _(node: n.Pattern) -> int:
    return 1  # head groups of ceil(H / rate) heads: any number of heads runs it


@_own_head_groups.register(n.Sum)
@_own_head_groups.register(n.Full)
@_own_head_groups.register(n.Causal)
@_own_head_groups.register(n.Window)
@_own_head_groups.register(n.DilatedWindow)
@_own_head_groups.register(n.Chunks)
@_own_head_groups.register(n.Strided)
@_own_head_groups.register(n.Dilated)
@_own_head_groups.register(n.GlobalTokens)
@_own_head_groups.register(n.Prefix)
@_own_head_groups.register(n.Documents)
@_own_head_groups.register(n.Blocks)
@_own_head_groups.register(n.Union)
@_own_head_groups.register(n.Intersection)
@_own_head_groups.register(n.Difference)
@_own_head_groups.register(n.Complement)
@_own_head_groups.register(n.Scored)
def _(node: n.Pattern) -> None:
    return None


@_own_head_groups.register(n.Queries)
@_own_head_groups.register(n.Keys)
@_own_head_groups.register(n.Shifted)
@_own_head_groups.register(n.DocumentWithin)
def _(node: n.Pattern) -> None:
    return None


@_own_head_groups.register
def _(node: n.CycleHeads) -> int:
    return len(node.parts)  # head h runs parts[h % n]: n heads show every part


def counts_from_the_end(pattern: n.Pattern) -> bool:
    """Whether ``allowed(q, k)`` of ``pattern`` depends on the sequence lengths through a
    range counted from the end (``queries(-4)``, ``keys(0, -1)``), outside any
    ``blocks(...).within`` rule (whose ranges count from the end of a block). Such a
    pattern's tile states computed over longer sequences do not hold for shorter ones."""
    if isinstance(pattern, (n.Queries, n.Keys)):
        return pattern.from_end()
    children = () if isinstance(pattern, n.Blocks) else pattern.children()
    return any(counts_from_the_end(child) for child in children)


def anchored_rows(pattern: n.Pattern, q_total: int) -> n.Pattern:
    """``pattern`` with every range of query rows counted from the end (``queries(-4)``,
    outside ``blocks(...).within`` rules) made absolute for a matrix of ``q_total`` rows:
    what it allows on rows of the ``q_total x K`` matrix, whatever query count a call of
    some of those rows (a piece of a sharded sequence) names."""
    if isinstance(pattern, n.Queries):
        if not pattern.from_end():
            return pattern
        lo, hi = n.range_bounds(pattern.start, pattern.stop, q_total)
        return n.Queries(lo, None if hi == q_total else hi) if lo < hi else n.Queries(q_total)
    if isinstance(pattern, n.Blocks) or not counts_from_the_end(pattern):
        return pattern
    changed = {}
    for field in dataclasses.fields(pattern):
        value = getattr(pattern, field.name)
        if isinstance(value, n.Pattern):
            anchored = anchored_rows(value, q_total)
        elif isinstance(value, tuple) and value and all(isinstance(v, n.Pattern) for v in value):
            anchored = tuple(anchored_rows(v, q_total) for v in value)
        else:
            continue
        if anchored != value:
            changed[field.name] = anchored
    return dataclasses.replace(pattern, **changed) if changed else pattern


def head_group_count(pattern: n.Pattern) -> int:
    """The fewest heads the pattern can run with (the largest head-group count in it)."""
    counts = (_own_head_groups(node) for node in walk(pattern))
    return max((count for count in counts if count is not None), default=1)


def depends_on_heads(pattern: n.Pattern) -> bool:
    """Whether ``allowed`` can differ between heads without call-time tensors (head groups);
    a ``[H, nqb, nkb]`` layout tensor can make it so too, see the bound tensors."""
    return any(_own_head_groups(node) is not None for node in walk(mask_part(pattern)))


@singledispatch
def _head_split(node: n.Pattern, num_heads: int) -> tuple:
    """The part of ``node``'s own head groups that each of ``num_heads`` heads falls in
    (any hashable labels, equal for heads in the same part), for a node whose
    :func:`_own_head_groups` is not ``None``. A class that splits the heads and is not
    registered here is refused (``TypeError`` naming its type)."""
    raise TypeError(f"head layers: no rule for node type {type(node).__name__}")


@_head_split.register(n.Heads)
@_head_split.register(n.Segments)
def _(node: n.Pattern, num_heads: int) -> tuple:
    return group_of_each_head(head_groups(num_heads, _own_head_groups(node)))


@_head_split.register
def _(node: n.DilatedHeads, num_heads: int) -> tuple:
    return group_of_each_head([heads for heads, _ in node.groups(num_heads)])


@_head_split.register
def _(node: n.LongNet, num_heads: int) -> tuple:
    return tuple(zip(*(_head_split(branch, num_heads) for branch in node.branches())))


@_head_split.register
def _(node: n.CycleHeads, num_heads: int) -> tuple:
    return tuple(h % len(node.parts) for h in range(num_heads))


def head_layers(pattern: n.Pattern, num_heads: int) -> tuple[int, ...]:
    """The layer of each of ``num_heads`` heads: heads of one layer fall in the same part of
    every head split of the pattern (``heads(...)`` and ``segments(...)`` groups, each
    branch's ``dilated_heads`` groups, ``h % n`` of ``cycle_heads``), so ``allowed`` is the
    same for them. Layers are numbered from 0 in order of their first head. Structural:
    parts are not compared (two groups of equal parts are two layers), and bound tensors
    are not seen (a ``[H, nqb, nkb]`` layout tensor can make heads of one layer differ)."""
    splits = [_head_split(node, num_heads) for node in walk(mask_part(pattern))
              if _own_head_groups(node) is not None]
    keys = zip(*splits) if splits else [()] * num_heads
    layers: dict[tuple, int] = {}
    return tuple(layers.setdefault(key, len(layers)) for key in keys)


# ---------------------------------------------------------------------------------------
# Shape recognisers
# ---------------------------------------------------------------------------------------


@singledispatch
def diagonal_period(pattern: n.Pattern) -> int | None:
    """``T`` such that the pattern allows pairs only inside diagonal blocks of ``T``
    positions (``allowed(q, k)`` implies ``q // T == k // T``) and allows the same pairs in
    every block (``allowed(q + T, k + T) == allowed(q, k)``): ``dilated`` and ``chunks``
    (their segment), ``segments``, and head groups, unions and intersections of such parts
    (the least common multiple); None for every other pattern, and for any with score
    modifications (they may read absolute positions)."""
    return None


@diagonal_period.register
def _(pattern: n.Dilated) -> int:
    return pattern.segment


@diagonal_period.register
def _(pattern: n.Chunks) -> int:
    return pattern.size


@diagonal_period.register
def _(pattern: n.Segments) -> int:
    return math.lcm(*pattern.lengths)


@diagonal_period.register
def _(pattern: n.DilatedHeads) -> int:
    return pattern.segment


@diagonal_period.register
def _(pattern: n.LongNet) -> int:
    return math.lcm(*pattern.segment_lengths)


@diagonal_period.register(n.Sum)
@diagonal_period.register(n.Heads)
@diagonal_period.register(n.Union)
@diagonal_period.register(n.Intersection)
def _(pattern: n.Pattern) -> int | None:
    periods = [diagonal_period(part) for part in pattern.parts]
    return None if None in periods else math.lcm(*periods)


def block_band(pattern: n.Pattern) -> tuple[int, int, int] | None:
    """``(size, before, after)`` when the pattern allows exactly the pairs whose key block
    lies ``before`` blocks or fewer before the query block, or ``after`` or fewer after it
    (``qb - before <= kb <= qb + after``, blocks of ``size`` tokens): ``blocks(size)`` with
    only ``local`` rules (or ``dilated`` rules with rate 1 and a window), optionally
    ``.causal()`` (then ``after = 0``); None for every other pattern, and for any with
    score modifications."""
    if score_mods(pattern) or not isinstance(pattern, n.Blocks) or pattern.within_ is not None:
        return None
    windows = [_band_window(rule) for rule in pattern.rules]
    if not windows or None in windows:
        return None
    window = max(windows)
    return pattern.size, window, 0 if pattern.causal_ else window


@singledispatch
def _band_window(rule: n.BlockRule) -> int | None:
    """``w`` when ``rule`` allows exactly the block pairs with ``|qb - kb| <= w``; None for
    every other rule."""
    return None


@_band_window.register
def _(rule: n.BlockLocal) -> int:
    return rule.window


@_band_window.register
def _(rule: n.BlockDilated) -> int | None:
    return rule.window if 1 in rule.rates else None


def is_diagonal_band(pattern: n.Pattern) -> bool:
    """Whether the pattern allows exactly a diagonal band of pairs, with no score
    modification: ``window(...)``, an intersection of windows with ``causal()`` (at least
    one window), or a window of whole blocks (:func:`block_band`)."""
    return not score_mods(pattern) and _is_band(pattern)


@singledispatch
def _is_band(pattern: n.Pattern) -> bool:
    return False


@_is_band.register
def _(pattern: n.Window) -> bool:
    return True


@_is_band.register
def _(pattern: n.Intersection) -> bool:
    return all(isinstance(p, (n.Window, n.Causal)) for p in pattern.parts) and \
        any(isinstance(p, n.Window) for p in pattern.parts)


@_is_band.register
def _(pattern: n.Blocks) -> bool:
    return block_band(pattern) is not None


@singledispatch
def translation_period(node) -> int | None:
    """``T`` such that ``allowed(q + m T, k + m T) == allowed(q, k)`` for every ``m`` and
    every pair of positions (the same for score modifications), or None when no such
    period is known (absolute positions matter: global tokens, prefixes, random or bound
    layouts, bound tensors, ranges). A period of 1: the pattern depends on ``q - k`` only."""
    return None


for _node in (n.Full, n.Causal, n.Window, n.DilatedWindow, n.Strided):
    translation_period.register(_node, lambda node: 1)
translation_period.register(n.Chunks, lambda node: node.size)
translation_period.register(n.Dilated, lambda node: node.segment)
translation_period.register(n.Segments, lambda node: _lcm(node.lengths))
translation_period.register(n.DilatedHeads, lambda node: node.segment)
translation_period.register(n.LongNet, lambda node: _lcm(node.segment_lengths))
translation_period.register(n.Complement, lambda node: translation_period(node.inner))
translation_period.register(n.Difference, lambda node: _lcm([translation_period(node.left),
                                                             translation_period(node.right)]))
for _node in (n.Heads, n.Union, n.Intersection, n.Sum):
    translation_period.register(_node, lambda node: _lcm([translation_period(p) for p in node.parts]))


@translation_period.register
def _(node: n.Blocks):
    if not all(isinstance(rule, (n.BlockLocal, n.BlockDilated)) for rule in node.rules):
        return None  # global, random and bound layouts name absolute blocks
    return node.size  # .within() reads positions relative to blocks of this size


@translation_period.register
def _(node: n.Scored):
    if not all(isinstance(mod, (n.Alibi, n.Softcap)) for mod in node.mods):
        return None  # a bound bias or a function may read absolute positions
    return translation_period(node.pattern)


def _lcm(periods) -> int | None:
    periods = list(periods)
    return None if None in periods else math.lcm(*periods)
