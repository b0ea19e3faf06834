"""FlexAttention kernel options for block-aligned patterns: a sweep of the forward kernel's
tile and pipeline settings against FlexAttention's default, with sparsedsl's block mask.

For each configuration (``BLOCK_M``, ``BLOCK_N``, ``num_warps``, ``num_stages``) the
forward time of one pattern and shape, and its speed-up over dense SDPA times the density
(1.0: the sparse kernel runs at the dense kernel's speed per useful FLOP). Prints a table
and writes JSON.

    python benchmarks/flex_options.py --pattern "blocks(128).local(25)" --seq-len 65536
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import torch.nn.functional as F

import sparsedsl as sd
from sparsedsl.plans.flex import compiled_flex_attention
from sparsedsl.progress import Progress

from attention import bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pattern", default="blocks(128).local(25)")
    parser.add_argument("--seq-len", type=int, default=65536)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    n, heads, dim = args.seq_len, args.heads, args.head_dim
    q, k, v = (torch.randn(1, heads, n, dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    module = sd.compile(sd.parse(args.pattern))
    block_mask = module.block_mask(n, heads=heads, device="cuda")
    density = module.explain(n, heads=heads, device="cuda").density
    dense_ms = bench(lambda: F.scaled_dot_product_attention(q, k, v))
    flex = compiled_flex_attention()
    configs = [None] + [dict(BLOCK_M=m, BLOCK_N=bn, num_warps=w, num_stages=s)
                        for m, bn, w, s in itertools.product((64, 128), (64, 128), (4, 8), (2, 3))]
    rows = []
    with Progress(len(configs), "configurations", unit="config") as bar:
        for options in configs:
            try:
                ms = bench(lambda: flex(q, k, v, block_mask=block_mask, kernel_options=options))
                rows.append({"options": options or "default", "fwd_ms": ms,
                             "speedup_x_density": dense_ms / ms * density})
            except Exception as err:  # noqa: BLE001 - a configuration the kernel refuses is reported
                rows.append({"options": options or "default", "error": f"{type(err).__name__}: {err}"[:200]})
            bar.update(str(options or "default"))
    print(f"\n{args.pattern} at {n} tokens, {heads} heads x {dim}, bf16, density {density:.4f}, "
          f"dense SDPA {dense_ms:.3f} ms, {torch.cuda.get_device_name()}")
    for r in sorted(rows, key=lambda r: r.get("fwd_ms", float("inf"))):
        if "error" in r:
            print(f"{str(r['options']):70} {r['error'][:60]}")
        else:
            print(f"{str(r['options']):70} {r['fwd_ms']:8.3f} ms  speedup x density {r['speedup_x_density']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"pattern": args.pattern, "seq_len": n, "dense_ms": dense_ms, "density": density,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
