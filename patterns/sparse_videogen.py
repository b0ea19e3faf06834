"""Sparse VideoGen's spatial and temporal heads: a text prompt followed by video frames.

Source: Xi et al. 2025, "Sparse VideoGen: Accelerating Video Diffusion Transformers with
Spatial-Temporal Sparsity", arXiv:2502.01776. The sequence is ``prompt_length`` text
tokens, then frames of ``tokens_per_frame`` tokens. Every head attends from and to the
prompt. A spatial head attends within a band of about ``width`` frames; a temporal head
attends to the tokens at nearby places of every frame (their places in their frames,
counted from the first frame, differ by less than ``width * tokens_per_frame //
num_frames``): ``blocks(tokens_per_frame).within(window(...)).starting_at(prompt_length)``,
frames cut from the end of the prompt.
"""

from __future__ import annotations

from sparsedsl.lang import nodes as n
from sparsedsl.lang.checks import check_int


def _prompt(where: str, prompt_length: int, seen: int) -> list[n.Pattern]:
    """The prompt's rows, and the first ``seen`` key columns."""
    prompt_length = check_int(where, "prompt_length", prompt_length)
    return ([n.queries(0, prompt_length)] if prompt_length else []) + ([n.keys(0, seen)] if seen else [])


def _union(parts: list[n.Pattern]) -> n.Pattern:
    out = parts[0]
    for part in parts[1:]:
        out = out | part
    return out


def svg_spatial(prompt_length: int = 226, tokens_per_frame: int = 1350, width: int = 2,
                attention_sink: bool = False, round_width: int = 128) -> n.Pattern:
    """Spatial head: the prompt's rows and columns (with ``attention_sink``, the first
    frame's columns too), and the pairs less than ``floor(width * tokens_per_frame /
    round_width) * round_width`` positions apart.

    Source: Xi et al. 2025, "Sparse VideoGen", arXiv:2502.01776."""
    where = "svg_spatial()"
    frame = check_int(where, "tokens_per_frame", tokens_per_frame, minimum=1)
    band = check_int(where, "width", width) * frame // check_int(where, "round_width", round_width, minimum=1) \
        * round_width
    seen = prompt_length + (frame if attention_sink else 0)
    parts = _prompt(where, prompt_length, seen) + ([n.window(band - 1)] if band else [])
    return _union(parts) if parts else ~n.full()


def svg_temporal(prompt_length: int = 226, num_frames: int = 13, tokens_per_frame: int = 1350,
                 width: int = 2) -> n.Pattern:
    """Temporal head: the prompt's rows and columns, and the pairs whose places in their
    frames (frames cut from the end of the prompt) differ by less than ``width *
    tokens_per_frame // num_frames``.

    Source: Xi et al. 2025, "Sparse VideoGen", arXiv:2502.01776."""
    where = "svg_temporal()"
    frame = check_int(where, "tokens_per_frame", tokens_per_frame, minimum=1)
    band = check_int(where, "width", width) * frame // check_int(where, "num_frames", num_frames, minimum=1)
    parts = _prompt(where, prompt_length, prompt_length)
    if band:
        parts.append(n.blocks(frame).within(n.window(band - 1)).starting_at(prompt_length))
    return _union(parts) if parts else ~n.full()
