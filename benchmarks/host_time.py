"""Host time of a cached ``CompiledPattern`` call, with the attention kernels stubbed.

Every kernel a plan calls (dense SDPA, the gather kernel, compiled FlexAttention) is
replaced by a stub that returns an output of the right shape without computing it, so what
is timed is the Python work of a call: input checks, the runner lookup and the plan's own
host-side steps. Each case is called once to build its runner, then timed over ``--calls``
calls, the median of ``--repeats`` rounds, in microseconds of this thread's CPU time per
call (``time.thread_time``, one torch thread: other processes on the machine do not count).

    PYTHONPATH=. python benchmarks/host_time.py [--calls 2000] [--repeats 7] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import sparsedsl as sd

CASES = [
    # (name, pattern, q_len, kv_len, q_offset, kernel)
    ("sdpa causal", sd.causal(), 256, 256, 0, "auto"),
    ("gather window|global", sd.window(16) | sd.global_tokens(4), 256, 256, 0, "gather"),
    ("lattice segments", sd.segments([64, 128], [1, 2]), 256, 256, 0, "auto"),
    ("decode step", sd.causal() & sd.window(64, 0), 1, 300, 299, "auto"),
]


def _stub_sdpa(q, k, v, *args, **kwargs):
    return q.new_empty(*q.shape[:-1], v.shape[-1])


def _stub_tile_kernel(q, k, v, **kwargs):
    out = q.new_empty(*q.shape[:-1], v.shape[-1])
    return out, q.new_empty(q.shape[:-1], dtype=torch.float32)


def stub_kernels() -> None:
    """Replace every attention kernel the plans call, wherever a plan module names one."""
    F.scaled_dot_product_attention = _stub_sdpa
    for name, module in list(sys.modules.items()):
        if name.startswith("sparsedsl"):
            for kernel in ("gather_attention", "flex_plan_attention"):
                if hasattr(module, kernel):
                    setattr(module, kernel, _stub_tile_kernel)


def time_case(pattern, q_len: int, kv_len: int, q_offset: int, kernel: str, calls: int, repeats: int) -> float:
    module = sd.compile(pattern, block_size=32, kernel=kernel)
    q = torch.randn(1, 2, q_len, 32)
    k = v = torch.randn(1, 2, kv_len, 32)
    with torch.no_grad():
        module(q, k, v, q_offset=q_offset)  # builds the runner
        rounds = []
        for _ in range(repeats):
            start = time.thread_time()
            for _ in range(calls):
                module(q, k, v, q_offset=q_offset)
            rounds.append((time.thread_time() - start) / calls * 1e6)
    return statistics.median(rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", default=None, help="write the results to this file")
    args = parser.parse_args()
    for name in ("sparsedsl.plans.gather", "sparsedsl.plans.flex", "sparsedsl.compiler.module"):
        __import__(name)
    stub_kernels()
    torch.set_num_threads(1)
    results = {name: time_case(p, q, k, o, kernel, args.calls, args.repeats) for name, p, q, k, o, kernel in CASES}
    for name, us in results.items():
        print(f"{name:<24} {us:8.1f} us/call")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "us_per_call": results}, f, indent=1)


if __name__ == "__main__":
    main()
