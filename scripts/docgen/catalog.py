"""Generated blocks of ``docs/catalog.md``: every catalog entry with its source, signature,
counts at 4,096 tokens, a runnable snippet and a picture."""

from __future__ import annotations

import inspect
import re

import torch

import sparsedsl as sd

from .registry import block, cell, code, fmt, paragraphs, pct, picture, render_png, rst_to_md
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
    "longnet_head_grouped": [{}],
    "prefix_lm": [{}],
    "document_mask": [{}],
    "block_causal": [{}],
    "neighbourhood_1d": [{}],
    "neighbourhood_2d": [{"height": 64, "width": 64, "kernel_height": 13, "kernel_width": 13}],
    "dilated_sliding_window": [{}],
    "attention_sink": [{}],
    "document_prefix_lm": [{"prefix_length": 256}],
    "sliding_tile": [{"canvas": (64, 64), "kernel": (24, 24), "tile": (8, 8)}],
    "svg_spatial": [{"prompt_length": 226, "tokens_per_frame": 387, "round_width": 64}],
    "svg_temporal": [{"prompt_length": 226, "num_frames": 10, "tokens_per_frame": 387}],
    "video_sparse_attention": [{}],
    "deepspeed_fixed": [{"block": 64}, {"block": 64, "attention": "unidirectional"}],
    "deepspeed_variable": [{"block": 64, "num_random_blocks": 2, "local_window_blocks": (4, 8),
                            "global_block_indices": (0, 32)}],
    "deepspeed_bslongformer": [{"block": 64}],
    "deepspeed_bigbird": [{"block": 64}, {"block": 64, "attention": "unidirectional"}],
}
CATALOG_N = 4096
#: Drawing options per entry (the heads shown).
CATALOG_RENDER: dict[str, dict] = {"longnet": {"heads": 12, "show_heads": [0, 5, 11]}}


def _call_text(name: str, params: dict) -> str:
    args = [f'"{name}"'] + [f"{k}={v!r}" for k, v in params.items()]
    return f"sd.load({', '.join(args)})"


CATALOG_TILES = ("torch.zeros(1, 1, 64, 64, dtype=torch.bool).scatter_(-1, torch.topk(torch.rand(1, 1, 64, 64, "
                 "generator=torch.Generator().manual_seed(0)), 8).indices, True)")


def _catalog_buffers(pattern) -> dict:
    sources = {"doc_ids": CATALOG_DOC_IDS, "tiles": CATALOG_TILES}
    return {name: eval(sources[name], {"torch": torch}) for name in pattern.buffer_names()}  # noqa: S307


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
            sources = {"doc_ids": CATALOG_DOC_IDS, "tiles": CATALOG_TILES}
            lines = ["import torch"] + lines + [""] + [f"{name} = {sources[name]}" for name in bufs]
        lines += ["", f"p = {call}", f"assert str(p) == {str(p)!r}",
                  f"c = sd.count(p, {CATALOG_N}" + "".join(f", {name}={name}" for name in bufs) + ")",
                  f"assert c.pairs == {c.pairs} and str(c.tiles) == {str(c.tiles)!r}"]
        summary = summary or (p, c, call)
    last = sd.load(name, **calls[-1])
    path = picture(f"catalog_{name}.png", lambda out, last=last: render_png(
        last, CATALOG_N, out, **CATALOG_RENDER.get(name, {}), **_catalog_buffers(last)))
    notes = {"doc_ids": " (`doc_ids`: four documents of 1,000, 600, 1,500 and 996 tokens)",
             "tiles": " (`tiles`: 8 random key tiles per query tile)"}
    doc_note = "".join(notes[name] for name in _catalog_buffers(last))
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
        return "`dilated_attention_pytorch`"
    return f"{head}, {m.group(0)}" if m else head


@block("catalog-entries", "docs/catalog.md")
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


