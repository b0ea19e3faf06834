"""What each ``sparsedsl`` command does, given the parsed arguments (see :mod:`sparsedsl.cli`).

Every command reads its pattern and call-time tensors the same way (:func:`inputs`); the
``--json`` outputs are built from the public results (:class:`~sparsedsl.Counts`,
``CompiledPattern.explain()``) field by field. torch is imported by the commands that
need it, so ``sparsedsl catalog`` answers without it.
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import sys

from .budget import check_memory
from .catalog import pattern_from_text
from .cli import DEFAULT_SEQ_LEN, parse_documents
from .lang import nodes as n
from .lang.checks import PatternArgumentError
from .lang.queries import walk

#: Fields of ``explain()``'s result written by ``explain --json``.
PLAN_FIELDS = ("kind", "q_len", "kv_len", "heads", "head_dim", "pairs", "computed_pairs",
               "useful_flops", "computed_flops", "density", "tiles_full", "tiles_partial",
               "tiles_empty")


def run(args: argparse.Namespace) -> int:
    return COMMANDS[args.command](args)


# ---------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------


def inputs(args: argparse.Namespace) -> tuple[n.Pattern, int, dict]:
    """The pattern, the query length and the tensors bound by keyword (document ids built
    from ``--documents`` lengths)."""
    import torch

    pattern = pattern_from_text(args.pattern)
    lengths = parse_documents(args.documents)
    doc_names = sorted({node.name for node in walk(pattern) if isinstance(node, (n.Documents, n.DocumentWithin))})
    other = sorted(pattern.buffer_names() - set(doc_names))
    if other:
        raise PatternArgumentError(
            f"pattern {pattern} needs tensor(s) {other} (a .layout or bias); the command line "
            f"binds document lengths only (--documents NAME=L1,L2,...): use the Python API")
    if "" in lengths:
        if len(doc_names) != 1:
            raise PatternArgumentError(
                f"argument --documents: name the tensor (NAME=L1,L2,...); the pattern names "
                f"{doc_names or 'no documents tensor'}")
        lengths[doc_names[0]] = lengths.pop("")
    missing = sorted(set(doc_names) - lengths.keys())
    unknown = sorted(lengths.keys() - set(doc_names))
    if unknown:
        raise PatternArgumentError(
            f"argument --documents: the pattern has no documents tensor {unknown[0]!r} "
            f"(it names {doc_names or 'none'})")
    if missing:
        raise PatternArgumentError(
            f"pattern {pattern} needs document lengths for {missing}: pass --documents "
            f"{missing[0]}=L1,L2,... (lengths summing to the sequence length)")
    seq_len = args.seq_len
    if seq_len is None:
        seq_len = sum(next(iter(lengths.values()))) if lengths else DEFAULT_SEQ_LEN
    span = max(seq_len, args.kv_len or seq_len)
    if lengths:
        check_memory("argument --documents", f"the document ids of {span:,} positions", span * 8 * len(lengths))
    tensors = {}
    for name, values in lengths.items():
        if sum(values) != span:
            raise PatternArgumentError(
                f"argument --documents: the lengths for {name!r} sum to {sum(values):,}, but the "
                f"sequence has {span:,} positions (max of --seq-len and --kv-len)")
        tensors[name] = torch.repeat_interleave(torch.arange(len(values)), torch.tensor(values))
    return pattern, seq_len, tensors


def device_of(text: str | None):
    """``--device``: ``cpu``, ``cuda`` or ``cuda:N`` as a ``torch.device`` (None: the default)."""
    import torch

    if text is None:
        return None
    if not re.fullmatch(r"cpu|cuda(:\d+)?", text.strip()):
        raise PatternArgumentError(f"argument --device: expected cpu, cuda or cuda:N, got {text!r}")
    return torch.device(text.strip())


# ---------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------


def show_command(args) -> int:
    from .draw.terminal import show

    pattern, seq_len, tensors = inputs(args)
    show(pattern, seq_len, args.kv_len, heads=args.heads, tile=args.tile, width=args.width, **tensors)
    return 0


def count_command(args) -> int:
    from .analysis.count import count

    pattern, seq_len, tensors = inputs(args)
    c = count(pattern, seq_len, args.kv_len, heads=args.heads, tile=args.tile,
              head_dim=args.head_dim, **tensors)
    if args.json:
        print(json.dumps(counts_json(pattern, c)))
    else:
        print(c.pairs)
        print(c)
    return 0


def counts_json(pattern: n.Pattern, c) -> dict:
    """:class:`~sparsedsl.Counts` as plain JSON values."""
    return {
        "pattern": str(pattern), "q_len": c.q_len, "kv_len": c.kv_len, "heads": c.heads,
        "batch": c.batch, "tile": c.tile, "head_dim": c.head_dim, "pairs": c.pairs,
        "per_head": list(c.per_head), "density": c.density,
        "tiles": {"full": c.tiles.full, "partial": c.tiles.partial, "empty": c.tiles.empty},
        "useful_flops": c.useful_flops, "computed_flops": c.computed_flops,
    }


def explain_command(args) -> int:
    from .compiler.module import compile as compile_pattern

    pattern, seq_len, tensors = inputs(args)
    device = device_of(args.device)
    module = compile_pattern(pattern, block_size=args.tile)
    plan = module.explain(seq_len, args.kv_len, heads=args.heads, head_dim=args.head_dim,
                          device=device, **tensors)
    print(json.dumps(plan_json(pattern, plan)) if args.json else plan)
    return 0


def plan_json(pattern: n.Pattern, plan) -> dict:
    """What ``explain()`` returns, as plain JSON values: its fields, its text, and each
    candidate plan's cost or reasons when it lists them."""
    out = {"pattern": str(pattern)}
    for name in PLAN_FIELDS:
        value = getattr(plan, name, None)
        if value is not None:
            out[name] = value
    candidates = getattr(plan, "candidates", None)
    if candidates:
        out["candidates"] = {
            name: {"cost": _plain(getattr(c, "cost", None)),
                   "reasons": [str(r) for r in (getattr(c, "reasons", None) or ())]}
            for name, c in candidates.items()}
    out["text"] = str(plan)
    return out


