#!/usr/bin/env python
"""Regenerate every picture and number of the documentation pages this script owns.

    python scripts/make_docs.py                 # rewrite generated blocks and pictures
    python scripts/make_docs.py --no-pictures   # only the generated blocks (seconds)
    python scripts/make_docs.py --check         # exit 1 if a generated block is stale

Owned pages: ``docs/getting-started.md``, ``language.md``, ``compiler.md``,
``migration.md`` and ``catalog.md`` (``docs/index.md`` holds no numbers). In them, the text
between ``<!-- generated:NAME -->`` and ``<!-- /generated -->`` is replaced on every run by
what generator ``NAME`` below returns; everything else is written by hand. Every block a
page holds must have a generator and every generator a block. Pictures are written to
``docs/images/`` (names ``lang_*``, ``catalog_*``, ``migration_*``).

Nothing here depends on the clock, the machine or a random state that is not seeded, so a
second run gives byte-identical markdown. Speed numbers are not measured here (this runs on
a CPU): they are read from the table of ``docs/performance.md`` (the latest GPU run), so
the migration guide follows that file.

``tests/test_docs.py`` imports this module to check that the blocks are up to date
(``stale_blocks``) and runs every ``python`` code block of the docs.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import io
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from anywhere, with or without the editable install
    sys.path.insert(0, str(ROOT))

import sparsedsl as sd  # noqa: E402
from sparsedsl.lang.queries import head_group_count  # noqa: E402
from sparsedsl.progress import Progress  # noqa: E402

DOCS = ROOT / "docs"
IMAGES = DOCS / "images"
PAGES = ("getting-started.md", "language.md", "compiler.md", "migration.md", "catalog.md")
BLOCK_RE = re.compile(r"<!-- generated:(?P<name>[\w.-]+) -->\n(?P<body>.*?)<!-- /generated -->", re.S)


# ---------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------


@dataclass
class Block:
    """A generated block: ``make()`` returns its markdown. ``cheap`` blocks are re-made by
    the test suite to check that the docs are up to date."""

    name: str
    page: str
    make: Callable[[], str]
    cheap: bool = True


@dataclass
class Picture:
    name: str  # file name under docs/images/
    draw: Callable[[Path], object]


BLOCKS: dict[str, Block] = {}
PICTURES: dict[str, Picture] = {}


def block(name: str, page: str, cheap: bool = True):
    def register(fn):
        if name in BLOCKS:
            raise ValueError(f"duplicate generated block {name!r}")
        BLOCKS[name] = Block(name, page, fn, cheap)
        return fn
    return register


def picture(name: str, draw: Callable[[Path], object]) -> str:
    """Register a picture; returns its markdown path relative to docs/."""
    if not re.fullmatch(r"(lang|catalog|migration)_[\w-]+\.png", name):
        raise ValueError(f"picture names must start with lang_, catalog_ or migration_: {name!r}")
    PICTURES[name] = Picture(name, draw)
    return f"images/{name}"


# ---------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------


def fmt(n: int) -> str:
    return f"{n:,}"


def pct(x: float) -> str:
    if x == 0 or x >= 0.001:
        return f"{x:.2%}"
    return f"{x * 100:.3g}%"


def cell(text: str) -> str:
    """Text for a markdown table cell (``|`` escaped, also inside backticks)."""
    return re.sub(r"(?<!\\)\|", r"\\|", text)


def code(lang: str, text: str) -> str:
    return f"```{lang}\n{text.rstrip()}\n```"


def captured(fn: Callable, *args, **kwargs) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        fn(*args, **kwargs)
    return buf.getvalue().rstrip()


def rst_to_md(text: str) -> str:
    """Docstring markup to markdown: ``x`` → `x`; inside a code span, the spaces that
    joining a wrapped line leaves after ``(`` or ``=`` and before ``.`` are removed."""
    def span(m):
        inner = re.sub(r"\(\s+", "(", m.group(1))
        inner = re.sub(r"(?<![=!<>])=\s+(?=[\"'])", "=", inner)
        inner = re.sub(r"\s+(?=\.[A-Za-z_])", "", inner)
        return f"`{inner}`"
    return re.sub(r"``(.+?)``", span, text)


def paragraphs(doc: str) -> list[str]:
    return [" ".join(p.split()) for p in doc.strip().split("\n\n") if p.strip()]


def render_png(pattern, q_len: int, path: Path, **kwargs) -> None:
    from sparsedsl.draw.render import render
    render(pattern, q_len, path, **kwargs)


def dense_text(pattern, q_len: int, kv_len: int | None = None, heads: int = 1, **buffers) -> str:
    """A tiny dense mask as text, one row per query (``█`` allowed, ``·`` not)."""
    allowed = sd.dense(pattern, q_len, kv_len, heads=heads, **buffers)
    kv = allowed.shape[-1]
    out = []
    for h in range(allowed.shape[0]):
        if allowed.shape[0] > 1:
            out.append(f"head {h}:")
        out.append("       k=" + " ".join(str(j % 10) for j in range(kv)))
        for i in range(allowed.shape[1]):
            out.append(f"  q={i:<3}  " + " ".join("█" if a else "·" for a in allowed[h, i].tolist()))
    return "\n".join(out)


# ---------------------------------------------------------------------------------------
# docs/language.md: one entry per name of the language
# ---------------------------------------------------------------------------------------


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
    LangEntry("union", "sd.window(8) | sd.global_tokens(16)"),
    LangEntry("intersection", "sd.chunks(64) & sd.causal()"),
    LangEntry("difference", "sd.window(32) - sd.window(4)"),
    LangEntry("complement", "~sd.chunks(64)"),
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
    total = c.heads * c.q_len * c.kv_len
    shape = f"N = {c.q_len}" if c.kv_len == c.q_len else f"Q = {c.q_len}, K = {c.kv_len}"
    heads = f", {c.heads} heads" if c.heads > 1 else ""
    summary = (f"`{p}` at {shape}{heads}: **{fmt(c.pairs)}** of {fmt(total)} pairs allowed "
               f"({pct(c.density)}); {e.tile}×{e.tile} tiles: {c.tiles}.")
    if len(set(c.per_head)) > 1:
        summary += " Per head: " + ", ".join(fmt(x) for x in c.per_head) + "."
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
    block(f"lang-{_entry.slug}", "language.md")(lambda e=_entry: lang_block(e))


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
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, heads = 64, 8
    mod = sd.compile(sd.causal().score(sd.alibi())).score_mod(n, heads=heads)
    q = torch.arange(n)[:, None]
    k = torch.arange(n)[None, :]
    zero = torch.zeros(n, n)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.3), layout="constrained")
    for ax, h in zip(axes[:2], (0, heads - 1)):
        bias = mod(zero, torch.tensor(0), torch.tensor(h), q, k)
        bias = bias.masked_fill(k > q, float("nan"))
        im = ax.imshow(bias.numpy(), cmap="viridis", interpolation="nearest")
        ax.set_title(f"alibi(): score added on head {h} of {heads}\n(causal(), N = {n}; blank: masked)",
                     fontsize=10, loc="left")
        ax.set_xlabel("key position k")
        ax.set_ylabel("query position q")
        fig.colorbar(im, ax=ax, shrink=0.85)
    x = torch.linspace(-120, 120, 481)
    capped = sd.compile(sd.full().score(sd.softcap(30.0))).score_mod(4, heads=1)(
        x, torch.tensor(0), torch.tensor(0), torch.tensor(0), torch.tensor(0))
    axes[2].plot(x.numpy(), x.numpy(), color="#999999", linestyle="--", label="score")
    axes[2].plot(x.numpy(), capped.numpy(), color="#1d3f8f", linewidth=2, label="softcap(30.0)")
    axes[2].set_title("softcap(30.0): 30·tanh(score / 30)", fontsize=10, loc="left")
    axes[2].set_xlabel("score q·k·scale")
    axes[2].legend(frameon=False)
    axes[2].grid(alpha=0.3)
    fig.savefig(path, dpi=120)
    plt.close(fig)


@block("lang-score", "language.md")
def _lang_score() -> str:
    ns: dict = {}
    exec(compile(SCORE_CODE, "<lang-score>", "exec"), ns)  # noqa: S102 (our own snippet)
    path = picture("lang_score.png", _draw_score)
    return "\n\n".join([code("python", SCORE_CODE),
                        "Score modifications change the scores of allowed pairs, never which pairs "
                        "are allowed (the counts and tiles are those of the mask):",
                        f"![alibi() on heads 0 and 7, and softcap(30.0)]({path})"])


PARSE_TEXT = "(window(64) | global_tokens(8)) - heads(strided(7), causal())"
BAD_TEXTS = ("window(3) | glob(2)", "window(3) + causal()", "__import__('os').system('ls')")


@block("lang-parse", "language.md")
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
    path = picture("lang_parse.png", lambda out: __import__("sparsedsl.draw.diagram", fromlist=["diagram"])
                   .diagram(sd.parse(PARSE_TEXT), out, seq_len=256, tile=16))
    return "\n\n".join([
        code("python", "\n".join(lines)),
        "What the parser says about bad text (it quotes the text and points at the column):",
        code("text", "\n\n".join(errors)),
        f"The expression tree of `{p}` as `sparsedsl.draw.diagram.diagram` draws it "
        f"(N = 256, 2 heads; each box: its text, pairs per head and density):",
        f"![the expression tree of {p}]({path})",
    ])


# ---------------------------------------------------------------------------------------
# docs/getting-started.md
# ---------------------------------------------------------------------------------------

QUICK = "blocks(256).local(1).within(segments([128, 128], [1, 2]))"


@block("gs-explain", "getting-started.md")
def _gs_explain() -> str:
    attn = sd.compile(sd.parse(QUICK))
    return code("text", str(attn.explain(4096, heads=8, head_dim=64, device="cpu")))


@block("gs-show", "getting-started.md")
def _gs_show() -> str:
    p = sd.window(256) | sd.global_tokens(64)
    return code("text", sd.show(p, 4096, tile=256, file=io.StringIO()))


@block("gs-count", "getting-started.md")
def _gs_count() -> str:
    c = sd.count(sd.parse(QUICK), 16384, heads=8, head_dim=64)
    return code("text", str(c))


CLI_RUNS = (
    ["count", "causal()", "--seq-len", "1000"],
    ["show", "bigbird", "--seq-len", "2048"],
    ["explain", "segments([2048, 4096], [1, 2])", "--seq-len", "16384", "--heads", "8", "--device", "cpu"],
)


def _cli(argv: list[str]) -> str:
    from sparsedsl.cli import main
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(list(argv))
    if rc != 0:
        raise RuntimeError(f"sparsedsl {' '.join(argv)} exited with {rc}")
    return buf.getvalue().rstrip()


def _shell_quote(arg: str) -> str:
    return arg if re.fullmatch(r"[\w./=-]+", arg) else f'"{arg}"'


@block("gs-cli", "getting-started.md")
def _gs_cli() -> str:
    out = []
    for argv in CLI_RUNS:
        out.append("$ sparsedsl " + " ".join(_shell_quote(a) for a in argv) + "\n" + _cli(argv))
    return code("text", "\n\n".join(out))


@block("gs-buckets", "getting-started.md")
def _gs_buckets() -> str:
    from sparsedsl.plans.flex import bucket_length
    lengths = (1000, 4096, 5000, 16000, 16385, 20000, 100000, 1_000_000)
    rows = ["| true length | padded to (128-token tiles) | padding |", "|---:|---:|---:|"]
    for n in lengths:
        b = bucket_length(n, 128)
        rows.append(f"| {fmt(n)} | {fmt(b)} | {pct((b - n) / n)} |")
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------
# docs/compiler.md
# ---------------------------------------------------------------------------------------

EXPLAIN_CASES = (
    ("full()", 4096, 8),
    ("window(256) | global_tokens(64)", 4096, 8),
    ("segments([512, 1024], [1, 2])", 4096, 8),
    (QUICK, 4096, 8),
)


@block("compiler-explain", "compiler.md")
def _compiler_explain() -> str:
    parts = []
    for text, n, h in EXPLAIN_CASES:
        plan = sd.compile(sd.parse(text)).explain(n, heads=h, head_dim=64, device="cpu")
        parts.append(f'>>> print(sd.compile(sd.parse("{text}")).explain({n}, heads={h}, '
                     f'head_dim=64, device="cpu"))\n{plan}')
    return code("text", "\n\n".join(parts))


@block("compiler-choice", "compiler.md")
def _compiler_choice() -> str:
    from sparsedsl.compiler.module import LATTICE_ADVANTAGE, _tile_computed_pairs
    cpu = torch.device("cpu")
    rows = ["| pattern (4,096 tokens, 8 heads, CPU) | useful pairs | tile plan computes | lattice plan would compute | tile / lattice | plan |",
            "|---|---:|---:|---:|---:|---|"]
    for text, n, h in EXPLAIN_CASES[1:]:
        m = sd.compile(sd.parse(text))
        plan = m.explain(n, heads=h, head_dim=64, device=cpu)
        tile = _tile_computed_pairs("gather", m.lowering(n, heads=h, device=cpu), h)
        lat = m.lattice_plan(n, n, h, cpu)
        if lat is None:
            lat_text, ratio = "does not apply", "–"
        else:
            pairs = m._lattice_computed_pairs(lat, n, cpu, torch.float32)
            lat_text, ratio = fmt(pairs), f"{tile / pairs:.2f}"
        rows.append(f"| `{cell(text)}` | {fmt(plan.pairs)} | {fmt(tile)} | {lat_text} | {ratio} | {plan.kind} |")
    return "\n".join(rows) + (f"\n\nThe lattice plan is chosen when tile / lattice > {LATTICE_ADVANTAGE}.")


@block("compiler-logic", "compiler.md")
def _compiler_logic() -> str:
    from sparsedsl.passes import tiles as t
    names = {t.EMPTY: "EMPTY", t.PARTIAL: "PARTIAL", t.UNKNOWN: "UNKNOWN", t.FULL: "FULL"}
    states = [t.EMPTY, t.PARTIAL, t.UNKNOWN, t.FULL]

    def table(op, symbol):
        rows = [f"| `a {symbol} b` | " + " | ".join(f"b = {names[s]}" for s in states) + " |",
                "|---|" + "---|" * len(states)]
        for a in states:
            cells = [names[int(op(torch.tensor([a], dtype=torch.int8), torch.tensor([b], dtype=torch.int8))[0])]
                     for b in states]
            rows.append(f"| a = {names[a]} | " + " | ".join(cells) + " |")
        return "\n".join(rows)

    comp = ["| `a` | " + " | ".join(names[s] for s in states) + " |", "|---|" + "---|" * len(states),
            "| `~a` | " + " | ".join(names[int(t.complement(torch.tensor([s], dtype=torch.int8))[0])]
                                     for s in states) + " |"]
    return "\n\n".join([table(t.union, "|"), table(t.intersection, "&"), "\n".join(comp)])


@block("compiler-blockmask", "compiler.md")
def _compiler_blockmask() -> str:
    m = sd.compile(sd.window(100) | sd.global_tokens(64))
    drawn = str(m.block_mask(1024))  # BlockMask.__str__ draws the blocks
    return code("text", "\n".join(line.rstrip() for line in drawn.splitlines()))


@block("compiler-states", "compiler.md")
def _compiler_states() -> str:
    from sparsedsl.passes import tiles as t
    from sparsedsl.passes.context import Context
    rows = ["| pattern (N = 4,096, 128×128 tiles) | decided by structure | left UNKNOWN, refined by the `mask_mod` | full | partial | empty |",
            "|---|---:|---:|---:|---:|---:|"]
    for text in ("window(256) | global_tokens(64)", "causal() & window(1024, 0)",
                 QUICK, "dilated(512, 2) | window(64)"):
        p = sd.parse(text)
        heads = head_group_count(p)
        ctx = Context.make(p, 4096, None, heads)
        grid = t.TileGrid(4096, 4096, 128, 128)
        raw = t.classify(p, ctx, grid, range(grid.num_q_tiles))
        raw = raw.expand(1, heads, -1, -1)
        unknown = int((raw == t.UNKNOWN).sum())
        c = sd.count(p, 4096, heads=heads)
        total = c.tiles.total
        rows.append(f"| `{cell(text)}` | {fmt(total - unknown)} | {fmt(unknown)} | {fmt(c.tiles.full)} | "
                    f"{fmt(c.tiles.partial)} | {fmt(c.tiles.empty)} |")
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------
# docs/migration.md
# ---------------------------------------------------------------------------------------

GUIDE_N, GUIDE_BLOCK = 16384, 256
SEGS = "segments([128, 128], [1, 2])"


def _active(p, n=GUIDE_N, tile=GUIDE_BLOCK) -> int:
    c = sd.count(p, n, tile=tile)
    return c.tiles.full + c.tiles.partial


@block("migration-active", "migration.md")
def _migration_active() -> str:
    total = (GUIDE_N // GUIDE_BLOCK) ** 2
    rows = ["| `pattern_type` (`sparsity_ratio=0.1`, `block_size=256`) | `SparsePatternConfig(...).block_pattern(16384)` | active blocks of 4,096 | fraction |",
            "|---|---|---:|---:|"]
    snippet = ["import sparsedsl as sd", ""]
    for kind in ("local_window", "dilated_sparse", "global_local"):
        p = sd.SparsePatternConfig(kind, 0.1, GUIDE_BLOCK).block_pattern(GUIDE_N)
        a = _active(p)
        rows.append(f"| `{kind}` | `{cell(str(p))}` | **{fmt(a)}** | {pct(a / total)} |")
        snippet += [f'p = sd.SparsePatternConfig("{kind}", sparsity_ratio=0.1, block_size=256).block_pattern(16384)',
                    f"c = sd.count(p, 16384, tile=256)",
                    f"assert str(p) == {str(p)!r}",
                    f"assert c.tiles.full + c.tiles.partial == {a}", ""]
    seed = sd.blocks(GUIDE_BLOCK).local(0)
    a = _active(seed)
    rows.append(f"| the seed library's `local_window` (ratio ignored) | `{seed}` | **{fmt(a)}** | {pct(a / total)} |")
    rows.append(f"| the guide's claim | | ~410 | 10% |")
    return code("python", "\n".join(snippet)) + "\n\n" + "\n".join(rows)


@block("migration-interactions", "migration.md")
def _migration_interactions() -> str:
    one = sd.count(sd.parse(f"blocks(256).within({SEGS})"), 256, heads=2)
    g0, g1 = one.per_head
    mean = (g0 + g1) / 2
    dense_block = 256 * 256
    snippet = code("python", "\n".join([
        "import sparsedsl as sd",
        "",
        f'block = sd.count(sd.parse("blocks(256).within({SEGS})"), 256, heads=2)',
        f"assert block.per_head == {one.per_head}  # head group 0, head group 1",
        f"assert sum(block.per_head) / 2 / (256 * 256) == {mean / dense_block}",
    ]))
    table = "\n".join([
        "| head group | rule inside a 256-token block | interactions per block and head |",
        "|---|---|---:|",
        f"| 0 | `dilated(128, 1)`: each 128-token half attends to itself | **{fmt(g0)}** |",
        f"| 1 | `dilated(128, 2, 1)`: odd positions of each half attend to each other | **{fmt(g1)}** |",
        f"| mean per head | | **{fmt(int(mean))}** of {fmt(dense_block)} ({pct(mean / dense_block)}, "
        f"**{pct(1 - mean / dense_block)} fewer**) |",
        "| the guide's claim | | ~49,152 (25% fewer) |",
    ])
    # At the guide's length: our pattern and the seed library's diagonal, with and without segments.
    rows = ["| pattern at 16,384 tokens (2 heads: one per group) | pairs, head group 0 | head group 1 | "
            "mean per head | 128-token tiles a tile kernel computes, per head | computed / useful |",
            "|---|---:|---:|---:|---:|---:|"]
    for text in ("blocks(256).local(3)", f"blocks(256).local(3).within({SEGS})",
                 "blocks(256).local(0)", f"blocks(256).local(0).within({SEGS})"):
        c = sd.count(sd.parse(text), GUIDE_N, heads=2)
        computed = (c.tiles.full + c.tiles.partial) / 2
        rows.append(f"| `{text}` | {fmt(c.per_head[0])} | {fmt(c.per_head[1])} | {fmt(c.pairs // 2)} | "
                    f"{fmt(int(computed))} | {c.computed_flops / c.useful_flops:.2f} |")
    return "\n\n".join([snippet, table, "\n".join(rows)])


@block("migration-claims", "migration.md")
def _migration_claims() -> str:
    total = (GUIDE_N // GUIDE_BLOCK) ** 2
    ours = _active(sd.SparsePatternConfig("local_window", 0.1, GUIDE_BLOCK).block_pattern(GUIDE_N))
    seed = _active(sd.blocks(GUIDE_BLOCK).local(0))
    one = sd.count(sd.parse(f"blocks(256).within({SEGS})"), 256, heads=2)
    mean = one.pairs / 2
    plain = sd.count(sd.parse("blocks(256).local(3)"), GUIDE_N, heads=2)
    dil = sd.count(sd.parse(f"blocks(256).local(3).within({SEGS})"), GUIDE_N, heads=2)
    tiles_plain = plain.tiles.full + plain.tiles.partial
    tiles_dil = dil.tiles.full + dil.tiles.partial
    _, rows = _performance_rows()
    guide = rows["seed-guide-shape"]
    fwd_col = next(c for c in guide if c.startswith("fwd ms"))
    return "\n".join([
        "| the guide says | counted or measured |",
        "|---|---|",
        f"| 64 × 64 = 4,096 block pairs at 16,384 tokens | {fmt(total)} (true) |",
        f"| \"~410 active blocks (10%)\" | the seed library's `local_window`: **{seed}** "
        f"({pct(seed / total)}; it ignores `sparsity_ratio`); sparsedsl's: **{ours}** ({pct(ours / total)}) |",
        f"| \"each block: 256² = 65,536 operations\" | 65,536 pairs per block and head (true) |",
        f"| \"dilated block: ~49,152 (25% reduction)\" | **{fmt(int(mean))}** per head on average "
        f"({fmt(one.per_head[0])} and {fmt(one.per_head[1])} for the two head groups): "
        f"**{pct(1 - mean / 65536)} fewer** |",
        f"| \"Total: 26.8M operations\" (410 × 65,536) | per head: {fmt(seed * 65536)} for the seed "
        f"library's 64 blocks, {fmt(plain.pairs // 2)} for sparsedsl's {ours} |",
        f"| \"Total: 20.1M operations, 25% fewer\" | per head, mean of the two groups: "
        f"{fmt(seed * int(mean))} (seed library's blocks), {fmt(dil.pairs // 2)} (sparsedsl's): "
        f"{pct(1 - dil.pairs / plain.pairs)} fewer useful pairs |",
        f"| \"FLOPs: ~25% reduction\" | a 128-token tile kernel computes {fmt(tiles_dil // 2)} tiles per head "
        f"instead of {fmt(tiles_plain // 2)} ({pct(1 - tiles_dil / tiles_plain)} fewer), "
        f"{dil.computed_flops / dil.useful_flops:.2f}× the useful FLOPs |",
        f"| \"Speed: Fastest\" (`BlockSparseAttention`) | the seed library: {SEED_LIBRARY_MS} ms at the "
        f"guide's shape (issue 3); sparsedsl: {guide[fwd_col].split('/')[0].strip()} ms on the H100 "
        f"(`docs/performance.md`) |",
    ])


SEED_SOFTMAX_CODE = '''\
import torch
import sparsedsl as sd

torch.manual_seed(0)
n, block, dim = 16, 4, 8
pattern = sd.blocks(block).local(1)         # query block i sees key blocks i-1, i, i+1
q, k = torch.randn(n, dim), torch.randn(n, dim)
scale = dim ** -0.5
allowed = sd.dense(pattern, n)[0]           # [n, n] bool

# The seed library's rule: one softmax per active block pair, summed into the rows.
seed = torch.zeros(n, n)
for i in range(n // block):
    for j in range(n // block):
        rows, cols = slice(i * block, (i + 1) * block), slice(j * block, (j + 1) * block)
        if allowed[rows, cols].any():
            seed[rows, cols] += torch.softmax(q[rows] @ k[cols].T * scale, dim=-1)

# sparsedsl: one softmax over each row's allowed keys (attention with V = I gives the weights).
attn = sd.compile(pattern, block_size=16)
exact = attn(q[None, None], k[None, None], torch.eye(n)[None, None])[0, 0]
reference = torch.softmax((q @ k.T * scale).masked_fill(~allowed, float("-inf")), dim=-1)
'''


def _runs(values: list[int]) -> str:
    """``[2, 2, 3]`` as ``[2.0] * 2 + [3.0] * 1``."""
    runs: list[list] = []
    for v in values:
        if runs and runs[-1][0] == v:
            runs[-1][1] += 1
        else:
            runs.append([v, 1])
    return " + ".join(f"[{float(v)}] * {k}" for v, k in runs)


def _seed_softmax() -> dict:
    ns: dict = {}
    exec(compile(SEED_SOFTMAX_CODE, "<seed-softmax>", "exec"), ns)  # noqa: S102 (our own snippet)
    return ns


def _draw_softmax(path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = _seed_softmax()
    seed, exact, n, block = ns["seed"], ns["exact"], ns["n"], ns["block"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.4), layout="constrained",
                             gridspec_kw={"width_ratios": [1, 1, 0.8]})
    vmax = float(max(seed.max(), exact.max()))
    cmap = matplotlib.colormaps["magma_r"].copy()
    cmap.set_bad("#d9d9d9")  # masked pairs: grey, apart from small weights
    allowed = ns["allowed"]
    for ax, w, title in ((axes[0], seed, "seed library: softmax per block pair, summed"),
                         (axes[1], exact, "sparsedsl: one softmax per row")):
        shown = w.masked_fill(~allowed, float("nan"))
        im = ax.imshow(shown.numpy(), cmap=cmap, vmin=0, vmax=vmax, interpolation="nearest")
        for e in range(block, n, block):
            ax.axhline(e - 0.5, color="#1d3f8f", linewidth=0.8)
            ax.axvline(e - 0.5, color="#1d3f8f", linewidth=0.8)
        ax.set_title(f"{title}\nweights; N = {n}, blocks of {block}; grey: masked", fontsize=10, loc="left")
        ax.set_xticks(range(0, n, 2))
        ax.set_yticks(range(0, n, 2))
        ax.set_xlabel("key position k")
        ax.set_ylabel("query position q")
    fig.colorbar(im, ax=axes[:2], shrink=0.85, label="weight")
    rows = torch.arange(n)
    axes[2].barh(rows - 0.2, seed.sum(-1).numpy(), height=0.4, color="#d62728", label="seed library")
    axes[2].barh(rows + 0.2, exact.sum(-1).numpy(), height=0.4, color="#1d3f8f", label="sparsedsl")
    axes[2].invert_yaxis()
    axes[2].set_yticks(rows.tolist())
    axes[2].set_title("sum of each row's weights", fontsize=10, loc="left")
    axes[2].set_xlabel("row sum")
    axes[2].set_ylabel("query position q")
    axes[2].axvline(1, color="#444444", linestyle="--", linewidth=0.8)
    axes[2].set_xlim(0, 3.3)
    axes[2].legend(frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
    fig.savefig(path, dpi=120)
    plt.close(fig)


@block("migration-softmax", "migration.md")
def _migration_softmax() -> str:
    ns = _seed_softmax()
    seed, exact, reference, n, block = ns["seed"], ns["exact"], ns["reference"], ns["n"], ns["block"]
    seed_sums = [round(x) for x in seed.sum(-1).tolist()]
    error = float((exact - reference).abs().max())
    assert max(abs(a - b) for a, b in zip(seed.sum(-1).tolist(), seed_sums)) < 1e-5
    assert error < 1e-5
    checks = "\n".join([
        "",
        f"assert torch.allclose(seed.sum(-1), torch.tensor({_runs(seed_sums)}))",
        "assert torch.allclose(exact.sum(-1), torch.ones(n))",
        "assert torch.allclose(exact, reference, atol=1e-6)",
    ])
    row = 5
    blocks_seen = [j for j in range(n // block)
                   if bool(ns["allowed"][row, j * block:(j + 1) * block].any())]
    mass_seed = [float(seed[row, j * block:(j + 1) * block].sum()) for j in blocks_seen]
    mass_exact = [float(exact[row, j * block:(j + 1) * block].sum()) for j in blocks_seen]
    table = ["| query rows | key blocks seen | seed: row sum of weights | sparsedsl: row sum |",
             "|---|---:|---:|---:|"]
    for i in range(n // block):
        r = slice(i * block, (i + 1) * block)
        seen = sum(1 for j in range(n // block)
                   if bool(ns["allowed"][i * block, j * block:(j + 1) * block].any()))
        table.append(f"| {i * block}–{(i + 1) * block - 1} | {seen} | "
                     f"{float(seed[r].sum(-1).mean()):.4f} | {float(exact[r].sum(-1).mean()):.4f} |")
    mass = ["| key block | " + " | ".join(f"{j * block}–{(j + 1) * block - 1}" for j in blocks_seen) + " |",
            "|---|" + "---:|" * len(blocks_seen),
            "| seed library | " + " | ".join(f"{m:.3f}" for m in mass_seed) + " |",
            "| sparsedsl (exact) | " + " | ".join(f"{m:.3f}" for m in mass_exact) + " |"]
    path = picture("migration_softmax.png", _draw_softmax)
    return "\n\n".join([
        code("python", SEED_SOFTMAX_CODE + checks),
        "\n".join(table),
        f"Where the weight of row {row} goes, block by block (it sees {len(blocks_seen)} blocks):",
        "\n".join(mass),
        f"sparsedsl's weights equal the dense masked softmax to {error:.1e}.",
        f"![the seed library's summed per-block softmax against one softmax per row]({path})",
    ])


def _performance_rows() -> tuple[str, dict[str, dict[str, str]]]:
    """The run line and the rows of the first table of docs/performance.md, by case name.
    (A cell may hold an unescaped ``|`` inside backticks, so cells are split outside
    backticks only.)"""
    text = (DOCS / "performance.md").read_text()
    run = re.search(r"Latest run: \*\*(.+?)\*\*", text)
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("| case |"))
    cols = _cells(lines[start])
    rows: dict[str, dict[str, str]] = {}
    for ln in lines[start + 2:]:
        if not ln.startswith("|"):
            break
        cells = _cells(ln)
        if len(cells) == len(cols):
            rows[cells[0]] = dict(zip(cols, cells))
    return (run.group(1) if run else "see docs/performance.md"), rows


def _cells(line: str) -> list[str]:
    cells, current, quoted = [], "", False
    for ch in line.strip()[1:-1]:
        if ch == "`":
            quoted = not quoted
        if ch == "|" and not quoted:
            cells.append(current.strip())
            current = ""
        else:
            current += ch
    return cells + [current.strip()]


#: From issue 3, measured by its author (H100, bf16, torch 2.11, in one process).
SEED_LIBRARY_MS = 23.6


@block("migration-speed", "migration.md")
def _migration_speed() -> str:
    run, rows = _performance_rows()
    fwd_col = next(c for c in next(iter(rows.values())) if c.startswith("fwd ms"))
    fb_col = next(c for c in next(iter(rows.values())) if c.startswith("fwd+bwd ms"))
    out = [f"From `docs/performance.md` (**{run}**; back-to-back calls, median of 10 samples):", "",
           "| case | pattern | plan | forward ms: sparsedsl / dense SDPA / hand-written flex | "
           "forward+backward ms: sparsedsl / dense / flex |",
           "|---|---|---|---|---|"]
    for case in ("seed-guide-shape", "seed-block-dilated-16k"):
        r = rows[case]
        out.append(f"| `{case}` | {cell(r['pattern'])} | {r['plan']} | {r[fwd_col]} | {r[fb_col]} |")
    guide = rows["seed-guide-shape"]
    ours = float(guide[fwd_col].split("/")[0])
    config = sd.SparsePatternConfig("local_window", 0.1, GUIDE_BLOCK).block_pattern(GUIDE_N)
    out += ["", f"The seed library's own `BlockSparseAttention` at the guide's shape (2 × 16,384 × 8 "
                f"× 64): **{SEED_LIBRARY_MS} ms** forward, measured by the issue author (issue 3, "
                f"H100, torch 2.11). sparsedsl's {ours} ms at that shape is "
                f"**{SEED_LIBRARY_MS / ours:.0f}× faster**. It computes the {_active(config)} blocks "
                f"of `{config}`, where the seed library's `local_window` has "
                f"{_active(sd.blocks(GUIDE_BLOCK).local(0))}. The two times come from different runs "
                f"on the same kind of GPU, and sparsedsl's is taken back to back (calls queued as in "
                f"a training loop): an isolated call also pays its host time, about 0.15 ms here "
                f"(`docs/performance.md`)."]
    return "\n".join(out)


def _migration_pictures() -> str:
    p_block = picture("migration_block.png", lambda out: render_png(
        sd.parse(f"blocks(256).within({SEGS})"), 256, out, heads=2, tile=32, zoom=(96, 160, 96, 160)))
    p_seed = picture("migration_seed_diagonal.png", lambda out: render_png(
        sd.parse(f"blocks(256).local(0).within({SEGS})"), GUIDE_N, out, heads=2, tile=128,
        zoom=(0, 512, 0, 512)))
    p_ours = picture("migration_local3.png", lambda out: render_png(
        sd.parse(f"blocks(256).local(3).within({SEGS})"), GUIDE_N, out, heads=2, tile=128,
        zoom=(0, 512, 0, 512)))
    return "\n\n".join([
        f"One 256-token block, `blocks(256).within({SEGS})`, both head groups (32-token tiles; "
        f"the zoom straddles the edge between the two 128-token segments):",
        f"![one block of the seed's dilated rule]({p_block})",
        f"The seed library's `local_window` at 16,384 tokens (the diagonal), with the segments "
        f"(128-token tiles, as a kernel sees them):",
        f"![the diagonal of 64 blocks]({p_seed})",
        f"`SparsePatternConfig(\"local_window\", 0.1, 256)` at 16,384 tokens with the segments "
        f"(`BlockSparseDilatedAttention` here; 128-token tiles):",
        f"![blocks(256).local(3) with segments]({p_ours})",
    ])


block("migration-pictures", "migration.md")(_migration_pictures)


# ---------------------------------------------------------------------------------------
# docs/catalog.md
# ---------------------------------------------------------------------------------------

CATALOG_DOC_IDS = "torch.repeat_interleave(torch.arange(4), torch.tensor([1000, 600, 1500, 996]))"

#: The calls shown per entry (``sd.load`` arguments); the picture is of the last one.
CATALOG_CALLS: dict[str, list[dict]] = {
    "local_window": [{}],
    "dilated_sparse": [{}],
    "global_local": [{}],
    "block_sparse_dilated": [{}],
    "sliding_window": [{}, {"window": 1024}],
    "longformer": [{}],
    "bigbird": [{}],
    "sparse_transformer_strided": [{}],
    "sparse_transformer_fixed": [{}],
    "longnet": [{}],
    "prefix_lm": [{}],
    "document_mask": [{}],
    "block_causal": [{}],
    "neighbourhood_1d": [{}],
}
CATALOG_N = 4096


def _call_text(name: str, params: dict) -> str:
    args = [f'"{name}"'] + [f"{k}={v!r}" for k, v in params.items()]
    return f"sd.load({', '.join(args)})"


def _catalog_buffers(pattern) -> dict:
    return {"doc_ids": eval(CATALOG_DOC_IDS, {"torch": torch})} if pattern.buffer_names() else {}  # noqa: S307


def _source(doc: str) -> str:
    m = re.search(r"Source:(.*?)(?:\n\s*\n|$)", doc, re.S)
    return rst_to_md(" ".join(m.group(1).split())) if m else ""


def _catalog_entry(name: str) -> tuple[str, str]:
    from sparsedsl import patterns
    fn = patterns.CATALOG[name]
    doc = inspect.getdoc(fn) or ""
    about = [rst_to_md(p) for p in paragraphs(doc) if not p.startswith("Source:")]
    sig = f"{name}(" + ", ".join(
        f"{q.name}={q.default!r}" if q.default is not q.empty else q.name
        for q in inspect.signature(fn).parameters.values()) + ")"
    calls = CATALOG_CALLS[name]
    lines = ["import sparsedsl as sd"]
    rows = ["| call | text form | heads | pairs at 4,096 | density | 128×128 tiles | computed / useful |",
            "|---|---|---:|---:|---:|---|---:|"]
    summary = None
    for params in calls:
        p = sd.load(name, **params)
        bufs = _catalog_buffers(p)
        c = sd.count(p, CATALOG_N, **bufs)
        call = _call_text(name, params)
        rows.append(f"| `{call}` | `{cell(str(p))}` | {c.heads} | {fmt(c.pairs)} | {pct(c.density)} | {c.tiles} | "
                    f"{c.computed_flops / c.useful_flops:.2f} |")
        if bufs and "import torch" not in lines:
            lines = ["import torch"] + lines + ["", f"doc_ids = {CATALOG_DOC_IDS}"]
        lines += ["", f"p = {call}", f"assert str(p) == {str(p)!r}",
                  f"c = sd.count(p, {CATALOG_N}" + (", doc_ids=doc_ids" if bufs else "") + ")",
                  f"assert c.pairs == {c.pairs} and str(c.tiles) == {str(c.tiles)!r}"]
        summary = summary or (p, c, call)
    last = sd.load(name, **calls[-1])
    path = picture(f"catalog_{name}.png", lambda out, last=last: render_png(
        last, CATALOG_N, out, **_catalog_buffers(last)))
    doc_note = (" (`doc_ids`: four documents of 1,000, 600, 1,500 and 996 tokens)"
                if _catalog_buffers(last) else "")
    section = "\n\n".join([
        f"### `{name}`",
        f"**Source:** {_source(doc)}",
        f"**Signature:** `{sig}`",
        "\n\n".join(about),
        "\n".join(rows),
        code("python", "\n".join(lines)),
        f"![{name}: {last} at {fmt(CATALOG_N)} tokens{doc_note}]({path})",
    ])
    p, c, call = summary
    row = (f"| [`{name}`](#{name}) | {_short_source(_source(doc))} | `{cell(str(p))}` | {fmt(c.pairs)} | "
           f"{pct(c.density)} | {c.computed_flops / c.useful_flops:.2f} |")
    return row, section


def _short_source(source: str) -> str:
    m = re.search(r"arXiv:\d{4}\.\d{4,5}", source)
    head = source.split(",")[0]
    if "dilated_attention_pytorch" in source:
        return "the seed library (`dilated_attention_pytorch`)"
    return f"{head}, {m.group(0)}" if m else head


@block("catalog-entries", "catalog.md")
def _catalog() -> str:
    from sparsedsl import patterns
    rows = ["| entry | source | text form (first call below) | pairs at 4,096 | density | computed / useful |",
            "|---|---|---|---:|---:|---:|"]
    sections = []
    missing = set(patterns.CATALOG) - set(CATALOG_CALLS)
    if missing:
        raise KeyError(f"catalog entries without a docs entry in CATALOG_CALLS: {sorted(missing)}")
    for name in patterns.CATALOG:
        row, section = _catalog_entry(name)
        rows.append(row)
        sections.append(section)
    return "\n".join(rows) + "\n\n" + "\n\n".join(sections)


# ---------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------


def page_blocks(text: str) -> list[tuple[str, str]]:
    """``(name, body)`` of every generated block of a page."""
    return [(m.group("name"), m.group("body")) for m in BLOCK_RE.finditer(text)]


def fill(text: str, made: dict[str, str]) -> str:
    def replace(m):
        return f"<!-- generated:{m.group('name')} -->\n{made[m.group('name')]}\n<!-- /generated -->"
    return BLOCK_RE.sub(replace, text)


def check_coverage() -> None:
    """Every block in a page has a generator on that page, and every generator a block."""
    seen: dict[str, str] = {}
    for page in PAGES:
        for name, _ in page_blocks((DOCS / page).read_text()):
            if name not in BLOCKS:
                raise KeyError(f"docs/{page}: generated block {name!r} has no generator")
            if BLOCKS[name].page != page:
                raise KeyError(f"docs/{page}: block {name!r} belongs to docs/{BLOCKS[name].page}")
            if name in seen:
                raise KeyError(f"docs/{page}: block {name!r} appears twice")
            seen[name] = page
    unused = set(BLOCKS) - set(seen)
    if unused:
        raise KeyError(f"generators without a block in the docs: {sorted(unused)}")


def make_blocks(names=None) -> dict[str, str]:
    PICTURES.clear()
    return {name: BLOCKS[name].make().rstrip() for name in (names or BLOCKS)}


def stale_blocks(cheap_only: bool = True) -> list[str]:
    """Names of the generated blocks whose text in the docs differs from a fresh run."""
    stale = []
    for page in PAGES:
        for name, body in page_blocks((DOCS / page).read_text()):
            if name in BLOCKS and (BLOCKS[name].cheap or not cheap_only):
                if body.rstrip() != BLOCKS[name].make().rstrip():
                    stale.append(name)
    return stale


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-pictures", action="store_true", help="rewrite the blocks only")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if a generated block is out of date")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    check_coverage()
    made = make_blocks()
    if args.check:
        stale = stale_blocks(cheap_only=False)
        print("up to date" if not stale else f"stale blocks: {', '.join(stale)}")
        return 1 if stale else 0
    for page in PAGES:
        path = DOCS / page
        old = path.read_text()
        new = fill(old, made)
        if new != old:
            path.write_text(new)
            print(f"updated docs/{page}")
    print(f"{len(made)} generated blocks in {time.perf_counter() - start:.1f}s")
    if not args.no_pictures:
        IMAGES.mkdir(parents=True, exist_ok=True)
        with Progress(len(PICTURES), "pictures", unit="picture") as bar:
            for pic in PICTURES.values():
                pic.draw(IMAGES / pic.name)
                bar.update(pic.name)
        print(f"{len(PICTURES)} pictures in docs/images/")
    print(f"done in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
