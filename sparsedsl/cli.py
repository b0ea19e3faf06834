"""The ``sparsedsl`` command line: argument parsing and error reporting.

This module imports nothing heavy, so ``sparsedsl --help`` answers at once; the commands
themselves live in :mod:`sparsedsl.commands` and import torch when they run. A mistake in
what the user typed (pattern text, sizes, tensors, device, output path, a size over the
memory budget) ends with one line on stderr and exit code 2; a missing drawing tool with
exit code 3.
"""

from __future__ import annotations

import argparse
import re
import sys

DESCRIPTION = """\
Count, draw and compile sparse attention patterns written in the sparsedsl language.
PATTERN is pattern text such as "window(256) | global_tokens(64)", a catalog name such
as "bigbird" (see: sparsedsl catalog), or both combined."""

EPILOG = """\
examples:
  sparsedsl count "causal()" --seq-len 1000
  sparsedsl show bigbird --seq-len 8192
  sparsedsl render "segments([2048, 4096], [1, 2])" --seq-len 65536 -o longnet.pdf
  sparsedsl count document_mask --documents doc_ids=1000,600,1500 --json
  sparsedsl explain "window(256)" --seq-len 16384 --heads 16 --json

exit codes: 0 done, 2 a mistake in the arguments (one line on stderr), 3 a drawing tool
(matplotlib, graphviz) is missing."""

DEMO_PATTERN = "blocks(256).local(1).within(segments([128, 128], [1, 2]))"
DEFAULT_SEQ_LEN = 4096


