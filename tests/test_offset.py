"""Queries that start at a position other than 0 (``q_offset``): decoding with a KV cache
(queries aligned to the end of the keys) and the row shards of sequence parallelism.

Query row ``i`` is position ``q_offset + i``: every plan, the block mask and the counts must
equal the rows ``q_offset ..`` of the pattern on the whole ``(q_offset + Q) x K`` matrix."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import create_block_mask

import sparsedsl as sd
from reference import reference_attention
from strategies import pattern_cases
from test_blockmask import _assert_same_blocks
from test_compile import _batch_for, _inputs


@st.composite
def offset_cases(draw, max_len=300, max_depth=3, allow_scores=True):
    """``(pattern, rows, kv_len, heads, buffers, q_offset)``: the last ``rows`` query rows of
    a random case, ``q_offset = q_len - rows``."""
    pattern, q_len, kv_len, heads, buffers = draw(
        pattern_cases(max_len=max_len, max_depth=max_depth, allow_scores=allow_scores))
    rows = draw(st.integers(1, q_len))
    return pattern, rows, kv_len, heads, buffers, q_len - rows


@settings(max_examples=100)
@given(case=offset_cases(), block=st.sampled_from((16, 32, 64)), seed=st.integers(0, 2**16),
       gqa=st.booleans())
def test_offset_rows_equal_dense_softmax(case, block, seed, gqa):
    pattern, rows, kv_len, heads, buffers, offset = case
    batch = _batch_for(buffers, random.Random(seed))
    q, k, v = _inputs(batch, heads, 1 if gqa else heads, rows, kv_len, 16, seed=seed)
    module = sd.compile(pattern, block_size=block)
    out, lse = module(q, k, v, q_offset=offset, return_lse=True, **buffers)
    expected, expected_lse = reference_attention(pattern, q, k, v, q_offset=offset, **buffers)
    assert (out.double() - expected).abs().max().item() < 1e-4
    finite = torch.isfinite(expected_lse)
    assert torch.equal(torch.isfinite(lse), finite)


@settings(max_examples=30)
@given(case=offset_cases(max_len=96, max_depth=2, allow_scores=False), seed=st.integers(0, 2**16))
def test_offset_gradients_equal_dense_reference(case, seed):
    pattern, rows, kv_len, heads, buffers, offset = case
    batch = _batch_for(buffers, random.Random(seed))
    q, k, v = _inputs(batch, heads, heads, rows, kv_len, 8, dtype=torch.float64, seed=seed,
                      requires_grad=True)
    out = sd.compile(pattern, block_size=16)(q, k, v, q_offset=offset, **buffers)
    expected, _ = reference_attention(pattern, q, k, v, q_offset=offset, **buffers)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    got = torch.autograd.grad((out * weights).sum(), (q, k, v))
    want = torch.autograd.grad((expected * weights).sum(), (q, k, v))
    for g, w in zip(got, want):
        assert (g - w).abs().max().item() < 1e-9


@settings(max_examples=100)
@given(case=offset_cases(allow_scores=False), block=st.sampled_from((16, 32, 64, 128)))
def test_offset_block_mask_equals_create_block_mask_and_counts(case, block):
    pattern, rows, kv_len, heads, buffers, offset = case
    module = sd.compile(pattern, block_size=block)
    ours = module.block_mask(rows, kv_len, heads=heads, q_offset=offset, **buffers)
    mask_mod = module.mask_mod(rows, kv_len, heads=heads, q_offset=offset, **buffers)
    batch = ours.kv_num_blocks.shape[0]
    theirs = create_block_mask(mask_mod, batch, heads, rows, kv_len, device="cpu", BLOCK_SIZE=block)
    _assert_same_blocks(ours, theirs, batch, heads)
    plan = module.explain(rows, kv_len, heads=heads, q_offset=offset, device="cpu", **buffers)
    assert plan.pairs == int(sd.dense(pattern, rows, kv_len, heads=heads, q_offset=offset, **buffers).sum())
    assert plan.q_len == rows
    assert plan.q_offset == (0 if module._block_local(rows, kv_len, offset) else offset)


def test_end_alignment_is_decoding_with_a_kv_cache():
    """Prefill then one token at a time with ``q_offset="end"`` equals the full forward."""
    pattern = sd.causal() & (sd.window(20, 0) | sd.global_tokens(4))
    module = sd.compile(pattern, block_size=16)
    q, k, v = _inputs(2, 4, 2, 70, 70, 16, dtype=torch.float64, seed=3)
    full = module(q, k, v)
    prefill = module(q[:, :, :41], k[:, :, :41], v[:, :, :41])
    steps = [module(q[:, :, t:t + 1], k[:, :, :t + 1], v[:, :, :t + 1], q_offset="end")
             for t in range(41, 70)]
    assert torch.allclose(torch.cat([prefill, *steps], dim=2), full, atol=1e-12)


@pytest.mark.parametrize("q_len,kv_len", [(1, 33), (5, 33), (33, 33)])
def test_causal_end_aligned_runs_dense_sdpa_with_a_lower_right_bias(q_len, kv_len):
    module = sd.compile(sd.causal())
    plan = module.explain(q_len, kv_len, q_offset="end", device="cpu")
    assert plan.kind == "sdpa" and plan.pairs == sum(range(kv_len - q_len + 1, kv_len + 1))
    q, k, v = _inputs(1, 2, 2, q_len, kv_len, 16, dtype=torch.float64, seed=1)
    expected, _ = reference_attention(sd.causal(), q, k, v, q_offset=kv_len - q_len)
    assert torch.allclose(module(q, k, v, q_offset="end"), expected, atol=1e-12)
    # A causal pattern with its queries elsewhere is not dense SDPA's case: a few rows
    # without gradients are a decoding step, and with gradients the tile plan runs.
    assert module.explain(q_len, kv_len + 7, q_offset=3, device="cpu").kind == "decode"
    assert module.explain(q_len, kv_len + 7, q_offset=3, device="cpu", requires_grad=True).kind == "tile_sdpa"


def test_offset_patterns_with_tensors_see_absolute_positions():
    ids = torch.tensor([0] * 30 + [1] * 25 + [2] * 9)
    bias = torch.randn(64, 64)
    pattern = (sd.documents("ids") & sd.causal()).score(sd.bias("b"), sd.alibi())
    q, k, v = _inputs(1, 2, 2, 12, 64, 16, dtype=torch.float64, seed=5)
    out = sd.compile(pattern, block_size=16)(q, k, v, q_offset=52, ids=ids, b=bias)
    expected, _ = reference_attention(pattern, q, k, v, q_offset=52, ids=ids, b=bias)
    assert torch.allclose(out, expected, atol=1e-12)


@pytest.mark.parametrize("call,message", [
    (lambda m, q, k, v: m(q, k, v, q_offset=-1), "q_offset"),
    (lambda m, q, k, v: m(q, k, v, q_offset="start"), "'end'"),
    (lambda m, q, k, v: m(q, k, v, q_offset=1.5), "q_offset"),
    (lambda m, q, k, v: m(k, q, q, q_offset="end"), "q_len <= kv_len"),
    (lambda m, q, k, v: m.block_mask(8, 4, q_offset="end"), "q_len=8 and kv_len=4"),
])
def test_bad_offsets_raise_clear_errors(call, message):
    module = sd.compile(sd.window(3), block_size=16)
    q, k, v = _inputs(1, 1, 1, 4, 8, 16)
    with pytest.raises(ValueError, match=message):
        call(module, q, k, v)


def test_offset_is_a_reserved_buffer_name():
    with pytest.raises(ValueError, match="q_offset"):
        sd.documents("q_offset")


@pytest.mark.gpu
@pytest.mark.parametrize("pattern", [sd.causal() & sd.window(300, 0) | sd.global_tokens(64),
                                     sd.segments([256, 512], [1, 2])])
@pytest.mark.parametrize("q_len", [1, 5, 200])
def test_gpu_end_aligned_bf16_equals_dense_softmax(pattern, q_len):
    kv_len = 1000
    q, k, v = _inputs(2, 4, 2, q_len, kv_len, 64, dtype=torch.bfloat16, device="cuda", seed=q_len)
    out = sd.compile(pattern)(q, k, v, q_offset="end")
    expected, _ = reference_attention(pattern, q.cpu(), k.cpu(), v.cpu(), q_offset=kv_len - q_len)
    assert (out.double().cpu() - expected).abs().max().item() < 3e-2


@pytest.mark.parametrize("pattern", [sd.queries(8), sd.queries(7, 28), ~sd.queries(1, 28),
                                     sd.window(3) & sd.queries(10), sd.queries(7, 28) | sd.causal(),
                                     sd.keys(3, 9) | sd.causal() & sd.window(4, 0),
                                     # multisets: log m read at absolute positions too
                                     sd.queries(0) + sd.prefix(5), sd.blocks(4).random_causal(2, 1) + sd.causal(),
                                     (sd.queries(32) & sd.causal() + sd.chunks(48)).score(sd.alibi())], ids=str)
@pytest.mark.parametrize("q_len,kv_len,q_offset", [(1, 64, "end"), (4, 40, 20), (8, 40, "end"), (3, 200, 150)])
def test_decoding_rows_inside_and_outside_ranges_of_rows(pattern, q_len, kv_len, q_offset):
    """The decode plan evaluates ranges of rows at the queries' absolute positions: rows
    inside and past ``queries(start, stop)`` see what the dense reference gives them."""
    module = sd.compile(pattern, block_size=16)
    assert module.explain(q_len, kv_len, q_offset=q_offset, heads=2, head_dim=8, device="cpu").kind == "decode"
    q, k, v = _inputs(1, 2, 2, q_len, kv_len, 8, dtype=torch.float64, seed=q_len)
    out, lse = module(q, k, v, q_offset=q_offset, return_lse=True)
    offset = kv_len - q_len if q_offset == "end" else q_offset
    expected, expected_lse = reference_attention(pattern, q, k, v, q_offset=offset)
    assert (out - expected).abs().max().item() < 1e-12
    assert torch.equal(torch.isfinite(lse), torch.isfinite(expected_lse))


def test_queries_past_the_last_key_are_not_decoding_steps():
    """Rows past the keys lie outside the decode plan's cached rows: another plan runs
    them, exactly."""
    module = sd.compile(sd.queries(3) | sd.window(1), block_size=16)
    assert module.explain(2, 17, q_offset=200, heads=1, head_dim=8, device="cpu").kind != "decode"
    q, k, v = _inputs(1, 1, 1, 2, 17, 8, dtype=torch.float64, seed=4)
    out, lse = module(q, k, v, q_offset=200, return_lse=True)
    expected, expected_lse = reference_attention(sd.queries(3) | sd.window(1), q, k, v, q_offset=200)
    assert (out - expected).abs().max().item() < 1e-12
    assert (lse - expected_lse).abs().max().item() < 1e-12


@pytest.mark.parametrize("pattern", [sd.causal(), sd.causal() & sd.window(9, 0)], ids=str)
def test_an_end_aligned_step_does_not_stand_for_other_offsets(pattern):
    """A step aligned to the end of the keys may run dense SDPA with a lower-right causal
    bias; a later step of the same shapes at another offset (a preallocated cache) gets a
    runner that reads its offset, whichever module asks and in whichever order."""
    sd.clear_caches()
    q, k, v = _inputs(1, 2, 2, 1, 36, 8, dtype=torch.float64, seed=5)
    for offsets in ((35, 20, 35, 7), (20, 35, 7, 35)):
        for offset in offsets:
            out = sd.compile(pattern, block_size=16)(q, k, v, q_offset=offset)
            assert (out - reference_attention(pattern, q, k, v, q_offset=offset)[0]).abs().max().item() < 1e-12
        sd.clear_caches()


def test_decoding_steps_reuse_cached_tile_rows():
    """A growing cache decoded token by token classifies one aligned tile row per tile of
    tokens (not one per token), and every step equals the full forward's row."""
    from sparsedsl.plans.decode import _DECODE_ROWS
    _DECODE_ROWS.clear()
    pattern = sd.causal() & sd.dilated_window(40, 0, 2) | sd.global_tokens(3)
    module = sd.compile(pattern, block_size=16)
    q, k, v = _inputs(1, 2, 2, 150, 150, 8, dtype=torch.float64, seed=9)
    full = module(q, k, v)
    for t in range(100, 150):
        step = module(q[:, :, t:t + 1], k[:, :, :t + 1], v[:, :, :t + 1], q_offset="end")
        assert torch.allclose(step, full[:, :, t:t + 1], atol=1e-12)
    rows = [entry._rows for entry in _DECODE_ROWS._values.values()]
    assert sum(len(r) for r in rows) <= 2 * len(rows) + 50 // 16 + 1


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("pattern", [sd.causal() & sd.window(37, 0) | sd.global_tokens(5),
                                     sd.segments([32, 64], [1, 2]) & sd.causal(),
                                     sd.window(20, 20).score(sd.alibi())])
