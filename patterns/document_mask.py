"""Document masking for packed sequences: no attention across document boundaries.

Source: Dubey et al. 2024, "The Llama 3 Herd of Models", arXiv:2407.21783, §3.4.1 (an
attention mask that prevents self-attention between different documents within a
sequence); Krell et al. 2021, "Efficient Sequence Packing without Cross-contamination",
arXiv:2107.02027.
"""

from __future__ import annotations

from sparsedsl.lang import nodes as n
from sparsedsl.lang.checks import check_int


def document_mask(name: str = "doc_ids", causal: bool = True) -> n.Pattern:
    """``documents(name) & causal()`` (or ``documents(name)`` when ``causal=False``).

    The document id of every position is a ``[L]`` or ``[B, L]`` integer tensor passed at
    call time by keyword, ``module(q, k, v, doc_ids=ids)`` for the default ``name``.

    Source: Dubey et al. 2024, "The Llama 3 Herd of Models", arXiv:2407.21783.
    """
    pattern = n.documents(name)
    return pattern & n.causal() if causal else pattern


def document_prefix_lm(name: str = "doc_ids", prefix_length: int = 64) -> n.Pattern:
    """Prefix-LM inside every packed document: ``documents(name).within(causal() |
    prefix(prefix_length))``, the first ``prefix_length`` positions of each document (counted
    from its first position) seen by all of that document's queries, the rest causal.

    Source: Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified
    Text-to-Text Transformer" (T5), arXiv:1910.10683, with packing as in Krell et al. 2021,
    arXiv:2107.02027."""
    prefix_length = check_int("document_prefix_lm()", "prefix_length", prefix_length, minimum=1)
    return n.documents(name).within(n.causal() | n.prefix(prefix_length))
