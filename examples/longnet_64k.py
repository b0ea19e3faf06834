"""LongNet's dilated attention (Ding et al. 2023, arXiv:2307.02486) at 64K tokens.

    python examples/longnet_64k.py [--seq-len N] [--heads H] [--device cuda|cpu]

On a GPU it runs the paper's configuration (segment lengths 2,048 … 32,768 with dilation
rates 1, 2, 4, 6, 12; five head groups) on 65,536 tokens in bfloat16, times it against
dense attention, and checks sampled rows against LongNet's definition. Without a GPU it
falls back to a CPU-sized problem: 4,096 tokens with the segment lengths scaled by the same
factor (128 … 2,048), in float32.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import sparsedsl as sd
from sparsedsl.lang.groups import head_groups
from sparsedsl.patterns import PAPER_DILATION_RATES, PAPER_SEGMENT_LENGTHS

PAPER_LENGTH = 65536


def timed(fn, device: str, repeats: int) -> tuple[torch.Tensor, float]:
    out = fn()  # warm-up: compiles kernels on a GPU
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return out, (time.perf_counter() - start) / repeats


def longnet_row(q, k, v, head, pos, lengths, rates, offsets, groups):
    """One output row from LongNet's definition (float64), or None for a skipped row."""
    group = next(i for i, g in enumerate(groups) if head in g)
    s, r, o = lengths[group], rates[group], offsets[group]
    start = pos // s * s
    if (pos - start) % r != o:
        return None
    keys = torch.arange(start, min(start + s, q.shape[1]))
    keys = keys[(keys - start) % r == o]
    kv_head = head // (q.shape[2] // k.shape[2])
    qi = q[0, pos, head].double().cpu()
    ks = k[0, keys, kv_head].double().cpu()
    vs = v[0, keys, kv_head].double().cpu()
    weights = torch.softmax(ks @ qi * q.shape[-1] ** -0.5, 0)
    return weights @ vs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seq-len", type=int, default=None,
                        help="default: 65536 on a GPU, 4096 on the CPU")
    parser.add_argument("--heads", type=int, default=None, help="default: 10 on a GPU, 5 on the CPU")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    gpu = args.device == "cuda"
    n = args.seq_len or (PAPER_LENGTH if gpu else 4096)
    heads = args.heads or (10 if gpu else 5)
    repeats = args.repeats or (10 if gpu else 1)
    dtype = torch.bfloat16 if gpu else torch.float32

    # The paper's setup at 64K tokens; shorter sequences scale the segments with the length.
    scale = min(1.0, n / PAPER_LENGTH)
    lengths = [max(r, int(s * scale)) for s, r in zip(PAPER_SEGMENT_LENGTHS, PAPER_DILATION_RATES)]
    rates = list(PAPER_DILATION_RATES)
    attention = sd.DilatedAttention(lengths, rates)
    pattern = attention.pattern
    print(f"device: {args.device} ({'GPU' if gpu else 'CPU-sized fallback'}), "
          f"{n:,} tokens, {heads} heads, head_dim {args.head_dim}, {dtype}")
    print(f"pattern: {pattern}")

    counts = sd.count(pattern, n, heads=heads, tile=128)
    print(f"allowed pairs: {counts.pairs:,} of {heads * n * n:,} (density {counts.density:.5f})")
    print("per head group: " + ", ".join(
        f"w={s} r={r}: {counts.per_head[h]:,}" for s, r, h in
        zip(lengths, rates, [g.start for g in head_groups(heads, len(lengths))])))

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n, heads, args.head_dim, generator=gen).to(args.device, dtype)
               for _ in range(3))
    with torch.no_grad():
        out, sparse_s = timed(lambda: attention(q, k, v), args.device, repeats)
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        _, dense_s = timed(lambda: F.scaled_dot_product_attention(qt, kt, vt), args.device, repeats)
    print(f"LongNet dilated attention: {sparse_s * 1e3:.1f} ms; dense attention: "
          f"{dense_s * 1e3:.1f} ms ({dense_s / sparse_s:.1f}x); the pattern keeps "
          f"{counts.density:.2%} of the pairs")
    print(sd.compile(pattern).explain(n, heads=heads, head_dim=args.head_dim, device=args.device,
                                      dtype=dtype))

    # Sampled rows against LongNet's definition (strided positions inside segments).
    groups = head_groups(heads, len(lengths))
    picks = torch.Generator().manual_seed(1)
    worst, checked = 0.0, 0
    for _ in range(64):
        head = int(torch.randint(heads, (1,), generator=picks))
        pos = int(torch.randint(n, (1,), generator=picks))
        want = longnet_row(q, k, v, head, pos, lengths, rates, attention.offsets, groups)
        got = out[0, pos, head].double().cpu()
        if want is None:
            assert got.abs().max() == 0
            continue
        worst, checked = max(worst, (got - want).abs().max().item()), checked + 1
    print(f"checked {checked} sampled rows (and the skipped ones are zero): max error {worst:.2e}")
    assert worst < (3e-2 if dtype != torch.float32 else 1e-4)
    print("longnet_64k: OK")


if __name__ == "__main__":
    main()
