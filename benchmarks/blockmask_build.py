"""Block-mask build time: sparsedsl's structural builder vs ``create_block_mask``.

Runs every case in one process, side by side: ``create_block_mask`` eager, and (with
``--compiled``) ``torch.compile(create_block_mask)``, against ``CompiledPattern.block_mask``
with its cache cleared before every timed build (so each build is a cold build). Prints a
table of times and ratios and writes JSON.

    python benchmarks/blockmask_build.py --seq-len 4096 --device cpu
    python benchmarks/blockmask_build.py --seq-len 65536 --device cuda --compiled
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch.nn.attention.flex_attention import create_block_mask

import sparsedsl as sd
from sparsedsl.progress import Progress
from sparsedsl.passes.lowering import _LOWERINGS

CASES = {
    "window": ("window(512)", 1),
    "window+global": ("window(512) | global_tokens(128)", 1),
    "causal-window": ("causal() & window(1024, 0)", 1),
    "bigbird": ("blocks(64).local(1).global_(2).random(3, 0)", 1),
    "longnet": ("segments([512, 1024, 2048, 4096], [1, 2, 4, 8])", 4),
    "seed-block-dilated": ("blocks(256).local(1).within(segments([128, 128], [1, 2]))", 2),
    "blocks-local+global": ("blocks(128).local(8) | global_tokens(128)", 1),
}


def _time(fn, device: str, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compiled", action="store_true", help="also time torch.compile(create_block_mask)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    n, device = args.seq_len, args.device
    compiled_cbm = torch.compile(create_block_mask) if args.compiled else None
    rows = []
    bar = Progress(len(CASES), "cases", unit="case")
    for name, (text, heads) in CASES.items():
        module = sd.compile(sd.parse(text))
        mask_mod = module.mask_mod(n, heads=heads, device=device)

        def ours():
            _LOWERINGS.clear()
            return module.block_mask(n, heads=heads, device=device)

        def eager():
            return create_block_mask(mask_mod, 1, heads, n, n, device=device)

        ours()  # warm-up (allocator, kernels)
        row = {"case": name, "pattern": text, "seq_len": n, "heads": heads, "device": device,
               "sparsedsl_s": _time(ours, device, args.repeats)}
        try:
            eager()
            row["eager_s"] = _time(eager, device, max(1, args.repeats // 2))
        except torch.OutOfMemoryError:
            row["eager_s"] = None
        if compiled_cbm is not None:
            def compiled():
                return compiled_cbm(mask_mod, 1, heads, n, n, device=device)
            compiled()
            row["compiled_s"] = _time(compiled, device, args.repeats)
        rows.append(row)
        bar.update(name)
    bar.close()
    print(f"block-mask build, seq_len={n}, device={device} (median seconds; ratio = theirs / ours)")
    header = f"{'case':22} {'sparsedsl':>10} {'eager':>10} {'ratio':>7}"
    if args.compiled:
        header += f" {'compiled':>10} {'ratio':>7}"
    print(header)
    for r in rows:
        line = f"{r['case']:22} {r['sparsedsl_s'] * 1e3:9.2f}ms"
        eager_s = r["eager_s"]
        line += f" {eager_s * 1e3:9.1f}ms {eager_s / r['sparsedsl_s']:6.0f}x" if eager_s else f" {'OOM':>10} {'-':>7}"
        if args.compiled:
            line += f" {r['compiled_s'] * 1e3:9.2f}ms {r['compiled_s'] / r['sparsedsl_s']:6.1f}x"
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
