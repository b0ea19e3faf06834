"""The generated block of ``README.md``: its picture."""

from __future__ import annotations

import sparsedsl as sd

from .registry import block, picture

HERO = "heads(window(512) | global_tokens(64), dilated(4096, 4), strided(256) & causal())"
HERO_N = 16384


@block("readme-hero", "README.md")
def _hero() -> str:
    path = picture("readme_hero.png", lambda out: sd.render(sd.parse(HERO), HERO_N, out, heads=3, dpi=110))
    return (f"![{HERO} at {HERO_N:,} tokens: one panel per head, each cell shaded by its share of "
            f"allowed pairs](docs/{path})")
