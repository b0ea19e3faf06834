"""How heads are split into groups (``heads(...)`` and ``segments(...)``)."""

from __future__ import annotations

from .checks import PatternArgumentError


def head_groups(num_heads: int, num_groups: int) -> list[range]:
    """Split ``range(num_heads)`` into ``num_groups`` contiguous groups as evenly as possible;
    the first ``num_heads % num_groups`` groups get one extra head.

    >>> head_groups(5, 2)
    [range(0, 3), range(3, 5)]
    """
    if num_heads < num_groups:
        raise PatternArgumentError(
            f"heads: the pattern has {num_groups} head groups but attention has "
            f"num_heads={num_heads}; give at least one head per group"
        )
    base, extra = divmod(num_heads, num_groups)
    groups, start = [], 0
    for g in range(num_groups):
        size = base + (1 if g < extra else 0)
        groups.append(range(start, start + size))
        start += size
    return groups


def group_of_each_head(groups: list[range]) -> tuple[int, ...]:
    """The index of the group each head is in, for ``groups`` that cover the heads in order.

    >>> group_of_each_head([range(0, 3), range(3, 5)])
    (0, 0, 0, 1, 1)
    """
    return tuple(i for i, group in enumerate(groups) for _ in group)
