"""LongNet's dilated attention: head groups, each a segment length and dilation rate.

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
    """``segments(segment_lengths, dilation_rates)``, with ``& causal()`` if ``causal``.

    Heads are split into ``len(segment_lengths)`` groups as evenly as possible (the first
    ``H % G`` groups get one extra head); group ``i`` keeps, inside each
    ``segment_lengths[i]``-token segment, the positions ``p`` with ``p % rate == i % rate``
    and attends among them. Defaults: the paper's setup, five groups,
    segments 2,048 … 32,768 with rates 1, 2, 4, 6, 12 (at least 5 heads). A query that its
    group's offset skips sees no key and outputs 0 in that head; LongNet's mixture over
    heads covers every position through the other groups. Any sequence length works: the
    last segment is just shorter. ``causal`` (default ``False``) adds ``k <= q``.

    Source: Ding et al. 2023, "LongNet", arXiv:2307.02486.
    """
    pattern = n.segments(segment_lengths, dilation_rates)
    return pattern & n.causal() if causal else pattern
