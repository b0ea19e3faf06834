"""Causal sliding-window attention (Mistral 7B).

Source: Jiang et al. 2023, "Mistral 7B", arXiv:2310.06825, §2 "Sliding Window Attention"
(window ``W = 4096``).
"""

from __future__ import annotations

from sparsedsl.lang import nodes as n
from sparsedsl.lang.checks import check_int


def sliding_window(window: int = 4096) -> n.Pattern:
    """Each query sees the ``window`` most recent positions, itself included:
    ``window(window - 1, 0)``, i.e. ``q - window < k <= q`` (the mask of Mistral's and
    Hugging Face's implementations). Default ``window=4096`` (Mistral 7B).

    Source: Jiang et al. 2023, "Mistral 7B", arXiv:2310.06825.
    """
    window = check_int("sliding_window()", "window", window, minimum=1)
    return n.window(window - 1, 0)
