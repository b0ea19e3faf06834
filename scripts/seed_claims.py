"""The seed guide's numbers, counted exactly; regenerates the numbers and pictures of
docs/counting.md ("The seed's claims, counted").

    python scripts/seed_claims.py            # prints the numbers, writes docs/images/*.png
    python scripts/seed_claims.py --no-images

The guide (shared/seed/000_828cdb6288ee3ff8.txt) says that a 256-token block with segments
[128, 128] and dilations [1, 2] has "~49,152 interactions (25% reduction)", and that 90%
sparsity at 16,384 tokens with 256-token blocks gives "~410 active blocks".
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import sympy as sp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import sparsedsl as sd  # noqa: E402
from sparsedsl.analysis.count import count  # noqa: E402
from sparsedsl.analysis.formula import N, formula  # noqa: E402

BLOCK = 256
SEQ = 16_384
SEGMENTS = sd.segments([128, 128], [1, 2])
IMAGES = ROOT / "docs" / "images"


def block_claim() -> dict:
    """One 256-token block: the seed's "~49,152 interactions (25% reduction)"."""
    p = sd.blocks(BLOCK).within(SEGMENTS)
    c = count(p, BLOCK, heads=2, tile=BLOCK)
    dense = BLOCK * BLOCK
    mean = c.pairs / c.heads
    return {"pattern": p, "per_group": c.per_head, "mean": mean, "dense": dense,
            "reduction": 1 - mean / dense, "seed": 49_152, "seed_reduction": 0.25}


def active_blocks(window: int) -> int:
    """Active 256 x 256 block pairs of ``blocks(256).local(window)`` at 16,384 tokens."""
    return count(sd.blocks(BLOCK).local(window), SEQ, tile=BLOCK).tiles.full


def sequence_claim() -> dict:
    """16,384 tokens: the seed's "~410 active blocks" at 90% sparsity."""
    total = (SEQ // BLOCK) ** 2
    windows = {w: active_blocks(w) for w in range(0, 5)}
    closest = min(windows, key=lambda w: abs(windows[w] - 0.1 * total))
    diag = sd.blocks(BLOCK).local(0)
    dense_pairs = count(diag, SEQ, tile=BLOCK).pairs
    dilated = count(diag.within(SEGMENTS), SEQ, heads=2, tile=BLOCK)
    return {"total": total, "windows": windows, "closest": closest, "seed": 410,
            "diag_pairs": dense_pairs, "dilated_per_group": dilated.per_head,
            "dilated_mean": dilated.pairs / 2,
            "seed_ops": 410 * 65_536, "seed_ops_dilated": 410 * 49_152}


def formulas() -> dict:
    """Closed forms in N (sum over the two head groups, one head each)."""
    block = formula(sd.blocks(BLOCK).within(SEGMENTS))
    diag = formula(sd.blocks(BLOCK).local(0).within(SEGMENTS))
    local = {w: formula(sd.blocks(BLOCK).local(w)) for w in (0, 1, 3)}
    m = sp.Symbol("M", integer=True, positive=True)
    at_multiples = {
        "blocks(256).local(0).within(segments)": sp.expand(diag.subs(N, BLOCK * m)),
        **{f"blocks(256).local({w})": sp.factor(sp.expand(f.subs(N, BLOCK * m)))
           for w, f in local.items()},
    }
    return {"block": block, "diag": diag, "local": local, "at_multiples": at_multiples, "M": m}


def images() -> list[Path]:
    from sparsedsl.draw.diagram import diagram
    from sparsedsl.draw.render import render

    IMAGES.mkdir(parents=True, exist_ok=True)
    out = [
        render(sd.blocks(BLOCK).within(SEGMENTS), BLOCK, IMAGES / "seed_block.png", heads=2,
               tile=128, zoom=BLOCK),
        render(sd.blocks(BLOCK).local(0).within(SEGMENTS), SEQ, IMAGES / "seed_local_window.png",
               heads=2, tile=BLOCK),
        render(sd.blocks(BLOCK).local(3), SEQ, IMAGES / "seed_local3.png", tile=BLOCK),
        diagram(sd.blocks(BLOCK).local(0).within(SEGMENTS), IMAGES / "seed_diagram.png",
                seq_len=SEQ, heads=2, tile=BLOCK),
        render(sd.window(4096) | sd.global_tokens(128), 1 << 20, IMAGES / "window_global_1m.png"),
        diagram((sd.window(256) | sd.global_tokens(16)) - sd.heads(sd.strided(7), sd.causal()),
                IMAGES / "diagram_example.png", seq_len=4096),
    ]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-images", action="store_true", help="print the numbers only")
    args = parser.parse_args(argv)

    b = block_claim()
    print("== One 256-token block, segments [128, 128], dilations [1, 2] ==")
    print(f"pattern: {b['pattern']}")
    print(f"head group 0 (dilated(128, 1)):    {b['per_group'][0]:,} pairs")
    print(f"head group 1 (dilated(128, 2, 1)): {b['per_group'][1]:,} pairs")
    print(f"mean per head: {b['mean']:,.0f} of {b['dense']:,} -> {b['reduction']:.2%} reduction")
    print(f"seed guide: ~{b['seed']:,} ({b['seed_reduction']:.0%} reduction)")

    s = sequence_claim()
    print("\n== 16,384 tokens, 256-token blocks ==")
    print(f"block pairs: {s['total']:,}; 10% is {0.1 * s['total']:.1f}")
    for w, active in s["windows"].items():
        print(f"blocks(256).local({w}): {active:,} active blocks ({active / s['total']:.2%})")
    print(f"closest to 10%: local({s['closest']}) with {s['windows'][s['closest']]:,} blocks")
    print(f"seed library local_window (the diagonal, local(0)): {s['windows'][0]:,} active blocks, "
          f"{s['diag_pairs']:,} pairs per head")
    print(f"  with segments [128, 128] / dilations [1, 2]: group 0 {s['dilated_per_group'][0]:,}, "
          f"group 1 {s['dilated_per_group'][1]:,}, mean {s['dilated_mean']:,.0f} pairs per head")
    print(f"seed guide: ~{s['seed']} active blocks, {s['seed_ops']:,} and {s['seed_ops_dilated']:,} operations")

    f = formulas()
    print("\n== Closed forms (N tokens, sum over the 2 head groups) ==")
    print(f"blocks(256).within(segments):          {f['block']}")
    print(f"blocks(256).local(0).within(segments): {f['diag']}")
    for w, expr in f["local"].items():
        print(f"blocks(256).local({w}):                 {expr}")
    print("at N = 256 M (whole blocks):")
    for name, expr in f["at_multiples"].items():
        print(f"  {name}: {expr}")

    if not args.no_images:
        print("\n== Pictures ==")
        for path in images():
            print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
