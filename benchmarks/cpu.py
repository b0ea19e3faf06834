"""sparsedsl on the CPU against dense SDPA and compiled FlexAttention, side by side.

For each case (fp32, batch 1, ``--heads`` heads of ``--head-dim``), in one process:

* ``sparsedsl fwd``: ``sd.compile(pattern)(q, k, v)`` without gradients (the plan the
  planner picks, printed), and ``fwd+bwd``: forward and backward with gradients;
* ``dense``: ``torch.nn.functional.scaled_dot_product_attention`` on all pairs, no mask
  (the dense kernel at its fastest), forward and forward+backward;
* ``flex``: ``torch.compile(flex_attention)`` with sparsedsl's block mask, forward only (it
  has no CPU backward), with the first call's compile time.

Ratios: ``speedup x density`` is ``dense time / sparsedsl time * density``, the fraction of
dense SDPA's throughput per useful pair (1: a sparse pair costs what a dense pair costs);
``vs flex`` is ``flex time / sparsedsl time`` (above 1: sparsedsl is faster). Times are the
median of ``--repeats`` calls after one warm-up call.

    PYTHONPATH=. python benchmarks/cpu.py [--lengths 4096] [--threads 1 --clock cpu] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

import sparsedsl as sd

CASES = [
    ("window", "window(128)"),
    ("causal window", "causal() & window(256, 0)"),
    ("block window", "blocks(128).local(1)"),
    ("seed local blocks", "blocks(256).local(1)"),
    ("seed block-dilated", "blocks(256).local(1).within(segments([128, 128], [1, 2]))"),
    ("bigbird", "blocks(64).local(1).global_(2).random(3, seed=0)"),
    ("global rows", "window(128) | global_tokens(16)"),
    ("longnet heads", "segments([512, 1024, 2048], [1, 2, 4])"),
]


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = time.perf_counter


def timed(fn, repeats: int) -> float:
    """Median milliseconds of ``repeats`` calls of ``fn`` after a warm-up call, on ``clock``."""
    fn()
    samples = []
    for _ in range(repeats):
        start = clock()
        fn()
        samples.append((clock() - start) * 1e3)
    return statistics.median(samples)


def forward_backward(attend, q, k, v):
    def run():
        qs, ks, vs = (t.detach().requires_grad_() for t in (q, k, v))
        attend(qs, ks, vs).sum().backward()
    return run


def measure(name: str, text: str, length: int, heads: int, head_dim: int, repeats: int, flex: bool,
            kernel: str = "auto") -> dict:
    pattern = sd.parse(text)
    module = sd.compile(pattern, kernel=kernel)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, length, head_dim, generator=gen) for _ in range(3))
    plan = module.explain(length, heads=heads, head_dim=head_dim, device="cpu")
    plan_grad = module.explain(length, heads=heads, head_dim=head_dim, device="cpu", requires_grad=True)
    with torch.no_grad():
        ours = timed(lambda: module(q, k, v), repeats)
        dense = timed(lambda: F.scaled_dot_product_attention(q, k, v), repeats)
    ours_train = timed(forward_backward(module, q, k, v), repeats)
    dense_train = timed(forward_backward(F.scaled_dot_product_attention, q, k, v), repeats)
    row = {"case": name, "pattern": text, "tokens": length, "density": plan.density, "plan": plan.kind,
           "plan_grad": plan_grad.kind, "computed_over_useful": plan.computed_pairs / plan.pairs,
           "fwd_ms": ours, "dense_fwd_ms": dense, "fwd_bwd_ms": ours_train, "dense_fwd_bwd_ms": dense_train,
           "fwd_speedup_x_density": dense / ours * plan.density,
           "fwd_bwd_speedup_x_density": dense_train / ours_train * plan.density}
    if flex:
        block_mask = module.block_mask(length, heads=heads)
        # A fresh compile per case: past Dynamo's recompile limit (8 mask functions in one
        # process) flex_attention would run eagerly, materialising every score.
        torch._dynamo.reset()
        compiled = torch.compile(flex_attention, dynamic=False)
        with torch.no_grad():
            start = time.perf_counter()
            compiled(q, k, v, block_mask=block_mask)
            row["flex_compile_s"] = time.perf_counter() - start
            row["flex_fwd_ms"] = timed(lambda: compiled(q, k, v, block_mask=block_mask), repeats)
        row["vs_flex"] = row["flex_fwd_ms"] / ours
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096])
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cases", nargs="+", default=None, help="case names (default: all)")
    parser.add_argument("--no-flex", action="store_true", help="skip compiled FlexAttention")
    parser.add_argument("--kernel", default="auto", help="the plan sparsedsl runs (default: the planner's)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall time, or the process's CPU time (all threads; for a machine shared "
                             "with other work)")
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads for every method (default: torch's; one thread with "
                             "--clock cpu measures without other work's contention or idle spinning)")
    parser.add_argument("--json", default=None, help="write the rows to this file")
    args = parser.parse_args()
    global clock
    clock = CLOCKS[args.clock]
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for length in args.lengths:
        for name, text in CASES:
            if args.cases and name not in args.cases:
                continue
            rows.append(measure(name, text, length, args.heads, args.head_dim, args.repeats, not args.no_flex,
                                args.kernel))
            r = rows[-1]
            print(f"{r['case']:<20} {r['tokens']:>6} {r['plan']:>9}/{r['plan_grad']:<9} dens {r['density']:.3f} "
                  f"fwd {r['fwd_ms']:8.1f} ms (dense {r['dense_fwd_ms']:8.1f}, x dens {r['fwd_speedup_x_density']:.2f}"
                  + (f", flex {r['flex_fwd_ms']:7.1f} -> {r['vs_flex']:.2f}x" if "vs_flex" in r else "")
                  + f")  fwd+bwd {r['fwd_bwd_ms']:8.1f} ms (dense {r['dense_fwd_bwd_ms']:8.1f}, "
                  f"x dens {r['fwd_bwd_speedup_x_density']:.2f})", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "clock": args.clock, "kernel": args.kernel, "machine": platform.processor() or platform.machine(),
                       "threads": torch.get_num_threads(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
