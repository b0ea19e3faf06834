"""``sparsedsl demo``: one pattern compiled, counted, drawn, checked and timed on the CPU.

The default pattern is ``dilated_attention_pytorch``'s ``BlockSparseDilatedAttention(
segment_lengths=[128, 128], dilation_rates=[1, 2], block_size=256)`` with a one-block
local window, written in the language. The demo prints the pattern's tile map and counts,
the plan the compiler picks (with its candidates), then runs the compiled attention on
random inputs, checks it against the dense reference (one softmax over each row's allowed
keys, in float64) and compares its time with dense SDPA given the same boolean mask.
"""

from __future__ import annotations

import sys
import time

import torch

from .analysis.count import count
from .budget import check_memory
from .compiler.module import compile as compile_pattern
from .draw.terminal import show
from .lang.checks import check_int
from .lang.parse import parse
from .passes.dense import dense

DEFAULT_PATTERN = "blocks(256).local(1).within(segments([128, 128], [1, 2]))"


def dense_reference(allowed: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    scale: float) -> torch.Tensor:
    """Masked-softmax attention in float64 over the boolean ``allowed`` mask (``[H, Q, K]``):
    the reference output. A row with no allowed key outputs 0."""
    out = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), attn_mask=allowed, scale=scale)
    return torch.where(allowed.any(-1)[..., None], out, torch.zeros((), dtype=out.dtype))


def _timed(fn) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def run_demo(text: str = DEFAULT_PATTERN, seq_len: int = 2048, heads: int = 8, head_dim: int = 64,
             batch: int = 2, tile: int = 128, file=None) -> float:
    """Print the pattern, its tile map and counts, and its plan; run the compiled attention
    on random CPU inputs against the dense reference and time it once against dense SDPA
    with the same mask. Returns the max abs error."""
    out = file or sys.stdout
    for name, value in (("seq_len", seq_len), ("heads", heads), ("head_dim", head_dim), ("batch", batch)):
        check_int("demo", name, value, minimum=1)
    check_memory("demo", f"the dense reference of seq_len={seq_len:,} ({batch} x {heads} x {seq_len:,} x "
                 f"{seq_len:,} float64 scores and a bool mask)", batch * heads * seq_len * seq_len * 9)
    pattern = parse(text)
    print(f"pattern: {pattern}\n", file=out)
    show(pattern, seq_len, heads=heads, tile=tile, counts=False, file=out)
    c = count(pattern, seq_len, heads=heads, tile=tile)
    print(f"{c.pairs:,} allowed pairs over {heads} heads (density {c.density:.4f})", file=out)
    module = compile_pattern(pattern, block_size=tile)
    plan = module.explain(seq_len, heads=heads, head_dim=head_dim, device="cpu")
    print("\n" + str(plan), file=out)

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, seq_len, head_dim, generator=gen) for _ in range(3))
    allowed = dense(pattern, seq_len, heads=heads)
    scale = head_dim ** -0.5
    result, ours = _timed(lambda: module(q, k, v))
    _, theirs = _timed(lambda: torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=allowed, scale=scale))
    error = (result.double() - dense_reference(allowed, q, k, v, scale)).abs().max().item()
    print(f"\nrandom inputs [batch {batch}, heads {heads}, {seq_len:,} tokens, head dim {head_dim}], "
          f"CPU, float32, one call each:", file=out)
    print(f"  sparsedsl ({plan.kind} plan): {ours * 1e3:.1f} ms; dense SDPA with the boolean mask: "
          f"{theirs * 1e3:.1f} ms; dense time / sparsedsl time = {theirs / ours:.2f}x", file=out)
    print(f"  max |sparsedsl - dense reference| = {error:.2e}", file=out)
    return error