@pytest.mark.parametrize("q_len,q_offset,kv_len", [(1, 99, 100), (3, 140, 143), (7, 60, 160)])
def test_decode_block_mask_is_a_sound_superset(pattern, q_len, q_offset, kv_len):
    """The decoding block mask (cached aligned rows) keeps every tile the exact mask needs,
    claims full only for full tiles, and gives FlexAttention the exact result."""
    from torch.nn.attention.flex_attention import flex_attention
    from sparsedsl.plans.decode import DecodeRows
    module = sd.compile(pattern, block_size=32)
    heads = 2
    exact = module.lowering(q_len, kv_len, heads=heads, q_offset=q_offset).states
    capacity = -(-kv_len // 32) * 32 + 32

    def row_states(row):
        lowering = module.lowering(32, capacity, heads=heads, q_offset=row * 32)
        return lowering.states

    rows = DecodeRows(row_states, 32, 32, capacity, module.lowering(1, capacity, heads=heads).position_mask, "cpu")
    ours = rows.states(q_offset, q_len, kv_len)[..., :exact.shape[-1]]
    assert ((exact != 0) <= (ours != 0)).all()
    assert ((ours == 3) <= (exact == 3)).all()
    q, k, v = _inputs(1, heads, heads, q_len, kv_len, 16, seed=q_len)
    pad = capacity - kv_len
    kp, vp = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (k, v))
    score_mod = module.score_mod(q_len, kv_len, heads=heads, q_offset=q_offset)
    out = flex_attention(q, kp, vp, block_mask=rows.block_mask(q_offset, q_len, kv_len), score_mod=score_mod)
    expected, _ = reference_attention(pattern, q, k, v, q_offset=q_offset)
    assert (out.double() - expected).abs().max().item() < 1e-5


