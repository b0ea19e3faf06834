"""Splitting a pattern by head: the head-free pattern each head runs, and the distinct ones.

``heads(p0, p1, ...)`` and ``segments(...)`` give different heads different patterns
(docs/language.md). For one head ``h`` of ``H`` every head-group node can be replaced by the
part that ``h`` falls in, recursively (nested groups split the same ``H`` heads), which
leaves a pattern without head groups whose ``allowed(q, k)`` is what head ``h`` allows.
Heads whose resolved patterns are equal (``==``) allow the same pairs, so counting and
drawing work once per distinct resolved pattern.
"""

from __future__ import annotations

from ..lang import nodes as n
from ..lang.groups import head_groups


def resolve_head(pattern: n.Pattern, head: int, num_heads: int) -> n.Pattern:
    """The pattern head ``head`` (of ``num_heads``) runs, without ``heads``/``segments``/
    ``dilated_heads``/``longnet`` nodes and without score modifications (a ``longnet``
    becomes the sum of its branches' ``dilated`` parts for that head)."""
    if isinstance(pattern, n.Scored):
        return resolve_head(pattern.pattern, head, num_heads)
    if isinstance(pattern, n.Segments):
        return resolve_head(pattern.expand(), head, num_heads)
    if isinstance(pattern, n.Heads):
        groups = head_groups(num_heads, len(pattern.parts))
        for part, group in zip(pattern.parts, groups):
            if head in group:
                return resolve_head(part, head, num_heads)
        raise ValueError(f"head {head} is not one of {num_heads} heads")
    if isinstance(pattern, n.LongNet):
        return resolve_head(pattern.expand(), head, num_heads)
    if isinstance(pattern, n.DilatedHeads):
        return next(part for heads, part in pattern.groups(num_heads) if head in heads)
    if isinstance(pattern, n.Sum):
        return n.Sum(tuple(resolve_head(p, head, num_heads) for p in pattern.parts))
    if isinstance(pattern, n.Union):
        return n.Union(tuple(resolve_head(p, head, num_heads) for p in pattern.parts))
    if isinstance(pattern, n.Intersection):
        return n.Intersection(tuple(resolve_head(p, head, num_heads) for p in pattern.parts))
    if isinstance(pattern, n.Difference):
        return n.Difference(resolve_head(pattern.left, head, num_heads),
                            resolve_head(pattern.right, head, num_heads))
    if isinstance(pattern, n.Complement):
        return n.Complement(resolve_head(pattern.inner, head, num_heads))
    if isinstance(pattern, n.Blocks) and pattern.within_ is not None:
        return n.Blocks(pattern.size, pattern.rules, pattern.causal_,
                        resolve_head(pattern.within_, head, num_heads))
    if isinstance(pattern, n.CycleHeads):
        return resolve_head(pattern.parts[head % len(pattern.parts)], head, num_heads)
    if isinstance(pattern, n.Shifted):
        return n.Shifted(resolve_head(pattern.inner, head, num_heads), pattern.offset)
    if isinstance(pattern, n.DocumentWithin):
        return n.DocumentWithin(pattern.name, resolve_head(pattern.rule, head, num_heads))
    return pattern


def distinct_head_patterns(pattern: n.Pattern, num_heads: int) -> list[tuple[n.Pattern, list[int]]]:
    """``[(resolved pattern, heads running it), ...]`` in order of first head.

    Only valid for patterns whose tensors (if any) do not vary by head; a ``[H, nqb, nkb]``
    layout tensor makes heads differ without head-group nodes."""
    found: dict[n.Pattern, list[int]] = {}
    for h in range(num_heads):
        found.setdefault(resolve_head(pattern, h, num_heads), []).append(h)
    return list(found.items())
