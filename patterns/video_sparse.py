"""Video Sparse Attention's fine pass: the key tiles each query tile selected, per batch
entry and head.

Source: Zhang et al. 2025, "VSA: Faster Video Diffusion with Trainable Sparse Attention",
arXiv:2505.13389. A coarse pass pools each tile of ``tile_size`` tokens (tokens in
tile-major order) and keeps the top-k key tiles of every query tile; the fine pass attends
to the tokens of the kept tiles. The kept tiles come from the inputs, so they are bound at
call time as a ``[batch, heads, query tiles, key tiles]`` bool layout.
"""

from __future__ import annotations

from sparsedsl.lang import nodes as n
from sparsedsl.lang.checks import check_int


def video_sparse_attention(tile_size: int = 64, name: str = "tiles") -> n.Pattern:
    """``blocks(tile_size).layout(name)``, the layout bound as ``name=`` with a batch axis:
    ``[batch, heads or 1, query tiles, key tiles]`` (built from top-k indices ``idx`` as
    ``torch.zeros(...).scatter_(-1, idx, True)``).

    Source: Zhang et al. 2025, "VSA", arXiv:2505.13389."""
    return n.blocks(check_int("video_sparse_attention()", "tile_size", tile_size, minimum=1)).layout(name)
