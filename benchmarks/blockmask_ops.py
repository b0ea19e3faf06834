"""Tensor operations and host syncs per cold block-mask build.

On a GPU a build is bound by kernel launches (each tensor operation is one, several
microseconds of host time) and by host syncs (each drains the queue), not by the GPU's
work. This counts both on any device, the CPU included, with a dispatch mode: ``kernels``
are the aten operations that are not views (about one launch each on CUDA), ``syncs`` the
ones that read a device tensor back (``nonzero``, ``item``). Each build runs with the
build cache cleared, as a first call would.

    python benchmarks/blockmask_ops.py --seq-len 65536 --heads 16
    python benchmarks/blockmask_ops.py --pattern "window(512)" --device cuda --detail
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import sparsedsl as sd
from sparsedsl.passes.lowering import _LOWERINGS

PATTERNS = (
    "blocks(128).local(25)",
    "window(3200)",
    "window(800) | global_tokens(256)",
    "blocks(64).local(1).global_(2).random(3, 0)",
    "segments([2048, 4096, 8192, 16384], [1, 2, 4, 8])",
    "causal() & window(1024, 0)",
    "blocks(256).local(1).within(segments([128, 128], [1, 2]))",
)
SYNCS = ("aten::nonzero", "aten::item", "aten::_local_scalar_dense")
NOT_KERNELS = ("aten::empty", "aten::empty_strided")


class OpCounter(TorchDispatchMode):
    """Counts the aten operations run under it: ``(name, is_view) -> count``."""

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[(func._schema.name, func.is_view)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def kernels(self) -> int:
        return sum(n for (name, view), n in self.counts.items() if not view and name not in NOT_KERNELS)

    @property
    def syncs(self) -> int:
        return sum(n for (name, _), n in self.counts.items() if name in SYNCS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pattern", action="append", help="pattern text (repeatable; default: a fixed set)")
    parser.add_argument("--seq-len", type=int, default=65536)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5, help="timed builds (median)")
    parser.add_argument("--detail", action="store_true", help="also list the operations by name")
    args = parser.parse_args()
    sync = torch.cuda.synchronize if torch.device(args.device).type == "cuda" else (lambda: None)
    print(f"cold block-mask builds, seq_len={args.seq_len}, heads={args.heads}, device={args.device}")
    print(f"{'pattern':60} {'ops':>5} {'kernels':>7} {'syncs':>5} {'ms':>8}")
    for text in args.pattern or PATTERNS:
        module = sd.compile(sd.parse(text))

        def build():
            _LOWERINGS.clear()
            module.block_mask(args.seq_len, heads=args.heads, device=args.device)
            sync()

        build()
        with OpCounter() as ops:
            build()
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            build()
            times.append(time.perf_counter() - start)
        print(f"{text:60} {sum(ops.counts.values()):5} {ops.kernels:7} {ops.syncs:5} "
              f"{statistics.median(times) * 1e3:8.2f}")
        if args.detail:
            by_name = collections.Counter()
            for (name, _), n in ops.counts.items():
                by_name[name] += n
            print("    " + ", ".join(f"{name.removeprefix('aten::')} {n}" for name, n in by_name.most_common()))


if __name__ == "__main__":
    main()
