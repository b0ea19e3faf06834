"""FlexAttention kernel options for block-aligned patterns: a sweep of the kernels' tile,
pipeline and TMA settings against FlexAttention's default, with sparsedsl's block mask.

Forward (default): for each configuration (``BLOCK_M``, ``BLOCK_N``, ``num_warps``,
``num_stages``; then the default tiles with ``USE_TMA``, and with the promises of whole,
consecutive tiles that windows of whole blocks make, ``ALIGNED_BAND_PROMISES``) the
forward time of one pattern and shape. ``--backward``: forward+backward time, sweeping the backward kernel's options
(``bwd_``-prefixed: ``BLOCK_M1``/``BLOCK_N1`` of the key/value gradient loop,
``BLOCK_M2``/``BLOCK_N2`` of the query gradient loop, warps, stages, TMA) with the forward
at its default. Each time comes with its speed-up over dense SDPA times the density (1.0:
the sparse kernel runs at the dense kernel's speed per useful FLOP). Times are back to
back (:func:`attention.bench`). Prints a table and writes JSON.

    python benchmarks/flex_options.py --pattern "blocks(128).local(25)" --seq-len 65536
    python benchmarks/flex_options.py --pattern "blocks(128).local(6)" --seq-len 16384 --backward
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import torch.nn.functional as F

import sparsedsl as sd
from sparsedsl.plans.flex import ALIGNED_BAND_PROMISES, compiled_flex_attention
from sparsedsl.progress import Progress

from attention import bench, fwd_bwd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pattern", default="blocks(128).local(25)")
    parser.add_argument("--seq-len", type=int, default=65536)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--json", default=None)
    parser.add_argument("--backward", action="store_true", help="sweep the backward kernel's options")
    args = parser.parse_args()
    n, heads, dim = args.seq_len, args.heads, args.head_dim
    q, k, v = (torch.randn(1, heads, n, dim, device="cuda", dtype=torch.bfloat16, requires_grad=args.backward)
               for _ in range(3))
    module = sd.compile(sd.parse(args.pattern))
    block_mask = module.block_mask(n, heads=heads, device="cuda")
    density = module.explain(n, heads=heads, device="cuda").density
    flex = compiled_flex_attention()
    if args.backward:
        dense_ms = bench(fwd_bwd(lambda a, b, c: F.scaled_dot_product_attention(a, b, c), q, k, v))[1]
        configs = [None, {"bwd_USE_TMA": True}, ALIGNED_BAND_PROMISES] + [
            {"bwd_BLOCK_M1": m1, "bwd_BLOCK_N1": n1, "bwd_BLOCK_M2": n1, "bwd_BLOCK_N2": m1,
             "bwd_num_warps": w, "bwd_num_stages": s}
            for (m1, n1), w, s in itertools.product(((64, 128), (64, 64), (32, 128)), (4, 8), (2, 3))]
        time = lambda options: bench(fwd_bwd(lambda a, b, c: flex(a, b, c, block_mask=block_mask,
                                                                    kernel_options=options), q, k, v))[1]
    else:
        dense_ms = bench(lambda: F.scaled_dot_product_attention(q, k, v))[1]
        configs = [None, {"USE_TMA": True}, ALIGNED_BAND_PROMISES] + [dict(BLOCK_M=m, BLOCK_N=bn, num_warps=w, num_stages=s)
                                               for m, bn, w, s in itertools.product((64, 128), (64, 128), (4, 8), (2, 3))]
        time = lambda options: bench(lambda: flex(q, k, v, block_mask=block_mask, kernel_options=options))[1]
    rows = []
    with Progress(len(configs), "configurations", unit="config") as bar:
        for options in configs:
            try:
                ms = time(options)
                rows.append({"options": options or "default", "ms": ms, "speedup_x_density": dense_ms / ms * density})
            except Exception as err:  # noqa: BLE001 - a configuration the kernel refuses is reported
                rows.append({"options": options or "default", "error": f"{type(err).__name__}: {err}"[:200]})
            bar.update(str(options or "default"))
            print(json.dumps(rows[-1]), flush=True)
    mode = "forward+backward" if args.backward else "forward"
    print(f"\n{args.pattern} at {n} tokens, {heads} heads x {dim}, bf16, density {density:.4f}, {mode}: "
          f"dense SDPA {dense_ms:.3f} ms, {torch.cuda.get_device_name()}")
    for r in sorted(rows, key=lambda r: r.get("ms", float("inf"))):
        if "error" in r:
            print(f"{str(r['options']):70} {r['error'][:60]}")
        else:
            print(f"{str(r['options']):70} {r['ms']:8.3f} ms  speedup x density {r['speedup_x_density']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"pattern": args.pattern, "seq_len": n, "mode": mode, "dense_ms": dense_ms, "density": density,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
