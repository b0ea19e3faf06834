"""Each plan's throughput per computed pair, relative to the device's tile kernel: the
efficiency constants the planner's costs divide by.

For each case and each plan that can run it (``kernel=<plan>``), a forward call without
gradients is timed (the median of ``--repeats`` after a warm-up, in the process's CPU time,
so other work on the machine does not count), and its computed pairs (``explain()``) are
divided by that time. The last column divides by the reference plan's rate (the gather
plan on the CPU, flex on CUDA).

    PYTHONPATH=. python benchmarks/plan_efficiency.py [--device cpu] [--length 4096]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import sparsedsl as sd

CASES = ["full()", "segments([512, 1024, 2048], [1, 2, 4])", "longnet([512, 1024, 2048], [1, 2, 4])",
         "window(128)", "blocks(128).local(1)", "window(128) | global_tokens(16)"]


def cpu_ms(fn, repeats: int) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        samples.append((time.process_time() - start) * 1e3)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    device = torch.device(args.device)
    reference = "gather" if device.type == "cpu" else "flex"
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    q, k, v = (torch.randn(1, args.heads, args.length, args.head_dim, device=device, dtype=dtype) for _ in range(3))
    for text in CASES:
        rates = {}
        for kernel in sd.compile(sd.full()).planner.kernels():
            module = sd.compile(sd.parse(text), kernel=kernel)
            try:
                plan = module.explain(args.length, heads=args.heads, head_dim=args.head_dim, device=device, dtype=dtype)
            except sd.PlanNotSupported:
                continue
            with torch.no_grad():
                rates[kernel] = plan.computed_pairs / cpu_ms(lambda: module(q, k, v), args.repeats)
        for kernel, rate in rates.items():
            relative = f"{rate / rates[reference]:6.2f}" if reference in rates else "     -"
            print(f"{text:<42} {kernel:<10} {rate / 1e3:8.0f}k pairs/ms  {relative}")


if __name__ == "__main__":
    main()
