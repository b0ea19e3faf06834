"""The generator's registry: generated blocks, pictures, the pages that hold them.

A page holds blocks between ``<!-- generated:NAME -->`` and ``<!-- /generated -->``; the
generator ``NAME`` (registered with :func:`block` by one module per page) returns the
markdown that goes between them. Pictures are registered by the blocks that show them and
drawn to ``docs/images/``. Generators use the public API (``sparsedsl.*``,
``CompiledPattern.explain()``, ``count()``) and the files of ``benchmarks/results/`` only.
"""

from __future__ import annotations

import contextlib
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import sparsedsl as sd

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
IMAGES = DOCS / "images"
#: Pages holding generated blocks, relative to the repository root.
PAGES = ("README.md", "docs/getting-started.md", "docs/language.md", "docs/compiler.md",
         "docs/migration.md", "docs/catalog.md", "docs/performance.md", "docs/counting.md",
         "benchmarks/results/README.md")
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
    """Register a picture drawn to ``docs/images/name``; returns its markdown path relative
    to ``docs/``."""
    if not re.fullmatch(r"(lang|catalog|migration|counting|readme)_[\w-]+\.(png|svg)", name):
        raise ValueError(f"picture names start with lang_, catalog_, migration_, counting_ or "
                         f"readme_ and end in .png or .svg: {name!r}")
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
    sd.render(pattern, q_len, path, dpi=kwargs.pop("dpi", 110), **kwargs)


def dense_text(pattern, q_len: int, kv_len: int | None = None, heads: int = 1, **buffers) -> str:
    """A tiny dense mask as text, one row per query (``█`` allowed, ``·`` not; a multiset's
    pairs counted ``m > 1`` times show ``m``)."""
    allowed = sd.dense(pattern, q_len, kv_len, heads=heads, **buffers)
    kv = allowed.shape[-1]
    out = []
    for h in range(allowed.shape[0]):
        if allowed.shape[0] > 1:
            out.append(f"head {h}:")
        out.append("       k=" + " ".join(str(j % 10) for j in range(kv)))
        for i in range(allowed.shape[1]):
            out.append(f"  q={i:<3}  " + " ".join("·" if not a else "█" if a == 1 else str(a) for a in allowed[h, i].tolist()))
    return "\n".join(out)




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
        for name, _ in page_blocks((ROOT / page).read_text()):
            if name not in BLOCKS:
                raise KeyError(f"{page}: generated block {name!r} has no generator")
            if BLOCKS[name].page != page:
                raise KeyError(f"{page}: block {name!r} belongs to {BLOCKS[name].page}")
            if name in seen:
                raise KeyError(f"{page}: block {name!r} appears twice")
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
        for name, body in page_blocks((ROOT / page).read_text()):
            if name in BLOCKS and (BLOCKS[name].cheap or not cheap_only):
                if body.rstrip() != BLOCKS[name].make().rstrip():
                    stale.append(name)
    return stale
