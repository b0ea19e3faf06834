"""Generated blocks of ``docs/language.md``: one entry per name of the language, with its
exact counts, a dense text matrix where it helps, and a picture."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

import sparsedsl as sd

from .registry import block, code, dense_text, fmt, pct, picture, render_png

@dataclass
class LangEntry:
    """One example of the language: ``expr`` is Python source using ``sd`` (and the tensors
    of ``buffers``, name -> source); it is counted and rendered at ``q_len x kv_len``."""

    slug: str
    expr: str
    q_len: int = 256
    kv_len: int | None = None
    heads: int | None = None
    tile: int = 16
    buffers: dict[str, str] = field(default_factory=dict)
    tiny: tuple | None = None  # (expr, q_len, kv_len, heads, note): a dense text matrix
    zoom: object = None

    def namespace(self) -> dict:
        ns = {"sd": sd, "torch": torch}
        for name, src in self.buffers.items():
            ns[name] = eval(src, ns)  # noqa: S307 (our own literal sources)
        return ns

    def pattern(self):
        return eval(self.expr, self.namespace())  # noqa: S307

    def tensors(self) -> dict:
        ns = self.namespace()
        return {name: ns[name] for name in self.buffers}


DOC_IDS = "torch.repeat_interleave(torch.arange(4), torch.tensor([40, 100, 60, 56]))"
LAYOUT = ("torch.tensor([[1, 0, 0, 1], [0, 1, 0, 0], [1, 1, 1, 0], [0, 0, 1, 1]], "
          "dtype=torch.bool)")

LAYOUT_BATCH = ("torch.stack([torch.eye(4, dtype=torch.bool), torch.ones(4, 4, dtype=torch.bool).tril()])"
                "[:, None]")

LANG: list[LangEntry] = [
    LangEntry("full", "sd.full()"),
    LangEntry("causal", "sd.causal()"),
    LangEntry("causal_rect", "sd.causal()", q_len=128, kv_len=256,
              tiny=("sd.causal()", 4, 7, 1, "Q = 4 queries, K = 7 keys: query i sees keys 0..i")),
    LangEntry("window", "sd.window(16, 4)"),
    LangEntry("dilated_window", "sd.dilated_window(24, 24, 4)",
              tiny=("sd.dilated_window(4, 2, 2)", 8, None, 1, "dilated_window(4, 2, 2) at N = 8")),
    LangEntry("chunks", "sd.chunks(64)"),
    LangEntry("strided", "sd.strided(16)"),
    LangEntry("dilated", "sd.dilated(64, 4, 1)",
              tiny=("sd.dilated(4, 2, 1)", 8, None, 1,
                    "dilated(4, 2, 1) at N = 8: segments {0..3}, {4..7}; kept p % 4 % 2 == 1")),
    LangEntry("global_tokens", "sd.global_tokens(16)"),
    LangEntry("prefix", "sd.causal() | sd.prefix(64)"),
    LangEntry("documents", 'sd.documents("doc")', buffers={"doc": DOC_IDS}),
    LangEntry("blocks_local", "sd.blocks(32).local(1)"),
    LangEntry("blocks_causal", "sd.blocks(32).local(2).causal()"),
    LangEntry("blocks_dilated", "sd.blocks(16).dilated([3], window=9)"),
    LangEntry("blocks_global", "sd.blocks(32).local(1).global_(1)"),
    LangEntry("blocks_random", "sd.blocks(32).local(1).random(2, seed=0)"),
    LangEntry("blocks_layout", 'sd.blocks(64).layout("lay")', buffers={"lay": LAYOUT}),
    LangEntry("within", "sd.blocks(64).local(1).within(sd.window(8))", zoom=(32, 160, 32, 160),
              tiny=("sd.blocks(4).local(0).within(sd.window(1))", 8, None, 1,
                    "blocks(4).local(0).within(window(1)) at N = 8: the window does not cross a block edge")),
    LangEntry("heads", "sd.heads(sd.window(8), sd.strided(32) & sd.causal(), sd.global_tokens(16))",
              heads=4,
              tiny=("sd.heads(sd.full(), sd.causal(), sd.window(0))", 3, None, 5,
                    "heads(full(), causal(), window(0)) with H = 5: groups of 2, 2, 1 heads")),
    LangEntry("segments", "sd.segments([64, 128, 256], [1, 2, 4])", heads=3),
    LangEntry("longnet", "sd.longnet([64, 128, 256], [1, 2, 4])", heads=4,
              tiny=("sd.longnet([4, 8], [1, 2])", 8, None, 2,
                    "longnet([4, 8], [1, 2]) with H = 2: █ a pair counted once, 2 counted twice")),
    LangEntry("union", "sd.window(8) | sd.global_tokens(16)"),
    LangEntry("intersection", "sd.chunks(64) & sd.causal()"),
    LangEntry("difference", "sd.window(32) - sd.window(4)"),
    LangEntry("complement", "~sd.chunks(64)"),
    LangEntry("ranges", "sd.queries(0, 16) | sd.keys(-32) | sd.window(4)",
              tiny=("sd.queries(-2) | sd.keys(1, 3)", 6, None, 1,
                    "queries(-2) | keys(1, 3) at N = 6: the last 2 rows, key columns 1 and 2")),
    LangEntry("starting_at", "sd.chunks(64).starting_at(48)",
              tiny=("sd.chunks(2).starting_at(3)", 8, None, 1,
                    "chunks(2).starting_at(3) at N = 8: chunks cut from position 3, nothing before it")),
    LangEntry("documents_within", 'sd.documents("doc").within(sd.causal() | sd.prefix(16))',
              buffers={"doc": DOC_IDS}),
    LangEntry("random_causal", "sd.blocks(32).local(0).random_causal(2, seed=0)"),
    LangEntry("layout_batch", 'sd.blocks(64).layout("lay")', buffers={"lay": LAYOUT_BATCH}),
    LangEntry("cycle_heads", "sd.cycle_heads(sd.window(8), sd.strided(32) & sd.causal())", heads=4,
              tiny=("sd.cycle_heads(sd.causal(), sd.window(0))", 3, None, 3,
                    "cycle_heads(causal(), window(0)) with H = 3: heads 0 and 2 causal, head 1 the diagonal")),
    LangEntry("multiset", "sd.window(16) + sd.chunks(64)",
              tiny=("sd.window(1) + sd.chunks(4)", 8, None, 1,
                    "window(1) + chunks(4) at N = 8: █ counted once, 2 counted twice")),
]


def _count_args(e: LangEntry) -> str:
    args = [str(e.q_len)]
    if e.kv_len is not None:
        args.append(str(e.kv_len))
    if e.heads is not None:
        args.append(f"heads={e.heads}")
    args.append(f"tile={e.tile}")
    args += [f"{name}={name}" for name in e.buffers]
    return ", ".join(args)


def lang_block(e: LangEntry) -> str:
    p = e.pattern()
    c = sd.count(p, e.q_len, e.kv_len, heads=e.heads, tile=e.tile, **e.tensors())
    lines = (["import torch", "import sparsedsl as sd", ""] if e.buffers else ["import sparsedsl as sd", ""])
    lines += [f"{name} = {src}" for name, src in e.buffers.items()]
    lines += [
        f"p = {e.expr}",
        f"assert str(p) == {str(p)!r} and sd.parse(str(p)) == p",
        f"c = sd.count(p, {_count_args(e)})",
        f"assert c.pairs == {c.pairs}",
    ]
    if len(set(c.per_head)) > 1:
        lines.append(f"assert c.per_head == {c.per_head}")
    lines.append(f"assert str(c.tiles) == {str(c.tiles)!r}")
    total = c.batch * c.heads * c.q_len * c.kv_len
    shape = f"N = {c.q_len}" if c.kv_len == c.q_len else f"Q = {c.q_len}, K = {c.kv_len}"
    heads = (f", {c.heads} heads" if c.heads > 1 else "") + (f", {c.batch} batch entries" if c.batch > 1 else "")
    summary = (f"`{p}` at {shape}{heads}: **{fmt(c.pairs)}** of {fmt(total)} pairs allowed "
               f"({pct(c.density)}); {e.tile}×{e.tile} tiles: {c.tiles}.")
    if len(set(c.per_head)) > 1:
        summary += " Per head: " + ", ".join(fmt(x) for x in c.per_head) + "."
    if c.per_head_with_multiplicity is not None:
        lines.insert(-1, f"assert c.pairs_with_multiplicity == {c.pairs_with_multiplicity}")
        summary += (f" Counted with multiplicity (once per term that allows a pair): "
                    f"**{fmt(c.pairs_with_multiplicity)}**.")
    parts = [code("python", "\n".join(lines)), summary]
    if e.tiny:
        expr, q, kv, h, note = e.tiny
        parts.append(code("text", f"{note}\n" + dense_text(eval(expr, {"sd": sd}), q, kv, h)))  # noqa: S307
    path = picture(f"lang_{e.slug}.png", lambda out, e=e: render_png(
        e.pattern(), e.q_len, out, kv_len=e.kv_len, heads=e.heads, tile=e.tile, zoom=e.zoom,
        **e.tensors()))
    parts.append(f"![{p} at {shape}, {e.tile}-token tiles]({path})")
    return "\n\n".join(parts)


for _entry in LANG:
    block(f"lang-{_entry.slug}", "docs/language.md")(lambda e=_entry: lang_block(e))


SCORE_CODE = '''\
import torch
import sparsedsl as sd

def halve_far(score, b, h, q, k):          # any (score, b, h, q, k) -> score in torch ops
    return torch.where((q - k).abs() > 64, score * 0.5, score)

p = sd.causal().score(sd.alibi(), sd.softcap(30.0))
assert str(p) == "causal().score(alibi()).score(softcap(30.0))" and sd.parse(str(p)) == p
attn = sd.compile(p)
q = k = v = torch.randn(1, 8, 256, 32)
out = attn(q, k, v)                          # ALiBi slopes for 8 heads, then soft-capping
score_mod = attn.score_mod(256, heads=8)     # the FlexAttention score_mod it lowers to
custom = sd.compile(sd.window(128).score(halve_far))
assert custom(q, k, v).shape == (1, 8, 256, 32)
'''


def _draw_score(path: Path) -> None:
    sd.render_scores(sd.causal().score(sd.alibi(), sd.softcap(30.0)), 48, path, heads=8, head=7,
                     show=("mod", "scores", "weights"), dpi=110)


@block("lang-score", "docs/language.md")
def _lang_score() -> str:
    ns: dict = {}
    exec(compile(SCORE_CODE, "<lang-score>", "exec"), ns)  # noqa: S102 (our own snippet)
    path = picture("lang_score.png", _draw_score)
    return "\n\n".join([code("python", SCORE_CODE),
                        "Score modifications change the scores of allowed pairs, never which pairs "
                        "are allowed (the counts and tiles are those of the mask). "
                        "`sd.render_scores` draws what they do to one head, here head 7 of 8 on "
                        "random inputs: ALiBi's distance penalty, the modified scores, and the "
                        "attention weights:",
                        f"![alibi() and softcap(30.0) on head 7: the penalty, the scores, the weights]({path})"])


PARSE_TEXT = "(window(64) | global_tokens(8)) - heads(strided(7), causal())"
BAD_TEXTS = ("window(3) | glob(2)", "window(3) * causal()", "__import__('os').system('ls')")


@block("lang-parse", "docs/language.md")
def _lang_parse() -> str:
    p = sd.parse(PARSE_TEXT)
    lines = [
        "import sparsedsl as sd",
        "",
        f"p = sd.parse({PARSE_TEXT!r})",
        "assert p == (sd.window(64) | sd.global_tokens(8)) - sd.heads(sd.strided(7), sd.causal())",
        "assert sd.parse(str(p)) == p and hash(sd.parse(str(p))) == hash(p)",
        f"assert str(p) == {str(p)!r}",
        "try:",
        f"    sd.parse({BAD_TEXTS[0]!r})",
        "except sd.PatternSyntaxError as err:   # a ValueError",
        "    print(err)",
    ]
    errors = []
    for text in BAD_TEXTS:
        try:
            sd.parse(text)
        except sd.PatternSyntaxError as err:
            errors.append(f">>> sd.parse({text!r})\nPatternSyntaxError: {err}")
        else:  # pragma: no cover
            raise AssertionError(f"{text!r} parsed")
    path = picture("lang_parse.png", lambda out: sd.diagram(sd.parse(PARSE_TEXT), out, seq_len=256, tile=16))
    return "\n\n".join([
        code("python", "\n".join(lines)),
        "What the parser says about bad text (it quotes the text and points at the column):",
        code("text", "\n\n".join(errors)),
        f"The expression tree of `{p}` as `sparsedsl.draw.diagram.diagram` draws it "
        f"(N = 256, 2 heads; each box: its text, pairs per head and density):",
        f"![the expression tree of {p}]({path})",
    ])




PAPER = "sd.longnet([2048, 4096, 8192, 16384, 32768], [1, 2, 4, 6, 12])"


def _draw_paper(path: Path, zoom) -> None:
    render_png(eval(PAPER, {"sd": sd}), 32768, path, heads=12, show_heads=[0, 5, 11], zoom=zoom)  # noqa: S307


@block("lang-longnet-paper", "docs/language.md")
def _lang_longnet_paper() -> str:
    p = eval(PAPER, {"sd": sd})  # noqa: S307
    c = sd.count(p, 32768, heads=12, tile=512)
    whole = picture("lang_longnet_paper.png", lambda out: _draw_paper(out, None))
    corner = picture("lang_longnet_paper_zoom.png", lambda out: _draw_paper(out, (0, 36, 0, 36)))
    lines = ["import sparsedsl as sd", "", f"p = {PAPER}",
             "c = sd.count(p, 32768, heads=12, tile=512)",
             f"assert c.pairs == {c.pairs} and c.pairs_with_multiplicity == {c.pairs_with_multiplicity}"]
    return "\n\n".join([
        code("python", "\n".join(lines)),
        f"`{p}` at N = 32,768 with 12 heads: **{fmt(c.pairs)}** distinct pairs allowed "
        f"({pct(c.density)}), **{fmt(c.pairs_with_multiplicity)}** counted once per branch that "
        f"allows them ({c.pairs_with_multiplicity / c.pairs:.2f} per pair). Heads 0, 5 and 11 over "
        f"the whole sequence (each cell: its pairs counted with multiplicity, per pair):",
        f"![{p} at N = 32,768, heads 0, 5, 11]({whole})",
        "The first 36 tokens, one pair per cell: the colour is the pair's multiplicity, up to "
        "5 where every branch keeps both positions (head 0 keeps position 0 in every branch):",
        f"![{p}: multiplicities of the first 36 x 36 pairs, heads 0, 5, 11]({corner})",
    ])
