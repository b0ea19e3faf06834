"""Generated blocks of ``docs/counting.md``: what ``render`` and ``render_scores`` draw."""

from __future__ import annotations

import sparsedsl as sd

from .registry import block, code, picture

RENDER_CODE = '''\
import sparsedsl as sd

longnet = sd.segments([8192, 16384, 32768, 65536], [1, 2, 4, 8])
sd.render(longnet, 1 << 20, "longnet_1m.png", heads=4, show_heads=[1, 3],
          zoom=(0, 131072, 0, 131072))                         # a million tokens, two heads
sd.render(sd.window(256) | sd.global_tokens(64), 4096, "tiles.svg", view="tiles")
sd.render(sd.load("bigbird"), 4096, "bigbird.pdf", compact=True)  # one panel, a paper column wide
sd.render_scores(sd.causal().score(sd.alibi()), 64, "alibi.png", heads=8, head=7)
'''


@block("counting-render", "docs/counting.md")
def _render() -> str:
    longnet = sd.segments([8192, 16384, 32768, 65536], [1, 2, 4, 8])
    million = picture("counting_million.png", lambda out: sd.render(
        longnet, 1 << 20, out, heads=4, show_heads=[1, 3], zoom=(0, 131072, 0, 131072), dpi=110))
    tiles = picture("counting_tiles.png", lambda out: sd.render(
        sd.window(256) | sd.global_tokens(64), 4096, out, view="tiles", dpi=110))
    compact = picture("counting_compact.png", lambda out: sd.render(
        sd.load("bigbird"), 4096, out, compact=True, dpi=150))
    return "\n\n".join([
        code("python", RENDER_CODE),
        "Two heads of LongNet's head groups at 1,048,576 tokens, the first 131,072 of them: each "
        "256×256-token cell is shaded by its share of allowed pairs (head 3 keeps one position in "
        "8 of each 65,536-token segment, so 1/64 of a cell's pairs):",
        f"![LongNet heads 1 and 3 at a million tokens]({million})",
        "The tile view: what a kernel with 128×128 tiles computes (full tiles without a mask, "
        "partial tiles masked, empty tiles skipped):",
        f"![window(256) | global_tokens(64), tile view]({tiles})",
        "`compact=True`: one panel without titles, 3.3 inches wide:",
        f"![BigBird at 4,096 tokens, compact]({compact})",
    ])
