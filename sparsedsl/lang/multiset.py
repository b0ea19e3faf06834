"""Multiset patterns: which patterns count a pair more than once, and as which sets.

A pattern's meaning is a multiplicity ``m(b, h, q, k) >= 0`` (see
:class:`~sparsedsl.lang.nodes.Sum`); set patterns have ``m`` in ``{0, 1}``.
:func:`is_multiset` tells, from the structure, whether a pattern may have ``m > 1``.
:func:`multiset_terms` writes a pattern as set patterns whose multiplicities add up to its
own: the parts of a sum, LongNet's branches, ``(a + b) & c`` as ``a & c`` and ``b & c``.
Counting a multiset's pairs with multiplicity, and its closed form, are then those of the
terms added up.
"""

from __future__ import annotations

import functools
import itertools
import operator
from functools import singledispatch

from . import nodes as n


@singledispatch
def is_multiset(node: n.Pattern) -> bool:
    """Whether ``node`` may count a pair more than once (from its structure): a sum,
    ``longnet``, and ``&``, ``|``, ``heads`` with a multiset part, ``a - b`` with ``a`` a
    multiset, a scored multiset. Every node class is registered; an unregistered one is
    refused (``TypeError`` naming its type)."""
    raise TypeError(f"multisets: no rule for node type {type(node).__name__}")


for _set_node in (n.Full, n.Causal, n.Window, n.DilatedWindow, n.Chunks, n.Strided, n.Dilated,
                  n.GlobalTokens, n.Prefix, n.Documents, n.Blocks, n.Segments, n.DilatedHeads,
                  n.Complement):
    is_multiset.register(_set_node, lambda node: False)
is_multiset.register(n.Sum, lambda node: True)
is_multiset.register(n.LongNet, lambda node: True)
is_multiset.register(n.Difference, lambda node: is_multiset(node.left))
is_multiset.register(n.Scored, lambda node: is_multiset(node.pattern))
for _combination in (n.Union, n.Intersection, n.Heads):
    is_multiset.register(_combination, lambda node: any(is_multiset(p) for p in node.parts))


#: The empty pattern, for head groups that a term leaves without pairs.
NOTHING = n.Complement(n.Full())


def multiset_terms(pattern: n.Pattern) -> tuple[n.Pattern, ...]:
    """Set patterns (score modifications dropped) whose multiplicities add up to that of
    ``pattern``'s mask: ``(pattern,)`` for a set pattern. See the module docstring."""
    if not is_multiset(pattern):
        return (pattern.pattern if isinstance(pattern, n.Scored) else pattern,)
    return _terms(pattern)


@singledispatch
def _terms(node: n.Pattern) -> tuple[n.Pattern, ...]:
    raise TypeError(f"multisets: no terms for node type {type(node).__name__}")


@_terms.register
def _(node: n.Sum):
    return tuple(t for part in node.parts for t in multiset_terms(part))


@_terms.register
def _(node: n.LongNet):
    return node.branches()


@_terms.register
def _(node: n.Scored):
    return multiset_terms(node.pattern)


@_terms.register
def _(node: n.Intersection):
    # Counts multiply, and multiplication distributes over the terms of each part.
    per_part = [multiset_terms(p) for p in node.parts]
    return tuple(functools.reduce(operator.and_, combo) for combo in itertools.product(*per_part))


@_terms.register
def _(node: n.Union):
    # One multiset part ``a`` and sets ``s``: max(m_a, 1[s]) = m_a + 1[s - a].
    multiset = next(p for p in node.parts if is_multiset(p))
    sets = [p for p in node.parts if p is not multiset]
    rest = functools.reduce(operator.or_, sets)
    return multiset_terms(multiset) + (rest - multiset,)


@_terms.register
def _(node: n.Difference):
    return tuple(t - node.right for t in multiset_terms(node.left))


@_terms.register
def _(node: n.Heads):
    per_part = [multiset_terms(p) for p in node.parts]
    width = max(len(terms) for terms in per_part)
    return tuple(n.Heads(tuple(terms[i] if i < len(terms) else NOTHING for terms in per_part))
                 for i in range(width))


# Ranges, offsets, positions inside documents and cyclic head groups count each pair once;
# a multiset inside one of them is refused.
def _set_of(node: n.Pattern) -> bool:
    from .checks import PatternArgumentError

    inner = [p for p in node.children() if is_multiset(p)]
    if inner:
        raise PatternArgumentError(
            f"{node}: {inner[0]} counts some pairs more than once, which "
            f"{type(node).__name__} does not take (apply it to each part, then add them with '+')")
    return False


for _set_node in (n.Queries, n.Keys, n.Shifted, n.DocumentWithin, n.CycleHeads):
    is_multiset.register(_set_node, _set_of)
