"""BigBird: block-sparse attention with sliding, global and random blocks.

Source: Zaheer et al. 2020, "Big Bird: Transformers for Longer Sequences",
arXiv:2007.14062, §2 and Appendix D (BigBird-ITC: block size 64, 3 sliding blocks,
2 global blocks, 3 random blocks per query block).
"""

from __future__ import annotations

from sparsedsl.lang import nodes as n
from sparsedsl.lang.checks import check_int


def bigbird(block_size: int = 64, window: int = 1, global_blocks: int = 2,
            random_blocks: int = 3, seed: int = 0) -> n.Pattern:
    """``blocks(block_size).local(window).global_(global_blocks).random(random_blocks, seed)``.

    Defaults are BigBird-ITC's: 64-token blocks, a sliding band of 3 blocks (``window=1``
    block on each side), the first 2 blocks global (128 tokens, seen by and seeing every
    position), and 3 random key blocks per query-block row. The random blocks are chosen
    by a seeded hash, the same on every device (``blocks().random``); ``random_blocks=0``
    or ``global_blocks=0`` leaves that part out.

    Source: Zaheer et al. 2020, "Big Bird", arXiv:2007.14062.
    """
    where = "bigbird()"
    pattern = n.blocks(check_int(where, "block_size", block_size, minimum=1))
    pattern = pattern.local(check_int(where, "window", window))
    if check_int(where, "global_blocks", global_blocks):
        pattern = pattern.global_(global_blocks)
    if check_int(where, "random_blocks", random_blocks):
        pattern = pattern.random(random_blocks, seed)
    return pattern
