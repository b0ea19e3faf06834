"""The lattice plan against the flex plan on CUDA, on patterns both run: the measurement
behind the lattice plan's CUDA efficiency (``sparsedsl.plans.lattice.EFFICIENCY["cuda"]``,
its throughput per computed pair relative to FlexAttention's).

For each case, in one process on one GPU: ``sd.compile(pattern, kernel=...)`` forced to
each plan, forward without gradients and forward+backward, timed back to back
(:func:`attention.bench`). Each plan's rate is its computed pairs (``explain()``) per ms;
the ratio printed is the lattice's rate over flex's, the efficiency the planner's cost
divides the lattice's computed pairs by (flex's being 1).

    PYTHONPATH=. python benchmarks/lattice_vs_flex.py [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from attention import bench, fwd_bwd  # noqa: E402

import sparsedsl as sd  # noqa: E402

#: (pattern, tokens, heads, head dim): ``.within`` rules whose segments are a tile long
#: (the tiles then already fit the lattice) and LongNet's segments.
CASES = [
    ("blocks(256).local(1).within(segments([128, 128], [1, 2]))", 16384, 16, 128),
    ("blocks(256).local(1).within(segments([128, 128], [1, 2]))", 65536, 16, 128),
    ("segments([2048, 4096, 8192, 16384], [1, 2, 4, 8])", 65536, 16, 128),
]


def measure(text: str, length: int, heads: int, dim: int) -> dict:
    pattern = sd.parse(text)
    make = lambda: torch.randn(1, heads, length, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    q, k, v = make(), make(), make()
    row = {"pattern": text, "tokens": length, "heads": heads, "head_dim": dim}
    for plan in ("lattice", "flex"):
        module = sd.compile(pattern, kernel=plan)
        pairs = module.explain(length, heads=heads, head_dim=dim, device="cuda", dtype=torch.bfloat16).computed_pairs
        with torch.no_grad():
            fwd = bench(lambda: module(q, k, v), iters=5)[1]
        step = bench(fwd_bwd(module, q, k, v), iters=5)[1]
        row[plan] = {"computed_pairs": pairs, "fwd_ms": fwd, "fwd_bwd_ms": step}
    for mode in ("fwd_ms", "fwd_bwd_ms"):
        rate = {plan: row[plan]["computed_pairs"] / row[plan][mode] for plan in ("lattice", "flex")}
        row[f"rate_ratio_{mode[:-3]}"] = rate["lattice"] / rate["flex"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = []
    for case in CASES:
        rows.append(measure(*case))
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    print(f"\n{'pattern':62} {'tokens':>6} {'lattice fwd':>11} {'flex fwd':>9} {'rate ratio':>10} "
          f"{'lattice f+b':>11} {'flex f+b':>9} {'rate ratio':>10}")
    for r in rows:
        print(f"{r['pattern']:62} {r['tokens']:6} {r['lattice']['fwd_ms']:11.3f} {r['flex']['fwd_ms']:9.3f} "
              f"{r['rate_ratio_fwd']:10.2f} {r['lattice']['fwd_bwd_ms']:11.3f} {r['flex']['fwd_bwd_ms']:9.3f} "
              f"{r['rate_ratio_fwd_bwd']:10.2f}")


if __name__ == "__main__":
    main()
