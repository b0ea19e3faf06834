"""The band plan (a window of whole blocks as dense attention on overlapping key windows) is
exact, and runs only where it applies."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsedsl as sd
from reference import reference_attention
from sparsedsl.lang.queries import block_band


@st.composite
def band_cases(draw):
    """A band pattern, a module tile dividing its block size, a length (any: the edges take
    a last block cut short) and head counts."""
    size = draw(st.sampled_from((16, 32, 64)))
    window = draw(st.integers(0, 4))
    builder = sd.blocks(size)
    if draw(st.booleans()):
        builder = builder.local(window)
    else:
        builder = builder.dilated([draw(st.integers(2, 3)), 1], window=window)
    if draw(st.booleans()):
        builder = builder.local(draw(st.integers(0, window)))  # a narrower rule: union is the widest
    if draw(st.booleans()):
        builder = builder.causal()
    tile = draw(st.sampled_from([t for t in (16, 32, 64) if size % t == 0]))
    length = draw(st.integers(1, 12 * size))
    heads = draw(st.integers(1, 4))
    kv_heads = draw(st.sampled_from([h for h in range(1, heads + 1) if heads % h == 0]))
    return builder, tile, length, heads, kv_heads


@settings(max_examples=120)
@given(case=band_cases(), seed=st.integers(0, 2**16), batch=st.integers(1, 2), grad=st.booleans())
def test_band_plan_is_exact(case, seed, batch, grad):
    pattern, tile, length, heads, kv_heads = case
    module = sd.compile(pattern, block_size=tile, kernel="band")
    plan = module.explain(length, heads=heads, head_dim=8, device="cpu", dtype=torch.float64)
    assert plan.kind == "band"
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, length, 8, generator=gen, dtype=torch.float64, requires_grad=grad)
    k = torch.randn(batch, kv_heads, length, 8, generator=gen, dtype=torch.float64, requires_grad=grad)
    v = torch.randn(batch, kv_heads, length, 8, generator=gen, dtype=torch.float64, requires_grad=grad)
    out, lse = module(q, k, v, return_lse=True)
    expected, expected_lse = reference_attention(pattern, q, k, v)
    assert (out - expected).abs().max().item() < 1e-12
    finite = torch.isfinite(expected_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert (lse[finite] - expected_lse[finite]).abs().max().item() < 1e-12
    if grad:
        weights = torch.randn(out.shape, generator=gen, dtype=torch.float64)
        got = torch.autograd.grad((out * weights).sum(), (q, k, v))
        want = torch.autograd.grad((expected * weights).sum(), (q, k, v))
        for g, w in zip(got, want):
            assert (g - w).abs().max().item() < 1e-12


def test_band_plan_takes_any_strides():
    """Inputs in the seed library's layout (batch, length, heads, dim) with batch > 1: the
    (batch, head) dimensions do not merge as views, so the plan copies them once."""
    pattern = sd.blocks(32).local(2)
    module = sd.compile(pattern, block_size=32, kernel="band")
    q, k, v = (torch.randn(3, 200, 4, 8, dtype=torch.float64) for _ in range(3))
    out = module(q, k, v, layout="bnhd")
    expected, _ = reference_attention(pattern, *(t.transpose(1, 2) for t in (q, k, v)))
    assert (out.transpose(1, 2) - expected).abs().max().item() < 1e-12


@pytest.mark.parametrize("pattern,band", [
    (sd.blocks(128).local(25), (128, 25, 25)),
    (sd.blocks(256).local(1).local(3).causal(), (256, 3, 0)),
    (sd.blocks(64).dilated([1, 4], window=2), (64, 2, 2)),
    (sd.blocks(64).dilated([2], window=2), None),  # rate 2 only: every other block
    (sd.blocks(64).dilated([1]), None),  # no window: every block
    (sd.blocks(64).local(1).global_(1), None),
    (sd.blocks(64), None),
    (sd.blocks(64).local(1).within(sd.dilated(32, 2)), None),
    (sd.blocks(64).local(1).score(sd.alibi()), None),
    (sd.window(128), None),
])
def test_block_band_recognises_exactly_windows_of_whole_blocks(pattern, band):
    assert block_band(pattern) == band


def test_auto_picks_the_band_for_cuda_forward_passes_only():
    module = sd.compile(sd.blocks(128).local(25))
    plan = module.explain(65536, heads=16, device="cuda")
    assert plan.kind == "band" and plan.computed_flops == plan.useful_flops
    assert module.explain(65536, heads=16, device="cuda", requires_grad=True).kind == "flex"
    assert module.explain(65536, heads=16, device="cuda", dtype=torch.float32).kind == "flex"
    assert module.explain(65536, heads=16, device="cpu").kind == "tile_sdpa"
    # Too short: the edge rows (25 blocks at each end) would be most of the work.
    assert module.explain(8192, heads=16, device="cuda").kind == "flex"
    # Too little work for the fixed cost of the edge call (measured: flex is faster), unless
    # the batch is large.
    narrow = sd.compile(sd.blocks(128).local(6))
    assert narrow.explain(16384, heads=16, device="cuda").kind == "flex"
    assert narrow.explain(16384, heads=16, batch=4, device="cuda").kind == "band"
    # Blocks smaller than FlexAttention's CUDA tile (128): the edges could not be cut by tiles.
    assert sd.compile(sd.blocks(64).local(2)).explain(8192, device="cuda").kind == "flex"
    # Only self-attention from position 0.
    assert module.explain(4096, 65536, heads=16, device="cuda").kind == "flex"


def test_band_kernel_refuses_what_is_not_a_band():
    with pytest.raises(ValueError, match="kernel='band'"):
        sd.compile(sd.window(64), kernel="band").explain(256, device="cpu")
    with pytest.raises(ValueError, match="kernel='band'"):  # block size not a multiple of the tile
        sd.compile(sd.blocks(32).local(1), block_size=64, kernel="band").explain(256, device="cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("pattern,length,heads,kv_heads", [
    (sd.blocks(128).local(6), 4000, 4, 4),
    (sd.blocks(256).local(2).causal(), 8192, 8, 2),
])
def test_gpu_band_bf16(pattern, length, heads, kv_heads):
    """cuDNN's SDPA on the strided window views, and flex on the edge rows."""
    module = sd.compile(pattern, kernel="band")
    q = torch.randn(1, heads, length, 64, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, kv_heads, length, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    with torch.no_grad():
        out = module(q, k, v)
    expected, _ = reference_attention(pattern, q.cpu(), k.cpu(), v.cpu())
    assert (out.double().cpu() - expected).abs().max().item() < 3e-2
