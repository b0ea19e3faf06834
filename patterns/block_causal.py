"""Block-causal attention: bidirectional inside a block, causal across blocks.

Source: Arriola et al. 2025, "Block Diffusion: Interpolating Between Autoregressive and
Diffusion Language Models", arXiv:2503.09573 (block-causal mask of BD3-LMs); the same mask
serves chunked autoregressive video and audio models.
"""

from __future__ import annotations

from sparsedsl.lang import nodes as n
from sparsedsl.lang.checks import check_int


def block_causal(block_size: int = 128) -> n.Pattern:
    """``blocks(block_size).causal()``: a query sees every position of its own
    ``block_size``-token block (default 128) and of all earlier blocks.

    Source: Arriola et al. 2025, "Block Diffusion", arXiv:2503.09573.
    """
    return n.blocks(check_int("block_causal()", "block_size", block_size, minimum=1)).causal()
