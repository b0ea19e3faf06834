"""1-D neighbourhood attention (NATTEN): a centred window clamped at the sequence ends.

Source: Hassani, Walton, Li, Li and Shi 2023, "Neighborhood Attention Transformer",
CVPR 2023, arXiv:2204.07143, §3.1: every query attends to exactly ``kernel_size``
nearest keys; near an edge the window is shifted inwards instead of cut off.

The language has no position measured from the end of the sequence, so the right edge is
written for one length: the pattern takes ``seq_len`` and is exact at that length only
(at another length its right-edge rows are wrong). It is built from existing primitives,
with ``w = kernel_size // 2`` and ``N = seq_len``::

    window(w)                                             interior rows
    | (global_tokens(w) - prefix(w)) & prefix(2w + 1)     rows q < w also see keys w..2w
    | ~global_tokens(N - w)                               rows q >= N - w: keys >= N - w ...
    | prefix(N - w) - chunks(N - w) - prefix(N - 1 - 2w)  ... and keys N-1-2w .. N-w-1

(``prefix(a) - chunks(a)`` is "``q >= a`` and ``k < a``": with ``k < a`` the key is in the
first ``a``-chunk, and the query is not.)
"""

from __future__ import annotations

from sparsedsl.lang import nodes as n
from sparsedsl.lang.checks import PatternArgumentError, check_int


def neighbourhood_1d(kernel_size: int = 7, seq_len: int = 4096) -> n.Pattern:
    """Every query of a ``seq_len``-token sequence sees exactly ``kernel_size`` keys
    (odd, default 7, NAT's kernel): ``[q - w, q + w]`` shifted to stay inside
    ``[0, seq_len)``, ``w = kernel_size // 2``. Exact at ``seq_len`` (default 4096) only;
    see the module docstring for the construction.

    Source: Hassani et al. 2023, "Neighborhood Attention Transformer", arXiv:2204.07143.
    """
    where = "neighbourhood_1d()"
    kernel_size = check_int(where, "kernel_size", kernel_size, minimum=1)
    seq_len = check_int(where, "seq_len", seq_len, minimum=1)
    if kernel_size % 2 == 0:
        raise PatternArgumentError(f"{where}: argument 'kernel_size' must be odd, got {kernel_size}")
    if seq_len < kernel_size:
        raise PatternArgumentError(
            f"{where}: argument 'seq_len' must be >= kernel_size ({kernel_size}), got {seq_len}")
    w = kernel_size // 2
    if w == 0:
        return n.window(0)
    if seq_len == kernel_size:
        return n.full()
    left = (n.global_tokens(w) - n.prefix(w)) & n.prefix(2 * w + 1)
    a, b = seq_len - w, seq_len - 1 - 2 * w
    right_near = n.prefix(a) - n.chunks(a)
    if b > 0:
        right_near = right_near - n.prefix(b)
    return n.window(w) | left | ~n.global_tokens(a) | right_near