def _plain(value):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def render_command(args) -> int:
    pattern, seq_len, tensors = inputs(args)
    common = dict(kv_len=args.kv_len, heads=args.heads, size=args.size, dpi=args.dpi,
                  compact=args.compact, **tensors)
    if args.view == "scores":
        from .draw.scores import render_scores

        head = args.show_heads[0] if args.show_heads else 0
        written = render_scores(pattern, seq_len, args.output, head=head, cmap=args.cmap or "viridis",
                                **common)
    else:
        from .draw.render import render

        written = render(pattern, seq_len, args.output, view=args.view, show_heads=args.show_heads,
                         zoom=args.zoom, tile=args.tile, cmap=args.cmap, **common)
    print(f"wrote {written}")
    return 0


def diagram_command(args) -> int:
    from .draw.diagram import diagram

    pattern, seq_len, tensors = inputs(args)
    written = diagram(pattern, args.output, seq_len=seq_len, kv_len=args.kv_len, heads=args.heads,
                      tile=args.tile, **tensors)
    print(f"wrote {written}")
    return 0


def demo_command(args) -> int:
    from .demo import run_demo

    pattern, seq_len, tensors = inputs(args)
    if tensors:
        raise PatternArgumentError("the demo runs patterns without tensors; use count, show or render")
    error = run_demo(str(pattern), seq_len, 8 if args.heads is None else args.heads, tile=args.tile)
    if error > 1e-4:
        print(f"sparsedsl demo: max error {error:.2e} against the dense reference exceeds 1e-4",
              file=sys.stderr)
        return 1
    return 0


def catalog_entries() -> list[dict[str, str]]:
    """Each catalog entry's ``name``, ``summary`` (the first sentence of its docstring) and
    ``source`` (the paper or library it comes from), in catalog order."""
    from . import patterns

    out = []
    for name, entry in patterns.CATALOG.items():
        paragraphs = [" ".join(p.split()) for p in (inspect.getdoc(entry) or "").split("\n\n")]
        source = next((p[len("Source:"):].strip() for p in paragraphs if p.startswith("Source:")), "")
        summary = next((p for p in paragraphs if not p.startswith("Source:")), "")
        out.append({"name": name, "summary": _first_sentence(_plain_text(summary)),
                    "source": _plain_text(source).split(";")[0].rstrip(".")})
    return out


def _plain_text(text: str) -> str:
    """Docstring markup removed: ``x`` becomes x, :class:`y` becomes y."""
    return re.sub(r"(?::\w+:)?`+~?([^`]+)`+", r"\1", text)


def _first_sentence(text: str) -> str:
    found = re.search(r"^(.+?[.:])(\s|$)", text)
    sentence = (found.group(1) if found else text).rstrip(":.")
    return sentence


def catalog_command(args) -> int:
    entries = catalog_entries()
    if args.json:
        print(json.dumps(entries, indent=1))
        return 0
    width = max(len(e["name"]) for e in entries)
    for e in entries:
        print(f"{e['name']:<{width}}  {e['summary']}")
        print(f"{'':<{width}}  {e['source']}")
    print(f"\nUse a name as a pattern (sparsedsl show bigbird), with arguments "
          f"(\"longnet(segment_lengths=[2048, 4096], dilation_rates=[1, 2])\"), or in Python: "
          f"sparsedsl.load(name, **params).")
    return 0


COMMANDS = {"show": show_command, "count": count_command, "explain": explain_command,
            "render": render_command, "diagram": diagram_command, "demo": demo_command,
            "catalog": catalog_command}