class UsageError(argparse.ArgumentTypeError):
    """A command-line value that cannot be read (argparse names the argument)."""


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line and exit code 2."""

    def error(self, message: str):  # noqa: D401 (argparse's hook)
        print(f"{self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


# ---------------------------------------------------------------------------------------
# Values the user types
# ---------------------------------------------------------------------------------------


def _integers(text: str) -> list[int]:
    cleaned = text.replace("_", "")
    if not re.fullmatch(r"\s*-?\d+(\s*[,\s]\s*-?\d+)*\s*", cleaned):
        raise ValueError(text)
    return [int(v) for v in re.split(r"[,\s]+", cleaned.strip())]


def positive_int(text: str) -> int:
    """A size given on the command line: a positive integer (``1_024`` allowed); argparse
    names the option in its error."""
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def parse_zoom(text: str) -> int | tuple[int, int, int, int]:
    """``--zoom``: ``512`` (the top-left 512 x 512 corner), ``0:512`` (that range on both
    axes), ``1000:2000,0:4096`` (query range, key range) or ``1000,2000,0,4096``;
    brackets and spaces are ignored."""
    body = re.sub(r"[()\[\]\s]", "", text)
    try:
        if ":" in body:
            ranges = [tuple(int(v.replace("_", "")) for v in part.split(":")) for part in body.split(",")]
            if len(ranges) == 1:
                ranges *= 2
            (q0, q1), (k0, k1) = ranges
            return q0, q1, k0, k1
        values = [int(v.replace("_", "")) for v in body.split(",")]
        if len(values) == 1:
            return values[0]
        q0, q1, k0, k1 = values
        return q0, q1, k0, k1
    except ValueError:
        raise UsageError(
            f"expected a size (512), a range for both axes (0:512), query "
            f"and key ranges (1000:2000,0:4096) or four numbers (1000,2000,0,4096), got {text!r}") from None


def parse_heads_list(text: str) -> list[int]:
    """``--show-heads 0,3`` (or ``"0 3"``)."""
    try:
        return _integers(text)
    except ValueError:
        raise UsageError(f"expected head indices such as 0,3, got {text!r}") from None


def parse_size(text: str) -> tuple[float, float]:
    """``--size 6x4`` (inches; ``6,4`` too)."""
    parts = re.split(r"[x×,]", text.lower().replace(" ", ""))
    try:
        width, height = (float(v) for v in parts)
        return width, height
    except ValueError:
        raise UsageError(f"expected WIDTHxHEIGHT in inches such as 6x4, got {text!r}") from None


def parse_documents(texts: list[str]) -> dict[str, list[int]]:
    """``--documents doc_ids=1000,600,1500`` (repeatable; ``NAME=`` may be left out when
    the pattern names one document tensor): document lengths per name. The key ``""``
    holds lengths given without a name."""
    out: dict[str, list[int]] = {}
    for text in texts:
        name, _, lengths = text.rpartition("=")
        try:
            values = _integers(lengths)
        except ValueError:
            raise ValueError(
                f"argument --documents: expected [NAME=]LENGTH,LENGTH,... such as "
                f"doc_ids=1000,600,1500, got {text!r}") from None
        if any(v < 1 for v in values):
            raise ValueError(f"argument --documents: document lengths must be positive, got {text!r}")
        if name.strip() in out:
            raise ValueError(f"argument --documents: {name.strip() or 'unnamed lengths'} given twice")
        out[name.strip()] = values
    return out


# ---------------------------------------------------------------------------------------
# The parser
# ---------------------------------------------------------------------------------------


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sparsedsl")
    except PackageNotFoundError:  # a source checkout run with PYTHONPATH=.
        from pathlib import Path

        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        found = re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(), re.M) if pyproject.is_file() else None
        return found.group(1) if found else "unknown"


class _Version(argparse.Action):
    """``--version``, read only when asked for."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, help="print the version and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"sparsedsl {_version()}")
        raise SystemExit(0)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sparsedsl", description=DESCRIPTION, epilog=EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action=_Version)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     parser_class=_Parser)

    def add(name: str, summary: str, *, pattern: bool = True, seq_len: int | None = None,
            heads: str = "the pattern's head-group count", shapes: bool = True) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=summary, description=summary)
        if pattern:
            sub.add_argument("pattern", metavar="PATTERN",
                             help="pattern text or catalog name, e.g. 'window(256) | global_tokens(16)'")
        length = "the sum of --documents lengths if given, else 4096" if seq_len is None else f"{seq_len}"
        sub.add_argument("--seq-len", type=positive_int, default=seq_len, metavar="N",
                         help=f"query length (default: {length})")
        sub.add_argument("--heads", type=positive_int, default=None, metavar="H", help=f"number of heads (default: {heads})")
        sub.add_argument("--tile", type=positive_int, default=128, metavar="T",
                         help="tile size in tokens (default: 128)")
        if not shapes:
            sub.set_defaults(kv_len=None, documents=[])
            return sub
        sub.add_argument("--kv-len", type=positive_int, default=None, metavar="N",
                         help="key length (default: --seq-len)")
        sub.add_argument("--documents", action="append", default=[], metavar="[NAME=]L1,L2,...",
                         help="document lengths for a documents(NAME) pattern (repeat per name; "
                              "NAME may be left out when the pattern names one)")
        return sub

    show = add("show", "print the tile map (full / partial / empty tiles) and the counts")
    show.add_argument("--width", type=positive_int, default=64, help="most characters per map row (default: 64)")

    count = add("count", "print the exact number of allowed pairs, then tiles and FLOPs")
    count.add_argument("--head-dim", type=positive_int, default=128, metavar="D",
                       help="head dimension for the FLOP counts (default: 128)")
    count.add_argument("--json", action="store_true", help="print one JSON object instead")

    explain = add("explain", "print the plan the compiler picks, and why")
    explain.add_argument("--head-dim", type=positive_int, default=128, metavar="D", help="head dimension (default: 128)")
    explain.add_argument("--device", default=None,
                         help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    explain.add_argument("--json", action="store_true", help="print one JSON object instead")

    render = add("render", "draw the pattern to a PNG, SVG or PDF file (matplotlib)")
    render.add_argument("-o", "--output", default="pattern.png", metavar="FILE",
                        help="output file; .png, .svg or .pdf chooses the format (default: pattern.png)")
    render.add_argument("--view", choices=("tokens", "tiles", "scores"), default="tokens",
                        help="tokens: each cell shaded by its share of allowed pairs (default); "
                             "tiles: full / partial / empty tiles as a kernel computes them; "
                             "scores: scores and attention weights of one head on random inputs "
                             "(at most 4096 tokens a side)")
    render.add_argument("--show-heads", type=parse_heads_list, default=None, metavar="0,3",
                        help="heads drawn side by side (default: one per group of heads that run "
                             "the same pattern; --view scores draws the first)")
    render.add_argument("--zoom", type=parse_zoom, default=None, metavar="REGION",
                        help="region drawn: 512 (top-left corner), 0:512 (both axes), "
                             "1000:2000,0:4096 (query range, key range) (default: the whole matrix)")
    render.add_argument("--size", type=parse_size, default=None, metavar="WxH",
                        help="figure size in inches, e.g. 6x4 (default: from the panels)")
    render.add_argument("--dpi", type=positive_int, default=200, help="resolution of PNG output (default: 200)")
    render.add_argument("--cmap", default=None,
                        help="matplotlib colormap (default: Blues; viridis for --view scores)")
    render.add_argument("--compact", action="store_true",
                        help="one small panel without titles, for a paper column")

    diagram = add("diagram", "draw the expression tree with its counts to an SVG, PNG or PDF file (graphviz)")
    diagram.add_argument("-o", "--output", default="diagram.svg", metavar="FILE",
                         help="output file; .svg, .png or .pdf chooses the format (default: diagram.svg)")

    demo = add("demo", "compile, count and draw a pattern, then check and time its attention on the CPU",
               pattern=False, seq_len=2048, heads="8", shapes=False)
    demo.add_argument("pattern", nargs="?", default=DEMO_PATTERN, metavar="PATTERN",
                      help=f"pattern text or catalog name (default: {DEMO_PATTERN})")

    catalog = commands.add_parser("catalog", help="list the catalog's named patterns and their papers",
                                  description="List the catalog's named patterns: name, what it is, source.")
    catalog.add_argument("--json", action="store_true", help="print a JSON list instead")
    from .distributed.cli import add_estimate_command  # argparse only: no torch import

    add_estimate_command(commands)
    return parser


# ---------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------


def _out_of_memory(err: BaseException) -> bool:
    text = str(err).lower()
    return isinstance(err, MemoryError) or "can't allocate memory" in text or "out of memory" in text


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    args = build_parser().parse_args(argv)
    prog = f"sparsedsl {args.command}"
    try:
        if getattr(args, "run", None) is not None:  # a command that brings its own runner
            return args.run(args)
        from . import commands

        return commands.run(args)
    except ValueError as err:  # every error of the library about its input is a ValueError
        print(f"{prog}: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # an output file that cannot be written
        where = f" {err.filename!r}" if getattr(err, "filename", None) else ""
        print(f"{prog}: cannot write{where}: {err.strerror or err}", file=sys.stderr)
        return 2
    except Exception as err:
        from .draw.output import DrawError

        if isinstance(err, DrawError):  # matplotlib or graphviz missing
            print(f"{prog}: {err}", file=sys.stderr)
            return 3
        if _out_of_memory(err):
            print(f"{prog}: not enough memory for these sizes; try a shorter --seq-len or a "
                  f"larger --tile", file=sys.stderr)
            return 2
        raise  # a bug: the traceback is wanted


if __name__ == "__main__":
    sys.exit(main())
