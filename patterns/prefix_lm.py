"""Prefix language model: bidirectional over a prefix, causal after it.

Source: Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified
Text-to-Text Transformer" (T5), arXiv:1910.10683, §3.2.1 (the "prefix LM" mask).
"""

from __future__ import annotations

from sparsedsl.lang import nodes as n
from sparsedsl.lang.checks import check_int


def prefix_lm(prefix_length: int = 512) -> n.Pattern:
    """``causal() | prefix(prefix_length)``: every query sees the whole prefix (the first
    ``prefix_length`` positions, default 512) and the earlier positions.

    Source: Raffel et al. 2020, "T5", arXiv:1910.10683.
    """
    return n.causal() | n.prefix(check_int("prefix_lm()", "prefix_length", prefix_length, minimum=1))
