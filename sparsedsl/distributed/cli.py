"""``sparsedsl estimate PATTERN --seq-len N --world-size P``: the per-rank cost of
sequence-parallel attention, printed as a table (see :func:`~.costs.estimate`).

:func:`add_estimate_command` registers the subcommand on an ``argparse`` subparsers
object; the parsed arguments carry :func:`run_estimate` as ``args.run``, which prints the
table and returns the exit status (2, with the message on stderr, for bad input).
"""

from __future__ import annotations

import argparse
import sys

from ..cli import positive_int

#: ``--dtype`` values (torch dtype names); torch is imported only when the command runs.
DTYPES = ("bfloat16", "float16", "float32", "float64")


def add_estimate_command(commands) -> argparse.ArgumentParser:
    """Add ``estimate`` to ``commands`` (what ``ArgumentParser.add_subparsers`` returns)."""
    sub = commands.add_parser(
        "estimate", help="per-rank bytes, memory and FLOPs of sequence-parallel attention",
        description="Per-rank key/value traffic, memory and work of sequence-parallel attention "
                    "of a pattern, from its structure alone, with forward times from a link "
                    "bandwidth and a kernel throughput.")
    sub.add_argument("pattern", help="pattern text or catalog name, e.g. 'window(2048)' or bigbird")
    sub.add_argument("--seq-len", type=positive_int, default=1 << 20, help="sequence length (default 2**20)")
    sub.add_argument("--world-size", type=positive_int, default=8, help="ranks (default 8)")
    sub.add_argument("--heads", type=positive_int, default=16, help="query heads (default 16)")
    sub.add_argument("--kv-heads", type=positive_int, default=None, help="key/value heads (default: --heads)")
    sub.add_argument("--head-dim", type=positive_int, default=128, help="head dimension (default 128)")
    sub.add_argument("--batch", type=positive_int, default=1, help="batch size (default 1)")
    sub.add_argument("--dtype", default="bfloat16", help=f"one of {', '.join(DTYPES)} (default bfloat16)")
    sub.add_argument("--tile", type=positive_int, default=128, help="kernel tile size (default 128)")
    sub.add_argument("--zigzag", action="store_true", help="zigzag layout (two chunks per rank)")
    sub.add_argument("--link-gbps", type=float, default=50.0,
                     help="per-rank link bandwidth in GB/s (default 50)")
    sub.add_argument("--tflops", type=float, default=400.0,
                     help="attention kernel throughput in TFLOP/s (default 400)")
    sub.add_argument("--rows", type=positive_int, default=8, help="ranks listed, first and last halves (default 8)")
    sub.set_defaults(run=run_estimate)
    return sub


def run_estimate(args: argparse.Namespace) -> int:
    """Print the estimate table for parsed ``estimate`` arguments; the exit status."""
    import torch

    from ..catalog import pattern_from_text
    from ..compiler.module import compile as compile_pattern
    from .costs import estimate, table

    try:
        if args.dtype not in DTYPES:
            raise ValueError(f"argument --dtype must be one of {', '.join(DTYPES)}, got {args.dtype!r}")
        for name in ("link_gbps", "tflops"):
            if not getattr(args, name) > 0:
                raise ValueError(f"argument --{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
        if args.rows < 2:
            raise ValueError(f"argument --rows must be >= 2, got {args.rows}")
        compiled = compile_pattern(pattern_from_text(args.pattern), block_size=args.tile)
        result = estimate(compiled, args.seq_len, args.world_size, heads=args.heads, head_dim=args.head_dim,
                          dtype=getattr(torch, args.dtype), zigzag=args.zigzag, kv_heads=args.kv_heads,
                          batch=args.batch)
    except (ValueError, TypeError) as err:  # pattern syntax and argument errors included
        print(f"sparsedsl estimate: {err}", file=sys.stderr)
        return 2
    print(table(result, args.link_gbps * 1e9, args.tflops * 1e12, max_rows=args.rows))
    return 0