@st.composite
def block_periodic_cases(draw):
    """``(pattern, period)``: unions and head groups of ``dilated``/``chunks``/``segments``."""
    def part():
        segment = draw(st.sampled_from((4, 8, 16, 32)))
        kind = draw(st.sampled_from(("dilated", "chunks", "segments")))
        if kind == "dilated":
            rate = draw(st.integers(1, min(segment, 4)))
            return sd.dilated(segment, rate, draw(st.integers(0, rate - 1)))
        if kind == "chunks":
            return sd.chunks(segment)
        return sd.segments([segment, 2 * segment], [1, 2])
    parts = [part() for _ in range(draw(st.integers(1, 2)))]
    pattern = parts[0] if len(parts) == 1 else (parts[0] | parts[1] if draw(st.booleans())
                                                else sd.heads(*parts))
    return pattern, sd.compile(pattern)._diagonal_period


@settings(max_examples=60)
@given(case=block_periodic_cases(), blocks_before=st.integers(1, 3), blocks=st.integers(1, 3),
       blocks_after=st.integers(0, 2), seed=st.integers(0, 2**16))
def test_rows_of_whole_diagonal_blocks_run_as_self_attention(case, blocks_before, blocks, blocks_after, seed):
    """A shard of rows that are whole blocks of a block-periodic pattern (a LongNet shard)
    runs on its own keys (the lattice plan applies) and equals the dense reference, with
    gradients reaching only its own keys."""
    pattern, period = case
    offset, rows = blocks_before * period, blocks * period
    kv_len = offset + rows + blocks_after * period
    q, k, v = _inputs(1, 4, 4, rows, kv_len, 8, dtype=torch.float64, seed=seed, requires_grad=True)
    module = sd.compile(pattern, block_size=16)
    out = module(q, k, v, q_offset=offset)
    expected, _ = reference_attention(pattern, q, k, v, q_offset=offset)
    assert (out - expected).abs().max().item() < 1e-10
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    got = torch.autograd.grad((out * weights).sum(), (q, k, v))
    want = torch.autograd.grad((expected * weights).sum(), (q, k, v))
    for g, w in zip(got, want):
        assert (g - w).abs().max().item() < 1e-9


def test_a_longnet_shard_runs_on_the_lattice_plan():
    module = sd.compile(sd.segments([2048, 4096, 8192, 16384], [1, 2, 4, 8]))
    plan = module.explain(16384, 65536, heads=16, q_offset=32768, device="cuda")
    assert plan.kind == "lattice" and plan.computed_pairs == plan.pairs
    # rows that cut a segment are not a shard of whole blocks: the tile plan runs
    assert module.explain(16384, 65536, heads=16, q_offset=8192, device="cuda").kind == "flex"
