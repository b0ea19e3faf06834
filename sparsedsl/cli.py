"""The ``sparsedsl`` command: ``show``, ``count``, ``render``, ``diagram``, ``explain`` and ``demo`` on pattern text."""

from __future__ import annotations

import argparse
import sys

from .analysis.count import count
from .catalog import pattern_from_text
from .compiler.module import compile as compile_pattern
from .demo import DEFAULT_PATTERN, run_demo
from .draw.terminal import show
from .lang.checks import PatternArgumentError
from .lang.parse import PatternSyntaxError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsedsl", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help_text: str, pattern_required: bool = True) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text)
        if pattern_required:
            sub.add_argument("pattern", help="pattern text, e.g. 'window(256) | global_tokens(16)'")
        else:
            sub.add_argument("pattern", nargs="?", default=DEFAULT_PATTERN,
                             help=f"pattern text (default: {DEFAULT_PATTERN})")
        sub.add_argument("--seq-len", type=int, default=4096, help="query length (default 4096)")
        sub.add_argument("--kv-len", type=int, default=None, help="key length (default: --seq-len)")
        sub.add_argument("--heads", type=int, default=None,
                         help="heads (default: the pattern's head-group count)")
        sub.add_argument("--tile", type=int, default=128, help="tile size (default 128)")
        return sub

    add("show", "print the tile map and counts")
    add("count", "print the exact number of allowed pairs (then details)")
    render = add("render", "draw the tile grid and a token-level zoom to a PNG or SVG file")
    render.add_argument("-o", "--output", default="render.png",
                        help="output file, .png or .svg (default render.png)")
    render.add_argument("--zoom", type=int, default=None,
                        help="side of the token-level zoom, from the top-left corner "
                             "(default: a few tiles around the first partial tile)")
    diagram = add("diagram", "draw the expression tree with graphviz to an SVG or PNG file")
    diagram.add_argument("-o", "--output", default="diagram.svg",
                         help="output file, .svg or .png (default diagram.svg)")
    explain = add("explain", "print the plan the compiler picks")
    explain.add_argument("--head-dim", type=int, default=128)
    explain.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    demo = add("demo", "compile, count and draw a pattern; check its attention on the CPU",
               pattern_required=False)
    demo.set_defaults(seq_len=2048, heads=8)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        pattern = pattern_from_text(args.pattern)
        if args.command == "show":
            show(pattern, args.seq_len, args.kv_len, heads=args.heads, tile=args.tile)
        elif args.command == "count":
            counts = count(pattern, args.seq_len, args.kv_len, heads=args.heads, tile=args.tile)
            print(counts.pairs)
            print(counts)
        elif args.command in ("render", "diagram"):
            from .draw.render import DrawError
            try:
                if args.command == "render":
                    from .draw.render import render
                    written = render(pattern, args.seq_len, args.output, kv_len=args.kv_len,
                                     heads=args.heads, tile=args.tile, zoom=args.zoom)
                else:
                    from .draw.diagram import diagram
                    written = diagram(pattern, args.output, seq_len=args.seq_len, heads=args.heads,
                                      tile=args.tile)
            except DrawError as err:
                print(f"sparsedsl {args.command}: {err}", file=sys.stderr)
                return 3
            print(f"wrote {written}")
        elif args.command == "explain":
            module = compile_pattern(pattern, block_size=args.tile)
            print(module.explain(args.seq_len, args.kv_len, heads=args.heads,
                                 head_dim=args.head_dim, device=args.device))
        elif args.command == "demo":
            error = run_demo(str(pattern), args.seq_len, args.heads or 8, tile=args.tile)
            if error > 1e-4:
                print(f"demo: error {error:.2e} exceeds 1e-4", file=sys.stderr)
                return 1
    except (PatternSyntaxError, PatternArgumentError, ValueError) as err:
        print(f"sparsedsl {args.command}: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
