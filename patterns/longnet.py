"""LongNet's dilated attention: every head runs every (segment length, dilation rate) branch,
and its head-grouped simplification.

Source: Ding et al. 2023, "LongNet: Scaling Transformers to 1,000,000,000 Tokens",
arXiv:2307.02486, §2.2–2.3 (dilated attention, multi-head offsets) and §4.1 / Appendix A
(setup: segment lengths ``w = {2048, 4096, 8192, 16384, 32768}`` with dilation rates
``r = {1, 2, 4, 6, 12}``).
"""

from __future__ import annotations

from sparsedsl.lang import nodes as n

#: LongNet's language-modelling setup (§4.1, Appendix A).
PAPER_SEGMENT_LENGTHS = (2048, 4096, 8192, 16384, 32768)
PAPER_DILATION_RATES = (1, 2, 4, 6, 12)


def longnet(segment_lengths=PAPER_SEGMENT_LENGTHS, dilation_rates=PAPER_DILATION_RATES,
            causal: bool = False) -> n.Pattern:
    """``longnet(segment_lengths, dilation_rates)``, with ``& causal()`` if ``causal``.

    LongNet as its reference code computes it: every head runs every branch (segment length
    ``w``, rate ``r``); in a branch the heads are split into ``r`` groups of ``ceil(H / r)``
    heads, group ``j`` attending among the positions ``p`` with ``(p % w) % r == j`` of each
    segment; the branch outputs are merged by softmax over their log-sum-exps, so a key that
    ``m`` branches allow counts ``m`` times in one softmax (a multiset: ``count`` reports the
    pairs with multiplicity beside the distinct ones). Any number of heads (a head count the
    rates do not divide leaves the last group of a branch smaller) and any sequence length
    (the last segment is shorter; a segment longer than the sequence is the whole sequence).
    Defaults: the paper's setup, segments 2,048 … 32,768 with rates 1, 2, 4, 6, 12.
    ``causal`` (default ``False``) makes every branch causal.

    Source: Ding et al. 2023, "LongNet", arXiv:2307.02486.
    """
    pattern = n.longnet(segment_lengths, dilation_rates)
    return pattern & n.causal() if causal else pattern


def longnet_head_grouped(segment_lengths=PAPER_SEGMENT_LENGTHS, dilation_rates=PAPER_DILATION_RATES,
                         causal: bool = False) -> n.Pattern:
    """``segments(segment_lengths, dilation_rates)``, with ``& causal()`` if ``causal``: the
    head-grouped simplification of LongNet used by ``dilated_attention_pytorch``'s
    ``DilatedAttention``, where head group ``i`` runs branch ``i`` only.

    Heads are split into ``len(segment_lengths)`` groups as evenly as possible (the first
    ``H % G`` groups get one extra head); group ``i`` keeps, inside each
    ``segment_lengths[i]``-token segment, the positions ``p`` with ``p % rate == i % rate``
    and attends among them. Defaults: the paper's setup, five groups (at least 5 heads). A
    query that its group's offset skips sees no key and outputs 0 in that head. Any sequence
    length works: the last segment is just shorter. ``causal`` (default ``False``) adds
    ``k <= q``. For LongNet's own semantics (every head runs every branch), see
    :func:`longnet`.

    Source: ``dilated_attention_pytorch``'s ``DilatedAttention``; dilated attention from Ding
    et al. 2023, "LongNet", arXiv:2307.02486.
    """
    pattern = n.segments(segment_lengths, dilation_rates)
    return pattern & n.causal() if causal else pattern
