"""Turning what a user typed into a pattern: pattern text, read by :func:`sparsedsl.parse`."""

from __future__ import annotations

from .lang.nodes import Pattern
from .lang.parse import parse


def pattern_from_text(text: str) -> Pattern:
    """The pattern that ``text`` names: pattern source text such as ``"window(256)"``."""
    return parse(text)
