"""Sliding-window attention with attention sinks (StreamingLLM).

Source: Xiao et al. 2024, "Efficient Streaming Language Models with Attention Sinks",
arXiv:2309.17453: the first few tokens (the sinks) stay visible to every later query
beside a causal window of recent tokens.
"""

from __future__ import annotations

from sparsedsl.lang import nodes as n
from sparsedsl.lang.checks import check_int


def attention_sink(window: int = 1024, sink_tokens: int = 4) -> n.Pattern:
    """``(window(window - 1, 0) | prefix(sink_tokens)) & causal()``: each query sees the
    ``window`` most recent positions (itself included) and the first ``sink_tokens``.

    Source: Xiao et al. 2024, "Efficient Streaming Language Models with Attention Sinks",
    arXiv:2309.17453."""
    where = "attention_sink()"
    window = check_int(where, "window", window, minimum=1)
    return (n.window(window - 1, 0) | n.prefix(check_int(where, "sink_tokens", sink_tokens, minimum=1))) & n.causal()
