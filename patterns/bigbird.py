"""BigBird: block-sparse attention with sliding, global and random blocks.

Source: Zaheer et al. 2020, "Big Bird: Transformers for Longer Sequences",
arXiv:2007.14062, §2 and Appendix D (BigBird-ITC: block size 64, 3 sliding blocks,
2 global blocks, 3 random blocks per query block); the global blocks are the first and
the last, as in the authors' block-sparse implementation.
"""

from __future__ import annotations

from sparsedsl.lang import nodes as n
from sparsedsl.lang.checks import check_int


def bigbird(block_size: int = 64, window: int = 1, global_blocks: int = 2,
            random_blocks: int = 3, seed: int = 0) -> n.Pattern:
    """``blocks(block_size).local(window).global_(first).random(random_blocks, seed) |
    queries(-last * block_size) | keys(-last * block_size)``, with ``first =
    ceil(global_blocks / 2)`` and ``last = floor(global_blocks / 2)``.

    Defaults are BigBird-ITC's: 64-token blocks, a sliding band of 3 blocks (``window=1``
    block on each side), 2 global blocks, the first and the last (seen by and seeing
    every position; the last ``block_size`` tokens, which are the last block when the
    length is a multiple of the block size, as BigBird requires), and 3 random key blocks
    per query-block row. The random blocks are chosen by a seeded hash, the same on every
    device (``blocks().random``), among all key blocks: one that falls on a sliding or
    global block adds nothing, so a row holds 5 to 8 blocks where the authors' code,
    drawing outside those blocks with NumPy's generator, gives every middle row 8.
    ``random_blocks=0`` or ``global_blocks=0`` leaves that part out.

    Source: Zaheer et al. 2020, "Big Bird", arXiv:2007.14062.
    """
    where = "bigbird()"
    size = check_int(where, "block_size", block_size, minimum=1)
    pattern = n.blocks(size).local(check_int(where, "window", window))
    global_blocks = check_int(where, "global_blocks", global_blocks)
    first, last = (global_blocks + 1) // 2, global_blocks // 2
    if first:
        pattern = pattern.global_(first)
    if check_int(where, "random_blocks", random_blocks):
        pattern = pattern.random(random_blocks, seed)
    if last:
        pattern = pattern | n.queries(-last * size) | n.keys(-last * size)
    return pattern
