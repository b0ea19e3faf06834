"""Sequence-parallel sparse attention: time per step and bytes moved, against all-gather.

Launched with torchrun, one process per GPU (NCCL), or with ``--cpu`` one process per
CPU worker (gloo). For every case and sequence length, each rank holds ``N / P`` positions
of q, k and v and runs two ways:

* ``sparse``: the exchange of :func:`sparsedsl.distributed.sequence_parallel_attention`
  (without its input checks), which moves only the key/value tiles the pattern lets each
  rank's rows see;
* ``all-gather``: the same code with :meth:`ExchangePlan.all_gather`, which moves every
  key and value to every rank (the bytes of an all-gather of K and V).

Times are the median of ``--iters`` steps on each rank, then the slowest rank's (the step
of the group): forward (no gradients) and forward + backward. Bytes are what one rank
receives in the forward pass (the backward sends as many gradient bytes back), the most
any rank receives. Prints a table, writes JSON with ``--json``.

    torchrun --nproc-per-node 8 benchmarks/distributed.py --json results/distributed-8gpu.json
    torchrun --nproc-per-node 1 benchmarks/distributed.py     # the one-GPU numbers to scale against
    torchrun --nproc-per-node 4 benchmarks/distributed.py --cpu --seq-lens 4096 --iters 3
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist

import sparsedsl as sd
from sparsedsl.distributed import ExchangePlan, exchange_plan
from sparsedsl.distributed.attention import attend_with_plan

# name: (pattern text, zigzag)
CASES = {
    "window": ("window(2048)", False),
    "longnet": ("segments([2048, 4096, 8192, 16384], [1, 2, 4, 8])", False),
    "longnet-wide": ("segments([2048, 8192, 32768, 131072], [1, 4, 16, 64])", False),
    "causal-zigzag": ("causal()", True),
}
GPU_SEQ_LENS = "131072,262144,524288"
CPU_SEQ_LENS = "4096,8192"


def init_group(cpu: bool) -> torch.device:
    """Join the group torchrun describes (or a group of one without torchrun)."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    if cpu:
        dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=10))
        return torch.device("cpu")
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", timeout=datetime.timedelta(minutes=10), device_id=device)
    return device


def step_ms(step, device: torch.device, warmup: int, iters: int) -> float:
    """The slowest rank's median milliseconds of ``step()``."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    slowest = torch.tensor([statistics.median(times)], dtype=torch.float64, device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return slowest.item()


def most_over_ranks(value: int, device: torch.device) -> int:
    largest = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(largest, op=dist.ReduceOp.MAX)
    return int(largest.item())


def run_case(name: str, seq_len: int, args, device: torch.device) -> list[dict]:
    text, zigzag = CASES[name]
    rank, world_size = dist.get_rank(), dist.get_world_size()
    compiled = sd.compile(sd.parse(text), block_size=args.block_size)
    dtype = torch.float32 if args.cpu else torch.bfloat16
    # Random shards made in place (the values do not matter for speed; the full tensors of a
    # 512K-token sequence would not fit one host's memory comfortably).
    torch.manual_seed(rank)
    q, k, v = (torch.randn(args.batch, heads, seq_len // world_size, args.head_dim, device=device,
                           dtype=dtype)
               for heads in (args.heads, args.kv_heads, args.kv_heads))
    plans = {
        "sparse": exchange_plan(compiled, seq_len, world_size, zigzag=zigzag, heads=args.heads,
                                device=device),
        "all-gather": ExchangePlan.all_gather(seq_len, world_size, zigzag, compiled.kv_block),
    }
    rows = []
    for mode, plan in plans.items():
        row = {"case": name, "pattern": text, "zigzag": zigzag, "seq_len": seq_len,
               "world_size": world_size, "mode": mode, "batch": args.batch, "heads": args.heads,
               "kv_heads": args.kv_heads, "head_dim": args.head_dim, "dtype": str(dtype)}
        def forward():
            with torch.no_grad():
                return attend_with_plan(compiled, q, k, v, plan, rank, None, None, {})

        grads = [t.detach().requires_grad_() for t in (q, k, v)]

        def forward_backward():
            out, _ = attend_with_plan(compiled, *grads, plan, rank, None, None, {})
            out.backward(torch.ones_like(out))

        _, stats = forward()
        row["received_bytes_max"] = most_over_ranks(stats.received_bytes, device)
        row["all_gather_bytes"] = stats.all_gather_bytes
        row["fwd_ms"] = step_ms(forward, device, args.warmup, args.iters)
        row["fwdbwd_ms"] = step_ms(forward_backward, device, args.warmup, args.iters)
        rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'case':14} {'N':>8} {'P':>3} {'mode':10} {'fwd ms':>9} {'f+b ms':>9} "
          f"{'recv MB':>9} {'of all-gather':>13}")
    for r in rows:
        times = f"{r['fwd_ms']:9.2f} {r['fwdbwd_ms']:9.2f}"
        fraction = (f"{r['received_bytes_max'] / r['all_gather_bytes']:13.3f}" if r["all_gather_bytes"]
                    else f"{'-':>13}")
        print(f"{r['case']:14} {r['seq_len']:8d} {r['world_size']:3d} {r['mode']:10} {times} "
              f"{r['received_bytes_max'] / 2**20:9.2f} {fraction}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="gloo on the CPU instead of NCCL on GPUs")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {list(CASES)}")
    parser.add_argument("--seq-lens", default=None,
                        help=f"comma-separated (default {GPU_SEQ_LENS} on GPUs, {CPU_SEQ_LENS} with --cpu)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=None, help="default 16 on GPUs, 4 with --cpu")
    parser.add_argument("--kv-heads", type=int, default=None, help="default: --heads")
    parser.add_argument("--head-dim", type=int, default=None, help="default 128 on GPUs, 32 with --cpu")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    args.heads = args.heads or (4 if args.cpu else 16)
    args.kv_heads = args.kv_heads or args.heads
    args.head_dim = args.head_dim or (32 if args.cpu else 128)
    seq_lens = [int(n) for n in (args.seq_lens or (CPU_SEQ_LENS if args.cpu else GPU_SEQ_LENS)).split(",")]
    if args.cpu:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("WORLD_SIZE", "1"))))
    device = init_group(args.cpu)
    meta = {"device": "cpu" if args.cpu else torch.cuda.get_device_name(device),
            "backend": dist.get_backend(), "world_size": dist.get_world_size(),
            "torch": torch.__version__}
    rows = []
    for name in args.cases.split(","):
        for seq_len in seq_lens:
            rows.extend(run_case(name, seq_len, args, device))
            if dist.get_rank() == 0:
                print(json.dumps(rows[-2]), json.dumps(rows[-1]), sep="\n", flush=True)
                if args.json:  # after every case, so that a run cut short keeps what it measured
                    with open(args.json, "w") as f:
                        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    if dist.get_rank() == 0:
        print()
        print_table(rows)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
