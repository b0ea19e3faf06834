"""``sparsedsl.diagram``: a pattern's expression tree drawn by graphviz.

Each node of the tree is a box with what it is, its text, and the exact pairs it allows and
its density at the given lengths (a ``.within`` rule is counted on one block, on the
block-relative positions it sees). Boxes are shaded by density, light for sparse and dark
for dense. The DOT text is written here and handed to graphviz's ``dot`` program (no Python
binding needed).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import torch

from ..analysis.count import count
from ..lang import nodes as n
from ..lang.checks import PatternArgumentError, check_int
from ..lang.groups import head_groups
from ..lang.queries import head_group_count
from .output import DrawError, output_path
from .render import percent

INSTALL_HINT = ("install graphviz, which provides it: `apt-get install graphviz` (Debian, Ubuntu), "
                "`brew install graphviz` (macOS) or `conda install graphviz`")

#: Fill colours from sparse to dense.
SHADES = ["#f4f7fb", "#dce6f2", "#bcd0e8", "#8fb0d9", "#5f8cc4", "#2f62a8", "#1d3f8f"]


def _kind(node: n.Pattern) -> str:
    kinds = {
        n.Union: "union  |", n.Intersection: "intersection  &", n.Difference: "difference  −",
        n.Complement: "complement  ~", n.Heads: "head groups", n.Segments: "LongNet head groups",
        n.Scored: "score modification", n.Blocks: "block pattern", n.Documents: "documents",
        n.Sum: "multiset sum  +", n.LongNet: "LongNet (every head, every branch)",
        n.DilatedHeads: "LongNet branch",
    }
    return kinds.get(type(node), "primitive")


def _short(text: str, limit: int = 46) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def _shade(density: float) -> tuple[str, str]:
    """(fill, font colour) for a density in [0, 1]."""
    idx = min(len(SHADES) - 1, int(round(density ** 0.5 * (len(SHADES) - 1))))
    return SHADES[idx], ("white" if idx >= 4 else "black")


def _ranges(values) -> str:
    values = list(values)
    return f"head {values[0]}" if len(values) == 1 else f"heads {values[0]}-{values[-1]}"


def _count_text(node: n.Pattern, length: tuple[int, int], heads: int, tile: int, buffers: dict,
                root: bool) -> tuple[str, float]:
    """Pairs (per head, grouped into runs of equal heads) and density on a ``length =
    (q_len, kv_len)`` matrix."""
    wanted = {k: v for k, v in buffers.items() if k in node.buffer_names()}
    c = count(node, *length, heads=heads, tile=min(tile, *length), **wanted)
    if heads == 1:
        text = f"{c.pairs:,} pairs"
    elif len(set(c.per_head)) == 1:
        text = f"{c.per_head[0]:,} pairs per head"
    else:
        runs: list[list] = []
        for h, p in enumerate(c.per_head):
            if runs and runs[-1][2] == p:
                runs[-1][1] = h
            else:
                runs.append([h, h, p])
        shown = [f"{'head' if a == b else 'heads'} {a if a == b else f'{a}-{b}'}: {p:,}" for a, b, p in runs[:4]]
        text = "pairs per head, " + "; ".join(shown) + ("; …" if len(runs) > 4 else "")
    if root and heads > 1:
        text += f"\n{c.pairs:,} pairs in all {heads} heads"
    if c.per_head_with_multiplicity is not None:
        text += f"\n{c.pairs_with_multiplicity:,} with multiplicity"
    return f"{text}\ndensity {percent(c.density)}", c.density


def _wrap(text: str, width: int = 52, lines: int = 3) -> str:
    """``text`` cut into lines of at most ``width`` characters (at most ``lines``)."""
    out = []
    while text and len(out) < lines:
        if len(text) <= width:
            out.append(text)
            text = ""
            break
        cut = width
        for sep in (" | ", " & ", " - ", ".within(", ".", ", ", " "):
            pos = text.rfind(sep, 0, width)
            if pos > width // 3:
                cut = pos if sep.startswith(".") else pos + len(sep)
                break
        out.append(text[:cut].rstrip())
        text = text[cut:].lstrip()
    if text:
        out[-1] = out[-1][:width - 1] + "…"
    return "\n".join(out)


def diagram_source(pattern: n.Pattern, *, seq_len: int = 4096, kv_len: int | None = None,
                   heads: int | None = None, tile: int = 128, **buffers: torch.Tensor) -> str:
    """The DOT text :func:`diagram` draws."""
    if not isinstance(pattern, n.Pattern):
        raise PatternArgumentError(f"diagram(): argument 'pattern' must be a pattern, got {pattern!r}")
    seq_len = check_int("diagram()", "seq_len", seq_len, minimum=1)
    kv_len = seq_len if kv_len is None else check_int("diagram()", "kv_len", kv_len, minimum=1)
    tile = check_int("diagram()", "tile", tile, minimum=1)
    heads = head_group_count(pattern) if heads is None else check_int("diagram()", "heads", heads, minimum=1)
    shape = f"N = {seq_len:,}" if kv_len == seq_len else f"Q = {seq_len:,}, K = {kv_len:,}"
    lines = [
        "digraph sparsedsl {",
        '  graph [rankdir=TB, fontname="Helvetica", fontsize=13, labelloc=t, nodesep=0.35, '
        'ranksep=0.45, label="' + _escape(
            f"{_short(str(pattern), 100)}\n{shape}, {heads} head{'s' if heads > 1 else ''}; "
            f"boxes shaded by density (light: sparse, dark: dense)") + '\\n "];',
        '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=11, '
        'margin="0.18,0.08", color="#555555"];',
        '  edge [fontname="Helvetica", fontsize=10, color="#666666", fontcolor="#333333"];',
    ]
    counter = [0]

    def visit(node: n.Pattern, length: tuple[int, int], where: str, root: bool = False) -> str:
        name = f"n{counter[0]}"
        counter[0] += 1
        numbers, density = _count_text(node, length, heads, tile, buffers, root)
        fill, font = _shade(density)
        label = f"{_kind(node)}\n{_wrap(str(node))}\n{numbers}" + (f"\n{where}" if where else "")
        extra = ", penwidth=2.2" if root else ""
        lines.append(f'  {name} [label="{_escape(label)}", fillcolor="{fill}", fontcolor="{font}"{extra}];')
        edges: list[tuple[n.Pattern, tuple[int, int], str, str]] = []
        if isinstance(node, n.Heads):
            for part, group in zip(node.parts, head_groups(heads, len(node.parts))):
                edges.append((part, length, _ranges(group), where))
        elif isinstance(node, n.Segments):
            expanded = node.expand()
            for part, group in zip(expanded.parts, head_groups(heads, len(expanded.parts))):
                edges.append((part, length, _ranges(group), where))
        elif isinstance(node, n.Blocks):
            if node.within_ is not None:
                size = node.size
                edges.append((node.within_, (size, size), "within",
                              f"on one {size}×{size} block (q % {size}, k % {size})"))
        elif isinstance(node, n.Difference):
            edges.append((node.left, length, "keep", where))
            edges.append((node.right, length, "remove", where))
        else:
            for child in node.children():
                edges.append((child, length, "", where))
        for child, child_len, edge_label, child_where in edges:
            child_name = visit(child, child_len, child_where)
            attrs = f' [label="{_escape(edge_label)}"]' if edge_label else ""
            lines.append(f"  {name} -> {child_name}{attrs};")
        return name

    visit(pattern, (seq_len, kv_len), "", root=True)
    lines.append("}")
    return "\n".join(lines) + "\n"


def diagram(pattern: n.Pattern, path, *, seq_len: int = 4096, kv_len: int | None = None,
            heads: int | None = None, tile: int = 128, **buffers: torch.Tensor) -> Path:
    """Draw the expression tree of ``pattern`` to ``path`` (``.svg``, ``.png`` or ``.pdf``)
    with graphviz's ``dot``, each node labelled with its text, pairs and density on a
    ``seq_len x kv_len`` matrix (``kv_len`` defaults to ``seq_len``). Raises
    :class:`DrawError` with install instructions when ``dot`` is not on the ``PATH``.
    Returns the path written."""
    path = output_path("diagram()", path)
    source = diagram_source(pattern, seq_len=seq_len, kv_len=kv_len, heads=heads, tile=tile, **buffers)
    dot = shutil.which("dot")
    if dot is None:
        raise DrawError(f"diagram(): graphviz's `dot` program was not found on the PATH; {INSTALL_HINT}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = path.suffix.lower().lstrip(".")
    args = [dot, f"-T{fmt}", "-o", str(path)] + (["-Gdpi=130"] if fmt == "png" else [])
    done = subprocess.run(args, input=source.encode(), capture_output=True, check=False)
    if done.returncode != 0:
        raise DrawError(f"diagram(): `dot` failed ({done.returncode}): "
                        f"{done.stderr.decode(errors='replace').strip()}")
    return path
