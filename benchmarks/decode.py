"""Decoding latency: one new token attending to a long KV cache, sparsedsl vs dense SDPA.

For each pattern, in one process on one GPU, a decoding step at ``--cached`` tokens (query
length 1, batch 1, 32 query heads over 8 key/value heads, head dim 128, bf16):

* ``dense``: ``scaled_dot_product_attention`` over the whole cache (the pattern ignored);
* ``static``: ``sparsedsl`` on a preallocated cache of fixed capacity with
  ``q_offset=position`` (no new shape per token: the way compiled decoders keep their
  cache; its capacity is a length bucket, ``sparsedsl.plans.flex.bucket_length``, so
  nothing is padded or copied);
* ``growing``: ``sparsedsl`` on a cache that grows by one token per step
  (``q_offset="end"``; the cache is padded to its length bucket each step, a copy);
* ``mask``: the host-side cost of one step's block mask (a cache hit of the aligned tile
  rows, see ``sparsedsl.plans.decode``), and ``first`` the first call at a new tile row.

Each step is timed over consecutive positions (so the row caches see what real decoding
does). Prints a table and writes JSON.

    python benchmarks/decode.py --json decode.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

import sparsedsl as sd
from sparsedsl.plans.flex import bucket_length
from sparsedsl.progress import Progress

PATTERNS = {
    "causal": "causal()",
    "window-4k+global": "causal() & (window(4096, 0) | global_tokens(128))",
    "longnet": "causal() & segments([2048, 4096, 8192, 16384, 32768], [1, 2, 4, 8, 16])",
    "blocks-local": "causal() & blocks(128).local(8)",
}


def timed_steps(step, positions) -> float:
    """Median milliseconds of ``step(position)`` over consecutive ``positions``."""
    times = []
    for position in positions:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step(position)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def run_pattern(name: str, text: str, cached: int, heads: int, kv_heads: int, dim: int, steps: int) -> dict:
    device, dtype = "cuda", torch.bfloat16
    capacity = bucket_length(cached + steps + 1, 128)
    q = torch.randn(1, heads, 1, dim, device=device, dtype=dtype)
    k_cache = torch.randn(1, kv_heads, capacity, dim, device=device, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    module = sd.compile(sd.parse(text))
    positions = list(range(cached, cached + steps))
    warm = list(range(cached - 3, cached))

    def dense(position):
        F.scaled_dot_product_attention(q, k_cache[:, :, :position + 1], v_cache[:, :, :position + 1],
                                       enable_gqa=True)

    def static(position):
        module(q, k_cache, v_cache, q_offset=position)

    def growing(position):
        module(q, k_cache[:, :, :position + 1], v_cache[:, :, :position + 1], q_offset="end")

    results = {"pattern": text, "cached": cached, "heads": heads, "kv_heads": kv_heads, "head_dim": dim}
    for label, step in (("dense_ms", dense), ("static_ms", static), ("growing_ms", growing)):
        start = time.perf_counter()
        for position in warm:
            step(position)
        torch.cuda.synchronize()
        results[label.replace("_ms", "_first_s")] = time.perf_counter() - start
        results[label] = timed_steps(step, positions)
    plan = module.explain(1, capacity, heads=heads, q_offset=cached, device=device)
    results["plan"] = plan.kind
    results["density"] = plan.density
    # host cost of a step's block mask (a cache hit), and of the first call at a new row
    from sparsedsl.plans.decode import _DECODE_ROWS
    rows = next((r for r in _DECODE_ROWS._values.values() if r.kv_capacity >= capacity), None)
    if rows is not None:
        start = time.perf_counter()
        for position in positions:
            rows.block_mask(position, 1, capacity)
        results["mask_hit_us"] = (time.perf_counter() - start) / len(positions) * 1e6
    _DECODE_ROWS.clear()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cached", type=int, default=32768)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--patterns", default=",".join(PATTERNS))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    results = []
    names = args.patterns.split(",")
    with Progress(len(names), "patterns", unit="pattern") as bar:
        for name in names:
            result = run_pattern(name, PATTERNS[name], args.cached, 32, 8, 128, args.steps)
            results.append(result)
            print(json.dumps(result), flush=True)
            bar.update(name)
    print(f"\ndecode step at {args.cached} cached tokens, 1x32 q heads / 8 kv heads x 128, bf16, "
          f"{torch.cuda.get_device_name()}")
    print(f"{'pattern':<18}{'plan':<7}{'density':>8}{'dense ms':>10}{'static ms':>11}"
          f"{'growing ms':>12}{'dense/static':>14}{'mask hit us':>13}")
    for r in results:
        print(f"{r['pattern'][:17]:<18}{r['plan']:<7}{r['density']:>8.3f}{r['dense_ms']:>10.3f}"
              f"{r['static_ms']:>11.3f}{r['growing_ms']:>12.3f}{r['dense_ms'] / r['static_ms']:>14.2f}"
              f"{r.get('mask_hit_us', float('nan')):>13.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
