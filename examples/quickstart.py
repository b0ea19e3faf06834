"""Quickstart: describe a sparse attention pattern, count it, compile it, run it, check it.

    python examples/quickstart.py [--seq-len 1024]

Runs on the CPU in a few seconds (on a GPU too: the compiled module picks its plan per
device).
"""

from __future__ import annotations

import argparse

import torch

import sparsedsl as sd
from sparsedsl.draw.terminal import show


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=1024)
    args = parser.parse_args()
    n, batch, heads, head_dim = args.seq_len, 2, 4, 32
    device = "cuda" if torch.cuda.is_available() else "cpu"

    # 1. A pattern: a local window of 64 tokens on each side, plus 16 global tokens.
    pattern = sd.window(64) | sd.global_tokens(16)
    print(f"pattern: {pattern}")
    assert sd.parse(str(pattern)) == pattern  # the text form reads back as the same pattern

    # 2. What it allows, exactly, and how a tile-based kernel sees it.
    show(pattern, n, tile=max(16, n // 16))
    counts = sd.count(pattern, n)
    print(f"{counts.pairs:,} of {n * n:,} pairs allowed (density {counts.density:.4f})")

    # 3. Compile to an nn.Module and run it: [batch, heads, seq, head_dim] inputs.
    attention = sd.compile(pattern)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, n, head_dim, generator=gen).to(device) for _ in range(3))
    out = attention(q, k, v)
    print(f"output {tuple(out.shape)} on {device}")
    print(attention.explain(n, heads=heads, head_dim=head_dim, device=device))

    # 4. Check it: one softmax over the allowed keys of each row (the dense reference).
    allowed = sd.dense(pattern, n).to(device)
    scores = (q.double() @ k.double().transpose(-1, -2)) * head_dim ** -0.5
    expected = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ v.double()
    error = (out.double() - expected).abs().max().item()
    print(f"max |output - dense reference| = {error:.2e}")
    assert error < (3e-2 if out.dtype != torch.float32 else 1e-4)

    # 5. Named patterns from the catalog, and an nn.MultiheadAttention-style module.
    bigbird = sd.load("bigbird")
    print(f"bigbird: {bigbird}, density at {n} tokens: {sd.count(bigbird, n).density:.4f}")
    mha = sd.MultiheadSparseAttention(64, 4, "sliding_window(window=128)", batch_first=True).to(device)
    x = torch.randn(batch, n, 64, generator=gen).to(device)
    y, _ = mha(x, x, x)
    print(f"MultiheadSparseAttention({mha.pattern}): {tuple(x.shape)} -> {tuple(y.shape)}")
    print("quickstart: OK")


if __name__ == "__main__":
    main()
