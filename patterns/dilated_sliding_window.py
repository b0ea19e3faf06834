"""Dilated sliding-window attention (Longformer's dilated heads).

Source: Beltagy, Peters and Cohan 2020, "Longformer: The Long-Document Transformer",
arXiv:2004.05150, §3.1 "Dilated Sliding Window": the window has gaps of ``dilation - 1``
positions, so a head reaches ``dilation`` times further with the same number of keys.
"""

from __future__ import annotations

from sparsedsl.lang import nodes as n
from sparsedsl.lang.checks import check_int


def dilated_sliding_window(window: int = 64, dilation: int = 2, causal: bool = False) -> n.Pattern:
    """``dilated_window(window, window, dilation)``: keys at most ``window`` positions away
    whose distance is a multiple of ``dilation`` (with ``causal``, only those at or before
    the query: ``dilated_window(window, 0, dilation)``).

    Source: Beltagy et al. 2020, "Longformer", arXiv:2004.05150."""
    where = "dilated_sliding_window()"
    window = check_int(where, "window", window)
    return n.dilated_window(window, 0 if causal else window, check_int(where, "dilation", dilation, minimum=1))
