"""Longformer: a sliding window, optionally dilated, plus symmetric global tokens.

Source: Beltagy, Peters and Cohan 2020, "Longformer: The Long-Document Transformer",
arXiv:2004.05150, §3.1 (sliding window of size ``w``, dilated sliding window with gaps of
``d``, and global attention on task-specific tokens such as ``[CLS]``).
"""

from __future__ import annotations

from sparsedsl.lang import nodes as n
from sparsedsl.lang.checks import check_int


def longformer(window: int = 512, global_tokens: int = 1, dilation: int = 1) -> n.Pattern:
    """``window(window // 2) | global_tokens(global_tokens)``.

    ``window`` is Longformer's ``w``, the whole width (``w / 2`` keys on each side; default
    512, the paper's downstream setting). With ``dilation = d > 1`` the window keeps every
    ``d``-th key and reaches ``d * w / 2`` on each side: ``dilated_window(d*w/2, d*w/2, d)``.
    ``global_tokens`` (default 1, a ``[CLS]`` token) are the first positions; they see and
    are seen by every position. ``global_tokens=0`` leaves them out. Longformer picks
    global positions per task; put them first, or write your own with ``documents`` /
    ``layout``.

    Source: Beltagy et al. 2020, "Longformer", arXiv:2004.05150.
    """
    where = "longformer()"
    half = check_int(where, "window", window, minimum=2) // 2
    dilation = check_int(where, "dilation", dilation, minimum=1)
    global_tokens = check_int(where, "global_tokens", global_tokens)
    local = n.window(half) if dilation == 1 else n.dilated_window(dilation * half, dilation * half, dilation)
    return local | n.global_tokens(global_tokens) if global_tokens else local
