"""BigBird (Zaheer et al. 2020, arXiv:2007.14062) in sparsedsl: sliding, global and random
blocks, counted, drawn, run and checked against dense attention.

    python examples/bigbird.py [--seq-len 4096] [--block-size 64] [--check-rows 256]
"""

from __future__ import annotations

import argparse
import time

import torch

import sparsedsl as sd
from sparsedsl.draw.terminal import show


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--check-rows", type=int, default=256,
                        help="query rows checked against the dense reference")
    args = parser.parse_args()
    n, b, heads, head_dim = args.seq_len, args.block_size, args.heads, 64
    device = "cuda" if torch.cuda.is_available() else "cpu"

    # BigBird-ITC: 3 sliding blocks, 2 global blocks (the first and the last), 3 random
    # blocks per block row.
    pattern = sd.load("bigbird", block_size=b)
    print(f"pattern: {pattern}")
    print(f"same as: {sd.blocks(b).local(1).global_(1).random(3, seed=0) | sd.queries(-b) | sd.keys(-b)}")
    show(pattern, n, tile=b)

    counts = sd.count(pattern, n, tile=b)
    tiles = counts.tiles
    print(f"{counts.pairs:,} pairs allowed, density {counts.density:.4f}; "
          f"{tiles.full} of {tiles.total} {b}x{b} blocks active "
          f"(about {(tiles.full + tiles.partial) / (n // b):.1f} per block row)")

    # The random blocks are a pure function of the seed: the same on every run and device.
    again = sd.dense(pattern, min(n, 1024))
    assert torch.equal(again, sd.dense(sd.parse(str(pattern)), min(n, 1024)))
    other_seed = sd.load("bigbird", block_size=b, seed=1)
    print(f"seed 1 picks other random blocks: {not torch.equal(again, sd.dense(other_seed, min(n, 1024)))}")

    attention = sd.compile(pattern, block_size=b if b in sd.BLOCK_SIZES else 128)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, head_dim, generator=gen).to(device) for _ in range(3))
    attention(q, k, v)  # warm-up (compiles on a GPU)
    start = time.perf_counter()
    out = attention(q, k, v)
    if device == "cuda":
        torch.cuda.synchronize()
    print(f"BigBird attention [1, {heads}, {n}, {head_dim}] on {device}: "
          f"{(time.perf_counter() - start) * 1e3:.1f} ms")

    # Exactness on the first query rows: one softmax over the allowed keys of each row.
    rows = min(args.check_rows, n)
    allowed = sd.dense(pattern, n)[:, :rows].to(device)
    scores = (q[:, :, :rows].double() @ k.double().transpose(-1, -2)) * head_dim ** -0.5
    expected = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ v.double()
    error = (out[:, :, :rows].double() - expected).abs().max().item()
    print(f"max |output - dense reference| over {rows} rows = {error:.2e}")
    assert error < (3e-2 if out.dtype != torch.float32 else 1e-4)
    print("bigbird: OK")


if __name__ == "__main__":
    main()
