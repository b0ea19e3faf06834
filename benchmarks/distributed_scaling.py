"""Scaling curves of sequence-parallel attention, from ``sparsedsl.distributed.estimate``.

The sequence grows from 2**20 to 2**30 tokens and the ranks with it (each rank holds
``--shard`` tokens: 4 to 4096 ranks at the default 256K), 16 heads of 128 in bf16,
tiles of 128. For each pattern and length: the key/value bytes ranks receive in the forward
pass and the attention memory they hold (query, output and own key/value shards plus the
compact key/value buffer), for the most loaded rank and the mean over ranks. No tensor of sequence size is made:
everything comes from the patterns' structure. Writes ``docs/images/distributed_scaling.png``
and prints a table (with ``--json``, also the numbers).

    python benchmarks/distributed_scaling.py --json benchmarks/results/distributed-scaling.json
"""

from __future__ import annotations

import argparse
import json
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import sparsedsl as sd  # noqa: E402
from sparsedsl.distributed import estimate  # noqa: E402
from sparsedsl.patterns import bigbird, longnet_head_grouped  # noqa: E402

#: LongNet with segments growing to the sequence length and w / r = 2048 kept tokens per
#: segment in every head group (the geometric form of the paper's billion-token setting).
GROWING_LENGTHS = [2048 * 8 ** i for i in range(7)]  # 2K ... 512M
GROWING = sd.segments(GROWING_LENGTHS, [w // 2048 for w in GROWING_LENGTHS])

CASES = {
    "window(2048)": (sd.window(2048), False),
    "BigBird (64-token blocks)": (bigbird(), False),
    "LongNet, paper's 5 groups (segments <= 32K)": (longnet_head_grouped(), False),
    "LongNet, segments to 512M, 2048 kept per segment": (GROWING, False),
    "causal (zigzag)": (sd.causal(), True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shard", type=int, default=1 << 18, help="tokens per rank (default 2**18)")
    parser.add_argument("--lengths", default="20,22,24,26,28,30", help="log2 of the sequence lengths")
    parser.add_argument("--output", default="docs/images/distributed_scaling.png")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    lengths = [1 << int(x) for x in args.lengths.split(",")]
    rows = []
    for name, (pattern, zigzag) in CASES.items():
        compiled = sd.compile(pattern)
        for seq_len in lengths:
            start = time.perf_counter()
            result = estimate(compiled, seq_len, seq_len // args.shard, heads=16, head_dim=128,
                              dtype=torch.bfloat16, zigzag=zigzag)
            rows.append({"case": name, "pattern": str(pattern), "seq_len": seq_len,
                         "world_size": result.world_size, "exact": result.exact,
                         "received_bytes_max": result.most("received_bytes"),
                         "received_bytes_mean": result.mean("received_bytes"),
                         "held_kv_positions_max": result.most("held_kv_positions"),
                         "memory_bytes_max": result.most("memory_bytes"),
                         "memory_bytes_mean": result.mean("memory_bytes"),
                         "all_gather_bytes": result.all_gather_bytes,
                         "seconds": time.perf_counter() - start})
            r = rows[-1]
            print(f"{name:50} N=2^{seq_len.bit_length() - 1:<3} P={r['world_size']:<5} "
                  f"recv max {r['received_bytes_max'] / 2**20:12,.1f} MiB  "
                  f"mean {r['received_bytes_mean'] / 2**20:12,.1f} MiB  "
                  f"memory max {r['memory_bytes_max'] / 2**30:9,.2f} GiB  ({r['seconds']:.1f} s)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shard": args.shard, "heads": 16, "head_dim": 128, "dtype": "bfloat16",
                       "tile": 128, "rows": rows}, f, indent=2)
    plot(rows, args.shard, args.output)


def plot(rows: list[dict], shard: int, output: str) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), constrained_layout=True)
    for i, name in enumerate(CASES):
        mine = [r for r in rows if r["case"] == name]
        x = [r["seq_len"] for r in mine]
        color = f"C{i}"
        axes[0].plot(x, [r["received_bytes_max"] / 2**20 for r in mine], marker="o", color=color, label=name)
        axes[0].plot(x, [r["received_bytes_mean"] / 2**20 for r in mine], marker="x", color=color,
                     linestyle=":")
        axes[1].plot(x, [r["memory_bytes_max"] / 2**30 for r in mine], marker="o", color=color, label=name)
        axes[1].plot(x, [r["memory_bytes_mean"] / 2**30 for r in mine], marker="x", color=color,
                     linestyle=":")
    x = sorted({r["seq_len"] for r in rows})
    gather = {r["seq_len"]: r["all_gather_bytes"] for r in rows}
    axes[0].plot(x, [gather[n] / 2**20 for n in x], color="grey", linestyle="--", label="all-gather of K and V")
    axes[0].set_yscale("symlog", linthresh=1)
    axes[0].set_ylabel("K/V MiB received, forward (0 = none)")
    axes[1].set_yscale("log")
    axes[1].set_ylabel("attention memory, GiB")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"sequence length (ranks = length / {shard:,})")
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=8, loc="upper left")
    fig.suptitle("Sequence-parallel attention per rank, 16 heads of 128, bf16, tiles of 128: "
                 "most loaded rank (solid), mean over ranks (dotted)")
    fig.savefig(output, dpi=110)
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
