#!/usr/bin/env python
"""Regenerate every generated number and picture of the documentation.

    python scripts/make_docs.py                 # rewrite generated blocks and pictures
    python scripts/make_docs.py --no-pictures   # only the generated blocks (seconds)
    python scripts/make_docs.py --check         # exit 1 if a generated block is stale

In the pages listed in ``scripts/docgen/registry.py`` (``PAGES``), the text between
``<!-- generated:NAME -->`` and ``<!-- /generated -->`` is replaced on every run by what
generator ``NAME`` returns; everything else is written by hand. Each page's generators are
one module of ``scripts/docgen/``. Every block a page holds must have a generator and every
generator a block. Pictures are written to ``docs/images/``.

Generators use the public API and ``benchmarks/results/`` only (speed is measured on a GPU
by the benchmarks and read back from their results files). Nothing depends on the clock,
the machine or an unseeded random state, so a second run gives byte-identical markdown.
``tests/test_docs.py`` imports this module to check that the blocks are up to date.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for entry in (ROOT, ROOT / "scripts"):  # run from anywhere, with or without the editable install
    if str(entry) not in sys.path:
        sys.path.insert(0, str(entry))

from docgen import catalog, compiler, counting, getting_started, language, migration, performance, readme  # noqa: E402,F401  (they register their blocks)
from docgen.registry import (  # noqa: E402
    BLOCKS, IMAGES, PAGES, PICTURES, check_coverage, fill, make_blocks, stale_blocks)

__all__ = ["BLOCKS", "PICTURES", "check_coverage", "make_blocks", "stale_blocks", "main"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-pictures", action="store_true", help="rewrite the blocks only")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if a generated block is out of date")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    check_coverage()
    if args.check:
        stale = stale_blocks(cheap_only=False)
        print("up to date" if not stale else f"stale blocks: {', '.join(stale)}")
        return 1 if stale else 0
    made = make_blocks()
    for page in PAGES:
        path = ROOT / page
        old = path.read_text()
        new = fill(old, made)
        if new != old:
            path.write_text(new)
            print(f"updated {page}")
    print(f"{len(made)} generated blocks in {time.perf_counter() - start:.1f}s")
    if not args.no_pictures:
        IMAGES.mkdir(parents=True, exist_ok=True)
        for number, pic in enumerate(PICTURES.values(), 1):
            pic.draw(IMAGES / pic.name)
            print(f"[{number}/{len(PICTURES)}] docs/images/{pic.name}", flush=True)
    print(f"done in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
