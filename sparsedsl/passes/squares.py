"""How coarse a pattern is: the side of the aligned squares it allows or denies whole.

``uniform_square(p)`` is a number ``s`` such that ``allowed(b, h, q, k)`` depends on
``q // s`` and ``k // s`` only (``0``: on neither, the relation is constant in ``q`` and
``k``). Block rules decide whole ``size x size`` blocks, ``chunks(size)`` and
``dilated(segment, 1)`` whole chunks, ``global_tokens(n)`` and ``prefix(n)`` whole ``n``-token
squares; token-level primitives give 1. A combination depends on the positions through each
part, so its square is the greatest common divisor of its parts' squares.

Counting the allowed pairs of a tile then needs one evaluation per square of the tile
(:func:`sparsedsl.passes.refine.tile_pair_counts`) instead of one per pair.
"""

from __future__ import annotations

import math
from functools import singledispatch

from ..lang import nodes as n

#: The square of a relation that is constant in positions (``gcd(0, s) == s``).
ANY = 0


@singledispatch
def uniform_square(node) -> int:
    """The side of the aligned squares on which ``node`` is constant (see the module)."""
    return 1  # token-level primitives, documents(...), anything not listed


uniform_square.register(n.Full, lambda node: ANY)
uniform_square.register(n.Chunks, lambda node: node.size)
uniform_square.register(n.Dilated, lambda node: node.segment if node.rate == 1 else 1)
uniform_square.register(n.GlobalTokens, lambda node: node.n)
uniform_square.register(n.Prefix, lambda node: node.n)
uniform_square.register(n.Segments, lambda node: uniform_square(node.expand()))
uniform_square.register(n.Scored, lambda node: uniform_square(node.pattern))
uniform_square.register(n.DilatedHeads, lambda node: node.segment if node.rate == 1 else 1)
uniform_square.register(n.LongNet, lambda node: uniform_square(node.expand()))


@uniform_square.register
def _(node: n.Blocks) -> int:
    # Rules and block causality read q // size and k // size; the within-rule reads
    # (q % size) // s and (k % size) // s for its square s, which q // gcd(size, s) fixes.
    return math.gcd(node.size, ANY if node.within_ is None else uniform_square(node.within_))


def _of_parts(node) -> int:
    return math.gcd(*(uniform_square(p) for p in node.children()))


for _combination in (n.Heads, n.Union, n.Intersection, n.Difference, n.Complement, n.Sum):
    uniform_square.register(_combination, _of_parts)
