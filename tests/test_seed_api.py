"""The seed library's API (SparsePatternConfig, BlockSparseAttention,
BlockSparseDilatedAttention) against the dense reference and the guide's claims."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsedsl as sd
from reference import reference_attention
from sparsedsl.modules import seed as seed_module
from sparsedsl.modules import (
    BlockSparseAttention, BlockSparseDilatedAttention, SparsePatternConfig,
)
from sparsedsl.patterns import seed as seed_patterns

TYPES = ("local_window", "dilated_sparse", "global_local")


def _bnhd(batch, q_len, heads, dim, *, kv_len=None, kv_heads=None, seed=0, dtype=torch.float32,
          requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    kv_len = q_len if kv_len is None else kv_len
    kv_heads = heads if kv_heads is None else kv_heads
    def make(n, h):
        return torch.randn(batch, n, h, dim, generator=gen, dtype=dtype).requires_grad_(requires_grad)
    return make(q_len, heads), make(kv_len, kv_heads), make(kv_len, kv_heads)


def _reference_bnhd(pattern, q, k, v):
    out, _ = reference_attention(pattern, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def _active_blocks(pattern, seq_len, block, heads=1):
    tiles = sd.count(pattern, seq_len, heads=heads, tile=block).tiles_per_head[0]
    return tiles.full + tiles.partial


# -- SparsePatternConfig ----------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [
    {"pattern_type": "hierarchical"},
    {"sparsity_ratio": 0.0},
    {"sparsity_ratio": 1.5},
    {"sparsity_ratio": "0.1"},
    {"sparsity_ratio": True},
    {"block_size": 0},
    {"block_size": 2.5},
    {"window_size": 0},
    {"global_tokens": -1},
    {"dilation_rates": []},
    {"dilation_rates": [0, 2]},
])
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        SparsePatternConfig(**kwargs)


def test_config_is_a_frozen_normalised_dataclass():
    config = SparsePatternConfig("dilated_sparse", 0.2, 64, dilation_rates=[4, 1, 2, 2])
    assert config.dilation_rates == (1, 2, 4)
    assert config == SparsePatternConfig(pattern_type="dilated_sparse", sparsity_ratio=0.2,
                                         block_size=64, dilation_rates=(1, 2, 4))
    assert hash(config) == hash(copy.deepcopy(config))
    with pytest.raises(AttributeError):
        config.block_size = 32


@pytest.mark.parametrize("pattern_type", TYPES)
@pytest.mark.parametrize("ratio", [0.05, 0.1, 0.2, 0.3])
def test_sparsity_ratio_is_the_active_block_fraction_at_16k(pattern_type, ratio):
    # 16K tokens, 256-token blocks: within 25% relative for every pattern type.
    config = SparsePatternConfig(pattern_type=pattern_type, sparsity_ratio=ratio, block_size=256)
    for module in (BlockSparseAttention(sparse_config=config),
                   BlockSparseDilatedAttention([128, 128], [1, 2], sparse_config=config)):
        pattern = module.pattern_for(16384)
        active = _active_blocks(pattern, 16384, 256, heads=2)
        assert abs(active / 4096 - ratio) / ratio < 0.25, (pattern, active)


def test_guide_numbers_local_window_at_16k():
    # The guide's "~410 active blocks (10%)"; the seed library computes 64 (the diagonal).
    config = SparsePatternConfig(pattern_type="local_window", sparsity_ratio=0.1, block_size=256)
    pattern = BlockSparseAttention(sparse_config=config).pattern_for(16384)
    assert pattern == sd.blocks(256).local(3)
    assert _active_blocks(pattern, 16384, 256) == 436


def test_window_size_replaces_the_ratio_with_the_seed_rule():
    config = SparsePatternConfig(block_size=256, window_size=256)  # the seed's default: diagonal
    assert config.block_pattern(16384) == sd.blocks(256).local(0)
    config = SparsePatternConfig(block_size=256, window_size=1000)  # 4 blocks -> 2 each side
    assert config.block_pattern(16384) == sd.blocks(256).local(2)
    config = SparsePatternConfig("global_local", block_size=64, window_size=192, global_tokens=100)
    assert config.block_pattern(4096) == sd.blocks(64).local(1).global_(2)
    config = SparsePatternConfig("dilated_sparse", block_size=64, window_size=128, dilation_rates=[1, 3])
    assert config.block_pattern(4096) == sd.blocks(64).dilated([1], window=1).dilated([3], window=3)


@settings(max_examples=60)
@given(pattern_type=st.sampled_from(TYPES), nq=st.integers(1, 24), nk=st.integers(1, 24),
       knob=st.integers(0, 30), global_blocks=st.integers(0, 3),
       rates=st.lists(st.integers(1, 5), min_size=1, max_size=3, unique=True))
def test_closed_form_block_counts_equal_count(pattern_type, nq, nk, knob, global_blocks, rates):
    rates = tuple(sorted(rates))
    got = seed_patterns.active_blocks(pattern_type, nq, nk, knob, global_blocks=global_blocks,
                                      rates=rates)
    pattern = sd.blocks(16)
    if pattern_type == "dilated_sparse":
        for r, s in zip(rates, seed_patterns._dilated_windows(rates, knob)):
            pattern = pattern.dilated([r], window=r * s)
        pattern = pattern.local(0)
    else:
        pattern = pattern.local(knob)
        if pattern_type == "global_local" and global_blocks:
            pattern = pattern.global_(global_blocks)
    counts = sd.count(pattern, nq * 16, nk * 16, tile=16)
    assert got == counts.tiles.full + counts.tiles.partial


# -- outputs against the dense reference ----------------------------------------------------------

CASES = [
    # pattern_type, ratio, block, q_len, kv_len, heads, kv_heads, causal
    ("local_window", 0.3, 32, 200, None, 2, None, False),
    ("dilated_sparse", 0.25, 16, 150, None, 3, 1, False),
    ("global_local", 0.2, 32, 257, None, 4, 2, True),
    ("local_window", 0.5, 64, 100, 140, 2, None, False),
    ("global_local", 0.4, 16, 99, None, 1, None, False),
]


@pytest.mark.parametrize("case", CASES)
def test_block_sparse_attention_equals_dense_softmax(case):
    pattern_type, ratio, block, q_len, kv_len, heads, kv_heads, causal = case
    config = SparsePatternConfig(pattern_type, ratio, block, global_tokens=20)
    module = BlockSparseAttention(sparse_config=config)
    q, k, v = _bnhd(2, q_len, heads, 16, kv_len=kv_len, kv_heads=kv_heads)
    out = module(q, k, v, is_causal=causal)
    pattern = config.block_pattern(q_len, kv_len)
    expected = _reference_bnhd(pattern & sd.causal() if causal else pattern, q, k, v)
    assert out.shape == q.shape
    assert (out.double() - expected).abs().max() < 1e-5
    assert module.pattern == (pattern & sd.causal() if causal else pattern)


@pytest.mark.parametrize("case", CASES)
def test_block_sparse_dilated_attention_equals_dense_softmax(case):
    pattern_type, ratio, block, q_len, kv_len, heads, kv_heads, causal = case
    heads = max(heads, 2) * (kv_heads or 1)
    config = SparsePatternConfig(pattern_type, ratio, block)
    lengths, rates = [block // 2, block], [1, 2]
    module = BlockSparseDilatedAttention(lengths, rates, sparse_config=config)
    q, k, v = _bnhd(1, q_len, heads, 8, kv_len=kv_len, kv_heads=kv_heads, seed=3)
    out = module(q, k, v, is_causal=causal)
    pattern = config.block_pattern(q_len, kv_len).within(sd.segments(lengths, rates))
    if causal:
        pattern = pattern & sd.causal()
    assert module.pattern == pattern
    assert (out.double() - _reference_bnhd(pattern, q, k, v)).abs().max() < 1e-5


def test_gradients_flow_and_match_the_reference():
    config = SparsePatternConfig("global_local", 0.3, 16)
    module = BlockSparseAttention(sparse_config=config)
    q, k, v = _bnhd(1, 70, 2, 8, dtype=torch.float64, requires_grad=True)
    out = module(q, k, v, is_causal=True)
    expected = _reference_bnhd(config.block_pattern(70) & sd.causal(), q, k, v)
    got = torch.autograd.grad(out.square().sum(), (q, k, v))
    want = torch.autograd.grad(expected.square().sum(), (q, k, v))
    for g, w in zip(got, want):
        assert (g - w).abs().max() < 1e-9


def test_dilated_version_matches_the_design_and_catalog_forms():
    config = SparsePatternConfig(pattern_type="local_window", sparsity_ratio=0.1, block_size=256)
    module = BlockSparseDilatedAttention(segment_lengths=[128, 128], dilation_rates=[1, 2],
                                         sparse_config=config)
    expected = sd.blocks(256).local(3).within(sd.segments([128, 128], [1, 2]))
    assert module.pattern_for(16384) == expected
    assert module.pattern_for(16384) == sd.patterns.block_sparse_dilated()
    assert str(module.pattern) == "blocks(256).local(3).within(segments([128, 128], [1, 2]))"


# -- return_attention_weights ----------------------------------------------------------------------

def _block_pairs_from_dense(pattern, q_len, kv_len, heads, block):
    allowed = sd.dense(pattern, q_len, kv_len, heads=heads).any(0)
    nq, nk = -(-q_len // block), -(-kv_len // block)
    padded = torch.zeros(nq * block, nk * block, dtype=torch.bool)
    padded[:q_len, :kv_len] = allowed
    tiles = padded.view(nq, block, nk, block).any(3).any(1)
    return tiles.nonzero()


@pytest.mark.parametrize("dilated", [False, True])
def test_attention_weights_info(dilated):
    config = SparsePatternConfig("global_local", 0.3, 32)
    module = (BlockSparseDilatedAttention([16, 32], [2, 1], sparse_config=config) if dilated
              else BlockSparseAttention(sparse_config=config))
    q, k, v = _bnhd(2, 150, 4, 8, seed=5)
    out, info = module(q, k, v, return_attention_weights=True)
    pattern = module.pattern
    pairs = _block_pairs_from_dense(pattern, 150, 150, 4, 32)
    assert torch.equal(info["block_pairs"], pairs)
    assert torch.equal(info["indices"], pairs.t())
    assert info["total_blocks"] == 25 and info["active_blocks"] == pairs.shape[0]
    assert info["sparsity_ratio"] == pytest.approx(pairs.shape[0] / 25)
    assert info["shape"] == (2, 4, 150, 150) and info["block_size"] == 32
    assert info["pattern"] == pattern
    weights = info["weights"]
    assert weights.shape == (2, 4, 150, 150)
    # One softmax per row: rows sum to 1 (or 0 where no key is allowed), never 3.
    sums = weights.sum(-1)
    assert torch.all(((sums - 1).abs() < 1e-5) | (sums == 0))
    assert not weights.requires_grad
    assert (weights @ v.transpose(1, 2) - out.transpose(1, 2)).abs().max() < 1e-5
    allowed = sd.dense(pattern, 150, heads=4)
    assert torch.all(weights[:, ~allowed] == 0)


def test_attention_weights_are_not_materialised_when_too_large(monkeypatch):
    monkeypatch.setattr(seed_module, "MAX_DENSE_WEIGHTS", 1000)
    module = BlockSparseAttention(sparse_config=SparsePatternConfig(block_size=16))
    q, k, v = _bnhd(1, 64, 1, 8)
    out, info = module(q, k, v, return_attention_weights=True)
    assert info["weights"] is None and info["block_pairs"].shape[1] == 2


# -- errors, state, copies ------------------------------------------------------------------------

def test_mismatched_segments_and_rates_raise_value_error():
    with pytest.raises(ValueError, match="same length"):
        BlockSparseDilatedAttention([128, 128], [1, 2, 4])
    with pytest.raises(ValueError):
        BlockSparseDilatedAttention([4, 8], [8, 1])  # rate above its segment length
    with pytest.raises(ValueError, match="block_size"):
        BlockSparseDilatedAttention([512], [1], sparse_config=SparsePatternConfig(block_size=256))
    with pytest.raises(ValueError):
        BlockSparseDilatedAttention(128, 1)


def test_too_few_heads_and_bad_shapes_raise():
    module = BlockSparseDilatedAttention([16, 16, 16], [1, 2, 4], SparsePatternConfig(block_size=16))
    q, k, v = _bnhd(1, 32, 2, 8)
    with pytest.raises(ValueError, match="head"):
        module(q, k, v)
    with pytest.raises(ValueError, match="4-D"):
        BlockSparseAttention()(q[0], k[0], v[0])
    with pytest.raises(TypeError):
        BlockSparseAttention(sparse_config="local_window")


@pytest.mark.parametrize("keyword", ["is_causal", "return_attention_weights"])
@pytest.mark.parametrize("value", ["False", 1, None])
def test_flags_must_be_booleans(keyword, value):
    q, k, v = _bnhd(1, 32, 2, 8)
    with pytest.raises(TypeError, match=f"'{keyword}' must be True or False"):
        BlockSparseAttention(SparsePatternConfig(block_size=16))(q, k, v, **{keyword: value})


def test_default_config_dict_config_and_pattern_before_any_call():
    assert BlockSparseAttention().sparse_config == SparsePatternConfig()
    module = BlockSparseAttention(sparse_config={"pattern_type": "global_local", "block_size": 64})
    assert module.sparse_config.pattern_type == "global_local"
    assert module.pattern == module.pattern_for(16384)
    q, k, v = _bnhd(1, 100, 1, 8)
    module(q, k, v, is_causal=True)
    assert module.pattern == module.pattern_for(100, is_causal=True)


def test_state_dict_round_trip_and_deepcopy():
    config = SparsePatternConfig("dilated_sparse", 0.3, 16)
    module = BlockSparseDilatedAttention([8, 16], [1, 2], sparse_config=config)
    assert module.state_dict() == {}
    other = BlockSparseDilatedAttention([8, 16], [1, 2], sparse_config=config)
    other.load_state_dict(module.state_dict())
    clone = copy.deepcopy(module)
    q, k, v = _bnhd(2, 90, 2, 8)
    out = module(q, k, v)
    assert torch.equal(clone(q, k, v), out)
    assert torch.equal(other(q, k, v), out)
    assert clone.sparse_config == config and clone.segment_lengths == (8, 16)
    assert "segment_lengths=[8, 16]" in repr(module)


def test_half_precision_runs():
    module = BlockSparseAttention(sparse_config=SparsePatternConfig(block_size=32))
    q, k, v = _bnhd(1, 64, 2, 16, dtype=torch.bfloat16)
    out = module(q, k, v)
    assert out.dtype == torch.bfloat16
    expected = _reference_bnhd(module.pattern, q, k, v)
    assert (out.double() - expected).abs().max() < 3e-2


def test_random_configs_against_reference():
    rng = random.Random(0)
    for trial in range(6):
        pattern_type = rng.choice(TYPES)
        block = rng.choice([8, 16, 24, 32])
        q_len = rng.randint(1, 120)
        config = SparsePatternConfig(pattern_type, rng.uniform(0.05, 1.0), block,
                                     global_tokens=rng.randint(0, 40),
                                     dilation_rates=rng.sample([1, 2, 3, 5], 2))
        module = BlockSparseAttention(sparse_config=config)
        q, k, v = _bnhd(1, q_len, 2, 8, seed=trial)
        causal = rng.random() < 0.5
        out = module(q, k, v, is_causal=causal)
        expected = _reference_bnhd(module.pattern, q, k, v)
        assert (out.double() - expected).abs().max() < 1e-5, (config, q_len)
