"""``sparsedsl demo``: compile, count and draw one pattern, and check the attention it runs.

The default pattern is the seed guide's ``BlockSparseDilatedAttention(segment_lengths=[128,
128], dilation_rates=[1, 2], block_size=256)`` with a one-block local window, written in
the language.
"""

from __future__ import annotations

import sys
import time

import torch

from .analysis.count import count
from .compiler.module import compile as compile_pattern
from .draw.terminal import show
from .lang import nodes as n
from .lang.parse import parse
from .passes.dense import dense_attention_weights

DEFAULT_PATTERN = "blocks(256).local(1).within(segments([128, 128], [1, 2]))"


def reference_attention(pattern: n.Pattern, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        scale: float) -> torch.Tensor:
    """Softmax over the dense mask (DESIGN.md §1), in float64: the reference output."""
    weights = dense_attention_weights(pattern, q.double(), k.double(), scale)
    return weights @ v.double().repeat_interleave(q.shape[1] // v.shape[1], 1)


def run_demo(text: str = DEFAULT_PATTERN, seq_len: int = 2048, heads: int = 8, head_dim: int = 64,
             batch: int = 2, tile: int = 128, file=None) -> float:
    """Print the pattern, its tile map and counts and its plan; run the compiled attention
    on random CPU inputs against the dense reference. Returns the max abs error."""
    out = file or sys.stdout
    pattern = parse(text)
    print(f"pattern: {pattern}\n", file=out)
    show(pattern, seq_len, heads=heads, tile=tile, file=out)
    module = compile_pattern(pattern, block_size=tile)
    print("\n" + str(module.explain(seq_len, heads=heads, head_dim=head_dim, device="cpu")), file=out)

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, seq_len, head_dim, generator=gen) for _ in range(3))
    start = time.perf_counter()
    result = module(q, k, v)
    elapsed = time.perf_counter() - start
    expected = reference_attention(pattern, q, k, v, head_dim ** -0.5)
    error = (result.double() - expected).abs().max().item()
    pairs = count(pattern, seq_len, heads=heads, tile=tile).pairs
    print(f"\nattention on random inputs [{batch}, {heads}, {seq_len}, {head_dim}] (CPU, float32): "
          f"{elapsed * 1e3:.1f} ms; max |out - dense reference| = {error:.2e}; "
          f"{pairs:,} allowed pairs per batch entry", file=out)
    return error
