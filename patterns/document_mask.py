"""Document masking for packed sequences: no attention across document boundaries.

Source: Dubey et al. 2024, "The Llama 3 Herd of Models", arXiv:2407.21783, §3.4.1 (an
attention mask that prevents self-attention between different documents within a
sequence); Krell et al. 2021, "Efficient Sequence Packing without Cross-contamination",
arXiv:2107.02027.
"""

from __future__ import annotations

from sparsedsl.lang import nodes as n


def document_mask(name: str = "doc_ids", causal: bool = True) -> n.Pattern:
    """``documents(name) & causal()`` (or ``documents(name)`` when ``causal=False``).

    The document id of every position is a ``[L]`` or ``[B, L]`` integer tensor passed at
    call time by keyword, ``module(q, k, v, doc_ids=ids)`` for the default ``name``.

    Source: Dubey et al. 2024, "The Llama 3 Herd of Models", arXiv:2407.21783.
    """
    pattern = n.documents(name)
    return pattern & n.causal() if causal else pattern
