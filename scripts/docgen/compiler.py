"""Generated blocks of ``docs/compiler.md``: ``explain()`` as it prints, each candidate
plan's cost or reasons, and a block mask as FlexAttention draws it."""

from __future__ import annotations

import sparsedsl as sd

from .registry import block, cell, code, fmt

QUICK = "blocks(256).local(1).within(segments([128, 128], [1, 2]))"

EXPLAIN_CASES = (
    ("full()", 4096, 8),
    ("window(256) | global_tokens(64)", 4096, 8),
    ("segments([512, 1024], [1, 2])", 4096, 8),
    (QUICK, 4096, 8),
)


@block("compiler-explain", "docs/compiler.md")
def _compiler_explain() -> str:
    parts = []
    for text, n, h in EXPLAIN_CASES:
        plan = sd.compile(sd.parse(text)).explain(n, heads=h, head_dim=64, device="cpu")
        parts.append(f'>>> print(sd.compile(sd.parse("{text}")).explain({n}, heads={h}, '
                     f'head_dim=64, device="cpu"))\n{plan}')
    return code("text", "\n\n".join(parts))


@block("compiler-choice", "docs/compiler.md")
def _compiler_choice() -> str:
    """Each candidate's cost (computed pairs over the plan's efficiency), or "–" where it
    does not apply (its reasons are in ``explain()``'s text above), from
    ``explain().candidates``."""
    plans = [(text, sd.compile(sd.parse(text)).explain(n, heads=h, head_dim=64, device="cpu"))
             for text, n, h in EXPLAIN_CASES[1:]]
    names = list(getattr(plans[0][1], "candidates", None) or {})
    rows = ["| pattern (4,096 tokens, 8 heads, CPU) | useful pairs | plan | "
            + " | ".join(names) + " |", "|---|---:|---|" + "---|" * len(names)]
    for text, plan in plans:
        candidates = getattr(plan, "candidates", None) or {}
        shown = []
        for name in names:
            c = candidates.get(name)
            cost = getattr(c, "cost", None)
            shown.append("–" if cost is None else fmt(round(cost)))
        rows.append(f"| `{cell(text)}` | {fmt(plan.pairs)} | **{plan.kind}** | " + " | ".join(shown) + " |")
    return "\n".join(rows)


@block("compiler-blockmask", "docs/compiler.md")
def _compiler_blockmask() -> str:
    m = sd.compile(sd.window(100) | sd.global_tokens(64))
    drawn = str(m.block_mask(1024))  # BlockMask.__str__ draws the blocks
    return code("text", "\n".join(line.rstrip() for line in drawn.splitlines()))
